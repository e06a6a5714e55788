"""A job never spends past its budget: one chunk, parallel chunks, free and charged misses.

The budget lives on the request row; chunks lease it in blocks (`Store.lease_budget`), so these
run the engine's own stages against both databases.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from glaze_pipeline.core import engine
from glaze_pipeline.core.engine import ApplySummary, ChunkResult, JobSettings
from glaze_pipeline.core.models import EntityRequest, EntityType, Selection
from glaze_pipeline.core.providers.fake import FakeProvider
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.store import Store, TableInfo
from glaze_pipeline.core.waterfall import BUDGET_EXHAUSTED

ENTITIES = 100
BUDGET = 40.0


@pytest.fixture
def table(store: Store) -> TableInfo:
    """100 rows, one per company: every row needs its own paid lookup."""
    return seed_generated(store, rows=ENTITIES, unique_companies=ENTITIES)


def enrich_industry(
    store: Store,
    table: TableInfo,
    settings: JobSettings,
    providers_per_chunk: Sequence[Sequence[FakeProvider]],
) -> tuple[str, ApplySummary]:
    """The job's stages; chunk i runs with providers_per_chunk[i], all chunks at once."""
    selection = Selection(column_ids=[table.column_by_key("industry").id])
    target = engine.resolve_target(store, table.id, selection)
    request_id = engine.start_job(store, target, selection, settings)
    detection = engine.detect_entities(store, target)
    chunks = engine.plan_chunks(
        detection.entities,
        chunk_size=settings.chunk_size,
        max_chunks=settings.fan_out("in_process"),
    )
    assert len(chunks) == len(providers_per_chunk)
    start = threading.Barrier(len(chunks))

    def run(chunk: list[EntityRequest], providers: Sequence[FakeProvider]) -> ChunkResult:
        start.wait()
        return engine.enrich_chunk(store, request_id, chunk, providers, settings, cache=None)

    with ThreadPoolExecutor(len(chunks)) as pool:
        futures = [pool.submit(run, c, p) for c, p in zip(chunks, providers_per_chunk, strict=True)]
        results = [future.result(timeout=60) for future in futures]
    outcomes, stats = engine.merge_chunks(results)
    summary = engine.apply_results(store, request_id, target, outcomes)
    engine.finish_job(
        store, request_id, entities=len(detection.entities), stats=stats, summary=summary
    )
    return request_id, summary


def industry_cells(store: Store, table: TableInfo) -> list[dict[str, object]]:
    return [row.meta["industry"] for row in store.rows_in_order(table.id)]


@pytest.mark.parametrize("block_calls", [20, 7, 100])
def test_budget_for_40_calls_buys_40_and_skips_the_other_60(
    store: Store, table: TableInfo, block_calls: int
) -> None:
    # Blocks that divide the budget, that do not, and one larger than the whole budget.
    paid = FakeProvider(EntityType.COMPANY, cost_per_call=1.0)
    settings = JobSettings(budget=BUDGET, budget_block_calls=block_calls)

    request_id, summary = enrich_industry(store, table, settings, [[paid]])

    assert paid.total_calls == 40
    assert summary.cells == {"done": 40, "skipped": 60}
    skipped = [cell for cell in industry_cells(store, table) if cell["status"] == "skipped"]
    assert len(skipped) == 60
    assert {cell["error"] for cell in skipped} == {BUDGET_EXHAUSTED}
    request = store.get_request(request_id)
    assert (request.status, request.cost, request.cells_skipped) == ("partial", 40.0, 60)
    assert request.budget_reserved == pytest.approx(BUDGET)  # all of it spent, none lost


@pytest.mark.parametrize("block_calls", [20, 7, 100])
def test_parallel_chunks_share_one_budget_and_never_pass_it(
    store: Store, table: TableInfo, block_calls: int
) -> None:
    settings = JobSettings(
        budget=BUDGET, chunk_size=50, max_chunks=2, budget_block_calls=block_calls
    )
    providers = [
        FakeProvider(EntityType.COMPANY, cost_per_call=1.0, latency_s=0.005) for _ in range(2)
    ]

    request_id, summary = enrich_industry(store, table, settings, [[p] for p in providers])

    assert sum(p.total_calls for p in providers) == 40
    assert summary.cells == {"done": 40, "skipped": 60}
    assert {c["error"] for c in industry_cells(store, table) if c["status"] == "skipped"} == {
        BUDGET_EXHAUSTED
    }
    request = store.get_request(request_id)
    assert request.cost == 40.0
    assert request.budget_reserved == pytest.approx(BUDGET)


def test_free_misses_are_not_charged(store: Store, table: TableInfo) -> None:
    unknown = FakeProvider(EntityType.COMPANY, cost_per_call=1.0, miss_rate=1.0)
    assert unknown.charges_misses is False

    request_id, summary = enrich_industry(store, table, JobSettings(budget=BUDGET), [[unknown]])

    assert unknown.total_calls == 100  # all asked: a miss costs nothing, so the budget holds
    assert summary.cells == {"not_found": 100}
    request = store.get_request(request_id)
    assert (request.status, request.cost) == ("succeeded", 0.0)
    assert request.budget_reserved == 0.0  # every reservation was given back


def test_charged_misses_count_against_the_budget(store: Store, table: TableInfo) -> None:
    unknown = FakeProvider(
        EntityType.COMPANY, cost_per_call=1.0, miss_rate=1.0, charges_misses=True
    )

    request_id, summary = enrich_industry(store, table, JobSettings(budget=BUDGET), [[unknown]])

    assert unknown.total_calls == 40
    assert summary.cells == {"not_found": 40, "skipped": 60}
    assert store.get_request(request_id).cost == 40.0


def test_free_misses_before_a_paid_provider_cost_nothing(store: Store, table: TableInfo) -> None:
    cheap = FakeProvider(EntityType.COMPANY, name="cheap", cost_per_call=0.5, miss_rate=1.0)
    paid = FakeProvider(EntityType.COMPANY, name="paid", cost_per_call=1.0)
    # One entity at a time, so no free call's reservation is in flight when a paid one asks.
    settings = JobSettings(budget=BUDGET, concurrency=1)

    request_id, summary = enrich_industry(store, table, settings, [[cheap, paid]])

    # Had the misses been charged, 1.5 per entity would have bought 26 answers, not 40. Once
    # the budget is gone the cheap provider is not asked either: a hit there would be charged.
    assert (cheap.total_calls, paid.total_calls) == (40, 40)
    assert summary.cells == {"done": 40, "skipped": 60}
    request = store.get_request(request_id)
    assert request.cost_by_provider == {"paid": 40.0}
    assert request.provider_calls == {"cheap": 40, "paid": 40}
