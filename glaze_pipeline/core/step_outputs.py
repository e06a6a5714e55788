"""Step outputs kept in the app database, so that a step running on another process or machine
can read what the steps before it produced (the Dagster IO manager in defs/io_manager.py is the
adapter; this is the storage).

A row is one output of one step of one run, keyed by (run_id, step_key, output_name,
mapping_key), its value pickled. Writing is an upsert (a retried step writes its output again).
Rows are history for a re-execution from failure (which reads the parent run's outputs), so
they are kept `RETENTION` and then purged (`purge_older_than`), or cleared per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql.elements import ColumnElement

from glaze_pipeline.core.schema import StepOutputRecord
from glaze_pipeline.core.store import Store

RETENTION = timedelta(days=7)


@dataclass(frozen=True)
class StepOutputKey:
    run_id: str
    step_key: str
    output_name: str
    mapping_key: str = ""

    def __str__(self) -> str:
        item = f"[{self.mapping_key}]" if self.mapping_key else ""
        return f"{self.step_key}.{self.output_name}{item} of run {self.run_id}"


class StepOutputMissing(LookupError):
    """No stored output under the key: the producing step never wrote it, or it was purged."""


def _where(key: StepOutputKey) -> tuple[ColumnElement[bool], ...]:
    table = StepOutputRecord
    return (
        table.run_id == key.run_id,
        table.step_key == key.step_key,
        table.output_name == key.output_name,
        table.mapping_key == key.mapping_key,
    )


def save(store: Store, key: StepOutputKey, payload: bytes) -> None:
    """Write one output (one statement), replacing what a previous attempt wrote."""
    insert = postgres_insert if store.dialect == "postgresql" else sqlite_insert
    values = {
        "run_id": key.run_id,
        "step_key": key.step_key,
        "output_name": key.output_name,
        "mapping_key": key.mapping_key,
        "payload": payload,
        "created_at": datetime.now(UTC),
    }
    statement = insert(StepOutputRecord).values(**values)
    statement = statement.on_conflict_do_update(
        index_elements=["run_id", "step_key", "output_name", "mapping_key"],
        set_={"payload": statement.excluded.payload, "created_at": statement.excluded.created_at},
    )
    with store.engine.begin() as connection:
        connection.execute(statement)


def load(store: Store, key: StepOutputKey) -> bytes:
    """The stored payload (one statement); StepOutputMissing if there is none."""
    with store.engine.connect() as connection:
        payload = connection.execute(
            select(StepOutputRecord.payload).where(*_where(key))
        ).scalar_one_or_none()
    if payload is None:
        raise StepOutputMissing(f"no stored output {key}")
    return bytes(payload)


def clear_run(store: Store, run_id: str) -> int:
    """Delete a run's outputs; how many there were."""
    with store.engine.begin() as connection:
        result = connection.execute(
            delete(StepOutputRecord).where(StepOutputRecord.run_id == run_id)
        )
    return int(result.rowcount or 0)


def purge_older_than(
    store: Store, age: timedelta = RETENTION, *, now: datetime | None = None
) -> int:
    """Delete the outputs written more than `age` ago (one indexed statement); how many."""
    cutoff = (now or datetime.now(UTC)) - age
    with store.engine.begin() as connection:
        result = connection.execute(
            delete(StepOutputRecord).where(StepOutputRecord.created_at < cutoff)
        )
    return int(result.rowcount or 0)
