"""Asset checks: a real run reports them passing; each fails on data that breaks its rule.

The broken data is written behind the engine's back (plain UPDATEs), as a writer bug would
leave it; the checks read it back on SQLite and Postgres.
"""

import random
from typing import Any

from dagster import DagsterEventType, DagsterInstance
from sqlalchemy import select, update

from glaze_pipeline.core import checks
from glaze_pipeline.core.schema import EnrichmentRequest, GlazeRow
from glaze_pipeline.core.seed import LEADS_ENRICH_KEYS, leads_column_id, seed_generated, seed_leads
from glaze_pipeline.core.store import Store
from glaze_pipeline.definitions import build_definitions
from glaze_pipeline.defs.checks import (
    budget_never_exceeded,
    every_cell_has_provenance,
    no_row_left_in_flight,
)
from glaze_pipeline.defs.resources import GlazeDatabase

CHECKS = {"budget_never_exceeded", "no_row_left_in_flight", "every_cell_has_provenance"}


def enrich(store: Store, instance: DagsterInstance, budget: float | None = None) -> Any:
    table_id = seed_leads(store).id
    config: dict[str, Any] = {
        "table_id": table_id,
        "column_ids": [leads_column_id(key) for key in LEADS_ENRICH_KEYS],
    }
    if budget is not None:
        config["budget"] = budget
    job = build_definitions(store.url).get_job_def("enrich_table")
    result = job.execute_in_process(
        run_config={"ops": {"detect_entities": {"config": config}}}, instance=instance
    )
    return result, table_id


def evaluations(result: Any) -> dict[str, Any]:
    return {
        event.event_specific_data.check_name: event.event_specific_data
        for event in result.all_events
        if event.event_type is DagsterEventType.ASSET_CHECK_EVALUATION
    }


def test_a_run_reports_every_check_passing_for_its_own_request(store: Store) -> None:
    with DagsterInstance.ephemeral() as instance:
        result, _ = enrich(store, instance, budget=100)
    found = evaluations(result)
    assert set(found) == CHECKS
    assert all(evaluation.passed for evaluation in found.values())
    provenance = found["every_cell_has_provenance"].metadata
    request_id = result.output_for_node("detect_entities", "plan").request_id
    assert provenance["request_id"].value == request_id
    # Every cell the Leads job filled was checked: the request's own count of done cells.
    assert provenance["cells_checked"].value == store.get_request(request_id).cells_done > 0


def test_each_check_fails_on_data_that_breaks_its_rule(store: Store) -> None:
    glaze_db = GlazeDatabase(url=store.url)
    with DagsterInstance.ephemeral() as instance:
        result, table_id = enrich(store, instance, budget=100)
    request_id = result.output_for_node("detect_entities", "plan").request_id
    for check in (budget_never_exceeded, no_row_left_in_flight, every_cell_has_provenance):
        assert check(glaze_db=glaze_db).passed, check.check_key.name

    with store.engine.begin() as connection:
        # A request that spent past its budget.
        connection.execute(
            update(EnrichmentRequest).where(EnrichmentRequest.id == request_id).values(cost=100.5)
        )
        # A row left `queued` by nobody, and one held by the (ended) request.
        first, second = connection.scalars(
            select(GlazeRow.id).where(GlazeRow.table_id == table_id).order_by(GlazeRow.id).limit(2)
        ).all()
        connection.execute(update(GlazeRow).where(GlazeRow.id == first).values(status="queued"))
        connection.execute(
            update(GlazeRow)
            .where(GlazeRow.id == second)
            .values(status="running", pending_request_id=request_id)
        )
        # A filled cell that lost its source.
        row_id, meta = connection.execute(
            select(GlazeRow.id, GlazeRow.meta).where(GlazeRow.id == second)
        ).one()
        key = next(k for k, cell in meta.items() if cell.get("status") == "done")
        meta = {**meta, key: {**meta[key], "source": None}}
        connection.execute(update(GlazeRow).where(GlazeRow.id == row_id).values(meta=meta))

    budget = budget_never_exceeded(glaze_db=glaze_db)
    assert not budget.passed
    assert budget.metadata["sample"].value == [
        {"request_id": request_id, "budget": 100.0, "cost": 100.5}
    ]
    rows = no_row_left_in_flight(glaze_db=glaze_db)
    assert not rows.passed
    assert rows.metadata["rows_in_flight"].value == 2
    assert sorted(rows.metadata["sample_row_ids"].value) == sorted([first, second])
    provenance = every_cell_has_provenance(glaze_db=glaze_db)
    assert not provenance.passed
    assert provenance.metadata["sample"].value == [f"{second}/{key}: no source"]
    # Scoped to a request, the provenance check reads only what that request wrote.
    assert checks.cells_without_provenance(store, table_id, request_id="req_other").count == 0


def test_the_data_checks_job_runs_the_three_checks_over_all_the_data(store: Store) -> None:
    with DagsterInstance.ephemeral() as instance:
        enrich(store, instance)
        job = build_definitions(store.url).resolve_job_def("data_checks")
        result = job.execute_in_process(instance=instance)
    assert result.success
    found = evaluations(result)
    assert set(found) == CHECKS
    assert all(evaluation.passed for evaluation in found.values())
    assert found["every_cell_has_provenance"].metadata["tables"].value == 1


def _written_by(store: Store, table_id: str, request_id: str, *, unsourced: set[str]) -> None:
    """Every row's `industry` cell filled by `request_id`, with provenance except in the rows
    `unsourced` (their source is missing)."""
    with store.engine.begin() as connection:
        ids = connection.scalars(select(GlazeRow.id).where(GlazeRow.table_id == table_id)).all()
        for row_id in ids:
            cell = {
                "status": "done",
                "source": None if row_id in unsourced else "mock",
                "confidence": 0.9,
                "fetched_at": "2026-01-01T00:00:00+00:00",
                "request_id": request_id,
            }
            connection.execute(
                update(GlazeRow).where(GlazeRow.id == row_id).values(meta={"industry": cell})
            )


def test_a_requests_own_provenance_check_reads_a_sample_of_a_large_table(store: Store) -> None:
    table = seed_generated(store, rows=50, unique_companies=5)
    with store.engine.connect() as connection:
        ids = sorted(
            connection.scalars(select(GlazeRow.id).where(GlazeRow.table_id == table.id)).all()
        )
    # One row in three lacks its source: any run of 20 rows holds some.
    _written_by(store, table.id, "req_a", unsourced=set(ids[::3]))

    for seed in range(20):  # wherever the run starts, it reads 20 rows
        own = checks.cells_without_provenance(
            store, table.id, request_id="req_a", sample_rows=20, rng=random.Random(seed)
        )
        assert own.sampled and own.rows_checked == 20
        assert own.cells_checked == 20 and 6 <= own.count <= 7
        assert own.sample and all(entry.endswith(": no source") for entry in own.sample)

    # The full check (the `data_checks` job's) reads every row; so does a small table's.
    full = checks.cells_without_provenance(store, table.id)
    assert not full.sampled and (full.cells_checked, full.count) == (50, len(ids[::3]))
    whole = checks.cells_without_provenance(store, table.id, request_id="req_a", sample_rows=50)
    assert not whole.sampled and (whole.cells_checked, whole.count) == (50, len(ids[::3]))
