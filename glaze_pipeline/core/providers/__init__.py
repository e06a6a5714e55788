"""Enrichment providers: the contract, the fake provider, and the registry."""

from glaze_pipeline.core.providers.base import (
    AddressRefused,
    BadResponse,
    CredentialsMissing,
    EntityNotFound,
    FatalProviderError,
    Provider,
    ProviderAnswer,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    TransientProviderError,
    Unreachable,
    Verdict,
)

__all__ = [
    "AddressRefused",
    "BadResponse",
    "CredentialsMissing",
    "EntityNotFound",
    "FatalProviderError",
    "Provider",
    "ProviderAnswer",
    "ProviderError",
    "ProviderUnavailable",
    "RateLimited",
    "TransientProviderError",
    "Unreachable",
    "Verdict",
]
