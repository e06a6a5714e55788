"""httpx transports: aiohttp's pool for the vendors' APIs; for guarded fetches, httpcore's
connections spread over many small pools, every one opened through the guard."""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpcore
import httpx
from yarl import URL


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


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx requests sent over aiohttp's connection pool: one event loop's worth.

    For the vendors' JSON APIs (no egress guard, no environment proxy). httpcore runs each
    request through anyio (cancel scopes, events, locks, a `sniffio` lookup per await) and polls
    its pooled sockets; aiohttp's pool and parser are plain asyncio callbacks, mostly in C.
    Measured on uvloop, 200 lookups in flight against the mock vendor at 0 ms: process CPU per
    lookup 0.66-0.76 ms through `ShardedTransport`, 0.29-0.31 ms through this; the bench's S3
    worker CPU per provider call went from 1.8-2.1 ms to 1.3-1.6 ms.

    It keeps httpx's side of the contract: the timeouts a request carries (connect, read, pool;
    aiohttp has no write timeout: the caller's attempt timeout bounds a stalled send), aiohttp's
    errors raised as the httpx exceptions they correspond to, no redirects, no cookies, no
    decompression (the httpx response decodes, as with httpcore), no proxy from the
    environment. aiohttp's connector is bound to the loop it was made on: made on the first
    request, closed by `aclose` with the session that owns it.
    """

    def __init__(self, connections: int, *, verify: ssl.SSLContext, keepalive_s: float = 5.0):
        self._connections = connections
        self._verify = verify
        self._keepalive_s = keepalive_s  # httpx's default keep-alive expiry
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._connections,
            limit_per_host=0,
            keepalive_timeout=self._keepalive_s,
            ssl=self._verify,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            # h11's limit (httpcore's parser) for a header line, rather than aiohttp's 8 KiB
            max_line_size=_MAX_HEADER_LINE,
            max_field_size=_MAX_HEADER_LINE,
        )
        return self._session

    def _timeout(self, request: httpx.Request) -> aiohttp.ClientTimeout:
        given = request.extensions.get("timeout") or {}
        key = (given.get("connect"), given.get("read"), given.get("pool"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            connect, read, pool = key
            # aiohttp's `connect` covers waiting for a pooled connection and opening one;
            # `sock_connect` the opening alone.
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=None if pool is None or connect is None else pool + connect,
                sock_connect=connect,
                sock_read=read,
            )
            self._timeouts[key] = timeout
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        content = await request.aread()  # already read unless streamed (lookups never are)
        headers = [
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers.raw
        ]
        try:
            response = await session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=headers,
                data=content or None,
                allow_redirects=False,
                timeout=self._timeout(request),
            )
        except aiohttp.ClientError as error:
            raise _httpx_error(error, request) from error
        except ValueError as error:  # a header aiohttp will not write (a CR or LF in a value)
            raise httpx.LocalProtocolError(str(error), request=request) from error
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            stream=_AiohttpBody(response, request),
            request=request,
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", errors="replace"),
            },
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


# h11's DEFAULT_MAX_INCOMPLETE_EVENT_SIZE: the longest status or header line httpcore accepts.
_MAX_HEADER_LINE = 16 * 1024


class _AiohttpBody(httpx.AsyncByteStream):
    """An aiohttp response body as an httpx stream; closing it frees the connection (back to
    the pool when the body was read to the end, closed otherwise)."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while chunk := await content.readany():
                yield chunk
        except aiohttp.ClientError as error:
            raise _httpx_error(error, self._request) from error

    async def aclose(self) -> None:
        self._response.release()


def _httpx_error(error: aiohttp.ClientError, request: httpx.Request) -> httpx.HTTPError:
    """The httpx exception httpcore would have raised for what aiohttp reports.

    Timeouts are TimeoutErrors in aiohttp: they must become httpx's before a caller's
    `except TimeoutError` (the attempt timeout) takes them for its own.
    """
    message = str(error) or type(error).__name__
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(error, aiohttp.ServerTimeoutError):  # SocketTimeoutError: a read timed out
        return httpx.ReadTimeout(message, request=request)
    if isinstance(error, aiohttp.ClientConnectorError):  # refused, DNS, TLS handshake
        return httpx.ConnectError(message, request=request)
    if isinstance(
        error,
        aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError,
    ):  # closed early, a body cut off or malformed, an unparseable status line or header
        return httpx.RemoteProtocolError(message, request=request)
    if isinstance(error, aiohttp.ClientConnectionError):  # reset while sending or reading
        return httpx.ReadError(message, request=request)
    if isinstance(error, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return httpx.UnsupportedProtocol(message, request=request)
    return httpx.TransportError(message, request=request)
