"""Chunks are spans of rows that write as they go: every row in one span, every entity bought
once across spans, rows written before the lookups end, a cancel mid-span, on both databases."""

from typing import Any

from glaze_pipeline.core import engine
from glaze_pipeline.core.cache_sql import SqlAnswerCache
from glaze_pipeline.core.engine import Chunk, JobSettings
from glaze_pipeline.core.models import CellStatus, EntityType, RowStatus, Selection
from glaze_pipeline.core.providers.fake import FakeProvider
from glaze_pipeline.core.requests import RequestRepository
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.store import Store

COLUMNS = ("industry", "employee_count", "title")


def providers(latency_s: float = 0.0) -> list[FakeProvider]:
    return [
        FakeProvider(EntityType.COMPANY, latency_s=latency_s),
        FakeProvider(EntityType.PERSON, latency_s=latency_s),
    ]


def plan(
    store: Store, table_id: str, settings: JobSettings, selection: Selection | None = None
) -> tuple[engine.JobTarget, str, engine.Detection, list[Chunk]]:
    if selection is None:
        table = store.get_table(table_id)
        selection = Selection(column_ids=[table.column_by_key(key).id for key in COLUMNS])
    target = engine.resolve_target(store, table_id, selection)
    request_id = engine.start_job(store, target, selection, settings)
    detection = engine.detect_entities(
        store, target, page_size=settings.page_size, request_id=request_id
    )
    spans = engine.plan_spans(
        detection, target, chunk_size=settings.chunk_size, max_chunks=settings.fan_out("in_process")
    )
    return target, request_id, detection, spans


def test_spans_cover_every_row_once_and_own_every_entity_once(store: Store) -> None:
    table = seed_generated(store, rows=1_000, unique_companies=60)
    settings = JobSettings(page_size=100, chunk_size=150, max_chunks=5)
    target, _, detection, spans = plan(store, table.id, settings)
    assert 1 < len(spans) <= 5
    seen: list[str] = []
    for span in spans:
        for page in store.iter_row_pages(table.id, after=span.after, upto=span.upto):
            seen += [row.id for row in page]
    assert sorted(seen) == sorted(row.id for row in store.rows_in_order(table.id))
    assert len(seen) == len(set(seen)) == 1_000
    assert sum(span.rows for span in spans) == 1_000
    owned = [request.key.id for span in spans for request in span.entities]
    assert len(owned) == len(set(owned)) == len(detection.entities)
    # Entities come in the order the rows first need them: the first span owns the first rows'.
    first_rows = next(store.iter_row_pages(table.id, page_size=100))
    first_needs = set(engine._page_entities(target, first_rows))
    assert first_needs <= {request.key.id for request in spans[0].entities}


def test_spans_side_by_side_share_the_work_when_rows_repeat_their_entities(
    store: Store,
) -> None:
    """S5's shape (rows cycle over the companies, each met first in the first rows): cut by
    entities, the last span writes nearly every row; side by side, the spans share rows and
    entities by weight, and still cover every row and own every entity once."""
    table = seed_generated(store, rows=3_000, unique_companies=300, unique_people=300)
    settings = JobSettings(page_size=500, chunk_size=10, max_chunks=8)
    target, _, detection, by_entities = plan(store, table.id, settings)
    # The imbalance (row ids are random: the first rows meet most entities, not all of them;
    # 1,600-2,400 rows in the last span in eight tries)
    assert max(span.rows for span in by_entities) >= 1_200
    side = engine.plan_spans(detection, target, chunk_size=10, max_chunks=8, side_by_side=True)
    assert 4 <= len(side) <= 8
    assert sum(span.rows for span in side) == 3_000
    work = len(detection.entities) * engine.ENTITY_ROWS + 3_000
    for span in side[:-1]:  # each an equal share, to the next 100-row mark
        weight = len(span.entities) * engine.ENTITY_ROWS + span.rows
        assert work / 8 <= weight <= work / 8 + 100 * (1 + engine.ENTITY_ROWS)
    assert max(span.rows for span in side) <= 1_200 < max(span.rows for span in by_entities)
    owned = [request.key.id for span in side for request in span.entities]
    assert len(owned) == len(set(owned)) == len(detection.entities)
    seen = [
        row.id
        for span in side
        for page in store.iter_row_pages(table.id, after=span.after, upto=span.upto)
        for row in page
    ]
    assert sorted(seen) == sorted(row.id for row in store.rows_in_order(table.id))


def test_an_explicit_selection_is_cut_by_position(store: Store) -> None:
    table = seed_generated(store, rows=300, unique_companies=30)
    rows = store.rows_in_order(table.id)
    chosen = [row.id for row in rows[::3]]  # 100 rows, not contiguous in id order
    column = table.column_by_key("industry").id
    settings = JobSettings(page_size=20, chunk_size=5, max_chunks=4)
    selection = Selection(column_ids=[column], row_ids=chosen)
    target, request_id, _, spans = plan(store, table.id, settings, selection)
    assert len(spans) >= 2  # cut where each span owns its share of the 30 companies
    assert [row_id for span in spans for row_id in span.row_ids(target) or []] == chosen
    summaries = [
        engine.enrich_span(
            store, request_id, target, span, providers(), settings, cache=SqlAnswerCache(store)
        ).summary
        for span in spans
    ]
    assert sum(s.rows_written for s in summaries if s) == 100
    untouched = [row for row in store.rows_in_order(table.id) if row.id not in set(chosen)]
    assert all("industry" not in row.meta for row in untouched)


def run_spans(
    store: Store, table_id: str, settings: JobSettings, provider_list: list[FakeProvider]
) -> tuple[str, engine.ApplySummary, list[engine.ChunkResult]]:
    target, request_id, detection, spans = plan(store, table_id, settings)
    cache = SqlAnswerCache(store)
    results = [
        engine.enrich_span(store, request_id, target, span, provider_list, settings, cache=cache)
        for span in spans
    ]
    summary = engine.ApplySummary()
    stats = engine.WaterfallStats()
    for result in results:
        assert result.summary is not None
        summary.merge(result.summary)
        stats.merge(result.stats)
    engine.finish_job(
        store, request_id, entities=len(detection.entities), stats=stats, summary=summary
    )
    return request_id, summary, results


def test_each_entity_is_bought_once_across_spans_and_every_cell_is_written(store: Store) -> None:
    table = seed_generated(store, rows=1_200, unique_companies=40)
    fakes = providers()
    settings = JobSettings(page_size=200, write_page_size=100, chunk_size=100, max_chunks=6)
    request_id, summary, results = run_spans(store, table.id, settings, fakes)
    assert len(results) > 1
    # 40 companies shared by every span, 1,200 people: each asked exactly once.
    assert set(fakes[0].calls.values()) == {1} and len(fakes[0].calls) == 40
    assert set(fakes[1].calls.values()) == {1} and len(fakes[1].calls) == 1_200
    assert sum(r.stats.cache_hits for r in results[1:]) > 0  # later spans read earlier buys
    assert summary.rows_written == 1_200
    assert summary.cells[CellStatus.DONE] == 3_600
    for row in store.rows_in_order(table.id):
        assert row.status == RowStatus.DONE.value
        for key in COLUMNS:
            assert row.meta[key]["status"] == "done" and row.meta[key]["request_id"] == request_id
    request = RequestRepository(store).get(request_id)
    assert (request.status, request.rows_written, request.cells_done) == ("succeeded", 1200, 3600)
    # The writes: two statements a page (the rows are read and written, nothing else).
    pages = 1_200 // 100
    assert summary.statements <= 2 * pages + 4 * len(results)


def test_rows_are_written_while_lookups_go_on(store: Store) -> None:
    table = seed_generated(store, rows=600, unique_companies=600)
    fakes = providers(latency_s=0.02)
    settings = JobSettings(write_page_size=50, concurrency=20, max_chunks=1)
    target, request_id, _, spans = plan(store, table.id, settings)
    calls_at_first_write: list[int] = []

    def written(_patches: Any) -> None:
        if not calls_at_first_write:
            calls_at_first_write.append(fakes[0].total_calls + fakes[1].total_calls)

    result = engine.enrich_span(
        store,
        request_id,
        target,
        spans[0],
        fakes,
        settings,
        cache=None,
        on_written=written,
    )
    total = fakes[0].total_calls + fakes[1].total_calls
    assert total == 1_200
    # The first page (50 rows: 100 entities) needs ~8 % of the lookups; with 20 in flight it is
    # written well before a fifth of them are done.
    assert calls_at_first_write and calls_at_first_write[0] < total // 5
    assert result.first_write_s is not None and result.first_write_s < result.seconds / 2


def test_a_long_span_writes_in_pages_that_grow_to_the_detection_page(store: Store) -> None:
    """The first page is small (the first rows land early); each next one twice the last up
    to `page_size`, so a long span costs a read and a write per `page_size` rows."""
    table = seed_generated(store, rows=700, unique_companies=70)
    settings = JobSettings(page_size=200, write_page_size=50, max_chunks=1)
    target, request_id, _, spans = plan(store, table.id, settings)
    pages: list[int] = []
    result = engine.enrich_span(
        store,
        request_id,
        target,
        spans[0],
        providers(),
        settings,
        cache=None,
        on_written=lambda patches: pages.append(len(patches)),
    )
    assert pages == [50, 100, 200, 200, 150]
    assert result.summary is not None and result.summary.rows_written == 700
    assert result.summary.statements == 2 * len(pages)  # a read and a write each


def test_a_later_span_writes_full_pages_from_the_start(store: Store) -> None:
    """Only the job's first span starts small (its first rows are the job's first); a later
    one reads and writes `page_size` rows a statement from its first page."""
    table = seed_generated(store, rows=700, unique_companies=70)
    settings = JobSettings(page_size=200, write_page_size=50, chunk_size=35, max_chunks=2)
    target, request_id, _, spans = plan(store, table.id, settings)
    assert len(spans) == 2 and spans[1].index == 1
    pages: list[int] = []
    for span in spans:
        pages.append(-1)  # where a span begins
        engine.enrich_span(
            store,
            request_id,
            target,
            span,
            providers(),
            settings,
            cache=None,
            on_written=lambda patches: pages.append(len(patches)),
        )
    first, later = pages[1 : pages.index(-1, 1)], pages[pages.index(-1, 1) + 1 :]
    assert first[0] == 50 and later and set(later[:-1]) <= {200} and sum(first + later) == 700


def test_a_cancel_mid_span_writes_what_was_bought_and_leaves_the_rest(store: Store) -> None:
    table = seed_generated(store, rows=400, unique_companies=400)
    fakes = providers(latency_s=0.02)
    settings = JobSettings(write_page_size=50, concurrency=10, max_chunks=1)
    target, request_id, _, spans = plan(store, table.id, settings)
    requests = RequestRepository(store)

    def written(_patches: Any) -> None:
        requests.request_cancel(request_id)

    with engine.RequestWatch(requests, request_id) as watch:
        result = engine.enrich_span(
            store,
            request_id,
            target,
            spans[0],
            fakes,
            settings,
            cache=None,
            watch=watch,
            on_written=written,
        )
    assert result.stopped == "cancelled by the user"
    summary = result.summary
    assert summary is not None and 50 <= summary.rows_written < 400
    assert summary.rows_read == 400  # every page read, so every cell is counted
    assert summary.cells_total == 1_200
    bought = fakes[0].total_calls + fakes[1].total_calls
    assert bought < 800
    rows = store.rows_in_order(table.id)
    written_rows = [row for row in rows if "industry" in row.meta]
    assert len(written_rows) == summary.rows_written
    for row in written_rows:  # a written row is whole: each of its cells answered
        assert {row.meta[key]["status"] for key in COLUMNS} == {"done"}
    for row in rows:
        if "industry" not in row.meta:  # not reached: left as it was, for a later job
            assert all(row.data.get(key) in (None, "") for key in COLUMNS)
    assert summary.cells[CellStatus.SKIPPED] == 1_200 - 3 * summary.rows_written
