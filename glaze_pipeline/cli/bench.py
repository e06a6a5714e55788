"""`glaze bench ...`: benchmarks that print figures and write them to bench_results/ (they are
not tests: `glaze bench estimate` alone exits 1, when the estimate's bound is broken)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from glaze_pipeline.cli.context import console
from glaze_pipeline.cli.errors import EXIT_INTERNAL, print_error
from glaze_pipeline.cli.options import POSITIVE, FiniteFloatRange


@click.group()
def bench() -> None:
    """Benchmarks that print figures (not tests)."""


@bench.command("launch")
@click.option("--requests", type=POSITIVE, default=10, show_default=True)
@click.option(
    "--postgres-url",
    default="postgresql://postgres@127.0.0.1:5432/test",
    show_default=True,
    help="Server for a throwaway benchmark database.",
)
@click.option(
    "--output", type=click.Path(path_type=Path), default=Path("bench_results/launch.json")
)
def bench_launch(requests: int, postgres_url: str, output: Path) -> None:
    """Enqueue -> STARTED -> first write -> finished, via the sensor and via the launcher."""
    from glaze_pipeline.bench.launch import run

    results = run(postgres_url, requests)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    grid = Table("path", "stage", "min s", "median s", "max s")
    for path, result in results["paths"].items():
        for stage, figures in result["summary"].items():
            grid.add_row(path, stage, *(f"{figures[k]:.2f}" for k in ("min", "median", "max")))
    console.print(grid)
    console.print(f"written to {output}")


@bench.command("api-latency")
@click.option("--jobs", type=POSITIVE, default=10, show_default=True)
@click.option(
    "--postgres-url",
    default=None,
    help="Also measure on a throwaway database of this Postgres server.",
)
@click.option("--redis-url", default=None, help="With --postgres-url: pub/sub through this Redis.")
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=Path("bench_results/api_latency.json"),
    show_default=True,
)
def bench_api_latency(
    jobs: int, postgres_url: str | None, redis_url: str | None, output: Path
) -> None:
    """POST enrich -> first SSE `running` event, and -> `finished`, over small jobs (2 columns x
    3 rows) through a real `glaze serve`: on the embedded SQLite default, and optionally on
    Postgres (+ Redis)."""
    from glaze_pipeline.bench.api_latency import measure

    report = measure(jobs, postgres_url=postgres_url, redis_url=redis_url, echo=console.print)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report.as_dict(), indent=2))
    console.print(f"wrote {output}")


@bench.command("run")
@click.option(
    "--scenarios",
    default="S1,S2,S3,S4,S5,S6,L",
    show_default=True,
    help="Comma-separated: S1..S6, L (the 10-row Leads job; see bench_results/results.md).",
)
@click.option(
    "--scale",
    type=FiniteFloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Shrink S3-S5.",
)
@click.option("--latency-ms", type=FiniteFloatRange(min=0), default=100.0, show_default=True)
@click.option("--concurrency", type=POSITIVE, default=200, show_default=True)
@click.option("--page-size", type=POSITIVE, default=5000, show_default=True)
@click.option(
    "--baseline-sample",
    type=FiniteFloatRange(0, 1, min_open=True),
    default=0.02,
    show_default=True,
    help="S3: share of rows the cell-level baseline really runs (then extrapolated).",
)
@click.option(
    "--postgres-url",
    default="postgresql://postgres@127.0.0.1:5432/test",
    show_default=True,
    help="Server for throwaway benchmark databases (the named database is not touched).",
)
@click.option("--redis-url", default="redis://127.0.0.1:6379/13", show_default=True)
@click.option("--launch-requests", type=POSITIVE, default=10, show_default=True, help="S6.")
@click.option("--profile/--no-profile", default=False, help="py-spy flame graphs.")
@click.option(
    "--batched/--no-batched",
    default=True,
    show_default=True,
    help="S3 again with the vendors' batch endpoints on, as a second row.",
)
@click.option(
    "--executors",
    default="in_process",
    show_default=True,
    help="Comma-separated: in_process, multiprocess, celery; S3 runs again on each other one "
    "(a second row; skipped, saying why, where the engine does not offer it), and S5 on "
    "multiprocess (the path a request that large takes from the queue).",
)
@click.option(
    "--leads-runs", type=POSITIVE, default=3, show_default=True, help="L: runs (the median)."
)
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("bench_results"))
def bench_run(
    scenarios: str,
    scale: float,
    latency_ms: float,
    concurrency: int,
    page_size: int,
    baseline_sample: float,
    postgres_url: str,
    redis_url: str,
    launch_requests: int,
    profile: bool,
    batched: bool,
    executors: str,
    leads_runs: int,
    output_dir: Path,
) -> None:
    """Entity-first pipeline vs the cell-level baseline: calls, statements, time, memory,
    CPU per call, and how the rows stream."""
    from glaze_pipeline.bench.report import FIGURE_COLUMNS, figure_rows, target_rows
    from glaze_pipeline.bench.run import EXECUTORS, BenchSettings, run_benchmark

    chosen = tuple(name.strip() for name in executors.split(",") if name.strip())
    unknown = sorted(set(chosen) - set(EXECUTORS))
    if unknown:
        raise click.BadParameter(
            f"unknown {unknown}; choose from {', '.join(EXECUTORS)}", param_hint="--executors"
        )

    settings = BenchSettings(
        postgres_url=postgres_url,
        redis_url=redis_url,
        latency_ms=latency_ms,
        concurrency=concurrency,
        scale=scale,
        baseline_sample=baseline_sample,
        page_size=page_size,
        launch_requests=launch_requests,
        profile=profile,
        output_dir=str(output_dir),
        batched=batched,
        executors=chosen,
        leads_runs=leads_runs,
    )
    selected = [name.strip().upper() for name in scenarios.split(",") if name.strip()]
    results = run_benchmark(settings, selected, echo=console.print)
    figures = Table(*FIGURE_COLUMNS, title="figures")
    for row in figure_rows(results):
        figures.add_row(*row)
    console.print(figures)
    goals = Table("scenario", "target", "want", "got", "", title="targets")
    for row in target_rows(results):
        goals.add_row(*row)
    console.print(goals)
    console.print(f"written to {output_dir}/results.json, results.md and chart.png")


@bench.command("estimate")
@click.option("--seeds", type=POSITIVE, default=3, show_default=True, help="Table pairs to run.")
@click.option("--rows", type=POSITIVE, default=1000, show_default=True, help="Rows per table.")
@click.option(
    "--companies", type=POSITIVE, default=100, show_default=True, help="Companies per table."
)
@click.option(
    "--premium-key-unset",
    is_flag=True,
    help="Run with GLAZE_PREMIUM_API_KEY unset: the estimate and the runs must say so.",
)
@click.option(
    "--database-url",
    default=None,
    help="Put every seed's tables in this (fresh) database; default: throwaway SQLite per seed.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Default: bench_results/estimate.json (estimate_premium_key_unset.json with the flag).",
)
def bench_estimate(
    seeds: int,
    rows: int,
    companies: int,
    premium_key_unset: bool,
    database_url: str | None,
    output: Path | None,
) -> None:
    """The estimate against what the job then spends: per seed, enrich one table, estimate a
    second of the same shape (other companies and people), enrich it, and compare; the mock
    vendors' /_stats against the request's provider_calls. Exits 1 if the upper bound is ever
    below the actual cost or the counters disagree (bugs); the 10 % target is reported."""
    from glaze_pipeline.bench.estimate_accuracy import (
        PREMIUM,
        TARGET_ERROR_PCT,
        EstimateBenchSettings,
        run,
    )

    settings = EstimateBenchSettings(
        seeds=seeds,
        rows=rows,
        companies=companies,
        premium_key_set=not premium_key_unset,
        database_url=database_url,
    )
    report = run(settings, echo=console.print)
    output = output or Path(
        "bench_results/estimate_premium_key_unset.json"
        if premium_key_unset
        else "bench_results/estimate.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report.as_dict(), indent=2))

    grid = Table(
        "seed",
        "expected cost",
        "~95 % range",
        "max cost",
        "actual cost",
        "error %",
        "in range",
        "max >= actual",
        "mock requests / provider calls",
        "mock billed",
        title=f"estimate vs actual ({settings.rows:,} rows, {settings.companies:,} companies)",
    )
    for figures in report.seeds:
        error = figures.error_pct
        off_target = error is not None and abs(error) > TARGET_ERROR_PCT
        grid.add_row(
            str(figures.seed),
            f"{figures.expected_cost:,.2f}",
            f"{figures.expected_range[0]:,.0f}-{figures.expected_range[1]:,.0f}",
            f"{figures.max_cost:,.2f}",
            f"{figures.actual_cost:,.2f}",
            "-" if error is None else f"{error:+.1f}" + (" (over target)" if off_target else ""),
            "yes" if figures.within_range else "no",
            Text("yes") if figures.within_bound else Text("NO", style="red"),
            f"{sum(figures.mock_requests.values()):,} / {sum(figures.provider_calls.values()):,}"
            + ("" if figures.counters_match else " MISMATCH"),
            f"{figures.mock_cost:,.2f}",
        )
    console.print(grid)
    if premium_key_unset:
        unset = Table(
            "seed",
            f"{PREMIUM} in the estimate",
            "premium requests",
            "cells failed",
            "cells skipped (estimated)",
            "request: unavailable_providers",
            "request: error",
            title="with GLAZE_PREMIUM_API_KEY unset",
        )
        for figures in report.seeds:
            said = figures.premium_estimate
            unset.add_row(
                str(figures.seed),
                f"{said.get('status', '-')}: {said.get('reason') or '-'}",
                str(figures.premium_requests),
                str(figures.cells_failed),
                f"{figures.cells_skipped:,} ({figures.expected_cells_skipped:,})",
                ", ".join(sorted(figures.unavailable_providers)) or "-",
                figures.error or "-",
            )
        console.print(unset)
    console.print(report.summary())
    console.print(f"written to {output}")
    problems = report.problems()
    for problem in problems:
        print_error(problem)
    if problems:
        sys.exit(EXIT_INTERNAL)
