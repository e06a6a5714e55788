"""AI requests as jobs (seed 003): queue one, run its steps, read its status.

An AI request is a row of `enrichment_requests` like any job (one lifecycle, one repository:
cancel, reconcile and realtime come for free). Its `selection` holds the payload
`{"context", "count"}`, its `table_id` the table it is about (for a new table, an id reserved
at enqueue that accepting creates), `entities` / `entities_done` its steps, and `result` the
proposal, camelCase as seed 003's JobStatus shows it:

    {"table": {...} | null, "columns": [...], "rows": [{"values": {...}}], "notes": [...],
     "promptVersions": {"table": "table_suggestions.v1", ...}, "model": ..., "usage": {...}}

Kinds and their steps: `table_suggestions` (table), `column_suggestions` (columns),
`row_suggestions` (rows) and `table_generation` (table, then columns, then rows), each step
told what the steps before it proposed. Nothing here writes a table: `core.ai.accept` does,
when a person accepts the proposal.

Every LLM attempt is journalled in the request's spend ledger (provider "llm") before it leaves
the machine, refused once the request ended or a cancel was asked, settled and written to
`llm_calls` when it ends. A cancel interrupts a call in flight: the step's asyncio task is
cancelled from the request's watch, within a heartbeat.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from glaze_pipeline.core.ai.client import LlmCall, LlmClient, LlmSettings
from glaze_pipeline.core.ai.columns import MAX_TEMPLATE, template_entity_type
from glaze_pipeline.core.ai.structured import AnswerUsage
from glaze_pipeline.core.ai.suggestions import (
    KEY_PATTERN,
    MAX_LABEL,
    ColumnProposal,
    Suggestion,
    TableSpec,
    check_context,
    check_count,
    existing_column,
    row_columns,
    row_identifiers,
    suggest_columns,
    suggest_rows,
    suggest_table,
)
from glaze_pipeline.core.engine import JobCancelled
from glaze_pipeline.core.errors import InputError, InvalidSelectionError, UnknownTableError
from glaze_pipeline.core.fields import column_field
from glaze_pipeline.core.limits import MAX_ID, MAX_IDEMPOTENCY_KEY, check_text
from glaze_pipeline.core.models import (
    AI_REQUEST_KINDS,
    RequestKind,
    RequestStatus,
)
from glaze_pipeline.core.progress import percent
from glaze_pipeline.core.requests import RequestRepository, SpendDelta
from glaze_pipeline.core.schema import EnrichmentRequest
from glaze_pipeline.core.status import SEED_JOB_STATUS
from glaze_pipeline.core.store import Store, new_id

T = TypeVar("T")

LLM_PROVIDER = "llm"  # the spend ledger's provider for every LLM call
DEFAULT_GENERATION_ROWS = 10

Step = Literal["table", "columns", "rows"]
STEPS: dict[RequestKind, tuple[Step, ...]] = {
    RequestKind.TABLE_SUGGESTIONS: ("table",),
    RequestKind.COLUMN_SUGGESTIONS: ("columns",),
    RequestKind.ROW_SUGGESTIONS: ("rows",),
    RequestKind.TABLE_GENERATION: ("table", "columns", "rows"),
}
# Each kind's Dagster job and the op that takes the run config (defs/ai_jobs.py defines them).
AI_JOBS: dict[RequestKind, tuple[str, str]] = {
    RequestKind.TABLE_SUGGESTIONS: ("table_suggestions", "propose_table"),
    RequestKind.COLUMN_SUGGESTIONS: ("column_suggestions", "propose_columns"),
    RequestKind.ROW_SUGGESTIONS: ("row_suggestions", "propose_rows"),
    RequestKind.TABLE_GENERATION: ("table_generation", "generate_table"),
}
# The kinds that work on a table that must exist; the others may propose a new one.
NEEDS_TABLE = frozenset({RequestKind.COLUMN_SUGGESTIONS, RequestKind.ROW_SUGGESTIONS})
# Seed 003's JobStatus.status for each request status: seed 001's words, except that its AI
# jobs have no "cancelled" (a cancelled request is "failed", with `state: cancelled`).
SEED_STATUS = {**SEED_JOB_STATUS, RequestStatus.CANCELLED: "failed"}


# --- the payload ---------------------------------------------------------------------------


class AiPayload(BaseModel):
    """What an AI request asks, as stored in its `selection`: checked at enqueue, at claim and
    when its job starts (the app may write a request directly)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    context: str
    count: int | None = None

    @field_validator("context", mode="before")
    @classmethod
    def _context(cls, value: Any) -> str:
        return check_context(value)

    @field_validator("count", mode="before")
    @classmethod
    def _count(cls, value: Any) -> int | None:
        return None if value is None else check_count(value)


@dataclass(frozen=True)
class AiTask:
    """A validated AI request: its kind, its table, its payload."""

    kind: RequestKind
    table_id: str
    payload: AiPayload
    table_exists: bool

    @property
    def steps(self) -> tuple[Step, ...]:
        return STEPS[self.kind]

    def op_config(self, request_id: str | None = None) -> dict[str, Any]:
        """The run config of the job's first op (see defs/ai_jobs.AiRequestConfig)."""
        config: dict[str, Any] = {"table_id": self.table_id, "context": self.payload.context}
        if self.payload.count is not None:
            config["count"] = self.payload.count
        if request_id is not None:
            config["request_id"] = request_id
        return config


def ai_kind(kind: RequestKind | str) -> RequestKind:
    """`kind` as an AI request kind, else InvalidSelectionError naming the AI kinds."""
    try:
        checked = RequestKind(kind)
    except ValueError:
        checked = None
    if checked is None or checked not in AI_REQUEST_KINDS:
        names = ", ".join(sorted(k.value for k in AI_REQUEST_KINDS))
        raise InvalidSelectionError(f"{kind!r} is not an AI request kind: use one of {names}")
    return checked


def check_task(
    store: Store, kind: RequestKind | str, table_id: str | None, selection: Any
) -> AiTask:
    """An AI request checked as a whole: its kind, its payload, its table (which must exist for
    column and row suggestions); GlazeError naming the first problem."""
    kind = ai_kind(kind)
    if not isinstance(selection, Mapping):
        raise InvalidSelectionError(
            f"invalid AI payload: expected an object with a context, got {type(selection).__name__}"
        )
    try:
        payload = AiPayload.model_validate(dict(selection))
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in error.errors()
        )
        raise InvalidSelectionError(f"invalid AI payload: {problems}") from None
    if kind is RequestKind.ROW_SUGGESTIONS and payload.count is None:
        raise InvalidSelectionError("row_suggestions needs a count (how many rows to propose)")
    if kind is RequestKind.TABLE_GENERATION and payload.count is None:
        payload = payload.model_copy(update={"count": DEFAULT_GENERATION_ROWS})
    if kind in (RequestKind.TABLE_SUGGESTIONS, RequestKind.COLUMN_SUGGESTIONS) and (
        payload.count is not None
    ):
        raise InvalidSelectionError(
            f"{kind.value} takes no count: only row_suggestions and table_generation propose rows"
        )
    if table_id is None:
        raise InputError(f"{kind.value} needs a table id")
    check_text("table id", table_id, MAX_ID)
    try:
        store.get_table(table_id)
    except UnknownTableError:
        if kind in NEEDS_TABLE:
            raise
        return AiTask(kind, table_id, payload, table_exists=False)
    return AiTask(kind, table_id, payload, table_exists=True)


# --- queueing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AiEnqueued:
    request_id: str
    table_id: str  # the table it is about: for a new table, the id accepting will create


def enqueue_ai(
    store: Store,
    kind: RequestKind,
    context: str,
    *,
    table_id: str | None = None,
    count: int | None = None,
    idempotency_key: str | None = None,
) -> AiEnqueued:
    """Queue an AI request, checked at once (nothing is queued when it is invalid).

    Column and row suggestions need an existing table (UnknownTableError); row suggestions a
    count; table generation proposes 10 rows unless told. Without `table_id`, table suggestions
    and generation reserve the id of the table accepting will create: derived from the
    idempotency key when one is given, so the same key names the same request.
    """
    kind = ai_kind(kind)
    check_text("idempotency key", idempotency_key, MAX_IDEMPOTENCY_KEY, required=False)
    named = table_id is not None
    if table_id is None:
        if kind in NEEDS_TABLE:
            raise InputError(f"{kind.value} needs the id of the table to suggest for")
        table_id = _reserved_table_id(kind, idempotency_key)
    task = check_task(store, kind, table_id, {"context": context, "count": count})
    if named and not task.table_exists:  # a table named by the caller must exist
        raise UnknownTableError(f"unknown table {table_id!r}")
    requests = RequestRepository(store)
    request_id = requests.enqueue(
        task.table_id,
        task.payload.model_dump(exclude_none=True),
        kind=kind,
        idempotency_key=idempotency_key,
    )
    if idempotency_key is not None and (existing := requests.get(request_id)).kind != kind:
        raise InputError(
            f"idempotency key {idempotency_key!r} was used for {existing.kind} request "
            f"{request_id} on table {task.table_id}: use another key"
        )
    return AiEnqueued(request_id, task.table_id)


def retry_ai(store: Store, request_id: str) -> AiEnqueued:
    """Seed 003's retryJob: a new request asking what a failed or cancelled AI request asked
    (same kind, payload and table, the new table's reserved id included), pointing at it
    (`retry_of`). A request that succeeded, or has not ended, is not retried."""
    request = store.get_request(request_id)
    kind = RequestKind(request.kind)
    if kind not in AI_REQUEST_KINDS:
        raise InputError(f"request {request_id} is an {kind.value} request, not an AI request")
    state = RequestStatus(request.status)
    if state not in (RequestStatus.FAILED, RequestStatus.CANCELLED):
        raise InputError(
            f"request {request_id} is {state.value}: only a failed or cancelled AI request is "
            "retried"
        )
    task = check_task(store, kind, request.table_id, request.selection)
    retried = RequestRepository(store).enqueue(
        task.table_id,
        task.payload.model_dump(exclude_none=True),
        kind=kind,
        retry_of=request.id,
    )
    return AiEnqueued(retried, task.table_id)


def _reserved_table_id(kind: RequestKind, idempotency_key: str | None) -> str:
    if idempotency_key is None:
        return new_id("tbl")
    digest = hashlib.sha256(f"ai:{kind.value}:{idempotency_key}".encode()).hexdigest()
    return f"tbl_{digest[:16]}"


# --- status --------------------------------------------------------------------------------


def ai_status(request: EnrichmentRequest) -> dict[str, Any]:
    """Seed 003's JobStatus of an AI request, plus `state` (the request's own status), `kind`,
    `tableId` and `cost` (credits, from its spend ledger once it ended)."""
    state = RequestStatus(request.status)
    status = SEED_STATUS[state]
    error = request.error
    if state is RequestStatus.CANCELLED:
        error = error if error and "cancel" in error.lower() else f"cancelled: {error or ''}"
    if status == "completed":
        progress = 100
    elif status == "pending":
        progress = 0
    else:  # running, or how far a failed one got
        progress = min(99, percent(request.entities_done, request.entities or 1))
    result = request.result if isinstance(request.result, dict) else None
    cost = request.cost
    if not cost and result is not None and isinstance(result.get("usage"), dict):
        cost = float(result["usage"].get("cost") or 0.0)
    return {
        "id": request.id,
        "kind": request.kind,
        "status": status,
        "state": state.value,
        "progress": progress,
        "result": result,
        "error": error,
        "startedAt": request.started_at,
        "completedAt": request.finished_at,
        "tableId": request.table_id,
        "cost": round(cost or 0.0, 6),
        "retryOf": request.retry_of,
    }


# --- the proposal --------------------------------------------------------------------------


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ProposedTable(_Camel):
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    entity_type: Literal["company", "person"]


class ProposedColumn(_Camel):
    key: str = Field(pattern=KEY_PATTERN)
    label: str = Field(min_length=1, max_length=MAX_LABEL)
    data_type: Literal["text", "number", "url", "email", "boolean"] = "text"
    role: Literal["identifier", "enrichment", "ai"]
    field: str | None = Field(default=None, max_length=60)
    prompt: str | None = Field(default=None, max_length=MAX_TEMPLATE)

    @classmethod
    def of(cls, column: ColumnProposal) -> ProposedColumn:
        return cls(
            key=column.key,
            label=column.label,
            data_type=column.data_type,
            role=column.role,
            field=column.field,
            prompt=column.prompt,
        )

    def spec(self) -> ColumnProposal:
        return ColumnProposal.model_construct(**self.model_dump())


class ProposedRow(_Camel):
    values: dict[str, str]


class Usage(_Camel):
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    def plus(self, used: AnswerUsage) -> Usage:
        return Usage(
            calls=self.calls + used.calls,
            prompt_tokens=self.prompt_tokens + used.prompt_tokens,
            completion_tokens=self.completion_tokens + used.completion_tokens,
            cost=round(self.cost + used.cost, 6),
        )


class Proposal(_Camel):
    """What an AI request proposes so far; `as_json()` is the request's `result`."""

    table: ProposedTable | None = None
    columns: list[ProposedColumn] = Field(default_factory=list)
    rows: list[ProposedRow] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    prompt_versions: dict[str, str] = Field(default_factory=dict)
    model: str | None = None
    usage: Usage = Field(default_factory=Usage)

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def answered(self, step: Step, suggestion: Suggestion[Any], **changes: Any) -> Proposal:
        """This proposal with one step's answer: its value (`changes`), notes and usage."""
        return self.model_copy(
            update={
                **changes,
                "notes": [*self.notes, *(f"{step}: {note}" for note in suggestion.notes)],
                "prompt_versions": {**self.prompt_versions, step: suggestion.usage.prompt_version},
                "model": suggestion.usage.model or self.model,
                "usage": self.usage.plus(suggestion.usage),
            }
        )


# --- running the steps ---------------------------------------------------------------------


class StopSignal(Protocol):
    """Tells a step to stop (a cancel, the request closed under it): see engine.RequestWatch."""

    stop_reason: str | None

    def on_stop(self, callback: Callable[[str], None]) -> None: ...


class LlmLedger:
    """One request's LLM attempts: each is journalled in the spend ledger before it leaves the
    machine (refused once the request ended or a cancel was asked: the call is then never
    sent), then settled and written to `llm_calls` as soon as it ends."""

    def __init__(self, store: Store, request_id: str) -> None:
        self.store = store
        self.request_id = request_id
        self.requests = RequestRepository(store)

    def journal(self) -> None:
        """Before an attempt leaves: JobCancelled when the request takes no new calls."""
        if not self.requests.record_spend(self.request_id, {LLM_PROVIDER: SpendDelta(calls=1)}):
            raise JobCancelled(
                f"request {self.request_id}: no LLM call sent, the request ended or was cancelled"
            )

    def record(self, call: LlmCall) -> None:
        """When an attempt ended (the client's `on_call`)."""
        self.store.record_llm_calls(self.request_id, [call])
        self.requests.record_spend(
            self.request_id,
            {
                LLM_PROVIDER: SpendDelta(
                    settled=1, charged=int(call.outcome == "ok"), cost=call.cost
                )
            },
        )

    def client(
        self, settings: LlmSettings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> LlmClient:
        """An LlmClient whose every attempt goes through this ledger (one step's client)."""
        return LlmClient(
            settings,
            on_call=self.record,
            transport=_JournalledTransport(self, transport or httpx.AsyncHTTPTransport()),
        )


class _JournalledTransport(httpx.AsyncBaseTransport):
    def __init__(self, ledger: LlmLedger, inner: httpx.AsyncBaseTransport) -> None:
        self.ledger = ledger
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.ledger.journal()
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def until_stopped(work: Callable[[], Awaitable[T]], stop: StopSignal, request_id: str) -> T:
    """Run `work` in its own event loop; a stop cancels it at once, even mid-call (its HTTP
    request is abandoned), and raises JobCancelled with the stop's reason."""

    async def main() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        running = [True]

        def interrupt(_reason: str) -> None:
            if running[0] and task is not None:
                # RuntimeError: the loop closed meanwhile, so the work is over anyway.
                with suppress(RuntimeError):
                    loop.call_soon_threadsafe(task.cancel)

        stop.on_stop(interrupt)
        try:
            return await work()
        except asyncio.CancelledError:
            if stop.stop_reason is None:
                raise
            raise JobCancelled(f"request {request_id}: {stop.stop_reason}") from None
        finally:
            running[0] = False

    if stop.stop_reason is not None:
        raise JobCancelled(f"request {request_id}: {stop.stop_reason}")
    return asyncio.run(main())


def run_step(
    store: Store,
    request_id: str,
    task: AiTask,
    step: Step,
    proposal: Proposal,
    *,
    settings: LlmSettings,
    stop: StopSignal,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Proposal:
    """One step of a running AI request, told what the steps before proposed (`proposal`).

    Records the proposal so far and the steps done on the request; raises AIJobError (the
    LLM failed: see its `retryable`), JobCancelled, or another GlazeError. The step's LLM client
    is its own (one event loop per step) and goes through the request's ledger.
    """
    ledger = LlmLedger(store, request_id)

    async def work() -> Proposal:
        async with ledger.client(settings, transport=transport) as client:
            return await _STEP_WORK[step](client, store, task, proposal)

    answered = until_stopped(work, stop, request_id)
    if stop.stop_reason is not None:  # the cancel came as the answer did: the step is void
        raise JobCancelled(f"request {request_id}: {stop.stop_reason}")
    requests = RequestRepository(store)
    requests.record_result(request_id, answered.as_json())
    requests.record_counters(
        request_id, entities=len(task.steps), entities_done=task.steps.index(step) + 1
    )
    return answered


def run_ai(
    store: Store,
    request_id: str,
    *,
    settings: LlmSettings,
    stop: StopSignal,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Proposal:
    """Every step of a running AI request, then its ending: `succeeded` with the proposal.

    The work of each kind as one plain function (the jobs run the same steps as ops)."""
    request = store.get_request(request_id)
    task = check_task(store, request.kind, request.table_id, request.selection)
    proposal = Proposal()
    for step in task.steps:
        proposal = run_step(
            store,
            request_id,
            task,
            step,
            proposal,
            settings=settings,
            stop=stop,
            transport=transport,
        )
    finish_ai(store, request_id, task, proposal)
    return proposal


def finish_ai(store: Store, request_id: str, task: AiTask, proposal: Proposal) -> bool:
    """End a running AI request `succeeded` with its proposal; False when it had ended."""
    return RequestRepository(store).finish(
        request_id,
        RequestStatus.SUCCEEDED,
        counters={
            "result": proposal.as_json(),
            "entities": len(task.steps),
            "entities_done": len(task.steps),
        },
    )


async def _table_step(
    client: LlmClient, store: Store, task: AiTask, proposal: Proposal
) -> Proposal:
    existing = table_spec(store, task.table_id) if task.table_exists else None
    suggestion = await suggest_table(client, task.payload.context, table=existing)
    table = suggestion.value
    return proposal.answered(
        "table",
        suggestion,
        table=ProposedTable(
            name=table.name, description=table.description, entity_type=table.entity_type
        ),
    )


async def _columns_step(
    client: LlmClient, store: Store, task: AiTask, proposal: Proposal
) -> Proposal:
    table = _table_so_far(store, task, proposal, with_identifiers=False)
    suggestion = await suggest_columns(client, task.payload.context, table=table)
    return proposal.answered(
        "columns",
        suggestion,
        columns=[*proposal.columns, *(ProposedColumn.of(c) for c in suggestion.value)],
    )


async def _rows_step(client: LlmClient, store: Store, task: AiTask, proposal: Proposal) -> Proposal:
    table = _table_so_far(store, task, proposal, with_identifiers=True)
    # Rows carry identifier values only: a table with no identifier column gets the default
    # ones, proposed with the rows so that accepting has somewhere to put them.
    identifiers, _ = row_columns(table)
    present = {column.key for column in table.columns}
    added = [ProposedColumn.of(c) for c in identifiers if c.key not in present]
    count = task.payload.count or DEFAULT_GENERATION_ROWS
    suggestion = await suggest_rows(client, task.payload.context, table=table, count=count)
    notes = (
        [f"rows: identifier columns added for the rows: {', '.join(c.key for c in added)}"]
        if added
        else []
    )
    answered = proposal.answered(
        "rows",
        suggestion,
        columns=[*proposal.columns, *added],
        rows=[ProposedRow(values=row.values) for row in suggestion.value],
    )
    return answered.model_copy(update={"notes": [*answered.notes, *notes]})


_STEP_WORK: dict[Step, Callable[[LlmClient, Store, AiTask, Proposal], Awaitable[Proposal]]] = {
    "table": _table_step,
    "columns": _columns_step,
    "rows": _rows_step,
}


def _table_so_far(
    store: Store, task: AiTask, proposal: Proposal, *, with_identifiers: bool
) -> TableSpec:
    """The table a step works on: the existing one (its columns, and for rows the entities
    its rows have), renamed and extended by what the steps before proposed."""
    existing = (
        table_spec(store, task.table_id, with_identifiers=with_identifiers)
        if task.table_exists
        else None
    )
    proposed = proposal.table
    if existing is None and proposed is None:
        raise InputError(f"table {task.table_id} does not exist and no table was proposed")
    columns = (*(existing.columns if existing else ()), *(c.spec() for c in proposal.columns))
    if existing is None:
        assert proposed is not None
        return TableSpec(proposed.name, proposed.description, proposed.entity_type, columns)
    return TableSpec(
        proposed.name if proposed else existing.name,
        proposed.description if proposed else existing.description,
        existing.entity_type,
        columns,
        existing.known_identifiers,
    )


# --- existing tables -----------------------------------------------------------------------


def table_context(store: Store, table_id: str) -> str:
    """A table's own name and description: what column and row suggestions are for when the
    caller gives no context (UnknownTableError for an unknown table)."""
    record = store.table_records(table_id=table_id)[0][0]
    return f"{record.name}: {record.description}" if record.description else record.name


def table_spec(store: Store, table_id: str, *, with_identifiers: bool = False) -> TableSpec:
    """An existing table as suggestions see it: its columns (each with the field it means),
    its entity type (person when a column is about a person), and with `with_identifiers` the
    entities its rows already have (EntityKey ids, for deduplication)."""
    info = store.get_table(table_id)
    record = store.table_records(table_id=table_id)[0][0]
    columns = tuple(
        existing_column(
            column.key, column.label, column_meaning(column.key, column.field), column.prompt
        )
        for column in info.columns
    )
    entity_type = entity_type_of(columns)
    spec = TableSpec(info.name, record.description, entity_type, columns)
    if not with_identifiers:
        return spec
    identifiers, _ = row_columns(spec)
    known: set[str] = set()
    for page in store.iter_row_pages(table_id, with_meta=False):
        for row in page:
            known |= row_identifiers(row.data, identifiers)
    return TableSpec(spec.name, spec.description, entity_type, columns, frozenset(known))


def column_meaning(key: str, field: str | None) -> str | None:
    """The catalogue field a column means (explicit, else inferred from its key), if any."""
    try:
        ref = column_field(key, field)
    except InputError:
        return None
    return str(ref) if ref is not None else None


def entity_type_of(columns: Sequence[ColumnProposal]) -> str:
    """A table is about people when one of its columns is (a person field or question)."""
    for column in columns:
        if column.field and column.field.startswith("person."):
            return "person"
        if column.prompt:
            try:
                if template_entity_type(column.prompt).value == "person":
                    return "person"
            except InputError:
                continue
    return "company"


__all__ = [
    "AI_JOBS",
    "LLM_PROVIDER",
    "STEPS",
    "AiEnqueued",
    "AiPayload",
    "AiTask",
    "LlmLedger",
    "Proposal",
    "ProposedColumn",
    "ProposedRow",
    "ProposedTable",
    "StopSignal",
    "ai_kind",
    "ai_status",
    "check_task",
    "enqueue_ai",
    "finish_ai",
    "run_ai",
    "run_step",
    "table_spec",
    "until_stopped",
]
