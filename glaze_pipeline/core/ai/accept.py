"""Accepting an AI proposal: create or extend its table, all or nothing, once.

A completed AI request holds a proposal (`result`); accepting it writes the table (created
with the id reserved at enqueue, or the existing one extended), the proposed columns with
what fills each (a catalogue field, or an AI column's prompt) and the proposed rows with their
identifiers, in ONE transaction: a row or column that fails its checks rolls back everything
written before it.

Accepting is idempotent: the table's row is locked first, so accepts of one table queue; a
column the table already has with the same meaning is not added again, and a suggested row
naming an entity the table already has (same normalised domain, LinkedIn or email, as
detection normalises them; else the same name) is skipped. Accepting twice adds nothing the
second time and answers the same table. A proposed column whose key the table already uses
for something else is skipped and reported in `notes`, with the values rows had under it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from glaze_pipeline.core.ai.columns import check_template
from glaze_pipeline.core.ai.suggestions import (
    ColumnProposal,
    TableSpec,
    existing_column,
    row_columns,
    row_identifiers,
)
from glaze_pipeline.core.ai.workflow import (
    Proposal,
    ProposedColumn,
    ai_kind,
    column_meaning,
    entity_type_of,
)
from glaze_pipeline.core.detection import NAME_MAX_CHARS
from glaze_pipeline.core.errors import InputError, InvalidSelectionError, UnknownTableError
from glaze_pipeline.core.fields import parse_field
from glaze_pipeline.core.limits import MAX_COLUMN_KEY, MAX_COLUMN_LABEL, MAX_TABLE_NAME, check_text
from glaze_pipeline.core.models import RequestKind, RequestStatus
from glaze_pipeline.core.schema import GlazeColumn, GlazeRow, GlazeTable
from glaze_pipeline.core.store import Store, new_id

ROW_BATCH = 1000  # rows per INSERT statement
# A suggested row holds identifiers only: a name, a domain, an email, a LinkedIn URL.
MAX_ROW_VALUE = NAME_MAX_CHARS
CREATES_TABLE = frozenset({RequestKind.TABLE_SUGGESTIONS, RequestKind.TABLE_GENERATION})


class ProposalNotAcceptableError(InputError):
    """A request whose proposal cannot be accepted (not an AI request, not completed, a
    proposal that does not validate); the message says which."""


@dataclass(frozen=True)
class Accepted:
    """What accepting wrote: the table, whether it was created, the columns and rows added,
    the suggested rows skipped as already in the table, and what else was left out, why."""

    table_id: str
    created: bool
    columns_added: list[str]
    rows_added: int
    rows_duplicate: int
    notes: tuple[str, ...] = ()


def accept_proposal(store: Store, request_id: str, *, with_rows: bool = True) -> Accepted:
    """Write a completed AI request's proposal into its table (see the module docstring).

    `with_rows=False`: the table and columns only. Raises UnknownRequestError, a
    ProposalNotAcceptableError (not completed, not an AI request, a malformed proposal), an
    UnknownTableError (the table of column or row suggestions is gone), or an InputError naming
    the column or row that fails its checks; nothing is written then.
    """
    request = store.get_request(request_id)
    try:
        kind = ai_kind(request.kind)
    except InvalidSelectionError:
        raise ProposalNotAcceptableError(
            f"request {request_id} is an {request.kind} job, not an AI proposal"
        ) from None
    if request.status != RequestStatus.SUCCEEDED.value:
        raise ProposalNotAcceptableError(
            f"request {request_id} is {request.status}: only a completed proposal can be accepted"
        )
    proposal = _proposal(request_id, request.result)
    try:
        return _accept(store, request.table_id, kind, proposal, with_rows=with_rows)
    except IntegrityError:
        # Another accept created the same table first (Postgres: its INSERT waited on ours):
        # now the table exists, and accepting again adds only what it lacks.
        return _accept(store, request.table_id, kind, proposal, with_rows=with_rows)


def _proposal(request_id: str, result: Any) -> Proposal:
    if not isinstance(result, Mapping):
        raise ProposalNotAcceptableError(f"request {request_id} holds no proposal")
    try:
        return Proposal.model_validate(dict(result))
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()[:5]
        )
        raise ProposalNotAcceptableError(
            f"request {request_id}'s proposal is malformed: {problems}"
        ) from None


@dataclass
class _Plan:
    """What one accept decided, as it goes."""

    created: bool = False
    columns_added: list[str] = field(default_factory=list)
    rows_added: int = 0
    rows_duplicate: int = 0
    notes: list[str] = field(default_factory=list)
    # A proposed row's key -> the table's column that holds its value.
    keys: dict[str, str] = field(default_factory=dict)


def _accept(
    store: Store, table_id: str, kind: RequestKind, proposal: Proposal, *, with_rows: bool
) -> Accepted:
    plan = _Plan()
    with store.engine.begin() as connection:
        # The first statement writes: it locks the table's row (Postgres) or takes SQLite's
        # write lock, so concurrent accepts of one table run one after the other.
        exists = bool(
            connection.execute(
                update(GlazeTable).where(GlazeTable.id == table_id).values(name=GlazeTable.name)
            ).rowcount
        )
        if not exists:
            _create_table(connection, table_id, kind, proposal)
            plan.created = True
        elif proposal.table is not None and kind in CREATES_TABLE:
            name = connection.scalar(select(GlazeTable.name).where(GlazeTable.id == table_id))
            if name != proposal.table.name:
                plan.notes.append(
                    f"table {table_id} exists: its name {name!r} is kept "
                    f"(proposed: {proposal.table.name!r})"
                )
        columns = _add_columns(
            connection, table_id, proposal.columns, _columns(connection, table_id), plan
        )
        if with_rows and proposal.rows:
            _add_rows(connection, table_id, proposal, columns, plan)
    return Accepted(
        table_id=table_id,
        created=plan.created,
        columns_added=plan.columns_added,
        rows_added=plan.rows_added,
        rows_duplicate=plan.rows_duplicate,
        notes=tuple(plan.notes),
    )


def _create_table(
    connection: Connection, table_id: str, kind: RequestKind, proposal: Proposal
) -> None:
    if kind not in CREATES_TABLE or proposal.table is None:
        raise UnknownTableError(
            f"unknown table {table_id!r}: the table this proposal extends no longer exists"
        )
    check_text("table name", proposal.table.name, MAX_TABLE_NAME)
    connection.execute(
        insert(GlazeTable).values(
            id=table_id, name=proposal.table.name, description=proposal.table.description
        )
    )


@dataclass(frozen=True)
class _Column:
    """A column of the table as accepting compares it: its key and what it means."""

    key: str
    label: str
    field: str | None  # the catalogue field it means (explicit, else from its key)
    prompt: str | None

    @property
    def meaning(self) -> str | None:
        return self.prompt.strip() if self.prompt else self.field

    def spec(self) -> ColumnProposal:
        """The column as suggestions see it (what identifies a row's entity)."""
        return existing_column(self.key, self.label, self.field, self.prompt)


def _columns(connection: Connection, table_id: str) -> list[_Column]:
    rows = connection.execute(
        select(GlazeColumn.key, GlazeColumn.label, GlazeColumn.field, GlazeColumn.prompt)
        .where(GlazeColumn.table_id == table_id)
        .order_by(GlazeColumn.position)
    ).all()
    return [
        _Column(
            row.key,
            row.label,
            None if row.prompt else column_meaning(row.key, row.field),
            row.prompt,
        )
        for row in rows
    ]


def _meaning(column: ProposedColumn) -> str | None:
    return column.prompt.strip() if column.role == "ai" and column.prompt else column.field


def _add_columns(
    connection: Connection,
    table_id: str,
    proposed: Sequence[ProposedColumn],
    existing: Sequence[_Column],
    plan: _Plan,
) -> list[_Column]:
    """Insert the proposed columns the table lacks; map every row key to the column holding it.
    The table's columns afterwards, in position order (no second read in the transaction)."""
    by_key = {column.key: column for column in existing}
    by_meaning = {column.meaning: column for column in existing if column.meaning}
    plan.keys = {column.key: column.key for column in existing}
    position = _next_position(connection, GlazeColumn, table_id)
    already: list[str] = []
    for column in proposed:
        meaning = _meaning(column)
        same_key = by_key.get(column.key)
        if same_key is not None:
            if same_key.meaning == meaning:
                already.append(column.key)
            else:
                plan.keys.pop(column.key, None)
                plan.notes.append(
                    f"column {column.key!r} not added: the table's {column.key!r} means "
                    f"{same_key.meaning or 'no field'}, the proposal {meaning or 'no field'}"
                )
            continue
        if meaning is not None and meaning in by_meaning:
            holder = by_meaning[meaning]
            plan.keys[column.key] = holder.key
            plan.notes.append(
                f"column {column.key!r} not added: column {holder.key!r} already holds {meaning}"
            )
            continue
        values = _column_values(column)
        connection.execute(
            insert(GlazeColumn).values(
                id=new_id("col"), table_id=table_id, position=position, **values
            )
        )
        position += 1
        added = _Column(column.key, column.label, values["field"], values["prompt"])
        by_key[column.key] = added
        if meaning is not None:
            by_meaning[meaning] = added
        plan.keys[column.key] = column.key
        plan.columns_added.append(column.key)
    if already:
        plan.notes.append(f"columns already in the table, not added again: {', '.join(already)}")
    return list(by_key.values())


def _column_values(column: ProposedColumn) -> dict[str, Any]:
    """A proposed column as stored, checked as the store checks a new table's columns."""
    check_text("column key", column.key, MAX_COLUMN_KEY)
    check_text(f"label of column {column.key!r}", column.label, MAX_COLUMN_LABEL)
    # An AI column is filled by its prompt, any other by its catalogue field: never both.
    if column.role == "ai":
        if not column.prompt:
            raise InputError(f"AI column {column.key!r} has no prompt")
        catalogue_field, prompt = None, check_template(column.prompt)
    else:
        if not column.field:
            raise InputError(f"{column.role} column {column.key!r} names no catalogue field")
        catalogue_field, prompt = str(parse_field(column.field)), None
    return {
        "key": column.key,
        "label": column.label,
        "data_type": column.data_type,
        "field": catalogue_field,
        "prompt": prompt,
    }


def _add_rows(
    connection: Connection,
    table_id: str,
    proposal: Proposal,
    columns: Sequence[_Column],
    plan: _Plan,
) -> None:
    """Insert the proposed rows whose entity the table does not have yet, in batches."""
    specs = [column.spec() for column in columns]
    table = TableSpec("", None, entity_type_of(specs), tuple(specs))
    identifiers, _ = row_columns(table)
    known: set[str] = set()
    for data in _row_data(connection, table_id):
        known |= row_identifiers(data, identifiers)
    position = _next_position(connection, GlazeRow, table_id)
    batch: list[dict[str, Any]] = []
    unplaced: set[str] = set()
    unidentified = 0
    for number, row in enumerate(proposal.rows, 1):
        values: dict[str, str] = {}
        for key, value in row.values.items():
            _check_value(number, key, value)
            if key in plan.keys:
                values[plan.keys[key]] = value
            else:
                unplaced.add(key)
        identity = row_identifiers(values, identifiers)
        if not identity:
            unidentified += 1
            continue
        if identity & known:
            plan.rows_duplicate += 1
            continue
        known |= identity
        batch.append(
            {
                "id": new_id("row"),
                "table_id": table_id,
                "position": position,
                "data": values,
                "meta": {},
                "status": "idle",
            }
        )
        position += 1
        if len(batch) == ROW_BATCH:
            connection.execute(insert(GlazeRow), batch)
            plan.rows_added += len(batch)
            batch = []
    if batch:
        connection.execute(insert(GlazeRow), batch)
        plan.rows_added += len(batch)
    if unplaced:
        plan.notes.append(
            f"row values under {', '.join(sorted(unplaced))} not written: no column holds them"
        )
    if unidentified:
        plan.notes.append(f"{unidentified} rows not added: no identifier left to find them by")


def _check_value(number: int, key: str, value: Any) -> None:
    if not isinstance(value, str):
        raise InputError(f"proposed row {number}: the value of {key!r} is not text")
    if len(value) > MAX_ROW_VALUE:
        raise InputError(
            f"proposed row {number}: the value of {key!r} is {len(value)} characters long; "
            f"the limit is {MAX_ROW_VALUE}"
        )
    if not value.isprintable():
        raise InputError(f"proposed row {number}: the value of {key!r} holds control characters")


def _row_data(
    connection: Connection, table_id: str, page_size: int = 5000
) -> Iterator[dict[str, Any]]:
    """The table's rows' data, a page at a time (keyset by id), in the accept's transaction."""
    last = ""
    while True:
        page = connection.execute(
            select(GlazeRow.id, GlazeRow.data)
            .where(GlazeRow.table_id == table_id, GlazeRow.id > last)
            .order_by(GlazeRow.id)
            .limit(page_size)
        ).all()
        for row in page:
            yield row.data if isinstance(row.data, dict) else {}
        if len(page) < page_size:
            return
        last = page[-1].id


def _next_position(connection: Connection, model: Any, table_id: str) -> int:
    highest = connection.scalar(select(func.max(model.position)).where(model.table_id == table_id))
    return int(highest) + 1 if highest is not None else 0
