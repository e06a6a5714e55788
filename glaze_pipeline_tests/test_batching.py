"""The micro-batcher over real loopback HTTP: the waterfall asks per entity, the vendor sees
batch requests, and calls, cost and errors are still counted per entity.

`python -m glaze_pipeline_tests.test_batching [lookups]` measures worker CPU per entity with
and without batching (printed, not asserted).
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from pathlib import Path

import httpx
import pytest

from glaze_pipeline.bench.stack import free_port
from glaze_pipeline.core.answers import open_answer_sharing
from glaze_pipeline.core.budget import Budget
from glaze_pipeline.core.models import CellStatus, EntityKey, EntityRequest, EntityType
from glaze_pipeline.core.providers import base
from glaze_pipeline.core.providers.base import Provider, has_capability
from glaze_pipeline.core.providers.batching import (
    BatchingProvider,
    batching_provider,
    with_batching,
)
from glaze_pipeline.core.providers.fake import FakeProvider, fake_value
from glaze_pipeline.core.providers.http import provider_session
from glaze_pipeline.core.providers.json_api import JsonApiProvider
from glaze_pipeline.core.providers.registry import load_providers
from glaze_pipeline.core.providers.session import ClosableProvider, SessionedProvider
from glaze_pipeline.core.store import Store
from glaze_pipeline.core.waterfall import NOT_SENT_UNREACHABLE, Waterfall
from glaze_pipeline.testing.mock_server import MockProviderServer, is_miss
from glaze_pipeline_tests.provider_helpers import (
    company,
    company_vendor,
    configure_vendor,
    run_waterfall,
)

MOCK_FILE = Path(__file__).resolve().parents[1] / "seed" / "providers.mock.yaml"


def vendor(mock: MockProviderServer, name: str = "premium", **http: object) -> JsonApiProvider:
    cost = {"premium": 10.0, "cheap": 1.0}[name]
    return JsonApiProvider(
        company_vendor(
            mock.vendor_url(name),
            name=f"{name}_company",
            cost_per_call=cost,
            charges_misses=name == "premium",
            http={"retries": 0, **http},
        )
    )


def wanted(keys: list[EntityKey], *fields: str) -> list[EntityRequest]:
    return [EntityRequest(key, frozenset(fields or ("name", "industry"))) for key in keys]


@pytest.mark.parametrize("max_size", [10, 20, 50])
def test_concurrent_lookups_go_out_in_batches_and_are_counted_per_entity(
    mock: MockProviderServer, max_size: int
) -> None:
    configure_vendor(mock, "cheap", not_found_rate=0.3)
    inner = vendor(mock, "cheap")
    [provider] = with_batching([inner], max_size=max_size)
    keys = [company(f"batched{i}.com") for i in range(50)]
    missing = {key.id for key in keys if is_miss("cheap", key, 0.3)}
    assert 0 < len(missing) < 50
    budget = Budget(1000.0)

    outcomes, waterfall = asyncio.run(run_waterfall([provider], wanted(keys), budget))

    cheap = mock.stats()["vendors"]["cheap"]
    batches = math.ceil(50 / max_size)
    assert (cheap["requests"], cheap["batch_requests"], cheap["batch_entities"]) == (
        batches,
        batches,
        50,
    )
    assert cheap["lookups"] == 50 == cheap["entities"]
    # Per entity, as the vendor bills: 50 calls; the misses free (cheap does not charge them).
    found = 50 - len(missing)
    assert waterfall.stats.calls["cheap_company"] == 50
    assert waterfall.stats.cost["cheap_company"] == found * 1.0 == cheap["cost"]
    assert cheap["billed"] == found
    assert budget.spent == found * 1.0 and budget.reserved == 0
    for outcome in outcomes:
        status = outcome.fields["industry"].status
        if outcome.key.id in missing:
            assert status is CellStatus.NOT_FOUND
        else:
            assert status is CellStatus.DONE
            value = outcome.fields["industry"].value
            assert value is not None and value.value == fake_value(outcome.key, "industry")
    assert isinstance(provider, BatchingProvider) and provider.batches_sent == batches


def test_a_vendor_that_charges_misses_bills_every_member(mock: MockProviderServer) -> None:
    configure_vendor(mock, "premium", not_found_rate=0.3)
    [provider] = with_batching([vendor(mock, "premium")], max_size=25)
    keys = [company(f"charged{i}.com") for i in range(50)]

    outcomes, waterfall = asyncio.run(run_waterfall([provider], wanted(keys), Budget(None)))

    premium = mock.stats()["vendors"]["premium"]
    assert (premium["batch_requests"], premium["billed"], premium["cost"]) == (2, 50, 500.0)
    assert waterfall.stats.calls["premium_company"] == 50
    assert waterfall.stats.cost["premium_company"] == 500.0
    statuses = {o.fields["name"].status for o in outcomes}
    assert statuses == {CellStatus.DONE, CellStatus.NOT_FOUND}


def test_a_failed_batch_fails_each_member_as_a_call_not_charged(
    mock: MockProviderServer,
) -> None:
    configure_vendor(mock, "premium", error_rate=1.0)
    [provider] = with_batching([vendor(mock, "premium")], max_size=10)
    keys = [company(f"failing{i}.com") for i in range(30)]
    budget = Budget(1000.0)

    outcomes, waterfall = asyncio.run(run_waterfall([provider], wanted(keys), budget))

    premium = mock.stats()["vendors"]["premium"]
    assert (premium["batch_requests"], premium["statuses"], premium["billed"]) == (
        3,
        {"500": 3},
        0,
    )
    assert premium["lookups"] == 30 and premium["entities"] == 0
    # The requests went out: 30 calls, 30 errors, nothing charged, every reservation back.
    assert waterfall.stats.calls["premium_company"] == 30
    assert waterfall.stats.errors["premium_company"] == 30
    assert waterfall.stats.cost["premium_company"] == 0
    assert budget.spent == 0 and budget.reserved == 0
    for outcome in outcomes:
        cell = outcome.fields["name"]
        assert cell.status is CellStatus.FAILED
        assert cell.error is not None and cell.error.startswith("premium_company: ")
        assert "500" in cell.error


def test_a_batch_that_never_left_the_machine_is_no_call_for_any_member() -> None:
    port = free_port()  # nobody listens: connection refused, nothing was asked of the vendor
    inner = JsonApiProvider(
        company_vendor(f"http://127.0.0.1:{port}/premium", http={"retries": 0}, cost_per_call=10.0)
    )
    [provider] = with_batching([inner], max_size=10)
    keys = [company(f"unreached{i}.com") for i in range(20)]
    budget = Budget(1000.0)

    outcomes, waterfall = asyncio.run(run_waterfall([provider], wanted(keys), budget))

    stats = waterfall.stats
    assert stats.calls["premium_company"] == 0
    assert stats.not_sent_dict() == {"premium_company": {NOT_SENT_UNREACHABLE: 20}}
    assert stats.errors["premium_company"] == 20  # the vendor is down, all the same
    assert budget.spent == 0 and budget.reserved == 0
    assert {o.fields["name"].status for o in outcomes} == {CellStatus.FAILED}


def test_keys_the_batch_endpoint_does_not_take_go_alone_and_fields_are_unioned(
    mock: MockProviderServer,
) -> None:
    inner = vendor(mock, "premium")
    provider = batching_provider(inner, max_size=10, max_wait_s=0.05)
    by_domain = [company(f"mixed{i}.com") for i in range(10)]
    by_name = [EntityKey(EntityType.COMPANY, "name", f"mixed {i}") for i in range(3)]

    async def run() -> list[base.ProviderAnswer]:
        async with provider_session([provider]):
            asks = [
                provider.lookup(key, frozenset({"name"} if i % 2 else {"revenue"}))
                for i, key in enumerate(by_domain + by_name)
            ]
            return await asyncio.gather(*asks)

    answers = asyncio.run(run())

    premium = mock.stats()["vendors"]["premium"]
    # Ten domains in one batch (asked for different fields), three names one by one.
    assert (premium["requests"], premium["batch_requests"], premium["lookups"]) == (4, 1, 13)
    for key, answer in zip(by_domain + by_name, answers, strict=True):
        assert answer.values["name"] == fake_value(key, "name")
        assert answer.values["revenue"] == fake_value(key, "revenue")


def test_a_lookup_cancelled_while_queued_is_not_sent(mock: MockProviderServer) -> None:
    provider = batching_provider(vendor(mock, "premium"), max_size=10, max_wait_s=0.05)

    async def run() -> base.ProviderAnswer:
        async with provider_session([provider]):
            dropped = asyncio.ensure_future(provider.lookup(company("gone.com"), frozenset()))
            kept = asyncio.ensure_future(provider.lookup(company("kept.com"), frozenset()))
            await asyncio.sleep(0)
            dropped.cancel()
            return await kept

    answer = asyncio.run(run())

    assert answer.values["name"] == fake_value(company("kept.com"), "name")
    premium = mock.stats()["vendors"]["premium"]
    assert (premium["batch_requests"], premium["batch_entities"]) == (1, 1)


def test_two_runs_sharing_redis_buy_each_entity_once_in_batches(
    mock: MockProviderServer, pg_store: Store, redis_url: str
) -> None:
    """Single-flight claims are per entity and held while the entity waits for its batch:
    two runs asking for the same 40 companies at once still buy each of them once."""
    [provider] = with_batching([vendor(mock, "premium")], max_size=10)
    keys = [company(f"shared{i}.com") for i in range(40)]

    async def run() -> list[Waterfall]:
        with (
            open_answer_sharing(pg_store, redis_url) as first,
            open_answer_sharing(pg_store, redis_url) as second,
        ):
            runs = [
                Waterfall([provider], budget=Budget(None), cache=s.cache, flight=s.flight)
                for s in (first, second)
            ]
            async with provider_session([provider]):
                await asyncio.gather(*(w.enrich_many(wanted(keys)) for w in runs))
            return runs

    runs = asyncio.run(run())

    premium = mock.stats()["vendors"]["premium"]
    assert premium["lookups"] == 40 == premium["billed"]
    assert premium["batch_requests"] == premium["requests"] >= 4
    assert sum(w.stats.calls["premium_company"] for w in runs) == 40
    assert sum(w.stats.cost["premium_company"] for w in runs) == 400.0
    assert sum(w.stats.shared_hits for w in runs) == 40


def test_only_providers_with_a_batch_endpoint_are_wrapped_with_their_capabilities(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GLAZE_MOCK_PROVIDERS_URL", "http://127.0.0.1:9999")
    text = MOCK_FILE.read_text().replace("enabled: false", "enabled: true", 1)
    (tmp_path / "providers.yaml").write_text(text)
    loaded: list[Provider] = load_providers(tmp_path / "providers.yaml")
    no_batch = JsonApiProvider(company_vendor("http://127.0.0.1:9999/x", batch=None))
    loaded += [FakeProvider(EntityType.COMPANY), no_batch]

    wrapped = with_batching(loaded, max_size=500)

    capabilities = (
        base.ChoosesKeys,
        base.NamesItsSource,
        base.KnowsWhenUnavailable,
        base.AlwaysAnswers,
        base.KeepsLlmCalls,
        base.ReportsHealth,
        base.ChecksItself,
        SessionedProvider,
        ClosableProvider,
    )
    batched = {p.name for p in wrapped if isinstance(p, BatchingProvider)}
    assert batched == {"cheap_company", "premium_company", "people_vendor"}
    for before, after in zip(loaded, wrapped, strict=True):
        if after is before:
            continue
        assert isinstance(after, BatchingProvider) and after.inner is before
        assert after.max_size == 100  # the vendor's own batch.max_size caps a larger ask
        for capability in capabilities:
            assert has_capability(after, capability) == has_capability(before, capability)
        assert not has_capability(after, base.LooksUpMany)  # not wrapped twice
        assert (after.name, after.fields, after.cost_per_call, after.charges_misses) == (
            before.name,
            before.fields,
            before.cost_per_call,
            before.charges_misses,
        )
        assert after.max_concurrency == before.max_concurrency * after.max_size
    assert with_batching(wrapped) == wrapped
    with pytest.raises(ValueError, match="no batch endpoint"):
        BatchingProvider(no_batch)


# --- CPU per entity, with and without batching (not a test: `python -m` this module) ------


# The seed file's timeouts: the tests' short ones fail connects to a busy mock at 200 at once.
MEASURE_HTTP = {"retries": 0, "connect_timeout_s": 3, "read_timeout_s": 10, "attempt_timeout_s": 30}


def measure(
    mock_url: str, lookups: int, *, max_size: int | None, redis_url: str | None, workdir: Path
) -> dict[str, float]:
    """This process's CPU per entity (the mock runs in its own) for `lookups` new companies
    through one waterfall at concurrency 200; `max_size` None: no batching; `redis_url`: the
    Redis tier and single-flight on (with a SQLite store behind them)."""
    inner = JsonApiProvider(
        company_vendor(f"{mock_url}/premium", http={**MEASURE_HTTP, "max_concurrency": 200})
    )
    providers = with_batching([inner], max_size=max_size) if max_size else [inner]
    tag = f"{max_size}-{bool(redis_url)}-{time.time_ns()}"
    requests = wanted([company(f"cpu-{tag}-{i}.com") for i in range(lookups)])
    store = Store(f"sqlite:///{workdir / f'{tag}.db'}")
    store.upgrade()

    async def run() -> Waterfall:
        with open_answer_sharing(store, redis_url) as sharing:
            waterfall = Waterfall(
                providers, budget=Budget(None), cache=sharing.cache, flight=sharing.flight
            )
            async with provider_session(providers):
                await waterfall.enrich_many(requests, concurrency=200)
            return waterfall

    before = httpx.get(f"{mock_url}/_stats").json()["vendors"].get("premium", {})
    cpu, wall = time.process_time(), time.perf_counter()
    waterfall = asyncio.run(run())
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    after = httpx.get(f"{mock_url}/_stats").json()["vendors"]["premium"]
    store.dispose()
    assert waterfall.stats.calls["premium_company"] == lookups, (waterfall.stats, after)
    assert after["lookups"] - before.get("lookups", 0) == lookups
    return {
        "cpu_ms_per_entity": 1000 * cpu / lookups,
        "wall_s": wall,
        "http_requests": after["requests"] - before.get("requests", 0),
    }


def main(lookups: int, redis_url: str) -> None:
    import tempfile

    from glaze_pipeline.bench.services import mock_process

    with tempfile.TemporaryDirectory() as tmp, mock_process(Path(tmp), 20.0) as mock:
        for tier in (None, redis_url):
            for size in (None, 10, 100):
                figures = measure(
                    mock.url, lookups, max_size=size, redis_url=tier, workdir=Path(tmp)
                )
                label = f"batches of {size}" if size else "per entity"
                where = "redis tier + single-flight" if tier else "no shared tier"
                print(f"{where:27} {label:15}", {k: round(v, 3) for k, v in figures.items()})


if __name__ == "__main__":
    import os

    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 2000,
        os.environ.get("GLAZE_TEST_REDIS_URL", "redis://127.0.0.1:6379/9"),
    )
