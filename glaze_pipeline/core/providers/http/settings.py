"""How a provider talks HTTP: its settings, and what a lookup it cannot make raises."""

from __future__ import annotations

import httpx
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from glaze_pipeline.core.providers.base import ProviderUnavailable

USER_AGENT = "GlazeBot/0.1 (+https://glaze.dev/bot)"


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
