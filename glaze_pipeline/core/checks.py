"""What must hold of the data after any job, checked by reading it back (Dagster's asset checks).

Each check reads what the jobs wrote, never what they meant to write, so a bug in the writer
shows here:

- `budget_overruns`: no ended request spent more than its budget.
- `rows_in_flight`: no row is left `queued` or `running` once the request holding it has ended
  (or when nothing holds it at all): such a row shows a spinner forever.
- `cells_without_provenance`: every filled cell (`done`) says where its value came from: its
  source, confidence and fetch time, and the request that wrote it.

The queries are here, named once, like the store's; they only read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy import and_, or_, select

from glaze_pipeline.core.models import TERMINAL_REQUEST_STATUSES, CellStatus, RowStatus
from glaze_pipeline.core.schema import EnrichmentRequest, GlazeRow
from glaze_pipeline.core.store import Store

# Costs are sums of floats: a budget is exceeded by more than rounding, or not at all.
COST_TOLERANCE = 1e-6
# What a failed check shows of the offenders: enough to look them up, never the whole table.
SAMPLE = 10
# A cell's provenance: what `engine.cell_meta` records for a value it wrote.
PROVENANCE_KEYS = ("source", "confidence", "fetched_at", "request_id")
PAGE_ROWS = 5000


@dataclass(frozen=True)
class Overrun:
    request_id: str
    budget: float
    cost: float


@dataclass(frozen=True)
class InFlight:
    """Rows left `queued`/`running` with no open request holding them."""

    count: int
    sample: list[str] = field(default_factory=list)  # row ids


@dataclass(frozen=True)
class Unsourced:
    """Filled cells missing part of their provenance."""

    cells_checked: int
    count: int
    sample: list[str] = field(default_factory=list)  # "row id/column key: missing keys"


def budget_overruns(store: Store, request_id: str | None = None) -> list[Overrun]:
    """Ended requests (or just `request_id`) whose cost is over their budget."""
    query = select(EnrichmentRequest.id, EnrichmentRequest.budget, EnrichmentRequest.cost).where(
        EnrichmentRequest.budget.is_not(None),
        EnrichmentRequest.status.in_(sorted(TERMINAL_REQUEST_STATUSES)),
        EnrichmentRequest.cost > EnrichmentRequest.budget + COST_TOLERANCE,
    )
    if request_id is not None:
        query = query.where(EnrichmentRequest.id == request_id)
    with store.engine.connect() as connection:
        return [
            Overrun(str(row.id), float(row.budget), float(row.cost))
            for row in connection.execute(query.order_by(EnrichmentRequest.id))
        ]


def rows_in_flight(store: Store, table_id: str | None = None) -> InFlight:
    """Rows `queued`/`running` that no open request holds (in one table, or anywhere)."""
    open_holder = select(EnrichmentRequest.id).where(
        EnrichmentRequest.id == GlazeRow.pending_request_id,
        EnrichmentRequest.status.not_in(sorted(TERMINAL_REQUEST_STATUSES)),
    )
    condition = and_(
        GlazeRow.status.in_([RowStatus.QUEUED.value, RowStatus.RUNNING.value]),
        or_(GlazeRow.pending_request_id.is_(None), ~open_holder.exists()),
    )
    if table_id is not None:
        condition = and_(GlazeRow.table_id == table_id, condition)
    with store.engine.connect() as connection:
        ids = list(connection.scalars(select(GlazeRow.id).where(condition).order_by(GlazeRow.id)))
    return InFlight(len(ids), ids[:SAMPLE])


def cells_without_provenance(
    store: Store, table_id: str, *, request_id: str | None = None
) -> Unsourced:
    """Filled cells of a table (or those `request_id` wrote) lacking source, confidence, fetch
    time or writer. The user's own values are not filled cells: they carry `source: user`."""
    checked = missing = 0
    sample: list[str] = []
    for row_id, meta in _row_metas(store, table_id):
        for key, cell in meta.items():
            if not isinstance(cell, dict) or cell.get("status") != CellStatus.DONE.value:
                continue
            if request_id is not None and cell.get("request_id") != request_id:
                continue
            checked += 1
            absent = [name for name in PROVENANCE_KEYS if cell.get(name) is None]
            if absent:
                missing += 1
                if len(sample) < SAMPLE:
                    sample.append(f"{row_id}/{key}: no {', '.join(absent)}")
    return Unsourced(checked, missing, sample)


def _row_metas(store: Store, table_id: str) -> Iterator[tuple[str, dict]]:
    """(row id, meta) of a table, a page at a time (keyset on id: no offset scans)."""
    after = ""
    while True:
        with store.engine.connect() as connection:
            page = connection.execute(
                select(GlazeRow.id, GlazeRow.meta)
                .where(GlazeRow.table_id == table_id, GlazeRow.id > after)
                .order_by(GlazeRow.id)
                .limit(PAGE_ROWS)
            ).all()
        for row in page:
            yield str(row.id), row.meta or {}
        if len(page) < PAGE_ROWS:
            return
        after = str(page[-1].id)
