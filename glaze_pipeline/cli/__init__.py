"""The `glaze` command: set up the database, seed, import, enrich, show, demo.

Enrichment always runs as the Dagster job `enrich_table` (in process, `glaze_pipeline.runner`),
so a run started here keeps its logs and asset lineage in the Dagster instance like any other.

The commands live by what they act on: data.py (the schema, tables, columns), requests.py
(running, queueing, cancelling and showing requests), services.py (the launcher, the API, the
stand-ins, the providers' preflight), bench.py and ai.py (the `bench` and `ai` groups); what
they print is built in rendering.py.

Errors: `main()` is the one place where an exception becomes an exit code (errors.py). A
GlazeError (bad input, a service that cannot be reached) is one `error: ...` line on stderr and
exit 2; so is an infrastructure error it can name (the database, Redis or Dagster down),
translated first; anything else is a bug: one line naming it, exit 1. `--debug` (or
GLAZE_DEBUG=1) adds the traceback. click's own usage errors keep click's message and exit 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from glaze_pipeline.cli import ai, bench, data, requests, services
from glaze_pipeline.cli.errors import debug_from_env, exit_on_error

__all__ = ["cli", "main"]

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


for command in (
    data.db,
    data.seed,
    data.import_csv,
    data.tables,
    data.show,
    data.set_field,
    data.add_column,
    requests.enrich,
    requests.estimate,
    requests.enqueue,
    requests.cancel,
    requests.status,
    requests.demo,
    services.launcher,
    services.serve,
    services.worker,
    services.mock_providers,
    services.mock_llm,
    services.providers,
    bench.bench,
    ai.ai,
):
    cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> None:
    """The `glaze` entry point: the one place where an error becomes a line and an exit code.

    0 done; 2 bad input or a service that cannot be reached (a GlazeError, or an
    infrastructure error `errors.explain` names as one), and click's own usage errors; 1
    anything else, which is a bug. Either is one `error: ...` line on stderr; `--debug`
    (GLAZE_DEBUG=1) prints the traceback first.
    """
    state: dict[str, Any] = {}
    try:
        cli.main(args=argv, prog_name="glaze", obj=state, standalone_mode=True)
    except Exception as error:
        exit_on_error(
            error,
            debug=bool(state.get("debug")) or debug_from_env(),
            database_url=state.get("database_url"),
        )
