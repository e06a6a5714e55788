"""What every command shares: the console it prints to, the command's one store, and the
checks a run's environment must pass before a run starts."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from glaze_pipeline.cli.errors import hide_password
from glaze_pipeline.core.errors import ConfigError, ServiceUnavailableError
from glaze_pipeline.core.store import Store

# Wide when piped (CI logs, files): a lead table does not fit in 80 columns. No markup: what
# this prints is mostly user data (a cell holding `[red]` or `[/b]` must print as typed); the
# few styled words are Text objects.
console = Console(width=None if sys.stdout.isatty() else 220, markup=False)


def command_store(ctx: click.Context) -> Store:
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


def safe_url(store: Store) -> str:
    from sqlalchemy.engine import make_url

    return make_url(store.url).render_as_string(hide_password=True)


def check_run_services() -> None:
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
