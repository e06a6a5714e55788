"""Where the engine's services live. Read at call time, never at import time."""

from __future__ import annotations

import os
from pathlib import Path

DATABASE_URL_ENV = "GLAZE_DATABASE_URL"
REDIS_URL_ENV = "GLAZE_REDIS_URL"
HOME_ENV = "GLAZE_HOME"


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
