"""Sensors and the schedule: launch queued requests, keep every request's status true.

All of them are cheap and idempotent: bounded work per tick, a `run_key` per request, a
SkipReason that says why nothing happened.
"""

import os
import warnings
from datetime import timedelta

from dagster import (
    BetaWarning,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    RunsFilter,
    RunStatusSensorContext,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    run_failure_sensor,
    run_status_sensor,
    schedule,
    sensor,
)

from glaze_pipeline.core import queue
from glaze_pipeline.core.models import RequestKind
from glaze_pipeline.core.store import GlazeError, Store, utcnow
from glaze_pipeline.defs.assets import TABLE_PARTITIONS
from glaze_pipeline.defs.jobs import enrich_table
from glaze_pipeline.defs.resources import GlazeDatabase

# run_failure_sensor passes Dagster's own beta `owners` parameter: not ours to act on.
warnings.filterwarnings("ignore", message="Parameter `owners`", category=BetaWarning)

CLAIMS_PER_TICK = 25
STALE_AFTER_ENV = "GLAZE_STALE_AFTER_SECONDS"
PRE_ENRICH_BUDGET_ENV = "GLAZE_PRE_ENRICH_BUDGET"


def request_runs(claimed: list[queue.ClaimedRequest], store: Store) -> tuple[list[RunRequest], int]:
    """Run requests for claimed requests; invalid ones end `failed` here, never launched."""
    runs: list[RunRequest] = []
    rejected = 0
    for request in claimed:
        try:
            config = queue.launch_config(store, request)
        except GlazeError as error:
            queue.reject(store, request.id, str(error))
            rejected += 1
            continue
        runs.append(
            RunRequest(
                run_key=request.id,
                run_config={"ops": {"detect_entities": {"config": config}}},
                tags=queue.run_tags(request),
            )
        )
    return runs, rejected


@sensor(
    job=enrich_table,
    minimum_interval_seconds=1,
    default_status=DefaultSensorStatus.RUNNING,
    description="Claims queued enrichment_requests (priority order) and launches enrich_table.",
)
def enrichment_queue_sensor(context: SensorEvaluationContext, glaze_db: GlazeDatabase):
    with glaze_db.open_store() as store:
        claimed = queue.claim(store, limit=CLAIMS_PER_TICK)
        if not claimed:
            return SkipReason("no queued requests")
        runs, rejected = request_runs(claimed, store)
    context.log.info(f"claimed {len(claimed)} requests: {len(runs)} launched, {rejected} rejected")
    if not runs:
        return SensorResult(skip_reason=SkipReason(f"{rejected} invalid requests ended failed"))
    return SensorResult(run_requests=runs)


def _request_id(store: Store, run_id: str, tags: dict[str, str]) -> str | None:
    return tags.get("glaze/request") or store.request_for_run(run_id)


@run_failure_sensor(
    monitored_jobs=[enrich_table],
    default_status=DefaultSensorStatus.RUNNING,
    description="A failed enrich_table run ends its request `failed` with the reason.",
)
def request_on_run_failure(context: RunFailureSensorContext, glaze_db: GlazeDatabase) -> None:
    run = context.dagster_run
    with glaze_db.open_store() as store:
        request_id = _request_id(store, run.run_id, dict(run.tags))
        if request_id is not None:
            message = context.failure_event.message or "the run failed"
            queue.mark_failed(store, request_id, f"run {run.run_id} failed: {message}")


@run_status_sensor(
    run_status=DagsterRunStatus.CANCELED,
    monitored_jobs=[enrich_table],
    default_status=DefaultSensorStatus.RUNNING,
    description="A cancelled enrich_table run ends its request `cancelled`.",
)
def request_on_run_canceled(context: RunStatusSensorContext, glaze_db: GlazeDatabase) -> None:
    run = context.dagster_run
    with glaze_db.open_store() as store:
        request_id = _request_id(store, run.run_id, dict(run.tags))
        if request_id is not None:
            queue.mark_cancelled(store, request_id, f"run {run.run_id} was cancelled")


@sensor(
    minimum_interval_seconds=15,
    default_status=DefaultSensorStatus.RUNNING,
    description="Cancels flagged requests, fails requests whose run died, re-queues lost claims.",
)
def request_reconciler(context: SensorEvaluationContext, glaze_db: GlazeDatabase):
    instance = context.instance
    stale_after = timedelta(seconds=float(os.environ.get(STALE_AFTER_ENV, "300")))

    def find_run(request: queue.ActiveRequest) -> queue.RunView | None:
        runs = instance.get_runs(filters=RunsFilter(tags={"glaze/request": request.id}), limit=1)
        run = (
            runs[0]
            if runs
            else (instance.get_run_by_id(request.run_id) if request.run_id else None)
        )
        return queue.RunView(run.run_id, run.status.value) if run is not None else None

    def cancel_run(run_id: str) -> None:
        instance.run_coordinator.cancel_run(run_id)

    def report_dead_run(run_id: str, reason: str) -> None:
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            instance.report_run_failed(run, reason)

    with glaze_db.open_store() as store:
        actions = queue.reconcile(
            store,
            find_run=find_run,
            cancel_run=cancel_run,
            report_dead_run=report_dead_run,
            now=utcnow(),
            stale_after=stale_after,
        )
    for action in actions:
        context.log.info(action)
    return SkipReason("; ".join(actions) if actions else "every open request is consistent")


@schedule(
    cron_schedule="*/5 * * * *",
    job=enrich_table,
    default_status=DefaultScheduleStatus.RUNNING,
    description="Queues low-priority pre_enrich requests for newly uploaded tables.",
)
def pre_enrich_schedule(context: ScheduleEvaluationContext, glaze_db: GlazeDatabase):
    """Warm the entity cache for tables uploaded since the last tick, so a later click is instant.

    The requests go through the queue like any other (priority below user requests, a budget
    cap, idempotency key `pre_enrich` so each table is pre-enriched once).
    """
    since = context.scheduled_execution_time - timedelta(minutes=10)
    budget = float(os.environ.get(PRE_ENRICH_BUDGET_ENV, "100"))
    with glaze_db.open_store() as store:
        table_ids = store.tables_created_since(since)
        if not table_ids:
            return SkipReason(f"no table uploaded since {since:%Y-%m-%d %H:%M}")
        new_partitions = [
            t
            for t in table_ids
            if not context.instance.has_dynamic_partition(TABLE_PARTITIONS.name, t)
        ]
        if new_partitions:
            context.instance.add_dynamic_partitions(TABLE_PARTITIONS.name, new_partitions)
        for table_id in table_ids:
            queue.enqueue(
                store,
                table_id,
                {"whole_table": True},
                kind=RequestKind.PRE_ENRICH,
                budget=budget,
                priority=queue.PRIORITY_PRE_ENRICH,
                idempotency_key="pre_enrich",
            )
    return SkipReason(
        f"queued pre_enrich for {len(table_ids)} tables; the queue sensor launches them"
    )


GLAZE_SENSORS = [
    enrichment_queue_sensor,
    request_on_run_failure,
    request_on_run_canceled,
    request_reconciler,
]
