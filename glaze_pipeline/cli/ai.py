"""`glaze ai ...`: seed 003's AI workflows from the command line.

Each command queues an AI request (the same record the API and the sensor use), runs its
Dagster job in process, and prints the proposal; nothing touches a table until it is accepted
(`--accept`, or `glaze ai accept REQUEST_ID` later), which writes all of it or none of it.
"""

from __future__ import annotations

import click
from rich.text import Text

from glaze_pipeline.cli.context import command_store, console
from glaze_pipeline.cli.rendering import render_ai_status, render_proposal
from glaze_pipeline.core.models import RequestKind


def _check_llm() -> None:
    """Refuse before anything is queued when the LLM is not configured (names the variable)."""
    from glaze_pipeline.core.ai.client import LlmSettings

    LlmSettings.from_env()


@click.group()
def ai() -> None:
    """AI workflows: propose a table, its columns and rows with an LLM, then accept them.

    The LLM is any OpenAI-compatible Chat Completions server: GLAZE_LLM_BASE_URL (e.g.
    http://127.0.0.1:8766/v1 for `glaze mock-llm`), GLAZE_LLM_MODEL, GLAZE_LLM_API_KEY.
    """


def _run(
    ctx: click.Context,
    kind: RequestKind,
    context: str,
    *,
    table_id: str | None,
    count: int | None,
    accept: bool,
) -> None:
    from glaze_pipeline.core.ai.workflow import enqueue_ai

    _check_llm()
    store = command_store(ctx)
    store.upgrade()  # a fresh embedded database gets its schema, as `glaze seed` does
    enqueued = enqueue_ai(store, kind, context, table_id=table_id, count=count)
    _run_queued(ctx, enqueued.request_id, accept=accept)


def _run_queued(ctx: click.Context, request_id: str, *, accept: bool) -> None:
    """Run a queued AI request's job in process, print its proposal, accept it if asked."""
    from glaze_pipeline.defs.ai_jobs import run_ai_in_process

    request = run_ai_in_process(
        ctx.find_root().obj.get("database_url"), request_id, debug=ctx.obj["debug"]
    )
    kind = RequestKind(request.kind)
    console.print(render_proposal(request.id, kind, request.result or {}))
    if request.status not in ("succeeded", "partial"):
        console.print(Text(f"request {request.id} ended {request.status}: {request.error}"))
        return
    if accept:
        _accept(ctx, request.id, with_rows=True)
    else:
        console.print(f"accept it with: glaze ai accept {request.id}")


@ai.command()
@click.argument("context")
@click.option(
    "--rows",
    "count",
    type=click.IntRange(1, 200),
    default=10,
    show_default=True,
    help="How many rows to propose.",
)
@click.option("--table", "table_id", default=None, help="Extend this table instead.")
@click.option("--accept", is_flag=True, help="Create (or extend) the table with the proposal.")
@click.pass_context
def generate(
    ctx: click.Context, context: str, count: int, table_id: str | None, accept: bool
) -> None:
    """The table-generation workflow: a table, then its columns, then rows, each step told
    what the ones before proposed. CONTEXT says what the table is for, e.g. "B2B payment
    companies in the Nordics, for outbound sales"."""
    _run(ctx, RequestKind.TABLE_GENERATION, context, table_id=table_id, count=count, accept=accept)


@ai.command("table")
@click.argument("context")
@click.pass_context
def table_command(ctx: click.Context, context: str) -> None:
    """Propose a table (name, description, what each row is) for CONTEXT."""
    _run(ctx, RequestKind.TABLE_SUGGESTIONS, context, table_id=None, count=None, accept=False)


@ai.command()
@click.argument("table_id")
@click.option("--context", default="", help="What the columns are for (default: the table's).")
@click.option("--accept", is_flag=True, help="Add the proposed columns to the table.")
@click.pass_context
def columns(ctx: click.Context, table_id: str, context: str, accept: bool) -> None:
    """Propose columns for an existing table: identifiers, enrichment fields, AI columns."""
    _run(
        ctx,
        RequestKind.COLUMN_SUGGESTIONS,
        context or _table_context(ctx, table_id),
        table_id=table_id,
        count=None,
        accept=accept,
    )


@ai.command()
@click.argument("table_id")
@click.option("--count", type=click.IntRange(1, 200), required=True, help="Rows to propose.")
@click.option("--context", default="", help="Which rows to look for (default: the table's).")
@click.option("--accept", is_flag=True, help="Add the proposed rows (duplicates skipped).")
@click.pass_context
def rows(ctx: click.Context, table_id: str, count: int, context: str, accept: bool) -> None:
    """Propose rows for an existing table, deduplicated against the rows it has."""
    _run(
        ctx,
        RequestKind.ROW_SUGGESTIONS,
        context or _table_context(ctx, table_id),
        table_id=table_id,
        count=count,
        accept=accept,
    )


@ai.command("accept")
@click.argument("request_id")
@click.option("--no-rows", is_flag=True, help="Columns only (a table-generation proposal).")
@click.pass_context
def accept_command(ctx: click.Context, request_id: str, no_rows: bool) -> None:
    """Write a completed proposal: create or extend its table, all or nothing. Accepting the
    same proposal again adds nothing."""
    _accept(ctx, request_id, with_rows=not no_rows)


@ai.command("retry")
@click.argument("request_id")
@click.option("--accept", is_flag=True, help="Write the proposal when it succeeds.")
@click.pass_context
def retry_command(ctx: click.Context, request_id: str, accept: bool) -> None:
    """Ask a failed or cancelled AI request again, as a new request (its retry_of)."""
    from glaze_pipeline.core.ai.workflow import retry_ai

    _check_llm()
    retried = retry_ai(command_store(ctx), request_id)
    _run_queued(ctx, retried.request_id, accept=accept)


@ai.command("show")
@click.argument("request_id")
@click.pass_context
def show_command(ctx: click.Context, request_id: str) -> None:
    """Show an AI request: its status (seed 003's view) and its proposal."""
    from glaze_pipeline.core.ai.workflow import ai_status

    request = command_store(ctx).get_request(request_id)
    console.print(render_ai_status(request.id, ai_status(request)))
    if request.result:
        console.print(render_proposal(request.id, RequestKind(request.kind), request.result))


def _table_context(ctx: click.Context, table_id: str) -> str:
    from glaze_pipeline.core.ai.workflow import table_context

    return table_context(command_store(ctx), table_id)


def _accept(ctx: click.Context, request_id: str, *, with_rows: bool) -> None:
    from glaze_pipeline.core.ai.accept import accept_proposal

    store = command_store(ctx)
    accepted = accept_proposal(store, request_id, with_rows=with_rows)
    verb = "created" if accepted.created else "extended"
    console.print(
        f"{verb} table {accepted.table_id}: {len(accepted.columns_added)} columns added"
        + (f" ({', '.join(accepted.columns_added)})" if accepted.columns_added else "")
        + f", {accepted.rows_added} rows added, {accepted.rows_duplicate} duplicate rows skipped"
    )
    for note in accepted.notes:
        console.print(Text(f"  - {note}"))
    console.print(f"table id: {accepted.table_id}")
    console.print(f"enrich it with: glaze enrich {accepted.table_id}")
