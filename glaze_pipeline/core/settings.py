"""Where the engine's services live. Read at call time, never at import time."""

from __future__ import annotations

import math
import os
from pathlib import Path

from glaze_pipeline.core.errors import ConfigError

DATABASE_URL_ENV = "GLAZE_DATABASE_URL"
REDIS_URL_ENV = "GLAZE_REDIS_URL"
HOME_ENV = "GLAZE_HOME"
PRE_ENRICH_BUDGET_ENV = "GLAZE_PRE_ENRICH_BUDGET"
DEFAULT_PRE_ENRICH_BUDGET = 100.0
ALLOW_PRIVATE_NETWORKS_ENV = "GLAZE_ALLOW_PRIVATE_NETWORKS"
MULTIPROCESS_ROWS_ENV = "GLAZE_MULTIPROCESS_ROWS"
# An enrich run that holds this many rows or more is launched on every core (the multiprocess
# executor): below it, one process is as fast (see `multiprocess_rows`).
DEFAULT_MULTIPROCESS_ROWS = 50_000
# How a job runs unless told otherwise: core/engine.JobSettings' defaults, which the run config
# and the benchmark read; here, apart from the engine, so the CLI can show them without loading it.
DEFAULT_CHUNK_SIZE = 2000  # min entities per enrich step (each step costs ~0.3 s of start and tail)
DEFAULT_CONCURRENCY = 50  # concurrent entity lookups per step
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def glaze_home() -> Path:
    """The folder for the embedded default's files (`.glaze/` under the working directory)."""
    return Path(os.environ.get(HOME_ENV) or ".glaze").resolve()


def database_url(explicit: str | None = None) -> str:
    """The app database: explicit, else `GLAZE_DATABASE_URL`, else an SQLite file in glaze_home."""
    url = explicit or os.environ.get(DATABASE_URL_ENV)
    if url:
        return url
    return f"sqlite:///{glaze_home() / 'glaze.db'}"


def redis_url(explicit: str | None = None) -> str | None:
    """The shared cache/lock/progress Redis; None (optional) for the embedded default."""
    return explicit or os.environ.get(REDIS_URL_ENV) or None


def pre_enrich_budget(explicit: float | None = None) -> float:
    """The cap of one scheduled pre-enrichment: explicit, else `GLAZE_PRE_ENRICH_BUDGET`, else 100.

    A value that is not a non-negative number raises, naming the variable: a typo must not turn
    into an unlimited (or zero) budget silently.
    """
    value = non_negative_setting(explicit, PRE_ENRICH_BUDGET_ENV, label="the pre-enrichment budget")
    return DEFAULT_PRE_ENRICH_BUDGET if value is None else value


def multiprocess_rows(explicit: int | None = None) -> int | None:
    """From how many held rows a launched enrich run puts its steps in processes of their own,
    one per core: `explicit`, else `GLAZE_MULTIPROCESS_ROWS`, else 50,000. None (never) for 0,
    or on a machine with one core.

    Measured with `glaze bench run --scenarios S3 --executors in_process,multiprocess`: in one
    process a large job is bound by the worker's CPU (~0.5 ms a provider call, ~2,000 calls a
    second at the most), on two it is not; below the threshold the processes' start (~1.7 s a
    run and ~0.5 s a step) costs more than the second core gives back. Anything but a whole
    number >= 0 raises, naming the variable.
    """
    value = non_negative_setting(explicit, MULTIPROCESS_ROWS_ENV, label="multiprocess rows")
    rows = DEFAULT_MULTIPROCESS_ROWS if value is None else value
    if rows != int(rows):
        source = MULTIPROCESS_ROWS_ENV if explicit is None else "multiprocess rows"
        raise ValueError(f"{source} must be a whole number of rows, not {rows!r}")
    if rows == 0 or (os.cpu_count() or 1) < 2:
        return None
    return int(rows)


def non_negative_setting(
    explicit: float | None, env_var: str, *, label: str, unit: str = ""
) -> float | None:
    """`explicit` (named `label` in errors), else `env_var` read now, else None.

    Anything but a finite number >= 0 raises a ValueError naming where it came from, `unit`
    (" of seconds") saying what kind of number was meant.
    """
    if explicit is not None:
        value, source = float(explicit), label
    else:
        raw = os.environ.get(env_var, "").strip()
        if not raw:
            return None
        source = env_var
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{source} must be a number{unit}, not {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{source} must be a non-negative number{unit}, not {value!r}")
    return value


def allow_private_networks() -> bool:
    """Whether providers that fetch user-given hosts may reach loopback and private addresses.

    Off unless `GLAZE_ALLOW_PRIVATE_NETWORKS` says 1/true/yes/on: a development setting (the
    mock server, tests), never for a server that enriches other people's data. Any other
    value raises, naming the variable: a typo must not open the internal network silently.
    """
    raw = os.environ.get(ALLOW_PRIVATE_NETWORKS_ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(
        f"{ALLOW_PRIVATE_NETWORKS_ENV} must be 1/true/yes/on or 0/false/no/off, not {raw!r}"
    )


# The Celery broker `glaze worker` and the `celery` executor use unless told (RabbitMQ here).
CELERY_BROKER_ENV = "GLAZE_CELERY_BROKER"
DEFAULT_CELERY_BROKER = "pyamqp://guest:guest@127.0.0.1:5672//"
