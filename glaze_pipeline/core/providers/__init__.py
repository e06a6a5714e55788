"""Enrichment providers: the contract, the fake provider, and the registry."""

from glaze_pipeline.core.providers.base import (
    BadResponse,
    EntityNotFound,
    FatalProviderError,
    Provider,
    ProviderAnswer,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    TransientProviderError,
)

__all__ = [
    "BadResponse",
    "EntityNotFound",
    "FatalProviderError",
    "Provider",
    "ProviderAnswer",
    "ProviderError",
    "ProviderUnavailable",
    "RateLimited",
    "TransientProviderError",
]
