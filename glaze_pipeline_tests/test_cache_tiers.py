"""The three cache tiers against real services: memory (LRU), Redis, and the SQL table."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import select

from glaze_pipeline.core.answers import open_answer_sharing
from glaze_pipeline.core.cache import CachedAnswer, CacheKey, MemoryCache, TieredCache
from glaze_pipeline.core.cache_redis import (
    DEFAULT_TTL,
    KEYS_PER_COMMAND,
    RedisAnswerCache,
    RedisBreaker,
    RedisLink,
    redis_link,
)
from glaze_pipeline.core.cache_sql import SqlAnswerCache
from glaze_pipeline.core.flight import NoFlight
from glaze_pipeline.core.schema import EntityCacheEntry
from glaze_pipeline.core.singleflight import FallbackFlight, PostgresFlight, RedisFlight
from glaze_pipeline.core.store import Store

HIT_KEY: CacheKey = ("company:domain:acme.com", "clearbit")
MISS_KEY: CacheKey = ("company:domain:nobody.example", "clearbit")


def found(fetched_at: datetime | None = None, **values: object) -> CachedAnswer:
    return CachedAnswer(
        found=True,
        values=values or {"industry": "Software", "employee_count": 120, "name": "Açme"},
        confidence={"industry": 0.95},
        fetched_at=fetched_at or datetime.now(UTC),
    )


def missing(fetched_at: datetime | None = None) -> CachedAnswer:
    return CachedAnswer(False, {}, {}, fetched_at or datetime.now(UTC))


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# -- memory tier ---------------------------------------------------------------------------


def test_memory_tier_is_a_bounded_lru() -> None:
    cache = MemoryCache(max_entries=3, max_age=None)
    keys = [(f"company:domain:c{i}.com", "p") for i in range(4)]
    cache.put_many({key: found() for key in keys[:3]})
    cache.get_many([keys[0]])  # c0 is now the most recently used; c1 the least
    cache.put_many({keys[3]: found()})

    assert len(cache) == 3
    assert set(cache.get_many(keys)) == {keys[0], keys[2], keys[3]}


def test_memory_tier_never_grows_past_its_bound() -> None:
    cache = MemoryCache(max_entries=1000, max_age=None)
    for start in range(0, 30_000, 3_000):
        cache.put_many(
            {(f"company:domain:c{i}.com", "p"): found() for i in range(start, start + 3000)}
        )
    assert len(cache) == 1000
    assert cache.get_many([("company:domain:c29999.com", "p")])  # the newest are kept
    assert not cache.get_many([("company:domain:c0.com", "p")])


def test_memory_tier_forgets_answers_older_than_max_age() -> None:
    now = [100.0]
    cache = MemoryCache(max_entries=10, max_age=timedelta(seconds=20), clock=lambda: now[0])
    cache.put_many({HIT_KEY: found()})
    now[0] += 20  # exactly max_age: still served
    assert cache.get_many([HIT_KEY])
    now[0] += 0.001
    assert cache.get_many([HIT_KEY]) == {}
    assert len(cache) == 0


# -- Redis tier ----------------------------------------------------------------------------


def test_redis_tier_round_trip(client: redis.Redis) -> None:
    cache = RedisAnswerCache(client)
    answers = {HIT_KEY: found(), MISS_KEY: missing()}
    cache.put_many(answers)

    got = cache.get_many([HIT_KEY, MISS_KEY, ("company:domain:never.com", "clearbit")])

    assert got == answers  # exact, fetched_at to the microsecond included
    assert got[MISS_KEY].found is False
    raw = client.get("glaze:answer:clearbit:company:domain:acme.com")
    assert isinstance(raw, bytes)
    assert b" " not in raw.replace(b"A\xc3\xa7me", b"")  # compact JSON, UTF-8 kept as is
    assert json.loads(raw)["v"]["industry"] == "Software"


def test_redis_tier_key_prefix_is_configurable(client: redis.Redis) -> None:
    ours = RedisAnswerCache(client, prefix="tenant1:answer:")
    theirs = RedisAnswerCache(client)
    ours.put_many({HIT_KEY: found()})

    assert client.exists("tenant1:answer:clearbit:company:domain:acme.com") == 1
    assert theirs.get_many([HIT_KEY]) == {}
    assert ours.get_many([HIT_KEY])


def test_redis_tier_batches_larger_than_one_command(client: redis.Redis) -> None:
    cache = RedisAnswerCache(client)
    answers = {(f"company:domain:c{i}.com", "p"): found() for i in range(2500)}
    cache.put_many(answers)
    keys = [*answers, ("company:domain:absent.com", "p")]
    assert cache.get_many(keys) == answers


def _calls(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("calls", 0))


def test_redis_tier_writes_a_batch_of_answers_in_one_command(client: redis.Redis) -> None:
    cache = RedisAnswerCache(client)
    miss = missing()
    cache.put_many({MISS_KEY: miss})  # the script is loaded
    answers = {(f"company:domain:c{i}.com", "p"): found() for i in range(KEYS_PER_COMMAND + 1)}
    scripts = _calls(client, "evalsha")

    cache.put_many(answers)

    assert _calls(client, "evalsha") - scripts == 2  # KEYS_PER_COMMAND, then the one left
    assert cache.get_many([*answers, MISS_KEY]) == {**answers, MISS_KEY: miss}


def test_redis_tier_writes_with_sets_where_scripts_are_refused(
    client: redis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A user the server's ACL keeps from running scripts (as a managed Redis may).
    user = "glaze_test_no_scripts"
    client.acl_setuser(
        user, enabled=True, nopass=True, keys=["*"], commands=["+@all", "-@scripting"]
    )
    limited = redis.Redis.from_url(redis_url, username=user)
    try:
        cache = RedisAnswerCache(limited)
        answers = {(f"company:domain:c{i}.com", "p"): found() for i in range(1500)}
        hit = found()
        cache.put_many(answers)
        cache.put_many({HIT_KEY: hit})

        assert cache.get_many([*answers, HIT_KEY]) == {**answers, HIT_KEY: hit}
        assert not cache.breaker.open  # a refusal is not an outage
        refusals = [r for r in caplog.records if "refused the batch-write script" in r.message]
        assert len(refusals) == 1  # SETs from then on
        week = int(DEFAULT_TTL.total_seconds())
        assert week - 60 <= limited.ttl(cache.key(HIT_KEY)) <= week  # written with its TTL
    finally:
        limited.close()
        client.acl_deluser(user)


def test_redis_tier_ttl_per_provider_and_shorter_for_misses(client: redis.Redis) -> None:
    cache = RedisAnswerCache(
        client,
        ttl=timedelta(hours=1),
        ttl_by_provider={"slow_vendor": timedelta(hours=2), "volatile": timedelta(minutes=5)},
        miss_ttl=timedelta(minutes=10),
    )
    now = datetime.now(UTC)
    cache.put_many(
        {
            ("company:domain:a.com", "clearbit"): found(now),
            ("company:domain:b.com", "clearbit"): missing(now),
            ("company:domain:a.com", "slow_vendor"): found(now),
            ("company:domain:b.com", "volatile"): missing(now),  # capped by the provider's TTL
        }
    )

    def ttl(provider: str, entity: str) -> int:
        return int(client.ttl(f"glaze:answer:{provider}:company:domain:{entity}"))

    assert 3590 <= ttl("clearbit", "a.com") <= 3600
    assert 590 <= ttl("clearbit", "b.com") <= 600
    assert 7190 <= ttl("slow_vendor", "a.com") <= 7200
    assert 290 <= ttl("volatile", "b.com") <= 300


def test_redis_tier_ttl_runs_from_fetched_at(client: redis.Redis) -> None:
    cache = RedisAnswerCache(client, ttl=timedelta(hours=1), miss_ttl=timedelta(minutes=10))
    long_ago = datetime.now(UTC) - timedelta(minutes=45)
    cache.put_many({HIT_KEY: found(long_ago), MISS_KEY: missing(long_ago)})

    assert 890 <= int(client.ttl("glaze:answer:clearbit:company:domain:acme.com")) <= 900
    assert client.exists("glaze:answer:clearbit:company:domain:nobody.example") == 0
    assert cache.get_many([MISS_KEY]) == {}


def test_redis_tier_skips_unreadable_entries(client: redis.Redis) -> None:
    cache = RedisAnswerCache(client)
    cache.put_many({MISS_KEY: missing()})
    client.set("glaze:answer:clearbit:company:domain:acme.com", b"{not json")
    assert set(cache.get_many([HIT_KEY, MISS_KEY])) == {MISS_KEY}


def test_redis_tier_fails_open_when_redis_is_down() -> None:
    down = redis.Redis(host="127.0.0.1", port=1, retry=Retry(NoBackoff(), 0))
    cache = RedisAnswerCache(down)
    cache.put_many({HIT_KEY: found()})  # dropped with a warning, not raised
    assert cache.get_many([HIT_KEY]) == {}
    assert cache.breaker.open

    strict = RedisAnswerCache(down, fail_open=False)
    with pytest.raises(redis.ConnectionError):
        strict.get_many([HIT_KEY])
    down.close()


def test_redis_breaker_pays_one_timeout_not_one_per_call() -> None:
    # A server that accepts connections and never answers: every command would time out.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        stalled = redis.Redis(
            host="127.0.0.1", port=port, socket_timeout=0.3, retry=Retry(NoBackoff(), 0)
        )
        cache = RedisAnswerCache(stalled, breaker=RedisBreaker(cooldown_s=60))
        started = time.perf_counter()
        assert cache.get_many([HIT_KEY]) == {}
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(20):
            assert cache.get_many([HIT_KEY]) == {}
            cache.put_many({HIT_KEY: found()})
        rest = time.perf_counter() - started
        stalled.close()
    assert first >= 0.3
    assert rest < 0.1


def test_the_event_loops_link_times_out_a_stalled_pipeline_as_a_whole(client: redis.Redis) -> None:
    """The link's pipelines answer on a live server; on one that never answers, a pipeline
    gives up after the client's socket timeout (one deadline for the whole pipeline) and trips
    the breaker, so the next tick does not wait again."""

    async def run(link: RedisLink) -> tuple[list[object] | None, float, list[object] | None]:
        started = time.perf_counter()
        first = await link.execute([("SET", "link-test", "1"), ("GET", "link-test")])
        took = time.perf_counter() - started
        return first, took, await link.execute([("GET", "link-test")])

    live = redis_link(client, RedisBreaker())
    first, _, second = asyncio.run(run(live))
    assert first == [True, b"1"] and second == [b"1"]
    client.delete("link-test")

    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        stalled = redis.Redis(
            host="127.0.0.1", port=port, socket_timeout=0.3, retry=Retry(NoBackoff(), 0)
        )
        breaker = RedisBreaker(cooldown_s=60)
        first, took, second = asyncio.run(run(redis_link(stalled, breaker)))
        stalled.close()
    assert first is None and second is None
    assert 0.3 <= took < 1.5
    assert breaker.open


def test_redis_tier_rejects_non_positive_ttl(client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="volatile"):
        RedisAnswerCache(client, ttl_by_provider={"volatile": timedelta(0)})


# -- SQL tier, both dialects -----------------------------------------------------------------


def test_sql_tier_round_trip_and_upsert(store: Store) -> None:
    cache = SqlAnswerCache(store)
    first = {HIT_KEY: found(), MISS_KEY: missing()}
    cache.put_many(first)
    assert cache.get_many([HIT_KEY, MISS_KEY, ("company:domain:x.com", "clearbit")]) == first

    newer = found(industry="Hardware")
    cache.put_many({HIT_KEY: newer})  # same key: replaced, not duplicated
    assert cache.get_many([HIT_KEY]) == {HIT_KEY: newer}
    with store.engine.connect() as connection:
        rows = connection.execute(select(EntityCacheEntry.entity_id)).all()
    assert len(rows) == 2


def test_sql_tier_writes_a_large_batch_in_one_statement_value_for_value(store: Store) -> None:
    cache = SqlAnswerCache(store)
    fetched = datetime(2026, 11, 24, 9, 30, 15, 123456, tzinfo=UTC)
    answers: dict[CacheKey, CachedAnswer] = {
        (f"person:email:p{i}@example.com", "people_vendor"): CachedAnswer(
            found=i % 5 != 0,
            values={
                "title": f'VP "Sales" \\ Zürich {i}',
                "employees": 2**70 + i,  # wider than 64 bits: kept exactly
                "score": i / 3,
                "tags": ["b2b", {"since": None}],
                "empty": "",
            }
            if i % 5
            else {},
            confidence={"title": 0.9} if i % 5 else {},
            fetched_at=fetched,
        )
        for i in range(2500)
    }
    before = store.statements

    cache.put_many(answers)

    assert store.statements - before == 1
    assert cache.get_many(answers) == answers


def test_sql_tier_expires_misses_sooner(store: Store) -> None:
    cache = SqlAnswerCache(store, ttl=timedelta(days=30), miss_ttl=timedelta(days=1))
    two_days_ago = datetime.now(UTC) - timedelta(days=2)
    cache.put_many({HIT_KEY: found(two_days_ago), MISS_KEY: missing(two_days_ago)})

    assert set(cache.get_many([HIT_KEY, MISS_KEY])) == {HIT_KEY}


# -- tiers together --------------------------------------------------------------------------


def test_tiered_cache_back_fills_faster_tiers(store: Store, client: redis.Redis) -> None:
    memory = MemoryCache()
    shared = RedisAnswerCache(client, ttl=timedelta(hours=1))
    sql = SqlAnswerCache(store)
    fetched = datetime.now(UTC) - timedelta(minutes=30)
    sql.put_many({HIT_KEY: found(fetched)})
    shared.put_many({MISS_KEY: missing()})
    tiered = TieredCache([memory, shared, sql])

    got = tiered.get_many([HIT_KEY, MISS_KEY])

    assert set(got) == {HIT_KEY, MISS_KEY}
    assert set(memory.get_many([HIT_KEY, MISS_KEY])) == {HIT_KEY, MISS_KEY}
    assert shared.get_many([HIT_KEY]) == {HIT_KEY: got[HIT_KEY]}
    # Back-filled from SQL: lives out the rest of its hour, not a fresh one.
    assert 1790 <= int(client.ttl("glaze:answer:clearbit:company:domain:acme.com")) <= 1800
    assert sql.get_many([MISS_KEY]) == {}  # back-fill never writes to slower tiers


def test_tiered_cache_writes_every_tier(store: Store, client: redis.Redis) -> None:
    memory, shared, sql = MemoryCache(), RedisAnswerCache(client), SqlAnswerCache(store)
    TieredCache([memory, shared, sql]).put_many({HIT_KEY: found()})
    for tier in (memory, shared, sql):
        assert set(tier.get_many([HIT_KEY])) == {HIT_KEY}


def test_answer_sharing_with_redis(store: Store, redis_url: str, client: redis.Redis) -> None:
    with open_answer_sharing(store, redis_url) as sharing:
        # Redis locks, with the database's lock behind them where there is one (Postgres).
        assert isinstance(sharing.flight, FallbackFlight)
        assert isinstance(sharing.flight.primary, RedisFlight)
        if store.dialect == "postgresql":
            assert sharing.backend == "redis+postgres"
            assert isinstance(sharing.flight.fallback, PostgresFlight)
            assert isinstance(sharing.flight.fallback.shared, SqlAnswerCache)
        else:
            assert sharing.backend == "redis"
            assert isinstance(sharing.flight.fallback, NoFlight)
        sharing.cache.put_many({HIT_KEY: found()})
        assert client.exists("glaze:answer:clearbit:company:domain:acme.com") == 1
        assert set(SqlAnswerCache(store).get_many([HIT_KEY])) == {HIT_KEY}


def test_answer_sharing_without_redis(store: Store) -> None:
    with open_answer_sharing(store) as sharing:
        if store.dialect == "postgresql":
            assert sharing.backend == "postgres"
            assert isinstance(sharing.flight, PostgresFlight)
            assert isinstance(sharing.flight.shared, SqlAnswerCache)
        else:
            assert sharing.backend == "none"
            assert isinstance(sharing.flight, NoFlight)
        sharing.cache.put_many({HIT_KEY: found()})
        assert set(SqlAnswerCache(store).get_many([HIT_KEY])) == {HIT_KEY}
