"""A real `glaze serve` for API tests: a subprocess on a free port, reached over real HTTP.

`served(tmp_path, ...)` starts the server (with its launcher, unless `launcher=False`) on the
given database and Redis, waits until `/health` answers, and stops it at the end; its output
is printed when it fails to start, so a broken server says why.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from glaze_pipeline.bench.stack import free_port, stop_process_group

GLAZE = [sys.executable, "-c", "from glaze_pipeline.cli import main; main()"]
TEST_TOKEN_SECRET = "test-secret-for-signing-job-tokens-0123456789"
LEADS = "tbl_leads"


@dataclass
class Server:
    base_url: str
    env: dict[str, str]
    log_path: Path
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=30, **kwargs)

    def glaze(self, *args: str) -> str:
        """Run a `glaze` command against the server's database; its stdout."""
        done = subprocess.run(
            [*GLAZE, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise AssertionError(f"glaze {' '.join(args)} failed: {done.stderr}{done.stdout}")
        return done.stdout

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_job(self, table_id: str, job_id: str, *, timeout: float = 60.0) -> dict[str, Any]:
        """The job once it ended (status completed/failed/cancelled), polled."""
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                job = client.get(f"/tables/{table_id}/enrich/jobs/{job_id}").json()
                if job["status"] in ("completed", "failed", "cancelled"):
                    return dict(job)
                if time.monotonic() > deadline:
                    raise AssertionError(f"job {job_id} did not end in {timeout}s: {job}")
                time.sleep(0.1)


def server_env(
    home: Path,
    *,
    database_url: str | None = None,
    redis_url: str | None = None,
    api_keys: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("GLAZE_", "DAGSTER_"))
    }
    env.update(
        {
            "GLAZE_HOME": str(home),
            "DAGSTER_HOME": str(home / "dagster"),
            "GLAZE_TOKEN_SECRET": TEST_TOKEN_SECRET,
        }
    )
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    (home / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    if database_url:
        env["GLAZE_DATABASE_URL"] = database_url
    if redis_url:
        env["GLAZE_REDIS_URL"] = redis_url
    if api_keys:
        env["GLAZE_API_KEYS"] = api_keys
    env.update(extra or {})
    return env


@contextlib.contextmanager
def served(
    home: Path,
    *,
    database_url: str | None = None,
    redis_url: str | None = None,
    api_key: str | None = None,
    launcher: bool = True,
    seed: bool = True,
    extra_env: Mapping[str, str] | None = None,
    startup_timeout: float = 60.0,
) -> Iterator[Server]:
    """`glaze serve` on a free port over `home` (GLAZE_HOME), seeded with the Leads table."""
    home.mkdir(parents=True, exist_ok=True)
    env = server_env(
        home, database_url=database_url, redis_url=redis_url, api_keys=api_key, extra=extra_env
    )
    port = free_port()
    server = Server(
        f"http://127.0.0.1:{port}",
        env,
        home / "serve.log",
        api_key,
        {"Authorization": f"Bearer {api_key}"} if api_key else {},
    )
    if seed:
        server.glaze("db", "upgrade")
        server.glaze("seed")
    command = [*GLAZE, "serve", "--port", str(port), *([] if launcher else ["--no-launcher"])]
    with server.log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"glaze serve exited {process.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{server.base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"glaze serve did not answer in time:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        stop_process_group(process)
