"""Launch latency: enqueue -> run STARTED -> first row written -> finished, for 10-row requests.

Measured twice on the same stack: through the queue sensor alone (Dagster's daemon), and with
the push launcher running (NOTIFY -> claim -> GraphQL launchRun). Requests go one at a time,
as a user clicking "enrich" would send them.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from dagster import DagsterInstance
from sqlalchemy import func, select

from glaze_pipeline.bench.stack import BIN, Stack, dagster_stack, fresh_postgres
from glaze_pipeline.core import queue
from glaze_pipeline.core.models import TERMINAL_REQUEST_STATUSES, RequestStatus
from glaze_pipeline.core.schema import GlazeRow
from glaze_pipeline.core.seed import LEADS_ENRICH_KEYS, leads_column_id, seed_leads
from glaze_pipeline.core.store import Store


@dataclass
class LaunchTiming:
    path: str
    request_id: str
    started_s: float  # enqueue -> Dagster run STARTED
    first_write_s: float  # enqueue -> first row written
    finished_s: float  # enqueue -> request terminal
    status: str


def _seconds(later: datetime | float | None, earlier: datetime) -> float:
    if later is None:
        return float("nan")
    if isinstance(later, float):  # a Dagster run record's unix timestamp
        return later - earlier.timestamp()
    if later.tzinfo is None:
        later = later.replace(tzinfo=earlier.tzinfo)
    return (later - earlier).total_seconds()


def measure_one(
    store: Store, instance: DagsterInstance, path: str, timeout_s: float = 120
) -> LaunchTiming:
    selection = {"column_ids": [leads_column_id(k) for k in LEADS_ENRICH_KEYS]}
    request_id = queue.enqueue(store, "tbl_leads", selection)
    created = store.get_request(request_id).created_at
    deadline = time.monotonic() + timeout_s
    while True:
        request = store.get_request(request_id)
        if RequestStatus(request.status) in TERMINAL_REQUEST_STATUSES:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{request_id} still {request.status} after {timeout_s}s")
        time.sleep(0.05)
    if created.tzinfo is None:
        from datetime import UTC

        created = created.replace(tzinfo=UTC)
    record = instance.get_run_record_by_id(request.run_id) if request.run_id else None
    with store.engine.connect() as connection:
        first_write = connection.scalar(
            select(func.min(GlazeRow.last_run_at)).where(
                GlazeRow.table_id == "tbl_leads", GlazeRow.last_run_at >= created
            )
        )
    return LaunchTiming(
        path=path,
        request_id=request_id,
        started_s=_seconds(record.start_time if record else None, created),
        first_write_s=_seconds(first_write, created),
        finished_s=_seconds(request.finished_at, created),
        status=request.status,
    )


def summarize(timings: list[LaunchTiming]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for stage in ("started_s", "first_write_s", "finished_s"):
        values = [getattr(t, stage) for t in timings]
        out[stage] = {
            "min": round(min(values), 3),
            "median": round(statistics.median(values), 3),
            "max": round(max(values), 3),
        }
    return out


PATHS = ("sensor", "launcher-graphql", "launcher-fork")


def run(
    base_postgres_url: str, requests: int = 10, *, paths: tuple[str, ...] = PATHS
) -> dict[str, Any]:
    results: dict[str, Any] = {"requests": requests, "paths": {}}
    with fresh_postgres(base_postgres_url) as url, dagster_stack(url) as stack:
        store = Store(url)
        seed_leads(store)
        instance = DagsterInstance.from_config(str(stack.home))
        time.sleep(3)  # let the daemon's first sensor ticks settle
        for path in paths:
            launcher = _start_launcher(stack, path) if path.startswith("launcher") else None
            timings = [measure_one(store, instance, path) for _ in range(requests)]
            if launcher is not None:
                stack.stop(launcher)
            results["paths"][path] = {
                "summary": summarize(timings),
                "runs": [asdict(t) for t in timings],
            }
        instance.dispose()
        store.dispose()
    return results


def _start_launcher(stack: Stack, path: str) -> subprocess.Popen[bytes]:
    how = ["--graphql-url", stack.graphql_url] if path == "launcher-graphql" else []
    process = stack.start(str(BIN / "glaze"), "launcher", *how, name=path)
    time.sleep(3)  # imports + LISTEN
    return process
