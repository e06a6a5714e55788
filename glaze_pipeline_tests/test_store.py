"""The store on both SQLite (the embedded default) and Postgres."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from glaze_pipeline.core.errors import GlazeError, UnknownRowError, UnknownTableError
from glaze_pipeline.core.schema import Base
from glaze_pipeline.core.store import ANALYZE_AFTER_ROWS, ColumnDef, RowPatch, Store


def make_table(store: Store, rows: int = 5) -> tuple[str, list[str]]:
    table = store.create_table(
        "T", [ColumnDef("website"), ColumnDef("industry"), ColumnDef("notes")]
    )
    ids = store.insert_rows(
        table.id, ({"website": f"c{i}.com", "notes": f"n{i}"} for i in range(rows))
    )
    return table.id, ids


def test_migrations_match_the_models(store: Store) -> None:
    with store.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": "glaze_alembic_version"}
        )
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_upgrade_is_idempotent(store: Store) -> None:
    store.upgrade()
    store.upgrade()
    assert store.list_tables() == []


def test_unknown_table(store: Store) -> None:
    with pytest.raises(UnknownTableError, match="unknown table 'tbl_nope'"):
        store.get_table("tbl_nope")


def test_duplicate_column_keys_rejected(store: Store) -> None:
    with pytest.raises(GlazeError, match="duplicate column keys"):
        store.create_table("T", [ColumnDef("a"), ColumnDef("a")])


def test_pages_cover_every_row_once(store: Store) -> None:
    table_id, ids = make_table(store, rows=25)
    pages = list(store.iter_row_pages(table_id, page_size=10))
    assert [len(p) for p in pages] == [10, 10, 5]
    assert sorted(r.id for p in pages for r in p) == sorted(ids)


def test_pages_grow_to_the_cap_and_still_cover_every_row_once(store: Store) -> None:
    table_id, ids = make_table(store, rows=60)
    pages = list(store.iter_row_pages(table_id, page_size=4, grow_to=20))
    assert [len(p) for p in pages] == [4, 8, 16, 20, 12]
    assert [r.id for p in pages for r in p] == sorted(ids)
    # The given ids, in their order: the same sizes.
    chosen = ids[::-1][:30]
    pages = list(store.iter_row_pages(table_id, row_ids=chosen, page_size=4, grow_to=20))
    assert [len(p) for p in pages] == [4, 8, 16, 2]
    assert sorted(r.id for p in pages for r in p) == sorted(chosen)
    # A cap below the first page: pages of the first size throughout.
    pages = list(store.iter_row_pages(table_id, page_size=25, grow_to=10))
    assert [len(p) for p in pages] == [25, 25, 10]


def test_pages_of_given_ids_name_unknown_ids(store: Store) -> None:
    table_id, ids = make_table(store)
    assert [r.id for p in store.iter_row_pages(table_id, row_ids=ids[:2]) for r in p] != []
    with pytest.raises(UnknownRowError, match="row_missing"):
        list(store.iter_row_pages(table_id, row_ids=[ids[0], "row_missing"]))


def test_patch_merges_json_and_keeps_other_keys_in_one_statement(store: Store) -> None:
    _table_id, ids = make_table(store, rows=3)
    store.edit_cell(ids[0], "notes", "edited by a user")
    before = store.statements
    written = store.apply_patches(
        [
            RowPatch(i, {"industry": "Tech"}, {"industry": {"status": "done"}}, "done", 0.9, None)
            for i in ids
        ]
    )
    assert written == set(ids)
    assert store.statements - before == 1
    row = store.get_row(ids[0])
    assert row.data == {"website": "c0.com", "notes": "edited by a user", "industry": "Tech"}
    assert row.meta == {"industry": {"status": "done"}}
    assert (row.status, row.confidence) == ("done", 0.9)
    assert row.last_run_at is not None


def test_patch_is_a_compare_and_set_on_the_cells_it_read(store: Store) -> None:
    """A patch writes only where its cells still hold what the job read: an edit made between
    the job's read and its write wins, on both databases, in the same one statement."""
    _table_id, ids = make_table(store, rows=4)
    store.edit_cell(ids[1], "industry", "Typed by a user")  # was empty when the job read it
    store.edit_cell(ids[2], "industry", "Old value")
    store.edit_cell(ids[3], "industry", "")  # "" and missing are both empty
    done = {"industry": {"status": "done"}}

    def patch(row_id: str, expect: object) -> RowPatch:
        return RowPatch(row_id, {"industry": "Tech"}, done, "done", 0.9, None, {"industry": expect})

    written = store.apply_patches(
        [patch(ids[0], None), patch(ids[1], None), patch(ids[2], "Old value"), patch(ids[3], None)]
    )
    assert written == {ids[0], ids[2], ids[3]}
    assert store.get_row(ids[1]).data["industry"] == "Typed by a user"
    assert store.get_row(ids[1]).meta == {}  # no claim of a value it did not write
    assert store.get_row(ids[2]).data["industry"] == "Tech"
    # An expectation of a value that has since changed: not written.
    store.edit_cell(ids[2], "industry", "Edited again")
    assert store.apply_patches([patch(ids[2], "Tech")]) == set()
    assert store.get_row(ids[2]).data["industry"] == "Edited again"
    # Numbers, unicode and objects compare as JSON values; "1" is not 1.
    store.edit_cell(ids[0], "industry", {"n": 1, "s": "Société"})
    assert store.apply_patches([patch(ids[0], {"n": 1, "s": "Société"})]) == {ids[0]}
    store.edit_cell(ids[1], "industry", "Société Générale")
    store.edit_cell(ids[2], "industry", 1)
    assert store.apply_patches(
        [patch(ids[1], "Société Générale"), patch(ids[2], "1"), patch(ids[3], 1.5)]
    ) == {ids[1]}


def test_user_edit_does_not_touch_status(store: Store) -> None:
    _table_id, ids = make_table(store, rows=1)
    store.apply_patches([RowPatch(ids[0], {}, {"x": {"status": "failed"}}, "failed", None, "boom")])
    store.edit_cell(ids[0], "notes", "fixed by hand")
    row = store.get_row(ids[0])
    assert (row.status, row.error, row.data["notes"]) == ("failed", "boom", "fixed by hand")


def test_pages_of_a_span_read_only_its_rows(store: Store) -> None:
    table_id, ids = make_table(store, rows=25)
    ordered = sorted(ids)
    span = list(store.iter_row_pages(table_id, page_size=4, after=ordered[4], upto=ordered[14]))
    assert [r.id for p in span for r in p] == ordered[5:15]
    assert [len(p) for p in span] == [4, 4, 2]
    tail = store.iter_row_pages(table_id, page_size=100, after=ordered[19], with_meta=False)
    assert [r.id for p in tail for r in p] == ordered[20:]
    with pytest.raises(ValueError, match="span"):
        list(store.iter_row_pages(table_id, row_ids=ids[:2], after=ordered[0]))


def test_pages_read_json_back_as_written(store: Store) -> None:
    table_id, ids = make_table(store, rows=2)
    value = {"n": 1.5, "list": [1, "two", None], "text": 'é \u2028 "q"'}
    store.apply_patches(
        [RowPatch(ids[0], {"x": value}, {"x": {"status": "done"}}, "done", 0.5, None)]
    )
    by_id = {r.id: r for p in store.iter_row_pages(table_id) for r in p}
    assert by_id[ids[0]].data["x"] == value and by_id[ids[0]].meta == {"x": {"status": "done"}}
    assert by_id[ids[1]].meta == {}
    [again] = store.rows_by_id([ids[0]])
    assert again.data == by_id[ids[0]].data and again.status == "done"
    [no_meta] = [r for p in store.iter_row_pages(table_id, with_meta=False) for r in p][:1]
    assert no_meta.meta == {}


def test_a_bulk_insert_leaves_postgres_paging_by_index(pg_store: Store) -> None:
    """After a bulk insert the planner knows the new table id, so a keyset page is read in
    index order: before, it guessed a few hundred rows and sorted every row left per page."""
    assert ANALYZE_AFTER_ROWS <= 20_000  # (without the ANALYZE this plan sorts: checked)
    table = pg_store.create_table("T", [ColumnDef("a")])
    pg_store.insert_rows(table.id, ({"a": str(n)} for n in range(20_000)))
    with pg_store.engine.connect() as connection:
        plan = "\n".join(
            connection.exec_driver_sql(
                "EXPLAIN SELECT id, data FROM rows WHERE table_id = %(t)s AND id > ''"
                " ORDER BY id LIMIT 5000",
                {"t": table.id},
            ).scalars()
        )
    assert "Index Scan" in plan and "Sort" not in plan, plan
