"""The provider contract the waterfall relies on, and the errors it acts on.

A provider answers for one entity type. Its errors form a small hierarchy so that the waterfall
can tell "this entity does not exist there" (not found: try the next provider, charge only if the
vendor charges misses) from "the provider could not answer" (rate limited, transient, bad
response, fatal: record the error, try the next provider, charge nothing).

Each error also says whether a request left the machine (`sent`): a lookup refused on our side
(a missing key, an open circuit, an address the SSRF guard refuses) is not a call, and the
waterfall counts it apart instead of as one.

Every message is redacted when the error is made (see `core.redact`): whatever text a provider
wraps (an httpx error, a vendor's body), no configured secret reaches a cell or a log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from glaze_pipeline.core.models import EntityKey, EntityType
from glaze_pipeline.core.redact import redact


class ProviderError(Exception):
    """Base of every error a provider raises; `provider` names who raised it.

    `sent`: whether a request left the machine before the error. The class says what its
    errors usually are (False: refused before anything was sent); `sent=` overrides it for one
    error, e.g. a refusal on a redirect hop, after the first request did go out.
    """

    sent: bool = True

    def __init__(self, message: str, *, provider: str = "", sent: bool | None = None) -> None:
        super().__init__(redact(message))
        self.provider = provider
        if sent is not None:
            self.sent = sent


class EntityNotFound(ProviderError):
    """The provider answered: it knows nothing of this entity."""


class RateLimited(ProviderError):
    """429 or equivalent after the retries allowed; `retry_after` in seconds when given."""

    def __init__(self, message: str, *, provider: str = "", retry_after: float | None = None):
        super().__init__(message, provider=provider)
        self.retry_after = retry_after


class TransientProviderError(ProviderError):
    """Timeouts, connection errors, 5xx: worth retrying later, not now."""


class Unreachable(TransientProviderError):
    """No attempt could connect to the vendor (refused, unresolvable, connect timeout): nothing
    was asked of it. Not a call, but a failure of the vendor's all the same (the breaker counts
    it)."""

    sent = False


class BadResponse(ProviderError):
    """The provider answered with something we cannot parse or trust."""


class FatalProviderError(ProviderError):
    """Misconfiguration or refusal (401/403, bad request): retrying will not help."""


class CredentialsMissing(FatalProviderError):
    """The provider's API key is not set, or cannot be sent (see `http.read_secret`): nothing
    was sent, and nothing will be until the key is fixed."""

    sent = False


class AddressRefused(FatalProviderError):
    """The target resolves to an address that is not public (loopback, private, link-local,
    metadata, ...): refused before connecting, on the first request or a redirect.

    Fatal, not "not found": the provider did not answer, and asking again will not help. The
    circuit breaker does not count it, since it says nothing about the provider's health (a
    sheet full of internal domains must not switch the provider off for everyone).
    """

    sent = False


class ProviderUnavailable(ProviderError):
    """The provider is switched off for now (circuit open); it was not called."""

    sent = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a provider can be used now, from what is knowable without spending.

    `reason` says why not, without the provider's name in front (the caller adds it where it
    needs it); `checks` lists what was checked, e.g. ("configured", "credentials", "probe").
    """

    provider: str
    usable: bool
    reason: str | None = None
    checks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A reason may quote a vendor or an exception: as safe to print as a ProviderError.
        if self.reason is not None:
            object.__setattr__(self, "reason", redact(self.reason))

    @property
    def status(self) -> str:
        return "ok" if self.usable else "unavailable"

    def as_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "status": self.status,
            "reason": self.reason,
            "checks": list(self.checks),
        }


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """What a provider found: values by catalogue field, with an optional per-field confidence."""

    values: Mapping[str, Any]
    confidence: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Provider(Protocol):
    """An enrichment source for one entity type."""

    @property
    def name(self) -> str: ...

    @property
    def entity_type(self) -> EntityType: ...

    @property
    def fields(self) -> frozenset[str]: ...

    @property
    def cost_per_call(self) -> float: ...

    @property
    def confidence(self) -> float: ...

    @property
    def charges_misses(self) -> bool: ...

    @property
    def max_concurrency(self) -> int: ...

    async def lookup(self, key: EntityKey, fields: frozenset[str]) -> ProviderAnswer:
        """Answer for one entity, or raise a ProviderError subclass."""
        ...


# --- what a provider may also do ----------------------------------------------------------
#
# Optional capabilities, each a protocol of its own: a provider has one by having its member,
# and whoever uses it checks with isinstance. One list of them, here, instead of getattr
# probes spread over the waterfall, the engine, the estimate and the registry.


@runtime_checkable
class ChoosesKeys(Protocol):
    """Looks up only some kinds of key (a website provider needs a domain): the waterfall
    skips it for the others. Without it, a provider takes every key of its entity type."""

    def supports(self, key: EntityKey) -> bool: ...


@runtime_checkable
class NamesItsSource(Protocol):
    """Says more than its name in a cell's provenance (an LLM: its model and prompt version)."""

    @property
    def source(self) -> str: ...


@runtime_checkable
class KnowsWhenUnavailable(Protocol):
    """Can tell, without a call, that it cannot be called now (open circuit, missing key): the
    waterfall asks before journalling a call, so such an attempt never counts as one."""

    def unavailable_reason(self) -> str | None: ...


@runtime_checkable
class AlwaysAnswers(Protocol):
    """Answers every question it is asked (an LLM): the estimate's prior says so."""

    @property
    def always_answers(self) -> bool: ...


@runtime_checkable
class KeepsLlmCalls(Protocol):
    """Keeps a record of its LLM attempts (tokens, cost) for the engine to write per request."""

    def take_llm_calls(self) -> list[Any]: ...


@runtime_checkable
class ReportsHealth(Protocol):
    """Reports its circuit and last error (HTTP providers' `ProviderHealth`) for `glaze
    providers` and the API."""

    def health(self) -> object: ...


@runtime_checkable
class ChecksItself(Protocol):
    """Can say before a job whether it is usable (configured, credentials, a free probe)."""

    async def preflight(self, *, probe: bool) -> Verdict: ...


@runtime_checkable
class LooksUpMany(Protocol):
    """Can ask a vendor's batch endpoint about many entities in one request.

    `batch_size` is how many one request takes, 0 when this provider has no batch endpoint
    configured (the class may have the member while an instance has nothing to batch);
    `batches(key)` whether `key` is of a kind the endpoint takes. `lookup_many` answers by
    `EntityKey.id`, every key given: an answer, or the error for that entity (`EntityNotFound`
    for one the batch left out, the batch's error for every member of a failed one).
    `batching.with_batching` puts a micro-batcher in front of such providers.
    """

    @property
    def batch_size(self) -> int: ...

    def batches(self, key: EntityKey) -> bool: ...

    async def lookup_many(
        self, keys: Sequence[EntityKey], fields: frozenset[str]
    ) -> dict[str, ProviderAnswer | ProviderError]: ...


_CLASS_CAPABILITIES: dict[tuple[type, type], bool] = {}


def has_capability(provider: object, capability: type) -> bool:
    """`isinstance(provider, capability)`, decided once per provider class: a runtime protocol
    check costs ~7 µs on Python 3.11 and the waterfall asks per lookup and per value. Our
    providers declare their capabilities on the class, so the class decides."""
    key = (type(provider), capability)
    found = _CLASS_CAPABILITIES.get(key)
    if found is None:
        found = _CLASS_CAPABILITIES[key] = isinstance(provider, capability)
    return found


class ProviderConfig(Protocol):
    """What the registry needs of any entry of the providers file, whatever its kind."""

    @property
    def kind(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def enabled(self) -> bool: ...


ConfigT = TypeVar("ConfigT", bound=BaseModel)


@dataclass(frozen=True)
class ProviderKind(Generic[ConfigT]):
    """One `kind:` of the providers file: its entry model and how an entry becomes a provider.

    Each kind's module declares one next to its config and provider class, and the registry
    lists them (`registry.PROVIDER_KINDS`): the file's schema, `build_provider` and the kind
    `glaze providers` shows are all read from these. `config` must have a `kind: Literal[...]`
    field whose default is the kind's name.
    """

    config: type[ConfigT]
    provider: type  # what providers of this kind are instances of (`describe_providers`)
    build: Callable[[ConfigT], Provider]
    # Settings that hold a URL, and settings that hold URLs by name: `${VAR:-default}` in them
    # is filled from the environment when the file is loaded (and nowhere else: no secrets).
    url_settings: tuple[str, ...] = ()
    url_maps: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The kind as written in the file (`fake`, `json_api`, ...): the config's own default."""
        default = self.config.model_fields["kind"].default
        if not isinstance(default, str):
            raise TypeError(f"{self.config.__name__}.kind needs a literal default")
        return default
