"""The persistent cache tier: provider answers in the `entity_cache` table.

On the event loop (`get_async`, `put_async`: the single-flight's re-reads and write-throughs),
the keys of one tick are read with one SELECT and written with one upsert, in one thread hop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from glaze_pipeline.core import jsontext
from glaze_pipeline.core.cache import CachedAnswer, CacheKey
from glaze_pipeline.core.coalesce import Coalescer, LoopLocal
from glaze_pipeline.core.schema import EntityCacheEntry
from glaze_pipeline.core.store import ID_CHUNK, Store, chunked, utcnow

DEFAULT_TTL = timedelta(days=30)
DEFAULT_MISS_TTL = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class _SqlBatches:
    """One loop's coalesced reads and writes."""

    read: Coalescer[CacheKey, CachedAnswer | None]
    write: Coalescer[tuple[CacheKey, CachedAnswer], None]


class SqlAnswerCache:
    """Answers keyed by (entity id, provider) with an expiry; misses expire sooner."""

    def __init__(
        self,
        store: Store,
        *,
        ttl: timedelta = DEFAULT_TTL,
        miss_ttl: timedelta = DEFAULT_MISS_TTL,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.miss_ttl = miss_ttl
        self._batches: LoopLocal[_SqlBatches] = LoopLocal(self._loop_batches)

    async def get_async(self, key: CacheKey) -> CachedAnswer | None:
        return await self._batches.get().read.submit(key)

    async def put_async(self, key: CacheKey, answer: CachedAnswer) -> None:
        await self._batches.get().write.submit((key, answer))

    def _loop_batches(self) -> _SqlBatches:
        async def read(keys: list[CacheKey]) -> list[CachedAnswer | None]:
            found = await asyncio.to_thread(self.get_many, keys)
            return [found.get(key) for key in keys]

        async def write(answers: list[tuple[CacheKey, CachedAnswer]]) -> list[None]:
            await asyncio.to_thread(self.put_many, dict(answers))
            return [None] * len(answers)

        return _SqlBatches(Coalescer(read), Coalescer(write))

    def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, CachedAnswer]:
        """The unexpired answers for `keys`: one SELECT per ID_CHUNK entities.

        On Postgres the ids travel as one JSON parameter and each answer comes back as text,
        parsed by `jsontext`, the driver's tuples taken at once: a chunk of a job reads
        thousands (every key Redis lacks), and SQLAlchemy's rows with the driver's JSON
        decoding cost ~2.5x the CPU (`python -m glaze_pipeline.bench.cache_throughput`)."""
        wanted = set(keys)
        entity_ids = sorted({entity_id for entity_id, _ in wanted})
        found: dict[CacheKey, CachedAnswer] = {}
        now = utcnow()
        postgres = self.store.dialect == "postgresql"
        for batch in chunked(entity_ids, ID_CHUNK):
            rows: Iterable[Any]
            with self.store.engine.connect() as connection:
                if postgres:
                    params = {"ids": jsontext.dumps(batch), "now": now}
                    result = connection.execute(text(_GET_SQL), params).cursor
                    assert result is not None  # a SELECT has rows to fetch
                    rows = [
                        (entity_id, provider, hit, jsontext.loads(answer), fetched_at)
                        for entity_id, provider, hit, answer, fetched_at in result.fetchall()
                    ]
                else:
                    entry = EntityCacheEntry
                    rows = connection.execute(
                        select(
                            entry.entity_id,
                            entry.provider,
                            entry.found,
                            entry.answer,
                            entry.fetched_at,
                        ).where(entry.entity_id.in_(batch), entry.expires_at > now)
                    ).all()
            for entity_id, provider, was_found, answer, fetched_at in rows:
                key = (entity_id, provider)
                if key in wanted:
                    found[key] = CachedAnswer(
                        found=was_found,
                        values=answer.get("values", {}),
                        confidence=answer.get("confidence", {}),
                        fetched_at=_aware(fetched_at),
                    )
        return found

    def put_many(self, answers: Mapping[CacheKey, CachedAnswer]) -> None:
        """Upsert answers in one statement.

        On Postgres the batch travels as one JSON parameter that the statement reads as a
        record set (as the row merge does): per answer the client only encodes it, where an
        executemany made SQLAlchemy process six parameters and psycopg send one statement in
        its pipeline (~7 % of S3's worker samples). SQLite keeps the executemany, which its driver
        runs in C; its statement's compiled form is cached, where a `.values([...])` of thousands
        of literal rows would be compiled afresh every time.
        """
        if not answers:
            return
        rows = [
            {
                "entity_id": entity_id,
                "provider": provider,
                "found": answer.found,
                "answer": {"values": dict(answer.values), "confidence": dict(answer.confidence)},
                "fetched_at": answer.fetched_at,
                "expires_at": answer.fetched_at + (self.ttl if answer.found else self.miss_ttl),
            }
            for (entity_id, provider), answer in answers.items()
        ]
        if self.store.dialect == "postgresql":
            # Datetimes are written as their text (`jsontext`: default=str), which timestamptz reads.
            with self.store.engine.begin() as connection:
                connection.execute(text(_PUT_SQL), {"payload": jsontext.dumps(rows)})
            return
        statement = sqlite_insert(EntityCacheEntry)
        statement = statement.on_conflict_do_update(
            index_elements=["entity_id", "provider"],
            set_={
                "found": statement.excluded.found,
                "answer": statement.excluded.answer,
                "fetched_at": statement.excluded.fetched_at,
                "expires_at": statement.excluded.expires_at,
            },
        )
        with self.store.engine.begin() as connection:
            connection.execute(statement, rows)


# Postgres: the unexpired answers of a chunk of entity ids (a JSON array), each as its text.
_GET_SQL = """
    SELECT entity_id, provider, found, CAST(answer AS text), fetched_at
    FROM entity_cache
    WHERE entity_id IN (SELECT jsonb_array_elements_text(CAST(:ids AS jsonb)))
      AND expires_at > :now
"""

# Postgres: a batch of answers as one JSON array of records (keys are unique in a batch: it is
# a mapping, so no row is upserted twice by one statement).
_PUT_SQL = """
    INSERT INTO entity_cache AS c (entity_id, provider, found, answer, fetched_at, expires_at)
    SELECT p.entity_id, p.provider, p.found, p.answer, p.fetched_at, p.expires_at
    FROM jsonb_to_recordset(CAST(:payload AS jsonb)) AS p(
        entity_id text, provider text, found boolean, answer jsonb,
        fetched_at timestamptz, expires_at timestamptz)
    ON CONFLICT (entity_id, provider) DO UPDATE SET
        found = excluded.found,
        answer = excluded.answer,
        fetched_at = excluded.fetched_at,
        expires_at = excluded.expires_at
"""


def _aware(moment: datetime) -> datetime:
    # SQLite hands datetimes back naive; they were written in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
