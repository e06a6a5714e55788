"""How provider answers are shared between runs: the tiered cache and the single-flight.

`open_answer_sharing(store, redis_url)` builds the pair a job uses, consistently:

- with Redis, on Postgres: memory -> Redis -> SQL; runs lock and meet in Redis, and a bought
  answer is written through to Redis before the lock is let go, and to the `entity_cache`
  table by the chunk's flush. While Redis is down, runs lock and meet in Postgres: after
  waiting out the purchases made under Redis locks, so single-flight survives the outage
  (`FallbackFlight`; `always_guard` takes the Postgres lock behind every Redis one instead);
- with Redis, on SQLite: memory -> Redis -> SQL, and Redis locks; while Redis is down, the
  file locks behind them as on Postgres (or, with none, runs go ahead unlocked, logged once);
- without Redis, on Postgres: memory -> SQL, and advisory locks; the answer is written through
  to the `entity_cache` table;
- without Redis, on SQLite (the embedded default): memory -> SQL, and file locks next to the
  database (`FileFlight`: the processes of one machine, e.g. two runs, or the steps of a
  multiprocess run); the answer is written through to the `entity_cache` table. An in-memory
  SQLite database, or a system without open-file-description locks, has none: no locking.
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
) -> AnswerSharing:
    """Build the tiered cache and the matching single-flight for `store` (+ optional Redis).

    Pass a long-lived `memory` tier to share it between the chunks a process runs; by default
    each AnswerSharing has its own. Nothing here reads the environment: the caller passes
    `settings.redis_url()`.
    """
    settings = settings or SharingSettings()
    memory = memory if memory is not None else MemoryCache()
    sql = SqlAnswerCache(store)
    database = _database_flight(store, sql, settings)
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


def shared_across_processes(store: Store, redis_url: str | None) -> bool:
    """Whether `open_answer_sharing(store, redis_url)` gives a single-flight that holds across
    processes (Redis, or the store's own: advisory locks on Postgres, file locks next to a
    SQLite file), so steps running at once in processes of their own still buy each entity
    once."""
    return bool(redis_url) or store.dialect == "postgresql" or _lock_file(store) is not None


def _lock_file(store: Store) -> str | None:
    """Where a SQLite database's single-flight locks live: `<database>-flights`, beside its
    `-wal` and `-shm` files. None: Postgres, in-memory SQLite, no file locks here."""
    database = store.sqlite_file
    if database is None or not offers_file_locks():
        return None
    return f"{database}-flights"


def _database_flight(store: Store, sql: SqlAnswerCache, settings: SharingSettings) -> Flight:
    """The store's own single-flight: advisory locks on Postgres, file locks on a SQLite file,
    none for an in-memory database."""
    if store.dialect == "postgresql":
        return PostgresFlight(store.url, shared=sql, max_wait=settings.max_wait)
    lock_file = _lock_file(store)
    if lock_file is not None:
        return FileFlight(lock_file, shared=sql, max_wait=settings.max_wait)
    return NoFlight()
