"""Commands on the data itself: the schema, seeding and importing tables, showing them, and
saying what their columns mean (`db`, `seed`, `import-csv`, `tables`, `show`, `set-field`,
`add-column`)."""

from __future__ import annotations

from pathlib import Path

import click

from glaze_pipeline.cli.context import command_store, console, safe_url
from glaze_pipeline.cli.options import POSITIVE, column_id
from glaze_pipeline.cli.rendering import render_table, render_table_ids, render_tables
from glaze_pipeline.core.errors import InvalidSelectionError
from glaze_pipeline.core.store import Store


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Create or migrate the app database to the latest schema."""
    store = command_store(ctx)
    store.upgrade()
    console.print(f"database ready: {safe_url(store)}")


@click.command()
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
    store = command_store(ctx)
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
    print_table_ids(store, table.id)


@click.command("import-csv")
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
    store = command_store(ctx)
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
    print_table_ids(store, result.table.id)


@click.command()
@click.pass_context
def tables(ctx: click.Context) -> None:
    """List tables."""
    console.print(render_tables(command_store(ctx).list_tables()))


@click.command()
@click.argument("table_id")
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=50, show_default=True)
@click.option("--meta/--no-meta", default=False, help="Show each cell's status and source.")
@click.pass_context
def show(ctx: click.Context, table_id: str, limit: int, meta: bool) -> None:
    """Print a table as a terminal table."""
    store = command_store(ctx)
    info = store.get_table(table_id)
    console.print(render_table(info, store.rows_in_order(table_id, limit=limit), with_meta=meta))


@click.command("set-field")
@click.argument("table_id")
@click.argument("column")
@click.argument("field")
@click.pass_context
def set_field(ctx: click.Context, table_id: str, column: str, field: str) -> None:
    """Say which field a COLUMN (key or id) means, e.g. `company.industry`; `-` to infer it from
    the key again. Inference is deliberately strict: an unknown key maps to no field."""
    store = command_store(ctx)
    info = store.get_table(table_id)
    store.set_column_field(table_id, column_id(info, column), None if field == "-" else field)
    print_table_ids(store, table_id)


@click.command("add-column")
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

    store = command_store(ctx)
    store.add_column(table_id, ColumnDef(key, label, field=field, prompt=prompt))
    print_table_ids(store, table_id)


def print_table_ids(store: Store, table_id: str) -> None:
    """What a command that made or changed a table prints: its id and its columns' ids."""
    console.print(render_table_ids(store.get_table(table_id)))
