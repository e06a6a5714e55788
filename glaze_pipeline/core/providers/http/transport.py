"""httpx transports: connections spread over many small pools, optionally through a guard."""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpcore
import httpx


class _ReleasingStream(httpx.AsyncByteStream):
    """A response body that marks its pool one request less busy when it is closed."""

    def __init__(self, stream: httpx.AsyncByteStream, busy: list[int], index: int) -> None:
        self._stream = stream
        self._busy = busy
        self._index = index
        self._open = True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream.__aiter__()  # the body itself: no generator in between

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self._busy[self._index] -= 1
        await self._stream.aclose()


class ShardedTransport(httpx.AsyncBaseTransport):
    """`connections` connections as many small pools, each request to the least busy one.

    httpcore's connection pool examines every connection it holds on each request and each
    release (it polls their sockets), so its cost per request grows with its size: measured
    here, one pool of 200 connections served ~94 requests/s, 100 pools of 2 ~836. One event
    loop's worth: the client that owns it closes it with the loop.
    """

    def __init__(
        self,
        connections: int,
        *,
        per_pool: int,
        verify: Any,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        count = max(1, math.ceil(connections / per_pool))
        self._pools = [pool_transport(limits, verify, network_backend) for _ in range(count)]
        self._busy = [0] * count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        busy = self._busy
        try:
            index = busy.index(0)  # an idle pool, found at C speed; the first keeps warm
        except ValueError:
            index = min(range(len(busy)), key=busy.__getitem__)
        busy[index] += 1
        try:
            response = await self._pools[index].handle_async_request(request)
        except BaseException:
            self._busy[index] -= 1
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _ReleasingStream(response.stream, self._busy, index)
        return response

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


def pool_transport(
    limits: httpx.Limits, verify: Any, network_backend: httpcore.AsyncNetworkBackend | None
) -> httpx.AsyncHTTPTransport:
    """httpx's transport, its connections opened by `network_backend` when one is given.

    httpx takes no network backend; its connection pool (httpcore) does. So the pool is made
    again with the same settings httpx gives it, plus the backend. Should a future httpx keep
    its pool elsewhere, this fails loudly rather than leave a guarded client unguarded.
    """
    transport = httpx.AsyncHTTPTransport(limits=limits, verify=verify)
    if network_backend is None:
        return transport
    if not isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        raise RuntimeError("this httpx version keeps no httpcore pool: cannot guard its network")
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=verify
        if isinstance(verify, ssl.SSLContext)
        else httpx.create_ssl_context(verify),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=network_backend,
    )
    return transport
