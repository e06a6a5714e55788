"""The `glaze` command: set up the database, seed, import, enrich, show, demo.

Enrichment always runs as the Dagster job `enrich_table` (in process), so a run started here
keeps its logs and asset lineage in the Dagster instance like any other.

Errors: `main()` is the one place where an exception becomes an exit code. A GlazeError (bad
input, a service that cannot be reached) is one `error: ...` line on stderr and exit 2; so is
an infrastructure error it can name (the database, Redis or Dagster down), translated first;
anything else is a bug: one line naming it, exit 1. `--debug` (or GLAZE_DEBUG=1) adds the
traceback. click's own usage errors keep click's message and exit 2.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from glaze_pipeline.core.errors import (
    ConfigError,
    GlazeError,
    InputError,
    InvalidSelectionError,
    ServiceUnavailableError,
)
from glaze_pipeline.core.limits import MAX_PRIORITY, MIN_PRIORITY, check_budget
from glaze_pipeline.core.settings import glaze_home
from glaze_pipeline.core.store import Store

if TYPE_CHECKING:
    from dagster import DagsterInstance

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT = 0, 1, 2

# Wide when piped (CI logs, files): a lead table does not fit in 80 columns. No markup: what
# this prints is mostly user data (a cell holding `[red]` or `[/b]` must print as typed); the
# few styled words are Text objects.
console = Console(width=None if sys.stdout.isatty() else 220, markup=False)


class BudgetType(click.ParamType):
    """A budget option: a finite number >= 0 (no `nan`, `inf` or negative), refused at once."""

    name = "budget"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        try:
            return check_budget(number)
        except InvalidSelectionError as error:
            self.fail(str(error), param, ctx)


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses `nan` and `inf`: its range checks let `nan` through
    (every comparison with nan is false)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


BUDGET = BudgetType()
POSITIVE = click.IntRange(min=1)
# `glaze launcher` and the launcher `glaze serve` starts: how many forked runs at once.
MAX_RUNS = click.option(
    "--max-runs", type=POSITIVE, default=4, show_default=True, help="Forked runs at once."
)


def _store(ctx: click.Context) -> Store:
    """The command's one store: opened on first use, disposed when the command ends, error or
    not (a pooled Postgres connection must not outlive the command)."""
    root = ctx.find_root()
    store = root.meta.get("glaze.store")
    if store is None:
        try:
            store = Store(root.obj.get("database_url"))
        except ModuleNotFoundError as error:  # mysql://, or a driver not installed
            raise ConfigError(
                f"the database URL needs a driver that is not installed ({error.name}): "
                "Glaze runs on postgresql:// and sqlite:///"
            ) from error
        except OSError as error:  # the SQLite file's folder cannot be made
            from glaze_pipeline.core.settings import database_url

            where = hide_password(database_url(root.obj.get("database_url")))
            raise ServiceUnavailableError(
                f"cannot open the database at {where}: {error.strerror or error}"
            ) from error
        root.meta["glaze.store"] = store
        root.call_on_close(store.dispose)
    return store


EPILOG = """\b
Exit codes:
  0  done
  1  internal error (a bug: run with --debug and report the traceback)
  2  bad input, or a service (database, Redis, Dagster) that cannot be reached
"""


@click.group(epilog=EPILOG)
@click.option(
    "--database-url",
    envvar="GLAZE_DATABASE_URL",
    default=None,
    help="App database (default: SQLite file .glaze/glaze.db).",
)
@click.option(
    "--debug",
    is_flag=True,
    envvar="GLAZE_DEBUG",
    help="Show the traceback of an error (also GLAZE_DEBUG=1).",
)
@click.pass_context
def cli(ctx: click.Context, database_url: str | None, debug: bool) -> None:
    """Glaze pipeline: entity-first enrichment of lead tables, on Dagster."""
    ctx.ensure_object(dict)
    ctx.obj["database_url"] = database_url
    ctx.obj["debug"] = debug


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
@click.option("--rows", type=POSITIVE, default=None, help="Generate a table with this many rows.")
@click.option(
    "--unique-companies", type=POSITIVE, default=None, help="Companies in the generated table."
)
@click.option("--unique-people", type=POSITIVE, default=None, help="People (default: one per row).")
@click.pass_context
def seed(
    ctx: click.Context, rows: int | None, unique_companies: int | None, unique_people: int | None
) -> None:
    """Seed the Leads table of seed 001 (10 rows, 8 columns), or a generated table."""
    from glaze_pipeline.core.seed import seed_generated, seed_leads

    if rows is None and (unique_companies or unique_people):
        raise InvalidSelectionError("--unique-companies and --unique-people need --rows")
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
@click.option(
    "--encoding",
    default=None,
    help="The file's encoding when it has no BOM (default UTF-8), e.g. cp1252 or latin-1.",
)
@click.option(
    "--rename-duplicates",
    is_flag=True,
    help="Number blank or clashing headers (name, name_2, column_3) instead of refusing them.",
)
@click.option(
    "--field",
    "field_options",
    multiple=True,
    metavar="KEY=FIELD",
    help="Set a column's field (e.g. org=company.name) instead of inferring it. Repeatable.",
)
@click.pass_context
def import_csv(
    ctx: click.Context,
    path: Path,
    name: str | None,
    encoding: str | None,
    rename_duplicates: bool,
    field_options: tuple[str, ...],
) -> None:
    """Import a CSV file (header row = columns) as a new table, all or nothing."""
    from glaze_pipeline.core.importer import import_csv as import_file

    fields: dict[str, str] = {}
    for option in field_options:
        key, sep, field = option.partition("=")
        if not sep or not key.strip() or not field.strip():
            raise click.BadParameter(f"{option!r} is not KEY=FIELD", param_hint="--field")
        if key.strip() in fields:
            raise click.BadParameter(f"{key.strip()!r} is given twice", param_hint="--field")
        fields[key.strip()] = field.strip()
    store = _store(ctx)
    store.upgrade()
    with console.status(f"importing {path}..."):
        result = import_file(
            store,
            path,
            name=name,
            encoding=encoding,
            rename_duplicates=rename_duplicates,
            fields=fields,
        )
    for renamed in result.renamed:
        console.print(
            f"renamed header {renamed.header!r} (column {renamed.column}) to key {renamed.key!r}",
            markup=False,
        )
    console.print(f"imported {result.rows:,} rows from {path} ({result.encoding})", markup=False)
    _print_table_ids(result.table.id, store)


@cli.command()
@click.pass_context
def tables(ctx: click.Context) -> None:
    """List tables."""
    store = _store(ctx)
    grid = Table("id", "name", "rows")
    for table_id, name, count in store.list_tables():
        grid.add_row(Text(table_id), Text(display_text(name)), str(count))
    console.print(grid)


@cli.command()
@click.argument("table_id")
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=50, show_default=True)
@click.option("--meta/--no-meta", default=False, help="Show each cell's status and source.")
@click.pass_context
def show(ctx: click.Context, table_id: str, limit: int, meta: bool) -> None:
    """Print a table as a terminal table."""
    console.print(render_table(_store(ctx), table_id, limit=limit, with_meta=meta))


# How much of a cell `show` prints: a table is for looking at, not for reading a 50 MB cell.
DISPLAY_CHARS = 80
LINE_BREAK = "\u23ce"  # ⏎
# Bidi overrides and isolates: they would reorder what follows them on the terminal.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def display_text(value: Any, limit: int = DISPLAY_CHARS) -> str:
    """A value as one line of at most `limit` characters, for a terminal table.

    Longer values end in an ellipsis; line breaks show as ⏎ and other control characters
    (escape sequences, bidi overrides) as spaces. Only the first `limit` characters of a text
    are looked at, so a 50 MB cell costs what a short one does (laying out a huge cell on the
    terminal is what took `show` 10 minutes).
    """
    if value is None:
        return ""
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict | list):
        import json

        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = str(value)
    head = text[: limit + 1].replace("\r\n", "\n")
    shown = "".join(_display_char(char) for char in head)
    if len(text) > limit:
        shown = shown[: limit - 1] + "\u2026"  # …
    return shown


def _display_char(char: str) -> str:
    if char in "\n\r":
        return LINE_BREAK
    if char in _BIDI_CONTROLS or unicodedata.category(char) == "Cc":
        return " "
    return char


def render_table(store: Store, table_id: str, *, limit: int = 50, with_meta: bool = False) -> Table:
    """The first `limit` rows as a terminal table; every value is Text (never rich markup)
    cut to one line of DISPLAY_CHARS, with each cell's `[status:source]` when `with_meta`."""
    info = store.get_table(table_id)
    grid = Table(title=Text(f"{display_text(info.name)} ({info.id})"), show_lines=False)
    for column in info.columns:
        grid.add_column(Text(column.key), overflow="fold", max_width=40)
    grid.add_column("status")
    grid.add_column("conf")
    for row in store.rows_in_order(table_id, limit=limit):
        cells: list[Text] = []
        for column in info.columns:
            cell = Text(display_text(row.data.get(column.key)))
            cell_meta = row.meta.get(column.key)
            if with_meta and isinstance(cell_meta, dict):
                status = display_text(cell_meta.get("status"), 20)
                source = display_text(cell_meta.get("source"), 30) or "-"
                cell.append(f" [{status}:{source}]", style="dim")
                if cell_meta.get("error"):  # why it failed, was skipped or not found
                    cell.append(f" {display_text(cell_meta.get('error'), 60)}", style="dim")
            cells.append(cell)
        grid.add_row(*cells, Text(row.status), _row_confidence(row.meta))
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
            click.option(
                "--columns",
                "column_keys",
                multiple=True,
                help="Column keys or ids, repeated or comma-separated.",
            ),
            click.option("--rows", "row_ids", multiple=True, help="Row ids (default: all)."),
            click.option(
                "--budget", type=BUDGET, default=None, help="Max spend for the job (>= 0)."
            ),
            click.option(
                "--overwrite",
                is_flag=True,
                help="With --columns: also replace cells that hold a value (kept otherwise).",
            ),
        ]
    ):
        command = option(command)
    return command


def _selection(
    store: Store,
    table_id: str,
    column_keys: tuple[str, ...],
    row_ids: tuple[str, ...],
    overwrite: bool = False,
) -> dict[str, Any]:
    """Grid selection from keys or ids; no columns means every empty enrichable cell.

    Checked here, before any job or request exists, as the job would check it: the table,
    each column (and that it maps to a field) and each row id must exist, so a typo is one
    line now rather than a failed run.
    """
    from glaze_pipeline.core.engine import resolve_target
    from glaze_pipeline.core.models import Selection

    info = store.get_table(table_id)
    keys = {column.key for column in info.columns} | {column.id for column in info.columns}
    # "a,b" is two columns, unless a column's key holds the comma (a CSV header may).
    listed = [
        part.strip()
        for given in column_keys
        for part in ([given] if given in keys else given.split(","))
        if part.strip()
    ]
    column_ids = [_column_id(info, key) for key in listed]
    if not column_ids:
        if row_ids or overwrite:
            raise InvalidSelectionError(f"{'--rows' if row_ids else '--overwrite'} needs --columns")
        selection: dict[str, Any] = {"whole_table": True}
    else:
        selection = {"column_ids": column_ids, "row_ids": list(row_ids)}
        if overwrite:
            selection["overwrite"] = True
    resolve_target(store, table_id, Selection(**selection))
    if row_ids:
        store.check_rows(table_id, row_ids)
    return selection


@cli.command("set-field")
@click.argument("table_id")
@click.argument("column")
@click.argument("field")
@click.pass_context
def set_field(ctx: click.Context, table_id: str, column: str, field: str) -> None:
    """Say which field a COLUMN (key or id) means, e.g. `company.industry`; `-` to infer it from
    the key again. Inference is deliberately strict: an unknown key maps to no field."""
    store = _store(ctx)
    info = store.get_table(table_id)
    store.set_column_field(table_id, _column_id(info, column), None if field == "-" else field)
    _print_table_ids(table_id, store)


@cli.command("add-column")
@click.argument("table_id")
@click.argument("key")
@click.option("--label", default="", help="The column's label (default: its key).")
@click.option("--field", default=None, help="The catalogue field it means, e.g. company.industry.")
@click.option(
    "--prompt",
    default=None,
    help="An AI column's question over the entity, e.g. "
    "'Does {company} sell to enterprises? Answer yes or no.'",
)
@click.pass_context
def add_column(
    ctx: click.Context,
    table_id: str,
    key: str,
    label: str,
    field: str | None,
    prompt: str | None,
) -> None:
    """Add a column: an input, a catalogue field (--field) or an AI column (--prompt), which
    enrichment fills through the LLM, one call per unique company or person."""
    from glaze_pipeline.core.store import ColumnDef

    store = _store(ctx)
    store.add_column(table_id, ColumnDef(key, label, field=field, prompt=prompt))
    _print_table_ids(table_id, store)


@cli.command()
@selection_options
@click.option("--chunk-size", type=POSITIVE, default=500, show_default=True)
@click.option("--concurrency", type=POSITIVE, default=50, show_default=True)
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

    JobSettings(budget=budget, chunk_size=chunk_size, concurrency=concurrency)
    selection = _selection(_store(ctx), table_id, column_keys, row_ids, overwrite)
    _check_run_services()
    config = {
        "table_id": table_id,
        **selection,
        "budget": budget,
        "chunk_size": chunk_size,
        "concurrency": concurrency,
    }
    request = run_enrich_job(ctx.obj.get("database_url"), config, debug=ctx.obj["debug"])
    console.print(render_request(request))


@cli.command()
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
    selection = _selection(_store(ctx), table_id, column_keys, row_ids, overwrite)
    _check_run_services()
    config = {"table_id": table_id, **selection, "budget": budget, "kind": "estimate"}
    request = run_enrich_job(ctx.obj.get("database_url"), config, debug=ctx.obj["debug"])
    report = dict(request.estimate or {})
    if as_json:
        click.echo(json.dumps({"request_id": request.id, **report}, sort_keys=True))
        return
    console.print(render_estimate(request.id, report))


def render_estimate(request_id: str, report: Mapping[str, Any]) -> Group:
    """The estimate as a person reads it: totals, one line per provider, then the guidance."""
    totals = Table(title=f"estimate {request_id}", show_header=False)
    for label, key in (
        ("unique entities", "unique_entities"),
        ("cells", "cells"),
        ("cells without identifier", "cells_without_identifier"),
        ("cache hits", "cache_hits"),
        ("expected cost", "expected_cost"),
        ("~95 % of runs within", "expected_cost_range"),
        ("upper bound", "max_cost"),
        ("budget", "budget"),
        ("cells expected filled", "expected_cells_filled"),
        ("cells skipped: provider unavailable", "cells_provider_unavailable"),
    ):
        value = report.get(key)
        if isinstance(value, list) and len(value) == 2:  # a range
            value = f"{value[0]:,.2f} - {value[1]:,.2f}"
        if value is not None:
            totals.add_row(Text(label), Text(display_text(value)))
    providers = Table(
        "provider",
        "status",
        "reach",
        "expected calls",
        "expected cost",
        "max calls",
        "max cost",
        "basis",
    )
    for name, row in (report.get("providers") or {}).items():
        bases = row.get("by_key_kind") or {}
        basis = "; ".join(f"by {kind}: {b['basis']}" for kind, b in sorted(bases.items()))
        status = row["status"] if not row.get("reason") else f"{row['status']}: {row['reason']}"
        providers.add_row(
            Text(name),
            Text(status, style="red" if row["status"] != "ok" else ""),
            Text(f"{row.get('reach', 0):.0%}"),
            Text(f"{row['expected_calls']:,.1f}"),
            Text(f"{row['expected_cost']:,.2f}"),
            Text(f"{row['max_calls']:,}"),
            Text(f"{row['max_cost']:,.6g}"),
            Text(basis),
        )
    parts: list[Any] = [totals, providers]
    if report.get("guidance"):
        parts.append(Text(str(report["guidance"])))
    at_budget = (report.get("budget_guidance") or {}).get("at_budget")
    if at_budget:
        parts.append(
            Text(
                f"with budget {at_budget['budget']:,.6g}: ~{at_budget['cells_filled']:,} cells "
                f"(~{at_budget['share_of_fillable']:.0%} of what the job can fill), "
                f"expected cost {at_budget['expected_cost']:,.2f}"
            )
        )
    return Group(*parts)


@cli.command()
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

    store = _store(ctx)
    selection = _selection(store, table_id, column_keys, row_ids, overwrite)
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
    database_url: str | None,
    op_config: dict[str, Any],
    *,
    log_level: str = "INFO",
    debug: bool = False,
) -> Any:
    """Execute enrich_table in process with this op config; returns the request record.

    At INFO the job's own progress lines show (entities found, each chunk, rows applied), one
    line each; a failed run raises `run_failure(result)` (one line). With `debug`, Dagster's
    own console log, stack traces included.
    """
    from glaze_pipeline.definitions import build_definitions

    job = build_definitions(database_url).get_job_def("enrich_table")
    if not debug:
        job = job.with_logger_defs({"console": one_line_run_logger()})
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
            raise run_failure(result)
        plan = result.output_for_node("detect_entities", "plan")
    store = Store(database_url)
    try:
        return store.get_request(plan.request_id)
    finally:
        store.dispose()


class _OneLinePerEvent(logging.Filter):
    """Each run event in one line, and no errors: Dagster logs a failed step, each step it then
    skips and the failed run at ERROR, stack traces included; the CLI reports the failure
    itself, in one line (`run_failure`). `--debug` shows Dagster's own log instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return False
        lines = record.getMessage().strip().splitlines()
        record.msg, record.args = (lines[0] if lines else ""), ()
        return True


def one_line_run_logger() -> Any:
    """The `console` logger of a run the CLI starts: Dagster's format, one line per event."""
    from dagster import Field, LoggerDefinition

    def make(context: Any) -> logging.Logger:
        run_log = logging.Logger("dagster", level=context.logger_config["log_level"])
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s - dagster - %(levelname)s - %(message)s", "%Y-%m-%d %H:%M:%S %z"
            )
        )
        handler.addFilter(_OneLinePerEvent())
        run_log.addHandler(handler)
        return run_log

    return LoggerDefinition(
        make,
        config_schema={"log_level": Field(str, is_required=False, default_value="INFO")},
        description="One line per event on stderr; failures are reported by the CLI.",
    )


class RunCrashed(Exception):
    """The enrich_table run failed on something that is not the caller's input (most likely a
    bug): `main` reports it as an internal error under the original exception's name."""

    def __init__(self, type_name: str, message: str, run_id: str) -> None:
        super().__init__(f"{message} (run {run_id})")
        self.type_name = type_name


# What the ops raise when a service they need goes away: Dagster only keeps the class name.
_SERVICE_ERROR_NAMES = frozenset(
    {"OperationalError", "InterfaceError", "ConnectionError", "TimeoutError", "ConnectError"}
)


def run_failure(result: Any) -> Exception:
    """The error to report for a failed in-process run: its first failed step's own message.

    Dagster wraps what a step raised (a `Failure`, retries exhausted, a step execution error);
    the person at the terminal wants the innermost message in one line, not 30 stack frames.
    A `Failure` is how the ops report a GlazeError (bad input, a cancel): a GlazeError here; an
    error the engine names (a GlazeError subclass) keeps its class; a lost service is a
    ServiceUnavailableError; anything else is RunCrashed (an internal error).
    """
    run = f"run {result.run_id}"
    failure = next((e for e in result.all_events if e.is_step_failure), None)
    data = failure.step_failure_data if failure is not None else None
    if data is None:
        return GlazeError(f"the enrich_table {run} failed")
    if data.user_failure_data is not None and data.user_failure_data.description:
        return GlazeError(f"{data.user_failure_data.description} ({run})")
    error = data.error
    while error is not None and error.cause is not None:
        error = error.cause  # innermost: what our code raised, under Dagster's wrappers
    if error is None:
        return GlazeError(f"the enrich_table {run} failed")
    message = error.message.strip()
    prefix = f"{error.cls_name}: "
    message = message[message.index(prefix) + len(prefix) :] if prefix in message else message
    glaze_class = _glaze_error_classes().get(error.cls_name or "")
    if glaze_class is not None:
        try:
            return glaze_class(f"{message} ({run})")
        except TypeError:  # a subclass that takes more than a message
            return GlazeError(f"{error.cls_name}: {message} ({run})")
    if error.cls_name in _SERVICE_ERROR_NAMES:
        return ServiceUnavailableError(
            f"the enrich_table {run} lost a service: {error.cls_name}: {message}"
        )
    return RunCrashed(error.cls_name or "Exception", message, result.run_id)


def _glaze_error_classes() -> dict[str, type[GlazeError]]:
    """GlazeError and every subclass loaded, by name."""
    found: dict[str, type[GlazeError]] = {}
    pending: list[type[GlazeError]] = [GlazeError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.__name__, cls)
        pending.extend(cls.__subclasses__())
    return found


def render_request(request: Any) -> Table:
    from glaze_pipeline.core.models import AI_REQUEST_KINDS

    grid = Table(title=f"request {request.id}", show_header=False)
    grid.add_column("field")
    grid.add_column("value")
    if request.kind in AI_REQUEST_KINDS:  # steps and LLM calls, not cells and entities
        for name, value in (
            ("status", request.status),
            ("table", request.table_id),
            ("kind", request.kind),
            ("run", request.run_id or "-"),
            ("progress", f"{request.entities_done}/{request.entities} steps"),
            ("LLM calls", str((request.provider_calls or {}).get("llm", 0))),
            ("cost", f"{request.cost:g}"),
            ("retry of", request.retry_of or "-"),
            ("error", request.error or "-"),
            ("proposal", f"glaze ai show {request.id}"),
        ):
            grid.add_row(name, Text(str(value)))
        return grid
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
        ("not sent", str(request.calls_not_sent or "-")),
        ("providers unavailable", str(request.unavailable_providers or "-")),
        (
            "cost",
            f"{request.cost:g}"
            + (f" of budget {request.budget:g}" if request.budget is not None else ""),
        ),
        ("error", request.error or "-"),
    ):
        grid.add_row(name, Text(str(value)))
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
@MAX_RUNS
@click.option(
    "--poll",
    type=FiniteFloatRange(min=0, min_open=True),
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

    from glaze_pipeline.launcher import check_database, fork_launch, graphql_launch, run_launcher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for chatty in ("alembic", "httpx"):  # Dagster's instance migrations; each GraphQL POST
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # At start, whatever it needs must answer (one line and exit 2 if not); once running, an
    # outage is logged and waited out.
    store = _store(ctx)
    check_database(store)
    if graphql_url:
        starter = graphql_launch(graphql_url)  # Dagster's runs use Dagster's environment
        how = f"via {graphql_url}"
    else:
        _check_run_services()  # the forked runs use ours
        if not os.environ.get("DAGSTER_HOME"):  # the children open DagsterInstance.get()
            os.environ["DAGSTER_HOME"] = str(default_dagster_home())
        starter = fork_launch(ctx.obj.get("database_url"), max_runs=max_runs)
        how = (
            f"in forked workers (at most {max_runs} at once), "
            f"runs recorded in {os.environ['DAGSTER_HOME']}"
        )
    console.print(f"launching queued requests from {_safe_url(store)} {how}")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        run_launcher(store, starter, stop, poll)
    finally:
        starter.close()


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--no-launcher",
    is_flag=True,
    help="Serve the API only (the queue sensor or a separate `glaze launcher` runs the jobs).",
)
@MAX_RUNS
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, no_launcher: bool, max_runs: int) -> None:
    """Serve the HTTP API and the grid page, with the push launcher beside it.

    Without an API key (GLAZE_API_KEYS or GLAZE_API_KEYS_FILE) it is open and listens on
    loopback only; with keys it prints a one-time sign-in link for the page.
    """
    from glaze_pipeline.api.server import ServeOptions
    from glaze_pipeline.api.server import serve as run_server

    database_url = ctx.obj.get("database_url")
    if not no_launcher:
        _check_run_services()
        if not os.environ.get("DAGSTER_HOME"):  # the launcher's runs open DagsterInstance.get()
            os.environ["DAGSTER_HOME"] = str(default_dagster_home())
    options = ServeOptions(
        host=host,
        port=port,
        launcher=not no_launcher,
        max_runs=max_runs,
        database_url=database_url,
    )
    # soft_wrap: the sign-in link must stay one line, whatever the terminal's width
    run_server(options, announce=lambda line: console.print(line, soft_wrap=True, markup=False))


def _listen(host: str, port: int) -> Any:
    """A socket bound to host:port, before the server says where it listens: a port in use is
    one line (ConfigError), not uvicorn's exit 3."""
    import socket

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return listener


@cli.command("mock-providers")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True)
@click.option("--config", "config_file", default=None, help="Mock config (YAML or JSON).")
def mock_providers(host: str, port: int, config_file: str | None) -> None:
    """Serve the mock provider APIs (real HTTP on loopback) for development and benchmarks."""
    import yaml

    from glaze_pipeline.testing.mock_server import load_mock_config, serve

    try:
        config = load_mock_config(config_file)
    except (OSError, ValueError, yaml.YAMLError) as error:  # missing, bad JSON/YAML or fields
        raise ConfigError(f"cannot use mock config {config_file}: {error}") from error
    listener = _listen(host, port)
    console.print(f"mock providers on http://{host}:{port} (stats: /_stats, reset: POST /_reset)")
    try:
        serve(host, port, config, sock=listener)
    finally:
        listener.close()


@cli.command("mock-llm")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8766, show_default=True)
@click.option("--api-key", default=None, help="Answer 401 unless this bearer key is sent.")
def mock_llm(host: str, port: int, api_key: str | None) -> None:
    """Serve a local OpenAI-compatible LLM stand-in with deterministic answers (loopback)."""
    from glaze_pipeline.testing.mock_llm import serve

    listener = _listen(host, port)
    console.print(
        f"mock LLM on http://{host}:{port}/v1 (set GLAZE_LLM_BASE_URL to it; stats: /_stats)"
    )
    try:
        serve(host, port, api_key=api_key, sock=listener)
    finally:
        listener.close()


@cli.command()
@click.option(
    "--config", "config_file", default=None, help="Providers YAML (else GLAZE_PROVIDERS_FILE)."
)
@click.option(
    "--no-probe",
    is_flag=True,
    help="Skip the vendors' health probes (check configuration, keys and circuits only).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, for scripts.")
def providers(config_file: str | None, no_probe: bool, as_json: bool) -> None:
    """List the providers of the waterfall: entity, fields, cost per call, health, and whether
    each can be used now (the preflight a job runs before it spends)."""
    from glaze_pipeline.core.preflight import check_providers
    from glaze_pipeline.core.providers.registry import describe_providers, load_providers

    loaded = load_providers(config_file)
    described = describe_providers(loaded, check_providers(loaded, probe=not no_probe))
    if as_json:
        click.echo(json.dumps([d.as_dict() for d in described], indent=2))
        return
    grid = Table(
        "provider",
        "entity",
        "kind",
        "cost/call",
        "charges misses",
        "confidence",
        "status",
        "health",
        "fields",
    )
    for description in described:
        row = description.as_dict()
        status = str(row["status"])
        if row["reason"]:
            status = f"{status}: {row['reason']}"
        grid.add_row(
            row["name"],
            row["entity_type"],
            row["kind"],
            f"{row['cost_per_call']:g}",
            "yes" if row["charges_misses"] else "no",
            f"{row['confidence']:g}",
            status,
            str(row["health"]),
            ", ".join(row["fields"]),
        )
    console.print(grid)


@cli.group()
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
    default="S1,S2,S3,S4,S5,S6",
    show_default=True,
    help="Comma-separated: S1..S6 (see bench_results/results.md).",
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
        _print_error(problem)
    if problems:
        sys.exit(EXIT_INTERNAL)


@cli.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Set up, seed the Leads table, enrich it, and show it before and after."""
    from glaze_pipeline.core.seed import LEADS_ENRICH_KEYS, leads_column_id, seed_leads

    store = _store(ctx)
    console.print(Text("1. database", style="bold"), _safe_url(store))
    store.upgrade()
    _check_run_services()
    table = seed_leads(store)
    console.print(Text("2. seeded the Leads table (seed 001): before", style="bold"))
    console.print(render_table(store, table.id))
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
    console.print(render_table(store, table.id))
    console.print(
        "Katherine Johnson's row has no website, email or company: its cells end "
        "'failed: no identifier' rather than being dropped."
    )


def _print_table_ids(table_id: str, store: Store) -> None:
    info = store.get_table(table_id)
    console.print(Text.assemble("table ", (display_text(info.name), "bold"), f": {info.id}"))
    grid = Table("column key", "column id", "fills from")
    for column in info.columns:
        spec = column.spec()
        if column.prompt is not None:
            source = f"AI ({spec.field.entity_type.value}): {column.prompt}" if spec.field else "-"
        else:
            source = str(spec.field) if spec.field else "-"
        grid.add_row(column.key, column.id, Text(display_text(source)))
    console.print(grid)


def _safe_url(store: Store) -> str:
    from sqlalchemy.engine import make_url

    return make_url(store.url).render_as_string(hide_password=True)


def _check_run_services() -> None:
    """What a run needs from its environment, checked before it starts, so that a mistake is one
    line now rather than a failed run: the providers file loads, a configured Redis answers."""
    from glaze_pipeline.core.providers.registry import load_providers

    load_providers(None)  # GLAZE_PROVIDERS_FILE, else the bundled providers
    _check_redis()


def _check_redis() -> None:
    """A configured Redis (GLAZE_REDIS_URL) must answer before a job starts.

    The engine would run on without it (every Redis use fails open), but without the shared
    cache and single-flight that keep concurrent runs from buying the same answer twice: whoever
    configured Redis is told so at once, in one line, rather than silently served less. An
    outage during a run is still waited out.
    """
    from glaze_pipeline.core.settings import redis_url

    url = redis_url()
    if not url:
        return
    from glaze_pipeline.core.answers import redis_client

    try:
        client = redis_client(url)
    except ValueError as error:  # not a redis:// URL
        raise ConfigError(f"GLAZE_REDIS_URL {hide_password(url)} is not usable: {error}") from None
    try:
        client.ping()
    finally:
        client.close()


def hide_password(url: str) -> str:
    """`url` with its password (if any) shown as ***: what an error message may print."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return "(an unparsable URL)"
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _register_ai() -> None:
    from glaze_pipeline.ai_cli import ai

    cli.add_command(ai)


_register_ai()


def main(argv: Sequence[str] | None = None) -> None:
    """The `glaze` entry point: the one place where an error becomes a line and an exit code.

    0 done; 2 bad input or a service that cannot be reached (a GlazeError, or an
    infrastructure error `explain` names as one), and click's own usage errors; 1 anything
    else, which is a bug. Either is one `error: ...` line on stderr; `--debug` (GLAZE_DEBUG=1)
    prints the traceback first.
    """
    state: dict[str, Any] = {}
    try:
        cli.main(args=argv, prog_name="glaze", obj=state, standalone_mode=True)
    except Exception as error:
        debug = bool(state.get("debug")) or _debug_from_env()
        if debug:
            import traceback

            traceback.print_exception(error)
        explained = explain(error, state.get("database_url"))
        if explained is not None:
            _print_error(str(explained))
            sys.exit(EXIT_INPUT)
        name = error.type_name if isinstance(error, RunCrashed) else type(error).__name__
        hint = "" if debug else "; run with --debug for the traceback"
        _print_error(f"internal error ({name}: {one_line(str(error), limit=300)}){hint}")
        sys.exit(EXIT_INTERNAL)


def _debug_from_env() -> bool:
    return os.environ.get("GLAZE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _print_error(message: str) -> None:
    from glaze_pipeline.core.redact import redact

    click.echo(f"error: {one_line(redact(message))}", err=True)


def one_line(text: str, *, limit: int = 1000) -> str:
    """A message as one line: its lines joined (a YAML error's caret lines dropped), runs of
    spaces collapsed, at most `limit` characters."""
    joined = ""
    for line in text.splitlines():
        line = " ".join(line.split())
        if not line or set(line) <= {"^", "~"}:
            continue
        joined = f"{joined}{' ' if not joined or joined.endswith(':') else '; '}{line}"
    joined = joined.strip().rstrip(":")
    return joined if len(joined) <= limit else joined[: limit - 1] + "\u2026"


def explain(error: BaseException, database_url: str | None = None) -> GlazeError | None:
    """The GlazeError to report for `error`, or None when it is a bug.

    Infrastructure errors are translated here, once, for every command: the database, Redis or
    Dagster that cannot be reached (ServiceUnavailableError, naming the service and its URL with
    the password hidden), a database without the schema, an unusable URL or run config. Looks
    through the explicit causes (`raise ... from`): a library often wraps the error that says
    what happened. Not through the context: a bug raised while handling a GlazeError is a bug.
    """
    seen: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and len(seen) < 10 and all(cause is not s for s in seen):
        seen.append(cause)
        if isinstance(cause, GlazeError):
            return cause
        translated = _translate(cause, database_url)
        if translated is not None:
            return translated
        cause = cause.__cause__
    return None


def _loaded(module: str) -> Any:
    """A module if this process imported it: an error cannot come from a module never loaded
    (and the error path must not pay for importing dagster)."""
    return sys.modules.get(module)


def _translate(error: BaseException, database_url: str | None) -> GlazeError | None:
    sa_exc = _loaded("sqlalchemy.exc")
    if sa_exc is not None:
        if isinstance(error, sa_exc.ArgumentError) and "parse" in str(error).lower():
            return ConfigError(
                "the database URL cannot be parsed: give one like "
                "postgresql://user@host:5432/db or sqlite:///path/to/glaze.db"
            )
        if isinstance(error, sa_exc.NoSuchModuleError):
            return ConfigError(f"the database URL names no supported database: {error}")
        if isinstance(error, sa_exc.DBAPIError):
            return _database_error(error, error.orig, database_url)
    psycopg = _loaded("psycopg")
    if psycopg is not None and isinstance(error, psycopg.OperationalError):
        return _database_error(error, error, database_url)  # the launcher's LISTEN connection
    redis_exceptions = _loaded("redis.exceptions")
    if redis_exceptions is not None and isinstance(
        error, redis_exceptions.ConnectionError | redis_exceptions.TimeoutError
    ):
        from glaze_pipeline.core.settings import redis_url

        where = hide_password(redis_url() or "")
        return ServiceUnavailableError(f"cannot reach Redis at {where}: {_reason(error)}")
    graphql = _loaded("glaze_pipeline.graphql_client")
    if graphql is not None and isinstance(error, graphql.GraphQLTransportError):
        return ServiceUnavailableError(f"Dagster's GraphQL API: {error}")
    httpx = _loaded("httpx")
    if httpx is not None and isinstance(error, httpx.TransportError):
        try:
            where = hide_password(str(error.request.url))
        except RuntimeError:  # no request attached
            where = "an HTTP service"
        return ServiceUnavailableError(f"cannot reach {where}: {_reason(error)}")
    dagster_errors = _loaded("dagster._core.errors")
    if dagster_errors is not None and isinstance(error, dagster_errors.DagsterInvalidConfigError):
        problems = "; ".join(e.message for e in error.errors) or str(error)
        return InputError(f"invalid run config: {problems}")
    return None


def _database_error(
    error: BaseException, driver_error: BaseException | None, database_url: str | None
) -> GlazeError | None:
    """A database error that is the environment's, not the engine's: the server down or
    refusing us, or a database without (the current) schema. Anything else: None (a bug)."""
    from glaze_pipeline.core.settings import database_url as resolve_database_url

    where = hide_password(resolve_database_url(database_url))
    text = str(driver_error or error).lower()
    if "no such table" in text or ("relation" in text and "does not exist" in text):
        return ServiceUnavailableError(
            f"the database at {where} has no Glaze schema: run `glaze db upgrade`"
        )
    if "no such column" in text or ("column" in text and "does not exist" in text):
        return ServiceUnavailableError(
            f"the database at {where} is not at the current schema: run `glaze db upgrade`"
        )
    sa_exc = _loaded("sqlalchemy.exc")
    psycopg = _loaded("psycopg")
    connection_errors: tuple[type[BaseException], ...] = ()
    if sa_exc is not None:
        connection_errors += (sa_exc.OperationalError, sa_exc.InterfaceError)
    if psycopg is not None:
        connection_errors += (psycopg.OperationalError, psycopg.InterfaceError)
    if isinstance(error, connection_errors) or getattr(error, "connection_invalidated", False):
        return ServiceUnavailableError(
            f"cannot reach the database at {where}: {_reason(driver_error or error)}"
        )
    return None


_REASONS = (
    ("connection refused", "connection refused"),
    ("timed out", "timed out"),
    ("timeout expired", "timed out"),
    ("could not translate host name", "unknown host"),
    ("name or service not known", "unknown host"),
    ("nodename nor servname", "unknown host"),
    ("temporary failure in name resolution", "unknown host"),
    ("unable to open database file", "unable to open the database file"),
    ("database is locked", "the database is locked"),
)


def _reason(error: BaseException) -> str:
    """Why a connection failed, in a few words: the driver's message is a paragraph."""
    text = str(error)
    lowered = text.lower()
    for needle, reason in _REASONS:
        if needle in lowered:
            return reason
    if "FATAL:" in text:  # Postgres refused us: no such database or role, bad password...
        text = text.split("FATAL:", 1)[1]
    return one_line(text, limit=200) or type(error).__name__


if __name__ == "__main__":
    main()
