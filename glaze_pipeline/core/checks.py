"""What must hold of the data after any job, checked by reading it back (Dagster's asset checks).

Each check reads what the jobs wrote, never what they meant to write, so a bug in the writer
shows here:

- `budget_overruns`: no ended request spent more than its budget.
- `rows_in_flight`: no row is left `queued` or `running` once the request holding it has ended
  (or when nothing holds it at all): such a row shows a spinner forever.
- `cells_without_provenance`: every filled cell (`done`) says where its value came from: its
  source, confidence and fetch time, and the request that wrote it.

The queries are here, named once, like the store's; they only read. The provenance check
runs in the database's JSON functions, one dialect each, as the store's JSON merges do.

The check a job runs as it closes (`request_id` given) reads at most `PROVENANCE_SAMPLE_ROWS`
rows of a larger table, a run of consecutive ids from a random one: a writer that forgets
provenance forgets it on every page, and reading every cell costs ~0.55 s per 100,000 rows
(~5 s at a million) at every job's close. The full check (no `request_id`, the `data_checks`
job) reads everything.
"""

from __future__ import annotations

import json
import random
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
# Rows a request's own provenance check reads at most (see the module's docstring).
PROVENANCE_SAMPLE_ROWS = 20_000


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
    # Rows read: all of the table's, or, when `sampled`, a run of them (the job's own check).
    rows_checked: int | None = None
    sampled: bool = False


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
    store: Store,
    table_id: str,
    *,
    request_id: str | None = None,
    sample_rows: int | None = PROVENANCE_SAMPLE_ROWS,
    rng: random.Random | None = None,
) -> Unsourced:
    """Filled cells of a table (or those `request_id` wrote) lacking source, confidence, fetch
    time or writer. The user's own values are not filled cells: they carry `source: user`.

    Two statements over the cells in the database's own JSON functions (a Python scan of
    100,000 rows took 13 s on Postgres): the counts, then a sample of the offenders.

    With a `request_id` and a table of more than `sample_rows` rows, at most `sample_rows`
    rows are read, consecutive in id order from a random id (`rng`), and the result says
    `sampled` and how many (`rows_checked`); `sample_rows` None reads them all. Without a
    `request_id`, all are read."""
    params: dict[str, object] = {"table_id": table_id, "request_id": request_id, "sample": SAMPLE}
    sql = _PROVENANCE_SQL[store.dialect]
    rows: int | None = None
    with store.engine.connect() as connection:
        if request_id is not None and sample_rows is not None:
            params["rows"] = sample_rows
            if connection.execute(text(_MORE_ROWS_SQL), params).first() is not None:
                first, last = connection.execute(text(_ID_RANGE_SQL), params).one()
                params["start"] = _probe(first, last, rng or random.Random())
                rows = int(connection.execute(text(_SAMPLED_COUNT_SQL), params).scalar_one())
                if rows < sample_rows:  # too near the end: the last `sample_rows` rows
                    params["start"] = connection.execute(text(_TAIL_SQL), params).scalar_one()
                    rows = sample_rows
                sql = _SAMPLED_PROVENANCE_SQL[store.dialect]
        checked, missing = connection.execute(text(sql["count"]), params).one()
        offenders = connection.execute(text(sql["sample"]), params).all() if missing else []
    sample = []
    for row_id, key, cell in offenders:
        found = json.loads(cell) if isinstance(cell, str) else cell
        absent = [name for name in PROVENANCE_KEYS if found.get(name) is None]
        sample.append(f"{row_id}/{key}: no {', '.join(absent)}")
    return Unsourced(
        int(checked or 0), int(missing or 0), sample, rows_checked=rows, sampled=rows is not None
    )


def _probe(first: str, last: str, rng: random.Random) -> str:
    """A random id between `first` and `last` (the table's first and last ids), from which a
    sample's run starts: their common prefix, then characters drawn between theirs at the
    first difference and from the ids' own alphabet after it. Three index probes, where a
    uniform offset would walk the index up to it (seconds at a million rows just written)."""
    common = 0
    while common < min(len(first), len(last)) and first[common] == last[common]:
        common += 1
    if common == len(first) or common == len(last):
        return first
    low, high = ord(first[common]), ord(last[common])
    alphabet = sorted(set(first[common:] + last[common:]))
    tail = "".join(rng.choice(alphabet) for _ in range(8))
    return first[:common] + chr(rng.randint(low, high)) + tail


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
# A run of `:rows` rows from the id `:start` on (the index on table id and id reads it).
_SAMPLED_ROWS = (
    "(SELECT id, table_id, meta FROM rows WHERE table_id = :table_id AND id >= :start"
    " ORDER BY id LIMIT :rows) r"
)
_SAMPLED_PROVENANCE_SQL = {
    "postgresql": _provenance_sql(
        f"{_SAMPLED_ROWS} CROSS JOIN LATERAL jsonb_each(r.meta::jsonb) c", "(c.value ->> '{}')"
    ),
    "sqlite": _provenance_sql(
        f"{_SAMPLED_ROWS}, json_each(r.meta) c", "json_extract(c.value, '$.{}')"
    ),
}
# Whether the table has more rows than a sample reads; its first and last ids; the rows a
# run from `:start` reads (fewer than `:rows` when it starts near the end); where the last
# `:rows` rows start.
_MORE_ROWS_SQL = "SELECT id FROM rows WHERE table_id = :table_id ORDER BY id LIMIT 1 OFFSET :rows"
_ID_RANGE_SQL = "SELECT min(id), max(id) FROM rows WHERE table_id = :table_id"
_SAMPLED_COUNT_SQL = f"SELECT count(*) FROM {_SAMPLED_ROWS}"
_TAIL_SQL = (
    "SELECT id FROM rows WHERE table_id = :table_id ORDER BY id DESC LIMIT 1 OFFSET :rows - 1"
)
