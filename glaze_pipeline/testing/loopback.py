"""Run a Starlette app on loopback: in the foreground (`glaze mock-providers`, `glaze mock-llm`)
or in a background thread (tests, benchmarks). Both mocks run this way.

`LoopbackServer` binds its socket before uvicorn starts, so the port is known, and ours, at
once; `start()` returns only when uvicorn answers, so a test never races the server. Handlers
that sleep (simulated latency, hangs) sleep through `Pauses`: stopping the server wakes them,
so shutdown never waits out a hang.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Self

import uvicorn
from starlette.types import ASGIApp

DEFAULT_HOST = "127.0.0.1"


class Pauses:
    """Sleeps that end early when the server stops; a mock's state inherits it."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake up at once when the server is stopping (so shutdown never hangs)."""
        if seconds <= 0:
            return
        if self._stopping is None:
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    def wake_sleepers(self) -> None:
        """Called from another thread when the server stops: ends every pause."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)


def uvicorn_config(app: ASGIApp, host: str, port: int, *, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
        # Many concurrent clients in benchmarks: keep-alive saves a handshake per call.
        timeout_keep_alive=30,
    )


def serve(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    sock: socket.socket | None = None,
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Run `app` in the foreground until interrupted.

    `sock`: a socket the caller already bound to host:port, so that a port in use was
    reported by the caller before anything started. `on_stop`: called once it has stopped."""
    server = uvicorn.Server(uvicorn_config(app, host, port, log_level="info"))
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        if on_stop is not None:
            on_stop()


class LoopbackServer:
    """`app` on a free loopback port, in a background thread; a context manager.

    `name` names the thread and the error when it does not start; `on_stop` is called first
    thing on `stop()` (wake the handlers that sleep, before uvicorn waits for them)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        name: str,
        host: str = DEFAULT_HOST,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.host = host
        self.port = 0
        self._app = app
        self._name = name
        self._on_stop = on_stop
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> Self:
        # Bind first, then hand the socket over: the port is ours before the server starts.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn_config(self._app, self.host, self.port, log_level="warning")
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=self._name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {self._name} server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._server is not None:
            if self._on_stop is not None:
                self._on_stop()
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout_s)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def open_connections(self) -> int:
        """Client connections the server holds open now (tests check clients close theirs)."""
        return len(self._server.server_state.connections) if self._server is not None else 0

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
