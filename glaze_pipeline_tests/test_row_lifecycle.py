"""Seed 001's row lifecycle on both databases: idle -> queued -> running -> done/failed/ambiguous.

A job holds the rows it will fill (`queued` once its request is queued or claimed, `running`
from detection) and lets go of them when it writes them or ends, however it ends: a cancel, a
failure, a killed worker found by the reconciler. One statement per page, never per row.
"""

from datetime import timedelta
from typing import Any

import pytest
from dagster import DagsterInstance
from sqlalchemy import select, text

from glaze_pipeline.core import engine, queue
from glaze_pipeline.core.cache_sql import SqlAnswerCache
from glaze_pipeline.core.engine import JobSettings, JobTarget
from glaze_pipeline.core.models import CellRef, EntityType, RequestStatus, RowStatus, Selection
from glaze_pipeline.core.providers.fake import FakeProvider
from glaze_pipeline.core.requests import Adoption, RequestRepository
from glaze_pipeline.core.schema import GlazeRow
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.store import ColumnDef, Store, TableInfo, utcnow
from glaze_pipeline.definitions import build_definitions

BUSY = ("queued", "running")


def rows(store: Store, table_id: str) -> dict[str, tuple[str, str | None]]:
    """Row id -> (status, holding request), straight from the table."""
    with store.engine.connect() as connection:
        found = connection.execute(
            select(GlazeRow.id, GlazeRow.status, GlazeRow.pending_request_id)
            .where(GlazeRow.table_id == table_id)
            .order_by(GlazeRow.position)
        ).all()
    return {row.id: (row.status, row.pending_request_id) for row in found}


def statuses(store: Store, table_id: str) -> list[str]:
    return [status for status, _ in rows(store, table_id).values()]


def assert_nothing_held(store: Store, table_id: str) -> None:
    state = rows(store, table_id)
    assert [r for r, (status, held) in state.items() if status in BUSY or held] == []


def row_ids(store: Store, table_id: str) -> list[str]:
    return list(rows(store, table_id))


def grid(table: TableInfo, *keys: str, row_ids: list[str] | None = None) -> dict[str, Any]:
    return {
        "column_ids": [table.column_by_key(k).id for k in keys],
        **({"row_ids": row_ids} if row_ids else {}),
    }


def app_inserts(store: Store, table_id: str, selection: str) -> None:
    """The app's plain SQL INSERT (no Python, no hold at insert time)."""
    with store.engine.begin() as connection:
        connection.execute(
            text("INSERT INTO enrichment_requests (table_id, selection) VALUES (:t, :s)"),
            {"t": table_id, "s": selection},
        )


def claim_one(store: Store) -> tuple[str, JobTarget]:
    [launchable], rejected = queue.claim_launchable(store, limit=10)
    assert rejected == []
    request = launchable.request
    selection = Selection.model_validate(request.selection)
    return request.id, engine.resolve_target(store, request.table_id, selection)


class Stages:
    """The job's stages as the ops call them, for one claimed request, one at a time."""

    def __init__(self, store: Store, request_id: str, target: JobTarget, page_size: int = 5000):
        self.store, self.request_id, self.target = store, request_id, target
        self.page_size = page_size
        assert RequestRepository(store).adopt(request_id, f"run-{request_id}") is Adoption.ADOPTED

    def detect(self) -> engine.Detection:
        self.detection = engine.detect_entities(
            self.store, self.target, page_size=self.page_size, request_id=self.request_id
        )
        return self.detection

    def enrich_apply_finish(self, *, cancelled: str | None = None) -> RequestStatus | None:
        providers = [FakeProvider(EntityType.COMPANY), FakeProvider(EntityType.PERSON)]
        result = engine.enrich_chunk(
            self.store,
            self.request_id,
            self.detection.entities,
            providers,
            JobSettings(),
            cache=SqlAnswerCache(self.store),
        )
        outcomes, stats = engine.merge_chunks([result])
        summary = engine.apply_results(
            self.store,
            self.request_id,
            self.target,
            outcomes,
            page_size=self.page_size,
            cancelled=cancelled is not None,
        )
        return engine.finish_job(
            self.store,
            self.request_id,
            entities=len(self.detection.entities),
            stats=stats,
            summary=summary,
            cancelled=cancelled,
        )


# -- each stage shows in the rows ---------------------------------------------------------------


def test_a_grid_request_shows_queued_then_running_then_its_outcome(store: Store) -> None:
    table = seed_generated(store, rows=6, unique_companies=3)
    ids = row_ids(store, table.id)
    selected, others = ids[:4], ids[4:]
    request_id = queue.enqueue(store, table.id, grid(table, "industry", row_ids=selected))
    assert rows(store, table.id) == {
        **dict.fromkeys(selected, ("queued", request_id)),
        **dict.fromkeys(others, ("idle", None)),
    }

    claimed, target = claim_one(store)
    assert claimed == request_id
    assert statuses(store, table.id) == ["queued"] * 4 + ["idle"] * 2

    stages = Stages(store, request_id, target)
    stages.detect()
    assert rows(store, table.id) == {
        **dict.fromkeys(selected, ("running", request_id)),
        **dict.fromkeys(others, ("idle", None)),
    }

    assert stages.enrich_apply_finish() is RequestStatus.SUCCEEDED
    assert statuses(store, table.id) == ["done"] * 4 + ["idle"] * 2
    assert_nothing_held(store, table.id)


def test_explicit_cells_hold_only_their_rows(store: Store) -> None:
    table = seed_generated(store, rows=5, unique_companies=5)
    ids = row_ids(store, table.id)
    industry = table.column_by_key("industry").id
    cells = [CellRef(row_id=ids[1], column_id=industry), CellRef(row_id=ids[3], column_id=industry)]
    request_id = queue.enqueue(store, table.id, Selection(cells=cells))
    assert statuses(store, table.id) == ["idle", "queued", "idle", "queued", "idle"]
    _, target = claim_one(store)
    stages = Stages(store, request_id, target)
    stages.detect()
    assert statuses(store, table.id) == ["idle", "running", "idle", "running", "idle"]
    stages.enrich_apply_finish()
    assert statuses(store, table.id) == ["idle", "done", "idle", "done", "idle"]
    assert_nothing_held(store, table.id)


def test_a_whole_table_request_holds_only_rows_with_a_cell_to_fill(store: Store) -> None:
    """The app's INSERT holds nothing; the claim holds, in one statement, the rows with an empty
    cell to fill: a row whose cells are all filled is never held."""
    table = store.create_table(
        "T",
        [
            ColumnDef("website"),
            ColumnDef("industry"),
            # A key that is not a plain JSON path: read as one key on both databases.
            ColumnDef("size.band", field="company.employee_count"),
        ],
    )
    ids = store.insert_rows(
        table.id,
        [
            {"website": "a.com", "industry": "", "size.band": "10-50"},  # one empty cell
            {"website": "b.com", "industry": "Retail", "size.band": "10-50"},  # all filled
            {"website": "c.com", "industry": None},  # JSON null and a missing key
            {"website": "d.com", "industry": "Retail", "size.band": ""},
        ],
    )
    app_inserts(store, table.id, '{"whole_table": true}')
    assert statuses(store, table.id) == ["idle"] * 4
    before = store.statements
    request_id, target = claim_one(store)
    claim_statements = store.statements - before
    state = rows(store, table.id)
    assert [state[i] for i in ids] == [
        ("queued", request_id),
        ("idle", None),
        ("queued", request_id),
        ("queued", request_id),
    ]
    stages = Stages(store, request_id, target)
    stages.detect()
    assert statuses(store, table.id) == ["running", "idle", "running", "running"]
    stages.enrich_apply_finish()
    assert statuses(store, table.id) == ["done", "idle", "done", "done"]
    assert_nothing_held(store, table.id)
    # The same claim for an `estimate` costs a statement less (it holds nothing), two where an
    # enrich counts its held rows to choose its executor (queue.executor_for: where processes
    # of their own would share their purchases).
    counted = 1 if queue.shares_purchases(store) else 0
    app_inserts(store, table.id, '{"whole_table": true}')
    with store.engine.begin() as connection:
        connection.execute(
            text("UPDATE enrichment_requests SET kind = 'estimate' WHERE status = 'queued'")
        )
    before = store.statements
    claim_one(store)
    assert claim_statements - (store.statements - before) == 1 + counted


def test_estimates_and_pre_enrichment_hold_no_row(store: Store) -> None:
    table = seed_generated(store, rows=4, unique_companies=2)
    ids = row_ids(store, table.id)
    queue.enqueue(store, table.id, grid(table, "industry", row_ids=ids), kind="estimate")
    queue.enqueue(store, table.id, {"whole_table": True}, kind="pre_enrich")
    queue.claim_launchable(store, limit=10)
    assert statuses(store, table.id) == ["idle"] * 4
    with DagsterInstance.ephemeral() as instance:
        result = (
            build_definitions(store.url)
            .get_job_def("enrich_table")
            .execute_in_process(
                run_config={
                    "ops": {
                        "detect_entities": {
                            "config": {
                                "table_id": table.id,
                                "whole_table": True,
                                "kind": "estimate",
                            }
                        }
                    }
                },
                instance=instance,
            )
        )
    assert result.success
    assert statuses(store, table.id) == ["idle"] * 4
    assert_nothing_held(store, table.id)


# -- statements: one per page, never one per row ------------------------------------------------


def test_holding_and_letting_go_cost_one_statement_per_page(store: Store) -> None:
    table = seed_generated(store, rows=25, unique_companies=5)
    target = engine.resolve_target(store, table.id, Selection(**grid(table, "industry")))
    request_id = engine.start_job(
        store, target, Selection(**grid(table, "industry")), JobSettings()
    )

    before = store.statements
    engine.detect_entities(store, target, page_size=10)
    reading = store.statements - before
    before = store.statements
    engine.detect_entities(store, target, page_size=10, request_id=request_id)
    assert store.statements - before == reading + 3  # 3 pages: one hold each
    assert statuses(store, table.id) == ["running"] * 25

    before = store.statements
    assert store.release_rows(request_id, page_size=10) == 25
    assert store.statements - before == 6  # 3 pages: one read and one write each
    assert statuses(store, table.id) == ["idle"] * 25
    before = store.statements
    assert store.release_rows(request_id, page_size=10) == 0
    assert store.statements - before == 1  # nothing held: one read (the partial index)


def test_enqueue_holds_any_number_of_rows_in_one_statement(store: Store) -> None:
    table = seed_generated(store, rows=6000, unique_companies=10)  # more ids than one page
    ids = row_ids(store, table.id)
    selection = grid(table, "industry", row_ids=ids)
    before = store.statements
    queue.enqueue(store, table.id, selection, kind="estimate")  # holds nothing
    estimate = store.statements - before
    before = store.statements
    request_id = queue.enqueue(store, table.id, selection)
    assert store.statements - before == estimate + 1
    assert store.held_rows(request_id) == 6000


def test_the_apply_write_lets_go_of_its_rows_in_the_same_statement(store: Store) -> None:
    table = seed_generated(store, rows=30, unique_companies=3)
    request_id = queue.enqueue(store, table.id, grid(table, "industry"))
    _, target = claim_one(store)
    assert statuses(store, table.id) == ["queued"] * 30  # every row: one set-based statement
    stages = Stages(store, request_id, target, page_size=10)
    stages.detect()
    outcomes, _ = engine.merge_chunks(
        [
            engine.enrich_chunk(
                store,
                request_id,
                stages.detection.entities,
                [FakeProvider(EntityType.COMPANY)],
                JobSettings(),
                cache=None,
            )
        ]
    )
    summary = engine.apply_results(store, request_id, target, outcomes, page_size=10)
    assert summary.statements == 3 * 2 + 1  # a read and a write per page, a last empty read
    assert store.held_rows(request_id) == 0  # nothing left for the release to do
    assert statuses(store, table.id) == ["done"] * 30


# -- every ending lets go -----------------------------------------------------------------------


def enrich_and_run(store: Store, table: TableInfo) -> None:
    """A first job, so the rows have a status of their own to go back to."""
    request_id = queue.enqueue(store, table.id, grid(table, "industry"))
    _, target = claim_one(store)
    stages = Stages(store, request_id, target)
    stages.detect()
    stages.enrich_apply_finish()
    assert set(statuses(store, table.id)) == {"done"}


def test_a_request_cancelled_while_queued_puts_its_rows_back(store: Store) -> None:
    table = seed_generated(store, rows=4, unique_companies=2)
    enrich_and_run(store, table)
    request_id = queue.enqueue(
        store, table.id, grid(table, "title", row_ids=row_ids(store, table.id))
    )
    assert statuses(store, table.id) == ["queued"] * 4
    assert queue.request_cancel(store, request_id) is RequestStatus.CANCELLED
    assert statuses(store, table.id) == ["done"] * 4  # what their cells say, not "idle"
    assert_nothing_held(store, table.id)


def test_a_request_refused_at_claim_lets_go_of_what_it_held(store: Store) -> None:
    table = seed_generated(store, rows=3, unique_companies=1)
    ids = row_ids(store, table.id)
    request_id = queue.enqueue(store, table.id, {"column_ids": ["col_nope"], "row_ids": ids})
    assert statuses(store, table.id) == ["queued"] * 3
    launchable, rejected = queue.claim_launchable(store, limit=10)
    assert launchable == [] and [r for r, _ in rejected] == [request_id]
    assert statuses(store, table.id) == ["idle"] * 3
    assert_nothing_held(store, table.id)


def test_a_job_cancelled_mid_enrichment_leaves_no_row_queued_or_running(store: Store) -> None:
    table = seed_generated(store, rows=6, unique_companies=6)
    enrich_and_run(store, table)
    request_id = queue.enqueue(store, table.id, grid(table, "industry", "title"))
    _, target = claim_one(store)
    stages = Stages(store, request_id, target)
    detection = stages.detect()
    assert statuses(store, table.id) == ["running"] * 6
    # The cancel came before any lookup: nothing bought, nothing new to write.
    reason = "cancelled by the user"
    outcomes, stats = engine.merge_chunks([engine.stopped_chunk(detection.entities, reason)])
    summary = engine.apply_results(store, request_id, target, outcomes, cancelled=True)
    status = engine.finish_job(
        store,
        request_id,
        entities=len(detection.entities),
        stats=stats,
        summary=summary,
        cancelled=reason,
    )
    assert status is RequestStatus.CANCELLED
    assert "running" not in statuses(store, table.id)
    assert_nothing_held(store, table.id)


def run_enrich_table(store: Store, config: dict[str, Any], instance: DagsterInstance) -> Any:
    job = build_definitions(store.url).get_job_def("enrich_table")
    return job.execute_in_process(
        run_config={"ops": {"detect_entities": {"config": config}}},
        instance=instance,
        raise_on_error=False,
    )


def test_a_run_whose_request_is_cancelled_lets_go_of_its_rows(store: Store) -> None:
    """The cancel arrives between the claim and the run: the run's first beat stops it."""
    table = seed_generated(store, rows=5, unique_companies=2)
    enrich_and_run(store, table)
    selection = grid(table, "title", row_ids=row_ids(store, table.id))
    request_id = queue.enqueue(store, table.id, selection)
    [launchable], _ = queue.claim_launchable(store, limit=1)
    with store.engine.begin() as connection:  # the app's cancel: a flag
        connection.execute(
            text("UPDATE enrichment_requests SET cancel_requested = true WHERE id = :id"),
            {"id": request_id},
        )
    with DagsterInstance.ephemeral() as instance:
        result = run_enrich_table(store, launchable.config, instance)
    assert not result.success
    assert store.get_request(request_id).status == "cancelled"
    assert statuses(store, table.id) == ["done"] * 5
    assert_nothing_held(store, table.id)


def writes_fail_from(monkeypatch: pytest.MonkeyPatch, first: int, last: int | None) -> None:
    """`Store.apply_patches` raises on its calls `first`..`last` (None: every one after)."""
    original = Store.apply_patches
    calls = [0]

    def failing(self: Store, *args: Any, **kwargs: Any) -> int:
        calls[0] += 1
        if calls[0] >= first and (last is None or calls[0] <= last):
            raise RuntimeError("the database went away")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Store, "apply_patches", failing)


def test_a_write_that_fails_once_is_retried_and_the_job_ends_whole(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk's second page write fails once: Dagster retries the chunk, which rewrites its
    own first page (its cells are the job's, not a user's) and the rest: nothing bought twice,
    nothing counted kept."""
    writes_fail_from(monkeypatch, 2, 2)
    table = seed_generated(store, rows=30, unique_companies=3)
    request_id = queue.enqueue(store, table.id, grid(table, "industry"))
    [launchable], _ = queue.claim_launchable(store, limit=1)
    config = {**launchable.config, "page_size": 10, "write_page_size": 10}
    with DagsterInstance.ephemeral() as instance:
        result = run_enrich_table(store, config, instance)
    assert result.success
    request = store.get_request(request_id)
    assert (request.status, request.cells_done, request.cells_skipped) == ("succeeded", 30, 0)
    assert statuses(store, table.id) == ["done"] * 30
    assert_nothing_held(store, table.id)


def test_a_failed_job_leaves_no_row_queued_or_running(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes_fail_from(monkeypatch, 2, None)  # the first page is written, then never again
    table = seed_generated(store, rows=30, unique_companies=3)
    request_id = queue.enqueue(store, table.id, grid(table, "industry"))
    [launchable], _ = queue.claim_launchable(store, limit=1)
    config = {**launchable.config, "page_size": 10, "write_page_size": 10}
    with DagsterInstance.ephemeral() as instance:
        result = run_enrich_table(store, config, instance)
    assert not result.success
    request = store.get_request(request_id)
    assert request.status == "failed" and "the database went away" in (request.error or "")
    # The first page was written; the rest is back to what its cells say (nothing yet).
    assert sorted(statuses(store, table.id)) == ["done"] * 10 + ["idle"] * 20
    assert_nothing_held(store, table.id)


def test_the_reconciler_fails_a_killed_worker_and_lets_go_of_its_rows(store: Store) -> None:
    table = seed_generated(store, rows=8, unique_companies=2)
    enrich_and_run(store, table)
    request_id = queue.enqueue(store, table.id, grid(table, "title"))
    _, target = claim_one(store)
    Stages(store, request_id, target).detect()  # ...and then the worker is SIGKILLed
    assert statuses(store, table.id) == ["running"] * 8
    actions = queue.reconcile(
        store,
        find_run=lambda r: queue.RunView(f"run-{request_id}", "STARTED"),
        cancel_run=lambda run_id: None,
        report_dead_run=lambda run_id, reason: None,
        now=utcnow() + timedelta(minutes=10),
        stale_after=timedelta(minutes=5),
    )
    assert len(actions) == 1 and "no heartbeat" in actions[0]
    assert store.get_request(request_id).status == "failed"
    assert statuses(store, table.id) == ["done"] * 8
    assert_nothing_held(store, table.id)


def test_the_reconciler_lets_go_of_rows_an_ended_request_still_holds(store: Store) -> None:
    """An ending that died before letting go (or a path that forgot to) is caught up."""
    table = seed_generated(store, rows=3, unique_companies=1)
    request_id = queue.enqueue(
        store, table.id, grid(table, "industry", row_ids=row_ids(store, table.id))
    )
    open_one = queue.enqueue(
        store, table.id, grid(table, "title", row_ids=row_ids(store, table.id)[:1])
    )
    RequestRepository(store).fail(request_id, "ended without letting go")
    assert store.held_by_ended_requests() == [request_id]
    actions = queue.reconcile(
        store,
        find_run=lambda r: None,
        cancel_run=lambda run_id: None,
        report_dead_run=lambda run_id, reason: None,
        now=utcnow(),
        stale_after=timedelta(minutes=5),
    )
    assert actions == [f"{request_id}: let go of 2 rows it held after it ended"]
    # The open request keeps its row (it took it over, being the newer queued hold).
    assert store.held_rows(open_one) == 1 and store.held_by_ended_requests() == []
    assert statuses(store, table.id) == ["queued", "idle", "idle"]


# -- holds are guarded ---------------------------------------------------------------------------


def test_an_ended_request_holds_nothing(store: Store) -> None:
    """A late page of a job closed under it (failed by the reconciler) marks no row running."""
    table = seed_generated(store, rows=3, unique_companies=1)
    target = engine.resolve_target(store, table.id, Selection(**grid(table, "industry")))
    request_id = engine.start_job(
        store, target, Selection(**grid(table, "industry")), JobSettings()
    )
    RequestRepository(store).fail(request_id, "failed under the job")
    ids = row_ids(store, table.id)
    assert store.hold_rows(table.id, request_id, RowStatus.RUNNING, row_ids=ids) == 0
    assert statuses(store, table.id) == ["idle"] * 3


def test_a_queued_hold_never_takes_a_row_another_job_is_running_on(store: Store) -> None:
    table = seed_generated(store, rows=2, unique_companies=1)
    ids = row_ids(store, table.id)
    selection = Selection(**grid(table, "industry"))
    running = engine.start_job(
        store, engine.resolve_target(store, table.id, selection), selection, JobSettings()
    )
    assert store.hold_rows(table.id, running, RowStatus.RUNNING, row_ids=ids[:1]) == 1
    queued = queue.enqueue(store, table.id, grid(table, "title", row_ids=ids))
    assert rows(store, table.id) == {ids[0]: ("running", running), ids[1]: ("queued", queued)}


def test_a_write_by_one_job_keeps_the_hold_of_another_and_its_release_sees_it(
    store: Store,
) -> None:
    table = seed_generated(store, rows=3, unique_companies=1)
    ids = row_ids(store, table.id)
    queued = queue.enqueue(store, table.id, grid(table, "title", row_ids=ids))
    # Another job (launched outside the queue) fills `industry` in the same rows meanwhile.
    selection = Selection(**grid(table, "industry"))
    target = engine.resolve_target(store, table.id, selection)
    other = engine.start_job(store, target, selection, JobSettings())
    detection = engine.detect_entities(store, target)
    result = engine.enrich_chunk(
        store,
        other,
        detection.entities,
        [FakeProvider(EntityType.COMPANY)],
        JobSettings(),
        cache=None,
    )
    engine.apply_results(store, other, target, result.outcomes)
    assert rows(store, table.id) == dict.fromkeys(ids, ("queued", queued))  # still queued
    store.edit_cell(ids[0], "notes", "a user's edit")  # never touches a hold either
    assert rows(store, table.id)[ids[0]] == ("queued", queued)
    assert queue.request_cancel(store, queued) is RequestStatus.CANCELLED
    assert statuses(store, table.id) == ["done"] * 3  # recomputed: the other job's cells
