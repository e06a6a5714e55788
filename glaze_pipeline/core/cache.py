"""Provider answers cached by (entity, provider), so a re-run buys nothing twice."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

CacheKey = tuple[str, str]  # (entity id, provider name)


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A provider's answer for one entity: found with values, or a remembered miss."""

    found: bool
    values: Mapping[str, Any]
    confidence: Mapping[str, float]
    fetched_at: datetime


class AnswerCache(Protocol):
    """A cache tier; every call is batched so a chunk costs one round trip each way."""

    def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, CachedAnswer]: ...

    def put_many(self, answers: Mapping[CacheKey, CachedAnswer]) -> None: ...


class MemoryCache:
    """The in-process tier (also the whole cache of a store-less unit test)."""

    def __init__(self) -> None:
        self._answers: dict[CacheKey, CachedAnswer] = {}

    def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, CachedAnswer]:
        return {key: self._answers[key] for key in keys if key in self._answers}

    def put_many(self, answers: Mapping[CacheKey, CachedAnswer]) -> None:
        self._answers.update(answers)

    def __len__(self) -> int:
        return len(self._answers)


class TieredCache:
    """Reads through tiers in order (fastest first) and back-fills the faster ones on a hit."""

    def __init__(self, tiers: list[AnswerCache]) -> None:
        self.tiers = tiers

    def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, CachedAnswer]:
        missing = list(dict.fromkeys(keys))
        found: dict[CacheKey, CachedAnswer] = {}
        for depth, tier in enumerate(self.tiers):
            if not missing:
                break
            hits = tier.get_many(missing)
            if hits:
                for faster in self.tiers[:depth]:
                    faster.put_many(hits)
                found.update(hits)
                missing = [key for key in missing if key not in hits]
        return found

    def put_many(self, answers: Mapping[CacheKey, CachedAnswer]) -> None:
        if answers:
            for tier in self.tiers:
                tier.put_many(answers)
