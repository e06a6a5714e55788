"""`ProviderClient`: every vendor call, and what HTTP can do wrong as provider errors.

It turns what HTTP can do wrong into the provider error hierarchy the waterfall acts on:

- 404/410 -> `EntityNotFound`; 401/403 and other 4xx -> `FatalProviderError`;
- 429 -> retried (honouring `Retry-After`, up to a cap), then `RateLimited`;
- 5xx, 408, timeouts, connection errors -> retried with exponential backoff and full jitter,
  then `TransientProviderError`;
- invalid JSON, a body over `max_body_bytes` (aborted while streaming), an unexpected redirect
  -> `BadResponse`;
- with an `EgressGuard` (providers that fetch URLs built from user data), a host that is not
  public, on the first request or any redirect hop -> `AddressRefused`, before connecting;
- after `breaker_threshold` consecutive failed lookups the circuit opens: calls raise
  `ProviderUnavailable` at once, without I/O, until `breaker_cooldown_s` has passed; then one
  probe is let through (half-open) and its outcome closes or re-opens the circuit.

An error raised before the request left the machine says so (`sent=False`: a URL or header
that cannot be encoded, a refused address, an open circuit); one raised after a first request
or redirect hop went out keeps `sent=True`, whatever its class says.

Provider calls are lookups (reads), so retrying a POST batch lookup is as safe as a GET.
Every error message is redacted (see `core.redact`): credentials sent in headers never come
back in an error, a log line or a cell.

Lifetimes: the engine runs each chunk under its own `asyncio.run`, while providers live for
the whole job. So the policy (settings, circuit breaker, rate limiter, stats), which is
loop-free and thread-safe, lives with the provider and holds across chunks and threads; the
connections (the `httpx.AsyncClient`, the concurrency semaphore) live for one session, which
`provider_session(...)` opens around each chunk and closes when it ends (`open_session`). A call
made outside any session gets connections of its own, closed when it returns.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from contextlib import AbstractContextManager, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import urlencode

import httpx
import redis

from glaze_pipeline.core import jsontext
from glaze_pipeline.core.providers.base import (
    AddressRefused,
    BadResponse,
    EntityNotFound,
    FatalProviderError,
    RateLimited,
    TransientProviderError,
    Unreachable,
)
from glaze_pipeline.core.providers.egress import EgressGuard, GuardedNetworkBackend
from glaze_pipeline.core.providers.http.health import HttpStats, ProviderHealth
from glaze_pipeline.core.providers.http.messages import describe_error, url_path
from glaze_pipeline.core.providers.http.resilience import (
    CircuitBreaker,
    RateLimiter,
    parse_retry_after,
)
from glaze_pipeline.core.providers.http.settings import HttpSettings
from glaze_pipeline.core.providers.http.shared_limits import SharedRateLimiter, concurrency_share
from glaze_pipeline.core.providers.http.transport import (
    AiohttpTransport,
    ShardedTransport,
    pool_transport,
)
from glaze_pipeline.core.redact import redact

logger = logging.getLogger(__name__)

NOT_FOUND_STATUSES = frozenset({404, 410})
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# How much of a rejecting vendor's body goes into the error ("invalid API key", "unknown
# parameter"): enough to act on, too little to carry a payload.
ERROR_DETAIL_CHARS = 200


@dataclass(frozen=True)
class HttpResponse:
    """A complete response whose body fitted the size limit."""

    provider: str
    status_code: int
    headers: httpx.Headers
    body: bytes
    url: str

    def json(self) -> Any:
        """The body as JSON; anything else is a BadResponse."""
        try:
            return jsontext.loads(self.body)
        except (ValueError, UnicodeDecodeError) as error:
            raise BadResponse(
                f"{self.provider}: invalid JSON from {url_path(self.url)}: {error}",
                provider=self.provider,
            ) from None

    def text(self) -> str:
        """The body decoded with the declared charset (UTF-8 when none), never raising."""
        charset = _charset(self.headers.get("content-type", "")) or "utf-8"
        try:
            return self.body.decode(charset, errors="replace")
        except LookupError:
            return self.body.decode("utf-8", errors="replace")


class _Retry(Exception):
    """One attempt failed in a way worth another try."""

    def __init__(
        self,
        outcome: str,
        description: str,
        *,
        retry_after: float | None = None,
        reached: bool = True,
    ):
        super().__init__(description)
        self.outcome = outcome
        self.description = description
        self.retry_after = retry_after
        self.reached = reached  # False: no connection was made, so nothing was sent


class _Session:
    """One provider's connections for one session (a chunk): the httpx client, made on first
    use so a provider the chunk never asks costs nothing, and the cap on requests in flight.

    Bound to the event loop that opened it; closed when the session ends.

    `transport` is the transport the client sends through when we chose it (every case but
    `trust_env`, where httpx picks proxies per URL): requests then go to it directly, skipping
    what the client does per request and a lookup never uses (merging its URL, headers and
    cookies, a cookie jar, an INFO log line per request with the query in it). With the
    request built as strings (`_build_request`), a call costs ~25 % less CPU. No cookie jar
    also means no vendor cookie rides from one lookup to the next. The client still owns the
    transport and closes it.
    """

    def __init__(
        self,
        open_client: Callable[[], tuple[httpx.AsyncClient, httpx.AsyncBaseTransport | None]],
        max_concurrency: int,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.semaphore = asyncio.Semaphore(max_concurrency)
        self.ended = False
        self._open_client = open_client
        self._client: httpx.AsyncClient | None = None
        self.transport: httpx.AsyncBaseTransport | None = None
        # What the client would add to every request, computed once.
        self.prefix = ""  # the base URL, ending in "/" ("" without one)
        self.headers: list[tuple[str, str]] = []  # as the client would send them
        self.extensions: dict[str, Any] = {}

    @property
    def is_open(self) -> bool:
        return self._client is not None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            client, self.transport = self._open_client()
            base = client.base_url  # its path ends in "/", though `str` drops a bare "/"
            self.prefix = str(base).rstrip("/") + "/" if base.is_absolute_url else ""
            self.headers = [
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in client.headers.raw
            ]
            self.extensions = {"timeout": client.timeout.as_dict()}
            self._client = client
        return self._client

    async def aclose(self) -> None:
        """Close the client and its connections; a later call in the session opens a new one."""
        client, self._client = self._client, None
        self.transport = None
        if client is not None:
            await client.aclose()


# The sessions open in this context, by client. A context variable rather than a table keyed by
# event loop: asyncio gives every task a copy of its creator's context, so a session opened
# around a chunk reaches every lookup the chunk starts, while chunks in other threads and loops
# each see their own. Never mutated: opening a session sets a new mapping.
_SESSIONS: ContextVar[Mapping[ProviderClient, _Session]] = ContextVar(
    "glaze_http_sessions", default=MappingProxyType({})
)


class ProviderClient:
    """The HTTP side of one provider: retried, limited, guarded; pooled per session.

    The policy (settings, breaker, limiter, stats) lives as long as the provider; connections
    live for one session (see `open_session`).
    """

    def __init__(
        self,
        provider: str,
        settings: HttpSettings | None = None,
        *,
        base_url: str = "",
        transport: httpx.AsyncBaseTransport | None = None,
        egress: EgressGuard | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        """`egress` guards every connection (see `egress.EgressGuard`); an explicit
        `transport` (tests) cannot be guarded, so the two do not go together."""
        if egress is not None and transport is not None:
            raise ValueError("a guarded client opens its own connections: give no transport")
        self.provider = provider
        self.egress = egress
        self.settings = settings or HttpSettings()
        self.base_url = base_url
        self.stats = HttpStats()
        self.breaker = CircuitBreaker(
            provider,
            self.settings.breaker_threshold,
            self.settings.breaker_cooldown_s,
            on_refuse=self.stats.count_short_circuit,
        )
        self.limiter: RateLimiter = RateLimiter(
            self.settings.rate_limit_per_s, self.settings.rate_limit_burst
        )
        # Requests in flight per session; a share of `max_concurrency` when several processes
        # use the vendor at once (see `share_limits`).
        self.max_concurrency = self.settings.max_concurrency
        self._transport = transport
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._sessions: set[_Session] = set()  # open ones, any thread's (see `open_clients`)
        self._sessions_lock = threading.Lock()
        self._tls: Any = None  # one TLS context for all pools and sessions (~20 ms to build)

    def __repr__(self) -> str:
        return f"ProviderClient({self.provider!r}, base_url={self.base_url!r})"

    # -- limits shared with other processes

    def share_limits(self, client: redis.Redis | None, *, processes: int = 1) -> None:
        """Hold this vendor's limits together with the `processes` that use it at once.

        With a Redis `client`, the rate limit is one schedule for them all (see
        `shared_limits`); without, it stays per process, as with one process. Concurrency is
        split: each process gets its share of `max_concurrency`. Call before any session opens.
        """
        settings = self.settings
        self.max_concurrency = concurrency_share(settings.max_concurrency, processes)
        if client is not None and settings.rate_limit_per_s:
            self.limiter = SharedRateLimiter(
                self.provider,
                settings.rate_limit_per_s,
                settings.rate_limit_burst,
                client,
                processes=processes,
            )

    # -- lifecycle

    @asynccontextmanager
    async def open_session(self) -> AsyncIterator[None]:
        """Connections for the calls made inside, and in the tasks started inside, closed when
        it ends. `provider_session` opens one around each chunk; a call outside any session
        gets connections of its own, closed after it."""
        session = _Session(self._open_client, self.max_concurrency)
        token = _SESSIONS.set({**_SESSIONS.get(), self: session})
        with self._sessions_lock:
            self._sessions.add(session)
        try:
            yield
        finally:
            session.ended = True
            _SESSIONS.reset(token)
            with self._sessions_lock:
                self._sessions.discard(session)
            await session.aclose()

    def _current_session(self) -> _Session | None:
        session = _SESSIONS.get().get(self)
        if session is None or session.ended or session.loop is not asyncio.get_running_loop():
            return None  # none open here; or a task outlived it; or a loop run from inside it
        return session

    def _open_client(self) -> tuple[httpx.AsyncClient, httpx.AsyncBaseTransport | None]:
        """A client, and the transport requests may be sent through directly (or None)."""
        transport = self._transport or self._default_transport()
        client = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"User-Agent": self.settings.user_agent},
            timeout=self.settings.timeout(),
            limits=httpx.Limits(
                max_connections=self.max_concurrency,
                max_keepalive_connections=self.max_concurrency,
            ),
            follow_redirects=False,
            trust_env=self.settings.trust_env,
            transport=transport,
        )
        return client, transport

    def _default_transport(self) -> httpx.AsyncBaseTransport | None:
        """aiohttp's pool for an unguarded client; for a guarded one, httpcore's (sharded where
        that helps), every connection opened through the guard, which only httpcore can take.

        `max_concurrency` connections either way, made on this session's loop. A client that
        trusts the environment keeps httpx's own transport, which picks a proxy per URL. A
        guarded client ignores environment proxies: a proxy would resolve the host where the
        guard cannot check it.
        """
        settings = self.settings
        backend = GuardedNetworkBackend(self.egress) if self.egress is not None else None
        connections = self.max_concurrency
        per_pool = settings.connections_per_pool
        sharded = 0 < per_pool < connections
        if backend is None and settings.trust_env:
            return None  # httpx's own, with its proxy handling
        if self._tls is None:
            self._tls = httpx.create_ssl_context()
        if backend is None:
            return AiohttpTransport(connections, verify=self._tls)
        if sharded:
            return ShardedTransport(
                connections,
                per_pool=per_pool,
                verify=self._tls,
                network_backend=backend,
            )
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return pool_transport(limits, self._tls, backend)

    async def aclose(self) -> None:
        """Close this session's client and its connections; the next call opens a new one."""
        session = self._current_session()
        if session is not None:
            await session.aclose()

    @property
    def open_clients(self) -> int:
        """How many sessions hold an open client (tests check that sessions close)."""
        with self._sessions_lock:
            return sum(1 for session in self._sessions if session.is_open)

    # -- health

    def guard(self) -> AbstractContextManager[None]:
        """The circuit breaker around one lookup: parse errors inside count as failures too."""
        return self.breaker.guard()

    def health(self) -> ProviderHealth:
        return ProviderHealth(
            circuit=self.breaker.state,
            consecutive_failures=self.breaker.consecutive_failures,
            last_error=self.breaker.last_error,
            last_error_at=self.breaker.last_error_at,
            attempts=self.stats.attempts,
            retries=self.stats.retries,
            short_circuits=self.stats.short_circuits,
        )

    # -- requests

    async def fetch(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        """One logical request with bounded retries; returns a 2xx response or raises.

        `headers` may carry credentials: they are sent, never logged or put in an error.
        """
        session = self._current_session()
        if session is None:
            async with self.open_session():
                return await self.fetch(
                    method, url, params=params, json_body=json_body, headers=headers
                )
        settings = self.settings
        attempts = settings.retries + 1
        last: _Retry | None = None
        reached = False  # whether any attempt got as far as a connection
        for attempt in range(attempts):
            if attempt:
                self.stats.count_retry()
                await self._pause_before_retry(attempt, last)
            try:
                async with session.semaphore:
                    await self.limiter.acquire()
                    async with asyncio.timeout(settings.attempt_timeout_s):
                        return await self._attempt(
                            session, method, url, params, json_body, headers, attempt
                        )
            except _Retry as retry:
                last = retry
                reached = reached or retry.reached
                logger.debug(
                    "provider %s: %s %s failed (%s), attempt %d of %d",
                    self.provider,
                    method,
                    url_path(url),
                    redact(retry.description),
                    attempt + 1,
                    attempts,
                )
            except TimeoutError:
                self.stats.count("timeout")
                last = _Retry("timeout", f"no complete answer within {settings.attempt_timeout_s}s")
                reached = True  # for all we know, it was sent
        assert last is not None
        where = f"{method} {url_path(url)}"
        tried = f"after {attempts} attempt{'s' if attempts > 1 else ''}"
        if not reached:
            raise Unreachable(
                f"{self.provider}: {last.description} {tried} ({where})", provider=self.provider
            )
        if last.outcome == "429":
            raise RateLimited(
                f"{self.provider}: rate limited (HTTP 429) {tried} ({where})",
                provider=self.provider,
                retry_after=last.retry_after,
            )
        raise TransientProviderError(
            f"{self.provider}: {last.description} {tried} ({where})", provider=self.provider
        )

    async def _pause_before_retry(self, attempt: int, last: _Retry | None) -> None:
        settings = self.settings
        if last is not None and last.retry_after is not None:
            # The server said when: everyone waits (the cap keeps a vendor from stalling us).
            self.limiter.hold(min(last.retry_after, settings.retry_after_max_s))
            return
        ceiling = min(settings.backoff_max_s, settings.backoff_base_s * 2 ** (attempt - 1))
        await self._sleep(self._rng.uniform(0, ceiling))  # full jitter

    async def _attempt(
        self,
        session: _Session,
        method: str,
        url: str,
        params: Mapping[str, str] | None,
        json_body: Any,
        headers: Mapping[str, str] | None,
        attempt: int = 0,
    ) -> HttpResponse:
        client = session.client()
        try:
            request = _build_request(session, client, method, url, params, json_body, headers)
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as error:
            # A URL or header httpx cannot encode (UnicodeEncodeError is a ValueError): the
            # same on every attempt, so the first one fails here and nothing is ever sent.
            raise FatalProviderError(
                f"{self.provider}: cannot build {method} {url_path(url)}: {describe_error(error)}",
                provider=self.provider,
                sent=False,
            ) from None
        for hop in range(self.settings.max_redirects + 1):
            response = await self._send(
                session, client, request, hop=hop, earlier=bool(attempt or hop)
            )
            try:
                status = response.status_code
                self.stats.count(str(status))
                if 200 <= status < 300:
                    body = await self._read_body(response)
                    return HttpResponse(
                        self.provider, status, response.headers, body, str(response.url)
                    )
                if response.next_request is not None and 300 <= status < 400:
                    request = _redirect(request, response.next_request, headers)
                    continue
                self._raise_for_status(response, await self._error_detail(response))
            finally:
                await response.aclose()
        raise BadResponse(
            f"{self.provider}: more than {self.settings.max_redirects} redirects "
            f"({method} {url_path(url)})",
            provider=self.provider,
        )

    async def _send(
        self,
        session: _Session,
        client: httpx.AsyncClient,
        request: httpx.Request,
        *,
        hop: int = 0,
        earlier: bool = False,
    ) -> httpx.Response:
        """Send one request. `earlier`: an earlier attempt or redirect hop of this lookup may
        have gone out, so a refusal here no longer means nothing was sent."""
        self.stats.count_attempt()
        try:
            transport = session.transport
            if transport is None:
                return await client.send(request, stream=True)
            response = await transport.handle_async_request(request)
            response.request = request
            if response.has_redirect_location:  # what `client.send` would have worked out
                response.next_request = client._build_redirect_request(request, response)
            return response
        except AddressRefused as error:
            self.stats.count("refused")
            after = f" (after {hop} redirect{'s' if hop > 1 else ''})" if hop else ""
            raise AddressRefused(
                f"{self.provider}: {error}{after}",
                provider=self.provider,
                sent=True if earlier else None,
            ) from None
        except httpx.TimeoutException as error:
            self.stats.count("timeout")
            connected = not isinstance(error, httpx.ConnectTimeout)
            raise _Retry(
                "timeout", f"timed out ({type(error).__name__})", reached=connected
            ) from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as error:
            self.stats.count("connection_error")
            connected = not isinstance(error, httpx.ConnectError)
            raise _Retry(
                "connection_error",
                f"connection failed ({describe_error(error)})",
                reached=connected,
            ) from None
        except httpx.HTTPError as error:  # invalid URL, unsupported scheme, local protocol
            # Refused by httpx before this request was written (an illegal header value, a
            # scheme it cannot speak).
            self.stats.count("request_error")
            where = f"{request.method} {request.url.path}"
            raise FatalProviderError(
                f"{self.provider}: cannot send {where}: {describe_error(error)}",
                provider=self.provider,
                sent=earlier,
            ) from None

    async def _read_body(self, response: httpx.Response) -> bytes:
        """Read at most `max_body_bytes`, aborting as soon as the body goes past it."""
        limit = self.settings.max_body_bytes
        where = _Where(response.request)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            self.stats.count("too_large")
            raise BadResponse(
                f"{self.provider}: body of {declared} bytes is over the {limit}-byte limit "
                f"({where})",
                provider=self.provider,
            )
        chunks: list[bytes] = []
        size = 0
        # An unencoded body is read from the stream itself, without the two generators and
        # the decoder `aiter_bytes` puts in between (the stream still maps httpcore's errors).
        stream = response.stream
        raw = "content-encoding" not in response.headers
        body: AsyncIterable[bytes] = (
            stream if raw and isinstance(stream, httpx.AsyncByteStream) else response.aiter_bytes()
        )
        try:
            async for chunk in body:
                size += len(chunk)
                if size > limit:
                    self.stats.count("too_large")
                    raise BadResponse(
                        f"{self.provider}: body over the {limit}-byte limit, aborted ({where})",
                        provider=self.provider,
                    )
                chunks.append(chunk)
        except httpx.TimeoutException as error:
            self.stats.count("timeout")
            raise _Retry("timeout", f"timed out reading ({type(error).__name__})") from None
        except httpx.DecodingError as error:
            raise BadResponse(
                f"{self.provider}: undecodable body ({describe_error(error)}) ({where})",
                provider=self.provider,
            ) from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as error:
            self.stats.count("connection_error")
            raise _Retry("connection_error", f"body cut off ({describe_error(error)})") from None
        return b"".join(chunks)

    async def _error_detail(self, response: httpx.Response) -> str:
        """The start of a rejecting (4xx) vendor's body, one line, for the error message.

        Only for refusals a person acts on (401, 400, 422, ...): not for not-found, retried or
        redirect statuses. It may echo what was sent, the key included: ProviderError redacts.
        """
        status = response.status_code
        if not 400 <= status < 500 or status in NOT_FOUND_STATUSES | RETRYABLE_STATUSES:
            return ""
        read = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                read += chunk
                if len(read) >= 4 * ERROR_DETAIL_CHARS:
                    break
        except httpx.HTTPError:
            pass  # the detail is a courtesy: the status says what matters
        text = " ".join(bytes(read).decode("utf-8", errors="replace").split())
        return text[:ERROR_DETAIL_CHARS] + ("..." if len(text) > ERROR_DETAIL_CHARS else "")

    def _raise_for_status(self, response: httpx.Response, detail: str = "") -> None:
        status = response.status_code
        where = f"{response.request.method} {response.request.url.path}"
        said = f": {detail}" if detail else ""
        if status in NOT_FOUND_STATUSES:
            raise EntityNotFound(
                f"{self.provider}: not found (HTTP {status})", provider=self.provider
            )
        if status in RETRYABLE_STATUSES:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            raise _Retry(str(status), f"HTTP {status}", retry_after=retry_after)
        if status >= 500:
            raise _Retry(str(status), f"HTTP {status}")
        if status in (401, 403):
            raise FatalProviderError(
                f"{self.provider}: refused (HTTP {status}); check its API key ({where}){said}",
                provider=self.provider,
            )
        if 300 <= status < 400:
            raise BadResponse(
                f"{self.provider}: unexpected redirect (HTTP {status}) ({where})",
                provider=self.provider,
            )
        raise FatalProviderError(
            f"{self.provider}: request rejected (HTTP {status}) ({where}){said}",
            provider=self.provider,
        )


class _Where:
    """ "METHOD /path" of a request, worked out only if an error message shows it."""

    __slots__ = ("_request",)

    def __init__(self, request: httpx.Request) -> None:
        self._request = request

    def __str__(self) -> str:
        return f"{self._request.method} {self._request.url.path}"


def _build_request(
    session: _Session,
    client: httpx.AsyncClient,
    method: str,
    url: str,
    params: Mapping[str, str] | None,
    json_body: Any,
    headers: Mapping[str, str] | None,
) -> httpx.Request:
    """What `client.build_request` makes, for a fraction of its CPU: the base URL, the query
    and the client's headers joined as strings, parsed once (httpx parses the URL three
    times). A URL that already has a query or a fragment, or a client whose transport httpx
    chooses, goes the long way."""
    if session.transport is None or "?" in url or "#" in url:
        return client.build_request(
            method, url, params=params, json=json_body, headers=dict(headers or {})
        )
    if "://" in url:
        full = url
    elif session.prefix:
        full = session.prefix + url.lstrip("/")
    else:
        full = url
    if params:
        full += "?" + urlencode(params)  # what httpx's QueryParams encodes to
    merged = session.headers
    if headers:  # the caller's replace the client's of the same name, whatever its case
        given = {name.lower() for name in headers}
        merged = [item for item in merged if item[0].lower() not in given]
        merged += headers.items()
    return httpx.Request(
        method, full, headers=merged, json=json_body, extensions=session.extensions
    )


def _redirect(
    previous: httpx.Request, following: httpx.Request, sent: Mapping[str, str] | None
) -> httpx.Request:
    """The next hop; the caller's headers (credentials) never follow to another origin."""
    origin = (previous.url.scheme, previous.url.host, previous.url.port)
    if (following.url.scheme, following.url.host, following.url.port) != origin:
        for name in sent or {}:
            following.headers.pop(name, None)
    return following


def _charset(content_type: str) -> str | None:
    match = re.search(r"charset=\"?([\w.:-]+)", content_type, re.IGNORECASE)
    return match.group(1) if match else None
