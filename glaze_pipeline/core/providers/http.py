"""Resilient HTTP for providers: one pooled client each, timeouts, retries, limits, a breaker.

Every vendor call goes through a `ProviderClient`. It turns what HTTP can do wrong into the
provider error hierarchy the waterfall acts on:

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

`HttpBackedProvider.preflight` checks, without spending, whether a provider can be used now;
its health probe (`probe_health`) is a separate short-lived client, outside the lookup stats
and the breaker.

Provider calls are lookups (reads), so retrying a POST batch lookup is as safe as a GET.
Every error message is redacted (see `core.redact`): credentials sent in headers never come
back in an error, a log line or a cell.

Event loops: the engine runs each chunk under its own `asyncio.run`, while providers live for
the whole job. So nothing loop-bound (the `httpx.AsyncClient`, the concurrency semaphore) is
made at construction: each loop gets its own, on first use. Callers should close them with
`aclose()` (or `provider_session(...)`) before the loop ends; as a safety net, a loop shut down
by `asyncio.run` closes its client too (see `_close_with_loop`). The rate limiter and the
circuit breaker are loop-free and thread-safe, so they hold across chunks and threads.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import re
import ssl
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import httpcore
import httpx
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from glaze_pipeline.core.errors import ConfigError
from glaze_pipeline.core.providers.base import (
    AddressRefused,
    BadResponse,
    CredentialsMissing,
    EntityNotFound,
    FatalProviderError,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    TransientProviderError,
    Unreachable,
    Verdict,
)
from glaze_pipeline.core.providers.egress import EgressGuard, GuardedNetworkBackend
from glaze_pipeline.core.redact import clean_secret, redact

logger = logging.getLogger(__name__)

USER_AGENT = "GlazeBot/0.1 (+https://glaze.dev/bot)"
NOT_FOUND_STATUSES = frozenset({404, 410})
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# How much of a rejecting vendor's body goes into the error ("invalid API key", "unknown
# parameter"): enough to act on, too little to carry a payload.
ERROR_DETAIL_CHARS = 200


class HttpSettings(BaseModel):
    """How one provider talks HTTP. Defaults suit a paid JSON API; tests shrink the waits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    connect_timeout_s: PositiveFloat = 3.0
    read_timeout_s: PositiveFloat = 10.0
    write_timeout_s: PositiveFloat = 10.0
    # A whole attempt (send + read the body): stops a server that trickles bytes forever.
    attempt_timeout_s: PositiveFloat = 30.0
    retries: int = Field(default=3, ge=0, le=10)
    backoff_base_s: float = Field(default=0.2, ge=0)
    backoff_max_s: float = Field(default=5.0, ge=0)
    retry_after_max_s: float = Field(default=10.0, ge=0)
    max_body_bytes: PositiveInt = 2_000_000
    max_redirects: int = Field(default=0, ge=0, le=20)
    rate_limit_per_s: PositiveFloat | None = None
    rate_limit_burst: PositiveInt = 1
    max_concurrency: PositiveInt = 10
    # Connections per pool: a provider's `max_concurrency` connections are spread over many
    # small pools (see ShardedTransport). 0 or less: one pool of `max_concurrency`.
    connections_per_pool: int = 2
    # None switches the breaker off (e.g. the website provider: one dead site says nothing
    # about the next one).
    breaker_threshold: PositiveInt | None = 5
    breaker_cooldown_s: float = Field(default=30.0, ge=0)
    user_agent: str = USER_AGENT
    # Proxies and .netrc from the environment are ignored unless asked for.
    trust_env: bool = False

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(
            connect=self.connect_timeout_s,
            read=self.read_timeout_s,
            write=self.write_timeout_s,
            pool=self.attempt_timeout_s,
        )


class UnsupportedLookup(ProviderUnavailable):
    """The provider cannot look up this kind of key (e.g. a domain API asked about a name).

    Nothing was called; like an open circuit, the waterfall moves on and charges nothing.
    """


# --- counters and health -------------------------------------------------------------------


@dataclass
class HttpStats:
    """What one provider's HTTP did; read by tests, the CLI and run metadata."""

    attempts: int = 0  # HTTP requests sent, retries and redirect hops included
    retries: int = 0
    short_circuits: int = 0  # lookups refused without I/O because the circuit was open
    outcomes: Counter[str] = field(default_factory=Counter)  # "200", "429", "timeout", ...
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count_attempt(self) -> None:
        with self._lock:
            self.attempts += 1

    def count(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] += 1

    def count_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def count_short_circuit(self) -> None:
        with self._lock:
            self.short_circuits += 1


class CircuitState:
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class ProviderHealth:
    """A provider's state as an operator sees it."""

    circuit: str
    consecutive_failures: int
    last_error: str | None
    last_error_at: datetime | None
    attempts: int
    retries: int
    short_circuits: int

    def __str__(self) -> str:
        if self.circuit == CircuitState.CLOSED and not self.consecutive_failures:
            text = "ok"
        else:
            text = f"circuit {self.circuit.replace('_', '-')}"
        if self.consecutive_failures:
            text += f", {self.consecutive_failures} consecutive failures"
        if self.last_error:
            text += f"; last error: {self.last_error}"
        return text


# --- circuit breaker -----------------------------------------------------------------------


class CircuitBreaker:
    """Skip a provider that keeps failing, then probe it once the cooldown has passed.

    Thread-safe and free of any event loop, so it holds across chunks. Failures are lookups that
    ended in a ProviderError other than "not found" (which is a healthy answer).
    """

    def __init__(
        self,
        provider: str,
        threshold: int | None,
        cooldown_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_refuse: Callable[[], None] | None = None,
    ) -> None:
        self.provider = provider
        self.threshold = threshold
        self._on_refuse = on_refuse
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.last_error: str | None = None
        self.last_error_at: datetime | None = None

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == CircuitState.OPEN and self._cooled_down():
                return CircuitState.HALF_OPEN
            return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run one lookup under the breaker; raises ProviderUnavailable when the circuit is open."""
        probe = self._admit()
        try:
            yield
        except EntityNotFound:
            self._settle(probe, failed=False)
            raise
        except AddressRefused:
            # Refused by our own guard: says nothing about the provider's health.
            self._abandon(probe)
            raise
        except Unreachable as error:  # nothing sent, but the vendor is down: a failure
            self._settle(probe, failed=True, error=error)
            raise
        except ProviderError as error:
            if error.sent:
                self._settle(probe, failed=True, error=error)
            else:  # refused on our side before anything was asked of the vendor
                self._abandon(probe)
            raise
        except BaseException:
            # Cancelled or crashed mid-call: says nothing about the provider's health.
            self._abandon(probe)
            raise
        else:
            self._settle(probe, failed=False)

    def _cooled_down(self) -> bool:
        return self._clock() - self._opened_at >= self.cooldown_s

    def refusal(self) -> str | None:
        """Why a lookup would be refused now (without the provider's name), or None.

        Changes nothing: a cooled-down circuit still leaves its probe to the next lookup.
        """
        if self.threshold is None:
            return None
        with self._lock:
            if self._state == CircuitState.CLOSED:
                return None
            if self._state == CircuitState.OPEN and self._cooled_down():
                return None
            if self._state == CircuitState.HALF_OPEN and not self._probing:
                return None
            return self._refusal_text()

    def _refusal_text(self) -> str:
        retry_in = max(0.0, self.cooldown_s - (self._clock() - self._opened_at))
        return (
            f"circuit open after {self._failures} consecutive failures; "
            f"next probe in {retry_in:.1f}s (last error: {self.last_error})"
        )

    def _admit(self) -> bool:
        """Let a call through (True when it is the half-open probe), or refuse it."""
        if self.threshold is None:
            return False
        with self._lock:
            if self._state == CircuitState.CLOSED:
                return False
            if self._state == CircuitState.OPEN and self._cooled_down():
                self._state = CircuitState.HALF_OPEN
            if self._state == CircuitState.HALF_OPEN and not self._probing:
                self._probing = True
                return True
            reason = self._refusal_text()
        if self._on_refuse is not None:
            self._on_refuse()
        raise ProviderUnavailable(f"{self.provider}: {reason}", provider=self.provider)

    def _settle(self, probe: bool, *, failed: bool, error: Exception | None = None) -> None:
        if self.threshold is None:
            if error is not None:
                self._note_error(error)
            return
        with self._lock:
            if probe:
                self._probing = False
            if not failed:
                if self._state != CircuitState.CLOSED:
                    logger.info("provider %s: circuit closed again", self.provider)
                self._state = CircuitState.CLOSED
                self._failures = 0
                return
            self._failures += 1
            if error is not None:
                self._note_error(error)
            if probe or self._failures >= self.threshold:
                if self._state != CircuitState.OPEN:
                    logger.warning(
                        "provider %s: circuit open for %.1fs after %d consecutive failures",
                        self.provider,
                        self.cooldown_s,
                        self._failures,
                    )
                self._state = CircuitState.OPEN
                self._opened_at = self._clock()

    def _abandon(self, probe: bool) -> None:
        if probe:
            with self._lock:
                self._probing = False

    def _note_error(self, error: Exception) -> None:
        self.last_error = str(error)
        self.last_error_at = datetime.now(UTC)


# --- rate limiter --------------------------------------------------------------------------


class RateLimiter:
    """An async token bucket (as GCRA), shared by every loop and thread that uses a provider.

    Each caller reserves the next free slot under a thread lock and then sleeps until it, so
    no asyncio object is bound to a loop. `hold(seconds)` pauses every caller, which is how a
    `Retry-After` from one response slows the whole provider down, not just one request.
    """

    def __init__(
        self,
        rate_per_s: float | None,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate_per_s = rate_per_s
        self._interval = 1.0 / rate_per_s if rate_per_s else 0.0
        self._tolerance = self._interval * (max(1, burst) - 1)
        self._clock = clock
        self._lock = threading.Lock()
        self._tat = 0.0  # theoretical arrival time of the next request
        self._hold_until = 0.0

    def reserve(self) -> float:
        """Take the next slot; returns how long to wait for it (0 when free now)."""
        with self._lock:
            now = self._clock()
            start = max(now, self._hold_until)
            if self._interval:
                tat = max(self._tat, start)
                start = max(start, tat - self._tolerance)
                self._tat = tat + self._interval
            return start - now

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)

    def hold(self, seconds: float) -> None:
        """No request leaves before `seconds` from now (a server's `Retry-After`)."""
        with self._lock:
            self._hold_until = max(self._hold_until, self._clock() + seconds)


# --- responses -----------------------------------------------------------------------------


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
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as error:
            raise BadResponse(
                f"{self.provider}: invalid JSON from {_path(self.url)}: {error}",
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


# --- the transport: many small pools ---------------------------------------------------------


class _ReleasingStream(httpx.AsyncByteStream):
    """A response body that marks its pool one request less busy when it is closed."""

    def __init__(self, stream: httpx.AsyncByteStream, busy: list[int], index: int) -> None:
        self._stream = stream
        self._busy = busy
        self._index = index
        self._open = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

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
        index = min(range(len(self._pools)), key=self._busy.__getitem__)
        self._busy[index] += 1
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


# --- the client ----------------------------------------------------------------------------


@dataclass
class _LoopResources:
    client: httpx.AsyncClient
    semaphore: asyncio.Semaphore
    closer: AsyncGenerator[None, None]


async def _close_with_loop(client: httpx.AsyncClient) -> AsyncGenerator[None, None]:
    """An async generator that closes `client` when it is closed.

    Started once in the loop, it is tracked by the loop's async-generator hooks, and
    `asyncio.run` closes every such generator before closing the loop: so a client the caller
    forgot to close still releases its sockets while its loop can run the close.
    """
    try:
        yield
    finally:
        await client.aclose()


class ProviderClient:
    """The HTTP side of one provider: pooled per event loop, retried, limited, guarded."""

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
        self.limiter = RateLimiter(self.settings.rate_limit_per_s, self.settings.rate_limit_burst)
        self._transport = transport
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._loops: dict[asyncio.AbstractEventLoop, _LoopResources] = {}
        self._loops_lock = threading.Lock()
        self._tls: Any = None  # one TLS context for all pools and loops (~20 ms to build)

    def __repr__(self) -> str:
        return f"ProviderClient({self.provider!r}, base_url={self.base_url!r})"

    # -- lifecycle

    async def _resources(self) -> _LoopResources:
        loop = asyncio.get_running_loop()
        with self._loops_lock:
            for stale in [other for other in self._loops if other.is_closed()]:
                del self._loops[stale]
            resources = self._loops.get(loop)
            if resources is not None:
                return resources
            client = httpx.AsyncClient(
                base_url=self.base_url,
                headers={"User-Agent": self.settings.user_agent},
                timeout=self.settings.timeout(),
                limits=httpx.Limits(
                    max_connections=self.settings.max_concurrency,
                    max_keepalive_connections=self.settings.max_concurrency,
                ),
                follow_redirects=False,
                trust_env=self.settings.trust_env,
                transport=self._transport or self._default_transport(),
            )
            closer = _close_with_loop(client)
            resources = _LoopResources(
                client, asyncio.Semaphore(self.settings.max_concurrency), closer
            )
            self._loops[loop] = resources
        await anext(closer)  # registers it with the loop's shutdown
        return resources

    def _default_transport(self) -> httpx.AsyncBaseTransport | None:
        """Sharded pools where they help; every connection through the guard when there is one.

        A guarded client ignores environment proxies (`trust_env`): a proxy would resolve the
        host where the guard cannot check it.
        """
        settings = self.settings
        backend = GuardedNetworkBackend(self.egress) if self.egress is not None else None
        per_pool = settings.connections_per_pool
        sharded = 0 < per_pool < settings.max_concurrency
        if backend is None and (not sharded or settings.trust_env):
            return None  # httpx's own: one pool (and, with trust_env, its proxy handling)
        if self._tls is None:
            self._tls = httpx.create_ssl_context()
        if sharded:
            return ShardedTransport(
                settings.max_concurrency,
                per_pool=per_pool,
                verify=self._tls,
                network_backend=backend,
            )
        limits = httpx.Limits(
            max_connections=settings.max_concurrency,
            max_keepalive_connections=settings.max_concurrency,
        )
        return pool_transport(limits, self._tls, backend)

    async def aclose(self) -> None:
        """Close this loop's client and its connections; the next call opens a new one."""
        loop = asyncio.get_running_loop()
        with self._loops_lock:
            resources = self._loops.pop(loop, None)
        if resources is not None:
            await resources.closer.aclose()

    @property
    def open_clients(self) -> int:
        """How many event loops hold an open client (tests check that sessions close)."""
        with self._loops_lock:
            return sum(1 for loop in self._loops if not loop.is_closed())

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
        resources = await self._resources()
        settings = self.settings
        attempts = settings.retries + 1
        where = f"{method} {_path(url)}"
        last: _Retry | None = None
        reached = False  # whether any attempt got as far as a connection
        for attempt in range(attempts):
            if attempt:
                self.stats.count_retry()
                await self._pause_before_retry(attempt, last)
            try:
                async with resources.semaphore:
                    await self.limiter.acquire()
                    async with asyncio.timeout(settings.attempt_timeout_s):
                        return await self._attempt(
                            resources.client, method, url, params, json_body, headers, attempt
                        )
            except _Retry as retry:
                last = retry
                reached = reached or retry.reached
                logger.debug(
                    "provider %s: %s failed (%s), attempt %d of %d",
                    self.provider,
                    where,
                    redact(retry.description),
                    attempt + 1,
                    attempts,
                )
            except TimeoutError:
                self.stats.count("timeout")
                last = _Retry("timeout", f"no complete answer within {settings.attempt_timeout_s}s")
                reached = True  # for all we know, it was sent
        assert last is not None
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
        client: httpx.AsyncClient,
        method: str,
        url: str,
        params: Mapping[str, str] | None,
        json_body: Any,
        headers: Mapping[str, str] | None,
        attempt: int = 0,
    ) -> HttpResponse:
        try:
            request = client.build_request(
                method, url, params=params, json=json_body, headers=dict(headers or {})
            )
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as error:
            # A URL or header httpx cannot encode (UnicodeEncodeError is a ValueError): the
            # same on every attempt, so the first one fails here and nothing is ever sent.
            raise FatalProviderError(
                f"{self.provider}: cannot build {method} {_path(url)}: {_describe(error)}",
                provider=self.provider,
                sent=False,
            ) from None
        for hop in range(self.settings.max_redirects + 1):
            response = await self._send(client, request, hop=hop, earlier=bool(attempt or hop))
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
            f"({method} {_path(url)})",
            provider=self.provider,
        )

    async def _send(
        self,
        client: httpx.AsyncClient,
        request: httpx.Request,
        *,
        hop: int = 0,
        earlier: bool = False,
    ) -> httpx.Response:
        """Send one request. `earlier`: an earlier attempt or redirect hop of this lookup may
        have gone out, so a refusal here no longer means nothing was sent."""
        where = f"{request.method} {request.url.path}"
        self.stats.count_attempt()
        try:
            return await client.send(request, stream=True)
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
                "connection_error", f"connection failed ({_describe(error)})", reached=connected
            ) from None
        except httpx.HTTPError as error:  # invalid URL, unsupported scheme, local protocol
            # Refused by httpx before this request was written (an illegal header value, a
            # scheme it cannot speak).
            self.stats.count("request_error")
            raise FatalProviderError(
                f"{self.provider}: cannot send {where}: {_describe(error)}",
                provider=self.provider,
                sent=earlier,
            ) from None

    async def _read_body(self, response: httpx.Response) -> bytes:
        """Read at most `max_body_bytes`, aborting as soon as the body goes past it."""
        limit = self.settings.max_body_bytes
        where = f"{response.request.method} {response.request.url.path}"
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
        try:
            async for chunk in response.aiter_bytes():
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
                f"{self.provider}: undecodable body ({_describe(error)}) ({where})",
                provider=self.provider,
            ) from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as error:
            self.stats.count("connection_error")
            raise _Retry("connection_error", f"body cut off ({_describe(error)})") from None
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


# --- providers that hold HTTP resources ----------------------------------------------------


@runtime_checkable
class ClosableProvider(Protocol):
    async def aclose(self) -> None: ...


async def aclose_providers(providers: Iterable[object]) -> None:
    """Close the current loop's HTTP clients of every provider that has any."""
    for provider in providers:
        if isinstance(provider, ClosableProvider):
            with suppress(Exception):
                await provider.aclose()


class _HttpProviderConfig(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def confidence(self) -> float: ...

    @property
    def http(self) -> HttpSettings: ...


class HttpBackedProvider:
    """What every HTTP provider shares: name, confidence and limits come from its config; its
    client's health and lifecycle are the provider's. Subclasses set `config` and `http`."""

    config: _HttpProviderConfig
    http: ProviderClient

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def confidence(self) -> float:
        return self.config.confidence

    @property
    def max_concurrency(self) -> int:
        return self.config.http.max_concurrency

    def health(self) -> ProviderHealth:
        return self.http.health()

    async def aclose(self) -> None:
        await self.http.aclose()

    # -- can it be used now? Known without spending.

    def unavailable_reason(self) -> str | None:
        """Why a lookup cannot be sent now (a missing or unusable key, an open circuit), or
        None. Cheap and without I/O: the waterfall asks before every lookup."""
        return self._credentials_problem() or self.http.breaker.refusal()

    async def preflight(self, *, probe: bool = True) -> Verdict:
        """Configuration, credentials, circuit and (with `probe`, where the vendor has a free
        health endpoint) one health probe, stopping at the first problem. Never raises."""
        checks: list[str] = []
        try:
            steps: list[tuple[str, Callable[[], str | None]]] = [
                ("configured", self._configuration_problem)
            ]
            if self._needs_credentials:
                steps.append(("credentials", self._credentials_problem))
            if self.http.breaker.threshold is not None:
                steps.append(("circuit", self.http.breaker.refusal))
            for check, problem in steps:
                checks.append(check)
                reason = problem()
                if reason is not None:
                    return Verdict(self.name, False, reason, tuple(checks))
            if probe and self._has_probe:
                checks.append("probe")
                reason = await self._probe()
                if reason is not None:
                    return Verdict(self.name, False, reason, tuple(checks))
        except Exception as error:  # a verdict, whatever went wrong: preflight never raises
            return Verdict(self.name, False, f"preflight failed: {_describe(error)}", tuple(checks))
        return Verdict(self.name, True, None, tuple(checks))

    # Hooks for the kinds of provider; the defaults suit one that needs no key and has no probe.

    def _configuration_problem(self) -> str | None:
        """What in the configuration keeps any lookup from being sent, or None."""
        return None

    @property
    def _needs_credentials(self) -> bool:
        return False

    def _credentials_problem(self) -> str | None:
        return None

    @property
    def _has_probe(self) -> bool:
        return False

    async def _probe(self) -> str | None:
        return None


async def probe_health(
    base_url: str,
    path: str,
    *,
    settings: HttpSettings,
    timeout_s: float,
    headers: Mapping[str, str] | None = None,
    keyed: bool = False,
) -> str | None:
    """One GET to a vendor's free health endpoint: None when it answers 2xx, else why not.

    A short-lived client of its own, so the probe never counts in the provider's lookup stats,
    never moves its breaker or limiter, and never holds one of its pooled connections. No
    retries: a preflight must be quick. `keyed`: the auth header is among `headers`, so a
    401/403 means the key was refused. Never raises.
    """
    where = f"GET {_shown_url(base_url, path)}"
    try:
        async with (
            asyncio.timeout(timeout_s),  # the whole probe, a server that trickles included
            httpx.AsyncClient(
                base_url=base_url,
                headers={"User-Agent": settings.user_agent},
                timeout=httpx.Timeout(timeout_s),
                follow_redirects=False,
                trust_env=settings.trust_env,
            ) as client,
            client.stream("GET", path, headers=dict(headers or {})) as response,
        ):
            status = response.status_code  # the body is never read
    except (TimeoutError, httpx.TimeoutException):
        return f"health probe failed: no answer within {timeout_s:g}s ({where})"
    except (httpx.NetworkError, httpx.RemoteProtocolError) as error:
        return f"health probe failed: connection failed ({_os_cause(error)}) ({where})"
    except Exception as error:
        return f"health probe failed: {_describe(error)} ({where})"
    if 200 <= status < 300:
        return None
    if status in (401, 403):
        if keyed:
            return f"API key refused (HTTP {status})"
        return f"health probe refused (HTTP {status}) and no API key is configured ({where})"
    return f"health probe failed: HTTP {status} ({where})"


@asynccontextmanager
async def provider_session(providers: Iterable[object]) -> AsyncIterator[None]:
    """Use providers inside one event loop and close their clients at the end.

    The engine wraps each chunk's waterfall in it:
    `async with provider_session(providers): await waterfall.enrich_many(...)`.
    """
    providers = list(providers)
    try:
        yield
    finally:
        await aclose_providers(providers)


# --- small helpers -------------------------------------------------------------------------


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delay-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def read_secret(env_var: str, *, provider: str) -> str:
    """An API key from the environment, read at call time: checked, stripped, registered for
    redaction. A missing or unusable one is `CredentialsMissing` for this provider (its message
    names the variable, never the value); `load_secret` reports the same at load time."""
    try:
        value = load_secret(env_var, provider=provider)
    except ConfigError as error:
        raise CredentialsMissing(str(error), provider=provider) from None
    if value is None:
        raise CredentialsMissing(
            f"{provider}: API key missing: set the environment variable {env_var}",
            provider=provider,
        )
    return value


def secret_problem(env_var: str, *, provider: str) -> str | None:
    """Why the key in `env_var` cannot be used (without the provider's name), or None.

    Cheap and without I/O: the waterfall asks before every lookup.
    """
    try:
        read_secret(env_var, provider=provider)
    except CredentialsMissing as error:
        return str(error).removeprefix(f"{provider}: ")
    return None


def load_secret(env_var: str, *, provider: str) -> str | None:
    """The key in `env_var` as it can be sent (see `redact.clean_secret`), None when unset.

    Raises ConfigError for a key that cannot be sent (a control or non-ASCII character).
    """
    raw = os.environ.get(env_var, "")
    value = clean_secret(raw, provider=provider, env_var=env_var) if raw else ""
    return value or None


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """Replace `${VAR}` and `${VAR:-default}` with values from the environment (at call time)."""

    def value(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found:
            return found
        if default is not None:
            return default
        raise ValueError(f"environment variable {name} is not set and has no default")

    return _ENV_RE.sub(value, text)


def _redirect(
    previous: httpx.Request, following: httpx.Request, sent: Mapping[str, str] | None
) -> httpx.Request:
    """The next hop; the caller's headers (credentials) never follow to another origin."""
    origin = (previous.url.scheme, previous.url.host, previous.url.port)
    if (following.url.scheme, following.url.host, following.url.port) != origin:
        for name in sent or {}:
            following.headers.pop(name, None)
    return following


def _path(url: str) -> str:
    """The path of a URL, without host or query: safe to show (queries can hold PII).

    Never raises: it names the URL in error messages, including "this URL is invalid".
    """
    if "://" in url:
        try:
            return httpx.URL(url).path
        except httpx.InvalidURL:
            url = "/" + url.split("://", 1)[1].partition("/")[2]
    return url.split("?", 1)[0].split("#", 1)[0]


def _shown_url(base_url: str, path: str) -> str:
    """Where a request to `path` under `base_url` goes, without credentials in the URL."""
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL:
        return path
    host = f"[{url.host}]" if ":" in url.host else url.host
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{host}{port}{url.path.rstrip('/')}{path}"


def _os_cause(error: BaseException) -> str:
    """The system's words for a failed connection ("Connection refused"), found under the
    layers httpx and anyio wrap it in ("All connection attempts failed"); else the error."""
    cause: BaseException | None = error
    for _ in range(20):  # a chain is short; a cycle must not hang a preflight
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
        cause = cause.__cause__ or cause.__context__
    return _describe(error)


def _charset(content_type: str) -> str | None:
    match = re.search(r"charset=\"?([\w.:-]+)", content_type, re.IGNORECASE)
    return match.group(1) if match else None


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
