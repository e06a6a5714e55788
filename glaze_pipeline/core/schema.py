"""The app database: tables, columns, rows (seed 001), the entity cache and the request/job record.

Row `data` and `meta` are JSON (JSONB on Postgres) keyed by column key: `data` holds the cell
values, `meta` holds per enriched cell its status, confidence, source provider and time.
One `enrichment_requests` row is one job: the queue entry and the job record are the same
thing, so there is a single source of truth for a job's state.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JSONType = JSON().with_variant(JSONB(), "postgresql")


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class GlazeTable(Base):
    __tablename__ = "tables"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class GlazeColumn(Base):
    __tablename__ = "columns"
    __table_args__ = (UniqueConstraint("table_id", "key"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    table_id: Mapped[str] = mapped_column(ForeignKey("tables.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(100))
    label: Mapped[str] = mapped_column(String(200))
    data_type: Mapped[str] = mapped_column(String(20), default="text")
    # The catalogue field this column means (`company.industry`); None: inferred from `key`.
    field: Mapped[str | None] = mapped_column(String(60))
    # An AI column's prompt template (core/ai/columns.py); None: a catalogue field or input.
    prompt: Mapped[str | None] = mapped_column(Text)
    position: Mapped[int] = mapped_column(Integer, default=0)


class GlazeRow(Base):
    __tablename__ = "rows"
    __table_args__ = (
        Index("ix_rows_table_id_id", "table_id", "id"),
        # Only the rows a job holds (migration 0005): what releasing and the reconciler read.
        Index(
            "ix_rows_pending_request_id_id",
            "pending_request_id",
            "id",
            postgresql_where=text("pending_request_id IS NOT NULL"),
            sqlite_where=text("pending_request_id IS NOT NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    table_id: Mapped[str] = mapped_column(ForeignKey("tables.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer, default=0)
    data: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    status: Mapped[str] = mapped_column(String(20), default="idle")
    confidence: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The job holding the row `queued` / `running`; cleared when it writes or lets go of it.
    pending_request_id: Mapped[str | None] = mapped_column(String(40))


class EntityCacheEntry(Base):
    """The persistent cache tier: one provider's answer for one entity."""

    __tablename__ = "entity_cache"

    entity_id: Mapped[str] = mapped_column(String(400), primary_key=True)
    provider: Mapped[str] = mapped_column(String(100), primary_key=True)
    found: Mapped[bool] = mapped_column(Boolean)
    answer: Mapped[dict[str, Any]] = mapped_column(
        JSONType
    )  # {"values": {...}, "confidence": {...}}
    fetched_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class EnrichmentRequest(Base):
    """One enrichment request = one job: queue entry, run link, counters, cost and outcome."""

    __tablename__ = "enrichment_requests"
    __table_args__ = (
        UniqueConstraint("table_id", "idempotency_key"),
        Index("ix_enrichment_requests_claim", "status", "priority", "created_at"),
        # Migration 0006 (with, on SQLite only, length checks Postgres's VARCHAR makes).
        CheckConstraint("budget IS NULL OR (budget >= 0 AND budget <= 1e12)", name="budget_valid"),
        CheckConstraint("priority BETWEEN -1000000 AND 1000000", name="priority_range"),
        CheckConstraint("budget_reserved >= 0", name="budget_reserved_valid"),
        CheckConstraint("cost >= 0", name="cost_valid"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    table_id: Mapped[str] = mapped_column(String(40), index=True)
    kind: Mapped[str] = mapped_column(String(20), default="enrich")
    # Whatever the app wrote: an object when it is valid (checked at claim, not here).
    selection: Mapped[Any] = mapped_column(JSONType)
    budget: Mapped[float | None] = mapped_column(Float)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="queued")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    run_id: Mapped[str | None] = mapped_column(String(64))
    # Progress, mirroring seed 001's job view (total / done / failed) plus the finer outcomes.
    cells_total: Mapped[int] = mapped_column(Integer, default=0)
    cells_done: Mapped[int] = mapped_column(Integer, default=0)
    cells_failed: Mapped[int] = mapped_column(Integer, default=0)
    cells_not_found: Mapped[int] = mapped_column(Integer, default=0)
    cells_skipped: Mapped[int] = mapped_column(Integer, default=0)
    rows_total: Mapped[int] = mapped_column(Integer, default=0)
    rows_written: Mapped[int] = mapped_column(Integer, default=0)
    entities: Mapped[int] = mapped_column(Integer, default=0)
    cache_hits: Mapped[int] = mapped_column(Integer, default=0)
    provider_calls: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    cost_by_provider: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    budget_reserved: Mapped[float] = mapped_column(Float, default=0.0)
    estimate: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # The providers found unusable before the job bought anything: {name: reason}.
    unavailable_providers: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # Lookups that never left the machine, by provider and reason: {name: {reason: n}}.
    calls_not_sent: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    # An AI request's outcome: its proposal (table, columns, rows), notes and usage.
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    entities_done: Mapped[int] = mapped_column(Integer, default=0)
    # A re-executed run's request points at the request of the run it re-executes.
    retry_of: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    launched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RequestTransition(Base):
    """One status change of a request, written with the change itself (its history)."""

    __tablename__ = "request_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(40), index=True)
    from_status: Mapped[str | None] = mapped_column(String(20))
    to_status: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(Text)
    run_id: Mapped[str | None] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RequestSpend(Base):
    """What one request spent at one provider: journalled before each call, settled after.

    `calls - settled` calls left the machine and never came back (a killed worker): they are
    counted as charged at `unit_cost`, since the vendor bills on receipt.
    """

    __tablename__ = "request_spend"

    request_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    provider: Mapped[str] = mapped_column(String(100), primary_key=True)
    calls: Mapped[int] = mapped_column(Integer, default=0)
    settled: Mapped[int] = mapped_column(Integer, default=0)
    charged: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    unit_cost: Mapped[float] = mapped_column(Float, default=0.0)


class ProviderObservation(Base):
    """What one provider's lookups by one kind of key have answered so far, across jobs.

    The estimate's expected cost is built from these shares: found, charged, and for each field
    asked of a found entity, how often it came back filled (`fields`: {field: [asked, filled]}).
    """

    __tablename__ = "provider_observations"

    provider: Mapped[str] = mapped_column(String(100), primary_key=True)
    key_kind: Mapped[str] = mapped_column(String(40), primary_key=True)
    lookups: Mapped[int] = mapped_column(Integer, default=0)
    found: Mapped[int] = mapped_column(Integer, default=0)
    charged: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    fields: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    since: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LlmCallRecord(Base):
    """One attempt at one LLM call: what it cost in tokens and credits, and how it ended."""

    __tablename__ = "llm_calls"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str | None] = mapped_column(String(40), index=True)
    operation: Mapped[str] = mapped_column(String(60))
    prompt_version: Mapped[str] = mapped_column(String(80))
    model: Mapped[str] = mapped_column(String(200))
    attempt: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(20))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    cost: Mapped[float] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StepOutputRecord(Base):
    """One step output of one run, pickled, so a step on another process or machine reads what
    the steps before it produced (core/step_outputs.py, defs/io_manager.py)."""

    __tablename__ = "step_outputs"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    step_key: Mapped[str] = mapped_column(String(400), primary_key=True)
    output_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    # "" when the output is not one of a dynamic output's items
    mapping_key: Mapped[str] = mapped_column(String(200), primary_key=True)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
