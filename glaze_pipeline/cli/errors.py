"""How an error becomes one line and an exit code: the mapping `main` applies to every command.

A GlazeError (bad input, a service that cannot be reached) is one `error: ...` line on stderr
and exit 2; so is an infrastructure error `explain` can name (the database, Redis or Dagster
down), translated first; anything else is a bug: one line naming it, exit 1.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn, cast

import click

from glaze_pipeline.core.errors import (
    ConfigError,
    GlazeError,
    InputError,
    ServiceUnavailableError,
)

if TYPE_CHECKING:
    from glaze_pipeline.runner import RunCrashed

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT = 0, 1, 2


def exit_on_error(error: Exception, *, debug: bool, database_url: str | None) -> NoReturn:
    """Print `error` as one line (the traceback first with `debug`) and exit 2 or 1."""
    if debug:
        import traceback

        traceback.print_exception(error)
    explained = explain(error, database_url)
    if explained is not None:
        print_error(str(explained))
        sys.exit(EXIT_INPUT)
    name = type(error).__name__
    runner = _loaded("glaze_pipeline.runner")  # a crashed run names what the run raised
    if runner is not None and isinstance(error, runner.RunCrashed):
        name = cast("RunCrashed", error).type_name
    hint = "" if debug else "; run with --debug for the traceback"
    print_error(f"internal error ({name}: {one_line(str(error), limit=300)}){hint}")
    sys.exit(EXIT_INTERNAL)


def debug_from_env() -> bool:
    return os.environ.get("GLAZE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def print_error(message: str) -> None:
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
