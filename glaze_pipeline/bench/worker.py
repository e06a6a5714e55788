"""One measured pipeline run, in a process of its own (`python -m glaze_pipeline.bench.worker`).

Each scenario's pipeline runs in a fresh process so that its peak RSS (`ru_maxrss`) is its own
and no warm state (imports, pools, the in-memory cache tier) leaks from one run into the next.
The parent passes a JSON spec file and reads back a JSON result file.

- `entity`: the real Dagster job `enrich_table`, executed in process (`runner.run_in_process`,
  as `glaze enrich` runs it) with the bench providers file and `GLAZE_REDIS_URL` set, on a
  SQLite Dagster instance in a temp dir. Statements: `Store.process_statements` before and after.
  With `execution` set (multiprocess / Celery) the job runs from its reconstructable
  definition on a persistent instance (`dagster_yaml`: Postgres storage the Celery workers,
  started by the parent, share); `resources` adds the run's resource config.
- `baseline`: the cell-level job of `glaze_pipeline.bench.baseline`.

While the entity run goes, a `StreamWatch` in a process of its own (`WatchProcess`, started
before the clock) hears the table's progress channel and polls the mock's `/_stats` and the
request row every ~100 ms: the streaming figures (time to the first written row, the share of
lookups done by then, the longest silence between progress events). In a thread of the worker
it took the job's GIL (~11 % of an in-process S3's samples, py-spy), so it slowed the run it
measured; in its own process it costs the job no GIL and none of the worker's `cpu_s`.
The time Postgres spends in the row-merge statements is summed by a statement hook
(`write_seconds`), for the writing throughput.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

STARTED = time.perf_counter()


def peak_rss_mib() -> float:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU this process has used so far, all threads (step processes of another
    executor are counted apart: `StreamWatch.children_cpu`)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# The statement that merges a page of patches into `rows` (Store.apply_patches, Postgres).
ROW_MERGE_MARK = "data = r.data || v.data"
PROGRESS_EVENTS = ("started", "progress")


class WriteTimer:
    """Sums the execution time of the row-merge statements of every engine in this process."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.statements = 0
        self._started: dict[int, float] = {}

    def install(self) -> None:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "before_cursor_execute", self._before)
        event.listen(Engine, "after_cursor_execute", self._after)

    def _before(self, _conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if ROW_MERGE_MARK in statement:
            self._started[id(cursor)] = time.perf_counter()

    def _after(self, _conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        began = self._started.pop(id(cursor), None)
        if began is not None:
            self.seconds += time.perf_counter() - began
            self.statements += 1


class StreamWatch:
    """What a subscriber and a poller see while the job runs, timestamped on arrival.

    One thread: it listens on the table's progress channel (`<prefix>:table:<id>`), and every
    `interval` s polls the mock's `/_stats` (provider calls served so far) and the newest
    request row of the table (`updated_at`, the heartbeat). Subscribed before the run starts,
    so the job's first event is heard. `root_pid`'s descendants (other than this process) are
    the step processes whose CPU and RSS it tracks.
    """

    def __init__(
        self,
        redis_url: str,
        table_id: str,
        *,
        mock_url: str | None,
        database_url: str,
        interval: float = 0.1,
        track_children: bool = False,
        root_pid: int | None = None,
    ) -> None:
        import threading

        import redis

        from glaze_pipeline.core.progress import resolve_prefix, table_channel

        self.channel = table_channel(resolve_prefix(redis_url), table_id)
        self.table_id = table_id
        self.mock_url = mock_url
        self.database_url = database_url
        self.interval = interval
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.calls: list[tuple[float, int]] = []
        self.beats: list[tuple[float, float]] = []  # (seen at, the row's updated_at)
        self.cpu_s = 0.0
        self.errors: list[str] = []
        # Steps in other processes (multiprocess): each descendant's CPU and peak RSS, last
        # seen by a poll.
        self.track_children = track_children
        self.root_pid = root_pid or os.getpid()
        self.children_cpu: dict[int, float] = {}
        self.children_peak_rss: dict[int, float] = {}
        self._client = redis.Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-stream-watch", daemon=True)

    def start(self) -> None:
        self._pubsub.subscribe(self.channel)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the subscription is live once confirmed
            message = self._pubsub.get_message(ignore_subscribe_messages=False, timeout=0.5)
            if message and message["type"] == "subscribe":
                break
        else:
            raise RuntimeError(f"no subscription confirmed on {self.channel}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._pubsub.close()
        self._client.close()

    def _run(self) -> None:
        import httpx
        from sqlalchemy import create_engine, text

        from glaze_pipeline.core.store import normalize_url

        engine = create_engine(normalize_url(self.database_url), pool_size=1)
        beat_sql = text(
            "SELECT updated_at FROM enrichment_requests WHERE table_id = :t "
            "ORDER BY created_at DESC LIMIT 1"
        )
        http = httpx.Client(timeout=2)
        next_poll = 0.0
        try:
            while True:
                stopping = self._stop.is_set()
                message = self._listen(self.interval / 2)
                while message is not None:
                    self._heard(message)
                    message = self._listen(0)
                now = time.monotonic()
                if now >= next_poll or stopping:
                    next_poll = now + self.interval
                    self._poll(http, engine, beat_sql)
                if stopping:
                    break
        finally:
            http.close()
            engine.dispose()
            self.cpu_s = time.process_time()

    def _listen(self, timeout: float) -> dict[str, Any] | None:
        message: dict[str, Any] | None = self._pubsub.get_message(
            ignore_subscribe_messages=True, timeout=timeout
        )
        return message

    def _heard(self, message: dict[str, Any]) -> None:
        try:
            payload = json.loads(message["data"])
        except (TypeError, ValueError):
            return
        if isinstance(payload, dict):
            if isinstance(payload.get("cells"), list):
                # What was written, not the cells themselves: a 1M-row job publishes 3M cells,
                # which kept here would be the worker's peak RSS, not the job's.
                payload["cells"] = len(payload["cells"])
            self.events.append((time.time(), payload))

    def _poll(self, http: Any, engine: Any, beat_sql: Any) -> None:
        from glaze_pipeline.bench.services import vendor_lookups

        seen = time.time()
        if self.track_children:
            for pid, (cpu, rss) in descendants_usage(self.root_pid).items():
                if pid == os.getpid():
                    continue  # the watcher's own process: the benchmark's, not the job's
                self.children_cpu[pid] = cpu
                if rss is not None:
                    self.children_peak_rss[pid] = rss
        if self.mock_url:
            try:
                vendors = http.get(f"{self.mock_url}/_stats").json()["vendors"]
                self.calls.append((seen, sum(vendor_lookups(v) for v in vendors.values())))
            except Exception as error:  # a poll lost is a sample lost, not the run
                self._note(f"mock stats: {error}")
        try:
            with engine.connect() as connection:
                stamp = connection.execute(beat_sql, {"t": self.table_id}).scalar()
            if stamp is not None:
                self.beats.append((seen, stamp.timestamp()))
        except Exception as error:
            self._note(f"request row: {error}")

    def _note(self, error: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(error)

    def seen(self) -> WatchRecord:
        return WatchRecord(
            self.events,
            self.calls,
            self.beats,
            self.cpu_s,
            self.errors,
            self.children_cpu,
            self.children_peak_rss,
        )


@dataclass
class WatchRecord:
    """What a StreamWatch saw, handed back from its process."""

    events: list[tuple[float, dict[str, Any]]]
    calls: list[tuple[float, int]]
    beats: list[tuple[float, float]]
    cpu_s: float  # the watcher's own CPU (its process's)
    errors: list[str]
    children_cpu: dict[int, float]
    children_peak_rss: dict[int, float]

    def figures(self, started_at: float) -> dict[str, Any]:
        """The streaming figures, in seconds from `started_at` (the run's start)."""
        return stream_figures(self.events, self.calls, self.beats, started_at) | {
            "events_heard": len(self.events),
            "watch_cpu_s": round(self.cpu_s, 3),
            "watch_errors": self.errors,
        }


class WatchProcess:
    """A StreamWatch of this process's run, in a process of its own (spawned: a fresh
    interpreter, not a fork of the worker): `start` returns once it is subscribed, `stop`
    returns what it saw."""

    def __init__(self, **watch: Any) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        watch["root_pid"] = os.getpid()
        self._process = context.Process(
            target=_watch_in_child, args=(child, watch), name="bench-stream-watch", daemon=True
        )

    def start(self) -> None:
        self._process.start()
        if not self._conn.poll(60):
            raise RuntimeError("the stream watcher did not start within 60 s")
        reply = self._conn.recv()
        if reply != "ready":
            raise RuntimeError(f"the stream watcher did not start: {reply}")

    def stop(self) -> WatchRecord:
        self._conn.send("stop")
        if not self._conn.poll(30):
            self._process.kill()
            raise RuntimeError("the stream watcher did not answer within 30 s")
        record: WatchRecord = self._conn.recv()
        self._process.join(timeout=10)
        return record


def _watch_in_child(conn: Any, watch: dict[str, Any]) -> None:
    try:
        stream = StreamWatch(**watch)
        stream.start()
    except Exception as error:
        conn.send(f"{type(error).__name__}: {error}")
        return
    conn.send("ready")
    conn.recv()  # "stop"
    stream.stop()
    conn.send(stream.seen())


def descendants_usage(root: int) -> dict[int, tuple[float, float | None]]:
    """(user + system CPU s, peak RSS MiB) of every live descendant of process `root`, from
    /proc."""
    from glaze_pipeline.bench.services import cpu_seconds as process_cpu
    from glaze_pipeline.bench.services import peak_rss_mib as process_peak_rss
    from glaze_pipeline.bench.stack import process_tree

    found: dict[int, tuple[float, float | None]] = {}
    for pid in process_tree(root) - {root}:
        cpu = process_cpu(pid)
        if cpu is not None:
            found[pid] = (cpu, process_peak_rss(pid))
    return found


def _writes_rows(payload: dict[str, Any]) -> bool:
    event = payload.get("event")
    if event == "cells":
        return bool(payload.get("cells"))
    return event == "progress" and int(payload.get("rows_written") or 0) > 0


def stream_figures(
    events: list[tuple[float, dict[str, Any]]],
    calls: list[tuple[float, int]],
    beats: list[tuple[float, float]],
    started_at: float,
) -> dict[str, Any]:
    """First written row, lookups done by then, and the longest silences during enrichment.

    * `first_row_s`: the first `cells` event, or `progress` with rows_written > 0.
    * `lookups_done_at_first_row`: provider calls the mock had served by then (its first poll
      at or after that moment: an upper bound), over all it served in the run; and
      `lookups_done_at_first_row_events`: entities_done / entities of the first progress event
      that reports rows written (the job's own view).
    * `progress_gap_max_s`: the longest time between consecutive `started` / `progress` events,
      from the first `started` to the last `progress`; `heartbeat_gap_max_s` the same over the
      request row's distinct `updated_at` stamps (polled: can overstate by one poll interval).
    """
    out: dict[str, Any] = {
        "first_row_s": None,
        "lookups_done_at_first_row": None,
        "lookups_done_at_first_row_events": None,
        "progress_events": 0,
        "progress_gap_max_s": None,
        "heartbeat_gap_max_s": None,
    }
    first_row = next((t for t, p in events if _writes_rows(p)), None)
    if first_row is not None:
        out["first_row_s"] = round(first_row - started_at, 3)
        total = calls[-1][1] if calls else 0
        after = next((n for t, n in calls if t >= first_row), None)
        if total and after is not None:
            out["lookups_done_at_first_row"] = round(after / total, 4)
    reporting = next(
        (
            p
            for _, p in events
            if p.get("event") == "progress" and int(p.get("rows_written") or 0) > 0
        ),
        None,
    )
    if reporting is not None and reporting.get("entities"):
        share = int(reporting.get("entities_done") or 0) / int(reporting["entities"])
        out["lookups_done_at_first_row_events"] = round(share, 4)
    started = next((t for t, p in events if p.get("event") == "started"), None)
    progress = [t for t, p in events if p.get("event") == "progress"]
    out["progress_events"] = len(progress)
    if started is not None and progress:
        window = [t for t, p in events if p.get("event") in PROGRESS_EVENTS and t >= started]
        window = [t for t in window if t <= progress[-1]]
        out["enrich_window_s"] = round(progress[-1] - started, 3)
        out["progress_gap_max_s"] = round(_longest_gap(window), 3)
        stamps = sorted({stamp for _, stamp in beats if started <= stamp <= progress[-1]})
        if stamps:
            out["heartbeat_gap_max_s"] = round(_longest_gap([started, *stamps, progress[-1]]), 3)
    elif started is not None:
        out["progress_gap_max_s"] = None  # no progress event at all: nothing streamed
    return out


def _longest_gap(times: list[float]) -> float:
    ordered = sorted(times)
    return max((b - a for a, b in itertools.pairwise(ordered)), default=0.0)


def _execution_runner(spec: dict[str, Any]) -> str:
    """Which executor the spec's `execution` run config selects (in_process when none)."""
    execution = spec.get("execution")
    if not execution:
        return "in_process"
    from glaze_pipeline.defs.executors import selected_executor

    return selected_executor({"execution": execution})


def run_entity(spec: dict[str, Any]) -> dict[str, Any]:
    from dagster import DagsterEventType, DagsterInstance
    from dagster._core.errors import DagsterInvalidConfigError

    from glaze_pipeline.core import queue
    from glaze_pipeline.core.models import RequestKind
    from glaze_pipeline.core.store import Store
    from glaze_pipeline.definitions import build_definitions
    from glaze_pipeline.runner import run_in_process

    os.environ["GLAZE_REDIS_URL"] = spec["redis_url"]
    # Step processes of the multiprocess / Celery executors build the definitions from these.
    os.environ["GLAZE_DATABASE_URL"] = spec["database_url"]
    os.environ["GLAZE_PROVIDERS_FILE"] = spec["providers_file"]
    home = Path(spec["dagster_home"])
    home.mkdir(parents=True, exist_ok=True)
    # A Celery run needs storage its workers share (Postgres): `dagster_yaml` gives it.
    (home / "dagster.yaml").write_text(spec.get("dagster_yaml") or "telemetry:\n  enabled: false\n")
    definitions = build_definitions(spec["database_url"], spec["providers_file"])
    job_name, run_config = queue.job_run(RequestKind.ENRICH, spec["job_config"])
    if spec.get("execution"):
        run_config["execution"] = spec["execution"]
    if spec.get("resources"):
        run_config["resources"] = spec["resources"]
    executor = _execution_runner(spec)
    definitions.get_job_def(job_name)  # built before the clock starts
    writes = WriteTimer()
    writes.install()
    watch = WatchProcess(
        redis_url=spec["redis_url"],
        table_id=spec["job_config"]["table_id"],
        mock_url=spec.get("mock_url"),
        database_url=spec["database_url"],
        track_children=executor != "in_process",
    )
    watch.start()
    ready_s = time.perf_counter() - STARTED
    with DagsterInstance.from_config(str(home)) as instance:
        before = Store.process_statements
        cpu_before = cpu_seconds()
        started_at = time.time()
        try:
            if executor == "in_process":
                outcome = run_in_process(
                    job_name,
                    run_config,
                    database_url=spec["database_url"],
                    definitions=definitions,
                    instance=instance,
                    log_level="WARNING",
                    one_line_log=False,
                )
                run_id, success = outcome.run_id, outcome.success
                events: Any = outcome.result
            else:
                run_id, success, events = _run_elsewhere(job_name, run_config, instance)
        except DagsterInvalidConfigError as error:
            watch.stop()
            return {"success": False, "config_rejected": str(error), "failure": str(error)}
        wall = time.time() - started_at
        cpu = cpu_seconds() - cpu_before
        seen = watch.stop()
        statements = Store.process_statements - before
        rss = peak_rss_mib()
        kinds = {
            DagsterEventType.RUN_START,
            DagsterEventType.STEP_START,
            DagsterEventType.STEP_SUCCESS,
            DagsterEventType.STEP_FAILURE,
        }
        steps: dict[str, dict[str, float]] = {}
        run_started = None
        failures: dict[str, str] = {}  # step -> why it failed, in the order they failed
        step_pids: set[int] = set()
        ran_on: dict[str, str] = {}
        for entry in instance.all_logs(run_id):
            event = entry.dagster_event
            if event is None:
                continue
            if entry.step_key and event.event_type is DagsterEventType.ENGINE_EVENT:
                worker = _celery_worker_of(event)
                if worker is not None:
                    ran_on[entry.step_key] = worker
            if event.pid is not None and event.event_type is DagsterEventType.STEP_START:
                step_pids.add(event.pid)
            if event.event_type is DagsterEventType.STEP_FAILURE:
                data = event.step_failure_data
                why = data.error.message if data is not None and data.error else "failed"
                failures.setdefault(entry.step_key or "run", why.strip())
            if event.event_type not in kinds:
                continue
            offset = entry.timestamp - started_at
            if event.event_type is DagsterEventType.RUN_START:
                run_started = offset
            elif entry.step_key:
                stage = "start" if event.event_type is DagsterEventType.STEP_START else "end"
                steps.setdefault(entry.step_key, {})[stage] = round(offset, 3)
        # Every failed step says why: the first to fail is not always the first one logged.
        failure = "; ".join(f"{step}: {why}" for step, why in failures.items()) or None
        if not success and failure is None:
            failure = "run failed"
        request_id = _request_of(events, spec, success)
    # Step processes of another executor: their CPU as last polled (up to one poll interval
    # of each is missed).
    children_cpu = sum(seen.children_cpu.values())
    cpu += children_cpu
    out: dict[str, Any] = {
        "success": success,
        "failure": failure,
        "executor": executor,
        "wall_s": round(wall, 3),
        "process_ready_s": round(ready_s, 3),
        "run_started_s": round(run_started, 3) if run_started is not None else None,
        "first_step_s": min((s.get("start", wall) for s in steps.values()), default=None),
        "phases": _phases(steps),
        "statements": statements,
        "cpu_s": round(cpu, 2),
        "cpu_s_step_processes": round(children_cpu, 2),
        "peak_rss_mib": round(rss, 1),
        # The largest step process (the fork server and each step's, as last polled).
        "step_processes_peak_rss_mib": round(max(seen.children_peak_rss.values()), 1)
        if seen.children_peak_rss
        else None,
        "step_processes": len(step_pids),
        "steps_by_celery_worker": _count_by_worker(ran_on),
        "stream": seen.figures(started_at),
    }
    if executor == "in_process":
        # Only statements run in this process are timed; another executor's steps would need
        # to report their own (a `write_seconds` the coordinator may add to this result).
        out["write_seconds"] = round(writes.seconds, 3)
        out["write_statements"] = writes.statements
    if success and request_id is not None:
        store = Store(spec["database_url"])
        request = store.get_request(request_id)
        store.dispose()
        out["request"] = {
            "id": request.id,
            "status": request.status,
            "entities": request.entities,
            "rows": request.rows_total,
            "rows_written": request.rows_written,
            "cells": request.cells_total,
            "cells_done": request.cells_done,
            "cells_not_found": request.cells_not_found,
            "cells_failed": request.cells_failed,
            "cells_skipped": request.cells_skipped,
            "cache_hits": request.cache_hits,
            "provider_calls_counted_by_job": request.provider_calls,
            "cost": request.cost,
            "chunks": _chunks(events),
        }
    return out


def _celery_worker_of(event: Any) -> str | None:
    """The Celery worker (node name) an engine event says ran its step: dagster-celery
    reports the hostname of the worker that took the task."""
    metadata = getattr(event.event_specific_data, "metadata", None) or {}
    value = metadata.get("Celery worker")
    return str(value.value) if value is not None else None


def _count_by_worker(ran_on: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for worker in ran_on.values():
        counts[worker] = counts.get(worker, 0) + 1
    return dict(sorted(counts.items()))


def _request_of(events: Any, spec: dict[str, Any], success: bool) -> str | None:
    """The run's request id: its plan output in process, else the table's newest request."""
    if not success:
        return None
    from glaze_pipeline.core import queue

    if events is not None:
        return str(events.output_for_node(queue.ENRICH_OP, "plan").request_id)
    from sqlalchemy import create_engine, text

    from glaze_pipeline.core.store import normalize_url

    engine = create_engine(normalize_url(spec["database_url"]))
    try:
        with engine.connect() as connection:
            found = connection.execute(
                text(
                    "SELECT id FROM enrichment_requests WHERE table_id = :t "
                    "ORDER BY created_at DESC LIMIT 1"
                ),
                {"t": spec["job_config"]["table_id"]},
            ).scalar()
    finally:
        engine.dispose()
    return str(found) if found is not None else None


def _chunks(events: Any) -> int | None:
    if events is None:
        return None
    from glaze_pipeline.core import queue

    return int(events.output_for_node(queue.ENRICH_OP, "plan").chunks)


def _run_elsewhere(
    job_name: str, run_config: dict[str, Any], instance: Any
) -> tuple[str, bool, None]:
    """Run the job with steps in other processes (multiprocess / Celery): a reconstructable
    job from `glaze_pipeline.definitions` (which reads GLAZE_DATABASE_URL and
    GLAZE_PROVIDERS_FILE), on this persistent instance."""
    from dagster import execute_job
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    config = {**run_config, "loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    repository = ReconstructableRepository.for_module(
        "glaze_pipeline.definitions", "defs", working_directory=os.getcwd()
    )
    job = repository.get_reconstructable_job(job_name)
    with execute_job(job, instance, run_config=config, raise_on_error=False) as result:
        return result.run_id, result.success, None


def _phases(steps: dict[str, dict[str, float]]) -> dict[str, float]:
    """Seconds per stage: detect, enrich (first chunk start to last chunk end), apply, close."""
    phases: dict[str, float] = {}
    groups = {
        "detect": [k for k in steps if k == "detect_entities"],
        "enrich": [k for k in steps if k.startswith("enrich_entities")],
        "apply": [k for k in steps if k == "apply_results"],
        "close": [k for k in steps if k == "close_job"],
    }
    for name, keys in groups.items():
        starts = [steps[k]["start"] for k in keys if "start" in steps[k]]
        ends = [steps[k]["end"] for k in keys if "end" in steps[k]]
        if starts and ends:
            phases[name] = round(max(ends) - min(starts), 3)
    return phases


def run_baseline_job(spec: dict[str, Any]) -> dict[str, Any]:
    from glaze_pipeline.bench.baseline import run_baseline

    ready_s = time.perf_counter() - STARTED
    cpu_before = cpu_seconds()
    result = run_baseline(
        spec["database_url"],
        spec["table_id"],
        spec["column_keys"],
        yaml.safe_load(Path(spec["providers_file"]).read_text()),
        concurrency=spec["concurrency"],
        sample_rows=spec.get("sample_rows"),
        pool_size=spec.get("pool_size", 40),
    )
    return {
        "success": True,
        "process_ready_s": round(ready_s, 3),
        **result.as_dict(),
        "cpu_s": round(cpu_seconds() - cpu_before, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def main(argv: list[str]) -> int:
    spec_path, out_path = Path(argv[1]), Path(argv[2])
    spec = json.loads(spec_path.read_text())
    runner = run_entity if spec["mode"] == "entity" else run_baseline_job
    result = runner(spec)
    out_path.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result.get("success") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
