"""The waterfall's decisions, with in-process providers (HTTP providers have their own tests)."""

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from glaze_pipeline.core.budget import Budget
from glaze_pipeline.core.cache import CachedAnswer, CacheKey, MemoryCache
from glaze_pipeline.core.flight import Claim
from glaze_pipeline.core.models import CellStatus, EntityKey, EntityRequest, EntityType
from glaze_pipeline.core.providers.base import (
    CredentialsMissing,
    EntityNotFound,
    ProviderAnswer,
    TransientProviderError,
    Unreachable,
)
from glaze_pipeline.core.providers.fake import FakeProvider, fake_value
from glaze_pipeline.core.spend import SpendJournal
from glaze_pipeline.core.waterfall import BUDGET_EXHAUSTED, NOT_SENT_UNAVAILABLE, Waterfall

ACME = EntityKey(EntityType.COMPANY, "domain", "acme.com")


@dataclass
class Vendor:
    """A scripted vendor: answers `values`, or raises `error`, and counts its calls."""

    name: str
    cost_per_call: float
    values: dict[str, object] = field(default_factory=dict)
    confidence: float = 0.9
    error: Exception | None = None
    charges_misses: bool = False
    max_concurrency: int = 10
    entity_type: EntityType = EntityType.COMPANY
    calls: int = 0

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(self.values) or frozenset({"industry", "employee_count"})

    async def lookup(self, key: EntityKey, fields: frozenset[str]) -> ProviderAnswer:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return ProviderAnswer({k: v for k, v in self.values.items() if k in fields})


def run(waterfall: Waterfall, *requests: EntityRequest) -> list:
    return asyncio.run(waterfall.enrich_many(requests))


def want(*fields: str, key: EntityKey = ACME) -> EntityRequest:
    return EntityRequest(key, frozenset(fields))


def test_cheapest_first_and_stop_when_good_enough() -> None:
    cheap = Vendor("cheap", 1, {"industry": "Tech", "employee_count": 10})
    premium = Vendor("premium", 10, {"industry": "Software", "employee_count": 12})
    waterfall = Waterfall([premium, cheap], budget=Budget(None))
    [outcome] = run(waterfall, want("industry", "employee_count"))
    assert cheap.calls == 1 and premium.calls == 0
    assert outcome.fields["industry"].value.value == "Tech"
    assert outcome.fields["industry"].value.source == "cheap"
    assert waterfall.stats.cost["cheap"] == 1


def test_low_confidence_falls_through_and_keeps_the_better_value() -> None:
    cheap = Vendor("cheap", 1, {"industry": "Tech"}, confidence=0.5)
    premium = Vendor("premium", 10, {"industry": "Software"}, confidence=0.95)
    [outcome] = run(Waterfall([cheap, premium], budget=Budget(None)), want("industry"))
    assert (cheap.calls, premium.calls) == (1, 1)
    value = outcome.fields["industry"].value
    assert (value.value, value.source, value.confidence) == ("Software", "premium", 0.95)


def test_not_found_failed_and_skipped_are_distinct() -> None:
    missing = Vendor("missing", 1, error=EntityNotFound("no such company"))
    broken = Vendor("broken", 1, error=TransientProviderError("503 after 3 tries"))
    [not_found] = run(Waterfall([missing], budget=Budget(None)), want("industry"))
    [failed] = run(Waterfall([broken], budget=Budget(None)), want("industry"))
    [skipped] = run(
        Waterfall([Vendor("paid", 5, {"industry": "x"})], budget=Budget(4)), want("industry")
    )
    assert not_found.fields["industry"].status is CellStatus.NOT_FOUND
    assert failed.fields["industry"].status is CellStatus.FAILED
    assert "broken: 503 after 3 tries" in failed.fields["industry"].error
    assert skipped.fields["industry"].status is CellStatus.SKIPPED
    assert skipped.fields["industry"].error == BUDGET_EXHAUSTED


def test_misses_and_errors_are_not_charged_unless_the_vendor_charges_misses() -> None:
    free_miss = Vendor("free_miss", 3, error=EntityNotFound("no"))
    paid_miss = Vendor("paid_miss", 3, error=EntityNotFound("no"), charges_misses=True)
    error = Vendor("error", 3, error=TransientProviderError("timeout"))
    for vendor, spent in ((free_miss, 0), (paid_miss, 3), (error, 0)):
        budget = Budget(10)
        waterfall = Waterfall([vendor], budget=budget)
        run(waterfall, want("industry"))
        assert budget.spent == spent, vendor.name
        assert budget.reserved == 0
        assert waterfall.stats.cost.get(vendor.name, 0) == spent


def test_budget_is_never_exceeded_under_concurrency() -> None:
    provider = FakeProvider(EntityType.COMPANY, cost_per_call=1.0, latency_s=0.01)
    budget = Budget(40)
    requests = [
        want("industry", key=EntityKey(EntityType.COMPANY, "domain", f"c{i}.com"))
        for i in range(100)
    ]
    outcomes = asyncio.run(
        Waterfall([provider], budget=budget).enrich_many(requests, concurrency=25)
    )
    statuses = [o.fields["industry"].status for o in outcomes]
    assert provider.total_calls == 40
    assert budget.spent == 40
    assert statuses.count(CellStatus.DONE) == 40
    assert statuses.count(CellStatus.SKIPPED) == 60


@dataclass
class TaskCounter(Vendor):
    """A vendor that notes how many asyncio tasks exist while it answers."""

    most_tasks: int = 0
    started: list[str] = field(default_factory=list)

    async def lookup(self, key: EntityKey, fields: frozenset[str]) -> ProviderAnswer:
        self.most_tasks = max(self.most_tasks, len(asyncio.all_tasks()))
        self.started.append(key.value)
        await asyncio.sleep(0)
        return await super().lookup(key, fields)


def test_a_batch_holds_concurrency_lookups_not_a_task_per_entity() -> None:
    """2,000 entities at 20 at a time: 20 workers take them in the order given (memory for 20
    lookups, not 2,000 tasks); every outcome is heard once, and none is also collected."""
    vendor = TaskCounter("cheap", 1, {"industry": "Tech"}, max_concurrency=1000)
    requests = [
        want("industry", key=EntityKey(EntityType.COMPANY, "domain", f"c{i}.com"))
        for i in range(2000)
    ]
    heard: list[str] = []

    async def scenario() -> list[Any]:
        return await Waterfall([vendor], budget=Budget(None)).enrich_many(
            requests, concurrency=20, on_outcome=lambda outcome: heard.append(outcome.key.id)
        )

    assert asyncio.run(scenario()) == []
    assert vendor.calls == 2000
    assert vendor.started == [r.key.value for r in requests]
    assert sorted(heard) == sorted(r.key.id for r in requests)
    assert 20 <= vendor.most_tasks <= 20 + 2  # the workers, and the run's main task

    collected = asyncio.run(
        Waterfall([vendor], budget=Budget(None)).enrich_many(requests[:50], concurrency=7)
    )
    assert [o.key.id for o in collected] == [r.key.id for r in requests[:50]]


def test_no_provider_for_a_field_fails_with_the_reason() -> None:
    only_industry = Vendor("v", 1, {"industry": "Tech"})
    [outcome] = run(Waterfall([only_industry], budget=Budget(None)), want("industry", "revenue"))
    assert outcome.fields["industry"].status is CellStatus.DONE
    assert outcome.fields["revenue"].status is CellStatus.FAILED
    assert outcome.fields["revenue"].error == "no provider supplies company.revenue"


def test_cache_makes_the_second_run_free() -> None:
    cache = MemoryCache()
    provider = FakeProvider(EntityType.COMPANY)
    first = run(Waterfall([provider], budget=Budget(None), cache=cache), want("industry"))
    second_waterfall = Waterfall([provider], budget=Budget(None), cache=cache)
    second = run(second_waterfall, want("industry"))
    assert provider.total_calls == 1
    assert second_waterfall.stats.cache_hits == 1
    assert first[0].fields["industry"].value.value == second[0].fields["industry"].value.value
    assert second[0].fields["industry"].value.value == fake_value(ACME, "industry")


def test_a_waterfall_serving_many_batches_keeps_none_of_their_answers() -> None:
    """A span asks one batch per page of the entities earlier spans bought: each batch's
    answers are dropped once it is settled (they are in the cache), and asked again they are
    cache hits, not calls."""
    cache = MemoryCache()
    provider = FakeProvider(EntityType.COMPANY)
    companies = [
        want("industry", key=EntityKey(EntityType.COMPANY, "domain", f"co{i}.example"))
        for i in range(20)
    ]
    run(Waterfall([provider], budget=Budget(None), cache=cache), *companies)
    span = Waterfall([provider], budget=Budget(None), cache=cache)

    async def pages() -> list[int]:
        held = []
        for page in (companies[:10], companies[10:], companies[:10]):
            await span.enrich_many(page)
            held.append(len(span._cached))
        return held

    assert asyncio.run(pages()) == [0, 0, 0]
    assert provider.total_calls == 20  # bought once, by the first run
    assert span.stats.cache_hits == 30


class SlowReads(MemoryCache):
    """A cache whose batch read takes a while, as a chunk's Redis MGET and database read do;
    it notes the thread each read ran in."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.read_in: list[str] = []

    def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, CachedAnswer]:
        self.read_in.append(threading.current_thread().name)
        time.sleep(self.seconds)
        return super().get_many(keys)


def test_the_batch_s_cache_read_leaves_the_event_loop_free() -> None:
    """While a batch's cached answers are read, other work on the loop goes on (lookups in
    flight, the flight's lock renewal): the read runs in a thread, not on the loop."""
    cache = SlowReads(0.3)
    waterfall = Waterfall([FakeProvider(EntityType.COMPANY)], budget=Budget(None), cache=cache)
    loop_thread: list[str] = []

    async def scene() -> float:
        loop_thread.append(threading.current_thread().name)
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.01)

        beating = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        await waterfall.enrich_many([want("industry")])
        beating.cancel()
        return max(b - a for a, b in itertools.pairwise(ticks))

    longest_gap = asyncio.run(scene())
    assert cache.read_in and loop_thread[0] not in cache.read_in
    assert longest_gap < 0.2  # the read took 0.3 s; on the loop the ticker would wait it out


def test_name_keys_lower_confidence() -> None:
    weak = EntityKey(EntityType.COMPANY, "name", "acme", 0.7)
    provider = FakeProvider(EntityType.COMPANY, confidence=0.9)
    [outcome] = run(Waterfall([provider], budget=Budget(None)), want("industry", key=weak))
    assert outcome.fields["industry"].value.confidence == pytest.approx(0.63)


def test_a_provider_that_cannot_look_up_the_key_kind_is_passed_over() -> None:
    class DomainOnly(Vendor):
        def supports(self, key: EntityKey) -> bool:
            return key.kind == "domain"

    domain_only = DomainOnly("domain_only", 1, {"industry": "Tech"})
    by_name = EntityKey(EntityType.COMPANY, "name", "acme", 0.7)
    waterfall = Waterfall([domain_only], budget=Budget(10))
    [outcome] = run(waterfall, want("industry", key=by_name))
    assert domain_only.calls == 0
    assert waterfall.stats.calls == {} and waterfall.stats.errors == {}
    assert outcome.fields["industry"].status is CellStatus.FAILED
    assert outcome.fields["industry"].error == "no provider can look up a company by name"


def test_an_unusable_provider_is_never_called_and_its_cells_say_why() -> None:
    cheap = Vendor("cheap", 1, {"industry": "Tech"})
    premium = Vendor("premium", 10, {"industry": "Software", "revenue": "$1M"})
    waterfall = Waterfall(
        [cheap, premium], budget=Budget(None), unavailable={"premium": "API key missing"}
    )
    [outcome] = run(waterfall, want("industry", "revenue"))
    assert premium.calls == 0
    assert outcome.fields["industry"].status is CellStatus.DONE
    revenue = outcome.fields["revenue"]
    assert revenue.status is CellStatus.SKIPPED
    assert revenue.error == "provider unavailable (premium: API key missing)"
    assert dict(waterfall.stats.calls) == {"cheap": 1}
    assert waterfall.stats.not_sent_dict() == {"premium": {NOT_SENT_UNAVAILABLE: 1}}


def test_a_miss_before_an_unusable_provider_is_skipped_not_not_found() -> None:
    # The walk did not finish: the vendor that might have known was not asked.
    missing = Vendor("missing", 1, {"industry": "Tech"}, error=EntityNotFound("no such company"))
    premium = Vendor("premium", 10, {"industry": "Software"})
    waterfall = Waterfall([missing, premium], budget=Budget(None), unavailable={"premium": "off"})
    [outcome] = run(waterfall, want("industry"))
    assert outcome.fields["industry"].status is CellStatus.SKIPPED
    assert outcome.fields["industry"].error == "provider unavailable (premium: off)"


@dataclass
class Breaker(Vendor):
    """A vendor whose circuit is open: it says so before any call."""

    def unavailable_reason(self) -> str | None:
        return "circuit open after 5 consecutive failures"


def test_an_open_circuit_is_checked_before_the_call_is_journalled() -> None:
    sent: list[dict[str, Any]] = []

    def write(deltas: Any) -> bool:
        sent.append({name: (d.calls, d.withdrawn) for name, d in deltas.items()})
        return True

    broken = Breaker("premium", 10, {"industry": "Software"})

    async def go() -> list:
        waterfall = Waterfall([broken], budget=Budget(None), journal=SpendJournal(write))
        outcomes = await waterfall.enrich_many([want("industry")])
        return [outcomes, waterfall]

    [[outcome], waterfall] = asyncio.run(go())
    assert broken.calls == 0 and sent == []
    assert outcome.fields["industry"].status is CellStatus.SKIPPED
    assert "circuit open" in outcome.fields["industry"].error
    assert waterfall.stats.not_sent_dict() == {"premium": {NOT_SENT_UNAVAILABLE: 1}}


def test_a_call_refused_on_the_way_out_is_withdrawn_from_the_ledger() -> None:
    """Journalled before it is sent; refused before anything left (the key went missing
    between the preflight and the call): the ledger takes it back, the stats count it apart."""
    deltas: list[dict[str, tuple[int, int]]] = []

    def write(batch: Any) -> bool:
        deltas.append({name: (d.calls, d.withdrawn) for name, d in batch.items()})
        return True

    refusing = Vendor(
        "premium",
        10,
        {"industry": "Software"},
        error=CredentialsMissing("premium: API key missing: set the environment variable K"),
    )
    journal = SpendJournal(write)

    async def go() -> tuple[Any, Waterfall]:
        waterfall = Waterfall([refusing], budget=Budget(100), journal=journal)
        [outcome] = await waterfall.enrich_many([want("industry")])
        await journal.drain()
        return outcome, waterfall

    outcome, waterfall = asyncio.run(go())
    assert refusing.calls == 1  # the provider was entered, but nothing was sent
    journalled = sum(d.get("premium", (0, 0))[0] for d in deltas)
    withdrawn = sum(d.get("premium", (0, 0))[1] for d in deltas)
    assert journalled - withdrawn == 0 and withdrawn >= 1  # slots ahead are withdrawn too
    assert dict(waterfall.stats.calls) == {"premium": 0}
    assert waterfall.stats.cost == {}
    assert waterfall.budget.spent == 0
    assert outcome.fields["industry"].error == (
        "provider unavailable (premium: API key missing: set the environment variable K)"
    )


def test_lookups_are_observed_by_provider_and_key_kind() -> None:
    cheap = Vendor("cheap", 1, {"industry": "Tech", "employee_count": None})
    waterfall = Waterfall([cheap], budget=Budget(None))
    run(waterfall, want("industry", "employee_count"))
    observed = waterfall.stats.observed[("cheap", "domain")]
    assert (observed.lookups, observed.found, observed.charged) == (1, 1, 1)
    assert observed.fields == {"industry": [1, 1], "employee_count": [1, 0]}


def test_a_vendor_nobody_could_connect_to_fails_the_cell_but_is_no_call() -> None:
    down = Vendor("down", 1, {"industry": "Tech"}, error=Unreachable("down: connection refused"))
    waterfall = Waterfall([down], budget=Budget(None))
    [outcome] = run(waterfall, want("industry"))
    assert outcome.fields["industry"].status is CellStatus.FAILED
    assert outcome.fields["industry"].error == "down: connection refused"
    assert waterfall.stats.calls["down"] == 0
    assert waterfall.stats.not_sent_dict() == {"down": {"unreachable": 1}}


class SharingFlight:
    """Grants every claim with `shared` as the contenders' tier (as Redis would be)."""

    backend = "test"

    def __init__(self) -> None:
        self.shared = MemoryCache()
        self.failed = False

    @asynccontextmanager
    async def claim(self, key: CacheKey) -> AsyncIterator[Claim]:
        yield Claim(held=True, shared=self.shared)

    def degraded(self) -> bool:
        return self.failed

    def close(self) -> None:
        return None


class RefusingCache(MemoryCache):
    """A shared tier that is down: every write fails."""

    def put_many(self, answers: Any) -> None:
        raise ConnectionError("the shared tier is down")


def test_only_answers_no_shared_tier_holds_are_urgent_to_flush() -> None:
    """The chunk flushes answers a claim already wrote through to the shared tier on a slow
    clock; one the shared tier does not hold (no claim, or the tier failed since) is urgent."""
    companies = [
        want("industry", key=EntityKey(EntityType.COMPANY, "domain", f"co{i}.example"))
        for i in range(3)
    ]
    flight = SharingFlight()
    shared = Waterfall([FakeProvider(EntityType.COMPANY)], budget=Budget(None), flight=flight)
    asyncio.run(shared.enrich_many(companies, flush=False))
    assert len(flight.shared) == 3  # written through under the claims
    assert not shared.unshared_for()
    flight.failed = True  # Redis failed after: only the flush keeps the answers now
    assert shared.unshared_for()
    bought = {(c.key.id, "fake_company") for c in companies}
    assert bought <= set(shared.take_new_answers())  # with the aliases they brought along
    assert not shared.unshared_for()  # nothing left to flush

    alone = Waterfall([FakeProvider(EntityType.COMPANY)], budget=Budget(None), cache=MemoryCache())
    asyncio.run(alone.enrich_many(companies, flush=False))
    assert alone.unshared_for()  # no shared tier: the flush is all there is
    assert alone.unshared_for(60.0)  # nothing will share them: urgent at once
    alone.take_new_answers()
    assert not alone.unshared_for(0.0)

    # Under a claim whose shared tier failed to take it, an answer counts once it has waited
    # (one bought a moment ago is usually on its way to Redis).
    failing = SharingFlight()
    failing.shared = RefusingCache()  # the write through fails: the answer stays unshared
    late = Waterfall([FakeProvider(EntityType.COMPANY)], budget=Budget(None), flight=failing)
    asyncio.run(late.enrich_many(companies, flush=False))
    assert late.unshared_for()
    assert not late.unshared_for(60.0)
    time.sleep(0.05)
    assert late.unshared_for(0.05)
