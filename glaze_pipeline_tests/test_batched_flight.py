"""The coalesced single-flight and the spend journal's blocks, against real Redis and Postgres.

What the lookups of one event-loop tick need from Redis (claims, shared re-reads,
write-throughs, releases) goes out as one pipeline; two runs that race over the same keys
still buy each once; a release never frees a lock someone else holds. The spend journal
records calls ahead in blocks: few commits, the exact figures after a drain, and a crash (no
drain) over-counts by at most the bound its docstring states, never under-counts.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import redis

from glaze_pipeline.core.budget import Budget
from glaze_pipeline.core.cache import CachedAnswer, CacheKey, MemoryCache, TieredCache
from glaze_pipeline.core.cache_redis import RedisAnswerCache, RedisBreaker
from glaze_pipeline.core.coalesce import Coalescer
from glaze_pipeline.core.models import EntityKey, EntityRequest, EntityType
from glaze_pipeline.core.providers.fake import FakeProvider
from glaze_pipeline.core.singleflight import RedisFlight
from glaze_pipeline.core.spend import MAX_BLOCK, SpendDelta, SpendJournal
from glaze_pipeline.core.store import Store
from glaze_pipeline.core.waterfall import Waterfall
from glaze_pipeline_tests.test_requests import running

PROVIDER = "fake_company"
COMPANIES = [
    EntityRequest(
        EntityKey(EntityType.COMPANY, "domain", f"batched{i:03d}.example"), frozenset({"industry"})
    )
    for i in range(60)
]


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    for name in client.scan_iter("glaze:*batched*"):
        client.delete(name)
    yield client
    client.close()


def flight_on(
    client: redis.Redis, lock_ttl: timedelta = timedelta(seconds=30), *, renew: bool = True
) -> RedisFlight:
    breaker = RedisBreaker()
    shared = RedisAnswerCache(client, breaker=breaker)
    return RedisFlight(client, shared=shared, breaker=breaker, lock_ttl=lock_ttl, renew=renew)


def keys(n: int) -> list[CacheKey]:
    return [(f"company:domain:batched{i:03d}.example", PROVIDER) for i in range(n)]


def test_a_ticks_claims_go_out_as_one_pipeline_and_so_do_their_releases(
    client: redis.Redis,
) -> None:
    flight = flight_on(client)
    wanted = keys(100)
    answer = CachedAnswer(True, {"industry": "Tech"}, {}, datetime.now(UTC))

    async def scenario() -> tuple[list[bool], list[int]]:
        contexts = [flight.claim(key) for key in wanted]
        claims = await asyncio.gather(*(context.__aenter__() for context in contexts))
        pipelines = [flight.link.pipelines]
        shared = claims[0].shared
        assert shared is not None
        # Every holder re-reads, then writes through: one pipeline each way for all 100.
        found = await asyncio.gather(*(shared.get_async(key) for key in wanted))  # type: ignore[attr-defined]
        assert found == [None] * 100
        pipelines.append(flight.link.pipelines)
        await asyncio.gather(*(shared.put_async(key, answer) for key in wanted))  # type: ignore[attr-defined]
        pipelines.append(flight.link.pipelines)
        await asyncio.gather(*(context.__aexit__(None, None, None) for context in contexts))
        pipelines.append(flight.link.pipelines)
        return [claim.held for claim in claims], pipelines

    held, pipelines = asyncio.run(scenario())
    assert all(held)
    assert pipelines == [1, 2, 3, 4]
    assert not any(client.exists(flight.lock_name(key)) for key in wanted)  # all released
    assert all(RedisAnswerCache(client).get_many(wanted).values())  # all written through


def test_two_runs_racing_on_redis_buy_each_answer_once(client: redis.Redis) -> None:
    """Two runs, each with its own client, flight and event loop, as two processes would."""
    barrier = threading.Barrier(2)
    runs: list[tuple[Waterfall, FakeProvider, redis.Redis]] = []
    for _ in range(2):
        own = redis.Redis.from_url(_url(client))
        fake = FakeProvider(EntityType.COMPANY, name=PROVIDER, latency_s=0.05)
        flight = flight_on(own)
        cache = TieredCache([MemoryCache(), RedisAnswerCache(own, breaker=flight.breaker)])
        runs.append((Waterfall([fake], budget=Budget(None), cache=cache, flight=flight), fake, own))

    def run(waterfall: Waterfall) -> None:
        barrier.wait()
        asyncio.run(waterfall.enrich_many(COMPANIES, concurrency=30))

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(run, waterfall) for waterfall, _, _ in runs]:
            future.result(timeout=60)
    calls = Counter[str]()
    for _, fake, own in runs:
        calls.update(fake.calls)
        own.close()
    assert sum(calls.values()) == len(COMPANIES) and set(calls.values()) == {1}
    stats = [waterfall.stats for waterfall, _, _ in runs]
    assert sum(s.shared_hits for s in stats) > 0  # one bought, the other read its answer
    for s in stats:
        assert s.calls[PROVIDER] + s.cache_hits == len(COMPANIES)


def _url(client: redis.Redis) -> str:
    settings = client.connection_pool.connection_kwargs
    return f"redis://{settings['host']}:{settings['port']}/{settings['db']}"


def test_a_release_never_frees_a_lock_someone_else_holds(client: redis.Redis) -> None:
    """The holder's lock expires, a second run takes it, then the first one's release (in the
    same pipeline as other work) must leave the second run's lock alone."""
    key = keys(1)[0]
    holder = flight_on(client, lock_ttl=timedelta(milliseconds=200), renew=False)  # stalled
    taker = flight_on(redis.Redis.from_url(_url(client)))

    async def scenario() -> tuple[bool, bytes | str | None, bytes | str | None]:
        dead = holder.claim(key)
        assert (await dead.__aenter__()).held
        await asyncio.sleep(0.3)  # the lock expired under its holder
        async with taker.claim(key) as taken:
            token = client.get(holder.lock_name(key))
            await dead.__aexit__(None, None, None)  # the late, token-checked release
            after = client.get(holder.lock_name(key))
        return taken.held, token, after

    held, token, after = asyncio.run(scenario())
    assert held and token is not None and after == token
    assert client.exists(holder.lock_name(key)) == 0  # the taker's own release freed it
    taker.client.close()


def test_a_coalescer_fails_every_caller_of_a_failed_batch_and_carries_on() -> None:
    sent: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        sent.append(items)
        if 13 in items:
            raise RuntimeError("boom")
        return [item * 2 for item in items]

    async def scenario() -> tuple[list[object], list[int]]:
        batch: Coalescer[int, int] = Coalescer(run)
        first = await asyncio.gather(*(batch.submit(i) for i in (12, 13)), return_exceptions=True)
        second = await asyncio.gather(*(batch.submit(i) for i in (1, 2, 3)))
        return list(first), list(second)

    first, second = asyncio.run(scenario())
    assert isinstance(first[0], RuntimeError) and isinstance(first[1], RuntimeError)
    assert second == [2, 4, 6]
    assert sent == [[12, 13], [1, 2, 3]]


# -- the spend journal's blocks ----------------------------------------------------------


def test_the_journal_commits_a_handful_of_blocks_for_thousands_of_calls(store: Store) -> None:
    requests, request_id = running(store)
    commits: list[dict[str, SpendDelta]] = []

    def write(deltas: Mapping[str, SpendDelta]) -> bool:
        commits.append(dict(deltas))
        return requests.record_spend(request_id, deltas)

    journal = SpendJournal(write)
    gate = asyncio.Semaphore(200)

    async def call(charged: bool) -> bool:
        async with gate:
            if not await journal.send("paid", 2.0):
                return False
            await asyncio.sleep(0.002)  # the vendor answers
            journal.settle("paid", 2.0, charged=charged)
            return True

    async def scenario() -> list[bool]:
        sent = await asyncio.gather(*(call(i % 3 != 0) for i in range(6000)))
        await journal.drain()
        return list(sent)

    assert all(asyncio.run(scenario()))
    assert len(commits) <= 10  # blocks, not a commit per call (or per handful of calls)
    spend = requests.spend(request_id)
    assert spend.calls == {"paid": 6000} and spend.unsettled == 0  # exact after the drain
    assert spend.cost == 2.0 * 4000


def test_a_crash_over_counts_by_at_most_the_stated_bound_and_never_under(store: Store) -> None:
    """A chunk killed mid-run (no drain): the ledger holds every call sent, at most
    3 * MAX_BLOCK calls more, all priced as charged."""
    requests, request_id = running(store)
    journal = SpendJournal(lambda deltas: requests.record_spend(request_id, deltas))
    sent = 0

    async def call(charged: bool) -> None:
        nonlocal sent
        if await journal.send("paid", 1.0):
            sent += 1
            await asyncio.sleep(0)
            journal.settle("paid", 1.0, charged=charged)

    async def scenario() -> None:
        await asyncio.gather(*(call(False) for _ in range(2500)))
        # The crash: the loop ends with slots reserved and settlements pending; no drain.
        while journal._writer is not None and not journal._writer.done():
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    spend = requests.spend(request_id)
    assert sent == 2500
    assert spend.calls["paid"] >= sent  # never under-counted
    assert spend.calls["paid"] - sent <= 3 * MAX_BLOCK
    # Every free miss not yet settled, and every unused slot, is priced as charged: over,
    # never under, and within the same bound.
    assert 0 <= spend.cost <= 3 * MAX_BLOCK * 1.0


def test_a_refused_block_stops_every_call_and_unused_slots_are_withdrawn(store: Store) -> None:
    requests, request_id = running(store)
    journal = SpendJournal(lambda deltas: requests.record_spend(request_id, deltas))

    async def scenario() -> tuple[bool, list[bool]]:
        first = await journal.send("paid", 1.0)
        journal.settle("paid", 1.0, charged=True)
        requests.request_cancel(request_id)
        # Slots reserved before the cancel may still be used (the engine's watch stops the
        # lookups); the next reservation is refused, and with it every call after.
        later = [await journal.send("paid", 1.0) for _ in range(40)]
        for sent in later:
            if sent:
                journal.settle("paid", 1.0, charged=True)
        await journal.drain()
        return first, later

    first, later = asyncio.run(scenario())
    used = sum(later)
    assert first and not all(later) and journal.refused
    assert not any(later[used:])  # nothing after the refusal
    spend = requests.spend(request_id)
    assert spend.calls == {"paid": 1 + used} and spend.unsettled == 0
