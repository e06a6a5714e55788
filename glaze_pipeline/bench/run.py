"""`glaze bench run`: the entity-first pipeline against the cell-level baseline, scenario by
scenario, with the figures the issue asks for and the targets beside them.

For every scenario: a fresh Postgres database (S4 reuses S3's, warm), the generated table
seeded, the Redis database emptied (not for S4), a fresh mock provider process per measured
run, and the pipeline in a fresh worker process (`bench.worker`). Provider calls come from the
mock's `/_stats`; statements from the worker's statement counter; peak RSS from each process.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from glaze_pipeline.bench import expected as goals
from glaze_pipeline.bench.baseline import create_cell_tables
from glaze_pipeline.bench.expected import (
    Needs,
    selection_needs,
    statement_limit,
    waterfall_calls,
)
from glaze_pipeline.bench.services import (
    MockProcess,
    bench_mock_config,
    bench_providers,
    flush_redis,
    mock_process,
    mock_vendor_of,
    provider_configs,
    redis_peak_mib,
)
from glaze_pipeline.bench.stack import celery_workers, dagster_postgres_yaml, fresh_postgres
from glaze_pipeline.core.engine import JobSettings
from glaze_pipeline.core.seed import (
    GENERATED_COMPANY_KEYS,
    GENERATED_PERSON_KEYS,
    LEADS_ENRICH_KEYS,
    leads_column_id,
    seed_generated,
    seed_leads,
)
from glaze_pipeline.core.store import Store

ALL_SCENARIOS = ("S1", "S2", "S3", "S4", "S5", "S6", "L")
EXECUTORS = ("in_process", "multiprocess", "celery")
RSS_LIMIT_MIB = goals.RSS_LIMIT_MIB
LAUNCH_TARGET_S = 3.0

STEPS_AT_ONCE = 2  # S3 on another executor: 2 processes, or a pool of 2 Celery workers

Echo = Callable[[str], None]


@dataclass(frozen=True)
class CeleryPool:
    """What a Celery run needs around it: `workers` `glaze worker` processes on `queue` of
    `broker`, and the Dagster instance they share (`dagster_yaml`, Postgres storage)."""

    broker: str
    queue: str
    dagster_yaml: str
    workers: int = STEPS_AT_ONCE


@dataclass(frozen=True)
class Scenario:
    """One row of the issue's table."""

    name: str
    title: str
    rows: int = 0
    unique_companies: int = 1
    target_keys: tuple[str, ...] = GENERATED_COMPANY_KEYS
    warm_of: str | None = None  # run again on this scenario's database and cache
    baseline: str = "full"  # full | sample | reuse | skip
    launch: bool = False
    leads: bool = False  # L: seed 001's 10-row Leads table, several runs, the median


def scenarios(scale: float = 1.0) -> dict[str, Scenario]:
    """The issue's scenarios; `scale` shrinks S3/S4/S5 (rows and unique companies)."""

    def scaled(n: int) -> int:
        return max(1, round(n * scale))

    both = GENERATED_COMPANY_KEYS + GENERATED_PERSON_KEYS
    s3 = Scenario(
        "S3",
        f"{scaled(100_000):,} rows, {scaled(10_000):,} unique companies, 3 company + 2 person "
        "columns",
        rows=scaled(100_000),
        unique_companies=scaled(10_000),
        target_keys=both,
        baseline="sample",
    )
    return {
        "S1": Scenario(
            "S1", "100 rows x 3 company columns, 100 unique companies", 100, 100, baseline="full"
        ),
        "S2": Scenario(
            "S2", "100 rows x 3 company columns, 10 unique companies", 100, 10, baseline="full"
        ),
        "S3": s3,
        "S4": replace(
            s3,
            name="S4",
            title=f"S3 again, warm cache ({s3.title})",
            warm_of="S3",
            baseline="reuse",
        ),
        "S5": Scenario(
            "S5",
            f"{scaled(1_000_000):,} rows, {scaled(100_000):,} unique companies, 3 company columns",
            rows=scaled(1_000_000),
            unique_companies=scaled(100_000),
            baseline="skip",
        ),
        "S6": Scenario(
            "S6",
            "enqueue -> STARTED -> first row written -> finished, 10-row requests",
            launch=True,
            baseline="skip",
        ),
        "L": Scenario(
            "L",
            "the 10-row Leads table (glaze demo's) through enrich_table, in process",
            rows=10,
            target_keys=LEADS_ENRICH_KEYS,
            baseline="skip",
            leads=True,
        ),
    }


@dataclass(frozen=True)
class BenchSettings:
    postgres_url: str = "postgresql://postgres@127.0.0.1:5432/test"
    redis_url: str = "redis://127.0.0.1:6379/13"
    latency_ms: float = 100.0
    concurrency: int = 200  # the benchmark's own, above the job's JobSettings.concurrency
    scale: float = 1.0
    baseline_sample: float = 0.02  # S3: the share of rows the baseline really runs
    baseline_pool: int = 40
    chunk_size: int = JobSettings.chunk_size
    max_chunks: int | None = JobSettings.max_chunks  # None: the job's default by executor
    page_size: int = JobSettings.page_size
    launch_requests: int = 10
    profile: bool = False  # py-spy flame graphs of the entity-first workers
    output_dir: str = "bench_results"
    batched: bool = True  # S3 again with the vendors' batch endpoints (a second row)
    executors: tuple[str, ...] = ("in_process",)  # S3 again on each other executor listed
    leads_runs: int = 3  # L: runs, the median reported

    def job_config(self, table_id: str, column_ids: list[str]) -> dict[str, Any]:
        return {
            "table_id": table_id,
            "column_ids": column_ids,
            "concurrency": self.concurrency,
            "chunk_size": self.chunk_size,
            "page_size": self.page_size,
            **({"max_chunks": self.max_chunks} if self.max_chunks is not None else {}),
        }


@dataclass
class Workspace:
    """Temp files of one benchmark run, and the databases S4 inherits."""

    root: Path
    settings: BenchSettings
    echo: Echo
    warm: dict[str, Any] = field(default_factory=dict)  # scenario -> (db, table, columns)
    runs: int = 0

    def path(self, name: str) -> Path:
        return self.root / name


def run_benchmark(
    settings: BenchSettings, selected: list[str], *, echo: Echo = print
) -> dict[str, Any]:
    """Run the selected scenarios; write results.json, results.md and chart.png."""
    from glaze_pipeline.bench.report import write_reports

    unknown = sorted(set(selected) - set(ALL_SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; choose from {', '.join(ALL_SCENARIOS)}")
    plan = scenarios(settings.scale)
    chosen = [plan[name] for name in ALL_SCENARIOS if name in selected]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": " ".join(["glaze", *sys.argv[1:]]) if sys.argv else "",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": asdict(settings),
        "scenarios": {},
    }
    root = Path(tempfile.mkdtemp(prefix="glaze-bench-run-"))
    workspace = Workspace(root, settings, echo)
    try:
        with contextlib.ExitStack() as keep:
            for scenario in chosen:
                echo(f"== {scenario.name}: {scenario.title}")
                t0 = time.perf_counter()
                if scenario.launch:
                    outcome = run_launch(scenario, workspace)
                elif scenario.leads:
                    outcome = run_leads(scenario, workspace)
                else:
                    outcome = run_scenario(scenario, workspace, keep, selected)
                outcome["scenario_seconds"] = round(time.perf_counter() - t0, 1)
                results["scenarios"][scenario.name] = outcome
                echo(f"   done in {outcome['scenario_seconds']} s")
            if "S3" in results["scenarios"]:
                # After S4 (which runs warm on S3's database and cache): each variant on a
                # fresh database and an emptied Redis, as S3 ran.
                s3 = results["scenarios"]["S3"]
                s3["variants"] = run_s3_variants(plan["S3"], workspace, s3)
                s3["targets"] += variant_targets(s3)
            if "S5" in results["scenarios"] and "multiprocess" in settings.executors:
                # The path a request this large takes from the queue (queue.executor_for).
                s5 = results["scenarios"]["S5"]
                s5["variants"] = run_s5_variants(plan["S5"], workspace, s5)
                s5["targets"] += s5_variant_targets(s5)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["orchestrator_peak_rss_mib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    write_reports(results, Path(settings.output_dir))
    return results


# --- one scenario ---------------------------------------------------------------------------


def run_scenario(
    scenario: Scenario, workspace: Workspace, keep: contextlib.ExitStack, selected: list[str]
) -> dict[str, Any]:
    settings = workspace.settings
    needs = selection_needs(
        scenario.rows, scenario.unique_companies, None, list(scenario.target_keys)
    )
    out: dict[str, Any] = {
        "title": scenario.title,
        "rows": scenario.rows,
        "columns": list(scenario.target_keys),
        "cells": scenario.rows * len(scenario.target_keys),
        "unique_entities": {"company": len(needs.companies), "person": len(needs.people)},
    }
    cold = scenario.warm_of is None
    with contextlib.ExitStack() as local:
        if not cold:
            database_url, table_id, column_ids = _warm_database(scenario, workspace, keep)
        else:
            # A later scenario re-runs on this database (S4 on S3's): keep it until the end.
            owner = keep if _inherited(scenario, selected) else local
            database_url = owner.enter_context(fresh_postgres(settings.postgres_url))
            flush_redis(settings.redis_url)
            table_id, column_ids, out["seed_s"] = _seed(database_url, scenario)
            workspace.warm[scenario.name] = (database_url, table_id, column_ids)
        out["uncached_entities"] = needs.entities if cold else 0
        out["entity_first"] = _entity_run(
            scenario, workspace, database_url, table_id, column_ids, needs, cold=cold
        )
        if not cold:
            # The same rows again as a new table (a list uploaded twice): the S3 run wrote
            # linkedin values into the first table, which then identify its people by LinkedIn
            # slug instead of email; this copy isolates the cache from that.
            copy_id, copy_columns, _ = _seed(database_url, scenario)
            out["entity_first_copy"] = _entity_run(
                scenario,
                workspace,
                database_url,
                copy_id,
                copy_columns,
                needs,
                cold=False,
                label="copy",
            )
    out.update(_bounds(out, needs, settings, cold=cold))
    out["baseline"] = _baseline(scenario, workspace, out)
    out["targets"] = targets(scenario, out)
    return out


def _inherited(scenario: Scenario, selected: list[str]) -> bool:
    """Whether a later selected scenario re-runs on this one's database (keep it open)."""
    return any(s.warm_of == scenario.name and s.name in selected for s in scenarios().values())


def _warm_database(
    scenario: Scenario, workspace: Workspace, keep: contextlib.ExitStack
) -> tuple[str, str, list[str]]:
    assert scenario.warm_of is not None
    if scenario.warm_of in workspace.warm:
        return workspace.warm[scenario.warm_of]
    # S4 alone: warm the cache with an unreported run of its cold scenario first.
    workspace.echo(f"   warming the cache: {scenario.warm_of} once, not reported")
    cold = replace(scenario, name=scenario.warm_of, warm_of=None)
    database_url = keep.enter_context(fresh_postgres(workspace.settings.postgres_url))
    flush_redis(workspace.settings.redis_url)
    table_id, column_ids, _ = _seed(database_url, cold)
    needs = selection_needs(cold.rows, cold.unique_companies, None, list(cold.target_keys))
    _entity_run(cold, workspace, database_url, table_id, column_ids, needs, cold=True)
    workspace.warm[cold.name] = (database_url, table_id, column_ids)
    return workspace.warm[cold.name]


def _seed(database_url: str, scenario: Scenario) -> tuple[str, list[str], float]:
    started = time.perf_counter()
    store = Store(database_url)
    try:
        table = seed_generated(
            store,
            rows=scenario.rows,
            unique_companies=scenario.unique_companies,
            name=f"bench {scenario.name}",
        )
    finally:
        store.dispose()
    columns = [table.column_by_key(key).id for key in scenario.target_keys]
    return table.id, columns, round(time.perf_counter() - started, 2)


def _entity_run(
    scenario: Scenario,
    workspace: Workspace,
    database_url: str,
    table_id: str,
    column_ids: list[str],
    needs: Needs | None,
    *,
    cold: bool,
    label: str = "entity",
    job_overrides: dict[str, Any] | None = None,
    execution: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    celery: CeleryPool | None = None,
) -> dict[str, Any]:
    """One enrich_table run in a worker process against its own mock; `job_overrides` adds op
    config (e.g. batch_endpoints), `execution` the run's executor config, `resources` the run's
    resource config; `celery`: its workers run around the run, their CPU added to the row's."""
    settings = workspace.settings
    label = f"{scenario.name}-{label}"
    with mock_process(workspace.root, settings.latency_ms, name=f"{label}-mock") as mock:
        providers_file, document = _providers_file(workspace, mock, label)
        expected = _expected_calls(needs, document) if cold and needs is not None else {}
        spec = {
            "mode": "entity",
            "database_url": database_url,
            "redis_url": settings.redis_url,
            "providers_file": str(providers_file),
            "dagster_home": str(workspace.path(f"{label}-dagster")),
            "job_config": {**settings.job_config(table_id, column_ids), **(job_overrides or {})},
            "mock_url": mock.url,
            "execution": execution,
            "resources": resources,
        }
        workspace.echo(f"   {label}: enrich_table over {scenario.rows:,} rows ...")
        if celery is None:
            result = _run_worker(workspace, label, spec)
        else:
            result = _run_on_celery(workspace, label, spec, celery)
        if result.get("config_rejected"):
            return result  # the caller labels it "not available"
        calls = _calls_by_provider(mock, document)
        result["http_requests"] = _calls_by_provider(mock, document, requests=True)
        result["mock_peak_rss_mib"] = _round(mock.peak_rss_mib())
        result["mock_cpu_s"] = _round(mock.cpu_seconds())
    result["redis_peak_rss_mib"] = _round(redis_peak_mib(settings.redis_url))
    result["provider_calls"] = calls
    result["expected_calls"] = {name: expected.get(name, 0) for name in calls}
    result.update(derived_figures(result))
    stream = result.get("stream", {})
    workspace.echo(
        f"   {label}: {result['wall_s']} s, calls {calls}, "
        f"{result['statements']} statements, RSS {result['peak_rss_mib']} MiB, "
        f"CPU {result['cpu_s']} s (mock {result['mock_cpu_s']} s, "
        f"{_text(result.get('cpu_ms_per_call'), '{:.2f}')} ms/call), first row "
        f"{_text(stream.get('first_row_s'), '{:.2f}')} s, progress gap "
        f"{_text(stream.get('progress_gap_max_s'), '{:.2f}')} s"
        + (
            f", {result['celery_workers']} Celery workers (their CPU "
            f"{result['cpu_s_celery_workers']} s included), steps per worker "
            f"{result.get('steps_by_celery_worker')}"
            if "celery_workers" in result
            else ""
        )
    )
    if not result.get("success"):
        raise RuntimeError(f"{scenario.name}: the enrich_table run failed: {result['failure']}")
    return result


def _run_on_celery(
    workspace: Workspace, label: str, spec: dict[str, Any], pool: CeleryPool
) -> dict[str, Any]:
    """The run with its Celery workers started before it and stopped after it: the instance's
    dagster.yaml (Postgres) in the run's DAGSTER_HOME, which the workers share; the workers'
    CPU over the run (their process trees, read from /proc before they stop) added to the
    row's `cpu_s`, so that CPU per call counts every process that did the job's work."""
    spec["dagster_yaml"] = pool.dagster_yaml
    home = Path(spec["dagster_home"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(pool.dagster_yaml)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLAZE_", "DAGSTER_"))}
    env.update(
        DAGSTER_HOME=str(home),
        GLAZE_DATABASE_URL=spec["database_url"],
        GLAZE_PROVIDERS_FILE=spec["providers_file"],
        GLAZE_REDIS_URL=spec["redis_url"],
        GLAZE_HOME=str(workspace.path(f"{label}-glaze-home")),
    )
    workspace.echo(f"   {label}: starting {pool.workers} Celery workers on queue {pool.queue}")
    with celery_workers(
        broker=pool.broker,
        queue=pool.queue,
        env=env,
        workdir=workspace.path(f"{label}-workers"),
        count=pool.workers,
    ) as workers:
        before = workers.cpu_seconds()
        result = _run_worker(workspace, label, spec)
        workers_cpu = workers.cpu_seconds() - before
        result["celery_workers_peak_rss_mib"] = workers.peak_rss_mib()
    result["celery_workers"] = pool.workers
    result["cpu_s_celery_workers"] = round(workers_cpu, 2)
    if "cpu_s" in result:  # not when the job rejected its config
        result["cpu_s_run_process"] = result["cpu_s"]
        result["cpu_s"] = round(result["cpu_s"] + workers_cpu, 2)
    result["celery_queue"] = pool.queue
    return result


def derived_figures(result: dict[str, Any]) -> dict[str, Any]:
    """Per-call CPU and rows per second, from a worker's result and the mock's counts.

    * `cpu_ms_per_call`: the worker's CPU over the run (the watcher runs apart) / the
      provider calls the mock served.
    * `detect_rows_per_s`: rows read / the detect_entities step's seconds.
    * `write_rows_per_s`: rows written / `write_seconds` (the time Postgres spent in the
      row-merge statements, summed by the worker; a worker whose steps ran elsewhere reports
      `write_seconds` only if the executor path fills it in).
    """
    calls = sum(result.get("provider_calls", {}).values())
    request = result.get("request", {})
    rows, written = request.get("rows") or 0, request.get("rows_written") or 0
    detect = result.get("phases", {}).get("detect")
    write = result.get("write_seconds")
    return {
        "cpu_ms_per_call": round(1000 * result["cpu_s"] / calls, 3) if calls else None,
        "detect_rows_per_s": round(rows / detect) if rows and detect else None,
        "write_rows_per_s": round(written / write) if written and write else None,
    }


def _text(value: float | None, shape: str) -> str:
    return "n/a" if value is None else shape.format(value)


def _baseline(scenario: Scenario, workspace: Workspace, out: dict[str, Any]) -> dict[str, Any]:
    settings = workspace.settings
    if scenario.baseline == "skip":
        return {"skipped": "not run (memory scenario; the cell-level path would take hours)"}
    if scenario.baseline == "reuse":
        source = workspace.warm.get(f"{scenario.warm_of}:baseline")
        note = (
            "seed 001's cell-level design has no cache: a second run costs what the first did; "
            f"figures of {scenario.warm_of}'s baseline, not re-run"
        )
        return {**source, "note": note} if source else {"skipped": note}
    sample_rows = None
    if scenario.baseline == "sample":
        sample_rows = max(1, round(scenario.rows * settings.baseline_sample))
    label = f"{scenario.name}-baseline"
    with fresh_postgres(settings.postgres_url) as database_url:
        table_id, _, _ = _seed(database_url, scenario)
        create_cell_tables(database_url)
        with mock_process(workspace.root, settings.latency_ms, name=f"{label}-mock") as mock:
            providers_file, document = _providers_file(workspace, mock, label)
            spec = {
                "mode": "baseline",
                "database_url": database_url,
                "table_id": table_id,
                "column_keys": list(scenario.target_keys),
                "providers_file": str(providers_file),
                "concurrency": settings.concurrency,
                "sample_rows": sample_rows,
                "pool_size": settings.baseline_pool,
            }
            workspace.echo(
                f"   baseline: cell-level over {sample_rows or scenario.rows:,} rows"
                + (" (sample)" if sample_rows else "")
                + " ..."
            )
            result = _run_worker(workspace, label, spec)
            result["provider_calls"] = _calls_by_provider(mock, document)
            result["mock_peak_rss_mib"] = _round(mock.peak_rss_mib())
            result["mock_cpu_s"] = _round(mock.cpu_seconds())
    result["bound_s"] = round(
        result["cells"] * settings.latency_ms / 1000 / settings.concurrency, 3
    )
    if sample_rows is not None:
        factor = out["cells"] / result["cells"]
        result["measured"] = {
            k: result[k] for k in ("rows", "cells", "wall_s", "statements", "provider_calls")
        }
        result["extrapolated"] = True
        result["sample"] = (
            f"measured on the first {result['rows']:,} rows ({result['cells']:,} cells, "
            f"{settings.baseline_sample:.0%}), extrapolated linearly x{factor:.1f}"
        )
        result["wall_s"] = round(result["wall_s"] * factor, 1)
        result["statements"] = round(result["statements"] * factor)
        result["provider_calls"] = {
            k: round(v * factor) for k, v in result["provider_calls"].items()
        }
        result["cells"], result["rows"] = out["cells"], scenario.rows
        result["bound_s"] = round(
            out["cells"] * settings.latency_ms / 1000 / settings.concurrency, 3
        )
    workspace.echo(
        f"   baseline: {result['wall_s']} s{' (extrapolated)' if sample_rows else ''}, "
        f"calls {result['provider_calls']}, {result['statements']} statements"
    )
    workspace.warm[f"{scenario.name}:baseline"] = result
    return result


def _bounds(
    out: dict[str, Any], needs: Needs, settings: BenchSettings, *, cold: bool
) -> dict[str, Any]:
    """The lower bounds of the wall time, from the latency and the concurrency.

    `bound_entities_s` is the issue's formula (unique uncached entities x latency /
    concurrency); `bound_s` counts provider calls instead, the tighter bound when an entity
    needs more than one provider in sequence (a company asked for revenue needs the cheap
    vendor, then premium: two latencies in one concurrency slot).
    """
    latency = settings.latency_ms / 1000
    calls = sum(out["entity_first"]["expected_calls"].values()) if cold else 0
    entities = needs.entities if cold else 0
    return {
        "needed_calls": calls,
        "bound_entities_s": round(entities * latency / settings.concurrency, 3),
        "bound_s": round(calls * latency / settings.concurrency, 3),
    }


def _expected_calls(needs: Needs, document: dict[str, Any]) -> dict[str, int]:
    mock = bench_mock_config(0)
    return dict(waterfall_calls(needs, provider_configs(document), mock))


def _calls_by_provider(
    mock: MockProcess, document: dict[str, Any], *, requests: bool = False
) -> dict[str, int]:
    """The mock's per-entity call counts (`requests`: its HTTP requests), named by the
    provider entries that call each vendor."""
    served = mock.requests_by_vendor() if requests else mock.calls_by_vendor()
    names = {mock_vendor_of(config): config.name for config in provider_configs(document)}
    calls = {name: served.get(vendor, 0) for vendor, name in names.items()}
    for vendor, count in served.items():
        if vendor not in names:
            calls[vendor] = count
    return calls


def _providers_file(
    workspace: Workspace, mock: MockProcess, label: str
) -> tuple[Path, dict[str, Any]]:
    document = bench_providers(mock.url, workspace.settings.concurrency)
    path = workspace.path(f"{label}-providers.yaml")
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path, document


def _run_worker(workspace: Workspace, label: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run `bench.worker` in a fresh process; its result, with the process's wall time."""
    spec_path = workspace.path(f"{label}-spec.json")
    out_path = workspace.path(f"{label}-result.json")
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "glaze_pipeline.bench.worker", str(spec_path), str(out_path)]
    profile_path = None
    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if workspace.settings.profile and spec["mode"] == "entity" and py_spy:
        out_dir = Path(workspace.settings.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        profile_path = out_dir / f"profile-{label}.svg"
        command = [py_spy, "record", "-r", "50", "-o", str(profile_path), "--", *command]
    started = time.perf_counter()
    log = workspace.path(f"{label}.log")
    with open(log, "wb") as handle:
        completed = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if not out_path.exists():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{label}: the worker exited {completed.returncode}:\n{tail}")
    result: dict[str, Any] = json.loads(out_path.read_text())
    result["process_wall_s"] = round(time.perf_counter() - started, 3)
    if profile_path is not None:
        result["profile"] = str(profile_path)
    return result


def _round(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


# --- S6 ------------------------------------------------------------------------------------


def run_launch(scenario: Scenario, workspace: Workspace) -> dict[str, Any]:
    """S6: bench/launch.py's measurement (sensor path and push-launcher path)."""
    from glaze_pipeline.bench.launch import run as launch_run

    settings = workspace.settings
    workspace.echo(f"   {settings.launch_requests} requests via the sensor, then via the launcher")
    figures = launch_run(settings.postgres_url, settings.launch_requests)
    out: dict[str, Any] = {"title": scenario.title, "launch": figures}
    out["targets"] = targets(scenario, out)
    return out


# --- targets -------------------------------------------------------------------------------


def targets(scenario: Scenario, out: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target the issue sets for this scenario, with the measured value and met/missed."""
    found: list[dict[str, Any]] = []

    def add(name: str, target: str, value: str, met: bool | None, why: str = "") -> None:
        found.append({"target": name, "want": target, "got": value, "met": met, "note": why})

    if scenario.launch:
        for path, figures in out["launch"]["paths"].items():
            median = figures["summary"]["started_s"]["median"]
            add(
                f"enqueue -> STARTED median ({path})",
                f"<= {LAUNCH_TARGET_S:g} s",
                f"{median:.2f} s",
                median <= LAUNCH_TARGET_S,
            )
        return found
    if scenario.leads:
        leads = out["leads"]
        add(
            "10-row Leads job wall (median) not slower than the in-process path before issue 12",
            f"<= {goals.LEADS_REFERENCE_WALL_S:.2f} s",
            f"{leads['wall_s_median']:.2f} s (of {len(leads['runs'])})",
            leads["wall_s_median"] <= goals.LEADS_REFERENCE_WALL_S,
            "reference: bench/expected.py LEADS_REFERENCE_WALL_S",
        )
        add(
            "10-row Leads job worker CPU (median) not above the path before issue 12",
            f"<= {goals.LEADS_REFERENCE_CPU_S:.2f} s",
            f"{leads['cpu_s_median']:.2f} s",
            leads["cpu_s_median"] <= goals.LEADS_REFERENCE_CPU_S,
            "steadier than wall on a shared machine",
        )
        return found
    entity = out["entity_first"]
    calls, expected = entity["provider_calls"], entity["expected_calls"]
    want = "0 (warm cache)" if scenario.warm_of else _calls_text(expected)
    add(
        "provider calls = unique uncached entities needed, per provider",
        want,
        _calls_text(calls),
        all(calls.get(k, 0) == expected.get(k, 0) for k in set(calls) | set(expected)),
    )
    copy = out.get("entity_first_copy")
    if copy is not None:
        add(
            "provider calls on a fresh copy of the table (same rows), warm cache",
            "0",
            _calls_text(copy["provider_calls"]),
            not any(copy["provider_calls"].values()),
        )
    limit = statement_limit(scenario.rows)
    add(
        "DB statements per job (20 + 3 per 1,000 rows)",
        f"<= {limit:g}",
        str(entity["statements"]),
        entity["statements"] <= limit,
    )
    per_call = entity.get("cpu_ms_per_call")
    if per_call is not None:
        add(
            "worker CPU per provider call",
            f"<= {goals.CPU_MS_PER_CALL:g} ms",
            f"{per_call:.2f} ms ({entity['cpu_s']} s / {sum(calls.values()):,} calls)",
            per_call <= goals.CPU_MS_PER_CALL,
        )
    if scenario.name == "S3":
        add_wall_target(add, out, entity)
        add_stream_targets(add, entity)
        baseline = out.get("baseline", {})
        if "wall_s" in baseline:
            speedup = baseline["wall_s"] / entity["wall_s"]
            add(
                ">= 20x faster than the baseline",
                ">= 20x",
                f"{speedup:.1f}x"
                + (" (baseline extrapolated)" if baseline.get("extrapolated") else ""),
                speedup >= 20,
            )
    if scenario.name in ("S3", "S5"):
        add_rows_targets(add, entity)
    if scenario.name == "S5":
        for label, value in (
            ("pipeline worker", entity["peak_rss_mib"]),
            ("mock server", entity.get("mock_peak_rss_mib")),
        ):
            add(
                f"peak RSS per process ({label})",
                f"<= {RSS_LIMIT_MIB} MiB",
                f"{value} MiB",
                value is not None and value <= RSS_LIMIT_MIB,
            )
    return found


Add = Callable[..., None]


def add_wall_target(add: Add, out: dict[str, Any], entity: dict[str, Any], label: str = "") -> None:
    bound, start = out["bound_s"], entity.get("first_step_s") or 0.0
    factor = goals.WALL_BOUND_FACTOR
    ceiling = factor * bound + start
    add(
        f"wall <= {factor:g} x lower bound + run start{label}",
        f"<= {ceiling:.1f} s ({factor:g} x {bound:.1f} + {start:.1f})",
        f"{entity['wall_s']:.1f} s",
        entity["wall_s"] <= ceiling,
    )


def add_stream_targets(add: Add, entity: dict[str, Any]) -> None:
    """Rows stream: the first page before 20 % of the lookups; progress at least every 2 s."""
    stream = entity.get("stream", {})
    share = stream.get("lookups_done_at_first_row")
    if share is None:
        share = stream.get("lookups_done_at_first_row_events")
    first = stream.get("first_row_s")
    limit = goals.FIRST_ROW_LOOKUP_SHARE
    add(
        "first row written before 20 % of the lookups are done",
        f"< {limit:.0%} of lookups",
        "no row event heard"
        if first is None
        else f"{share:.0%} done at {first:.2f} s"
        if share is not None
        else f"at {first:.2f} s (share unknown)",
        None if first is None or share is None else share < limit,
        "lookups = provider calls the mock had served (polled every 0.1 s) / all it served",
    )
    gap = stream.get("progress_gap_max_s")
    beat = stream.get("heartbeat_gap_max_s")
    worst = max((g for g in (gap, beat) if g is not None), default=None)
    add(
        "progress on Redis and the request row at least every 2 s during enrichment",
        f"<= {goals.PROGRESS_GAP_S:g} s between updates",
        "no progress event heard"
        if gap is None
        else f"Redis {gap:.2f} s, request row {_text(beat, '{:.2f}')} s",
        None if worst is None else worst <= goals.PROGRESS_GAP_S,
        "longest gap from the first `started` to the last `progress` event",
    )


def add_rows_targets(add: Add, entity: dict[str, Any]) -> None:
    """Detection and writing, in rows per second, on Postgres."""
    for name, key, goal, how in (
        ("detection", "detect_rows_per_s", goals.DETECT_ROWS_PER_S, "rows / detect step s"),
        (
            "writing",
            "write_rows_per_s",
            goals.WRITE_ROWS_PER_S,
            "rows written / s in the row-merge statements",
        ),
    ):
        value = entity.get(key)
        add(
            f"{name} rows/s on Postgres",
            f">= {goal:,}",
            "not measured" if value is None else f"{value:,}",
            None if value is None else value >= goal,
            how,
        )


def variant_targets(s3: dict[str, Any]) -> list[dict[str, Any]]:
    """Informative targets for S3's second rows (the per-call row holds the issue's)."""
    found: list[dict[str, Any]] = []

    def add(name: str, target: str, value: str, met: bool | None, why: str = "") -> None:
        found.append({"target": name, "want": target, "got": value, "met": met, "note": why})

    for name, variant in s3.get("variants", {}).items():
        if "wall_s" not in variant:
            continue
        calls, expected = variant["provider_calls"], s3["entity_first"]["expected_calls"]
        add(
            f"provider calls = the needed ones ({name})",
            _calls_text(expected),
            _calls_text(calls),
            all(calls.get(k, 0) == expected.get(k, 0) for k in set(calls) | set(expected)),
        )
        add_wall_target(add, s3, variant, f" ({name})")
    launched = queued_launch_executor(s3.get("rows") or 0)
    chosen = s3["entity_first"] if launched == "in_process" else s3["variants"].get(launched)
    if chosen is not None and "wall_s" in chosen:
        add_wall_target(add, s3, chosen, f" (as launched from the queue: {launched})")
    return found


def queued_launch_executor(rows: int) -> str:
    """The executor the queue sensor and the GraphQL launcher give an enrich request that holds
    `rows` rows (`queue.executor_for`); in process on an engine older than that choice."""
    try:
        from glaze_pipeline.core.settings import multiprocess_rows
    except ImportError:
        return "in_process"
    threshold = multiprocess_rows()
    return "in_process" if threshold is None or rows < threshold else "multiprocess"


# --- S3's second rows: batch endpoints, other executors ---------------------------------------


def execution_for(name: str, **options: Any) -> dict[str, Any]:
    """The run config's `execution` for executor `name`, from the engine's
    `glaze_pipeline.defs.executors.execution_config(name, **options)` (`processes`, `queue`);
    LookupError when not available."""
    try:
        from glaze_pipeline.defs import executors
    except ImportError as error:
        raise LookupError(f"glaze_pipeline.defs.executors does not import: {error}") from None
    maker = getattr(executors, "execution_config", None)
    if maker is None:
        raise LookupError("glaze_pipeline.defs.executors.execution_config is not there yet")
    config = dict(maker(name, **options))
    return dict(config["execution"]) if "execution" in config else config


def run_s3_variants(
    scenario: Scenario, workspace: Workspace, s3: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """S3 again, cold, as second rows: batch endpoints on; each other executor chosen."""
    settings = workspace.settings
    wanted: list[tuple[str, dict[str, Any], str | None]] = []
    if settings.batched:
        wanted.append(("batched", {"batch_endpoints": True}, None))
    for choice in settings.executors:
        if choice != "in_process":
            wanted.append((choice, {}, choice))
    variants: dict[str, dict[str, Any]] = {}
    for name, overrides, executor in wanted:
        if executor is None:
            variants[name] = _variant_run(scenario, workspace, name, overrides, None, s3)
            continue
        try:
            variants[name] = _executor_run(scenario, workspace, executor, s3)
        except LookupError as error:
            variants[name] = {"skipped": f"not available: {error}"}
            workspace.echo(f"   S3-{name}: skipped, {error}")
    return variants


def run_s5_variants(
    scenario: Scenario, workspace: Workspace, s5: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """S5 again, cold, on the multiprocess executor: its calls and each process's peak RSS."""
    try:
        return {"multiprocess": _executor_run(scenario, workspace, "multiprocess", s5)}
    except LookupError as error:
        workspace.echo(f"   S5-multiprocess: skipped, {error}")
        return {"multiprocess": {"skipped": f"not available: {error}"}}


def s5_variant_targets(s5: dict[str, Any]) -> list[dict[str, Any]]:
    """S5 on other executors: the needed calls, and every process within the RSS limit."""
    found: list[dict[str, Any]] = []
    for name, variant in s5.get("variants", {}).items():
        if "wall_s" not in variant:
            continue
        calls, expected = variant["provider_calls"], s5["entity_first"]["expected_calls"]
        found.append(
            {
                "target": f"provider calls = the needed ones ({name})",
                "want": _calls_text(expected),
                "got": _calls_text(calls),
                "met": all(
                    calls.get(k, 0) == expected.get(k, 0) for k in set(calls) | set(expected)
                ),
                "note": "",
            }
        )
        for label, value in (
            ("run process", variant.get("peak_rss_mib")),
            ("largest step process", variant.get("step_processes_peak_rss_mib")),
        ):
            found.append(
                {
                    "target": f"peak RSS per process ({name}: {label})",
                    "want": f"<= {RSS_LIMIT_MIB} MiB",
                    "got": "not measured" if value is None else f"{value} MiB",
                    "met": None if value is None else value <= RSS_LIMIT_MIB,
                    "note": "VmHWM of each step process, last polled (every 0.1 s)",
                }
            )
    return found


def steps_at_once_resources() -> dict[str, Any] | None:
    """Run config telling the providers resource that `STEPS_AT_ONCE` steps run at once (so
    each takes its share of a vendor's concurrency), where the resource has that field."""
    from glaze_pipeline.defs.resources import EnrichmentProviders

    if "concurrent_steps" not in EnrichmentProviders.model_fields:
        return None
    return {"providers": {"config": {"concurrent_steps": STEPS_AT_ONCE}}}


def _executor_run(
    scenario: Scenario, workspace: Workspace, executor: str, s3: dict[str, Any]
) -> dict[str, Any]:
    """S3 (or S5) with its steps elsewhere: `multiprocess` (2 processes at once) or `celery`
    (a pool of 2 workers, concurrency 1 each, on a queue of this run's own, sharing a throwaway
    Postgres Dagster instance). LookupError when the engine does not offer the executor."""
    resources = steps_at_once_resources()
    if executor == "multiprocess":
        execution = execution_for(executor, processes=STEPS_AT_ONCE)
        result = _variant_run(scenario, workspace, executor, {}, execution, s3, resources=resources)
        label = f"entity-first, multiprocess, {STEPS_AT_ONCE} processes"
    elif executor == "celery":
        queue = f"glaze-bench-{secrets.token_hex(4)}"
        execution = execution_for(executor, queue=queue)
        broker = str(execution["config"]["celery"]["broker"])
        with fresh_postgres(workspace.settings.postgres_url, migrate=False) as storage_url:
            pool = CeleryPool(broker, queue, dagster_postgres_yaml(storage_url))
            result = _variant_run(
                scenario, workspace, executor, {}, execution, s3, resources=resources, celery=pool
            )
        label = f"entity-first, celery, {pool.workers} workers"
    else:
        raise LookupError(f"no S3 row for executor {executor!r}")
    if "wall_s" in result:
        result["label"] = label
        result["steps_at_once_split"] = resources is not None
    return result


def _variant_run(
    scenario: Scenario,
    workspace: Workspace,
    name: str,
    overrides: dict[str, Any],
    execution: dict[str, Any] | None,
    s3: dict[str, Any],
    *,
    resources: dict[str, Any] | None = None,
    celery: CeleryPool | None = None,
) -> dict[str, Any]:
    settings = workspace.settings
    needs = selection_needs(
        scenario.rows, scenario.unique_companies, None, list(scenario.target_keys)
    )
    with fresh_postgres(settings.postgres_url) as database_url:
        flush_redis(settings.redis_url)
        table_id, column_ids, _ = _seed(database_url, scenario)
        try:
            result = _entity_run(
                scenario,
                workspace,
                database_url,
                table_id,
                column_ids,
                needs,
                cold=True,
                label=name,
                job_overrides=overrides,
                execution=execution,
                resources=resources,
                celery=celery,
            )
        except RuntimeError as error:
            workspace.echo(f"   {scenario.name}-{name}: failed: {error}")
            return {"skipped": f"failed: {error}"[:500]}
    if result.get("config_rejected"):
        reason = str(result["config_rejected"]).splitlines()[0][:200]
        workspace.echo(f"   {scenario.name}-{name}: not available (the job rejected its config)")
        return {"skipped": f"not available: the job rejected the config ({reason})"}
    result["bound_s"] = s3["bound_s"]
    return result


# --- L --------------------------------------------------------------------------------------


def run_leads(scenario: Scenario, workspace: Workspace) -> dict[str, Any]:
    """L: seed 001's 10-row Leads table through enrich_table, `leads_runs` times, each on a
    fresh database, an emptied Redis and a fresh mock; the median wall and CPU."""
    import statistics

    # At the reference's latency and concurrency, whatever this run's are (else not comparable).
    settings = replace(
        workspace.settings,
        latency_ms=goals.LEADS_REFERENCE_LATENCY_MS,
        concurrency=goals.LEADS_REFERENCE_CONCURRENCY,
    )
    workspace = replace(workspace, settings=settings)
    runs: list[dict[str, Any]] = []
    for index in range(settings.leads_runs):
        with fresh_postgres(settings.postgres_url) as database_url:
            flush_redis(settings.redis_url)
            store = Store(database_url)
            try:
                table = seed_leads(store)
            finally:
                store.dispose()
            columns = [leads_column_id(key) for key in LEADS_ENRICH_KEYS]
            runs.append(
                _entity_run(
                    scenario,
                    workspace,
                    database_url,
                    table.id,
                    columns,
                    None,
                    cold=True,
                    label=f"run{index + 1}",
                )
            )
    walls = [run["wall_s"] for run in runs]
    cpus = [run["cpu_s"] for run in runs]
    middle = sorted(runs, key=lambda run: run["wall_s"])[len(runs) // 2]
    out: dict[str, Any] = {
        "title": scenario.title,
        "rows": scenario.rows,
        "columns": list(scenario.target_keys),
        "cells": scenario.rows * len(scenario.target_keys),
        "entity_first": middle,  # the median run, for the figure tables
        "leads": {
            "runs": [
                {k: run.get(k) for k in ("wall_s", "cpu_s", "statements", "provider_calls")}
                for run in runs
            ],
            "wall_s_median": round(statistics.median(walls), 3),
            "cpu_s_median": round(statistics.median(cpus), 3),
            "reference_wall_s": goals.LEADS_REFERENCE_WALL_S,
            "reference_cpu_s": goals.LEADS_REFERENCE_CPU_S,
            "latency_ms": settings.latency_ms,
            "concurrency": settings.concurrency,
        },
        "needed_calls": None,
        "bound_s": 0.0,
    }
    out["targets"] = targets(scenario, out)
    return out


def _calls_text(calls: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(calls.items())) or "0"
