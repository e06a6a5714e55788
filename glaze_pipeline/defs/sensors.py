"""Sensors and the schedule: launch queued requests, keep every request's status true.

All of them are cheap and idempotent: bounded work per tick, a `run_key` per request, a
SkipReason that says why nothing happened.
"""

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
from dagster._core.storage.tags import RUN_KEY_TAG  # "dagster/run_key", not re-exported

from glaze_pipeline.core import queue
from glaze_pipeline.core.models import RequestStatus
from glaze_pipeline.core.store import Store, utcnow
from glaze_pipeline.defs.ai_jobs import AI_JOB_DEFS
from glaze_pipeline.defs.config import EnrichTableConfig, JobKind
from glaze_pipeline.defs.executors import run_config_on
from glaze_pipeline.defs.jobs import enrich_table
from glaze_pipeline.defs.resources import (
    GlazeDatabase,
    PreEnrichment,
    ProgressChannel,
    RequestLiveness,
)

# run_failure_sensor passes Dagster's own beta `owners` parameter: not ours to act on.
warnings.filterwarnings("ignore", message="Parameter `owners`", category=BetaWarning)

CLAIMS_PER_TICK = 25


# Every job a queued request may run, and so every job whose runs close a request.
REQUEST_JOBS = [enrich_table, *AI_JOB_DEFS]


def request_runs(launchable: list[queue.Launchable]) -> list[RunRequest]:
    """One RunRequest per valid claimed request, for its kind's job, on the executor its size
    calls for (a large enrich on every core: `queue.executor_for`); its id is the run key
    (never launched twice)."""
    return [
        RunRequest(
            run_key=item.request.id,
            job_name=item.job_name,
            run_config=run_config_on(item.run_config, item.executor),
            tags=item.tags,
        )
        for item in launchable
    ]


@sensor(
    jobs=REQUEST_JOBS,
    minimum_interval_seconds=1,
    default_status=DefaultSensorStatus.RUNNING,
    description="Claims queued enrichment_requests (priority order) and launches each one's "
    "job: enrich_table, or the AI job of its kind.",
)
def enrichment_queue_sensor(
    context: SensorEvaluationContext, glaze_db: GlazeDatabase, progress: ProgressChannel
):
    with glaze_db.open_store() as store, progress.publisher() as publisher:
        launchable, rejected = queue.claim_launchable(
            store, limit=CLAIMS_PER_TICK, publisher=publisher
        )
    for request_id, reason in rejected:
        context.log.warning(f"request {request_id} rejected: {reason}")
    if not launchable and not rejected:
        return SkipReason("no queued requests")
    context.log.info(
        f"claimed {len(launchable) + len(rejected)} requests: {len(launchable)} launched, "
        f"{len(rejected)} rejected"
    )
    if not launchable:
        return SensorResult(
            skip_reason=SkipReason(f"{len(rejected)} invalid requests ended failed")
        )
    return SensorResult(run_requests=request_runs(launchable))


def _request_id(store: Store, run_id: str, tags: dict[str, str]) -> str | None:
    return tags.get(queue.REQUEST_TAG) or store.request_for_run(run_id)


@run_failure_sensor(
    monitored_jobs=REQUEST_JOBS,
    default_status=DefaultSensorStatus.RUNNING,
    description="A failed enrich_table or AI run ends its request `failed` with the reason, "
    "lets go of its rows and announces it.",
)
def request_on_run_failure(
    context: RunFailureSensorContext, glaze_db: GlazeDatabase, progress: ProgressChannel
) -> None:
    run = context.dagster_run
    with glaze_db.open_store() as store, progress.publisher() as publisher:
        request_id = _request_id(store, run.run_id, dict(run.tags))
        if request_id is not None:
            message = context.failure_event.message or "the run failed"
            queue.close_for_run(
                store,
                request_id,
                RequestStatus.FAILED,
                f"run {run.run_id} failed: {message}",
                publisher,
            )


@run_status_sensor(
    run_status=DagsterRunStatus.CANCELED,
    monitored_jobs=REQUEST_JOBS,
    default_status=DefaultSensorStatus.RUNNING,
    description="A cancelled enrich_table or AI run ends its request `cancelled`, lets go of "
    "its rows and announces it.",
)
def request_on_run_canceled(
    context: RunStatusSensorContext, glaze_db: GlazeDatabase, progress: ProgressChannel
) -> None:
    run = context.dagster_run
    with glaze_db.open_store() as store, progress.publisher() as publisher:
        request_id = _request_id(store, run.run_id, dict(run.tags))
        if request_id is not None:
            queue.close_for_run(
                store,
                request_id,
                RequestStatus.CANCELLED,
                f"run {run.run_id} was cancelled",
                publisher,
            )


@sensor(
    minimum_interval_seconds=15,
    default_status=DefaultSensorStatus.RUNNING,
    description="Cancels flagged requests, fails requests whose run died, re-queues lost claims, "
    "lets go of rows an ended request still holds; announces every ending it records.",
)
def request_reconciler(
    context: SensorEvaluationContext,
    glaze_db: GlazeDatabase,
    progress: ProgressChannel,
    request_liveness: RequestLiveness,
):
    instance = context.instance
    stale_after = request_liveness.stale_after()

    def find_run(request: queue.ActiveRequest) -> queue.RunView | None:
        runs = instance.get_runs(filters=RunsFilter(tags={queue.REQUEST_TAG: request.id}), limit=1)
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

    with glaze_db.open_store() as store, progress.publisher() as publisher:
        actions = queue.reconcile(
            store,
            find_run=find_run,
            cancel_run=cancel_run,
            report_dead_run=report_dead_run,
            now=utcnow(),
            stale_after=stale_after,
            publisher=publisher,
        )
    for action in actions:
        context.log.info(action)
    return SkipReason("; ".join(actions) if actions else "every open request is consistent")


PRE_ENRICH_LOOKBACK = timedelta(hours=1)


def pre_enrich_run_key(table_id: str) -> str:
    return f"pre_enrich:{table_id}"


def pre_enrich_run(table_id: str, budget: float) -> RunRequest:
    """One low-priority `pre_enrich` run over the whole table; the job records its own request."""
    config = EnrichTableConfig(
        table_id=table_id, whole_table=True, kind=JobKind.pre_enrich, budget=budget
    )
    kind = config.request_kind()
    _, run_config = queue.job_run(kind, config.op_config())
    return RunRequest(
        run_key=pre_enrich_run_key(table_id),
        run_config=run_config,
        tags={
            **queue.tags_for(kind, table_id),
            # Below every user run in a QueuedRunCoordinator (default 0), like its queue priority.
            queue.PRIORITY_TAG: str(queue.PRIORITY_PRE_ENRICH),
        },
    )


@schedule(
    cron_schedule="*/5 * * * *",
    job=enrich_table,
    # Off until someone turns it on: a fresh `dagster dev` buys nothing nobody asked for.
    default_status=DefaultScheduleStatus.STOPPED,
    description="Pre-enriches tables uploaded in the last hour into the entity cache, once each.",
)
def pre_enrich_schedule(
    context: ScheduleEvaluationContext, glaze_db: GlazeDatabase, pre_enrichment: PreEnrichment
):
    """Warm the entity cache for newly uploaded tables, so a later click is instant.

    Evaluation only reads (the app's tables, the instance's runs) and returns run requests: the
    UI's "Preview tick result" spends nothing, and the job registers the table's partition and
    records its request when it runs. Dagster dedupes a schedule's run keys only within one tick,
    so a table that already has a run keyed `pre_enrich:<table>` is left out: pre-enriched once.
    """
    since = context.scheduled_execution_time - PRE_ENRICH_LOOKBACK
    with glaze_db.open_store() as store:
        table_ids = store.tables_created_since(since)
    if not table_ids:
        return SkipReason(f"no table uploaded since {since:%Y-%m-%d %H:%M %Z}")
    run_keys = [pre_enrich_run_key(table_id) for table_id in table_ids]
    launched = {
        run.tags[RUN_KEY_TAG]
        for run in context.instance.get_runs(filters=RunsFilter(tags={RUN_KEY_TAG: run_keys}))
    }
    budget = pre_enrichment.resolved_budget()
    runs = [
        pre_enrich_run(table_id, budget)
        for table_id, run_key in zip(table_ids, run_keys, strict=True)
        if run_key not in launched
    ]
    if not runs:
        return SkipReason(
            f"every table uploaded since {since:%Y-%m-%d %H:%M %Z} ({len(table_ids)}) "
            "already has its pre_enrich run"
        )
    return runs


GLAZE_SENSORS = [
    enrichment_queue_sensor,
    request_on_run_failure,
    request_on_run_canceled,
    request_reconciler,
]
