"""One measured pipeline run, in a process of its own (`python -m glaze_pipeline.bench.worker`).

Each scenario's pipeline runs in a fresh process so that its peak RSS (`ru_maxrss`) is its own
and no warm state (imports, pools, the in-memory cache tier) leaks from one run into the next.
The parent passes a JSON spec file and reads back a JSON result file.

- `entity`: the real Dagster job `enrich_table`, executed in process (`runner.run_in_process`,
  as `glaze enrich` runs it) with the bench providers file and `GLAZE_REDIS_URL` set, on a
  SQLite Dagster instance in a temp dir. Statements: `Store.process_statements` before and after.
- `baseline`: the cell-level job of `glaze_pipeline.bench.baseline`.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import yaml

STARTED = time.perf_counter()


def peak_rss_mib() -> float:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU this process has used so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_entity(spec: dict[str, Any]) -> dict[str, Any]:
    from dagster import DagsterEventType, DagsterInstance

    from glaze_pipeline.core import queue
    from glaze_pipeline.core.models import RequestKind
    from glaze_pipeline.core.store import Store
    from glaze_pipeline.definitions import build_definitions
    from glaze_pipeline.runner import run_in_process

    os.environ["GLAZE_REDIS_URL"] = spec["redis_url"]
    home = Path(spec["dagster_home"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    definitions = build_definitions(spec["database_url"], spec["providers_file"])
    job_name, run_config = queue.job_run(RequestKind.ENRICH, spec["job_config"])
    definitions.get_job_def(job_name)  # built before the clock starts
    ready_s = time.perf_counter() - STARTED
    with DagsterInstance.from_config(str(home)) as instance:
        before = Store.process_statements
        cpu_before = cpu_seconds()
        started_at = time.time()
        outcome = run_in_process(
            job_name,
            run_config,
            database_url=spec["database_url"],
            definitions=definitions,
            instance=instance,
            log_level="WARNING",
            one_line_log=False,
        )
        wall = time.time() - started_at
        cpu = cpu_seconds() - cpu_before
        statements = Store.process_statements - before
        rss = peak_rss_mib()
        result = outcome.result
        kinds = {
            DagsterEventType.RUN_START,
            DagsterEventType.STEP_START,
            DagsterEventType.STEP_SUCCESS,
            DagsterEventType.STEP_FAILURE,
        }
        steps: dict[str, dict[str, float]] = {}
        run_started = None
        for entry in instance.all_logs(outcome.run_id):
            event = entry.dagster_event
            if event is None or event.event_type not in kinds:
                continue
            offset = entry.timestamp - started_at
            if event.event_type is DagsterEventType.RUN_START:
                run_started = offset
            elif entry.step_key:
                stage = "start" if event.event_type is DagsterEventType.STEP_START else "end"
                steps.setdefault(entry.step_key, {})[stage] = round(offset, 3)
        failure = None
        if not outcome.success:
            failed = next((e for e in result.all_events if e.is_step_failure), None)
            data = failed.step_failure_data if failed is not None else None
            failure = data.error.message if data is not None and data.error else "run failed"
    out: dict[str, Any] = {
        "success": outcome.success,
        "failure": failure,
        "wall_s": round(wall, 3),
        "process_ready_s": round(ready_s, 3),
        "run_started_s": round(run_started, 3) if run_started is not None else None,
        "first_step_s": min((s.get("start", wall) for s in steps.values()), default=None),
        "phases": _phases(steps),
        "statements": statements,
        "cpu_s": round(cpu, 2),
        "peak_rss_mib": round(rss, 1),
    }
    if outcome.success and outcome.request_id is not None:
        plan = result.output_for_node(queue.ENRICH_OP, "plan")
        store = Store(spec["database_url"])
        request = store.get_request(outcome.request_id)
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
            "chunks": plan.chunks,
        }
    return out


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
