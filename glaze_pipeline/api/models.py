"""The API's JSON, as seed 001/002's TypeScript app sends and reads it: camelCase on the wire.

Bodies are strict (`extra="forbid"`): a misspelt field is a 422 naming it, not a silently
ignored option. Response models are the OpenAPI schema the app (and schemathesis) work from.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from glaze_pipeline.core.limits import MAX_BUDGET, MAX_IDEMPOTENCY_KEY

T = TypeVar("T")


def _utc(moment: datetime) -> str:
    """ISO 8601 in UTC with its offset: SQLite hands back naive times (stored as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


Timestamp = Annotated[datetime, PlainSerializer(_utc, return_type=str)]

JobPhase = Literal["queued", "enriching", "writing", "done"]
SeedStatus = Literal["pending", "running", "completed", "failed", "cancelled"]


def plain_text(text: str) -> str:
    """Text both databases can store: no NUL (Postgres' text and JSONB refuse it) and no lone
    surrogate (not UTF-8: it could not even be written into an answer)."""
    if "\x00" in text:
        raise ValueError("contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(plain_text)]


def storable(value: Any) -> Any:
    """A cell value as JSON can carry it and a cell can hold it: plain text everywhere (keys
    too) and finite numbers (Python's JSON reads NaN, Infinity and 1e400; no database does)."""
    if isinstance(value, str):
        return plain_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number (not NaN or Infinity)")
    if isinstance(value, list):
        return [storable(item) for item in value]
    if isinstance(value, dict):
        return {plain_text(key): storable(item) for key, item in value.items()}
    return value


MAX_SELECTED = 100_000  # ids in one request body: a bigger selection is a whole-table job


class Camel(BaseModel):
    # from_attributes: a store record (a dataclass of the same field names) validates as is.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)


class CamelIn(Camel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Page(Camel, Generic[T]):
    items: list[T]
    page: int
    limit: int
    total: int


class CellId(CamelIn):
    row_id: Text = Field(min_length=1, max_length=40)
    column_id: Text = Field(min_length=1, max_length=40)


class EnrichBody(CamelIn):
    """Which cells (seed 001's grid or explicit mode, or the whole table) and on what terms."""

    column_ids: list[Text] = Field(default_factory=list, max_length=1000)
    row_ids: list[Text] = Field(default_factory=list, max_length=MAX_SELECTED)
    cell_ids: list[CellId] = Field(default_factory=list, max_length=MAX_SELECTED)
    whole_table: bool = False
    budget: float | None = Field(default=None, ge=0, le=MAX_BUDGET, allow_inf_nan=False)
    idempotency_key: Text | None = Field(default=None, min_length=1, max_length=MAX_IDEMPOTENCY_KEY)
    overwrite: bool = False

    @model_validator(mode="after")
    def _one_shape(self) -> EnrichBody:
        shapes = [bool(self.column_ids), bool(self.cell_ids), self.whole_table]
        if sum(shapes) != 1:
            raise ValueError(
                "give exactly one of: columnIds (with optional rowIds), cellIds, or "
                "wholeTable: true"
            )
        if self.row_ids and not self.column_ids:
            raise ValueError("rowIds needs columnIds (grid mode)")
        if self.overwrite and self.whole_table:
            raise ValueError("overwrite needs columnIds or cellIds: wholeTable fills empty cells")
        return self

    def selection(self) -> dict[str, Any]:
        """The engine's selection (`core.models.Selection`'s fields)."""
        if self.whole_table:
            return {"whole_table": True}
        if self.cell_ids:
            chosen: dict[str, Any] = {
                "cells": [{"row_id": c.row_id, "column_id": c.column_id} for c in self.cell_ids]
            }
        else:
            chosen = {"column_ids": list(self.column_ids), "row_ids": list(self.row_ids)}
        if self.overwrite:
            chosen["overwrite"] = True
        return chosen


class EnrichResponse(Camel):
    job_id: str
    table_id: str
    status: SeedStatus
    total_tasks: int
    message: str
    run_id: str | None = None
    public_access_token: str
    token_expires_at: Timestamp


class JobToken(Camel):
    job_id: str
    public_access_token: str
    token_expires_at: Timestamp


class KeyKindBasis(Camel):
    """What the expectation assumed of one provider asked by one kind of key."""

    found_share: float = Field(description="Share of lookups expected to find the entity.")
    charged_share: float = Field(description="Share of lookups expected to be charged.")
    lookups: int = Field(
        default=0, description="Past lookups the shares come from (0: the stated prior alone)."
    )
    basis: str = Field(
        default="",
        description='Where the shares come from, e.g. "from 2,300 lookups since 2025-01-31" '
        'or "prior, no history yet: ...".',
    )


class ProviderEstimate(Camel):
    """One provider in an estimate: its verdict, and its expected and upper-bound figures."""

    entity_type: str = ""
    status: Literal["ok", "unavailable"] = Field(
        default="ok",
        description="The preflight's verdict: an `unavailable` provider is never called; the "
        "cells only it could fill are skipped.",
    )
    reason: str | None = Field(default=None, description="Why it is unavailable.")
    expected_calls: float = Field(default=0.0, description="Expected lookups (a mean).")
    expected_cost: float = Field(default=0.0, description="Expected spend (a mean).")
    max_calls: int = Field(
        default=0, description="Upper bound: every lookup it could be asked, each a miss."
    )
    max_cost: float = Field(default=0.0, description="Upper bound: `maxCalls`, every one charged.")
    reach: float = Field(
        default=0.0,
        description="How far the waterfall is expected to go: expected lookups per entity of "
        "its type.",
    )
    by_key_kind: dict[str, KeyKindBasis] = Field(
        default_factory=dict, description="The shares the expectation used, by kind of key."
    )


class BudgetPoint(Camel):
    budget: float = Field(description="A budget to set (rounded up).")
    share_of_fillable: float = Field(description="The share of the expected cells it fills.")
    cells_filled: int


class AtBudget(Camel):
    """What the job's own budget is expected to buy."""

    budget: float
    cells_filled: int
    share_of_fillable: float
    expected_cost: float


class BudgetGuidance(Camel):
    points: list[BudgetPoint] = Field(
        default_factory=list,
        description="Which budget fills which share (50, 80, 90, 100 %) of the cells the job "
        "is expected to fill, spending entity after entity in the job's order.",
    )
    expected_cells_filled: int = 0
    at_budget: AtBudget | None = Field(
        default=None, description="With a budget on the job: what that budget is expected to fill."
    )


class Estimate(Camel):
    """What a job would buy, buying nothing: an expectation and an upper bound.

    `expected*` figures are means, from each provider's observed shares (found, charged, fields
    filled) or a stated prior; `max*` figures assume every lookup misses and is charged, so no
    run spends more. Estimates stored before expected costs existed have only the entity, cell
    and cache counts and `expectedProviderCalls` / `expectedCostByProvider` / `expectedCost`
    (what they then computed); every newer figure reads as its default (`maxCost` null).
    """

    unique_entities: int = 0
    cells: int = 0
    cells_without_identifier: int = 0
    cache_hits: int = Field(default=0, description="Lookups the cache answers (free).")
    expected_cost: float = Field(default=0.0, description="Expected spend (a mean).")
    expected_cost_sd: float | None = Field(
        default=None,
        description="Standard deviation of the spend around `expectedCost`: chance in which "
        "entities each vendor knows, plus the uncertainty of shares learnt from a short history.",
    )
    expected_cost_range: list[float] | None = Field(
        default=None,
        description="[low, high]: about 95 % of runs spend within it (two standard deviations, "
        "never above `maxCost`).",
    )
    max_cost: float | None = Field(
        default=None,
        description="Upper bound on the spend: every uncached lookup charged (null for an "
        "estimate made before it was computed). A budget caps the spend as well.",
    )
    budget: float | None = Field(default=None, description="The budget the job would run with.")
    expected_cells_filled: int | None = Field(
        default=None, description="Cells expected to end with a value."
    )
    cells_provider_unavailable: int = Field(
        default=0,
        description="Cells expected to be skipped: only an unavailable provider had them.",
    )
    expected_provider_calls: dict[str, float] = Field(
        default_factory=dict, description="Expected lookups by provider (means, not whole calls)."
    )
    expected_cost_by_provider: dict[str, float] = Field(default_factory=dict)
    max_provider_calls: dict[str, int] = Field(
        default_factory=dict, description="Upper bound on lookups by provider."
    )
    max_cost_by_provider: dict[str, float] = Field(
        default_factory=dict, description="Upper bound on spend by provider."
    )
    providers: dict[str, ProviderEstimate] = Field(
        default_factory=dict,
        description="Per provider: verdict, expected and upper-bound calls and cost, and the "
        "basis of the expectation.",
    )
    unavailable_providers: dict[str, str] = Field(
        default_factory=dict, description="Providers the preflight found unusable: name to reason."
    )
    budget_guidance: BudgetGuidance | None = None
    guidance: str | None = Field(
        default=None,
        description='One sentence, e.g. "budget 1,100 fills ~50 %, ... and 2,200 all of the '
        '~1,175 cells this job is expected to fill".',
    )


class JobOut(Camel):
    """One job (one enrichment request): seed 001's job view plus the engine's detail."""

    job_id: str
    table_id: str
    kind: str
    status: SeedStatus
    state: str = Field(
        description="The engine's status: queued, launched, running, succeeded, "
        "partial, failed or cancelled (see the README for the mapping)."
    )
    cancel_requested: bool
    phase: JobPhase
    progress: int = Field(ge=0, le=100)
    total_tasks: int
    done_tasks: int
    not_found_tasks: int
    failed_tasks: int
    skipped_tasks: int
    entities: int
    entities_done: int
    cache_hits: int
    rows_total: int
    rows_written: int
    cost: float
    budget: float | None
    cost_by_provider: dict[str, float]
    provider_calls: dict[str, int] = Field(
        description="Lookups that left the machine, by provider (what a vendor can bill)."
    )
    calls_not_sent: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="Lookups attempted but never sent, by provider and reason (provider "
        "unavailable, budget, refused): not in `providerCalls`, never charged.",
    )
    unavailable_providers: dict[str, str] = Field(
        default_factory=dict,
        description="Providers the preflight found unusable when the job started: name to "
        "reason. They were not called; the cells only they could fill are skipped.",
    )
    run_id: str | None
    created_at: Timestamp | None
    started_at: Timestamp | None
    completed_at: Timestamp | None
    error: str | None
    estimate: Estimate | None = None
    # seed 002's names for the entity-first view
    entity_count: int
    processed_count: int
    public_access_token: str | None = None
    token_expires_at: Timestamp | None = None


class TaskOut(Camel):
    """One cell of a job, read from its row's `meta` (there is no per-cell task table)."""

    row_id: str
    column_id: str
    column_key: str
    status: str
    value: Any = None
    confidence: float | None = None
    source: str | None = None
    error: str | None = None
    fetched_at: str | None = None


class ColumnOut(Camel):
    id: str
    key: str
    label: str
    data_type: str
    field: str | None = Field(description="The catalogue field the column means, if any.")
    position: int
    prompt: str | None = Field(
        default=None, description="An AI column's question (its cells are filled by the LLM)."
    )


class TableSummary(Camel):
    id: str
    name: str
    description: str | None
    row_count: int
    created_at: Timestamp | None


class TableOut(TableSummary):
    columns: list[ColumnOut]


class RowOut(Camel):
    id: str
    position: int
    data: dict[str, Any]
    meta: dict[str, Any]
    status: str
    confidence: float | None
    error: str | None
    last_run_at: Timestamp | None


class ColumnBody(CamelIn):
    key: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
    label: Text | None = Field(default=None, min_length=1, max_length=200)
    data_type: Literal["text", "number", "url", "email", "json"] = "text"
    field: Text | None = Field(default=None, min_length=1, max_length=60)
    prompt: Text | None = Field(
        default=None,
        min_length=1,
        max_length=2000,
        description="An AI column: a question over the entity's identifiers, e.g. "
        "'Does {company} sell to enterprises? Answer yes or no.'",
    )


class CellBody(CamelIn):
    value: Any = Field(description="The new value (null empties the cell).")

    @field_validator("value")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        return storable(value)


class ErrorOut(BaseModel):
    """Every refusal: one sentence naming the problem (422s from validation list the fields)."""

    detail: str | list[dict[str, Any]]


class Health(Camel):
    status: Literal["ok"]


# -- AI workflows (seed 003) -------------------------------------------------------------------

AiStatus = Literal["pending", "running", "completed", "failed"]


class AiGenerateBody(CamelIn):
    """Seed 003's `POST /api/ai`: the table-generation workflow (table, columns, rows)."""

    context: Text = Field(min_length=1, max_length=20_000)
    table_id: Text | None = Field(default=None, min_length=1, max_length=40)
    rows: int = Field(default=10, ge=1, le=200, description="How many rows to propose.")
    idempotency_key: Text | None = Field(default=None, min_length=1, max_length=MAX_IDEMPOTENCY_KEY)


class AiTableBody(CamelIn):
    context: Text = Field(min_length=1, max_length=20_000)
    idempotency_key: Text | None = Field(default=None, min_length=1, max_length=MAX_IDEMPOTENCY_KEY)


class AiColumnsBody(CamelIn):
    table_id: Text = Field(min_length=1, max_length=40)
    context: Text | None = Field(
        default=None, min_length=1, max_length=20_000, description="Default: the table's own."
    )
    idempotency_key: Text | None = Field(default=None, min_length=1, max_length=MAX_IDEMPOTENCY_KEY)


class AiRowsBody(AiColumnsBody):
    count: int = Field(ge=1, le=200, description="How many rows to propose.")


class AiJobQueued(Camel):
    job_id: str
    table_id: str
    kind: str
    status: AiStatus
    public_access_token: str
    token_expires_at: Timestamp


class AiJobOut(Camel):
    """Seed 003's JobStatus, plus what the engine knows (`state`, `kind`, `tableId`, `cost`)."""

    id: str
    kind: str
    status: AiStatus
    state: str
    progress: int = Field(ge=0, le=100)
    result: dict[str, Any] | None = None
    error: str | None = None
    table_id: str
    cost: float = 0.0
    retry_of: str | None = Field(default=None, description="The job this one retries.")
    started_at: Timestamp | None = None
    completed_at: Timestamp | None = None


class AiAcceptBody(CamelIn):
    rows: bool = Field(default=True, description="false: columns only.")


class AiAccepted(Camel):
    table_id: str
    created: bool
    columns_added: list[str]
    rows_added: int
    rows_duplicate: int
    notes: list[str] = Field(default_factory=list, description="What was left out, and why.")
