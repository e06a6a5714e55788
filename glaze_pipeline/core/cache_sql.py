"""The persistent cache tier: provider answers in the `entity_cache` table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from glaze_pipeline.core.cache import CachedAnswer, CacheKey
from glaze_pipeline.core.schema import EntityCacheEntry
from glaze_pipeline.core.store import ID_CHUNK, Store, chunked, utcnow

DEFAULT_TTL = timedelta(days=30)
DEFAULT_MISS_TTL = timedelta(days=1)


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

    def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, CachedAnswer]:
        wanted = set(keys)
        entity_ids = sorted({entity_id for entity_id, _ in wanted})
        found: dict[CacheKey, CachedAnswer] = {}
        now = utcnow()
        for batch in chunked(entity_ids, ID_CHUNK):
            with self.store.engine.connect() as connection:
                rows = connection.execute(
                    select(EntityCacheEntry).where(
                        EntityCacheEntry.entity_id.in_(batch), EntityCacheEntry.expires_at > now
                    )
                ).all()
            for row in rows:
                key = (row.entity_id, row.provider)
                if key in wanted:
                    found[key] = CachedAnswer(
                        found=row.found,
                        values=row.answer.get("values", {}),
                        confidence=row.answer.get("confidence", {}),
                        fetched_at=_aware(row.fetched_at),
                    )
        return found

    def put_many(self, answers: Mapping[CacheKey, CachedAnswer]) -> None:
        """Upsert answers: one executemany, which SQLAlchemy sends as multi-row batches.

        The statement is built once and its compiled form cached; a `.values([...])` of
        thousands of literal rows would be compiled afresh every time (seconds per chunk).
        """
        if not answers:
            return
        insert = pg_insert if self.store.dialect == "postgresql" else sqlite_insert
        statement = insert(EntityCacheEntry)
        statement = statement.on_conflict_do_update(
            index_elements=["entity_id", "provider"],
            set_={
                "found": statement.excluded.found,
                "answer": statement.excluded.answer,
                "fetched_at": statement.excluded.fetched_at,
                "expires_at": statement.excluded.expires_at,
            },
        )
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
        with self.store.engine.begin() as connection:
            connection.execute(statement, rows)


def _aware(moment: datetime) -> datetime:
    # SQLite hands datetimes back naive; they were written in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
