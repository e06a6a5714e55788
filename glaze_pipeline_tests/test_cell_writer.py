"""The write path shares what rows about one entity write, yet each row gets exactly its own
patch: its kept cells, its earlier meta, its compare-and-set (both databases)."""

from datetime import UTC, datetime, timedelta, timezone

from glaze_pipeline.core import engine
from glaze_pipeline.core.models import CellStatus, FieldOutcome, FieldValue, Selection
from glaze_pipeline.core.store import ColumnDef, RowPatch, Store, _documents_payload

KEYS = ("industry", "employee_count", "revenue")
FETCHED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_rows_of_one_company_share_the_answer_but_keep_their_own_cells(store: Store) -> None:
    table = store.create_table(
        "T", [ColumnDef("website"), *(ColumnDef(key) for key in KEYS), ColumnDef("title")]
    )
    plain, typed, earlier, unknown = store.insert_rows(
        table.id,
        [
            {"website": "acme.com"},
            {"website": "https://acme.com/", "industry": "Typed by a user"},
            {"website": "www.acme.com"},
            {"website": ""},  # no identifier
        ],
    )
    # An earlier job's failed cell in another column: the row's status must still count it.
    failed = {"title": {"status": "failed", "error": "boom"}}
    store.apply_patches([RowPatch(earlier, {}, failed, "failed", None, "boom")])
    selection = Selection(column_ids=[table.column_by_key(key).id for key in KEYS])
    target = engine.resolve_target(store, table.id, selection)
    request_id = engine.start_job(store, target, selection, engine.JobSettings())
    detection = engine.detect_entities(store, target, request_id=request_id)
    [acme] = detection.entities
    # Two fields fetched at the same instant written in two offsets: not the same meta text.
    paris = FETCHED.astimezone(timezone(timedelta(hours=1)))
    outcomes = {
        acme.key.id: {
            "industry": FieldOutcome(CellStatus.DONE, FieldValue("Software", 0.9, "fake", FETCHED)),
            "employee_count": FieldOutcome(CellStatus.DONE, FieldValue(120, 0.9, "fake", paris)),
            "revenue": FieldOutcome(CellStatus.NOT_FOUND, error="no revenue"),
        }
    }

    summary = engine.apply_results(store, request_id, target, outcomes, read=detection.read)

    written = {"industry": "Software", "employee_count": 120}
    assert {k: store.get_row(plain).data.get(k) for k in KEYS} == {**written, "revenue": None}
    assert store.get_row(typed).data["industry"] == "Typed by a user"
    assert store.get_row(typed).data["employee_count"] == 120
    assert set(store.get_row(typed).meta) == {"employee_count", "revenue"}
    meta = store.get_row(plain).meta
    assert meta["industry"]["fetched_at"] == FETCHED.isoformat()
    assert meta["employee_count"]["fetched_at"] == paris.isoformat()
    # (SQLite's merge drops JSON nulls: compare what is set.)
    assert {k: v for k, v in meta["revenue"].items() if v is not None} == {
        "status": "not_found",
        "error": "no revenue",
        "request_id": request_id,
    }
    assert store.get_row(earlier).meta["title"] == failed["title"]
    statuses = {row: store.get_row(row).status for row in (plain, typed, earlier, unknown)}
    assert statuses == {
        plain: "ambiguous",
        typed: "ambiguous",
        earlier: "ambiguous",
        unknown: "failed",
    }
    assert store.get_row(earlier).error == "boom"  # the row's first error, in its order
    assert store.get_row(plain).error == "no revenue"
    assert store.get_row(unknown).meta["industry"]["error"] == "no identifier"
    assert summary.cells == {"done": 5, "not_found": 3, "failed": 3, "skipped": 1}
    assert (summary.kept, summary.rows_written) == (1, 4)
    assert store.held_rows(request_id) == 0


def test_each_distinct_object_travels_once_in_a_postgres_page() -> None:
    shared = {"industry": {"status": "done"}}
    alike = {"industry": {"status": "done"}}  # equal, built apart
    entries = [
        (f"row_{i}", {"industry": f"v{i % 2}"}, meta, "done", 0.9, None, 1, {"industry": None})
        for i, meta in enumerate([shared, shared, alike, {"industry": {"status": "failed"}}])
    ]
    payload = _documents_payload(entries)
    assert payload["docs"].count('"status":"done"') == 1
    assert payload["docs"].count('"status":"failed"') == 1
    assert payload["docs"].count('"industry":"v0"') == 1  # two rows, equal values: once
