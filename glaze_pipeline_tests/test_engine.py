"""The job's stages on both databases: dedupe, batching, cache, edits kept, bad input."""

from typing import Any

import pytest
from sqlalchemy import func, select

from glaze_pipeline.core import engine
from glaze_pipeline.core.cache_sql import SqlAnswerCache
from glaze_pipeline.core.engine import JobSettings
from glaze_pipeline.core.errors import (
    InvalidSelectionError,
    UnknownColumnError,
    UnknownRowError,
    UnknownTableError,
)
from glaze_pipeline.core.models import CellRef, EntityType, Selection
from glaze_pipeline.core.providers.fake import FakeProvider, fake_value
from glaze_pipeline.core.schema import EnrichmentRequest
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.store import ColumnDef, Store

COMPANY_COLUMNS = ("industry", "employee_count", "revenue")


def run(
    store: Store,
    table_id: str,
    selection: Selection,
    providers: list[Any],
    settings: JobSettings | None = None,
    *,
    between_enrich_and_apply: Any = None,
) -> tuple[str, engine.ApplySummary, int]:
    """The job's stages in order, as the Dagster ops call them; returns apply statements too."""
    settings = settings or JobSettings()
    target = engine.resolve_target(store, table_id, selection)
    request_id = engine.start_job(store, target, selection, settings)
    detection = engine.detect_entities(store, target, page_size=settings.page_size)
    chunks = engine.plan_chunks(
        detection.entities,
        chunk_size=settings.chunk_size,
        max_chunks=settings.fan_out("in_process"),
    )
    results = [
        engine.enrich_chunk(store, request_id, c, providers, settings, cache=SqlAnswerCache(store))
        for c in chunks
    ]
    if between_enrich_and_apply is not None:
        between_enrich_and_apply()
    outcomes, stats = engine.merge_chunks(results)
    before = store.statements
    summary = engine.apply_results(
        store, request_id, target, outcomes, page_size=settings.page_size, read=detection.read
    )
    apply_statements = store.statements - before
    engine.finish_job(
        store, request_id, entities=len(detection.entities), stats=stats, summary=summary
    )
    return request_id, summary, apply_statements


def grid(table: Any, *keys: str, overwrite: bool = False) -> Selection:
    return Selection(column_ids=[table.column_by_key(k).id for k in keys], overwrite=overwrite)


def test_thousand_rows_hundred_companies_one_call_each_and_few_statements(store: Store) -> None:
    table = seed_generated(store, rows=1000, unique_companies=100)
    provider = FakeProvider(EntityType.COMPANY)
    request_id, summary, apply_statements = run(
        store, table.id, grid(table, *COMPANY_COLUMNS), [provider]
    )
    assert provider.total_calls == 100
    assert max(provider.calls.values()) == 1  # each company exactly once
    assert summary.cells == {"done": 3000}
    assert summary.rows_written == 1000
    assert apply_statements <= 5
    request = store.get_request(request_id)
    assert (request.status, request.entities, request.cells_done) == ("succeeded", 100, 3000)
    assert request.provider_calls == {"fake_company": 100}

    second = FakeProvider(EntityType.COMPANY)  # a refresh: the cells hold the first answers
    second_id, _, _ = run(store, table.id, grid(table, *COMPANY_COLUMNS, overwrite=True), [second])
    assert second.total_calls == 0
    assert store.get_request(second_id).cache_hits == 100


def test_values_provenance_and_row_status(store: Store) -> None:
    table = seed_generated(store, rows=4, unique_companies=2)
    run(
        store,
        table.id,
        grid(table, "industry", "title"),
        [FakeProvider(EntityType.COMPANY), FakeProvider(EntityType.PERSON, confidence=0.7)],
    )
    row = next(r for p in store.iter_row_pages(table.id) for r in p)
    assert row.status == "done"
    domain = row.data["website"].split("www.")[1].rstrip("/")
    from glaze_pipeline.core.models import EntityKey

    assert row.data["industry"] == fake_value(
        EntityKey(EntityType.COMPANY, "domain", domain), "industry"
    )
    assert row.meta["industry"]["source"] == "fake_company"
    assert row.meta["industry"]["confidence"] == 0.9
    assert row.meta["title"]["confidence"] == 0.7
    assert row.meta["title"]["fetched_at"]
    stored = store.get_row(row.id)
    assert stored.confidence == pytest.approx(0.8)


def test_user_edit_made_during_the_run_survives(store: Store) -> None:
    table = store.create_table(
        "T", [ColumnDef("website"), ColumnDef("industry"), ColumnDef("notes")]
    )
    [row_id] = store.insert_rows(table.id, [{"website": "acme.com", "notes": "old"}])

    class EditingProvider(FakeProvider):
        async def lookup(self, key, fields):  # type: ignore[no-untyped-def]
            store.edit_cell(row_id, "notes", "typed during enrichment")
            return await super().lookup(key, fields)

    def second_edit() -> None:
        store.edit_cell(row_id, "phone_note", "added after enrichment, before apply")

    run(
        store,
        table.id,
        grid(table, "industry"),
        [EditingProvider(EntityType.COMPANY)],
        between_enrich_and_apply=second_edit,
    )
    data = store.get_row(row_id).data
    assert data["notes"] == "typed during enrichment"
    assert data["phone_note"] == "added after enrichment, before apply"
    assert data["industry"]


def test_cells_without_identifier_fail_with_the_reason(store: Store) -> None:
    table = store.create_table(
        "T", [ColumnDef("name"), ColumnDef("website"), ColumnDef("industry")]
    )
    ids = store.insert_rows(table.id, [{"name": "Nobody", "website": ""}, {"website": "acme.com"}])
    request_id, summary, _ = run(
        store, table.id, grid(table, "industry"), [FakeProvider(EntityType.COMPANY)]
    )
    nobody = store.get_row(ids[0])
    assert nobody.meta["industry"]["status"] == "failed"
    assert nobody.meta["industry"]["error"] == "no identifier"
    assert (nobody.status, nobody.error) == ("failed", "no identifier")
    assert store.get_row(ids[1]).status == "done"
    assert summary.cells == {"done": 1, "failed": 1}
    assert store.get_request(request_id).status == "partial"


def test_explicit_cells_and_row_subset(store: Store) -> None:
    table = seed_generated(store, rows=6, unique_companies=3)
    rows = [r.id for r in store.rows_in_order(table.id)]
    industry, title = table.column_by_key("industry").id, table.column_by_key("title").id
    cells = Selection(
        cells=[
            CellRef(row_id=rows[0], column_id=industry),
            CellRef(row_id=rows[1], column_id=title),
        ]
    )
    _, summary, _ = run(
        store, table.id, cells, [FakeProvider(EntityType.COMPANY), FakeProvider(EntityType.PERSON)]
    )
    assert summary.cells == {"done": 2}
    assert summary.rows_written == 2
    assert set(store.get_row(rows[0]).meta) == {"industry"}
    assert set(store.get_row(rows[1]).meta) == {"title"}
    assert store.get_row(rows[2]).meta == {}


def test_whole_table_fills_empty_cells_only(store: Store) -> None:
    table = store.create_table(
        "T", [ColumnDef("website"), ColumnDef("industry"), ColumnDef("notes")]
    )
    ids = store.insert_rows(
        table.id, [{"website": "acme.com", "industry": "kept"}, {"website": "b.io"}]
    )
    _, summary, _ = run(
        store, table.id, Selection(whole_table=True), [FakeProvider(EntityType.COMPANY)]
    )
    assert store.get_row(ids[0]).data == {"website": "acme.com", "industry": "kept"}
    assert store.get_row(ids[1]).data["industry"]
    assert store.get_row(ids[1]).data["website"] == "b.io"  # input never overwritten
    assert summary.cells == {"done": 1}


def test_budget_skips_the_rest_and_says_why(store: Store) -> None:
    table = seed_generated(store, rows=100, unique_companies=100)
    provider = FakeProvider(EntityType.COMPANY, cost_per_call=1.0)
    request_id, summary, _ = run(
        store, table.id, grid(table, "industry"), [provider], JobSettings(budget=40, chunk_size=30)
    )
    assert provider.total_calls == 40
    assert summary.cells == {"done": 40, "skipped": 60}
    request = store.get_request(request_id)
    assert (request.cost, request.status) == (40.0, "partial")
    assert request.budget_reserved == pytest.approx(40.0)


@pytest.mark.parametrize(
    ("selection", "error", "match"),
    [
        ({"column_ids": ["col_nope"]}, UnknownColumnError, "col_nope"),
        ({"column_ids": ["@notes"]}, InvalidSelectionError, "map to no enrichment field"),
        ({"column_ids": ["@industry"], "row_ids": ["row_nope"]}, UnknownRowError, "row_nope"),
    ],
)
def test_bad_selection_is_named_and_writes_nothing(
    store: Store, selection: dict[str, Any], error: type[Exception], match: str
) -> None:
    table = store.create_table(
        "T", [ColumnDef("website"), ColumnDef("industry"), ColumnDef("notes")]
    )
    store.insert_rows(table.id, [{"website": "acme.com"}])
    resolved = {
        key: [table.column_by_key(v[1:]).id if v.startswith("@") else v for v in values]
        for key, values in selection.items()
    }
    with pytest.raises(error, match=match):
        target = engine.resolve_target(store, table.id, Selection(**resolved))
        engine.detect_entities(store, target)
    row = next(r for p in store.iter_row_pages(table.id) for r in p)
    assert (row.meta, row.status) == ({}, "idle")


def test_unknown_table_and_empty_selection(store: Store) -> None:
    with pytest.raises(UnknownTableError, match="tbl_nope"):
        engine.resolve_target(store, "tbl_nope", Selection(whole_table=True))
    with pytest.raises(ValueError, match="exactly one of"):
        Selection()
    with pytest.raises(InvalidSelectionError, match="budget"):
        JobSettings(budget=-1)
    with store.engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(EnrichmentRequest)) == 0


def test_rerun_after_filling_an_identifier_column_buys_nothing(store: Store) -> None:
    """The first run fills `linkedin`, which then identifies the people on the second run:
    the answers were cached under the LinkedIn slug too, so nothing is bought again."""
    table = seed_generated(store, rows=20, unique_companies=2)
    selection = grid(table, "title", "linkedin")
    first = FakeProvider(EntityType.PERSON)
    run(store, table.id, selection, [first])
    assert first.total_calls == 20
    assert all(r.data["linkedin"] for r in store.rows_in_order(table.id))
    second = FakeProvider(EntityType.PERSON)
    refresh = grid(table, "title", "linkedin", overwrite=True)
    request_id, summary, _ = run(store, table.id, refresh, [second])
    assert second.total_calls == 0
    assert store.get_request(request_id).cache_hits == 20
    assert summary.cells == {"done": 40}
