"""Estimates: what a job would buy, without buying anything.

The estimate runs the real waterfall (same order, threshold, cache and budget rules) over
stand-in providers that answer every field they supply at their usual confidence and never
leave the process, against a read-only view of the cache. So the estimate and the job can
never disagree about the rules, only about what vendors actually know.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from glaze_pipeline.core.cache import AnswerCache, CachedAnswer, CacheKey
from glaze_pipeline.core.models import EntityKey, EntityType
from glaze_pipeline.core.providers.base import Provider, ProviderAnswer
from glaze_pipeline.core.waterfall import WaterfallStats

DRY_VALUE = "(estimate)"


class DryRunProvider:
    """Stands in for a provider: same name, cost, fields and confidence; no I/O."""

    def __init__(self, provider: Provider) -> None:
        self.name = provider.name
        self.entity_type: EntityType = provider.entity_type
        self.fields = provider.fields
        self.cost_per_call = provider.cost_per_call
        self.confidence = provider.confidence
        self.charges_misses = provider.charges_misses
        self.max_concurrency = 10_000

    async def lookup(self, key: EntityKey, fields: frozenset[str]) -> ProviderAnswer:
        return ProviderAnswer(dict.fromkeys(fields, DRY_VALUE))


class ReadOnlyCache:
    """A cache view that reads through and never stores the stand-in answers."""

    def __init__(self, cache: AnswerCache | None) -> None:
        self._cache = cache

    def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, CachedAnswer]:
        return self._cache.get_many(keys) if self._cache is not None else {}

    def put_many(self, answers: Mapping[CacheKey, CachedAnswer]) -> None:
        return None


def estimate_report(
    stats: WaterfallStats, *, entities: int, cells: int, cells_without_identifier: int
) -> dict[str, Any]:
    """The figures stored on an `estimate` request (JSON)."""
    return {
        "unique_entities": entities,
        "cells": cells,
        "cells_without_identifier": cells_without_identifier,
        "cache_hits": stats.cache_hits,
        "expected_provider_calls": dict(stats.calls),
        "expected_cost_by_provider": {name: round(cost, 6) for name, cost in stats.cost.items()},
        "expected_cost": round(sum(stats.cost.values()), 6),
    }
