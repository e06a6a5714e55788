"""How provider answers are shared between runs: the tiered cache and the single-flight.

`open_answer_sharing(store, redis_url)` builds the pair a job uses, consistently:

- with Redis, on Postgres: memory -> Redis -> SQL; runs lock and meet in Redis, and a bought
  answer is written through to Redis before the lock is let go, and to the `entity_cache`
  table by the chunk's flush. While Redis is down, runs lock and meet in Postgres: after
  waiting out the purchases made under Redis locks, so single-flight survives the outage
  (`FallbackFlight`; `always_guard` takes the Postgres lock behind every Redis one instead);
- with Redis, on SQLite: memory -> Redis -> SQL, and Redis locks; while Redis is down, steps
  side by side fall back to the file locks, and a run in one process goes ahead unlocked
  (logged once);
- without Redis, on Postgres: memory -> SQL, and advisory locks; the answer is written through
  to the `entity_cache` table;
- without Redis, on SQLite (the embedded default): memory -> SQL. A run in one process takes
  no lock; steps side by side (`side_by_side`: the multiprocess executor, Celery workers on
  this machine) lock a file beside the database (`FileFlight`) and write a bought answer
  through to the `entity_cache` table before letting go. Not in one process: that write,
  under the lock, waits for SQLite's one writer behind the rows' writes (a 60,000-row table
  in process took 74.5-78.9 s with the file locks against 59.5-62.1 s without, interleaved).
  An in-memory database, or a system without open-file-description locks (macOS), has none.
  Two runs at once, each in one process, do not lock either: they may both buy an entity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from glaze_pipeline.core.cache import AnswerCache, MemoryCache, TieredCache
from glaze_pipeline.core.cache_redis import (
    DEFAULT_MISS_TTL,
    DEFAULT_TTL,
    RedisAnswerCache,
    RedisBreaker,
)
from glaze_pipeline.core.cache_sql import SqlAnswerCache
from glaze_pipeline.core.flight import Flight, NoFlight
from glaze_pipeline.core.singleflight import (
    DEFAULT_LOCK_TTL,
    DEFAULT_MAX_WAIT,
    FallbackFlight,
    FileFlight,
    PostgresFlight,
    RedisFlight,
    offers_file_locks,
)
from glaze_pipeline.core.store import Store

REDIS_TIMEOUT_S = 2.0


def redis_client(url: str) -> redis.Redis:
    """A Redis client with explicit timeouts and one quick retry: a stalled Redis must not
    stall a job (redis-py's default is 10 retries, seconds per failing call), and every Redis
    use here fails open."""
    return redis.Redis.from_url(
        url,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), 1),
    )


@dataclass(frozen=True)
class SharingSettings:
    """TTLs and waits of the shared tiers; the defaults suit provider calls of a few seconds."""

    redis_ttl: timedelta = DEFAULT_TTL
    redis_ttl_by_provider: Mapping[str, timedelta] = field(default_factory=dict)
    redis_miss_ttl: timedelta = DEFAULT_MISS_TTL
    lock_ttl: timedelta = DEFAULT_LOCK_TTL
    max_wait: timedelta = DEFAULT_MAX_WAIT
    # Redis down: how long the first claims wait before locking in Postgres (None: `max_wait`
    # and 2 s: a purchase under a Redis lock has by then ended and been flushed to SQL, or its
    # waiters would have gone ahead without it anyway).
    outage_grace: timedelta | None = None
    always_guard: bool = False  # take the Postgres lock behind every Redis one (FallbackFlight)


@dataclass
class AnswerSharing:
    """The cache and the single-flight of one process (or one chunk); `close()` when done."""

    cache: AnswerCache
    flight: Flight
    redis: redis.Redis | None = None

    @property
    def backend(self) -> str:
        """Where runs meet: "redis+postgres", "redis", "postgres" or "none" (for run logs)."""
        return self.flight.backend

    def close(self) -> None:
        self.flight.close()
        if self.redis is not None:
            self.redis.close()

    def __enter__(self) -> AnswerSharing:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def open_answer_sharing(
    store: Store,
    redis_url: str | None = None,
    *,
    memory: MemoryCache | None = None,
    settings: SharingSettings | None = None,
    side_by_side: bool = False,
) -> AnswerSharing:
    """Build the tiered cache and the matching single-flight for `store` (+ optional Redis).

    Pass a long-lived `memory` tier to share it between the chunks a process runs; by default
    each AnswerSharing has its own. `side_by_side`: this step runs while others of its run do,
    in processes of their own (on SQLite, it then takes the file locks). Nothing here reads
    the environment: the caller passes `settings.redis_url()`.
    """
    settings = settings or SharingSettings()
    memory = memory if memory is not None else MemoryCache()
    sql = SqlAnswerCache(store)
    database = _database_flight(store, sql, settings, side_by_side=side_by_side)
    if not redis_url:
        return AnswerSharing(TieredCache([memory, sql]), database)
    client = redis_client(redis_url)
    breaker = RedisBreaker()  # one server: when the cache finds it down, so does the flight
    shared = RedisAnswerCache(
        client,
        ttl=settings.redis_ttl,
        ttl_by_provider=settings.redis_ttl_by_provider,
        miss_ttl=settings.redis_miss_ttl,
        breaker=breaker,
    )
    on_redis = RedisFlight(
        client,
        shared=shared,
        lock_ttl=settings.lock_ttl,
        max_wait=settings.max_wait,
        breaker=breaker,
    )
    grace = settings.outage_grace
    flight = FallbackFlight(
        on_redis,
        database,
        grace=grace if grace is not None else settings.max_wait + timedelta(seconds=2),
        always_guard=settings.always_guard,
    )
    return AnswerSharing(TieredCache([memory, shared, sql]), flight, client)


def _lock_file(store: Store) -> str | None:
    """Where a SQLite database's single-flight locks live: `<database>-flights`, beside its
    `-wal` and `-shm` files. None: Postgres, in-memory SQLite, no file locks here."""
    database = store.sqlite_file
    if database is None or not offers_file_locks():
        return None
    return f"{database}-flights"


def _database_flight(
    store: Store, sql: SqlAnswerCache, settings: SharingSettings, *, side_by_side: bool
) -> Flight:
    """The store's own single-flight: advisory locks on Postgres; on a SQLite file, file locks
    for steps side by side, none in one process."""
    if store.dialect == "postgresql":
        return PostgresFlight(store.url, shared=sql, max_wait=settings.max_wait)
    lock_file = _lock_file(store) if side_by_side else None
    if lock_file is not None:
        return FileFlight(lock_file, shared=sql, max_wait=settings.max_wait)
    return NoFlight()
