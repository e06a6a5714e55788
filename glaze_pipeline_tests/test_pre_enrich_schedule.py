"""The pre-enrich schedule: evaluating it writes nothing; its runs pre-enrich each new table once.

A tick is evaluated with `build_schedule_context` against a persistent instance (what the daemon
and the UI's "Preview tick result" do) and the app database on SQLite and on Postgres.
"""

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    DagsterInstance,
    DagsterUserCodeExecutionError,
    DefaultScheduleStatus,
    RunRequest,
    build_schedule_context,
    validate_run_config,
)
from dagster._core.definitions.schedule_definition import ScheduleExecutionData
from sqlalchemy import text, update

from glaze_pipeline.core.schema import GlazeTable
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.settings import PRE_ENRICH_BUDGET_ENV
from glaze_pipeline.core.store import Store, utcnow
from glaze_pipeline.definitions import build_definitions
from glaze_pipeline.defs.assets import TABLE_PARTITIONS
from glaze_pipeline.defs.jobs import enrich_table
from glaze_pipeline.defs.resources import GlazeDatabase, PreEnrichment
from glaze_pipeline.defs.sensors import pre_enrich_schedule
from glaze_pipeline_tests.conftest import APP_TABLES


@pytest.fixture
def instance(tmp_path: Path) -> Any:
    # A schedule context needs a persistent instance, like the daemon's.
    home = tmp_path / "dagster"
    home.mkdir()
    with DagsterInstance.local_temp(str(home)) as instance:
        yield instance


def evaluate(
    instance: DagsterInstance, store: Store, budget: float | None = 25.0
) -> ScheduleExecutionData:
    """One tick, as the daemon evaluates it (resources bound, run requests resolved)."""
    with build_schedule_context(
        instance=instance,
        resources={
            "glaze_db": GlazeDatabase(url=store.url),
            "pre_enrichment": PreEnrichment(budget=budget),
        },
        scheduled_execution_time=utcnow(),
    ) as context:
        return pre_enrich_schedule.evaluate_tick(context)


def app_state(store: Store) -> dict[str, list[Any]]:
    with store.engine.connect() as connection:
        return {
            table: [tuple(row) for row in connection.execute(text(f"SELECT * FROM {table}"))]
            for table in APP_TABLES
        }


def uploaded_hours_ago(store: Store, table_id: str, hours: float) -> None:
    with store.engine.begin() as connection:
        connection.execute(
            update(GlazeTable)
            .where(GlazeTable.id == table_id)
            .values(created_at=utcnow() - timedelta(hours=hours))
        )


def test_evaluation_writes_nothing_and_lists_one_run_per_new_table(
    store: Store, instance: DagsterInstance
) -> None:
    old = seed_generated(store, rows=3, unique_companies=1, name="last week")
    uploaded_hours_ago(store, old.id, 24 * 7)
    new = seed_generated(store, rows=3, unique_companies=1, name="just uploaded")
    before = app_state(store)

    first = evaluate(instance, store)
    second = evaluate(instance, store)

    assert app_state(store) == before  # no request enqueued, no row touched
    assert instance.get_dynamic_partitions(TABLE_PARTITIONS.name) == []  # the job adds it
    assert instance.get_runs_count() == 0
    assert first.skip_message is None
    [request] = first.run_requests or []
    assert request.run_key == f"pre_enrich:{new.id}"
    assert request.run_config == {
        "ops": {
            "detect_entities": {
                "config": {
                    "table_id": new.id,
                    "whole_table": True,
                    "kind": "pre_enrich",
                    "budget": 25.0,
                }
            }
        }
    }
    assert request.tags == {
        "glaze/table": new.id,
        "glaze/kind": "pre_enrich",
        "dagster/priority": "-10",
        "dagster/schedule_name": "pre_enrich_schedule",
    }
    # What the job will be launched with is valid config for it (no request_id: the job
    # records its own request).
    validate_run_config(enrich_table, request.run_config)
    # Nothing was launched in between: the same table, the same run key, the same run.
    assert second.run_requests == first.run_requests


def test_a_table_is_pre_enriched_once(store: Store, instance: DagsterInstance) -> None:
    table = seed_generated(store, rows=6, unique_companies=2)
    [request] = evaluate(instance, store).run_requests or []

    # The run the daemon creates for it: the request's tags plus its run key.
    plan = run_as_the_daemon(store, instance, request)

    recorded = store.get_request(plan.request_id)
    assert (recorded.kind, recorded.table_id, recorded.budget) == ("pre_enrich", table.id, 25.0)
    assert recorded.status == "succeeded", recorded.error
    assert recorded.provider_calls  # the cache was warmed...
    assert all(row.meta == {} for row in store.rows_in_order(table.id))  # ...no cell written
    assert instance.get_dynamic_partitions(TABLE_PARTITIONS.name) == [table.id]  # by the job

    skipped = evaluate(instance, store)
    assert skipped.run_requests == []
    assert "already has its pre_enrich run" in (skipped.skip_message or "")

    later = seed_generated(store, rows=2, unique_companies=1)
    [next_request] = evaluate(instance, store).run_requests or []
    assert next_request.run_key == f"pre_enrich:{later.id}"


def run_as_the_daemon(store: Store, instance: DagsterInstance, request: RunRequest) -> Any:
    job = build_definitions(store.url).get_job_def("enrich_table")
    result = job.execute_in_process(
        run_config=request.run_config,
        tags={**request.tags, "dagster/run_key": request.run_key or ""},
        instance=instance,
    )
    assert result.success
    run = instance.get_run_by_id(result.run_id)
    assert run is not None and run.tags["glaze/kind"] == "pre_enrich"  # over the job's `enrich`
    return result.output_for_node("detect_entities", "plan")


def test_no_new_table_is_a_skip_that_says_so(store: Store, instance: DagsterInstance) -> None:
    table = seed_generated(store, rows=2, unique_companies=1)
    uploaded_hours_ago(store, table.id, 2)
    result = evaluate(instance, store)
    assert result.run_requests == []
    assert (result.skip_message or "").startswith("no table uploaded since")


def test_off_by_default_and_the_budget_comes_from_the_environment(
    store: Store, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert pre_enrich_schedule.default_status == DefaultScheduleStatus.STOPPED
    seed_generated(store, rows=2, unique_companies=1)

    def budget() -> Any:
        [request] = evaluate(instance, store, budget=None).run_requests or []
        return request.run_config["ops"]["detect_entities"]["config"]["budget"]

    monkeypatch.delenv(PRE_ENRICH_BUDGET_ENV, raising=False)
    assert budget() == 100.0
    monkeypatch.setenv(PRE_ENRICH_BUDGET_ENV, "7.5")
    assert budget() == 7.5
    # A typo fails the tick, naming the variable (the tick's error in the UI), never a guess.
    monkeypatch.setenv(PRE_ENRICH_BUDGET_ENV, "lots")
    with pytest.raises(DagsterUserCodeExecutionError) as typo:
        budget()
    assert str(typo.value.user_exception) == f"{PRE_ENRICH_BUDGET_ENV} must be a number, not 'lots'"
    monkeypatch.setenv(PRE_ENRICH_BUDGET_ENV, "-1")
    with pytest.raises(DagsterUserCodeExecutionError) as negative:
        budget()
    assert "must be a non-negative number" in str(negative.value.user_exception)
