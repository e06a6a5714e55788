"""The `enrich_table` job: detect_entities -> enrich_entities (fan-out over spans of rows, each
writing its rows as they are answered) -> apply_results (adds up) -> close_job.

The job runs in process by default (a step as its own process costs ~1 s here against ~50 ms
in process, and each enrich step runs its lookups concurrently with asyncio); the run config
can put its steps in processes of their own or on Celery workers (`defs/executors.py`).
"""

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    AssetMaterialization,
    DagsterInstance,
    DynamicOut,
    DynamicOutput,
    Failure,
    In,
    MetadataValue,
    OpExecutionContext,
    Out,
    Output,
    RetryPolicy,
    graph,
    op,
)

from glaze_pipeline.core import engine, queue
from glaze_pipeline.core.ai.client import LlmConfigError
from glaze_pipeline.core.engine import (
    ApplySummary,
    Chunk,
    ChunkResult,
    JobCancelled,
    JobSettings,
    JobTarget,
    RequestWatch,
)
from glaze_pipeline.core.errors import GlazeError
from glaze_pipeline.core.estimate import EstimatePart
from glaze_pipeline.core.heap import frozen_heap, quiet_collector
from glaze_pipeline.core.models import (
    EntityRequest,
    RequestKind,
    RequestStatus,
)
from glaze_pipeline.core.preflight import check_providers, unusable
from glaze_pipeline.core.progress import job_progress, publish_cells
from glaze_pipeline.core.providers.base import Provider
from glaze_pipeline.core.providers.batching import with_batching
from glaze_pipeline.core.providers.llm_column import ai_column_providers
from glaze_pipeline.core.requests import Adoption, Beat, RequestRepository
from glaze_pipeline.core.store import Store
from glaze_pipeline.core.waterfall import WaterfallStats
from glaze_pipeline.defs.assets import ENRICHED_TABLE, ENTITY_CACHE, TABLE_PARTITIONS_NAME
from glaze_pipeline.defs.checks import evaluations_for_request
from glaze_pipeline.defs.config import EnrichTableConfig
from glaze_pipeline.defs.executors import selected_executor, side_by_side, steps_at_once
from glaze_pipeline.defs.resources import (
    EnrichmentProviders,
    GlazeDatabase,
    LanguageModel,
    ProgressChannel,
)


@dataclass(frozen=True)
class JobPlan:
    """What detection decided, handed to every later step (small: no cells, no entities)."""

    request_id: str
    kind: RequestKind
    target: JobTarget
    settings: JobSettings
    rows_read: int
    entities: int
    cells_total: int
    rows_to_fill: int
    cells_without_identifier: int
    chunks: int
    started: float
    # An overwriting job's fingerprints of the cells it read (empty otherwise): see
    # `engine.apply_results`.
    read: dict[str, int] = field(default_factory=dict)
    # The providers the preflight found unusable (name -> reason): no step calls them.
    unavailable: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AppliedJob:
    summary: ApplySummary
    stats: WaterfallStats
    enrich_seconds: float
    stopped: str | None = None  # why the job stopped early (a cancel), if it did
    estimate: EstimatePart | None = None  # an estimate job's figures


@contextmanager
def request_closed_on_error(
    store: Store,
    request_id: str,
    progress: ProgressChannel,
    table_id: str,
    *,
    retryable: bool = False,
) -> Iterator[None]:
    """Whatever stops a step ends its request with the truth, then fails the step.

    * JobCancelled (a cancel, a Terminate, the request closed under the job): `cancelled`, and
      the step fails with retries refused: an interrupt is never retried.
    * GlazeError (bad input): `failed` with the reason, never retried.
    * anything else: `failed`, unless Dagster is about to retry the step (`retryable`): the
      request stays `running` for the retry to finish it.

    Each write is a guarded transition, so none of them can overwrite an ending already
    recorded. Every ending lets go of the rows the request still holds (whoever recorded it:
    letting go is idempotent), then realtime subscribers hear `finished`.
    """
    requests = RequestRepository(store)

    def ended(status: RequestStatus, reason: str) -> None:
        with progress.publisher() as publisher:
            publisher.publish(
                "finished", request_id, table_id, status=status.value, error=reason, progress=100
            )

    try:
        yield
    except JobCancelled as stop:
        cancelled = requests.cancel(request_id, str(stop))
        store.release_rows(request_id)
        if cancelled:
            ended(RequestStatus.CANCELLED, str(stop))
        raise Failure(description=str(stop), allow_retries=False) from None
    except GlazeError as error:
        if engine.fail_job(store, request_id, error):  # fail_job lets go of the rows
            ended(RequestStatus.FAILED, str(error))
        raise Failure(description=str(error), allow_retries=False) from None
    except Exception as error:
        if not retryable and engine.fail_job(store, request_id, error):
            ended(RequestStatus.FAILED, f"{type(error).__name__}: {error}")
        raise


def reject_request(store: Store, request_id: str, reason: str, progress: ProgressChannel) -> None:
    """End a queued or launched request this run cannot serve `failed`, before any work: it
    lets go of the rows it held `queued` and is announced. A request that is running (under
    another run) or already ended is left alone, rows included."""
    with suppress(GlazeError):  # an unknown request id: the step's failure names it
        if RequestRepository(store).reject(request_id, reason):
            with progress.publisher() as publisher:
                queue.settle_ended(store, request_id, publisher)


def ensure_table_partition(instance: DagsterInstance, table_id: str) -> None:
    """Register the table's partition of the assets; concurrent runs may race to do it."""
    if instance.has_dynamic_partition(TABLE_PARTITIONS_NAME, table_id):
        return
    try:
        instance.add_dynamic_partitions(TABLE_PARTITIONS_NAME, [table_id])
    except Exception:
        if not instance.has_dynamic_partition(TABLE_PARTITIONS_NAME, table_id):
            raise  # not a lost race: a real storage error


ENRICH_RETRIES = 1


def adopt_request(
    context: OpExecutionContext,
    requests: RequestRepository,
    request_id: str | None,
    *,
    table_id: str,
    kind: RequestKind,
    selection: Mapping[str, Any],
    budget: float | None,
) -> str:
    """The request this run serves: the queued one it was launched for (`request_id`), or,
    when none is named, a new record of the run's table, kind, selection and budget.

    A request that already ended is history: a re-executed run (the UI's "Re-execute") gets a
    new request pointing at it (`retry_of`), and anything else that names it is refused.
    Both the enrich job and the AI jobs serve their requests this way.
    """
    run_id = context.run_id
    if request_id is None:
        return requests.create_running(
            table_id=table_id, kind=kind, selection=selection, budget=budget, run_id=run_id
        )
    adoption = requests.adopt(request_id, run_id)
    if adoption in (Adoption.ADOPTED, Adoption.ALREADY):
        return request_id
    request = requests.get(request_id)
    if adoption is Adoption.ENDED and context.run.parent_run_id is not None:
        retry = requests.create_running(
            table_id=request.table_id,
            kind=RequestKind(request.kind),
            selection=request.selection,
            budget=request.budget,
            run_id=run_id,
            retry_of=request.id,
        )
        context.log.info(
            f"re-execution: request {request.id} ended {request.status}; "
            f"this run records its work as {retry} (retry of {request.id})"
        )
        return retry
    if adoption is Adoption.ENDED:
        raise GlazeError(
            f"request {request.id} already ended {request.status}: enqueue a new request"
        )
    raise GlazeError(f"request {request.id} is already running under run {request.run_id}")


def ai_providers(llm: LanguageModel, target: JobTarget) -> list[Provider]:
    """The providers of the target's AI columns, one per template; none (and no LLM setting
    read) when it has none. An LLM that is not configured makes them unavailable with the
    reason: their cells end skipped, and nothing is spent."""
    columns = [column for column in target.columns if column.prompt is not None]
    if not columns:
        return []
    try:
        settings = llm.settings()
    except LlmConfigError as error:
        return list(ai_column_providers(columns, None, problem=str(error)))
    return list(ai_column_providers(columns, settings))


def tag_run(context: OpExecutionContext, tags: dict[str, str]) -> None:
    """Tags on the run whatever launched it (the Launchpad, the CLI, a re-execution)."""
    context.instance.add_run_tags(context.run_id, tags)


@op(
    out={"plan": Out(JobPlan), "chunks": DynamicOut(Chunk)},
    description="Read the selected rows in pages, find the unique entities, cut the rows into "
    "spans (chunks).",
)
def detect_entities(
    context: OpExecutionContext,
    config: EnrichTableConfig,
    glaze_db: GlazeDatabase,
    providers: EnrichmentProviders,
    progress: ProgressChannel,
    llm: LanguageModel,
) -> Iterator[Output | DynamicOutput]:
    started = time.time()
    store = glaze_db.store()
    requests = RequestRepository(store)
    try:
        selection = config.selection()
        settings = config.settings()
        kind = config.request_kind()
    except (ValueError, GlazeError) as error:
        message = f"invalid enrich_table config: {error}"
        if config.request_id is not None:
            reject_request(store, config.request_id, message, progress)
        raise Failure(description=message, allow_retries=False) from None
    try:
        target = engine.resolve_target(store, config.table_id, selection)
        request_id = adopt_request(
            context,
            requests,
            config.request_id,
            table_id=target.table_id,
            kind=kind,
            selection=selection.model_dump(mode="json"),
            budget=settings.budget,
        )
    except GlazeError as error:
        if config.request_id is not None:
            reject_request(store, config.request_id, str(error), progress)
        raise Failure(description=str(error), allow_retries=False) from None
    tag_run(
        context,
        {
            queue.TABLE_TAG: target.table_id,
            queue.REQUEST_TAG: request_id,
            queue.KIND_TAG: kind.value,
        },
    )
    with (
        request_closed_on_error(store, request_id, progress, target.table_id),
        RequestWatch(requests, request_id) as watch,
        quiet_collector(),
    ):
        detection = engine.detect_entities(
            store,
            target,
            page_size=settings.page_size,
            watch=watch,
            # Only a job that writes cells holds rows `running` (estimate, pre_enrich write none).
            request_id=request_id if kind is RequestKind.ENRICH else None,
        )
        executor = selected_executor(context.run_config)
        chunks = engine.plan_spans(
            detection,
            target,
            chunk_size=settings.chunk_size,
            max_chunks=settings.fan_out(executor, entities=len(detection.entities)),
            side_by_side=side_by_side(context.run_config),
        )
        requests.record_counters(
            request_id,
            entities=len(detection.entities),
            cells_total=detection.cells_total,
            rows_total=detection.rows_read,
        )
        unavailable = preflight(
            context,
            requests,
            request_id,
            [*providers.providers(), *ai_providers(llm, target)],
            detection.entities,
        )
        with progress.publisher() as publisher:
            publisher.publish(
                "started",
                request_id,
                target.table_id,
                kind=kind.value,
                rows=detection.rows_read,
                cells_total=detection.cells_total,
                entities=len(detection.entities),
                progress=0,
            )
        ensure_table_partition(context.instance, target.table_id)
        context.log.info(
            f"request {request_id}: {detection.rows_read} rows, {detection.cells_total} cells, "
            f"{len(detection.entities)} unique entities in {len(chunks)} chunks "
            f"({detection.cells_without_identifier} cells have no identifier)"
        )
    yield Output(
        JobPlan(
            request_id=request_id,
            kind=kind,
            target=target,
            settings=settings,
            rows_read=detection.rows_read,
            entities=len(detection.entities),
            cells_total=detection.cells_total,
            rows_to_fill=detection.rows_to_fill,
            cells_without_identifier=detection.cells_without_identifier,
            chunks=len(chunks),
            started=started,
            read=detection.read,
            unavailable=unavailable,
        ),
        "plan",
    )
    for chunk in chunks:
        yield DynamicOutput(chunk, mapping_key=f"chunk_{chunk.index}", output_name="chunks")


def preflight(
    context: OpExecutionContext,
    requests: RequestRepository,
    request_id: str,
    providers: list[Provider],
    entities: list[EntityRequest],
) -> dict[str, str]:
    """Check the providers this job may ask before it buys anything; an unusable one is named
    once, on the request and in the run's log, and no step calls it."""
    relevant = engine.relevant_providers(providers, entities)
    unavailable = unusable(check_providers(relevant))
    for name, reason in sorted(unavailable.items()):
        context.log.warning(
            f"provider {name} unavailable: {reason}; the waterfall skips it, and cells only it "
            "could fill end skipped"
        )
    if unavailable:
        requests.record_unavailable(request_id, unavailable)
    return unavailable


@op(
    ins={"plan": In(JobPlan), "chunk": In(Chunk)},
    # Retries what is worth retrying (a lost database connection, a crashed worker thread);
    # a cancel, a Terminate or bad input fails with retries refused (request_closed_on_error).
    retry_policy=RetryPolicy(max_retries=ENRICH_RETRIES, delay=1.0),
    description="Enrich one span of rows through the provider waterfall, concurrently, and "
    "write its rows page by page as their entities are answered.",
)
def enrich_entities(
    context: OpExecutionContext,
    plan: JobPlan,
    chunk: Chunk,
    glaze_db: GlazeDatabase,
    providers: EnrichmentProviders,
    progress: ProgressChannel,
    llm: LanguageModel,
) -> ChunkResult:
    store = glaze_db.store()
    requests = RequestRepository(store)
    table_id = plan.target.table_id
    writes = plan.kind is RequestKind.ENRICH
    with (
        request_closed_on_error(
            store,
            plan.request_id,
            progress,
            table_id,
            retryable=context.retry_number < ENRICH_RETRIES,
        ),
        RequestWatch(requests, plan.request_id) as watch,
        progress.publisher() as publisher,
    ):
        watch.raise_if_closed()  # closed under the job: nothing more to do
        stopped = watch.stop_reason  # cancelled before this chunk started
        if stopped is not None and not writes:
            context.log.info(f"{len(chunk.entities)} entities not enriched: {stopped}")
            return engine.stopped_chunk(chunk.entities, stopped)
        done = [0]

        def published(beat: Beat) -> None:
            """Each beat (about every second) tells subscribers where the whole job is."""
            counters = beat.counters
            answered = sum(counters.get(f"cells_{name}", 0) for name in CELL_COUNTERS)
            phase, percent = job_progress(
                entities_done=counters.get("entities_done", 0),
                entities=plan.entities,
                cells_answered=answered,
                cells_total=plan.cells_total,
            )
            publisher.publish(
                "progress",
                plan.request_id,
                table_id,
                phase=phase,
                entities_done=min(counters.get("entities_done", 0), plan.entities),
                entities=plan.entities,
                rows_written=counters.get("rows_written", 0),
                rows_total=plan.rows_read,
                cells_total=plan.cells_total,
                **{f"cells_{name}": counters.get(f"cells_{name}", 0) for name in CELL_COUNTERS},
                answered=counters.get("cells_done", 0) + counters.get("cells_not_found", 0),
                progress=percent,
            )

        watch.on_beat = published
        if watch.beat is not None:  # the step's first beat, taken on the way in: tell it now
            published(watch.beat)  # (a step's start, in a process of its own, is a silence)
        if not writes:
            watch.progress = lambda: {"entities_done": done[0]}

        def advanced(entities_done: int) -> None:
            done[0] = entities_done

        # The AI columns' LLM client lives as long as this step (its connections belong to
        # the event loop the chunk runs); their LLM attempts are recorded by the chunk.
        # Steps side by side share each vendor's max_concurrency (a Celery pool: concurrent_steps).
        step_providers = [
            *providers.providers(steps_at_once(context.run_config)),
            *ai_providers(llm, plan.target),
        ]
        if plan.settings.batch_endpoints:
            step_providers = with_batching(step_providers)
        with (
            frozen_heap(),
            providers.sharing(store, side_by_side=side_by_side(context.run_config)) as sharing,
        ):
            if writes:
                result = engine.enrich_span(
                    store,
                    plan.request_id,
                    plan.target,
                    chunk,
                    step_providers,
                    plan.settings,
                    cache=sharing.cache,
                    flight=sharing.flight,
                    watch=watch,
                    unavailable=plan.unavailable,
                    read=plan.read,
                    on_written=lambda patches: publish_cells(
                        publisher, plan.request_id, table_id, patches
                    ),
                    stopped=stopped,
                )
            else:
                result = engine.enrich_chunk(
                    store,
                    plan.request_id,
                    chunk.entities,
                    step_providers,
                    plan.settings,
                    cache=sharing.cache,
                    flight=sharing.flight,
                    dry_run=plan.kind is RequestKind.ESTIMATE,
                    watch=watch,
                    on_progress=advanced,
                    unavailable=plan.unavailable,
                )
        watch.check_now()  # the chunk's last counters reach the request (and subscribers)
        watch.raise_if_closed()
    stats = result.stats
    if result.estimate is not None:
        part = result.estimate
        context.log.info(
            f"{len(chunk.entities)} entities estimated in {result.seconds:.2f}s: expected cost "
            f"{sum(part.expected.cost.values()):,.2f}, upper bound {sum(part.worst.cost.values()):,g}"
        )
        return result
    written = (
        f"; wrote {result.summary.rows_written} of {result.summary.rows_read} rows "
        f"({result.summary.statements} statements, first after {result.first_write_s or 0:.2f}s)"
        if result.summary is not None
        else ""
    )
    context.log.info(
        # By provider name: the order the calls happened to finish in is noise in a log line.
        f"{len(chunk.entities)} entities in {result.seconds:.2f}s: calls "
        f"{dict(sorted(stats.calls.items()))}, cache hits {stats.cache_hits} "
        f"({stats.shared_hits} from concurrent runs, via {sharing.backend}), errors "
        f"{dict(sorted(stats.errors.items()))}"
        + (f"; not sent {stats.not_sent_dict()}" if stats.not_sent else "")
        + written
        + (f"; stopped: {result.stopped}" if result.stopped else "")
    )
    return result


CELL_COUNTERS = ("done", "not_found", "failed", "skipped")


@op(
    description="Gather the chunks' figures: the rows are written by the chunks as they go.",
)
def apply_results(
    context: OpExecutionContext,
    plan: JobPlan,
    results: list[ChunkResult],
) -> AppliedJob:
    stats = WaterfallStats()
    summary = ApplySummary()
    for result in results:
        stats.merge(result.stats)
        if result.summary is not None:
            summary.merge(result.summary)
    stopped = next((r.stopped for r in results if r.stopped), None)
    seconds = sum(r.seconds for r in results)
    if plan.kind is not RequestKind.ENRICH:
        # estimate and pre_enrich write no cell: the answers are in the cache (or the estimate).
        estimate = engine.merge_estimates(results) if plan.kind is RequestKind.ESTIMATE else None
        return AppliedJob(ApplySummary(), stats, seconds, stopped, estimate)
    context.log.info(
        f"wrote {summary.rows_written} rows ({dict(summary.cells)}) "
        f"with {summary.statements} statements across {len(results)} chunks"
    )
    return AppliedJob(summary, stats, seconds, stopped)


@op(description="Close the request with its terminal status and report the job's figures.")
def close_job(
    context: OpExecutionContext,
    plan: JobPlan,
    applied: AppliedJob,
    glaze_db: GlazeDatabase,
    providers: EnrichmentProviders,
    progress: ProgressChannel,
    llm: LanguageModel,
) -> Iterator[AssetMaterialization | Output]:
    store = glaze_db.store()
    requests = RequestRepository(store)
    summary, stats = applied.summary, applied.stats
    table_id = plan.target.table_id
    with request_closed_on_error(store, plan.request_id, progress, table_id):
        written = engine.finish_job(
            store,
            plan.request_id,
            entities=plan.entities,
            stats=stats,
            summary=summary,
            kind=plan.kind,
            detection_cells=plan.cells_total,
            cells_without_identifier=plan.cells_without_identifier,
            cancelled=applied.stopped,
            estimate=applied.estimate,
            providers=[*providers.providers(), *ai_providers(llm, plan.target)],
            unavailable=plan.unavailable,
            budget=plan.settings.budget,
        )
    request = requests.get(plan.request_id)
    status = RequestStatus(request.status)
    if written is None:
        context.log.warning(
            f"request {plan.request_id} had already ended {status.value} ({request.error}); "
            "left as it was"
        )
    spend = requests.spend(plan.request_id)
    metadata = {
        "request_id": plan.request_id,
        "kind": plan.kind.value,
        "status": status.value,
        "rows_read": plan.rows_read,
        "rows_written": summary.rows_written,
        "entities": plan.entities,
        "cells": MetadataValue.json(dict(summary.cells)),
        "cells_kept": summary.kept,
        "cache_hits": stats.cache_hits,
        "provider_calls": MetadataValue.json(spend.calls or dict(stats.calls)),
        "provider_errors": MetadataValue.json(dict(stats.errors)),
        "cost": spend.cost if spend.calls else round(sum(stats.cost.values()), 6),
        "cost_by_provider": MetadataValue.json(
            spend.cost_by_provider or {k: round(v, 6) for k, v in stats.cost.items()}
        ),
        "calls_not_sent": MetadataValue.json(stats.not_sent_dict()),
        "unavailable_providers": MetadataValue.json(plan.unavailable),
        "apply_statements": summary.statements,
        "duration_s": round(time.time() - plan.started, 3),
    }
    usage = store.llm_usage(plan.request_id)
    if usage.calls:
        # The AI columns' LLM attempts: tokens and their cost (the credits are in `cost`).
        metadata["llm_usage"] = MetadataValue.json(
            {
                "calls": usage.calls,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "token_cost": usage.cost,
            }
        )
    if plan.kind is RequestKind.ESTIMATE and request.estimate:
        # The estimate's own figures first: they are what an estimate run is for.
        report = request.estimate
        metadata = {
            "expected_cost": report["expected_cost"],
            "max_cost": report["max_cost"],
            "budget_guidance": report["guidance"],
            "expected_cells_filled": report["expected_cells_filled"],
            "estimate_providers": MetadataValue.json(report["providers"]),
            **metadata,
        }
    if plan.kind is RequestKind.ENRICH:
        yield AssetMaterialization(asset_key=ENRICHED_TABLE, partition=table_id, metadata=metadata)
        for evaluation in evaluations_for_request(store, plan.request_id, table_id):
            context.log_event(evaluation)
    if plan.kind is not RequestKind.ESTIMATE and spend.calls:
        yield AssetMaterialization(
            asset_key=ENTITY_CACHE,
            metadata={
                "answers_bought": sum(spend.calls.values()),
                "request_id": plan.request_id,
                "kind": plan.kind.value,
            },
        )
    # The outcome on the run itself: a tag to filter runs by in the UI, and a warning line for
    # anything short of full success (a green run can still hold a partial request).
    tag_run(context, {"glaze/outcome": status.value})
    ending = f"request {plan.request_id} ended {status.value}"
    if status is RequestStatus.SUCCEEDED:
        context.log.info(ending)
    else:
        context.log.warning(f"{ending}: {request.error or 'see its cells'}")
    with progress.publisher() as publisher:
        publisher.publish(
            "finished",
            plan.request_id,
            table_id,
            status=status.value,
            rows_written=summary.rows_written,
            cells=dict(summary.cells),
            cost=request.cost,
            progress=100,
        )
    yield Output(status.value, metadata=metadata)


@graph
def enrich_table_graph() -> None:
    plan, chunks = detect_entities()
    results = chunks.map(lambda chunk: enrich_entities(plan, chunk))
    close_job(plan, apply_results(plan, results.collect()))


enrich_table = enrich_table_graph.to_job(
    name="enrich_table",
    description="Fill a table's cells entity-first: detect, then enrich spans of rows "
    "concurrently, each writing its rows as their entities are answered.",
    tags={"glaze/kind": "enrich"},
)
