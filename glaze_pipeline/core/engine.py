"""One enrichment job, stage by stage: resolve, detect, chunk, enrich, apply, finish.

Each stage is a plain function the Dagster ops (and the tests) call. Cells are never stored as
records: detection keeps only the unique entities and the fields they need, and the apply stage
re-reads the rows page by page and re-derives each cell's entity (detection is pure and cheap),
so memory grows with unique entities, not with cells.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from glaze_pipeline.core.budget import Budget
from glaze_pipeline.core.cache import AnswerCache
from glaze_pipeline.core.detection import (
    NO_IDENTIFIER,
    ColumnSpec,
    EntityIndex,
    IdentifierColumns,
    targets_for_row,
)
from glaze_pipeline.core.estimate import DryRunProvider, ReadOnlyCache, estimate_report
from glaze_pipeline.core.models import (
    CellStatus,
    EntityOutcome,
    EntityRequest,
    FieldOutcome,
    RequestKind,
    RequestStatus,
    Selection,
)
from glaze_pipeline.core.providers.base import Provider
from glaze_pipeline.core.providers.http import provider_session
from glaze_pipeline.core.singleflight import Flight
from glaze_pipeline.core.status import aggregate_row
from glaze_pipeline.core.store import (
    GlazeError,
    InvalidSelectionError,
    RowPatch,
    RowRecord,
    Store,
    UnknownColumnError,
    utcnow,
)
from glaze_pipeline.core.waterfall import DEFAULT_THRESHOLD, Waterfall, WaterfallStats

ROW_CHANGED = "row changed during the run"
HEARTBEAT_SECONDS = 10.0


class JobCancelled(GlazeError):
    """The request's cancel flag was seen; the job stops between writes."""


Outcomes = dict[str, dict[str, FieldOutcome]]  # entity id -> field -> outcome


@dataclass(frozen=True)
class JobSettings:
    """How a job runs; every knob has a default that suits this 2-core machine."""

    budget: float | None = None
    chunk_size: int = 500
    max_chunks: int = 16
    concurrency: int = 50
    threshold: float = DEFAULT_THRESHOLD
    # Rows per read page and per write statement: the job costs about 3 statements a page.
    page_size: int = 5000
    budget_block_calls: int = 20

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget < 0:
            raise InvalidSelectionError(f"budget must be >= 0, got {self.budget}")
        for name in ("chunk_size", "max_chunks", "concurrency", "page_size"):
            if getattr(self, name) < 1:
                raise InvalidSelectionError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.threshold <= 1:
            raise InvalidSelectionError(f"threshold must be in [0, 1], got {self.threshold}")


@dataclass(frozen=True)
class JobTarget:
    """A validated selection: the columns to fill, in which rows."""

    table_id: str
    columns: tuple[ColumnSpec, ...]
    identifiers: IdentifierColumns
    row_ids: tuple[str, ...] | None = None  # None: every row of the table
    cells: dict[str, frozenset[str]] | None = None  # explicit cells: row id -> column ids
    only_empty: bool = False  # whole table: fill empty cells only, never overwrite input

    def columns_for(self, row: RowRecord) -> list[ColumnSpec]:
        if self.cells is not None:
            wanted = self.cells.get(row.id, frozenset())
            return [column for column in self.columns if column.id in wanted]
        if self.only_empty:
            return [c for c in self.columns if row.data.get(c.key) in (None, "")]
        return list(self.columns)

    def page_row_ids(self) -> list[str] | None:
        if self.cells is not None:
            return list(self.cells)
        return list(self.row_ids) if self.row_ids is not None else None


def resolve_target(store: Store, table_id: str, selection: Selection) -> JobTarget:
    """Validate a selection against the table; raises a GlazeError naming the problem.

    Nothing is written here. Row ids are checked page by page during detection, which also
    writes nothing.
    """
    table = store.get_table(table_id)
    by_id = table.column_by_id()
    specs = {column.id: column.spec() for column in table.columns}
    identifiers = IdentifierColumns.from_columns(specs.values())

    def wanted(column_ids: Iterable[str]) -> tuple[ColumnSpec, ...]:
        ids = list(dict.fromkeys(column_ids))
        unknown = [column_id for column_id in ids if column_id not in by_id]
        if unknown:
            raise UnknownColumnError(
                f"unknown column ids in table {table_id}: {', '.join(unknown)}"
            )
        unmapped = [by_id[column_id] for column_id in ids if specs[column_id].field is None]
        if unmapped:
            names = ", ".join(f"{c.key!r} ({c.id})" for c in unmapped)
            raise InvalidSelectionError(
                f"columns map to no enrichment field: {names}; give them a field such as "
                "'company.industry'"
            )
        return tuple(specs[column_id] for column_id in ids)

    if selection.whole_table:
        columns = tuple(spec for spec in specs.values() if spec.field is not None)
        if not columns:
            raise InvalidSelectionError(f"table {table_id} has no column that maps to a field")
        return JobTarget(table_id, columns, identifiers, only_empty=True)
    if selection.cells:
        cells: dict[str, set[str]] = {}
        for cell in selection.cells:
            cells.setdefault(cell.row_id, set()).add(cell.column_id)
        columns = wanted(column_id for ids in cells.values() for column_id in ids)
        return JobTarget(
            table_id,
            columns,
            identifiers,
            cells={row_id: frozenset(ids) for row_id, ids in cells.items()},
        )
    columns = wanted(selection.column_ids)
    row_ids = tuple(dict.fromkeys(selection.row_ids)) if selection.row_ids else None
    return JobTarget(table_id, columns, identifiers, row_ids=row_ids)


def start_job(
    store: Store,
    target: JobTarget,
    selection: Selection,
    settings: JobSettings,
    *,
    kind: RequestKind = RequestKind.ENRICH,
    request_id: str | None = None,
    run_id: str | None = None,
) -> str:
    """Adopt a queued request (launched through the queue) or record a new one; mark it running."""
    values: dict[str, Any] = {
        "status": RequestStatus.RUNNING.value,
        "started_at": utcnow(),
        "run_id": run_id,
    }
    if request_id is not None:
        store.update_request(request_id, **values)
        return request_id
    return store.create_request(
        table_id=target.table_id,
        kind=kind.value,
        selection=selection.model_dump(mode="json"),
        budget=settings.budget,
        **values,
    )


@dataclass
class Detection:
    entities: list[EntityRequest]
    cells_total: int
    cells_without_identifier: int
    rows_read: int


def detect_entities(store: Store, target: JobTarget, *, page_size: int = 5000) -> Detection:
    """Read the selected rows in pages and collect the unique entities their cells are about."""
    index = EntityIndex()
    for page in store.iter_row_pages(
        target.table_id, row_ids=target.page_row_ids(), page_size=page_size, with_meta=False
    ):
        index.rows_read += len(page)
        for row in page:
            index.add(
                targets_for_row(row.id, row.data, target.columns_for(row), target.identifiers)
            )
    entities = [
        EntityRequest(key, frozenset(fields))
        for key, fields in sorted(index.fields.items(), key=lambda item: item[0].id)
    ]
    return Detection(
        entities=entities,
        cells_total=index.cells_total,
        cells_without_identifier=index.cells_without_identifier,
        rows_read=index.rows_read,
    )


def plan_chunks(
    entities: Sequence[EntityRequest], *, chunk_size: int, max_chunks: int
) -> list[list[EntityRequest]]:
    """Split entities into a few fat chunks: at least `chunk_size` each, at most `max_chunks`.

    A Dagster step costs ~50 ms in process and ~1 s as a process here, so thousands of tiny
    steps would cost more than the work; async concurrency runs inside each chunk instead.
    """
    if not entities:
        return [[]]
    size = max(chunk_size, math.ceil(len(entities) / max_chunks))
    return [list(entities[i : i + size]) for i in range(0, len(entities), size)]


@dataclass
class ChunkResult:
    outcomes: Outcomes
    stats: WaterfallStats
    seconds: float


def enrich_chunk(
    store: Store,
    request_id: str,
    chunk: Sequence[EntityRequest],
    providers: Sequence[Provider],
    settings: JobSettings,
    *,
    cache: AnswerCache | None,
    flight: Flight | None = None,
    dry_run: bool = False,
) -> ChunkResult:
    """Run the waterfall over one chunk, drawing on the job's budget in blocks.

    While it runs, it stamps the request every HEARTBEAT_SECONDS (so a dead worker is noticed)
    and stops with JobCancelled when the request's cancel flag is set. `dry_run` estimates:
    stand-in providers, a read-only cache, nothing bought.
    """
    started = time.perf_counter()
    if dry_run:
        providers = [DryRunProvider(p) for p in providers]
        cache, flight = ReadOnlyCache(cache), None
    block = settings.budget_block_calls * max((p.cost_per_call for p in providers), default=0.0)
    budget = Budget(
        settings.budget,
        lease=lambda preferred, minimum: store.lease_budget(request_id, preferred, minimum),
        block=block,
    )
    waterfall = Waterfall(
        providers, budget=budget, cache=cache, threshold=settings.threshold, flight=flight
    )

    async def run() -> list[EntityOutcome]:
        async with provider_session(providers):  # HTTP clients live and close in this loop
            return await heartbeat_while(
                waterfall.enrich_many(chunk, concurrency=settings.concurrency)
            )

    async def heartbeat_while(enriching: Awaitable[list[EntityOutcome]]) -> list[EntityOutcome]:
        work = asyncio.ensure_future(enriching)
        while True:
            done, _ = await asyncio.wait({work}, timeout=HEARTBEAT_SECONDS)
            if done:
                return work.result()
            if await asyncio.to_thread(store.heartbeat, request_id):
                waterfall.stop()
                await work  # lookups in flight finish and are flushed to the cache
                raise JobCancelled(f"request {request_id} was cancelled")

    try:
        outcomes = asyncio.run(run())
    finally:
        if not budget.unlimited:
            store.return_budget(request_id, budget.unused)
    return ChunkResult(
        outcomes={o.key.id: o.fields for o in outcomes},
        stats=waterfall.stats,
        seconds=time.perf_counter() - started,
    )


@dataclass
class ApplySummary:
    rows_read: int = 0
    rows_written: int = 0
    cells: Counter[str] = field(default_factory=Counter)
    statements: int = 0
    seconds: float = 0.0

    @property
    def cells_total(self) -> int:
        return sum(self.cells.values())


ProgressCallback = Callable[[ApplySummary], None]


def cell_meta(outcome: FieldOutcome, request_id: str) -> dict[str, Any]:
    """What a cell's `meta` records: status, confidence, provenance, time, error."""
    value = outcome.value
    return {
        "status": outcome.status.value,
        "confidence": round(value.confidence, 4) if value else None,
        "source": value.source if value else None,
        "fetched_at": value.fetched_at.isoformat() if value else None,
        "error": outcome.error,
        "request_id": request_id,
    }


def apply_results(
    store: Store,
    request_id: str,
    target: JobTarget,
    outcomes: Outcomes,
    *,
    page_size: int = 5000,
    progress: ProgressCallback | None = None,
) -> ApplySummary:
    """Write every selected cell's outcome: one read and one JSON-merge UPDATE per page of rows."""
    started = time.perf_counter()
    before = store.statements
    summary = ApplySummary()
    last_beat = time.monotonic()
    for page in store.iter_row_pages(
        target.table_id, row_ids=target.page_row_ids(), page_size=page_size
    ):
        summary.rows_read += len(page)
        patches = []
        for row in page:
            patch = _row_patch(row, target, outcomes, request_id, summary.cells)
            if patch is not None:
                patches.append(patch)
        summary.rows_written += store.apply_patches(patches)
        if progress is not None:
            progress(summary)
        if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
            # Progress for the app, liveness for the reconciler; a cancel stops between pages,
            # so every row is either fully written by this job or untouched.
            last_beat = time.monotonic()
            if store.heartbeat(request_id, **_progress_counters(summary)):
                raise JobCancelled(
                    f"request {request_id} was cancelled after {summary.rows_written} rows"
                )
    summary.statements = store.statements - before
    summary.seconds = time.perf_counter() - started
    return summary


def _progress_counters(summary: ApplySummary) -> dict[str, int]:
    return {
        "rows_written": summary.rows_written,
        "cells_done": summary.cells[CellStatus.DONE],
        "cells_failed": summary.cells[CellStatus.FAILED],
        "cells_not_found": summary.cells[CellStatus.NOT_FOUND],
        "cells_skipped": summary.cells[CellStatus.SKIPPED],
    }


def _row_patch(
    row: RowRecord,
    target: JobTarget,
    outcomes: Outcomes,
    request_id: str,
    counts: Counter[str],
) -> RowPatch | None:
    cell_targets = targets_for_row(row.id, row.data, target.columns_for(row), target.identifiers)
    if not cell_targets:
        return None
    data: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for cell in cell_targets:
        assert cell.column.field is not None
        if cell.entity is None:
            outcome = FieldOutcome(CellStatus.FAILED, error=NO_IDENTIFIER)
        else:
            found = outcomes.get(cell.entity.id, {}).get(cell.column.field.name)
            # The row's identifiers changed after detection: this job has no answer for it.
            outcome = found or FieldOutcome(CellStatus.SKIPPED, error=ROW_CHANGED)
        counts[outcome.status.value] += 1
        meta[cell.column.key] = cell_meta(outcome, request_id)
        if outcome.status is CellStatus.DONE and outcome.value is not None:
            data[cell.column.key] = outcome.value.value
    status, confidence, error = aggregate_row({**row.meta, **meta})
    return RowPatch(row.id, data, meta, status.value, confidence, error)


def merge_chunks(results: Iterable[ChunkResult]) -> tuple[Outcomes, WaterfallStats]:
    outcomes: Outcomes = {}
    stats = WaterfallStats()
    for result in results:
        outcomes.update(result.outcomes)
        stats.merge(result.stats)
    return outcomes, stats


def final_status(cells: Counter[str]) -> RequestStatus:
    """succeeded: every cell answered (a value or a clear "not found"); failed: nothing did."""
    answered = cells[CellStatus.DONE] + cells[CellStatus.NOT_FOUND]
    unanswered = cells[CellStatus.FAILED] + cells[CellStatus.SKIPPED]
    if unanswered == 0:
        return RequestStatus.SUCCEEDED
    if answered == 0 and cells[CellStatus.SKIPPED] == 0:
        return RequestStatus.FAILED
    return RequestStatus.PARTIAL


def finish_job(
    store: Store,
    request_id: str,
    *,
    entities: int,
    stats: WaterfallStats,
    summary: ApplySummary,
    kind: RequestKind = RequestKind.ENRICH,
    detection_cells: int = 0,
    cells_without_identifier: int = 0,
) -> RequestStatus:
    """Close the request: terminal status with a reason, counters, calls and cost.

    An `estimate` stores what the job would buy; a `pre_enrich` only warmed the cache.
    """
    if kind is RequestKind.ESTIMATE:
        store.update_request(
            request_id,
            status=RequestStatus.SUCCEEDED.value,
            finished_at=utcnow(),
            entities=entities,
            cells_total=detection_cells,
            estimate=estimate_report(
                stats,
                entities=entities,
                cells=detection_cells,
                cells_without_identifier=cells_without_identifier,
            ),
        )
        return RequestStatus.SUCCEEDED
    status = final_status(summary.cells) if kind is RequestKind.ENRICH else RequestStatus.SUCCEEDED
    error = None
    if status is not RequestStatus.SUCCEEDED:
        error = (
            f"{summary.cells[CellStatus.FAILED]} cells failed, "
            f"{summary.cells[CellStatus.SKIPPED]} skipped"
        )
    store.update_request(
        request_id,
        status=status.value,
        error=error,
        finished_at=utcnow(),
        entities=entities,
        rows_total=summary.rows_read,
        cells_total=summary.cells_total if kind is RequestKind.ENRICH else detection_cells,
        cache_hits=stats.cache_hits,
        provider_calls=dict(stats.calls),
        cost_by_provider={name: round(cost, 6) for name, cost in stats.cost.items()},
        cost=round(sum(stats.cost.values()), 6),
        **_progress_counters(summary),
    )
    return status


def fail_job(store: Store, request_id: str, error: BaseException | str) -> None:
    """Record that a job died, with the reason; rows keep what was written (consistent per row)."""
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    store.update_request(
        request_id, status=RequestStatus.FAILED.value, error=reason[:2000], finished_at=utcnow()
    )
