"""Resilient HTTP for providers: one pooled client each, timeouts, retries, limits, a breaker.

The public surface is re-exported here; the modules behind it are private-ish:

- `settings`: `HttpSettings` (timeouts, retries, limits, breaker) and `UnsupportedLookup`;
- `resilience`: the circuit breaker, the rate limiter and `Retry-After` parsing;
- `shared_limits`: a vendor's rate limit shared through Redis by every process that uses it;
- `transport`: connections spread over many small pools, optionally through an egress guard;
- `client`: `ProviderClient`, which turns what HTTP can do wrong into provider errors; its
  policy (breaker, limiter, stats) lives with the provider, its connections for one session;
- `health`: counters, `ProviderHealth` and the free health probe;
- `provider`: `HttpBackedProvider`, what every HTTP provider shares, preflight included;
- `secrets`: API keys and `${VAR}` placeholders from the environment.

`provider_session` and friends live in `core.providers.session` (they know no HTTP) and are
re-exported here for the callers that already import them from this package.
"""

from glaze_pipeline.core.providers.http.client import (
    ERROR_DETAIL_CHARS,
    NOT_FOUND_STATUSES,
    RETRYABLE_STATUSES,
    HttpResponse,
    ProviderClient,
)
from glaze_pipeline.core.providers.http.health import HttpStats, ProviderHealth, probe_health
from glaze_pipeline.core.providers.http.provider import HttpBackedProvider
from glaze_pipeline.core.providers.http.resilience import (
    CircuitBreaker,
    CircuitState,
    RateLimiter,
    parse_retry_after,
)
from glaze_pipeline.core.providers.http.secrets import (
    expand_env,
    load_secret,
    read_secret,
    secret_problem,
)
from glaze_pipeline.core.providers.http.settings import USER_AGENT, HttpSettings, UnsupportedLookup
from glaze_pipeline.core.providers.http.shared_limits import SharedRateLimiter
from glaze_pipeline.core.providers.http.transport import ShardedTransport, pool_transport
from glaze_pipeline.core.providers.session import (
    ClosableProvider,
    SessionedProvider,
    aclose_providers,
    provider_session,
)

__all__ = [
    "ERROR_DETAIL_CHARS",
    "NOT_FOUND_STATUSES",
    "RETRYABLE_STATUSES",
    "USER_AGENT",
    "CircuitBreaker",
    "CircuitState",
    "ClosableProvider",
    "HttpBackedProvider",
    "HttpResponse",
    "HttpSettings",
    "HttpStats",
    "ProviderClient",
    "ProviderHealth",
    "RateLimiter",
    "SessionedProvider",
    "ShardedTransport",
    "SharedRateLimiter",
    "UnsupportedLookup",
    "aclose_providers",
    "expand_env",
    "load_secret",
    "parse_retry_after",
    "pool_transport",
    "probe_health",
    "provider_session",
    "read_secret",
    "secret_problem",
]
