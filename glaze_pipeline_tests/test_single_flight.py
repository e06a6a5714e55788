"""Single-flight across runs: real Redis locks, real Postgres advisory locks, real file locks
beside a SQLite file, real threads (and a real process where a holder dies).

Each run has its own flight, memory tier and provider instance, as separate processes would;
they meet only in Redis and the database. "Redis down" is a Redis URL nobody listens on: the
runs must fall back to the database's locks and still buy every answer once.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import text

from glaze_pipeline.bench.stack import free_port
from glaze_pipeline.core import engine
from glaze_pipeline.core.answers import AnswerSharing, SharingSettings, open_answer_sharing
from glaze_pipeline.core.budget import Budget
from glaze_pipeline.core.cache import CachedAnswer, CacheKey, MemoryCache, TieredCache, tiers_of
from glaze_pipeline.core.cache_redis import RedisAnswerCache, RedisBreaker
from glaze_pipeline.core.cache_sql import SqlAnswerCache
from glaze_pipeline.core.engine import JobSettings
from glaze_pipeline.core.flight import Claim, Flight
from glaze_pipeline.core.models import (
    CellStatus,
    EntityKey,
    EntityOutcome,
    EntityRequest,
    EntityType,
    Selection,
)
from glaze_pipeline.core.providers.fake import FakeProvider, fake_value
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.singleflight import (
    DEFAULT_LOCK_TTL,
    DEFAULT_MAX_WAIT,
    FallbackFlight,
    FileFlight,
    PostgresFlight,
    RedisFlight,
    advisory_lock_id,
)
from glaze_pipeline.core.store import Store
from glaze_pipeline.core.waterfall import Waterfall, WaterfallStats
from glaze_pipeline_tests.provider_helpers import wait_until

COMPANIES = [
    EntityRequest(
        EntityKey(EntityType.COMPANY, "domain", f"co{i:03d}.example"), frozenset({"industry"})
    )
    for i in range(100)
]
PROVIDER = "fake_company"
KEY: CacheKey = ("company:domain:co000.example", PROVIDER)

SharingFactory = Callable[..., AnswerSharing]


# open_sharing's variants: the app database, Redis (up, down or none), the backend it reports.
SHARINGS = {
    "redis+postgres": ("pg_store", "up", "redis+postgres"),
    "redis down": ("pg_store", "down", "redis+postgres"),
    "postgres": ("pg_store", None, "postgres"),
    "sqlite": ("sqlite_store", None, "file"),
    "redis down, sqlite": ("sqlite_store", "down", "redis+file"),
}


@pytest.fixture(params=list(SHARINGS))
def open_sharing(request: pytest.FixtureRequest) -> Iterator[SharingFactory]:
    """Opens one run's cache + flight: Redis locks with the database's lock behind them
    (Postgres advisory locks, file locks next to a SQLite file); the same with Redis configured
    but down (the database's locks alone then); or no Redis."""
    store_fixture, redis_state, backend = SHARINGS[request.param]
    store: Store = request.getfixturevalue(store_fixture)
    url = {"up": request.getfixturevalue("redis_url"), "down": down_redis_url(), None: None}[
        redis_state
    ]
    opened: list[AnswerSharing] = []

    def factory(max_wait: timedelta = DEFAULT_MAX_WAIT) -> AnswerSharing:
        # Redis down from the start: nobody holds a Redis lock to wait out for long.
        settings = SharingSettings(max_wait=max_wait, outage_grace=timedelta(seconds=0.2))
        # As steps side by side open it (a run in one process takes no file lock on SQLite).
        sharing = open_answer_sharing(store, url, settings=settings, side_by_side=True)
        assert sharing.backend == backend
        opened.append(sharing)
        return sharing

    yield factory
    for sharing in opened:
        sharing.close()


@pytest.fixture
def sharing_store(request: pytest.FixtureRequest, open_sharing: SharingFactory) -> Store:
    """The app database of this test's `open_sharing` variant."""
    store: Store = request.getfixturevalue(
        SHARINGS[request.node.callspec.params["open_sharing"]][0]
    )
    return store


def down_redis_url() -> str:
    """A Redis that is configured but down: nobody listens on its port."""
    return f"redis://127.0.0.1:{free_port()}/0"


def provider() -> FakeProvider:
    return FakeProvider(EntityType.COMPANY, name=PROVIDER, latency_s=0.05)


def run_concurrently(
    runs: list[tuple[Waterfall, FakeProvider]],
) -> list[tuple[list[EntityOutcome], WaterfallStats]]:
    """Start every run's chunk at the same moment, each in its own thread and event loop."""
    barrier = threading.Barrier(len(runs))

    def run(waterfall: Waterfall) -> tuple[list[EntityOutcome], WaterfallStats]:
        barrier.wait()
        return asyncio.run(waterfall.enrich_many(COMPANIES)), waterfall.stats

    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(run, waterfall) for waterfall, _ in runs]
        return [future.result(timeout=60) for future in futures]


def assert_complete(outcomes: list[EntityOutcome]) -> None:
    assert len(outcomes) == 100
    for outcome in outcomes:
        industry = outcome.fields["industry"]
        assert industry.status is CellStatus.DONE
        assert industry.value is not None
        assert industry.value.value == fake_value(outcome.key, "industry")


def test_two_runs_over_the_same_companies_buy_each_answer_once(
    open_sharing: SharingFactory,
) -> None:
    runs = []
    for _ in range(2):
        sharing, fake = open_sharing(), provider()
        runs.append(
            (
                Waterfall([fake], budget=Budget(None), cache=sharing.cache, flight=sharing.flight),
                fake,
            )
        )

    results = run_concurrently(runs)

    calls = Counter[str]()
    for _, fake in runs:
        calls.update(fake.calls)
    assert sum(calls.values()) == 100
    assert set(calls.values()) == {1}  # every company asked exactly once, by one run or the other
    for outcomes, _ in results:
        assert_complete(outcomes)
    stats = [run_stats for _, run_stats in results]
    assert sum(s.calls[PROVIDER] for s in stats) == 100
    assert sum(s.cost[PROVIDER] for s in stats) == 100.0
    for s in stats:  # each run got all 100 answers: bought, or read from the other run
        assert s.calls[PROVIDER] + s.cache_hits == 100
    assert sum(s.shared_hits for s in stats) > 0  # the runs really did overlap


def test_without_single_flight_both_runs_pay(pg_store: Store) -> None:
    """The control for the test above: the same race with no flight buys answers twice."""
    runs = []
    for _ in range(2):
        fake = provider()
        cache = TieredCache([MemoryCache(), SqlAnswerCache(pg_store)])
        runs.append((Waterfall([fake], budget=Budget(None), cache=cache), fake))

    run_concurrently(runs)

    assert sum(fake.total_calls for _, fake in runs) > 100


@dataclass
class Asking:
    """A flight that says when a claim is asked for: its run has missed the cache by then."""

    inner: Flight
    asked: threading.Event

    @property
    def backend(self) -> str:
        return self.inner.backend

    def claim(self, key: CacheKey) -> AbstractAsyncContextManager[Claim]:
        self.asked.set()
        return self.inner.claim(key)

    def degraded(self) -> bool:
        return self.inner.degraded()

    def close(self) -> None:
        self.inner.close()


def test_waiter_reads_the_holders_answer_without_charge_or_budget(
    open_sharing: SharingFactory,
) -> None:
    holder, waiter = open_sharing(), open_sharing()
    answer = CachedAnswer(True, {"industry": "Bought once"}, {}, datetime.now(UTC))
    fake = provider()
    asked = threading.Event()
    # A budget of nothing: the waiter would skip the field if it tried to reserve a call.
    waterfall = Waterfall(
        [fake], budget=Budget(0.0), cache=waiter.cache, flight=Asking(waiter.flight, asked)
    )

    async def scenario() -> list[EntityOutcome]:
        claim = holder.flight.claim(KEY)
        taken = await claim.__aenter__()
        assert taken.held is True and taken.shared is not None
        waiting = asyncio.create_task(waterfall.enrich_many(COMPANIES[:1]))
        # Answer only once the waiter has missed the cache and asked for the key (a loaded
        # machine can take longer than any fixed sleep to read a cache with Redis down).
        assert await asyncio.to_thread(asked.wait, 10)
        await asyncio.sleep(0.1)
        assert not waiting.done()  # it is waiting on the holder
        await asyncio.to_thread(taken.shared.put_many, {KEY: answer})
        await claim.__aexit__(None, None, None)
        return await asyncio.wait_for(waiting, 5)

    [outcome] = asyncio.run(scenario())

    industry = outcome.fields["industry"]
    assert industry.status is CellStatus.DONE
    assert industry.value is not None and industry.value.value == "Bought once"
    assert fake.total_calls == 0
    assert waterfall.stats.calls[PROVIDER] == 0
    assert (waterfall.stats.cache_hits, waterfall.stats.shared_hits) == (1, 1)
    assert waterfall.budget.spent == 0 and not waterfall.budget.exhausted


def test_leader_writes_its_answer_through_before_releasing(
    open_sharing: SharingFactory, sharing_store: Store, request: pytest.FixtureRequest
) -> None:
    sharing = open_sharing()
    fake = provider()
    waterfall = Waterfall([fake], budget=Budget(None), cache=sharing.cache, flight=sharing.flight)
    # Enrich one entity but stop before the chunk-end flush: only write-through can share it.
    asyncio.run(waterfall.enrich(COMPANIES[0]))

    assert fake.total_calls == 1
    sql = SqlAnswerCache(sharing_store)
    if request.node.callspec.params["open_sharing"] == "redis+postgres":
        # In Redis, where runs that lock on Redis meet; the table gets it with the flush.
        assert sharing.redis is not None
        assert KEY in RedisAnswerCache(sharing.redis).get_many([KEY])
        assert KEY not in sql.get_many([KEY])
        waterfall.flush_cache()
    # In SQL, where runs that hold the database's lock meet (Redis down, or none).
    assert KEY in sql.get_many([KEY])


def test_waiter_goes_ahead_after_max_wait(open_sharing: SharingFactory) -> None:
    holder = open_sharing()
    waiter = open_sharing(max_wait=timedelta(milliseconds=200))

    async def scenario() -> tuple[bool, float]:
        async with holder.flight.claim(KEY) as held:
            assert held.held
            started = time.perf_counter()
            async with waiter.flight.claim(KEY) as waiter_held:
                return waiter_held.held, time.perf_counter() - started

    waiter_held, waited = asyncio.run(scenario())
    assert waiter_held is False  # it proceeds, unlocked
    assert 0.2 <= waited < 1.0


def test_released_lock_is_taken_at_once(open_sharing: SharingFactory) -> None:
    first, second = open_sharing(), open_sharing(max_wait=timedelta(seconds=5))

    async def scenario() -> tuple[bool, float]:
        async with first.flight.claim(KEY):
            pass
        started = time.perf_counter()
        async with second.flight.claim(KEY) as held:
            return held.held, time.perf_counter() - started

    held, waited = asyncio.run(scenario())
    assert held is True
    assert waited < 0.5  # no waiting on a free key (bound loose for a loaded machine)


# -- Redis specifics -----------------------------------------------------------------------


def redis_flight(
    redis_url: str,
    *,
    lock_ttl: timedelta = DEFAULT_LOCK_TTL,
    max_wait: timedelta = DEFAULT_MAX_WAIT,
    renew: bool = True,
) -> tuple[RedisFlight, redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    flight = RedisFlight(client, shared=None, lock_ttl=lock_ttl, max_wait=max_wait, renew=renew)
    return flight, client


def test_redis_lock_expiry_lets_a_waiter_proceed_if_the_holder_dies(redis_url: str) -> None:
    # A holder that no longer renews its lock: what a dead process leaves behind.
    holder, holder_client = redis_flight(
        redis_url, lock_ttl=timedelta(milliseconds=300), renew=False
    )
    waiter, waiter_client = redis_flight(redis_url, max_wait=timedelta(seconds=5))
    lock = holder.lock_name(KEY)

    async def scenario() -> tuple[bool, float, bytes | str | None]:
        dead = holder.claim(KEY)
        assert (await dead.__aenter__()).held is True  # ...and the holder never releases
        assert 0 < int(holder_client.pttl(lock)) <= 300
        started = time.perf_counter()
        async with waiter.claim(KEY) as held:
            waited = time.perf_counter() - started
            # The dead holder's late release must not free the lock the waiter now holds.
            await dead.__aexit__(None, None, None)
            still_locked = waiter_client.get(lock)
        return held.held, waited, still_locked

    held, waited, still_locked = asyncio.run(scenario())
    assert held is True
    assert 0.15 <= waited < 2.0  # it waited for the expiry, not for max_wait
    assert still_locked is not None
    assert waiter_client.exists(lock) == 0  # the waiter's own release did free it
    holder_client.close()
    waiter_client.close()


def test_a_live_holder_keeps_its_lock_past_the_ttl_and_frees_it_on_release(
    redis_url: str,
) -> None:
    """A call slower than the lock's TTL does not lose the lock while its holder lives (it is
    renewed); the waiter gets it the moment the holder releases, and nothing is left behind."""
    holder, holder_client = redis_flight(redis_url, lock_ttl=timedelta(milliseconds=300))
    waiter, waiter_client = redis_flight(redis_url, max_wait=timedelta(seconds=5))
    lock = holder.lock_name(KEY)

    async def scenario() -> tuple[bool, float]:
        async def hold() -> None:
            async with holder.claim(KEY) as held:
                assert held.held
                await asyncio.sleep(1.2)  # four TTLs: a slow vendor call

        holding = asyncio.ensure_future(hold())
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        async with waiter.claim(KEY) as taken:
            waited = time.perf_counter() - started
        await holding
        return taken.held, waited

    held, waited = asyncio.run(scenario())
    assert held is True
    assert 1.0 <= waited < 2.5  # it waited for the release, not for an expiry at 0.3 s
    assert holder_client.exists(lock) == 0
    holder_client.close()
    waiter_client.close()


def test_redis_flight_reports_itself_unavailable_when_redis_is_down() -> None:
    down = redis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    flight = RedisFlight(down, shared=None, max_wait=timedelta(seconds=5))

    async def scenario() -> tuple[Claim, float]:
        started = time.perf_counter()
        async with flight.claim(KEY) as claim:
            return claim, time.perf_counter() - started

    claim, waited = asyncio.run(scenario())
    assert claim == Claim(held=False, shared=None, unavailable=True)
    assert waited < 1.0  # it did not wait out max_wait on a dead server
    assert flight.breaker.open
    down.close()


# -- Postgres specifics --------------------------------------------------------------------


def test_advisory_lock_ids_are_stable_signed_64_bit() -> None:
    ids = {advisory_lock_id((f"company:domain:c{i}.com", "p")) for i in range(1000)}
    assert len(ids) == 1000
    assert all(-(2**63) <= lock_id < 2**63 for lock_id in ids)
    assert advisory_lock_id(KEY) == advisory_lock_id(KEY)
    assert advisory_lock_id(KEY) != advisory_lock_id(KEY, namespace="other:")


def test_postgres_lock_is_freed_when_the_holder_dies(pg_store: Store) -> None:
    holder = PostgresFlight(pg_store.url, shared=None)
    waiter = PostgresFlight(pg_store.url, shared=None, max_wait=timedelta(seconds=5))

    def kill_holder() -> None:
        # A crash, not a clean exit: the server ends the holder's session under it.
        with pg_store.engine.begin() as connection:
            killed = connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()"
                )
            ).all()
        assert killed == [(True,)]

    async def scenario() -> tuple[bool, float]:
        dead = holder.claim(KEY)
        assert (await dead.__aenter__()).held is True
        started = time.perf_counter()
        waiting = asyncio.create_task(waiter.claim(KEY).__aenter__())
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await asyncio.to_thread(kill_holder)
        held = (await asyncio.wait_for(waiting, 5)).held
        waited = time.perf_counter() - started
        await dead.__aexit__(None, None, None)  # its session is gone: nothing to release
        return held, waited

    held, waited = asyncio.run(scenario())
    assert held is True
    assert 0.3 <= waited < 2.0  # freed by the crash, long before max_wait

    async def holder_recovers() -> bool:
        async with holder.claim(("company:domain:other.example", PROVIDER)) as again:
            return again.held

    assert asyncio.run(holder_recovers()) is True  # a fresh session, not a failed-open claim
    holder.close()
    waiter.close()


def test_postgres_flight_refuses_a_key_it_already_holds(pg_store: Store) -> None:
    # A session re-enters its own advisory locks; the flight must not let two local claims in.
    flight: Flight = PostgresFlight(pg_store.url, shared=None, max_wait=timedelta(milliseconds=150))

    async def scenario() -> tuple[bool, bool]:
        async with flight.claim(KEY) as first, flight.claim(KEY) as second:
            return first.held, second.held

    assert asyncio.run(scenario()) == (True, False)
    flight.close()


def test_a_lock_taken_after_its_claimant_was_cancelled_is_given_back(redis_url: str) -> None:
    """The claim is cancelled while its batch is on the wire: the lock taken for nobody is
    released by the flight, not left to expire."""
    flight, client = redis_flight(redis_url)
    lock = flight.lock_name(KEY)
    client.delete(lock)

    async def scenario() -> None:
        claiming = asyncio.create_task(flight.claim(KEY).__aenter__())
        await asyncio.sleep(0)  # the claim submits its SET NX...
        await asyncio.sleep(0)  # ...and the tick's pipeline leaves
        claiming.cancel()
        with pytest.raises(asyncio.CancelledError):
            await claiming
        for _ in range(100):  # the pipeline comes back; the lock is given back
            await asyncio.sleep(0.01)
            if flight.link.pipelines >= 2 and not client.exists(lock):
                break

    asyncio.run(scenario())
    assert client.exists(lock) == 0
    client.close()


def test_a_postgres_lock_taken_after_its_claimant_was_cancelled_is_given_back(
    pg_store: Store,
) -> None:
    flight = PostgresFlight(pg_store.url, shared=None)

    async def scenario() -> None:
        claiming = asyncio.create_task(flight.claim(KEY).__aenter__())
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the statement is running in its thread
        claiming.cancel()
        with pytest.raises(asyncio.CancelledError):
            await claiming
        batches = flight._batches.get()
        for _ in range(200):  # the statement comes back, and the lock goes back
            await asyncio.sleep(0.01)
            if batches.release.batches and batches.release._task is None:
                return

    asyncio.run(scenario())
    assert not flight._held
    assert not advisory_lock_taken(pg_store, KEY)
    flight.close()


# -- falling back from Redis to the database's lock ------------------------------------------

FALLING_BACK = "single-flight: redis unavailable, falling back to postgres locks while it is down"

FallbackFactory = Callable[[], tuple[FallbackFlight, RedisBreaker]]


@pytest.fixture
def fallback_flight(pg_store: Store, redis_url: str) -> Iterator[FallbackFactory]:
    """Redis locks with Postgres advisory locks behind them, built by hand to reach the breaker."""
    client = redis.Redis.from_url(redis_url)
    opened: list[FallbackFlight] = []

    def factory() -> tuple[FallbackFlight, RedisBreaker]:
        breaker = RedisBreaker(cooldown_s=60)
        on_redis = RedisFlight(
            client, shared=RedisAnswerCache(client, breaker=breaker), breaker=breaker
        )
        on_postgres = PostgresFlight(pg_store.url, shared=SqlAnswerCache(pg_store))
        opened.append(FallbackFlight(on_redis, on_postgres, grace=timedelta(0)))
        return opened[-1], breaker

    yield factory
    for flight in opened:
        flight.close()
    client.close()


def advisory_lock_taken(store: Store, key: CacheKey) -> bool:
    """Whether some session holds `key`'s advisory lock (asked from a session of our own)."""
    with store.engine.connect() as connection:
        free = connection.execute(
            text("SELECT pg_try_advisory_lock(:id)"), {"id": advisory_lock_id(key)}
        ).scalar_one()
        if free:
            connection.execute(
                text("SELECT pg_advisory_unlock(:id)"), {"id": advisory_lock_id(key)}
            )
        connection.commit()
    return not free


def test_open_redis_breaker_falls_back_to_the_postgres_lock_and_sql(
    fallback_flight: FallbackFactory,
    pg_store: Store,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (holder, holder_breaker), (waiter, waiter_breaker) = fallback_flight(), fallback_flight()
    client = redis.Redis.from_url(redis_url)
    for breaker in (holder_breaker, waiter_breaker):
        breaker.trip(redis.ConnectionError("redis is down"), "a test")
    answer = CachedAnswer(True, {"industry": "Bought once"}, {}, datetime.now(UTC))
    fake = provider()
    # No cache and a budget of nothing: only the claim's tier can give the waiter its answer.
    waterfall = Waterfall([fake], budget=Budget(0.0), flight=waiter)

    async def scenario() -> list[EntityOutcome]:
        claim = holder.claim(KEY)
        taken = await claim.__aenter__()
        assert taken.held is True
        assert isinstance(taken.shared, SqlAnswerCache)  # it meets its contenders in SQL...
        assert await asyncio.to_thread(advisory_lock_taken, pg_store, KEY)  # ...under this lock
        assert client.keys("glaze:flight:*") == []  # and took nothing in Redis
        waiting = asyncio.create_task(waterfall.enrich_many(COMPANIES[:1]))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # the waiter fell back too, and waits on the Postgres lock
        await asyncio.to_thread(taken.shared.put_many, {KEY: answer})
        await claim.__aexit__(None, None, None)
        return await asyncio.wait_for(waiting, 5)

    with caplog.at_level(logging.WARNING, logger="glaze_pipeline.core.singleflight"):
        [outcome] = asyncio.run(scenario())

    industry = outcome.fields["industry"]
    assert industry.status is CellStatus.DONE
    assert industry.value is not None and industry.value.value == "Bought once"
    assert fake.total_calls == 0
    assert (waterfall.stats.cache_hits, waterfall.stats.shared_hits) == (1, 1)
    assert not advisory_lock_taken(pg_store, KEY)  # released on the way out
    assert [r.getMessage() for r in caplog.records].count(FALLING_BACK) == 2  # once per flight
    client.close()


@pytest.mark.parametrize("always_guard", [False, True])
def test_a_contender_that_finds_redis_down_still_meets_the_redis_holder(
    always_guard: bool, pg_store: Store, redis_url: str, request: pytest.FixtureRequest
) -> None:
    """Redis dies mid-purchase, in miniature: the holder took its lock on Redis, a contender
    (for which Redis is already down) falls back to Postgres and must not buy it again: it
    waits out the Redis holder's purchase (`grace`), or, with `always_guard`, finds the
    Postgres lock that the holder took behind its Redis one."""
    holder = open_answer_sharing(
        pg_store, redis_url, settings=SharingSettings(always_guard=always_guard)
    )
    contender = open_answer_sharing(
        pg_store,
        down_redis_url(),
        settings=SharingSettings(outage_grace=timedelta(seconds=0 if always_guard else 1.5)),
    )
    request.addfinalizer(holder.close)
    request.addfinalizer(contender.close)
    slow = FakeProvider(EntityType.COMPANY, name=PROVIDER, latency_s=0.5)
    fake = provider()
    holder_run = Waterfall([slow], budget=Budget(None), cache=holder.cache, flight=holder.flight)
    contender_run = Waterfall(
        [fake], budget=Budget(None), cache=contender.cache, flight=contender.flight
    )
    client = redis.Redis.from_url(redis_url)
    request.addfinalizer(client.close)

    def locks_taken() -> bool:  # the Postgres lock, when taken, comes a tick after Redis's
        return bool(client.keys("glaze:flight:*")) and (
            not always_guard or advisory_lock_taken(pg_store, KEY)
        )

    async def scenario() -> tuple[list[EntityOutcome], list[EntityOutcome], bool]:
        buying = asyncio.create_task(holder_run.enrich_many(COMPANIES[:1]))
        assert await asyncio.to_thread(wait_until, locks_taken)
        also_in_postgres = await asyncio.to_thread(advisory_lock_taken, pg_store, KEY)
        waiting = asyncio.create_task(contender_run.enrich_many(COMPANIES[:1]))
        return (
            await asyncio.wait_for(buying, 5),
            await asyncio.wait_for(waiting, 5),
            also_in_postgres,
        )

    bought, read, also_in_postgres = asyncio.run(scenario())

    assert also_in_postgres is always_guard  # the database is off the path unless asked
    assert (slow.total_calls, fake.total_calls) == (1, 0)
    assert contender_run.stats.shared_hits == 1  # read from SQL, where the holder's flush put it
    for [outcome] in (bought, read):
        assert outcome.fields["industry"].status is CellStatus.DONE
        assert outcome.fields["industry"].value is not None
        assert outcome.fields["industry"].value.value == fake_value(outcome.key, "industry")


def test_after_an_outage_redis_holders_take_the_postgres_lock_for_a_grace(
    pg_store: Store, redis_url: str
) -> None:
    """Back on Redis, a claim also locks in Postgres until purchases made under Postgres
    locks during the outage have ended; then the database is off the path again."""
    client = redis.Redis.from_url(redis_url)
    breaker = RedisBreaker(cooldown_s=60)
    flight = FallbackFlight(
        RedisFlight(client, shared=RedisAnswerCache(client, breaker=breaker), breaker=breaker),
        PostgresFlight(pg_store.url, shared=SqlAnswerCache(pg_store)),
        grace=timedelta(seconds=1),
    )

    async def holds_postgres_lock_too() -> tuple[bool, bool]:
        async with flight.claim(KEY) as claim:
            assert claim.held
            meets_in_both = isinstance(claim.shared, TieredCache)
            return meets_in_both, await asyncio.to_thread(advisory_lock_taken, pg_store, KEY)

    try:
        assert asyncio.run(holds_postgres_lock_too()) == (False, False)  # Redis alone
        breaker.trip(redis.ConnectionError("redis is down"), "a test")
        started = time.monotonic()
        assert asyncio.run(holds_postgres_lock_too()) == (False, True)  # Postgres alone...
        assert time.monotonic() - started >= 0.9  # ...after waiting out the Redis holders
        breaker._open_until = 0.0  # Redis is back
        assert asyncio.run(holds_postgres_lock_too()) == (True, True)  # both, for the grace
        time.sleep(1.1)
        assert asyncio.run(holds_postgres_lock_too()) == (False, False)  # Redis alone again
    finally:
        flight.close()
        client.close()


def test_redis_down_on_an_in_memory_sqlite_goes_ahead_unlocked_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def claims(flight: Flight) -> list[Claim]:
        taken = []
        for key in (KEY, ("company:domain:other.example", PROVIDER)):
            async with flight.claim(key) as claim:
                taken.append(claim)
        return taken

    memory = Store("sqlite://")  # one process's own database: no file to lock beside
    with (
        caplog.at_level(logging.WARNING, logger="glaze_pipeline.core.singleflight"),
        open_answer_sharing(memory, down_redis_url(), side_by_side=True) as sharing,
    ):
        assert sharing.backend == "redis"  # no lock to put behind Redis's
        taken = asyncio.run(claims(sharing.flight))
    memory.dispose()

    assert taken == [Claim(held=True, shared=None)] * 2  # nothing to wait on, nowhere to meet
    fallbacks = [r for r in caplog.records if "no lock to fall back to" in r.getMessage()]
    assert len(fallbacks) == 1


# -- SQLite's file locks ---------------------------------------------------------------------

HOLD_A_FILE_LOCK = """
import asyncio, sys, time
from glaze_pipeline.core.singleflight import FileFlight

async def hold() -> None:
    async with FileFlight(sys.argv[1], shared=None).claim((sys.argv[2], sys.argv[3])) as claim:
        print("held" if claim.held else "refused", flush=True)
        time.sleep(60)

asyncio.run(hold())
"""


def test_steps_side_by_side_on_a_sqlite_file_lock_beside_it(sqlite_store: Store) -> None:
    with open_answer_sharing(sqlite_store, side_by_side=True) as sharing:
        assert sharing.backend == "file"
        assert isinstance(sharing.flight, FileFlight)
        assert sharing.flight.path == f"{sqlite_store.sqlite_file}-flights"
        assert isinstance(sharing.flight.shared, SqlAnswerCache)
    with open_answer_sharing(sqlite_store) as sharing:  # one process: nobody to meet
        assert sharing.backend == "none"
    memory = Store("sqlite://")  # no file to lock beside
    with open_answer_sharing(memory, side_by_side=True) as sharing:
        assert sharing.backend == "none"
    memory.dispose()


def test_a_file_lock_is_freed_when_the_holder_process_dies(tmp_path: Path) -> None:
    path = str(tmp_path / "glaze.db-flights")
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_A_FILE_LOCK, path, *KEY], stdout=subprocess.PIPE
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == b"held\n"
            waiter = FileFlight(path, shared=None, max_wait=timedelta(seconds=10))

            async def scenario() -> tuple[bool, bool, float]:
                started = time.perf_counter()
                waiting = asyncio.create_task(waiter.claim(KEY).__aenter__())
                await asyncio.sleep(0.3)
                blocked = not waiting.done()
                holder.kill()  # a crash: no release, the kernel closes its files
                held = (await asyncio.wait_for(waiting, 10)).held
                return blocked, held, time.perf_counter() - started

            blocked, held, waited = asyncio.run(scenario())
            waiter.close()
        finally:
            holder.kill()
    assert blocked  # another process held it
    assert held is True
    assert 0.3 <= waited < 3.0  # freed by the crash, long before max_wait


def test_file_flight_refuses_a_key_it_already_holds_and_frees_all_on_close(
    tmp_path: Path,
) -> None:
    # An open file re-grants its own locks; the flight must not let two local claims in.
    path = tmp_path / "glaze.db-flights"
    flight = FileFlight(path, shared=None, max_wait=timedelta(milliseconds=150))
    other = FileFlight(path, shared=None, max_wait=timedelta(milliseconds=150))

    async def scenario() -> tuple[bool, bool, bool, bool]:
        async with flight.claim(KEY) as first, flight.claim(KEY) as second:
            async with other.claim(KEY) as elsewhere:  # another flight, the same process
                pass
            held = flight.claim(("company:domain:kept.example", PROVIDER))
            assert (await held.__aenter__()).held
            flight.close()  # whatever it still holds is freed with its file
            async with other.claim(("company:domain:kept.example", PROVIDER)) as freed:
                return first.held, second.held, elsewhere.held, freed.held

    assert asyncio.run(scenario()) == (True, False, False, True)
    other.close()


def test_redis_up_on_sqlite_meets_in_redis_alone(sqlite_store: Store, redis_url: str) -> None:
    async def claim_once(flight: Flight) -> Claim:
        async with flight.claim(KEY) as claim:
            return claim

    with open_answer_sharing(sqlite_store, redis_url) as sharing:
        claim = asyncio.run(claim_once(sharing.flight))

    assert claim.held is True
    assert claim.shared is not None
    [tier] = tiers_of(claim.shared)
    assert isinstance(tier, RedisAnswerCache)  # no per-answer SQL write under the lock


# -- through the engine ----------------------------------------------------------------------


def test_two_jobs_enrich_chunk_buys_each_answer_once(
    open_sharing: SharingFactory, sharing_store: Store
) -> None:
    """Two jobs over the same 100 companies, each through engine.enrich_chunk in its thread."""
    table = seed_generated(sharing_store, rows=100, unique_companies=100)
    selection = Selection(column_ids=[table.column_by_key("industry").id])
    settings = JobSettings()
    target = engine.resolve_target(sharing_store, table.id, selection)
    entities = engine.detect_entities(sharing_store, target).entities
    assert len(entities) == 100
    jobs = [
        (engine.start_job(sharing_store, target, selection, settings), open_sharing(), provider())
        for _ in range(2)
    ]
    barrier = threading.Barrier(len(jobs))

    def run(request_id: str, sharing: AnswerSharing, fake: FakeProvider) -> engine.ChunkResult:
        barrier.wait()
        return engine.enrich_chunk(
            sharing_store,
            request_id,
            entities,
            [fake],
            settings,
            cache=sharing.cache,
            flight=sharing.flight,
        )

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = [f.result(timeout=60) for f in [pool.submit(run, *job) for job in jobs]]

    assert sum(fake.total_calls for _, _, fake in jobs) == 100
    for result in results:
        assert len(result.outcomes) == 100
        assert all(f["industry"].status is CellStatus.DONE for f in result.outcomes.values())
        assert result.stats.calls[PROVIDER] + result.stats.cache_hits == 100
