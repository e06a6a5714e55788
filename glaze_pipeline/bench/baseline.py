"""The cell-level baseline: seed 001's design, rebuilt faithfully enough to measure.

One task per cell, kept in a `cell_tasks` table this benchmark creates (next to a `cell_jobs`
table) in the baseline's own database. As seed 001 describes it:

1. the API, in one transaction: the job row, then one INSERT per cell task (queued), and the
   rows marked queued (one bulk UPDATE here, which is kinder than seed 001);
2. the workflow marks the job running and runs every cell task, `concurrency` at a time (the
   same limit the entity-first job gets);
3. each cell task: UPDATE its task to running (loading the row's data with RETURNING), ONE
   provider HTTP call for that cell (to the cheapest vendor that has the field: no waterfall,
   no cache, no dedupe), UPDATE the row's data key, UPDATE the task done (result, confidence),
   recompute the row's status from its tasks (one UPDATE ... FROM (SELECT ...)), UPDATE the job
   counter: five statements after the INSERT, each its own transaction, so six per cell;
4. the workflow marks the job completed.

The same providers file (same HTTP client, timeouts and limits) and the same mock serve both
paths. Statements are counted like the Store counts its own: one per statement executed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from glaze_pipeline.bench.expected import cheapest_supplier
from glaze_pipeline.bench.services import provider_configs
from glaze_pipeline.core.detection import ColumnSpec, IdentifierColumns, targets_for_row
from glaze_pipeline.core.fields import column_field
from glaze_pipeline.core.providers.base import EntityNotFound, Provider, ProviderError
from glaze_pipeline.core.providers.registry import build_provider
from glaze_pipeline.core.providers.session import provider_session
from glaze_pipeline.core.store import Store, new_id, normalize_url

CELL_TABLES = """
CREATE TABLE IF NOT EXISTS cell_jobs (
    id text PRIMARY KEY,
    table_id text NOT NULL,
    status text NOT NULL,
    total_tasks int NOT NULL,
    done_tasks int NOT NULL DEFAULT 0,
    failed_tasks int NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    completed_at timestamptz,
    error text
);
CREATE TABLE IF NOT EXISTS cell_tasks (
    id text PRIMARY KEY,
    table_id text NOT NULL,
    row_id text NOT NULL,
    column_id text NOT NULL,
    job_id text NOT NULL REFERENCES cell_jobs(id),
    status text NOT NULL,
    result jsonb,
    confidence double precision,
    error text,
    attempts int NOT NULL DEFAULT 0,
    started_at timestamptz,
    completed_at timestamptz
);
CREATE INDEX IF NOT EXISTS ix_cell_tasks_row_id ON cell_tasks (row_id);
CREATE INDEX IF NOT EXISTS ix_cell_tasks_job_id ON cell_tasks (job_id);
"""

_RUNNING = (
    "UPDATE cell_tasks AS t SET status = 'running', started_at = now(), "
    "attempts = t.attempts + 1 FROM rows AS r WHERE t.id = %(task)s AND r.id = t.row_id "
    "RETURNING r.data"
)
_WRITE_CELL = (
    "UPDATE rows SET data = jsonb_set(data, ARRAY[CAST(%(key)s AS text)], CAST(%(value)s AS jsonb)), "
    "last_run_at = now() WHERE id = %(row)s"
)
_TASK_DONE = (
    "UPDATE cell_tasks SET status = %(status)s, result = CAST(%(result)s AS jsonb), "
    "confidence = %(confidence)s, error = %(error)s, completed_at = now() WHERE id = %(task)s"
)
# seed 001's aggregation table: running > queued > all done > all failed > a mix.
_ROW_STATUS = (
    "UPDATE rows SET status = s.status FROM (SELECT CASE "
    "WHEN bool_or(status = 'running') THEN 'running' "
    "WHEN bool_or(status = 'queued') THEN 'queued' "
    "WHEN bool_and(status = 'done') THEN 'done' "
    "WHEN bool_and(status = 'failed') THEN 'failed' "
    "ELSE 'ambiguous' END AS status FROM cell_tasks WHERE row_id = %(row)s AND job_id = %(job)s) AS s "
    "WHERE rows.id = %(row)s"
)
_JOB_DONE = "UPDATE cell_jobs SET done_tasks = done_tasks + 1 WHERE id = %(job)s"
_JOB_FAILED = "UPDATE cell_jobs SET failed_tasks = failed_tasks + 1 WHERE id = %(job)s"


@dataclass
class BaselineResult:
    """What one cell-level job did."""

    rows: int
    cells: int
    statements: int
    seconds: float
    setup_seconds: float
    calls: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    values_written: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "cells": self.cells,
            "statements": self.statements,
            "wall_s": round(self.seconds, 3),
            "setup_s": round(self.setup_seconds, 3),
            "calls_counted_by_worker": dict(self.calls),
            "outcomes": dict(self.outcomes),
            "values_written": self.values_written,
        }


def create_cell_tables(database_url: str) -> None:
    """The cell-level schema of seed 001 (job + task per cell), next to the app's tables."""
    store = Store(database_url)
    try:
        with store.engine.begin() as connection:
            for statement in CELL_TABLES.split(";"):
                if statement.strip():
                    connection.execute(text(statement))
    finally:
        store.dispose()


class CountingPool:
    """A fixed pool of autocommit psycopg connections that counts the statements it runs.

    Each `execute` takes a connection, runs ONE statement (its own transaction, as an ORM
    call in a worker would) and gives the connection back: a cell task never holds one
    across its provider call.
    """

    def __init__(self, conninfo: str, size: int) -> None:
        self.conninfo = conninfo
        self.size = size
        self.statements = 0
        self._idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
        self._all: list[psycopg.AsyncConnection[Any]] = []

    async def open(self) -> None:
        for _ in range(self.size):
            connection = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
            self._all.append(connection)
            self._idle.put_nowait(connection)

    async def close(self) -> None:
        for connection in self._all:
            await connection.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        connection = await self._idle.get()
        try:
            yield connection
        finally:
            self._idle.put_nowait(connection)

    async def execute(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        async with self.connection() as connection:
            return await self.run(connection, sql, params)

    async def run(
        self, connection: psycopg.AsyncConnection[Any], sql: str, params: dict[str, Any]
    ) -> list[tuple[Any, ...]]:
        self.statements += 1
        cursor = await connection.execute(sql, params)
        return await cursor.fetchall() if cursor.description else []


def conninfo(database_url: str) -> str:
    """A libpq URL for psycopg from a SQLAlchemy one (`postgresql+psycopg://...`)."""
    url = make_url(normalize_url(database_url)).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def run_baseline(
    database_url: str,
    table_id: str,
    column_keys: list[str],
    providers_document: dict[str, Any],
    *,
    concurrency: int,
    sample_rows: int | None = None,
    pool_size: int = 40,
) -> BaselineResult:
    """One cell-level job over the first `sample_rows` rows (all rows when None)."""
    return asyncio.run(
        _run(
            database_url,
            table_id,
            column_keys,
            providers_document,
            concurrency=concurrency,
            sample_rows=sample_rows,
            pool_size=pool_size,
        )
    )


async def _run(
    database_url: str,
    table_id: str,
    column_keys: list[str],
    providers_document: dict[str, Any],
    *,
    concurrency: int,
    sample_rows: int | None,
    pool_size: int,
) -> BaselineResult:
    pool = CountingPool(conninfo(database_url), min(pool_size, concurrency))
    await pool.open()
    configs = provider_configs(providers_document)
    providers = {config.name: build_provider(config) for config in configs}
    try:
        started = time.perf_counter()
        job_id, tasks, specs = await _create_job(pool, table_id, column_keys, sample_rows)
        setup = time.perf_counter() - started
        identifiers = IdentifierColumns.from_columns(specs.values())
        result = BaselineResult(
            rows=len({row for _, row, _ in tasks}),
            cells=len(tasks),
            statements=0,
            seconds=0.0,
            setup_seconds=setup,
        )
        gate = asyncio.Semaphore(concurrency)
        suppliers = {
            spec.id: cheapest_supplier(configs, spec.field.entity_type, spec.field.name)
            for spec in specs.values()
            if spec.field is not None
        }

        async def one(task_id: str, row_id: str, column_id: str) -> None:
            async with gate:
                supplier = suppliers[column_id]
                await _cell_task(
                    pool,
                    job_id,
                    task_id,
                    row_id,
                    specs[column_id],
                    providers[supplier.name] if supplier else None,
                    identifiers,
                    result,
                )

        async with provider_session(providers.values()):
            await asyncio.gather(*(one(*task) for task in tasks))
        await pool.execute(
            "UPDATE cell_jobs SET status = CASE WHEN failed_tasks = total_tasks "
            "THEN 'failed' ELSE 'completed' END, completed_at = now() WHERE id = %(job)s",
            {"job": job_id},
        )
        result.seconds = time.perf_counter() - started
        result.statements = pool.statements
        return result
    finally:
        await pool.close()


async def _create_job(
    pool: CountingPool, table_id: str, column_keys: list[str], sample_rows: int | None
) -> tuple[str, list[tuple[str, str, str]], dict[str, ColumnSpec]]:
    """The API step: job, one task per cell (one INSERT each), rows queued; then running."""
    job_id = new_id("job")
    async with pool.connection() as connection, connection.transaction():
        columns = await pool.run(
            connection,
            "SELECT id, key, field FROM columns WHERE table_id = %(table)s",
            {"table": table_id},
        )
        specs = {c[0]: ColumnSpec(c[0], c[1], column_field(c[1], c[2])) for c in columns}
        wanted = [c[0] for c in columns if c[1] in column_keys]
        limit = "LIMIT %(limit)s" if sample_rows is not None else ""
        found = await pool.run(
            connection,
            f"SELECT id FROM rows WHERE table_id = %(table)s ORDER BY position {limit}",
            {"table": table_id, "limit": sample_rows},
        )
        row_ids = [r[0] for r in found]
        tasks = [(new_id("task"), row_id, column_id) for row_id in row_ids for column_id in wanted]
        await pool.run(
            connection,
            "INSERT INTO cell_jobs (id, table_id, status, total_tasks) "
            "VALUES (%(job)s, %(table)s, 'pending', %(total)s)",
            {"job": job_id, "table": table_id, "total": len(tasks)},
        )
        for task_id, row_id, column_id in tasks:
            await pool.run(
                connection,
                "INSERT INTO cell_tasks (id, table_id, row_id, column_id, job_id, status) "
                "VALUES (%(task)s, %(table)s, %(row)s, %(column)s, %(job)s, 'queued')",
                {
                    "task": task_id,
                    "table": table_id,
                    "row": row_id,
                    "column": column_id,
                    "job": job_id,
                },
            )
        await pool.run(
            connection,
            "UPDATE rows SET status = 'queued' WHERE id = ANY(%(ids)s)",
            {"ids": row_ids},
        )
    await pool.execute(
        "UPDATE cell_jobs SET status = 'running', started_at = now() WHERE id = %(job)s",
        {"job": job_id},
    )
    return job_id, tasks, specs


async def _cell_task(
    pool: CountingPool,
    job_id: str,
    task_id: str,
    row_id: str,
    spec: ColumnSpec,
    provider: Provider | None,
    identifiers: IdentifierColumns,
    result: BaselineResult,
) -> None:
    """One cell, as seed 001's worker runs it: statement, call, statements."""
    [(data,)] = await pool.execute(_RUNNING, {"task": task_id})
    assert spec.field is not None
    [target] = targets_for_row(row_id, data or {}, [spec], identifiers)
    value: Any = None
    confidence: float | None = None
    error: str | None = None
    status = "done"
    if target.entity is None or provider is None:
        status, error = "failed", "no identifier" if target.entity is None else "no provider"
    else:
        result.calls[provider.name] += 1
        try:
            answer = await provider.lookup(target.entity, frozenset({spec.field.name}))
            value = answer.values.get(spec.field.name)
            if value is not None:
                confidence = provider.confidence * target.entity.strength
        except EntityNotFound:
            value = None
        except ProviderError as failure:
            status, error = "failed", str(failure)
    outcome = status if status == "failed" else ("done" if value is not None else "not_found")
    result.outcomes[outcome] += 1
    payload = {"value": value, "confidence": confidence, "source": provider and provider.name}
    await pool.execute(_WRITE_CELL, {"key": spec.key, "value": json.dumps(value), "row": row_id})
    if value is not None:
        result.values_written += 1
    await pool.execute(
        _TASK_DONE,
        {
            "status": status,
            "result": json.dumps(payload),
            "confidence": confidence,
            "error": error,
            "task": task_id,
        },
    )
    await pool.execute(_ROW_STATUS, {"row": row_id, "job": job_id})
    await pool.execute(_JOB_FAILED if status == "failed" else _JOB_DONE, {"job": job_id})
