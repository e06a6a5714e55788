"""What keeps a failing or rate-limited vendor from taking the job down with it.

The circuit breaker and the rate limiter are loop-free and thread-safe: they belong to the
provider and hold across chunks (each chunk runs in an event loop of its own) and threads.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from glaze_pipeline.core.providers.base import (
    AddressRefused,
    EntityNotFound,
    ProviderError,
    ProviderUnavailable,
    Unreachable,
)

logger = logging.getLogger(__name__)


class CircuitState:
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


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
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate_per_s = rate_per_s
        self._interval = 1.0 / rate_per_s if rate_per_s else 0.0
        self._tolerance = self._interval * (max(1, burst) - 1)
        self._clock = clock  # the clock and the sleep go together: tests pass a virtual pair
        self._sleep = sleep
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
            await self._sleep(wait)

    def hold(self, seconds: float) -> None:
        """No request leaves before `seconds` from now (a server's `Retry-After`)."""
        with self._lock:
            self._hold_until = max(self._hold_until, self._clock() + seconds)


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
