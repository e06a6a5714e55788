"""Enrichment never overwrites what a user typed, on both databases.

A cell that holds a value is kept unless the request says `overwrite`; an edit made while a job
runs wins over the job's answer, whenever it lands (before the job reads the row, between the
read and the write, or, for an overwriting job, after detection fingerprinted the cell).
"""

from typing import Any

import pytest

from glaze_pipeline.core import engine
from glaze_pipeline.core.engine import KEPT, JobSettings
from glaze_pipeline.core.models import CellRef, EntityType, Selection
from glaze_pipeline.core.providers.fake import FakeProvider
from glaze_pipeline.core.seed import leads_row_id, seed_generated, seed_leads
from glaze_pipeline.core.store import Store
from glaze_pipeline_tests.test_engine import grid, run


def test_input_columns_are_kept_unless_overwrite_is_asked(store: Store) -> None:
    """The issue's reproduction: `glaze enrich tbl_leads --columns name --columns email`
    replaced `Ada Lovelace` with `Jordan Sample` and her email with a fake one."""
    table = seed_leads(store)
    people = FakeProvider(EntityType.PERSON)
    request_id, summary, _ = run(store, table.id, grid(table, "name", "email"), [people])
    ada = store.get_row(leads_row_id(0))
    assert (ada.data["name"], ada.data["email"]) == ("Ada Lovelace", "ada@analytical.io")
    assert "name" not in ada.meta and "email" not in ada.meta  # no claim on kept cells
    # 10 names + 8 emails hold a value: kept, and nobody is looked up for them. The two empty
    # emails are filled: José (by name + company: one lookup); Katherine has no identifier.
    assert summary.kept == 18
    assert summary.cells == {"skipped": 18, "done": 1, "failed": 1}
    assert people.total_calls == 1
    request = store.get_request(request_id)
    assert request.cells_skipped == 18 and f"18 {KEPT}" in request.error

    # Asked explicitly, the same grid replaces them.
    refresh = grid(table, "name", "email", overwrite=True)
    _, summary, _ = run(store, table.id, refresh, [FakeProvider(EntityType.PERSON)])
    assert summary.kept == 0
    assert store.get_row(leads_row_id(0)).data["name"] != "Ada Lovelace"


def test_an_edit_during_the_run_wins_and_is_counted(store: Store) -> None:
    """A user types into a target cell while the job enriches: the job keeps the edit."""
    table = seed_generated(store, rows=6, unique_companies=3)
    rows = store.rows_in_order(table.id)

    def user_edits() -> None:
        store.edit_cell(rows[0].id, "industry", "Typed while it ran")
        store.edit_cell(rows[1].id, "revenue", "$1")

    _, summary, _ = run(
        store,
        table.id,
        grid(table, "industry", "revenue"),
        [FakeProvider(EntityType.COMPANY)],
        between_enrich_and_apply=user_edits,
    )
    assert store.get_row(rows[0].id).data["industry"] == "Typed while it ran"
    assert store.get_row(rows[1].id).data["revenue"] == "$1"
    assert store.get_row(rows[0].id).data["revenue"] != ""  # its other cell was filled
    assert summary.kept == 2
    assert summary.cells == {"done": 10, "skipped": 2}


def test_an_edit_between_the_read_and_the_write_wins(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compare-and-set inside the write: an edit that lands after the apply stage read the
    page and before its UPDATE is not overwritten; the row is read again and the cell kept."""
    table = seed_generated(store, rows=5, unique_companies=5)
    rows = store.rows_in_order(table.id)
    original = Store.apply_patches
    calls: list[int] = []

    def edit_first(self: Store, patches: Any, **kwargs: Any) -> set[str]:
        if kwargs.get("edits"):  # the user's own write
            return original(self, patches, **kwargs)
        if not calls:
            store.edit_cell(rows[2].id, "industry", "Edited at the last moment")
        calls.append(len(patches))
        return original(self, patches, **kwargs)

    monkeypatch.setattr(Store, "apply_patches", edit_first)
    _, summary, _ = run(
        store, table.id, grid(table, "industry"), [FakeProvider(EntityType.COMPANY)]
    )
    # The page, then the one row that changed, read again: its cell now holds a value, so
    # there is nothing left to write.
    assert calls == [5, 0]
    assert store.get_row(rows[2].id).data["industry"] == "Edited at the last moment"
    assert summary.kept == 1
    assert summary.cells == {"done": 4, "skipped": 1}
    assert summary.rows_written == 4


def test_an_overwriting_job_keeps_a_cell_edited_after_it_read_it(store: Store) -> None:
    """With overwrite, the job replaces the values it read at detection, not an edit made
    since (it remembers an 8-byte fingerprint per cell it read, not the value)."""
    table = seed_generated(store, rows=4, unique_companies=4)
    rows = store.rows_in_order(table.id)
    for row in rows:
        store.edit_cell(row.id, "industry", "Stale")
    cells = [CellRef(row_id=row.id, column_id=table.column_by_key("industry").id) for row in rows]

    def user_edits() -> None:
        store.edit_cell(rows[3].id, "industry", "Fixed by hand")

    _, summary, _ = run(
        store,
        table.id,
        Selection(cells=cells, overwrite=True),
        [FakeProvider(EntityType.COMPANY)],
        between_enrich_and_apply=user_edits,
    )
    values = [store.get_row(row.id).data["industry"] for row in rows]
    assert values[3] == "Fixed by hand"
    assert "Stale" not in values[:3]
    assert summary.kept == 1 and summary.cells == {"done": 3, "skipped": 1}


def test_whole_table_fills_empty_cells_and_reports_none_kept(store: Store) -> None:
    """A whole-table job asked for the empty cells only: it keeps every filled one silently."""
    table = seed_leads(store)
    _, summary, _ = run(
        store,
        table.id,
        Selection(whole_table=True),
        [FakeProvider(EntityType.COMPANY), FakeProvider(EntityType.PERSON)],
        JobSettings(),
    )
    assert summary.kept == 0
    ada = store.get_row(leads_row_id(0))
    assert (ada.data["name"], ada.data["website"]) == (
        "Ada Lovelace",
        "https://www.analytical.io/about",
    )
    assert ada.data["industry"]  # an empty target was filled


def test_overwrite_with_whole_table_is_refused() -> None:
    with pytest.raises(ValueError, match="overwrite needs column_ids or cells"):
        Selection(whole_table=True, overwrite=True)
    assert engine.is_empty("") and engine.is_empty(None) and not engine.is_empty(0)
