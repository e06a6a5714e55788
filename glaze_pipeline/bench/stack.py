"""A local Glaze + Dagster stack for benchmarks: a fresh Postgres database, webserver, daemon."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from glaze_pipeline.core.store import Store, normalize_url

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def fresh_postgres(base_url: str, *, migrate: bool = True) -> Iterator[str]:
    """A throwaway Postgres database on the server of `base_url`, migrated unless `migrate` is
    false, dropped on exit."""
    base = make_url(normalize_url(base_url))
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    name = f"glaze_tmp_{secrets.token_hex(4)}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    if migrate:
        store = Store(url)
        store.upgrade()
        store.dispose()
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class Stack:
    """Processes started for a benchmark, with their environment; stopped on exit."""

    database_url: str
    home: Path
    env: dict[str, str]
    graphql_url: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[int, BinaryIO] = field(default_factory=dict)

    def start(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        log = open(self.home / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        # Its own session: stopping it stops its children too (the daemon's code server).
        process = subprocess.Popen(
            list(args),
            cwd=self.home,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        self.logs[process.pid] = log
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        stop_process_group(process, timeout_s=20)
        self.processes.remove(process)
        self.logs.pop(process.pid).close()


@contextlib.contextmanager
def dagster_stack(
    database_url: str, *, webserver: bool = True, daemon: bool = True
) -> Iterator[Stack]:
    """DAGSTER_HOME in a temp dir with the repo's local dagster.yaml, plus webserver and daemon."""
    home = Path(tempfile.mkdtemp(prefix="glaze-bench-"))
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLAZE_", "DAGSTER_"))}
    env.update(
        DAGSTER_HOME=str(home), GLAZE_DATABASE_URL=database_url, GLAZE_HOME=str(home / ".glaze")
    )
    stack = Stack(database_url, home, env)
    module = ["-m", "glaze_pipeline.definitions"]
    try:
        if webserver:
            port = free_port()
            stack.start(
                str(BIN / "dagster-webserver"),
                *module,
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                name="webserver",
            )
            stack.graphql_url = f"http://127.0.0.1:{port}/graphql"
            wait_http(f"http://127.0.0.1:{port}/server_info", timeout_s=90)
        if daemon:
            stack.start(str(BIN / "dagster-daemon"), "run", *module, name="daemon")
        yield stack
    finally:
        for process in list(stack.processes):
            stack.stop(process)
        shutil.rmtree(home, ignore_errors=True)


def stop_process_group(process: subprocess.Popen[bytes], *, timeout_s: float = 30) -> None:
    """Stop a process started with `start_new_session=True` and everything it started (serve's
    launcher, the launcher's forked runs, the daemon's code server): SIGTERM to the group,
    SIGKILL after `timeout_s`, then SIGKILL to whatever of the group outlived its leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def wait_http(url: str, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")
