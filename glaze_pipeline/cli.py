"""The `glaze` command: set up the database, seed, import, enrich, show, demo.

Enrichment always runs as the Dagster job `enrich_table` (in process), so a run started here
keeps its logs and asset lineage in the Dagster instance like any other.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from glaze_pipeline.core.errors import GlazeError
from glaze_pipeline.core.settings import glaze_home
from glaze_pipeline.core.store import Store

if TYPE_CHECKING:
    from dagster import DagsterInstance

# Wide when piped (CI logs, files): a lead table does not fit in 80 columns.
console = Console(width=None if sys.stdout.isatty() else 220)
err_console = Console(stderr=True)


def _store(ctx: click.Context) -> Store:
    return Store(ctx.obj.get("database_url"))


@click.group()
@click.option(
    "--database-url",
    envvar="GLAZE_DATABASE_URL",
    default=None,
    help="App database (default: SQLite file .glaze/glaze.db).",
)
@click.pass_context
def cli(ctx: click.Context, database_url: str | None) -> None:
    """Glaze pipeline: entity-first enrichment of lead tables, on Dagster."""
    ctx.ensure_object(dict)
    ctx.obj["database_url"] = database_url


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Create or migrate the app database to the latest schema."""
    store = _store(ctx)
    store.upgrade()
    console.print(f"database ready: {_safe_url(store)}")


@cli.command()
@click.option("--rows", type=int, default=None, help="Generate a table with this many rows.")
@click.option(
    "--unique-companies", type=int, default=None, help="Companies in the generated table."
)
@click.option("--unique-people", type=int, default=None, help="People (default: one per row).")
@click.pass_context
def seed(
    ctx: click.Context, rows: int | None, unique_companies: int | None, unique_people: int | None
) -> None:
    """Seed the Leads table of seed 001 (10 rows, 8 columns), or a generated table."""
    from glaze_pipeline.core.seed import seed_generated, seed_leads

    store = _store(ctx)
    store.upgrade()
    if rows is None:
        table = seed_leads(store)
    else:
        with console.status(f"inserting {rows:,} rows..."):
            table = seed_generated(
                store,
                rows=rows,
                unique_companies=unique_companies or max(1, rows // 10),
                unique_people=unique_people,
            )
    _print_table_ids(table.id, store)


@cli.command("import-csv")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Table name (default: the file name).")
@click.pass_context
def import_csv(ctx: click.Context, path: Path, name: str | None) -> None:
    """Import a CSV file (header row = columns) as a new table."""
    from glaze_pipeline.core.seed import import_csv as import_file

    store = _store(ctx)
    store.upgrade()
    with console.status(f"importing {path}..."):
        table = import_file(store, path, name=name)
    _print_table_ids(table.id, store)


@cli.command()
@click.pass_context
def tables(ctx: click.Context) -> None:
    """List tables."""
    store = _store(ctx)
    grid = Table("id", "name", "rows")
    for table_id, name, count in store.list_tables():
        grid.add_row(table_id, name, str(count))
    console.print(grid)


@cli.command()
@click.argument("table_id")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--meta/--no-meta", default=False, help="Show each cell's status and source.")
@click.pass_context
def show(ctx: click.Context, table_id: str, limit: int, meta: bool) -> None:
    """Print a table as a terminal table."""
    console.print(render_table(_store(ctx), table_id, limit=limit, with_meta=meta))


def render_table(store: Store, table_id: str, *, limit: int = 50, with_meta: bool = False) -> Table:
    info = store.get_table(table_id)
    grid = Table(title=f"{info.name} ({info.id})", show_lines=False)
    for column in info.columns:
        grid.add_column(column.key, overflow="fold", max_width=40)
    grid.add_column("status")
    grid.add_column("conf")
    for row in store.rows_in_order(table_id, limit=limit):
        cells = []
        for column in info.columns:
            value = row.data.get(column.key)
            text = "" if value in (None, "") else str(value)
            cell_meta = row.meta.get(column.key)
            if with_meta and isinstance(cell_meta, dict):
                text = f"{text} [{cell_meta.get('status')}:{cell_meta.get('source') or '-'}]"
            cells.append(text)
        status = row.status
        confidence = _row_confidence(row.meta)
        grid.add_row(*cells, status, confidence)
    return grid


def _row_confidence(meta: dict[str, Any]) -> str:
    from glaze_pipeline.core.status import aggregate_row

    _, confidence, _ = aggregate_row(meta)
    return "" if confidence is None else f"{confidence:.2f}"


def selection_options(command: Any) -> Any:
    """The options every command that selects cells shares (grid, or the whole table)."""
    for option in reversed(
        [
            click.argument("table_id"),
            click.option("--columns", "column_keys", multiple=True, help="Column keys or ids."),
            click.option("--rows", "row_ids", multiple=True, help="Row ids (default: all)."),
            click.option("--budget", type=float, default=None, help="Max spend for the job."),
        ]
    ):
        command = option(command)
    return command


def _selection(
    store: Store, table_id: str, column_keys: tuple[str, ...], row_ids: tuple[str, ...]
) -> dict[str, Any]:
    """Grid selection from keys or ids; no columns means every empty enrichable cell."""
    info = store.get_table(table_id)
    column_ids = [_column_id(info, key) for key in column_keys]
    if not column_ids:
        if row_ids:
            raise GlazeError("--rows needs --columns")
        return {"whole_table": True}
    return {"column_ids": column_ids, "row_ids": list(row_ids)}


@cli.command()
@selection_options
@click.option("--chunk-size", type=int, default=500, show_default=True)
@click.option("--concurrency", type=int, default=50, show_default=True)
@click.pass_context
def enrich(
    ctx: click.Context,
    table_id: str,
    column_keys: tuple[str, ...],
    row_ids: tuple[str, ...],
    budget: float | None,
    chunk_size: int,
    concurrency: int,
) -> None:
    """Run the enrich_table job now, in process (no --columns: the whole table's empty cells)."""
    selection = _selection(_store(ctx), table_id, column_keys, row_ids)
    config = {
        "table_id": table_id,
        **selection,
        "budget": budget,
        "chunk_size": chunk_size,
        "concurrency": concurrency,
    }
    console.print(render_request(run_enrich_job(ctx.obj.get("database_url"), config)))


@cli.command()
@selection_options
@click.pass_context
def estimate(
    ctx: click.Context,
    table_id: str,
    column_keys: tuple[str, ...],
    row_ids: tuple[str, ...],
    budget: float | None,
) -> None:
    """What enriching these cells would buy: entities, cache hits, calls and cost per provider."""
    selection = _selection(_store(ctx), table_id, column_keys, row_ids)
    config = {"table_id": table_id, **selection, "budget": budget, "kind": "estimate"}
    request = run_enrich_job(ctx.obj.get("database_url"), config)
    grid = Table(title=f"estimate {request.id}", show_header=False)
    for name, value in (request.estimate or {}).items():
        grid.add_row(name, str(value))
    console.print(grid)


@cli.command()
@selection_options
@click.option(
    "--kind",
    type=click.Choice(["enrich", "estimate", "pre_enrich"]),
    default="enrich",
    show_default=True,
)
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@click.option("--idempotency-key", default=None, help="The same key twice is one request.")
@click.pass_context
def enqueue(
    ctx: click.Context,
    table_id: str,
    column_keys: tuple[str, ...],
    row_ids: tuple[str, ...],
    budget: float | None,
    kind: str,
    priority: int,
    idempotency_key: str | None,
) -> None:
    """Queue a request as the app does; the queue sensor (or `glaze launcher`) launches it."""
    from glaze_pipeline.core import queue

    store = _store(ctx)
    selection = _selection(store, table_id, column_keys, row_ids)
    request_id = queue.enqueue(
        store,
        table_id,
        selection,
        kind=kind,
        budget=budget,
        priority=priority,
        idempotency_key=idempotency_key,
    )
    console.print(request_id)


@cli.command()
@click.argument("request_id")
@click.pass_context
def cancel(ctx: click.Context, request_id: str) -> None:
    """Ask for a request to be cancelled: queued ones end at once, running ones at their next step."""
    from glaze_pipeline.core import queue
    from glaze_pipeline.core.models import TERMINAL_REQUEST_STATUSES, RequestStatus
    from glaze_pipeline.core.progress import open_progress
    from glaze_pipeline.core.settings import redis_url

    store = _store(ctx)
    before = RequestStatus(store.get_request(request_id).status)
    if before in TERMINAL_REQUEST_STATUSES:
        console.print(f"{request_id}: already ended {before.value}; nothing to cancel")
        return
    publisher = open_progress(redis_url())
    try:
        status = queue.request_cancel(store, request_id, publisher)
    finally:
        publisher.close()
    console.print(
        f"{request_id}: {status.value}"
        + (
            ""
            if status is RequestStatus.CANCELLED
            else " (cancel requested: it stops within seconds)"
        )
    )


def _column_id(info: Any, key_or_id: str) -> str:
    ids = {column.id for column in info.columns}
    if key_or_id in ids:
        return key_or_id
    return str(info.column_by_key(key_or_id).id)


def default_dagster_home() -> Path:
    """.glaze/dagster, created with a minimal dagster.yaml: the instance used without DAGSTER_HOME."""
    home = glaze_home() / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    return home


def dagster_instance() -> DagsterInstance:
    """$DAGSTER_HOME's instance when set, else a persistent one under .glaze/dagster."""
    from dagster import DagsterInstance

    if os.environ.get("DAGSTER_HOME"):
        return DagsterInstance.get()
    return DagsterInstance.from_config(str(default_dagster_home()))


def run_enrich_job(
    database_url: str | None, op_config: dict[str, Any], *, log_level: str = "INFO"
) -> Any:
    """Execute enrich_table in process with this op config; returns the request record.

    At INFO the job's own progress lines show (entities found, each chunk, rows applied).
    """
    from glaze_pipeline.definitions import build_definitions

    job = build_definitions(database_url).get_job_def("enrich_table")
    with dagster_instance() as instance:
        result = job.execute_in_process(
            run_config={
                "ops": {"detect_entities": {"config": op_config}},
                "loggers": {"console": {"config": {"log_level": log_level}}},
            },
            instance=instance,
            raise_on_error=False,
        )
        if not result.success:
            failure = next((e for e in result.all_events if e.is_step_failure), None)
            message = "the enrich_table run failed"
            if failure is not None and failure.step_failure_data is not None:
                message = (
                    failure.step_failure_data.error.message.strip()
                    if failure.step_failure_data.error
                    else message
                )
            raise GlazeError(f"{message} (run {result.run_id})")
        plan = result.output_for_node("detect_entities", "plan")
    store = Store(database_url)
    try:
        return store.get_request(plan.request_id)
    finally:
        store.dispose()


def render_request(request: Any) -> Table:
    grid = Table(title=f"request {request.id}", show_header=False)
    grid.add_column("field")
    grid.add_column("value")
    total = request.cells_total or 0
    answered = (request.cells_done or 0) + (request.cells_not_found or 0)
    for name, value in (
        ("status", request.status),
        ("table", request.table_id),
        ("kind", request.kind),
        ("run", request.run_id or "-"),
        ("progress", f"{answered}/{total} cells ({100 * answered // total if total else 100}%)"),
        ("cells done / not found", f"{request.cells_done} / {request.cells_not_found}"),
        ("cells failed / skipped", f"{request.cells_failed} / {request.cells_skipped}"),
        ("rows written", str(request.rows_written)),
        ("unique entities", str(request.entities)),
        ("cache hits", str(request.cache_hits)),
        ("provider calls", str(request.provider_calls or {})),
        (
            "cost",
            f"{request.cost:g}"
            + (f" of budget {request.budget:g}" if request.budget is not None else ""),
        ),
        ("error", request.error or "-"),
    ):
        grid.add_row(name, value)
    return grid


@cli.command()
@click.argument("request_id", required=False)
@click.pass_context
def status(ctx: click.Context, request_id: str | None) -> None:
    """Show one request (job), or the latest ones."""
    from sqlalchemy import select

    from glaze_pipeline.core.schema import EnrichmentRequest

    store = _store(ctx)
    if request_id:
        console.print(render_request(store.get_request(request_id)))
        return
    grid = Table("id", "table", "kind", "status", "cells", "cost", "created")
    with store.session() as session:
        recent = session.scalars(
            select(EnrichmentRequest).order_by(EnrichmentRequest.created_at.desc()).limit(20)
        ).all()
    for request in recent:
        grid.add_row(
            request.id,
            request.table_id,
            request.kind,
            request.status,
            f"{request.cells_done}/{request.cells_total}",
            f"{request.cost:g}",
            str(request.created_at)[:19],
        )
    console.print(grid)


@cli.command()
@click.option(
    "--graphql-url",
    default=None,
    help="Submit runs through Dagster's GraphQL API (e.g. http://127.0.0.1:3000/graphql).",
)
@click.option(
    "--max-runs",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Forked runs at once.",
)
@click.option(
    "--poll",
    type=click.FloatRange(min=0, min_open=True),
    default=0.5,
    show_default=True,
    help="Catch-up interval (s).",
)
@click.pass_context
def launcher(ctx: click.Context, graphql_url: str | None, max_runs: int, poll: float) -> None:
    """Launch queued requests as they land (LISTEN/NOTIFY on Postgres), ahead of the sensor.

    By default each run executes in a child forked from this already-warm process (a real
    Dagster run in $DAGSTER_HOME's instance, else .glaze/dagster's); with --graphql-url it is
    submitted to Dagster. A database restart is waited out: it reconnects and catches up.
    """
    import logging
    import signal
    import threading

    from glaze_pipeline.launcher import fork_launch, graphql_launch, run_launcher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    store = _store(ctx)
    if graphql_url:
        starter = graphql_launch(graphql_url)
        how = f"via {graphql_url}"
    else:
        if not os.environ.get("DAGSTER_HOME"):  # the children open DagsterInstance.get()
            os.environ["DAGSTER_HOME"] = str(default_dagster_home())
        starter = fork_launch(ctx.obj.get("database_url"), max_runs=max_runs)
        how = (
            f"in forked workers (at most {max_runs} at once), "
            f"runs recorded in {os.environ['DAGSTER_HOME']}"
        )
    console.print(f"launching queued requests from {_safe_url(store)} {how}")
    try:
        run_launcher(store, starter, stop, poll)
    finally:
        starter.close()


@cli.command("mock-providers")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8765, show_default=True)
@click.option("--config", "config_file", default=None, help="Mock config (YAML or JSON).")
def mock_providers(host: str, port: int, config_file: str | None) -> None:
    """Serve the mock provider APIs (real HTTP on loopback) for development and benchmarks."""
    from glaze_pipeline.mock_server import load_mock_config, serve

    console.print(f"mock providers on http://{host}:{port} (stats: /_stats, reset: POST /_reset)")
    serve(host, port, load_mock_config(config_file))


@cli.command()
@click.option(
    "--config", "config_file", default=None, help="Providers YAML (else GLAZE_PROVIDERS_FILE)."
)
def providers(config_file: str | None) -> None:
    """List the providers of the waterfall: entity, fields, cost per call, health."""
    from glaze_pipeline.core.providers.registry import describe_providers, load_providers

    grid = Table(
        "provider",
        "entity",
        "kind",
        "cost/call",
        "charges misses",
        "confidence",
        "health",
        "fields",
    )
    for described in describe_providers(load_providers(config_file)):
        row = described.as_dict()
        grid.add_row(
            row["name"],
            row["entity_type"],
            row["kind"],
            f"{row['cost_per_call']:g}",
            "yes" if row["charges_misses"] else "no",
            f"{row['confidence']:g}",
            str(row["health"]),
            ", ".join(row["fields"]),
        )
    console.print(grid)


@cli.group()
def bench() -> None:
    """Benchmarks that print figures (not tests)."""


@bench.command("launch")
@click.option("--requests", type=int, default=10, show_default=True)
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
    import json

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


@bench.command("run")
@click.option(
    "--scenarios",
    default="S1,S2,S3,S4,S5,S6",
    show_default=True,
    help="Comma-separated: S1..S6 (see bench_results/results.md).",
)
@click.option("--scale", type=float, default=1.0, show_default=True, help="Shrink S3-S5.")
@click.option("--latency-ms", type=float, default=100.0, show_default=True)
@click.option("--concurrency", type=int, default=200, show_default=True)
@click.option("--page-size", type=int, default=5000, show_default=True)
@click.option(
    "--baseline-sample",
    type=float,
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
@click.option("--launch-requests", type=int, default=10, show_default=True, help="S6.")
@click.option("--profile/--no-profile", default=False, help="py-spy flame graphs.")
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
    output_dir: Path,
) -> None:
    """Entity-first pipeline vs the cell-level baseline: calls, statements, time, memory."""
    from glaze_pipeline.bench.report import FIGURE_COLUMNS, figure_rows, target_rows
    from glaze_pipeline.bench.run import BenchSettings, run_benchmark

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


@cli.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Set up, seed the Leads table, enrich it, and show it before and after."""
    from glaze_pipeline.core.seed import LEADS_ENRICH_KEYS, leads_column_id, seed_leads

    store = _store(ctx)
    console.print(f"[bold]1. database[/bold] {_safe_url(store)}")
    store.upgrade()
    table = seed_leads(store)
    console.print("[bold]2. seeded the Leads table (seed 001): before[/bold]")
    console.print(render_table(store, table.id))
    console.print(
        f"[bold]3. enriching {', '.join(LEADS_ENRICH_KEYS)} (Dagster job enrich_table)[/bold]"
    )
    request = run_enrich_job(
        ctx.obj.get("database_url"),
        {"table_id": table.id, "column_ids": [leads_column_id(k) for k in LEADS_ENRICH_KEYS]},
        log_level="WARNING",
    )
    console.print(render_request(request))
    console.print("[bold]4. after[/bold]")
    console.print(render_table(store, table.id))
    console.print(
        "Katherine Johnson's row has no website, email or company: its cells end "
        "'failed: no identifier' rather than being dropped."
    )


def _print_table_ids(table_id: str, store: Store) -> None:
    info = store.get_table(table_id)
    console.print(f"table [bold]{info.name}[/bold]: {info.id}")
    grid = Table("column key", "column id", "field")
    for column in info.columns:
        spec = column.spec()
        grid.add_row(column.key, column.id, str(spec.field) if spec.field else "-")
    console.print(grid)


def _safe_url(store: Store) -> str:
    from sqlalchemy.engine import make_url

    return make_url(store.url).render_as_string(hide_password=True)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except GlazeError as error:
        err_console.print(f"[red]error:[/red] {error}")
        sys.exit(2)


if __name__ == "__main__":
    main()
