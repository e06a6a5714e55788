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

from glaze_pipeline.bench.baseline import create_cell_tables
from glaze_pipeline.bench.expected import Needs, selection_needs, waterfall_calls
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
from glaze_pipeline.bench.stack import fresh_postgres
from glaze_pipeline.core.engine import JobSettings
from glaze_pipeline.core.seed import GENERATED_COMPANY_KEYS, GENERATED_PERSON_KEYS, seed_generated
from glaze_pipeline.core.store import Store

ALL_SCENARIOS = ("S1", "S2", "S3", "S4", "S5", "S6")
RSS_LIMIT_MIB = 512
LAUNCH_TARGET_S = 3.0

Echo = Callable[[str], None]


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
    max_chunks: int = JobSettings.max_chunks
    page_size: int = JobSettings.page_size
    launch_requests: int = 10
    profile: bool = False  # py-spy flame graphs of the entity-first workers
    output_dir: str = "bench_results"

    def job_config(self, table_id: str, column_ids: list[str]) -> dict[str, Any]:
        return {
            "table_id": table_id,
            "column_ids": column_ids,
            "concurrency": self.concurrency,
            "chunk_size": self.chunk_size,
            "max_chunks": self.max_chunks,
            "page_size": self.page_size,
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
                else:
                    outcome = run_scenario(scenario, workspace, keep, selected)
                outcome["scenario_seconds"] = round(time.perf_counter() - t0, 1)
                results["scenarios"][scenario.name] = outcome
                echo(f"   done in {outcome['scenario_seconds']} s")
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
    needs: Needs,
    *,
    cold: bool,
    label: str = "entity",
) -> dict[str, Any]:
    settings = workspace.settings
    label = f"{scenario.name}-{label}"
    with mock_process(workspace.root, settings.latency_ms, name=f"{label}-mock") as mock:
        providers_file, document = _providers_file(workspace, mock, label)
        expected = _expected_calls(needs, document) if cold else {}
        spec = {
            "mode": "entity",
            "database_url": database_url,
            "redis_url": settings.redis_url,
            "providers_file": str(providers_file),
            "dagster_home": str(workspace.path(f"{label}-dagster")),
            "job_config": settings.job_config(table_id, column_ids),
        }
        workspace.echo(f"   {label}: enrich_table over {scenario.rows:,} rows ...")
        result = _run_worker(workspace, label, spec)
        calls = _calls_by_provider(mock, document)
        result["mock_peak_rss_mib"] = _round(mock.peak_rss_mib())
        result["mock_cpu_s"] = _round(mock.cpu_seconds())
    result["redis_peak_rss_mib"] = _round(redis_peak_mib(settings.redis_url))
    result["provider_calls"] = calls
    result["expected_calls"] = {name: expected.get(name, 0) for name in calls}
    workspace.echo(
        f"   {label}: {result['wall_s']} s, calls {calls}, "
        f"{result['statements']} statements, RSS {result['peak_rss_mib']} MiB, "
        f"CPU {result['cpu_s']} s (mock {result['mock_cpu_s']} s)"
    )
    if not result.get("success"):
        raise RuntimeError(f"{scenario.name}: the enrich_table run failed: {result['failure']}")
    return result


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


def _calls_by_provider(mock: MockProcess, document: dict[str, Any]) -> dict[str, int]:
    """The mock's request counts, named by the provider entries that call each vendor."""
    served = mock.calls_by_vendor()
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


def statement_limit(rows: int) -> float:
    """The issue's DB budget per job: 20 + 3 per 1,000 rows touched."""
    return 20 + 3 * rows / 1000


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
        "DB statements per job",
        f"<= {limit:g}",
        str(entity["statements"]),
        entity["statements"] <= limit,
    )
    if scenario.name == "S3":
        bound, start = out["bound_s"], entity.get("first_step_s") or 0.0
        ceiling = 1.2 * bound + start
        add(
            "wall <= 1.2 x lower bound + run start",
            f"<= {ceiling:.1f} s (1.2 x {bound:.1f} + {start:.1f})",
            f"{entity['wall_s']:.1f} s",
            entity["wall_s"] <= ceiling,
        )
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


def _calls_text(calls: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(calls.items())) or "0"
