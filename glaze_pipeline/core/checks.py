"""What must hold of the data after any job, checked by reading it back (Dagster's asset checks).

Each check reads what the jobs wrote, never what they meant to write, so a bug in the writer
shows here:

- `budget_overruns`: no ended request spent more than its budget.
- `rows_in_flight`: no row is left `queued` or `running` once the request holding it has ended
  (or when nothing holds it at all): such a row shows a spinner forever.
- `cells_without_provenance`: every filled cell (`done`) says where its value came from: its
  source, confidence and fetch time, and the request that wrote it.

The queries are here, named once, like the store's; they only read. The provenance check\nruns in the database's JSON functions, one dialect each, as the store's JSON merges do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sqlalchemy import and_, or_, select, text

from glaze_pipeline.core.models import TERMINAL_REQUEST_STATUSES, RowStatus
from glaze_pipeline.core.schema import EnrichmentRequest, GlazeRow
from glaze_pipeline.core.store import Store

# Costs are sums of floats: a budget is exceeded by more than rounding, or not at all.
COST_TOLERANCE = 1e-6
# What a failed check shows of the offenders: enough to look them up, never the whole table.
SAMPLE = 10
# A cell's provenance: what `engine.cell_meta` records for a value it wrote.
PROVENANCE_KEYS = ("source", "confidence", "fetched_at", "request_id")


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
    time or writer. The user's own values are not filled cells: they carry `source: user`.

    Two statements over the cells in the database's own JSON functions (a Python scan of
    100,000 rows took 13 s on Postgres): the counts, then a sample of the offenders."""
    params = {"table_id": table_id, "request_id": request_id, "sample": SAMPLE}
    sql = _PROVENANCE_SQL[store.dialect]
    with store.engine.connect() as connection:
        checked, missing = connection.execute(text(sql["count"]), params).one()
        offenders = connection.execute(text(sql["sample"]), params).all() if missing else []
    sample = []
    for row_id, key, cell in offenders:
        found = json.loads(cell) if isinstance(cell, str) else cell
        absent = [name for name in PROVENANCE_KEYS if found.get(name) is None]
        sample.append(f"{row_id}/{key}: no {', '.join(absent)}")
    return Unsourced(int(checked or 0), int(missing or 0), sample)


def _provenance_sql(cells: str, field: str) -> dict[str, str]:
    """The two statements for a dialect: `cells` lists (row id, key, cell) of a table,
    `field` reads one text field of the cell `c`."""
    filled = f"{field.format('status')} = 'done'"
    mine = f"(CAST(:request_id AS TEXT) IS NULL OR {field.format('request_id')} = :request_id)"
    lacking = " OR ".join(f"{field.format(name)} IS NULL" for name in PROVENANCE_KEYS)
    where = f"r.table_id = :table_id AND {filled} AND {mine}"
    return {
        "count": f"SELECT count(*), coalesce(sum(CASE WHEN {lacking} THEN 1 ELSE 0 END), 0)"
        f" FROM {cells} WHERE {where}",
        "sample": f"SELECT r.id, c.key, c.value FROM {cells} WHERE {where} AND ({lacking})"
        " ORDER BY r.id, c.key LIMIT :sample",
    }


_PROVENANCE_SQL = {
    "postgresql": _provenance_sql(
        "rows r CROSS JOIN LATERAL jsonb_each(r.meta::jsonb) c", "(c.value ->> '{}')"
    ),
    "sqlite": _provenance_sql("rows r, json_each(r.meta) c", "json_extract(c.value, '$.{}')"),
}
