"""Provider answers cached by (entity, provider), so a re-run buys nothing twice.

Three tiers, fastest first: this process's memory (bounded LRU), Redis shared by every
process (optional), and the `entity_cache` table (durable). `TieredCache` reads through them
and back-fills the faster ones; `glaze_pipeline.core.answers` builds the stack the engine uses.

A tier may also offer `get_async(key)` / `put_async(key, answer)`: one key on the event loop,
coalesced with the other lookups of the tick (the single-flight's re-read and write-through).
`read_one` / `write_one` use them where a tier has them, else a thread hop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

CacheKey = tuple[str, str]  # (entity id, provider name)

DEFAULT_MEMORY_ENTRIES = 20_000
DEFAULT_MEMORY_MAX_AGE = timedelta(minutes=15)


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
    """The in-process tier: an LRU bounded in entries and in age.

    Bounded so that a 100k-entity job (or a long-lived process running many jobs) holds at most
    `max_entries` answers; aged so that it never serves an answer much longer than the shared
    tiers, which expire and invalidate on their own, would. Thread-safe: chunks of one process
    may run in threads and share it.
    """

    def __init__(
        self,
        max_entries: int = DEFAULT_MEMORY_ENTRIES,
        *,
        max_age: timedelta | None = DEFAULT_MEMORY_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._max_age_s = max_age.total_seconds() if max_age is not None else None
        self._answers: OrderedDict[CacheKey, tuple[float, CachedAnswer]] = OrderedDict()
        self._lock = threading.Lock()
        self._clock = clock  # seconds, monotonic; tests pass their own to age answers

    def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, CachedAnswer]:
        found: dict[CacheKey, CachedAnswer] = {}
        now = self._clock()
        with self._lock:
            for key in keys:
                entry = self._answers.get(key)
                if entry is None:
                    continue
                stored_at, answer = entry
                if self._max_age_s is not None and now - stored_at > self._max_age_s:
                    del self._answers[key]
                    continue
                self._answers.move_to_end(key)
                found[key] = answer
        return found

    def put_many(self, answers: Mapping[CacheKey, CachedAnswer]) -> None:
        now = self._clock()
        with self._lock:
            for key, answer in answers.items():
                self._answers[key] = (now, answer)
                self._answers.move_to_end(key)
            while len(self._answers) > self.max_entries:
                self._answers.popitem(last=False)

    async def get_async(self, key: CacheKey) -> CachedAnswer | None:
        return self.get_many([key]).get(key)

    async def put_async(self, key: CacheKey, answer: CachedAnswer) -> None:
        self.put_many({key: answer})

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

    async def get_async(self, key: CacheKey) -> CachedAnswer | None:
        for depth, tier in enumerate(self.tiers):
            found = await read_one(tier, key)
            if found is not None:
                for faster in self.tiers[:depth]:
                    await write_one(faster, key, found)
                return found
        return None

    async def put_async(self, key: CacheKey, answer: CachedAnswer) -> None:
        for tier in self.tiers:
            await write_one(tier, key, answer)


def tiers_of(cache: AnswerCache) -> list[AnswerCache]:
    """The tiers a cache writes to: its `tiers` where it has them (a `TieredCache`, a claim's
    meeting place); else itself."""
    tiers: Iterable[AnswerCache] | None = getattr(cache, "tiers", None)
    return list(tiers) if tiers is not None else [cache]


async def read_one(tier: AnswerCache, key: CacheKey) -> CachedAnswer | None:
    """One answer from `tier` on the event loop: coalesced where the tier can, else a thread."""
    get = getattr(tier, "get_async", None)
    if get is not None:
        found: CachedAnswer | None = await get(key)
        return found
    return (await asyncio.to_thread(tier.get_many, [key])).get(key)


async def write_one(tier: AnswerCache, key: CacheKey, answer: CachedAnswer) -> None:
    """Write one answer to `tier` on the event loop: coalesced where the tier can."""
    put = getattr(tier, "put_async", None)
    if put is not None:
        await put(key, answer)
    else:
        await asyncio.to_thread(tier.put_many, {key: answer})
