"""Commands on requests: run one now, in process (`enrich`, `estimate`, `demo`), queue one as
the app does (`enqueue`), cancel one, and show them (`status`)."""

from __future__ import annotations

import json

import click
from rich.table import Table
from rich.text import Text

from glaze_pipeline.cli.context import check_run_services, command_store, console, safe_url
from glaze_pipeline.cli.options import POSITIVE, selection, selection_options
from glaze_pipeline.cli.rendering import (
    render_estimate,
    render_request,
    render_requests,
    render_table,
)
from glaze_pipeline.core.limits import MAX_PRIORITY, MIN_PRIORITY
from glaze_pipeline.core.settings import DEFAULT_CHUNK_SIZE, DEFAULT_CONCURRENCY
from glaze_pipeline.core.store import Store


@click.command()
@selection_options
@click.option("--chunk-size", type=POSITIVE, default=DEFAULT_CHUNK_SIZE, show_default=True)
@click.option("--concurrency", type=POSITIVE, default=DEFAULT_CONCURRENCY, show_default=True)
@click.pass_context
def enrich(
    ctx: click.Context,
    table_id: str,
    column_keys: tuple[str, ...],
    row_ids: tuple[str, ...],
    budget: float | None,
    overwrite: bool,
    chunk_size: int,
    concurrency: int,
) -> None:
    """Run the enrich_table job now, in process (no --columns: the whole table's empty cells)."""
    from glaze_pipeline.core.engine import JobSettings
    from glaze_pipeline.runner import run_enrich_job

    JobSettings(budget=budget, chunk_size=chunk_size, concurrency=concurrency)
    chosen = selection(command_store(ctx), table_id, column_keys, row_ids, overwrite)
    check_run_services()
    config = {
        "table_id": table_id,
        **chosen,
        "budget": budget,
        "chunk_size": chunk_size,
        "concurrency": concurrency,
    }
    request = run_enrich_job(ctx.obj.get("database_url"), config, debug=ctx.obj["debug"])
    console.print(render_request(request))


@click.command()
@selection_options
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as one JSON object.")
@click.pass_context
def estimate(
    ctx: click.Context,
    table_id: str,
    column_keys: tuple[str, ...],
    row_ids: tuple[str, ...],
    budget: float | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    """What enriching these cells would buy, buying nothing: per provider the expected calls
    and cost (from what the engine has observed) and the upper bound, which providers are
    unusable and why, and which budget fills what share of the cells."""
    from glaze_pipeline.runner import run_enrich_job

    chosen = selection(command_store(ctx), table_id, column_keys, row_ids, overwrite)
    check_run_services()
    config = {"table_id": table_id, **chosen, "budget": budget, "kind": "estimate"}
    request = run_enrich_job(ctx.obj.get("database_url"), config, debug=ctx.obj["debug"])
    report = dict(request.estimate or {})
    if as_json:
        click.echo(json.dumps({"request_id": request.id, **report}, sort_keys=True))
        return
    console.print(render_estimate(request.id, report))


@click.command()
@selection_options
@click.option(
    "--kind",
    type=click.Choice(["enrich", "estimate", "pre_enrich"]),
    default="enrich",
    show_default=True,
)
@click.option(
    "--priority",
    type=click.IntRange(MIN_PRIORITY, MAX_PRIORITY),
    default=0,
    show_default=True,
    help="Higher runs first.",
)
@click.option("--idempotency-key", default=None, help="The same key twice is one request.")
@click.pass_context
def enqueue(
    ctx: click.Context,
    table_id: str,
    column_keys: tuple[str, ...],
    row_ids: tuple[str, ...],
    budget: float | None,
    overwrite: bool,
    kind: str,
    priority: int,
    idempotency_key: str | None,
) -> None:
    """Queue a request as the app does; the queue sensor (or `glaze launcher`) launches it."""
    from glaze_pipeline.core import queue

    store = command_store(ctx)
    chosen = selection(store, table_id, column_keys, row_ids, overwrite)
    request_id = queue.enqueue(
        store,
        table_id,
        chosen,
        kind=kind,
        budget=budget,
        priority=priority,
        idempotency_key=idempotency_key,
    )
    console.print(request_id)


@click.command()
@click.argument("request_id")
@click.pass_context
def cancel(ctx: click.Context, request_id: str) -> None:
    """Ask for a request to be cancelled: queued ones end at once, running ones at their next step."""
    from glaze_pipeline.core import queue
    from glaze_pipeline.core.models import TERMINAL_REQUEST_STATUSES, RequestStatus
    from glaze_pipeline.core.progress import open_progress
    from glaze_pipeline.core.settings import redis_url

    store = command_store(ctx)
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


@click.command()
@click.argument("request_id", required=False)
@click.pass_context
def status(ctx: click.Context, request_id: str | None) -> None:
    """Show one request (job), or the latest ones."""
    store = command_store(ctx)
    if request_id:
        console.print(render_request(store.get_request(request_id)))
        return
    console.print(render_requests(store.recent_requests(20)))


@click.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Set up, seed the Leads table, enrich it, and show it before and after."""
    from glaze_pipeline.core.seed import LEADS_ENRICH_KEYS, leads_column_id, seed_leads
    from glaze_pipeline.runner import run_enrich_job

    store = command_store(ctx)
    console.print(Text("1. database", style="bold"), safe_url(store))
    store.upgrade()
    check_run_services()
    table = seed_leads(store)
    console.print(Text("2. seeded the Leads table (seed 001): before", style="bold"))
    console.print(_first_rows(store, table.id))
    console.print(
        Text(
            f"3. enriching {', '.join(LEADS_ENRICH_KEYS)} (Dagster job enrich_table)",
            style="bold",
        )
    )
    request = run_enrich_job(
        ctx.obj.get("database_url"),
        {"table_id": table.id, "column_ids": [leads_column_id(k) for k in LEADS_ENRICH_KEYS]},
        log_level="WARNING",
        debug=ctx.obj["debug"],
    )
    console.print(render_request(request))
    console.print(Text("4. after", style="bold"))
    console.print(_first_rows(store, table.id))
    console.print(
        "Katherine Johnson's row has no website, email or company: its cells end "
        "'failed: no identifier' rather than being dropped."
    )


def _first_rows(store: Store, table_id: str) -> Table:
    return render_table(store.get_table(table_id), store.rows_in_order(table_id, limit=50))
