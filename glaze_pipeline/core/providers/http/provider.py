"""What every HTTP-backed provider shares: identity from its config, its client's health and
lifetime, and a preflight that tells, without spending, whether it can be used now."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from glaze_pipeline.core.providers.base import Verdict
from glaze_pipeline.core.providers.http.client import ProviderClient
from glaze_pipeline.core.providers.http.health import ProviderHealth
from glaze_pipeline.core.providers.http.messages import describe_error
from glaze_pipeline.core.providers.http.settings import HttpSettings


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
        """Requests in flight in this process: the configured cap, or this process's share of
        it when several share the vendor (see `ProviderClient.share_limits`)."""
        return self.http.max_concurrency

    def health(self) -> ProviderHealth:
        return self.http.health()

    def open_session(self) -> AbstractAsyncContextManager[None]:
        """This provider's connections for one chunk (see `provider_session`)."""
        return self.http.open_session()

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
            return Verdict(
                self.name, False, f"preflight failed: {describe_error(error)}", tuple(checks)
            )
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
