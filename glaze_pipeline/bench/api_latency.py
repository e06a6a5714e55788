"""API latency as an app sees it: POST enrich -> the SSE stream says the job runs -> `finished`.

`glaze serve` (with its launcher) is started on the embedded SQLite default in a temporary
GLAZE_HOME, as a fresh clone would run it (no Redis: the stream polls the request row), and,
when a Postgres server is given, on a throwaway Postgres database (with Redis when given: the
stream follows pub/sub). The Leads table is seeded; then small jobs (2 columns x 3 rows, with
`overwrite` so each writes its 6 cells) go one at a time, as a person clicking Run would send
them, after a random pause of up to `gap_s` (back to back, the jobs fall in step with the
polls of the SQLite launcher and of the stream (every 0.2 s), and the figures measure that phase, not
the system). For each: the time from sending the POST to the stream's first event showing the job
started (`status` running; or its ending, when polling missed a `running` shorter than one poll),
and to `finished`. Issue 10's target: <= 1 s to running.

The first `warmup` jobs are reported apart: they include the launcher's start (imports, first
fork), which a running server has behind it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from glaze_pipeline.bench.stack import BIN, Stack, free_port, fresh_postgres, wait_http
from glaze_pipeline.core.seed import LEADS_TABLE_ID, leads_column_id, leads_row_id

ENDED_STATES = ("succeeded", "partial", "failed", "cancelled")
COLUMNS = ("industry", "title")
ROWS_PER_JOB = 3
LEADS_ROWS = 10


@dataclass(frozen=True)
class JobLatency:
    job_id: str
    running_s: float  # POST sent -> first event showing the job started
    finished_s: float  # POST sent -> `finished`
    saw_running: bool  # a `status` running event came (polling may miss a short one)
    state: str  # how it ended


@dataclass
class SetupLatency:
    """One server setup's figures."""

    setup: str
    jobs: list[JobLatency] = field(default_factory=list)
    warmup: list[JobLatency] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            stage: _figures([getattr(job, stage) for job in self.jobs])
            for stage in ("running_s", "finished_s")
        }

    def line(self) -> str:
        figures = self.summary()
        running, finished = figures["running_s"], figures["finished_s"]
        seen = sum(job.saw_running for job in self.jobs)
        return (
            f"{self.setup}, {len(self.jobs)} jobs: POST -> running median {running['median']:.3f}"
            f" s, p90 {running['p90']:.3f}, max {running['max']:.3f}; -> finished median "
            f"{finished['median']:.3f} s, p90 {finished['p90']:.3f}, max {finished['max']:.3f} "
            f"({seen}/{len(self.jobs)} streams showed `running` before the end)"
        )


@dataclass
class LatencyReport:
    jobs: int
    setups: list[SetupLatency] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "target_running_s": 1.0,
            "setups": [{**asdict(setup), "summary": setup.summary()} for setup in self.setups],
        }

    def lines(self) -> list[str]:
        return [setup.line() for setup in self.setups]


def _figures(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": float("nan"), "p90": float("nan"), "max": float("nan")}
    p90 = (
        statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]
    )
    return {
        "median": round(statistics.median(values), 3),
        "p90": round(p90, 3),
        "max": round(max(values), 3),
    }


def measure(
    jobs: int = 10,
    *,
    postgres_url: str | None = None,
    redis_url: str | None = None,
    warmup: int = 1,
    gap_s: float = 0.5,
    timeout_s: float = 60.0,
    echo: Callable[[str], None] = print,
) -> LatencyReport:
    """Measure `jobs` small jobs on the embedded SQLite default, and on a throwaway database of
    the Postgres server `postgres_url` (with `redis_url`'s Redis, if given) when one is given."""
    if jobs < 1 or warmup < 0 or gap_s < 0:
        raise ValueError(
            f"jobs must be >= 1, warmup and gap_s >= 0, not {jobs}, {warmup} and {gap_s}"
        )
    pauses = random.Random(0)  # the same pauses every time
    report = LatencyReport(jobs)
    setups: list[tuple[str, str | None, str | None]] = [("sqlite, polling", None, None)]
    if postgres_url:
        how = "redis pub/sub" if redis_url else "polling"
        setups.append((f"postgres, {how}", postgres_url, redis_url))
    for name, server_url, redis in setups:
        echo(f"{name}: starting glaze serve ...")
        with _database(server_url) as database_url, _served(database_url, redis) as base_url:
            result = SetupLatency(name)
            with httpx.Client(base_url=base_url, timeout=httpx.Timeout(10, read=timeout_s)) as c:
                for index in range(warmup + jobs):
                    time.sleep(pauses.uniform(0, gap_s))
                    job = _one_job(c, index, timeout_s)
                    (result.warmup if index < warmup else result.jobs).append(job)
            report.setups.append(result)
            echo(result.line())
    return report


@contextlib.contextmanager
def _database(server_url: str | None) -> Iterator[str | None]:
    """A throwaway database on that Postgres server, or None: the embedded SQLite default."""
    if server_url is None:
        yield None
        return
    with fresh_postgres(server_url) as url:
        yield url


@contextlib.contextmanager
def _served(database_url: str | None, redis_url: str | None) -> Iterator[str]:
    """`glaze serve` with its launcher in a temporary GLAZE_HOME, Leads seeded; its base URL."""
    home = Path(tempfile.mkdtemp(prefix="glaze-api-latency-"))
    dagster_home = home / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLAZE_", "DAGSTER_"))}
    env.update(GLAZE_HOME=str(home / ".glaze"), DAGSTER_HOME=str(dagster_home))
    if database_url:
        env["GLAZE_DATABASE_URL"] = database_url
    if redis_url:
        env["GLAZE_REDIS_URL"] = redis_url
    stack = Stack(database_url or "sqlite (GLAZE_HOME)", home, env)
    glaze = str(BIN / "glaze")
    try:
        for command in (["db", "upgrade"], ["seed"]):
            subprocess.run(
                [glaze, *command], env=env, cwd=home, check=True, capture_output=True, timeout=120
            )
        port = free_port()
        stack.start(glaze, "serve", "--port", str(port), name="serve")
        base_url = f"http://127.0.0.1:{port}"
        wait_http(f"{base_url}/health", timeout_s=60)
        yield base_url
    finally:
        for process in list(stack.processes):
            stack.stop(process)
        shutil.rmtree(home, ignore_errors=True)


def _one_job(client: httpx.Client, index: int, timeout_s: float) -> JobLatency:
    """POST one 2 x 3 job and follow its stream to `finished`."""
    rows = [leads_row_id((index * ROWS_PER_JOB + i) % LEADS_ROWS) for i in range(ROWS_PER_JOB)]
    body = {"columnIds": [leads_column_id(k) for k in COLUMNS], "rowIds": rows, "overwrite": True}
    sent = time.perf_counter()
    answer = client.post(f"/tables/{LEADS_TABLE_ID}/enrich", json=body)
    answer.raise_for_status()
    job = answer.json()
    running_s: float | None = None
    saw_running = False
    deadline = time.monotonic() + timeout_s
    path = f"/realtime/jobs/{job['jobId']}"
    with client.stream("GET", path, params={"token": job["publicAccessToken"]}) as events:
        events.raise_for_status()
        for name, data in _events(events):
            now = time.perf_counter() - sent
            if name == "status" and data["state"] == "running":
                saw_running = True
            if name == "status" and data["state"] in ("running", *ENDED_STATES):
                running_s = now if running_s is None else running_s
            if name == "finished":
                started = now if running_s is None else running_s
                return JobLatency(job["jobId"], started, now, saw_running, str(data["state"]))
            if time.monotonic() > deadline:
                break
    raise TimeoutError(f"job {job['jobId']}: no `finished` event within {timeout_s}s")


def _events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) of an SSE response, as they arrive (comments and `retry` skipped)."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if "event" in fields:
                yield fields["event"], json.loads(fields.get("data", "{}"))
            fields = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            fields[key] = value.removeprefix(" ")
