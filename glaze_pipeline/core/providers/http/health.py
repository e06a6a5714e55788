"""What a provider's HTTP did and how it stands, and a free probe of a vendor's health."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import httpx

from glaze_pipeline.core.providers.http.messages import describe_error, os_cause, shown_url
from glaze_pipeline.core.providers.http.resilience import CircuitState
from glaze_pipeline.core.providers.http.settings import HttpSettings


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
    where = f"GET {shown_url(base_url, path)}"
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
        return f"health probe failed: connection failed ({os_cause(error)}) ({where})"
    except Exception as error:
        return f"health probe failed: {describe_error(error)} ({where})"
    if 200 <= status < 300:
        return None
    if status in (401, 403):
        if keyed:
            return f"API key refused (HTTP {status})"
        return f"health probe refused (HTTP {status}) and no API key is configured ({where})"
    return f"health probe failed: HTTP {status} ({where})"
