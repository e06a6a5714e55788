"""The store: SQLAlchemy reads in pages and bulk writes, on Postgres or SQLite.

Every write that touches many rows is one statement per batch: row patches are merged into the
existing JSON in the database (`||` on Postgres, `json_patch` on SQLite), so keys this job did
not touch, such as a cell a user edited during the run, are kept.

Row lifecycle (seed 001): a job *holds* the rows it will fill (`status` `queued` or `running`,
`pending_request_id` = its request) and lets go of them when it writes them or ends: a row's
status is otherwise derived from its cells' `meta` (core/status.py), so letting go is a
recomputation, never a remembered value. Each hold and each release is one statement per page.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    Select,
    Text,
    bindparam,
    cast,
    create_engine,
    event,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from glaze_pipeline.core import jsontext
from glaze_pipeline.core.ai.columns import ai_field, check_template
from glaze_pipeline.core.detection import ColumnSpec
from glaze_pipeline.core.errors import (
    InputError,
    UnknownColumnError,
    UnknownRequestError,
    UnknownRowError,
    UnknownTableError,
)
from glaze_pipeline.core.fields import column_field, parse_field
from glaze_pipeline.core.limits import (
    MAX_COLUMN_KEY,
    MAX_COLUMN_LABEL,
    MAX_ID,
    MAX_TABLE_NAME,
    check_text,
)
from glaze_pipeline.core.models import Observation, RowStatus
from glaze_pipeline.core.schema import (
    EnrichmentRequest,
    GlazeColumn,
    GlazeRow,
    GlazeTable,
    LlmCallRecord,
    ProviderObservation,
)
from glaze_pipeline.core.settings import database_url
from glaze_pipeline.core.status import aggregate_row

if TYPE_CHECKING:
    from glaze_pipeline.core.ai.client import LlmCall

ID_CHUNK = 5000  # ids per IN (...) list (SQLite allows 32,766 parameters)
# A bulk insert of at least this many rows is followed by ANALYZE on Postgres (see there).
ANALYZE_AFTER_ROWS = 10_000


def _check_definition(name: str, columns: Sequence[ColumnDef], table_id: str | None = None) -> None:
    """A new table's name, ids, keys, labels and fields, checked before anything is written:
    the same limits on both databases (Postgres refuses a longer value, SQLite keeps it)."""
    check_text("table name", name, MAX_TABLE_NAME)
    check_text("table id", table_id, MAX_ID, required=False)
    for column in columns:
        check_text("column key", column.key, MAX_COLUMN_KEY)
        check_text(
            f"label of column {column.key!r}", column.label, MAX_COLUMN_LABEL, required=False
        )
        check_text(f"id of column {column.key!r}", column.id, MAX_ID, required=False)
    keys = [column.key for column in columns]
    if len(set(keys)) != len(keys):
        raise InputError(f"duplicate column keys in {keys}")
    for column in columns:
        if column.prompt is not None:
            if column.field:
                raise InputError(
                    f"column {column.key!r} has both a field and an AI prompt: give one"
                )
            check_template(column.prompt)
        elif column.field:
            parse_field(column.field)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def normalize_url(url: str) -> str:
    """Use psycopg 3 for Postgres whatever scheme was given (`postgres://`, `postgresql://`)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


@dataclass(frozen=True, slots=True)
class ColumnDef:
    key: str
    label: str = ""
    field: str | None = None
    data_type: str = "text"
    id: str | None = None  # stable ids for seed data; generated when None
    prompt: str | None = None  # an AI column's template (core/ai/columns.py)


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    id: str
    key: str
    label: str
    field: str | None
    position: int
    data_type: str = "text"
    prompt: str | None = None

    def spec(self) -> ColumnSpec:
        if self.prompt is not None:
            return ColumnSpec(self.id, self.key, ai_field(self.prompt), self.prompt)
        return ColumnSpec(self.id, self.key, column_field(self.key, self.field))


@dataclass(frozen=True, slots=True)
class TableInfo:
    id: str
    name: str
    columns: tuple[ColumnInfo, ...]

    def column_by_id(self) -> dict[str, ColumnInfo]:
        return {column.id: column for column in self.columns}

    def column_by_key(self, key: str) -> ColumnInfo:
        for column in self.columns:
            if column.key == key:
                return column
        raise UnknownColumnError(f"table {self.id} has no column with key {key!r}")

    def specs(self) -> list[ColumnSpec]:
        return [column.spec() for column in self.columns]


@dataclass(frozen=True, slots=True)
class LlmUsage:
    """A request's LLM usage: attempts, tokens in and out, credits."""

    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost: float


@dataclass(frozen=True, slots=True)
class TableRecord:
    """A table as a list shows it."""

    id: str
    name: str
    description: str | None
    row_count: int
    created_at: datetime | None


@dataclass(frozen=True, slots=True)
class RequestSummary:
    """A request as a list of the latest shows it."""

    id: str
    table_id: str
    kind: str
    status: str
    cells_done: int
    cells_total: int
    cost: float
    created_at: datetime | None


@dataclass(frozen=True, slots=True)
class FullRow:
    """A row with everything the app shows: values, per-cell meta, status and provenance."""

    id: str
    position: int
    data: dict[str, Any]
    meta: dict[str, Any]
    status: str
    confidence: float | None
    error: str | None
    last_run_at: datetime | None


@dataclass(frozen=True, slots=True)
class RowRecord:
    id: str
    data: dict[str, Any]
    meta: dict[str, Any]
    status: str = "idle"


class SharedDocument(dict[str, Any]):
    """A patch's `data` or `meta` that many rows share (the engine makes one per entity's
    answer): its JSON text is made by the first page that sends it and kept for the next ones,
    so it must not change once sent."""

    __slots__ = ("text",)

    text: str


@dataclass(frozen=True, slots=True)
class RowPatch:
    """What one job writes to one row: JSON keys to merge, and the row's new aggregate status.

    `expect` (key -> value, None for an empty cell) is what those cells held when the job read
    the row: the write is made only if every one still does (compare-and-set), else the row is
    left untouched and is not among the ids `Store.apply_patches` returns."""

    id: str
    data: dict[str, Any]
    meta: dict[str, Any]
    status: str
    confidence: float | None
    error: str | None
    expect: dict[str, Any] | None = None


# `Store.record_observations`: every (provider, key kind)'s counts added in one upsert;
# `fields` ({field: [asked, filled]}) is summed pair by pair over both sides' keys. By dialect:
# the payload's rows, and the sum of `fields` in that dialect's JSON.
_OBSERVATION_PARTS = {
    "postgresql": (
        """SELECT p.provider, p.key_kind, p.lookups, p.found, p.charged, p.errors, p.fields,
       :now, :now
FROM jsonb_to_recordset(CAST(:payload AS jsonb)) AS p(
    provider text, key_kind text, lookups integer, found integer, charged integer,
    errors integer, fields jsonb
)""",
        """SELECT COALESCE(jsonb_object_agg(k.name, jsonb_build_array(
            COALESCE((o.fields -> k.name ->> 0)::bigint, 0)
                + COALESCE((excluded.fields -> k.name ->> 0)::bigint, 0),
            COALESCE((o.fields -> k.name ->> 1)::bigint, 0)
                + COALESCE((excluded.fields -> k.name ->> 1)::bigint, 0)
        )), jsonb_build_object())
        FROM (
            SELECT jsonb_object_keys(o.fields) AS name
            UNION SELECT jsonb_object_keys(excluded.fields)
        ) AS k""",
    ),
    "sqlite": (
        """SELECT p.value ->> 'provider', p.value ->> 'key_kind', p.value ->> 'lookups',
       p.value ->> 'found', p.value ->> 'charged', p.value ->> 'errors', p.value -> 'fields',
       :now, :now
FROM json_each(:payload) AS p WHERE true""",
        """SELECT COALESCE(json_group_object(k.name, json_array(
            COALESCE(o.fields -> k.name ->> 0, 0) + COALESCE(excluded.fields -> k.name ->> 0, 0),
            COALESCE(o.fields -> k.name ->> 1, 0) + COALESCE(excluded.fields -> k.name ->> 1, 0)
        )), json_object())
        FROM (
            SELECT key AS name FROM json_each(o.fields)
            UNION SELECT key FROM json_each(excluded.fields)
        ) AS k""",
    ),
}
_ADD_OBSERVATIONS_SQL = {
    dialect: f"""
INSERT INTO provider_observations AS o
    (provider, key_kind, lookups, found, charged, errors, fields, since, updated_at)
{rows}
ON CONFLICT (provider, key_kind) DO UPDATE SET
    lookups = o.lookups + excluded.lookups,
    found = o.found + excluded.found,
    charged = o.charged + excluded.charged,
    errors = o.errors + excluded.errors,
    fields = ({fields_sum}),
    updated_at = excluded.updated_at
"""
    for dialect, (rows, fields_sum) in _OBSERVATION_PARTS.items()
}


class Store:
    """The app database. It counts the statements it issues (`statements`), and all stores
    of the process together (`Store.process_statements`, for benchmarks)."""

    process_statements = 0

    def __init__(self, url: str | None = None) -> None:
        self.url = normalize_url(database_url(url))
        self.engine = _make_engine(self.url)
        self.dialect = self.engine.dialect.name
        self.statements = 0
        event.listen(self.engine, "before_cursor_execute", self._count)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def sqlite_file(self) -> Path | None:
        """The SQLite database's file; None on Postgres and for an in-memory database."""
        return sqlite_file(self.url)

    def _count(self, *_args: Any) -> None:
        self.statements += 1
        Store.process_statements += 1

    def session(self) -> Session:
        return self._sessions()

    def upgrade(self) -> None:
        from glaze_pipeline.core import migrate  # alembic: only when migrating (saves ~0.2 s)

        migrate.upgrade(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    # -- tables and columns ---------------------------------------------------------------

    def create_table(
        self,
        name: str,
        columns: Sequence[ColumnDef],
        *,
        description: str | None = None,
        table_id: str | None = None,
    ) -> TableInfo:
        _check_definition(name, columns, table_id)
        table_id = table_id or new_id("tbl")
        with self.session() as session, session.begin():
            session.add(GlazeTable(id=table_id, name=name, description=description))
            session.flush()
            session.add_all(
                GlazeColumn(
                    id=column.id or new_id("col"),
                    table_id=table_id,
                    key=column.key,
                    label=column.label or column.key,
                    data_type=column.data_type,
                    field=column.field,
                    prompt=column.prompt,
                    position=position,
                )
                for position, column in enumerate(columns)
            )
        return self.get_table(table_id)

    def set_column_field(self, table_id: str, column_id: str, field: str | None) -> ColumnInfo:
        """Say which catalogue field a column means (`company.industry`); None: infer it from
        the column's key again. An unknown field is refused naming the catalogue's fields."""
        if field is not None:
            parse_field(field)
        with self.engine.begin() as connection:
            updated = connection.execute(
                update(GlazeColumn)
                .where(GlazeColumn.table_id == table_id, GlazeColumn.id == column_id)
                .values(field=field)
            ).rowcount
        if not updated:
            self.get_table(table_id)  # names an unknown table
            raise UnknownColumnError(f"unknown column id in table {table_id}: {column_id}")
        return self.get_table(table_id).column_by_id()[column_id]

    def get_table(self, table_id: str) -> TableInfo:
        with self.session() as session:
            table = session.get(GlazeTable, table_id)
            if table is None:
                raise UnknownTableError(f"unknown table {table_id!r}")
            columns = session.scalars(
                select(GlazeColumn)
                .where(GlazeColumn.table_id == table_id)
                .order_by(GlazeColumn.position)
            ).all()
        return TableInfo(
            table.id,
            table.name,
            tuple(
                ColumnInfo(c.id, c.key, c.label, c.field, c.position, c.data_type, c.prompt)
                for c in columns
            ),
        )

    def list_tables(self) -> list[tuple[str, str, int]]:
        """(id, name, row count) of every table, oldest first."""
        counts = (
            select(GlazeRow.table_id, func.count().label("n"))
            .group_by(GlazeRow.table_id)
            .subquery()
        )
        query = (
            select(GlazeTable.id, GlazeTable.name, func.coalesce(counts.c.n, 0))
            .outerjoin(counts, counts.c.table_id == GlazeTable.id)
            .order_by(GlazeTable.created_at, GlazeTable.id)
        )
        with self.engine.connect() as connection:
            return [(r[0], r[1], int(r[2])) for r in connection.execute(query)]

    def table_records(
        self, *, offset: int = 0, limit: int = 100, table_id: str | None = None
    ) -> tuple[list[TableRecord], int]:
        """A page of tables (newest first) with their row counts, and how many there are.
        With `table_id`, that table only (UnknownTableError when it does not exist)."""
        counts = (
            select(func.count())
            .where(GlazeRow.table_id == GlazeTable.id)
            .correlate(GlazeTable)
            .scalar_subquery()
        )
        query = select(
            GlazeTable.id,
            GlazeTable.name,
            GlazeTable.description,
            counts,
            GlazeTable.created_at,
        )
        if table_id is not None:
            query = query.where(GlazeTable.id == table_id)
        query = (
            query.order_by(GlazeTable.created_at.desc(), GlazeTable.id.desc())
            .offset(offset)
            .limit(limit)
        )
        with self.engine.connect() as connection:
            records = [
                TableRecord(r[0], r[1], r[2], int(r[3]), r[4]) for r in connection.execute(query)
            ]
            if table_id is not None:
                if not records:
                    raise UnknownTableError(f"unknown table {table_id!r}")
                return records, 1
            total = int(connection.scalar(select(func.count()).select_from(GlazeTable)) or 0)
        return records, total

    def add_column(self, table_id: str, column: ColumnDef) -> ColumnInfo:
        """Add a column at the end of a table; a key the table already has is refused."""
        info = self.get_table(table_id)
        if any(c.key == column.key for c in info.columns):
            raise InputError(f"table {table_id} already has a column {column.key!r}")
        _check_definition(info.name, [*(ColumnDef(c.key) for c in info.columns), column])
        column_id = column.id or new_id("col")
        position = max((c.position for c in info.columns), default=-1) + 1
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    insert(GlazeColumn).values(
                        id=column_id,
                        table_id=table_id,
                        key=column.key,
                        label=column.label or column.key,
                        data_type=column.data_type,
                        field=column.field,
                        prompt=column.prompt,
                        position=position,
                    )
                )
        except IntegrityError as error:  # a concurrent add of the same key
            raise InputError(f"table {table_id} already has a column {column.key!r}") from error
        return self.get_table(table_id).column_by_id()[column_id]

    def row_page(self, table_id: str, *, offset: int, limit: int) -> list[FullRow]:
        """Rows by position (then id), for display; the table must exist (the caller checks)."""
        query = (
            select(GlazeRow)
            .where(GlazeRow.table_id == table_id)
            .order_by(GlazeRow.position, GlazeRow.id)
            .offset(offset)
            .limit(limit)
        )
        with self.session() as session:
            return [_full_row(row) for row in session.scalars(query)]

    def full_row(self, table_id: str, row_id: str) -> FullRow:
        with self.session() as session:
            row = session.get(GlazeRow, row_id)
            if row is None or row.table_id != table_id:
                raise UnknownRowError(f"unknown row id in table {table_id}: {row_id}")
            return _full_row(row)

    def count_rows(self, table_id: str) -> int:
        with self.engine.connect() as connection:
            return int(
                connection.scalar(
                    select(func.count()).select_from(GlazeRow).where(GlazeRow.table_id == table_id)
                )
                or 0
            )

    def count_empty_cells(self, table_id: str, keys: Sequence[str]) -> int:
        """How many of these columns' cells are empty (missing, null or "") over the table's
        rows: what a whole-table job will fill. One aggregate query; when a key cannot be
        looked up exactly (a `"` in it, on SQLite) its every cell is counted."""
        if not keys:
            return 0
        paths = _json_paths(keys, self.dialect)
        if paths is None:
            return len(keys) * self.count_rows(table_id)
        lookup = (
            "r.data ->> :k{i}" if self.dialect == "postgresql" else "json_extract(r.data, :k{i})"
        )
        terms = " + ".join(
            f"(CASE WHEN COALESCE(CAST({lookup.format(i=i)} AS TEXT), '') = '' THEN 1 ELSE 0 END)"
            for i in range(len(paths))
        )
        params: dict[str, Any] = {f"k{i}": path for i, path in enumerate(paths)}
        params["table"] = table_id
        statement = text(f"SELECT COALESCE(SUM({terms}), 0) FROM rows r WHERE r.table_id = :table")
        with self.engine.connect() as connection:
            return int(connection.scalar(statement, params) or 0)

    def job_cells(
        self, table_id: str, request_id: str, *, row_ids: Sequence[str] | None = None
    ) -> Iterator[tuple[RowRecord, str, dict[str, Any]]]:
        """Every cell a job wrote: (row, column key, the cell's meta), rows in id order.

        There is no per-cell task table: a written cell's `meta` names its request. A cell
        the job never wrote (kept, or never reached by a cancelled job) is not among them."""
        pages = self.iter_row_pages(table_id, row_ids=row_ids) if row_ids else None
        for page in pages or self.iter_row_pages(table_id):
            for row in sorted(page, key=lambda r: r.id):
                for key, cell in row.meta.items():
                    if isinstance(cell, dict) and cell.get("request_id") == request_id:
                        yield row, key, cell

    def tables_created_since(self, since: datetime | None) -> list[str]:
        query = select(GlazeTable.id).order_by(GlazeTable.created_at)
        if since is not None:
            query = query.where(GlazeTable.created_at > since)
        with self.engine.connect() as connection:
            return list(connection.scalars(query))

    # -- rows ---------------------------------------------------------------------------

    def insert_rows(
        self,
        table_id: str,
        rows: Iterable[Mapping[str, Any]],
        *,
        batch_size: int = 5000,
        ids: Iterable[str] | None = None,
    ) -> list[str]:
        """Insert rows (dicts keyed by column key) in batches; returns their ids in order."""
        self.get_table(table_id)
        with self.engine.connect() as connection:
            start = connection.scalar(
                select(func.coalesce(func.max(GlazeRow.position), -1)).where(
                    GlazeRow.table_id == table_id
                )
            )
        inserted: list[str] = []
        with self.engine.begin() as connection:
            self._insert_row_batches(
                connection,
                table_id,
                rows,
                position=int(start if start is not None else -1) + 1,
                batch_size=batch_size,
                ids=ids,
                inserted=inserted,
            )
        return inserted

    def import_table(
        self,
        name: str,
        columns: Sequence[ColumnDef],
        rows: Iterable[Mapping[str, Any]],
        *,
        description: str | None = None,
        batch_size: int = 5000,
    ) -> tuple[TableInfo, int]:
        """Create a table, its columns and all its rows in ONE transaction: the table and its
        row count. If `rows` raises (a file that turns out bad at row 15,001), nothing is left.

        `rows` is consumed lazily, one batch in memory at a time. On SQLite the write lock is
        held for the whole import, so other writers queue (busy_timeout) until it commits.
        """
        _check_definition(name, columns)
        table_id = new_id("tbl")
        with self.engine.begin() as connection:
            connection.execute(
                insert(GlazeTable), [{"id": table_id, "name": name, "description": description}]
            )
            if columns:
                connection.execute(
                    insert(GlazeColumn),
                    [
                        {
                            "id": column.id or new_id("col"),
                            "table_id": table_id,
                            "key": column.key,
                            "label": column.label or column.key,
                            "data_type": column.data_type,
                            "field": column.field,
                            "position": position,
                        }
                        for position, column in enumerate(columns)
                    ],
                )
            count = self._insert_row_batches(
                connection, table_id, rows, position=0, batch_size=batch_size
            )
        return self.get_table(table_id), count

    def _insert_row_batches(
        self,
        connection: Connection,
        table_id: str,
        rows: Iterable[Mapping[str, Any]],
        *,
        position: int,
        batch_size: int,
        ids: Iterable[str] | None = None,
        inserted: list[str] | None = None,
    ) -> int:
        """Insert rows from `position` on, one statement per batch, in the caller's
        transaction; returns how many. Ids are recorded in `inserted` only when asked: an
        import of millions of rows does not keep them all."""
        given = iter(ids) if ids is not None else None
        batch: list[dict[str, Any]] = []
        count = 0
        for data in rows:
            row_id = next(given) if given is not None else new_id("row")
            if inserted is not None:
                inserted.append(row_id)
            batch.append(
                {
                    "id": row_id,
                    "table_id": table_id,
                    "position": position + count,
                    "data": dict(data),
                    "meta": {},
                    "status": "idle",
                }
            )
            count += 1
            if len(batch) >= batch_size:
                connection.execute(insert(GlazeRow), batch)
                batch = []
        if batch:
            connection.execute(insert(GlazeRow), batch)
        if self.dialect == "postgresql" and count >= ANALYZE_AFTER_ROWS:
            # Until `rows` is analysed the planner has no statistics for a new table id: it
            # guesses a few hundred rows, and each keyset page (`table_id = ? AND id > ?
            # ORDER BY id LIMIT n`) becomes a scan and sort of every row left (measured:
            # 108 ms a page at 100,000 rows, so reading a table was quadratic). Autovacuum
            # would analyse it only later; a job may start at once.
            connection.execute(text("ANALYZE rows"))
        return count

    def iter_row_pages(
        self,
        table_id: str,
        *,
        row_ids: Sequence[str] | None = None,
        page_size: int = 5000,
        grow_to: int | None = None,
        with_meta: bool = True,
        after: str = "",
        upto: str | None = None,
    ) -> Iterator[list[RowRecord]]:
        """Rows in pages, never the whole table at once: keyset by id, or the given ids.

        Without `row_ids`, the rows with `after < id <= upto` (`upto` None: to the end): a
        span of the table. With `row_ids`, an id that is not in the table raises
        UnknownRowError naming it (`after` and `upto` must then be left out). With `grow_to`,
        the first page is `page_size` rows and each next one twice the last, up to `grow_to`.
        """
        if row_ids is not None and (after or upto is not None):
            raise ValueError("a span (after, upto) is of the whole table, not of given row ids")
        columns = self._record_columns(with_meta=with_meta)
        sizes = _page_sizes(page_size, grow_to)
        if row_ids is not None:
            ids = list(dict.fromkeys(row_ids))
            start = 0
            while start < len(ids):
                wanted = ids[start : start + next(sizes)]
                start += len(wanted)
                with self.engine.connect() as connection:
                    found = self._read_records(
                        connection,
                        select(*columns).where(
                            GlazeRow.table_id == table_id, GlazeRow.id.in_(wanted)
                        ),
                    )
                if len(found) != len(wanted):
                    raise _unknown_rows(table_id, wanted, {row.id for row in found})
                yield found
            return
        last = after
        span = [GlazeRow.table_id == table_id]
        if upto is not None:
            span.append(GlazeRow.id <= upto)
        while True:
            size = next(sizes)
            with self.engine.connect() as connection:
                found = self._read_records(
                    connection,
                    select(*columns)
                    .where(*span, GlazeRow.id > last)
                    .order_by(GlazeRow.id)
                    .limit(size),
                )
            if not found:
                return
            yield found
            if len(found) < size:
                return
            last = found[-1].id

    def _record_columns(self, *, with_meta: bool = True) -> tuple[Any, ...]:
        """What a RowRecord is read from. On Postgres the JSON comes as text, decoded by
        `_records` in one call per document: psycopg's jsonb loader and SQLAlchemy's row
        objects cost ~30 % more CPU per row (measured over 100,000 rows)."""
        if self.dialect == "postgresql":
            data: Any = cast(GlazeRow.data, Text)
            meta: Any = cast(GlazeRow.meta, Text) if with_meta else literal(None)
        else:
            data = GlazeRow.data
            meta = GlazeRow.meta if with_meta else literal(None)
        # Detection needs no `meta`: not reading it saves decoding a JSON document per row.
        return (GlazeRow.id, data.label("data"), meta.label("meta"), GlazeRow.status)

    def _read_records(self, connection: Connection, statement: Select[Any]) -> list[RowRecord]:
        """The rows of a `_record_columns` select as RowRecords. On Postgres every column comes
        as text, which SQLAlchemy would only wrap: the driver's rows are taken at once, as
        plain tuples (~10 % of detection's CPU: no SQLAlchemy row, no fetch per row)."""
        result = connection.execute(statement)
        if self.dialect != "postgresql":
            return self._records(result)
        return self._records(result.cursor.fetchall())

    def _records(self, result: Iterable[Any]) -> list[RowRecord]:
        """Rows read with `_record_columns` as RowRecords (tuples unpacked: attribute access
        on SQLAlchemy rows is a lookup per field)."""
        if self.dialect != "postgresql":
            return [RowRecord(i, d or {}, m or {}, s) for i, d, m, s in result]
        loads = jsontext.loads
        return [
            RowRecord(i, loads(d) if d else {}, loads(m) if m else {}, s) for i, d, m, s in result
        ]

    def check_rows(self, table_id: str, row_ids: Sequence[str]) -> None:
        """Raise UnknownRowError naming the ids that are not rows of this table (ids only are
        read: a selection is checked before it is queued, without loading its rows)."""
        ids = list(dict.fromkeys(row_ids))
        with self.engine.connect() as connection:
            for wanted in chunked(ids, ID_CHUNK):
                present = set(
                    connection.scalars(
                        select(GlazeRow.id).where(
                            GlazeRow.table_id == table_id, GlazeRow.id.in_(wanted)
                        )
                    )
                )
                if len(present) != len(wanted):
                    raise _unknown_rows(table_id, wanted, present)

    def rows_in_order(self, table_id: str, *, limit: int | None = None) -> list[RowRecord]:
        """Rows by position, for display (the CLI's `show`)."""
        query = (
            select(*self._record_columns())
            .where(GlazeRow.table_id == table_id)
            .order_by(GlazeRow.position)
        )
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as connection:
            return self._records(connection.execute(query))

    def rows_by_id(self, row_ids: Sequence[str]) -> list[RowRecord]:
        """These rows as they are now (a missing id is left out)."""
        found: list[RowRecord] = []
        columns = self._record_columns()
        with self.engine.connect() as connection:
            for ids in chunked(row_ids, ID_CHUNK):
                query = select(*columns).where(GlazeRow.id.in_(ids))
                found.extend(self._records(connection.execute(query)))
        return found

    def get_row(self, row_id: str) -> GlazeRow:
        with self.session() as session:
            row = session.get(GlazeRow, row_id)
            if row is None:
                raise UnknownRowError(f"unknown row {row_id!r}")
            return row

    def edit_cell(self, row_id: str, key: str, value: Any, *, provenance: bool = False) -> None:
        """A user's edit of one cell, as the app makes it: a JSON merge of one key.

        With `provenance` (the API's edits), the cell's `meta` says so too: source `user`, the
        time, and no engine outcome (status, confidence and error of an earlier lookup no
        longer describe the value), and the row's status is recomputed from its cells unless
        a job holds the row (the job's write or release recomputes it then)."""
        meta = {row_id: {key: user_edit_meta()}} if provenance else None
        self.apply_patches([], edits={row_id: {key: value}}, edit_meta=meta)
        if provenance:
            self.restatus_row(row_id)

    def restatus_row(self, row_id: str) -> None:
        """Recompute a row's status, confidence and error from its `meta`, if no job holds it."""
        free = (GlazeRow.id == row_id) & GlazeRow.pending_request_id.is_(None)
        with self.engine.begin() as connection:
            query = select(GlazeRow.meta).where(free)
            if self.dialect == "postgresql":
                query = query.with_for_update()  # no write lands between the read and ours
            found = connection.execute(query).first()
            if found is None:
                return
            status, confidence, error = aggregate_row(found.meta or {})
            connection.execute(
                update(GlazeRow)
                .where(free)
                .values(status=status.value, confidence=confidence, error=error)
            )

    def apply_patches(
        self,
        patches: Sequence[RowPatch],
        *,
        edits: Mapping[str, Mapping[str, Any]] | None = None,
        edit_meta: Mapping[str, Mapping[str, Any]] | None = None,
        request_id: str | None = None,
    ) -> set[str]:
        """Merge a batch of row patches in ONE statement; returns the ids of the rows updated.

        A patch whose `expect` no longer holds (a cell changed since the job read it) is not
        applied, and its id is not returned: the caller reads the row again.

        `request_id` is the job writing: a row it holds is let go (its status is the patch's);
        a row another request holds keeps that hold and its status (`queued` / `running`) until
        that request lets go of it, which recomputes the status from `meta`, this write included.
        `edits` (row id -> keys) is a data-only merge, the path a user's edit takes: it never
        touches a status or a hold (`edit_meta`, row id -> keys, merges the edit's provenance).
        """
        entries: list[_Entry] = [
            (p.id, p.data, p.meta, p.status, p.confidence, p.error, 1, p.expect) for p in patches
        ]
        for row_id, data in (edits or {}).items():
            meta = dict((edit_meta or {}).get(row_id, {}))
            entries.append((row_id, dict(data), meta, None, None, None, 0, None))
        if not entries:
            return set()
        if self.dialect == "postgresql":
            params = _documents_payload(entries)
        else:
            params = {"payload": self._inline_payload(entries)}
        params.update(now=utcnow(), request=request_id)
        with self.engine.begin() as connection:
            result = connection.execute(text(_PATCH_SQL[self.dialect]), params)
            return {str(row_id) for row_id in result.scalars()}

    def _inline_payload(self, entries: Sequence[_Entry]) -> str:
        """The page as one JSON array of whole patches (SQLite's statement reads it)."""
        return jsontext.dumps(
            [
                {
                    "id": row_id,
                    "data": data,
                    "meta": meta,
                    "status": status,
                    "confidence": confidence,
                    "error": error,
                    "stamp": stamp,
                    **({"expect": self._expectation(expect)} if expect else {}),
                }
                for row_id, data, meta, status, confidence, error, stamp, expect in entries
            ]
        )

    def _expectation(self, expect: Mapping[str, Any]) -> list[dict[str, Any]]:
        """A patch's `expect` as SQLite's statement reads it (Postgres takes the object as it
        is: `jsonb_each`, any key): one entry per key with its JSON path, so the row's value is
        looked up directly (a join of the row's keys with the expected ones costs a parse of the
        row per key: measured 40 % slower); a key that no path can name exactly (a `"` in it)
        is checked on the page read only."""
        entries = []
        for key, value in expect.items():
            path = _json_paths([key], self.dialect)
            if path is not None:
                entries.append(
                    {"path": path[0], "empty": True}
                    if value is None or value == ""
                    else {"path": path[0], "value": value}
                )
        return entries

    # -- row lifecycle: holds -------------------------------------------------------------

    def hold_rows(
        self,
        table_id: str,
        request_id: str,
        status: RowStatus,
        *,
        row_ids: Sequence[str] | None = None,
        empty_keys: Sequence[str] | None = None,
        connection: Connection | None = None,
    ) -> int:
        """Mark rows `queued` or `running` for a request, in ONE statement; returns rows marked.

        `row_ids` None means every row of the table; `empty_keys` (a whole-table selection) then
        narrows it to rows with at least one of those cells empty, the only ones the job will
        fill. The ids travel as one JSON parameter, so a page or a whole selection is still one
        statement whatever its size.

        Guarded like a status transition: nothing is held for a request that has ended (a late
        page of a job closed under it), and on Postgres the request row is share-locked for the
        statement, so an ending that races with it either sees these rows or prevents them. A
        `queued` hold never takes a row another job is `running` on; a `running` hold takes any.
        Rows already held this way are not rewritten. `connection` joins a caller's transaction
        (enqueue holds in the transaction that inserts the request).
        """
        if status not in (RowStatus.QUEUED, RowStatus.RUNNING):
            raise ValueError(f"a hold is queued or running, not {status}")
        if row_ids is not None and not row_ids:
            return 0
        clauses = []
        params: dict[str, Any] = {
            "table": table_id,
            "request": request_id,
            "status": status.value,
        }
        if row_ids is not None:
            clauses.append(_HOLD_IDS[self.dialect])
            params["ids"] = jsontext.dumps(list(row_ids))
        keys = _json_paths(empty_keys, self.dialect) if empty_keys is not None else None
        if keys is not None:
            clauses.append(_HOLD_EMPTY[self.dialect])
            params["keys"] = json.dumps(keys)
        if status is RowStatus.QUEUED:
            clauses.append("NOT (r.status = 'running' AND r.pending_request_id IS NOT NULL)")
        statement = text(
            _HOLD_SQL[self.dialect].format(where="".join(f" AND {c}" for c in clauses))
        )
        if connection is not None:
            return int(connection.execute(statement, params).rowcount or 0)
        with self.engine.begin() as own:
            return int(own.execute(statement, params).rowcount or 0)

    def release_rows(self, request_id: str, *, page_size: int = 5000) -> int:
        """Let go of every row `request_id` still holds; returns how many.

        Each row's status, confidence and error are recomputed from its `meta` (what its cells
        say, including whatever the job wrote before it stopped): one read and one write per
        page of held rows, a single read when none is held (`ix_rows_pending_request_id_id`).
        Safe to repeat, and safe against a race: a row taken by another request meanwhile is
        left to it.
        """
        released = 0
        last = ""
        while True:
            query = (
                select(GlazeRow.id, GlazeRow.meta)
                .where(GlazeRow.pending_request_id == request_id, GlazeRow.id > last)
                .order_by(GlazeRow.id)
                .limit(page_size)
            )
            if self.dialect == "postgresql":
                query = query.with_for_update()  # no write lands between the read and ours
            with self.engine.begin() as connection:
                found = connection.execute(query).all()
                if not found:
                    return released
                payload = []
                for row in found:
                    status, confidence, error = aggregate_row(row.meta or {})
                    payload.append(
                        {
                            "id": row.id,
                            "status": status.value,
                            "confidence": confidence,
                            "error": error,
                        }
                    )
                result = connection.execute(
                    text(_RELEASE_SQL[self.dialect]),
                    {"payload": jsontext.dumps(payload), "request": request_id},
                )
            released += int(result.rowcount or 0)
            if len(found) < page_size:
                return released
            last = found[-1].id

    def held_by_ended_requests(self) -> list[str]:
        """Requests that have ended (or no longer exist) yet still hold rows: what an ending
        that died before letting go leaves behind. One statement: a skip scan over the held
        rows' index, so it costs one probe per distinct holder, not one per held row."""
        with self.engine.connect() as connection:
            return list(connection.scalars(text(_HELD_BY_ENDED_SQL)))

    def held_rows(self, request_id: str) -> int:
        """How many rows `request_id` holds (tests, status pages)."""
        with self.engine.connect() as connection:
            return int(
                connection.scalar(
                    select(func.count()).where(GlazeRow.pending_request_id == request_id)
                )
                or 0
            )

    # -- requests (jobs) ----------------------------------------------------------------

    def get_request(self, request_id: str) -> EnrichmentRequest:
        with self.session() as session:
            request = session.get(EnrichmentRequest, request_id)
            if request is None:
                raise UnknownRequestError(f"unknown request {request_id!r}")
            return request

    def record_llm_calls(self, request_id: str | None, calls: Sequence[LlmCall]) -> None:
        """Write LLM attempts to `llm_calls`, one statement."""
        if not calls:
            return
        now = utcnow()
        rows = [
            {
                "request_id": request_id,
                "operation": call.operation,
                "prompt_version": call.prompt_version,
                "model": call.model,
                "attempt": call.attempt,
                "outcome": call.outcome,
                "prompt_tokens": call.prompt_tokens,
                "completion_tokens": call.completion_tokens,
                "cost": call.cost,
                "latency_ms": call.latency_ms,
                "error": call.error,
                "at": now,
            }
            for call in calls
        ]
        with self.engine.begin() as connection:
            connection.execute(insert(LlmCallRecord), rows)

    def llm_usage(self, request_id: str) -> LlmUsage:
        """What a request's LLM calls used, summed over every attempt."""
        query = select(
            func.count(),
            func.coalesce(func.sum(LlmCallRecord.prompt_tokens), 0),
            func.coalesce(func.sum(LlmCallRecord.completion_tokens), 0),
            func.coalesce(func.sum(LlmCallRecord.cost), 0.0),
        ).where(LlmCallRecord.request_id == request_id)
        with self.engine.connect() as connection:
            calls, prompt, completion, cost = connection.execute(query).one()
        return LlmUsage(int(calls), int(prompt), int(completion), round(float(cost), 6))

    def record_observations(self, observed: Mapping[tuple[str, str], Observation]) -> None:
        """Add what a chunk's lookups answered to each (provider, key kind)'s history.

        One upsert adds every row's counts, the fields' pairs summed key by key in SQL, so
        concurrent chunks add up (a read-then-write would lose one's counts on SQLite, which
        reads outside the write transaction) and a chunk costs one statement.
        """
        observed = {key: o for key, o in observed.items() if o.lookups}
        if not observed:
            return
        now = datetime.now(UTC)
        payload = [
            {
                "provider": provider,
                "key_kind": kind,
                "lookups": o.lookups,
                "found": o.found,
                "charged": o.charged,
                "errors": o.errors,
                "fields": o.fields,
            }
            for (provider, kind), o in sorted(observed.items())
        ]
        with self.engine.begin() as connection:
            statement = text(_ADD_OBSERVATIONS_SQL[self.dialect]).bindparams(
                bindparam("now", type_=DateTime(timezone=True))
            )
            connection.execute(statement, {"payload": json.dumps(payload), "now": now})

    def provider_observations(self) -> dict[tuple[str, str], tuple[Observation, datetime]]:
        """Every provider's history by key kind, with the time it starts from."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(ProviderObservation)).all()
        return {
            (row.provider, row.key_kind): (
                Observation(row.lookups, row.found, row.charged, row.errors, dict(row.fields)),
                _aware(row.since),
            )
            for row in rows
        }

    def request_for_run(self, run_id: str) -> str | None:
        with self.engine.connect() as connection:
            found = connection.scalar(
                select(EnrichmentRequest.id).where(EnrichmentRequest.run_id == run_id).limit(1)
            )
        return str(found) if found is not None else None

    def recent_requests(self, limit: int = 20) -> list[RequestSummary]:
        """The latest `limit` requests, newest first (the CLI's `status`)."""
        query = (
            select(
                EnrichmentRequest.id,
                EnrichmentRequest.table_id,
                EnrichmentRequest.kind,
                EnrichmentRequest.status,
                EnrichmentRequest.cells_done,
                EnrichmentRequest.cells_total,
                EnrichmentRequest.cost,
                EnrichmentRequest.created_at,
            )
            .order_by(EnrichmentRequest.created_at.desc())
            .limit(limit)
        )
        with self.engine.connect() as connection:
            return [RequestSummary(*row) for row in connection.execute(query)]


# A new request's counters and flags (the database has the same server defaults, 0003).
REQUEST_DEFAULTS: dict[str, Any] = {
    "kind": "enrich",
    "priority": 0,
    "status": "queued",
    "cancel_requested": False,
    "cells_total": 0,
    "cells_done": 0,
    "cells_failed": 0,
    "cells_not_found": 0,
    "cells_skipped": 0,
    "rows_total": 0,
    "rows_written": 0,
    "entities": 0,
    "cache_hits": 0,
    "provider_calls": {},
    "cost_by_provider": {},
    "cost": 0.0,
    "budget_reserved": 0.0,
    "entities_done": 0,
}

# `stamp` = 1: an engine write (status, confidence, error, last_run_at set); 0: a user edit.
# An engine write lets go of the rows its request (`:request`) holds and sets their status; a
# row held by another request keeps that hold's status (it lets go of the row itself later).
# `expect` makes the write a compare-and-set: every key in it must still hold that value (JSON
# null: the cell is empty, i.e. missing, null or ""), else the row is not written nor returned.
# On Postgres `data` and `meta` are positions in `:docs`, the page's distinct objects, parsed
# once in a MATERIALIZED CTE (inlined, a generic plan could parse them once per row).
# On SQLite it is a list of {path, value | empty} (see `Store._expectation`); `->>` compares SQL
# values: text as text, numbers as numbers, objects as their JSON text, "1" never equal to 1.
_PATCH_SQL = {
    "postgresql": """
        WITH docs AS MATERIALIZED (SELECT CAST(:docs AS jsonb) AS a)
        UPDATE rows AS r SET
            data = r.data || v.data,
            meta = r.meta || v.meta,
            status = CASE WHEN v.stamp = 1 AND (r.pending_request_id IS NULL
                               OR r.pending_request_id = CAST(:request AS text))
                          THEN v.status ELSE r.status END,
            pending_request_id = CASE WHEN v.stamp = 1
                                       AND r.pending_request_id = CAST(:request AS text)
                                      THEN NULL ELSE r.pending_request_id END,
            confidence = CASE WHEN v.stamp = 1 THEN v.confidence ELSE r.confidence END,
            error = CASE WHEN v.stamp = 1 THEN v.error ELSE r.error END,
            last_run_at = CASE WHEN v.stamp = 1 THEN CAST(:now AS timestamptz)
                               ELSE r.last_run_at END
        FROM (
            SELECT p.id, docs.a -> p.data AS data, docs.a -> p.meta AS meta, p.status,
                   p.confidence, p.error, p.stamp, p.expect
            FROM docs, jsonb_to_recordset(CAST(:payload AS jsonb)) AS p(
                id text, data int, meta int, status text, confidence double precision,
                error text, stamp int, expect jsonb)
        ) AS v
        WHERE r.id = v.id
          AND NOT EXISTS (
              SELECT 1 FROM jsonb_each(v.expect) AS e(key, value)
              WHERE CASE WHEN e.value = 'null'::jsonb
                         THEN COALESCE(r.data ->> e.key, '') <> ''
                         ELSE (r.data -> e.key) IS DISTINCT FROM e.value END)
        RETURNING r.id
    """,
    "sqlite": """
        UPDATE rows SET
            data = json_patch(rows.data, v.data),
            meta = json_patch(rows.meta, v.meta),
            status = CASE WHEN v.stamp = 1 AND (rows.pending_request_id IS NULL
                               OR rows.pending_request_id = :request)
                          THEN v.status ELSE rows.status END,
            pending_request_id = CASE WHEN v.stamp = 1 AND rows.pending_request_id = :request
                                      THEN NULL ELSE rows.pending_request_id END,
            confidence = CASE WHEN v.stamp = 1 THEN v.confidence ELSE rows.confidence END,
            error = CASE WHEN v.stamp = 1 THEN v.error ELSE rows.error END,
            last_run_at = CASE WHEN v.stamp = 1 THEN :now ELSE rows.last_run_at END
        FROM (
            SELECT value ->> '$.id' AS id, value -> '$.data' AS data, value -> '$.meta' AS meta,
                   value ->> '$.status' AS status, value ->> '$.confidence' AS confidence,
                   value ->> '$.error' AS error, value ->> '$.stamp' AS stamp,
                   value -> '$.expect' AS expect
            FROM json_each(:payload)
        ) AS v
        WHERE rows.id = v.id
          AND NOT EXISTS (
              SELECT 1 FROM json_each(v.expect) AS e
              WHERE CASE WHEN e.value ->> '$.empty'
                         THEN COALESCE(rows.data ->> (e.value ->> '$.path'), '') <> ''
                         ELSE (rows.data ->> (e.value ->> '$.path'))
                              IS NOT (e.value ->> '$.value') END)
        RETURNING rows.id
    """,
}

# A hold: only while the request is open (queued, launched, running). On Postgres the request
# row is KEY SHARE locked, which conflicts with the FOR UPDATE every status transition takes
# first (and not with heartbeats): an ending either waits for this statement to commit, and
# then its release sees these rows, or commits first, and then nothing is held.
_OPEN = "('queued', 'launched', 'running')"
_HOLD_SQL = {
    "postgresql": f"""
        WITH live AS (
            SELECT id FROM enrichment_requests
            WHERE id = :request AND status IN {_OPEN}
            FOR KEY SHARE
        )
        UPDATE rows AS r SET status = :status, pending_request_id = live.id
        FROM live
        WHERE r.table_id = :table
          AND (r.pending_request_id IS DISTINCT FROM live.id OR r.status <> :status){{where}}
    """,
    "sqlite": f"""
        UPDATE rows AS r SET status = :status, pending_request_id = :request
        WHERE r.table_id = :table
          AND (r.pending_request_id IS NOT :request OR r.status <> :status)
          AND EXISTS (
              SELECT 1 FROM enrichment_requests
              WHERE id = :request AND status IN {_OPEN}
          ){{where}}
    """,
}
_HOLD_IDS = {
    "postgresql": "r.id IN (SELECT jsonb_array_elements_text(CAST(:ids AS jsonb)))",
    "sqlite": "r.id IN (SELECT value FROM json_each(:ids))",
}
# The cell is empty as the engine sees it (`data.get(key) in (None, "")`): missing, JSON null
# or "". Keys are JSON paths on SQLite (`$."key"`), plain keys on Postgres.
_HOLD_EMPTY = {
    "postgresql": (
        "EXISTS (SELECT 1 FROM jsonb_array_elements_text(CAST(:keys AS jsonb)) AS k(key)"
        " WHERE COALESCE(r.data ->> k.key, '') = '')"
    ),
    "sqlite": (
        "EXISTS (SELECT 1 FROM json_each(:keys) AS k WHERE COALESCE(r.data ->> k.value, '') = '')"
    ),
}
# Driven by the payload through the primary key: on SQLite the unary `+` keeps the planner off
# the held-rows index, which would rescan the payload once per held row (measured: minutes).
_RELEASE_SQL = {
    "postgresql": """
        UPDATE rows AS r SET
            status = v.status, confidence = v.confidence, error = v.error,
            pending_request_id = NULL
        FROM jsonb_to_recordset(CAST(:payload AS jsonb)) AS v(
            id text, status text, confidence double precision, error text)
        WHERE r.id = v.id AND r.pending_request_id = :request
    """,
    "sqlite": """
        UPDATE rows SET
            status = v.status, confidence = v.confidence, error = v.error,
            pending_request_id = NULL
        FROM (
            SELECT value ->> '$.id' AS id, value ->> '$.status' AS status,
                   value ->> '$.confidence' AS confidence, value ->> '$.error' AS error
            FROM json_each(:payload)
        ) AS v
        WHERE rows.id = v.id AND +rows.pending_request_id = :request
    """,
}
# Distinct holders by a recursive skip scan of the partial index on held rows (both databases),
# then those whose request is not open.
_HELD_BY_ENDED_SQL = f"""
    WITH RECURSIVE holders(id) AS (
        SELECT MIN(pending_request_id) FROM rows WHERE pending_request_id IS NOT NULL
        UNION ALL
        SELECT (SELECT MIN(r.pending_request_id) FROM rows AS r
                WHERE r.pending_request_id > holders.id)
        FROM holders WHERE holders.id IS NOT NULL
    )
    SELECT holders.id FROM holders
    LEFT JOIN enrichment_requests AS q ON q.id = holders.id
    WHERE holders.id IS NOT NULL AND (q.id IS NULL OR q.status NOT IN {_OPEN})
    ORDER BY holders.id
"""


def _json_paths(keys: Sequence[str], dialect: str) -> list[str] | None:
    """Data keys as the dialect's JSON lookups; None when one cannot be written exactly (a `"`
    in a key on SQLite): the hold then takes every row, and the job's release corrects it."""
    if dialect == "postgresql":
        return list(keys)
    if any('"' in key for key in keys):
        return None
    return [f'$."{key}"' for key in keys]


# One write of `apply_patches`: (row id, data, meta, status, confidence, error, stamp, expect).
_Entry = tuple[
    str,
    Mapping[str, Any],
    Mapping[str, Any],
    str | None,
    float | None,
    str | None,
    int,
    Mapping[str, Any] | None,
]


def _documents_payload(entries: Sequence[_Entry]) -> dict[str, Any]:
    """A page for Postgres's statement: each distinct `data` / `meta` object once in `docs`,
    and one small record per row that names them by position.

    Rows about the same entity carry the same objects (the engine builds them once per entity
    and outcome), so each is encoded once, and the server parses it once instead of once per
    row: parsing the page's JSON was ~40 % of the statement's CPU. Objects are told apart by
    identity first (no encoding at all), then by their text (equal objects built apart); a
    `SharedDocument` is encoded once whatever the page."""
    encode = jsontext.dumps
    docs: list[str] = []
    by_text: dict[str, int] = {}
    by_object: dict[int, int] = {}  # id() is safe: every object is alive until we return

    def ref(document: Mapping[str, Any]) -> int:
        found = by_object.get(id(document))
        if found is None:
            if isinstance(document, SharedDocument):
                try:
                    encoded = document.text
                except AttributeError:
                    encoded = document.text = encode(document)
            else:
                encoded = encode(document)
            found = by_text.get(encoded)
            if found is None:
                found = by_text[encoded] = len(docs)
                docs.append(encoded)
            by_object[id(document)] = found
        return found

    rows = [
        {
            "id": row_id,
            "data": ref(data),
            "meta": ref(meta),
            "status": status,
            "confidence": confidence,
            "error": error,
            "stamp": stamp,
            "expect": expect or None,
        }
        for row_id, data, meta, status, confidence, error, stamp, expect in entries
    ]
    return {"payload": encode(rows), "docs": f"[{','.join(docs)}]"}


def _page_sizes(first: int, grow_to: int | None) -> Iterator[int]:
    """`first`, then each size twice the last, up to `grow_to` (None: `first` throughout)."""
    size = first
    while True:
        yield size
        size = max(size, min(2 * size, grow_to or size))


def _unknown_rows(table_id: str, wanted: Sequence[str], present: set[str]) -> UnknownRowError:
    missing = [row_id for row_id in wanted if row_id not in present]
    return UnknownRowError(
        f"unknown row ids in table {table_id}: {', '.join(missing[:10])}"
        + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
    )


def user_edit_meta() -> dict[str, Any]:
    """A user-edited cell's `meta`: every key an engine outcome sets, cleared (JSON null: a
    merge replaces them on both databases), and who and when."""
    return {
        "status": None,
        "confidence": None,
        "source": "user",
        "fetched_at": None,
        "error": None,
        "request_id": None,
        "edited_at": utcnow().isoformat(),
    }


def _full_row(row: GlazeRow) -> FullRow:
    return FullRow(
        row.id,
        row.position,
        row.data or {},
        row.meta or {},
        row.status,
        row.confidence,
        row.error,
        row.last_run_at,
    )


def lenient_json_loads(value: str) -> Any:
    """JSON text decoded, or the text itself when it is not JSON (what the app may write)."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for another database or an in-memory one."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.query.get("mode") == "memory":
        return None
    return Path(parsed.database)


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = sqlite_file(url)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        # A JSON value the app wrote that is not JSON (SQLite cannot refuse it) reads back as
        # its text, so one malformed request is shown and rejected instead of crashing readers.
        engine = create_engine(
            url, connect_args={"timeout": 30}, json_deserializer=lenient_json_loads
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets the UI read while a job writes; busy_timeout makes writers queue, not fail.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def chunked(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _aware(moment: datetime) -> datetime:
    """SQLite hands timestamps back without their zone; they were written in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
