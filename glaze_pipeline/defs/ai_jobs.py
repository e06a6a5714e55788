"""The AI jobs (seed 003): `table_suggestions`, `column_suggestions`, `row_suggestions`, and
`table_generation` (table -> columns -> rows, each op handed what the ones before proposed).

Adapters only: the work is `core.ai.workflow`. Each job serves one request like `enrich_table`
does: the queued one it was launched for (sensor, launcher, GraphQL, CLI), or a new record for
a run launched without one (the Launchpad, `dagster job execute`); a re-execution records its
work as a new request (`retry_of`). A step that hits a retryable LLM failure (the client's own
retries spent: an outage, rate limits) is retried by Dagster; a non-retryable one (a refused
request or key, an answer still invalid after repair) fails the request at once. In process:
each job is a few fat steps that wait on one LLM call at a time.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from dagster import (
    Config,
    Failure,
    In,
    MetadataValue,
    OpDefinition,
    OpExecutionContext,
    Out,
    Output,
    RetryPolicy,
    graph,
    in_process_executor,
    op,
)
from pydantic import Field

from glaze_pipeline.core import queue
from glaze_pipeline.core.ai.client import AIJobError
from glaze_pipeline.core.ai.workflow import (
    AI_JOBS,
    STEPS,
    AiTask,
    Proposal,
    Step,
    check_task,
    finish_ai,
    run_step,
)
from glaze_pipeline.core.engine import RequestWatch
from glaze_pipeline.core.errors import GlazeError, InputError
from glaze_pipeline.core.models import RequestKind, RequestStatus
from glaze_pipeline.core.progress import percent
from glaze_pipeline.core.requests import RequestRepository
from glaze_pipeline.core.schema import EnrichmentRequest
from glaze_pipeline.core.store import Store, new_id
from glaze_pipeline.defs.jobs import (
    adopt_request,
    reject_request,
    request_closed_on_error,
    tag_run,
)
from glaze_pipeline.defs.resources import GlazeDatabase, LanguageModel, ProgressChannel

# Dagster retries of one step, on top of the LLM client's own retries of each call.
AI_RETRIES = 2
AI_RETRY_DELAY_S = 2.0


class AiRequestConfig(Config):
    """What to propose. The sensor sets `request_id` (the queued request); from the Launchpad,
    give `context` (and `table_id` for column or row suggestions, `count` for rows)."""

    context: str = Field(default="", description="What the table is for, in plain words.")
    table_id: str | None = Field(
        default=None,
        description="The table to suggest for (column and row suggestions: required); none: a "
        "new table, whose id is reserved now and created when the proposal is accepted.",
    )
    count: int | None = Field(
        default=None, description="Rows to propose (row suggestions; table generation: 10)."
    )
    request_id: str | None = Field(
        default=None, description="The queued request this run serves (set by the sensor)."
    )


@dataclass(frozen=True)
class AiState:
    """What one op hands the next: the request served, what it asks, what it proposes so far."""

    request_id: str
    task: AiTask
    proposal: Proposal
    started: float


class RetryableLlmError(Exception):
    """A retryable AIJobError on a try that is not the last: not a GlazeError, so the request
    stays running and Dagster retries the step (see request_closed_on_error)."""


# --- the steps -----------------------------------------------------------------------------


def adopt_ai_request(
    context: OpExecutionContext, requests: RequestRepository, request_id: str | None, task: AiTask
) -> str:
    """The request this run serves (see `adopt_request`); without one named, the one this run
    already recorded (a retried first step) before a new record."""
    return adopt_request(
        context,
        requests,
        request_id or requests.store.request_for_run(context.run_id),
        table_id=task.table_id,
        kind=task.kind,
        selection=task.payload.model_dump(exclude_none=True),
        budget=None,
    )


def open_request(
    context: OpExecutionContext,
    config: AiRequestConfig,
    store: Store,
    progress: ProgressChannel,
    kind: RequestKind,
) -> AiState:
    """Check what the run asks, adopt (or record) its request, tag the run, announce it."""
    table_id = config.table_id
    if table_id is None and kind in (RequestKind.TABLE_SUGGESTIONS, RequestKind.TABLE_GENERATION):
        table_id = new_id("tbl")  # a run without a request proposes a new table
    try:
        task = check_task(store, kind, table_id, {"context": config.context, "count": config.count})
        request_id = adopt_ai_request(context, RequestRepository(store), config.request_id, task)
    except GlazeError as error:
        message = f"invalid {kind.value} request: {error}"
        if config.request_id is not None:
            reject_request(store, config.request_id, message, progress)
        raise Failure(description=message, allow_retries=False) from None
    tag_run(
        context,
        {queue.TABLE_TAG: task.table_id, queue.REQUEST_TAG: request_id, queue.KIND_TAG: kind.value},
    )
    RequestRepository(store).record_counters(request_id, entities=len(task.steps))
    with progress.publisher() as publisher:
        publisher.publish(
            "started",
            request_id,
            task.table_id,
            kind=kind.value,
            steps=list(task.steps),
            progress=0,
        )
    context.log.info(f"request {request_id}: {kind.value} for table {task.table_id}")
    return AiState(request_id, task, Proposal(), time.time())


@contextmanager
def retried_when_worth_it(last_try: bool) -> Iterator[None]:
    """A retryable AIJobError becomes a plain error, which Dagster retries, unless this is the
    last try: then it fails the request with its own message, like a non-retryable one."""
    try:
        yield
    except AIJobError as error:
        if error.retryable and not last_try:
            raise RetryableLlmError(str(error)) from error
        raise


def readopt(context: OpExecutionContext, state: AiState, store: Store) -> AiState:
    """A later op's state, its request adopted by this run: the same request on a retried
    step, a new one (`retry_of`) on a re-execution of a run whose request ended."""
    try:
        request_id = adopt_ai_request(
            context, RequestRepository(store), state.request_id, state.task
        )
    except GlazeError as error:
        raise Failure(description=str(error), allow_retries=False) from None
    return replace(state, request_id=request_id)


def ai_step(
    context: OpExecutionContext,
    state: AiState,
    step: Step,
    store: Store,
    llm: LanguageModel,
    progress: ProgressChannel,
) -> AiState:
    """Run one step of the request this run adopted; any ending it meets is recorded with the
    truth."""
    requests = RequestRepository(store)
    table_id = state.task.table_id
    request_id = state.request_id
    last_try = context.retry_number >= AI_RETRIES
    with (
        request_closed_on_error(store, request_id, progress, table_id, retryable=not last_try),
        retried_when_worth_it(last_try),
        RequestWatch(requests, request_id) as watch,
    ):
        proposal = run_step(
            store,
            request_id,
            state.task,
            step,
            state.proposal,
            settings=llm.settings(),
            stop=watch,
        )
    done = state.task.steps.index(step) + 1
    context.log.info(f"request {request_id}: {step} proposed ({done}/{len(state.task.steps)})")
    with progress.publisher() as publisher:
        publisher.publish(
            "progress",
            request_id,
            table_id,
            phase=step,
            steps_done=done,
            steps=len(state.task.steps),
            progress=min(99, percent(done, len(state.task.steps))),
        )
    return replace(state, proposal=proposal)


def close_request(
    context: OpExecutionContext, state: AiState, store: Store, progress: ProgressChannel
) -> Output:
    """End the request `succeeded` with its proposal; report usage on the run and to the app."""
    requests = RequestRepository(store)
    with request_closed_on_error(store, state.request_id, progress, state.task.table_id):
        closed = finish_ai(store, state.request_id, state.task, state.proposal)
    request = requests.get(state.request_id)
    if not closed:
        context.log.warning(
            f"request {state.request_id} had already ended {request.status} ({request.error}); "
            "left as it was"
        )
    metadata = run_metadata(store, request, state)
    tag_run(context, {"glaze/outcome": request.status})
    context.log.info(f"request {state.request_id} ended {request.status}")
    with progress.publisher() as publisher:
        publisher.publish(
            "finished",
            state.request_id,
            state.task.table_id,
            status=request.status,
            error=request.error,
            cost=request.cost,
            progress=100,
        )
    return Output(request.status, metadata=metadata)


def run_metadata(store: Store, request: EnrichmentRequest, state: AiState) -> dict[str, Any]:
    """What the Dagster UI shows for the run: tokens, cost, prompts, what was proposed."""
    usage = store.llm_usage(request.id)
    spend = RequestRepository(store).spend(request.id)
    proposal = state.proposal
    return {
        "request_id": request.id,
        "kind": request.kind,
        "status": request.status,
        "table_id": request.table_id,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "llm_calls": usage.calls,
        "cost": spend.cost,
        "model": proposal.model or "",
        "prompt_versions": MetadataValue.json(proposal.prompt_versions),
        "table_proposed": proposal.table.name if proposal.table is not None else "",
        "columns_proposed": len(proposal.columns),
        "rows_proposed": len(proposal.rows),
        "notes": MetadataValue.json(proposal.notes),
        "duration_s": round(time.time() - state.started, 3),
    }


# --- the ops and jobs ----------------------------------------------------------------------

_RETRY = RetryPolicy(max_retries=AI_RETRIES, delay=AI_RETRY_DELAY_S)


def single_step_op(kind: RequestKind) -> OpDefinition:
    """The one op of a single-suggestion job: adopt, propose, close."""
    step = STEPS[kind][0]

    @op(
        name=AI_JOBS[kind][1],
        retry_policy=_RETRY,
        out=Out(str),
        description=f"Ask the LLM for {kind.value.replace('_', ' ')} and record the proposal.",
    )
    def propose(
        context: OpExecutionContext,
        config: AiRequestConfig,
        glaze_db: GlazeDatabase,
        llm: LanguageModel,
        progress: ProgressChannel,
    ) -> Output:
        store = glaze_db.store()
        state = open_request(context, config, store, progress, kind)
        state = ai_step(context, state, step, store, llm, progress)
        return close_request(context, state, store, progress)

    return propose


@op(
    name=AI_JOBS[RequestKind.TABLE_GENERATION][1],
    retry_policy=_RETRY,
    out=Out(AiState),
    description="Table generation, step 1: propose the table (name, description, entity type).",
)
def generate_table(
    context: OpExecutionContext,
    config: AiRequestConfig,
    glaze_db: GlazeDatabase,
    llm: LanguageModel,
    progress: ProgressChannel,
) -> AiState:
    store = glaze_db.store()
    state = open_request(context, config, store, progress, RequestKind.TABLE_GENERATION)
    return ai_step(context, state, "table", store, llm, progress)


@op(
    ins={"state": In(AiState)},
    retry_policy=_RETRY,
    out=Out(AiState),
    description="Table generation, step 2: propose columns for the proposed table.",
)
def generate_columns(
    context: OpExecutionContext,
    state: AiState,
    glaze_db: GlazeDatabase,
    llm: LanguageModel,
    progress: ProgressChannel,
) -> AiState:
    store = glaze_db.store()
    return ai_step(context, readopt(context, state, store), "columns", store, llm, progress)


@op(
    ins={"state": In(AiState)},
    retry_policy=_RETRY,
    out=Out(str),
    description="Table generation, step 3: propose rows for the proposed table and columns; "
    "record the whole proposal.",
)
def generate_rows(
    context: OpExecutionContext,
    state: AiState,
    glaze_db: GlazeDatabase,
    llm: LanguageModel,
    progress: ProgressChannel,
) -> Output:
    store = glaze_db.store()
    state = ai_step(context, readopt(context, state, store), "rows", store, llm, progress)
    return close_request(context, state, store, progress)


def single_step_job(kind: RequestKind, description: str) -> Any:
    propose = single_step_op(kind)

    @graph(name=f"{kind.value}_graph")
    def suggestion() -> None:
        propose()

    return suggestion.to_job(
        name=AI_JOBS[kind][0],
        description=description,
        executor_def=in_process_executor,
        tags={"glaze/kind": kind.value},
    )


@graph
def table_generation_graph() -> None:
    generate_rows(generate_columns(generate_table()))


table_suggestions = single_step_job(
    RequestKind.TABLE_SUGGESTIONS,
    "Propose a table (name, description, what a row is) for a context; nothing is written "
    "until the proposal is accepted.",
)
column_suggestions = single_step_job(
    RequestKind.COLUMN_SUGGESTIONS,
    "Propose columns for a table: identifiers, enrichment fields, AI columns.",
)
row_suggestions = single_step_job(
    RequestKind.ROW_SUGGESTIONS,
    "Propose rows for a table, deduplicated against the rows it has.",
)
table_generation = table_generation_graph.to_job(
    name=AI_JOBS[RequestKind.TABLE_GENERATION][0],
    description="Propose a table, then its columns, then rows: each step is given what the "
    "ones before proposed.",
    executor_def=in_process_executor,
    tags={"glaze/kind": RequestKind.TABLE_GENERATION.value},
)

AI_JOB_DEFS = [table_suggestions, column_suggestions, row_suggestions, table_generation]


# --- in process (the CLI) ------------------------------------------------------------------


def run_ai_in_process(
    database_url: str | None, request_id: str, *, log_level: str = "INFO", debug: bool = False
) -> EnrichmentRequest:
    """Claim a queued AI request and execute its job in this process; the request as it ended.

    A request the sensor or launcher claimed first is refused (it is not run twice); an invalid
    one ends `failed` here with its reason (InputError). A run that fails without closing its
    request (a crash) closes it `failed` with the run's own message.
    """
    # The runner builds the definitions, which import this module: import it lazily.
    from glaze_pipeline.runner import run_in_process

    store = Store(database_url)
    try:
        requests = RequestRepository(store)
        request = requests.get(request_id)
        claimed = requests.claim_one(request_id)
        if claimed is None:
            raise InputError(
                f"request {request_id} is {request.status}, not queued: a sensor or launcher "
                "took it, or it ended (see `glaze ai show`)"
            )
        try:
            config = queue.launch_config(store, claimed)
        except GlazeError as error:
            if requests.reject(request_id, str(error)):
                queue.settle_ended(store, request_id)
            raise
        job_name, run_config = queue.job_run(claimed.kind, config)
        outcome = run_in_process(
            job_name,
            run_config,
            database_url=database_url,
            tags=queue.run_tags(claimed),
            log_level=log_level,
            one_line_log=not debug,
        )
        if outcome.failure is not None:
            queue.close_for_run(
                store,
                request_id,
                RequestStatus.FAILED,
                f"run {outcome.run_id} failed: {outcome.failure}",
            )
        return requests.get(request_id)
    finally:
        store.dispose()
