"""`glaze serve`: the API and the page on uvicorn, with the push launcher beside it.

One command gives a working local system on the embedded SQLite default: the API writes
requests, and the launcher (a child process running `glaze launcher`, warm, forking one run per
request) runs them as Dagster runs. In production the API (`--no-launcher`), the launcher and
the Dagster daemon run as separate processes on Postgres.

The launcher is a process of its own, not a thread: it forks its runs, and forking a process
that serves HTTP on other threads could copy a lock some thread holds.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from glaze_pipeline.api import auth
from glaze_pipeline.core.errors import ConfigError
from glaze_pipeline.core.store import Store

log = logging.getLogger(__name__)

LAUNCHER_POLL_S = 0.2


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    launcher: bool = True
    max_runs: int = 4
    database_url: str | None = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: auth.ApiSettings, host: str) -> None:
    """Without an API key the API is open: it may only listen on loopback."""
    if settings.open and not is_loopback(host):
        raise ConfigError(
            f"no API key is configured, so the API would be open to anyone reaching {host}: "
            f"set {auth.API_KEYS_ENV} (or {auth.API_KEYS_FILE_ENV}), or serve on 127.0.0.1"
        )


class _HideQuery(logging.Filter):
    """Access-log lines without query strings: `?token=` must never reach a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path = args[2].split("?", 1)[0]
            record.args = (*args[:2], path, *args[3:])
        return True


def log_config() -> dict[str, Any]:
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = {**LOGGING_CONFIG}
    config["filters"] = {"hide_query": {"()": _HideQuery}}
    config["handlers"] = {
        name: {**handler, "filters": ["hide_query"]} if name == "access" else handler
        for name, handler in LOGGING_CONFIG["handlers"].items()
    }
    return config


def _die_with_parent() -> None:
    """In the launcher child (Linux): SIGTERM it when `glaze serve` dies, however it dies.

    uvicorn re-raises the SIGTERM it caught once it has shut down, which ends this process
    before any `finally` could stop the child; an orphaned launcher would go on claiming."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@contextlib.contextmanager
def launcher_process(options: ServeOptions) -> Iterator[subprocess.Popen[bytes] | None]:
    """`glaze launcher` as a child process for as long as the server runs (or nothing)."""
    if not options.launcher:
        yield None
        return
    command = [
        sys.executable,
        "-c",
        "from glaze_pipeline.cli import main; main()",
        *(["--database-url", options.database_url] if options.database_url else []),
        "launcher",
        "--max-runs",
        str(options.max_runs),
        # On SQLite the launcher polls the queue (no NOTIFY): often, as it is one small read.
        "--poll",
        str(LAUNCHER_POLL_S),
    ]
    child = subprocess.Popen(command, env=os.environ.copy(), preexec_fn=_die_with_parent)
    try:
        yield child
    finally:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def serve(options: ServeOptions, *, announce: Any = print) -> None:
    """Serve until interrupted. Checks the settings and the database first (a mistake is one
    line and exit 2, from the CLI), then starts the launcher and uvicorn."""
    import uvicorn

    from glaze_pipeline.api.app import create_app

    settings = auth.ApiSettings.from_env()
    check_exposure(settings, options.host)
    store = Store(options.database_url)
    store.upgrade()
    app = create_app(store, settings)
    base = f"http://{options.host}:{options.port}"
    announce(f"Glaze API on {base} (OpenAPI: {base}/docs), the grid page at {base}/")
    if settings.open:
        announce("no API key configured: open to anyone on this machine (loopback only)")
    else:
        signer: auth.TokenSigner = app.state.signer
        announce(f"sign in to the page (once): {base}/login?token={signer.issue_login()}&next=/")
    with launcher_process(options) as child:
        if child is not None:
            announce(f"launcher running (pid {child.pid}): queued jobs start as they land")
        else:
            announce("no launcher here (--no-launcher): the queue sensor or a launcher runs jobs")
        try:
            uvicorn.run(
                app,
                host=options.host,
                port=options.port,
                log_config=log_config(),
                timeout_graceful_shutdown=3,
            )
        finally:
            store.dispose()
