"""One enrichment job, stage by stage: resolve, detect, chunk, enrich, apply, finish.

Each stage is a plain function the Dagster ops (and the tests) call. Cells are never stored as
records: detection keeps only the unique entities and the fields they need, and the apply stage
re-reads the rows page by page and re-derives each cell's entity (detection is pure and cheap),
so memory grows with unique entities, not with cells.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import closing, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from glaze_pipeline.core.ai.columns import InvalidPromptError, check_template
from glaze_pipeline.core.budget import Budget
from glaze_pipeline.core.cache import AnswerCache
from glaze_pipeline.core.coalesce import run_loop
from glaze_pipeline.core.detection import (
    NO_IDENTIFIER,
    ColumnSpec,
    EntityIndex,
    IdentifierColumns,
    identify_row,
    targets_for_row,
)
from glaze_pipeline.core.errors import GlazeError, InvalidSelectionError, UnknownColumnError
from glaze_pipeline.core.estimate import EstimatePart, estimate_chunk, estimate_report
from glaze_pipeline.core.limits import check_budget
from glaze_pipeline.core.models import (
    CellStatus,
    EntityKey,
    EntityOutcome,
    EntityRequest,
    EntityType,
    FieldOutcome,
    RequestKind,
    RequestStatus,
    RowStatus,
    Selection,
)
from glaze_pipeline.core.overlap import WriteBehind, read_ahead
from glaze_pipeline.core.providers.base import KeepsLlmCalls, Provider
from glaze_pipeline.core.providers.session import provider_session
from glaze_pipeline.core.redact import redact
from glaze_pipeline.core.requests import Beat, RequestRepository
from glaze_pipeline.core.settings import DEFAULT_CHUNK_SIZE, DEFAULT_CONCURRENCY
from glaze_pipeline.core.singleflight import Flight
from glaze_pipeline.core.spend import SpendJournal, first_block_for
from glaze_pipeline.core.status import aggregate_row
from glaze_pipeline.core.store import RowPatch, RowRecord, SharedDocument, Store
from glaze_pipeline.core.waterfall import CANCELLED, DEFAULT_THRESHOLD, Waterfall, WaterfallStats

log = logging.getLogger(__name__)
T = TypeVar("T")

ROW_CHANGED = "row changed during the run"
# How often a running job stamps its request and reads its cancel flag, in every phase.
HEARTBEAT_SECONDS = 1.0
# How often answers bought are written through to the cache while a chunk runs.
FLUSH_SECONDS = 1.0
# How long answers already in a shared tier (written through to Redis under their claim) wait
# for the chunk's batched write to the other tiers (the database's cache table, memory).
SHARED_FLUSH_SECONDS = 5.0
# How long a terminated chunk may take to let its lookups in flight come back.
DRAIN_SECONDS = 4.0
# The most enrich steps when they run side by side (own processes, Celery workers), and when
# they run one after another in the run's process, unless a span would then own more than
# IN_PROCESS_SPAN_ENTITIES (a span holds its own entities' outcomes to its end; see
# `JobSettings.fan_out`).
MAX_CHUNKS = 16
IN_PROCESS_CHUNKS = 4
IN_PROCESS_SPAN_ENTITIES = 20_000
# Chunks (spans of rows) are cut at multiples of this many rows (`plan_spans`).
SPAN_ROWS = 100
# Spans that run side by side are cut to equal work, a new entity's lookups weighing as much as
# this many rows read, patched and written (S3 and S5 at scale 1 in one process: ~0.66 ms of
# worker CPU a provider call, 1-2 calls an entity, and ~0.1 ms a row, detection included).
ENTITY_ROWS = 10


class JobCancelled(GlazeError):
    """The job must stop: its request was cancelled, its run terminated, or it was closed
    under it (e.g. failed by the reconciler)."""


class RequestWatch:
    """Stamps a running request every `interval` seconds from a background thread, in every
    phase of the job, and tells the job when to stop (a cancel flag, or the request closed
    under it). A thread, so a phase busy in one long statement or loop still beats.

    `progress()` supplies counters to stamp with each beat; `on_stop(reason)` is called once,
    from the watch thread, when the job must stop.
    """

    def __init__(self, requests: RequestRepository, request_id: str) -> None:
        self.requests = requests
        self.request_id = request_id
        # This process's progress so far (counters from 0): each beat adds what changed since
        # the one before, so the chunks of a job, in one process or many, add up.
        self.progress: Callable[[], dict[str, int]] | None = None
        # Hears each beat (from the watch thread): e.g. to publish the job's progress live.
        self.on_beat: Callable[[Beat], None] | None = None
        self._stamped: dict[str, int] = {}
        self._beating = threading.Lock()  # one beat at a time: each adds what the last did not
        self._on_stop: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.stop_reason: str | None = None
        self.beat: Beat | None = None

    def __enter__(self) -> RequestWatch:
        self.check_now()
        self._thread = threading.Thread(
            target=self._run, name=f"watch {self.request_id}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def on_stop(self, callback: Callable[[str], None]) -> None:
        with self._lock:
            reason = self.stop_reason
            if reason is None:
                self._on_stop.append(callback)
        if reason is not None:
            callback(reason)

    def stop(self, reason: str) -> None:
        """Stop the job for `reason` (the first reason wins)."""
        with self._lock:
            if self.stop_reason is not None:
                return
            self.stop_reason = reason
            callbacks, self._on_stop = self._on_stop, []
        for callback in callbacks:
            callback(reason)

    def raise_if_stopped(self) -> None:
        """Raise JobCancelled when the job must stop (a cancel, or its request closed)."""
        if self.stop_reason is not None:
            raise JobCancelled(f"request {self.request_id}: {self.stop_reason}")

    def raise_if_closed(self) -> None:
        """Raise JobCancelled when the request was closed under the job (by the reconciler,
        say): there is nothing left to write. A cancel flag alone does not raise: the job
        still writes what it bought."""
        if self.beat is not None and self.beat.status is not RequestStatus.RUNNING:
            self.raise_if_stopped()

    def check_now(self) -> Beat:
        """One beat now (with progress); stops the job if it is no longer wanted."""
        with self._beating:
            progress = self.progress() if self.progress is not None else {}
            added = {name: value - self._stamped.get(name, 0) for name, value in progress.items()}
            beat = self.requests.heartbeat(self.request_id, add=added)
            self._stamped = progress
            self.beat = beat
        if self.on_beat is not None:
            try:
                self.on_beat(beat)
            except Exception as error:  # a listener (Redis, say) must not stop the job
                log.warning("progress of %s not published: %s", self.request_id, error)
        if beat.cancel_requested:
            self.stop("cancelled by the user")
        elif beat.status is not RequestStatus.RUNNING:
            self.stop(f"the request ended {beat.status.value} under the job")
        return beat

    def _run(self) -> None:
        while not self._done.wait(HEARTBEAT_SECONDS):
            try:
                self.check_now()
            except Exception as error:  # a database blip must not kill the job's liveness
                log.warning("heartbeat of %s failed: %s", self.request_id, error)


Outcomes = dict[str, dict[str, FieldOutcome]]  # entity id -> field -> outcome


@dataclass(frozen=True)
class JobSettings:
    """How a job runs; every knob has a default that suits this 2-core machine.

    The one home of these defaults: the run config (defs/config.EnrichTableConfig), the CLI's
    options and the benchmark read them from here (`JobSettings.chunk_size`, ...).
    """

    budget: float | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # The most enrich steps a job fans out to; None: by where its steps run (`fan_out`).
    max_chunks: int | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    threshold: float = DEFAULT_THRESHOLD
    # Rows per page detection reads (a read and a `running` hold each), and the most a streamed
    # write grows to (`write_page_size`).
    page_size: int = 5000
    # Rows in the first span's first streamed write (a read and a JSON-merge UPDATE each):
    # small enough that the job's first rows land early. Each next page is twice the last, up
    # to `page_size` (a later span's pages are `page_size` from its first): ~2 statements per
    # `page_size` rows of a long span, not per 1,000.
    write_page_size: int = 1000
    budget_block_calls: int = 20
    # Vendor batch endpoints (`lookup_many`) for the providers that declare one.
    batch_endpoints: bool = False

    def __post_init__(self) -> None:
        check_budget(self.budget)
        for name in ("chunk_size", "max_chunks", "concurrency", "page_size", "write_page_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InvalidSelectionError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.threshold <= 1:
            raise InvalidSelectionError(f"threshold must be in [0, 1], got {self.threshold}")

    def fan_out(self, executor: str, entities: int = 0) -> int:
        """The most enrich steps for a run on `executor` that buys `entities` (`max_chunks`
        when set).

        In process the steps run one after another, so more of them buys no parallelism and
        each costs its start, its tail (the lookups thin out as the last entities finish) and a
        dozen fixed statements (a cache read, journal blocks, observations, its first pages):
        IN_PROCESS_CHUNKS, or as many as keep a span to IN_PROCESS_SPAN_ENTITIES, since a span
        holds its own entities' outcomes to its end (S5 at scale 1 in 4 spans of 25,000: peak
        RSS 500-515 MiB, against 444 in 16). Steps in processes of their own or on Celery run
        side by side: MAX_CHUNKS, so a pool stays busy to the end."""
        if self.max_chunks is not None:
            return self.max_chunks
        width = IN_PROCESS_CHUNKS if executor == "in_process" else MAX_CHUNKS
        return min(MAX_CHUNKS, max(width, math.ceil(entities / IN_PROCESS_SPAN_ENTITIES)))


@dataclass(frozen=True)
class JobTarget:
    """A validated selection: the columns to fill, in which rows."""

    table_id: str
    columns: tuple[ColumnSpec, ...]
    identifiers: IdentifierColumns
    row_ids: tuple[str, ...] | None = None  # None: every row of the table
    cells: dict[str, frozenset[str]] | None = None  # explicit cells: row id -> column ids
    only_empty: bool = False  # whole table: fill empty cells only, and count only those
    overwrite: bool = False  # replace cells that hold a value (a grid or cells, when asked)

    def columns_for(self, row: RowRecord) -> list[ColumnSpec]:
        """The row's cells this job fills (see `split`)."""
        return self.split(row)[0]

    def split(
        self, row: RowRecord, *, request_id: str | None = None
    ) -> tuple[list[ColumnSpec], list[ColumnSpec]]:
        """The row's requested cells as (to fill, kept).

        A cell that holds a value is the user's and is kept, unless the request says
        `overwrite`: enrichment never replaces what someone typed (an input column such as a
        name or an email included) without being asked to. A whole-table job asked for the
        empty cells only, so it keeps nothing it would have to report. A cell the job itself
        (`request_id`) wrote is its to write again (a retried chunk rewrites its own pages).
        """
        if self.cells is not None:
            wanted = self.cells.get(row.id, frozenset())
            asked = [column for column in self.columns if column.id in wanted]
        else:
            asked = list(self.columns)
        if self.overwrite:
            return asked, []
        data = row.data
        fill = [
            c
            for c in asked
            if is_empty(data.get(c.key))
            # Detection names no request: no call per cell for it (once per row read).
            or (request_id is not None and written_by(row, c.key, request_id))
        ]
        if len(fill) == len(asked):
            return fill, []
        kept = [] if self.only_empty else [c for c in asked if c not in fill]
        return fill, kept

    def page_row_ids(self) -> list[str] | None:
        if self.cells is not None:
            return list(self.cells)
        return list(self.row_ids) if self.row_ids is not None else None


def written_by(row: RowRecord, key: str, request_id: str | None) -> bool:
    """Whether the cell's provenance names `request_id` (the job wrote it)."""
    if request_id is None:
        return False
    meta = row.meta.get(key)
    return isinstance(meta, dict) and meta.get("request_id") == request_id


def is_empty(value: Any) -> bool:
    """A cell the engine may fill: missing, JSON null or "" (the same test the holds make)."""
    return value is None or value == ""


def cell_digest(value: Any) -> int:
    """A 64-bit fingerprint of a cell's value: what an overwriting job remembers of a cell it
    read, to leave it alone if someone changes it before the job writes (8 bytes, not the
    value: a job may read a million cells)."""
    encoded = json.dumps(value, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "big")


def cell_ref(row_id: str, key: str) -> str:
    return f"{row_id}\x1f{key}"


def resolve_target(store: Store, table_id: str, selection: Selection) -> JobTarget:
    """Validate a selection against the table; raises a GlazeError naming the problem.

    A column fills either a catalogue field or, with a prompt (an AI column), its `ai_` field
    through the LLM; a whole-table job includes both. Nothing is written here. Row ids are
    checked page by page during detection, which also writes nothing.
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
                "'company.industry', or an AI prompt such as 'Does {company} sell to "
                "enterprises? Answer yes or no.'"
            )
        return checked(specs[column_id] for column_id in ids)

    if selection.whole_table:
        columns = checked(spec for spec in specs.values() if spec.field is not None)
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
            overwrite=selection.overwrite,
        )
    columns = wanted(selection.column_ids)
    row_ids = tuple(dict.fromkeys(selection.row_ids)) if selection.row_ids else None
    return JobTarget(table_id, columns, identifiers, row_ids=row_ids, overwrite=selection.overwrite)


def checked(columns: Iterable[ColumnSpec]) -> tuple[ColumnSpec, ...]:
    """`columns`, with each AI column's template checked again before anything is asked: a
    template stored before today's rules is refused here with the reason, not mid-job."""
    columns = tuple(columns)
    for column in columns:
        if column.prompt is not None:
            try:
                check_template(column.prompt)
            except InvalidPromptError as error:
                raise InvalidPromptError(f"column {column.key!r}: {error}") from None
    return columns


def start_job(
    store: Store,
    target: JobTarget,
    selection: Selection,
    settings: JobSettings,
    *,
    kind: RequestKind = RequestKind.ENRICH,
    run_id: str | None = None,
) -> str:
    """Record a job started outside the queue (tests, scripts) as a running request."""
    return RequestRepository(store).create_running(
        table_id=target.table_id,
        kind=kind,
        selection=selection.model_dump(mode="json"),
        budget=settings.budget,
        run_id=run_id,
    )


@dataclass
class Detection:
    entities: list[EntityRequest]
    cells_total: int  # asked for, the kept ones included
    cells_without_identifier: int
    rows_read: int
    cells_kept: int = 0  # asked for, but they hold a value and the request did not overwrite
    # An overwriting job's fingerprints of the non-empty cells it read (`cell_ref` -> digest):
    # a cell changed before the job writes it is then kept. Empty for any other job.
    read: dict[str, int] = field(default_factory=dict)
    # Every SPAN_ROWS rows read, and the end: where `plan_spans` may cut chunks.
    pages: list[PageMark] = field(default_factory=list)
    rows_to_fill: int = 0  # rows with at least one cell to fill (the rows a job writes)


@dataclass(frozen=True)
class PageMark:
    """A place detection passed: the row id there, how many rows were read up to it (its
    position in an explicit selection) and how many unique entities had been seen."""

    last_id: str
    rows: int
    entities: int


def detect_entities(
    store: Store,
    target: JobTarget,
    *,
    page_size: int = 5000,
    watch: RequestWatch | None = None,
    request_id: str | None = None,
) -> Detection:
    """Read the selected rows in pages and collect the unique entities their cells are about.

    With a `watch`, a cancel stops it between pages (JobCancelled). With a `request_id` (a job
    that writes cells), each page's rows with a cell to fill are held `running` by it: one
    statement per page; rows with nothing to fill are left as they are."""
    index = EntityIndex()
    kept = 0
    rows_to_fill = 0
    read: dict[str, int] = {}
    pages: list[PageMark] = []
    row_ids = target.page_row_ids()
    source = read_ahead(
        store.iter_row_pages(
            target.table_id, row_ids=row_ids, page_size=page_size, with_meta=False
        ),
        name="detect-read",
    )
    # The next page is read, and this page's rows held, while Python detects (core/overlap.py).
    # Two holds at a time on Postgres (different rows: a hold is mostly the server's work, and
    # it has a second core); SQLite takes one writer at a time anyway.
    holding = 2 if store.dialect == "postgresql" else 1
    with closing(source), WriteBehind(name="detect-hold", in_flight=holding) as holds:
        for page in source:
            if watch is not None:
                watch.raise_if_stopped()
            if row_ids is not None:
                # In the selection's order, so a span of it is a slice of its ids (`Chunk`).
                ids = row_ids[index.rows_read : index.rows_read + len(page)]
                rank = {row_id: i for i, row_id in enumerate(ids)}
                page.sort(key=lambda row: rank[row.id])
            to_fill, page_kept = _detect_page(target, page, index, read, pages)
            kept += page_kept
            rows_to_fill += len(to_fill)
            if request_id is not None and to_fill:
                holds.submit(
                    store.hold_rows,
                    target.table_id,
                    request_id,
                    RowStatus.RUNNING,
                    row_ids=to_fill,
                )
    # In the order the rows first need them: a streaming chunk answers its first page first.
    entities = [
        EntityRequest(key, frozenset(fields), index.cells[key])
        for key, fields in index.fields.items()
    ]
    return Detection(
        entities=entities,
        cells_total=index.cells_total + kept,
        cells_without_identifier=index.cells_without_identifier,
        rows_read=index.rows_read,
        cells_kept=kept,
        read=read,
        pages=pages,
        rows_to_fill=rows_to_fill,
    )


def _detect_page(
    target: JobTarget,
    page: Sequence[RowRecord],
    index: EntityIndex,
    read: dict[str, int],
    pages: list[PageMark],
) -> tuple[list[str], int]:
    """One page's rows into `index`: returns the ids of the rows with a cell to fill and how
    many asked-for cells were kept. An overwriting job's non-empty cells are fingerprinted in
    `read`; `pages` gets a mark every SPAN_ROWS rows and at the page's end."""
    first = index.rows_read + 1
    index.rows_read += len(page)
    kept = 0
    to_fill: list[str] = []
    for position, row in enumerate(page, start=first):
        fill, keep = target.split(row)
        kept += len(keep)
        cell_targets = targets_for_row(row.id, row.data, fill, target.identifiers)
        if cell_targets:
            to_fill.append(row.id)
            if target.overwrite:
                for column in fill:
                    value = row.data.get(column.key)
                    if not is_empty(value):
                        read[cell_ref(row.id, column.key)] = cell_digest(value)
        index.add(cell_targets)
        if position % SPAN_ROWS == 0:
            pages.append(PageMark(row.id, position, len(index.fields)))
    if page and index.rows_read % SPAN_ROWS:
        pages.append(PageMark(page[-1].id, index.rows_read, len(index.fields)))
    return to_fill, kept


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


@dataclass(frozen=True)
class Chunk:
    """One step's share of a job: a contiguous span of the selected rows, and the entities
    first seen in it, in the order its rows need them.

    The step buys its own entities and writes its rows page by page as their entities are
    answered; an entity its rows share with an earlier span comes from that span's purchase,
    through the cache and single-flight (so every entity is still bought once). The span is
    `after < id <= upto` in id order (`upto` None: to the end), or for an explicit selection
    the selection's row ids `[start:stop]`.
    """

    index: int
    entities: list[EntityRequest]
    after: str = ""
    upto: str | None = None
    start: int = 0
    stop: int | None = None
    rows: int = 0

    def row_ids(self, target: JobTarget) -> list[str] | None:
        ids = target.page_row_ids()
        return None if ids is None else ids[self.start : self.stop]


def plan_spans(
    detection: Detection,
    target: JobTarget,
    *,
    chunk_size: int,
    max_chunks: int,
    side_by_side: bool = False,
) -> list[Chunk]:
    """Cut the rows into at most `max_chunks` spans at detection's page ends (the last takes
    the rest): a few fat steps, as `plan_chunks`.

    Steps that run one after another (in process): each span owns at least `chunk_size`
    entities, an equal share of them, so none holds more outcomes than its share. Steps that
    run `side_by_side` (other processes, Celery): each span gets an equal share of the work,
    its new entities weighing ENTITY_ROWS rows each and every row its own, and at least
    `chunk_size` entities' worth. Cut by entities alone, a table whose rows repeat its
    entities (S5: 1,000,000 rows over 100,000 companies, each met first in its first 100,000
    rows) left the last span nine rows in ten to write alone while the other processes idled.

    Every selected row is in exactly one span, rows without an entity included (their cells
    still get written: `failed: no identifier`)."""
    entities = detection.entities
    rows_total = detection.pages[-1].rows if detection.pages else 0
    weight = ENTITY_ROWS if side_by_side else 1
    per_row = 1 if side_by_side else 0
    work = len(entities) * weight + rows_total * per_row
    size = max(chunk_size * weight, math.ceil(work / max_chunks)) if entities else 0
    explicit = target.page_row_ids() is not None
    chunks: list[Chunk] = []
    after, start, owned_from, rows_from = "", 0, 0, 0
    for number, mark in enumerate(detection.pages):
        last_page = number == len(detection.pages) - 1
        done = (mark.entities - owned_from) * weight + (mark.rows - rows_from) * per_row
        if done < size and not last_page:
            continue
        if len(chunks) == max_chunks - 1 and not last_page:
            continue  # the last span takes the rest
        chunks.append(
            Chunk(
                index=len(chunks),
                entities=list(entities[owned_from : mark.entities]),
                after="" if explicit else after,
                upto=None if explicit or last_page else mark.last_id,
                start=start if explicit else 0,
                stop=(None if last_page else mark.rows) if explicit else None,
                rows=mark.rows - rows_from,
            )
        )
        after, start, owned_from, rows_from = mark.last_id, mark.rows, mark.entities, mark.rows
    if not chunks:
        chunks.append(Chunk(index=0, entities=list(entities)))
    return chunks


@dataclass
class ChunkResult:
    outcomes: Outcomes
    stats: WaterfallStats
    seconds: float
    stopped: str | None = None  # why the chunk stopped early (a cancel), if it did
    estimate: EstimatePart | None = None  # an estimate job's figures for the chunk
    # A streaming chunk's writes (`enrich_span`): its outcomes are written, not carried.
    summary: ApplySummary | None = None
    first_write_s: float | None = None  # when its first page was written (since it started)


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
    watch: RequestWatch | None = None,
    on_progress: Callable[[int], None] | None = None,
    unavailable: Mapping[str, str] | None = None,
) -> ChunkResult:
    """Run the waterfall over one chunk, drawing on the job's budget in blocks.

    Every call is journalled before it is sent (spend never lost), answers are written through
    to the cache every SHARED_FLUSH_SECONDS (within twice FLUSH_SECONDS for an answer Redis
    does not hold), and the request is watched every HEARTBEAT_SECONDS: on a cancel no new lookup
    starts, the lookups in flight come back and are cached, and the result says `stopped` (the
    entities not reached are `skipped: cancelled`).

    The lookups run on an event loop in a worker thread, so that Dagster's Terminate (an
    interrupt delivered to this, the main thread) can stop them the same way and let them
    drain before it raises JobCancelled. `dry_run` estimates (`core.estimate`): the cache is
    read, nothing is bought or journalled. `on_progress(entities done)` is called on each
    flush. `unavailable` (provider -> reason, the preflight's verdicts): never called.

    What the lookups answered is added to the providers' history (`Store.record_observations`)
    for later estimates, and the LLM attempts of AI columns go to `llm_calls` at the end of the
    chunk, however it ends.
    """
    started = time.perf_counter()
    if dry_run:
        part = estimate_chunk(
            chunk,
            providers,
            cache=cache,
            observations=store.provider_observations(),
            threshold=settings.threshold,
            unavailable=dict(unavailable or {}),
        )
        if on_progress is not None:
            on_progress(len(chunk))
        return ChunkResult({}, WaterfallStats(), time.perf_counter() - started, estimate=part)
    lookups = _Lookups(
        store, request_id, providers, settings, cache, flight, unavailable, entities=len(chunk)
    )

    async def work(waterfall: Waterfall) -> list[EntityOutcome]:
        return await waterfall.enrich_many(chunk, concurrency=settings.concurrency, flush=False)

    outcomes, stopped = lookups.run(work, watch, on_progress)
    return ChunkResult(
        outcomes={o.key.id: o.fields for o in outcomes},
        stats=lookups.waterfall.stats,
        seconds=time.perf_counter() - started,
        stopped=stopped,
    )


class _Lookups:
    """One chunk's waterfall, budget and spend journal, run on an event loop in a worker
    thread (see `enrich_chunk`): the scaffolding `enrich_chunk` and `enrich_span` share."""

    def __init__(
        self,
        store: Store,
        request_id: str,
        providers: Sequence[Provider],
        settings: JobSettings,
        cache: AnswerCache | None,
        flight: Flight | None,
        unavailable: Mapping[str, str] | None,
        *,
        entities: int,
    ) -> None:
        self.store = store
        self.request_id = request_id
        self.providers = providers
        self.aborted = False  # interrupted (Terminate): the lookups drain, nothing is written
        self.requests = requests = RequestRepository(store)
        self.journal = SpendJournal(
            lambda deltas: requests.record_spend(request_id, deltas),
            first_block=first_block_for(entities),
        )
        block = settings.budget_block_calls * max((p.cost_per_call for p in providers), default=0)
        self.budget = Budget(
            settings.budget,
            lease=lambda preferred, minimum: requests.lease_budget(request_id, preferred, minimum),
            block=block,
        )
        self.waterfall = Waterfall(
            providers,
            budget=self.budget,
            cache=cache,
            threshold=settings.threshold,
            flight=flight,
            journal=self.journal,
            unavailable=dict(unavailable or {}),
        )

    def run(
        self,
        work: Callable[[Waterfall], Awaitable[T]],
        watch: RequestWatch | None,
        on_progress: Callable[[int], None] | None,
    ) -> tuple[T, str | None]:
        """Run `work(waterfall)` to its end; returns its result and why the lookups stopped
        early (a cancel), if they did. Raises JobCancelled on an interrupt, after the drain."""
        waterfall, journal, requests = self.waterfall, self.journal, self.requests

        async def run() -> T:
            async with provider_session(self.providers):  # HTTP clients live in this loop
                flusher = asyncio.ensure_future(flush_while_running())
                try:
                    return await work(waterfall)
                finally:
                    flusher.cancel()
                    await flush()  # the batches' own flushes are off (`flush=False`)
                    await journal.drain()

        async def flush() -> None:
            try:
                await waterfall.flush_cache_async()
            except Exception as error:  # the chunk's final flush tries again
                log.warning("writing answers through to the cache failed: %s", error)

        async def flush_while_running() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(FLUSH_SECONDS)
                # An answer in no shared tier a second after it was bought is written within
                # the next; answers a claim wrote through to Redis (nearly all, with Redis up)
                # can wait.
                unshared = waterfall.unshared_for(FLUSH_SECONDS)
                if unshared or time.monotonic() - last >= SHARED_FLUSH_SECONDS:
                    last = time.monotonic()
                    await flush()
                if on_progress is not None:
                    on_progress(waterfall.entities_done)

        outcome: dict[str, Any] = {}
        # Waited on instead of Thread.join: a join interrupted by a signal can leave the thread
        # reported dead while it still runs (CPython gh-90882), which would skip the drain.
        finished = threading.Event()

        def thread() -> None:
            try:
                outcome["value"] = run_loop(run())
            except BaseException as error:
                outcome["error"] = error
            finally:
                finished.set()

        own_watch = watch is None
        watch = watch or RequestWatch(requests, self.request_id)
        interrupted: BaseException | None = None
        with watch if own_watch else nullcontext():
            # A flag read by the loop before each lookup: setting it from any thread is enough.
            watch.on_stop(lambda _reason: waterfall.stop())
            worker = threading.Thread(target=thread, name=f"enrich {self.request_id}", daemon=True)
            worker.start()
            try:
                while not finished.wait(0.1):
                    pass
            except BaseException as error:  # Dagster's Terminate, or Ctrl-C: stop, then drain
                interrupted = error
                self.aborted = True
                watch.stop("the run was terminated")
                _drain(finished, requests, self.request_id)
            finally:
                if not self.budget.unlimited:
                    requests.return_budget(self.request_id, self.budget.unused)
                record_llm_calls(self.store, self.request_id, self.providers)
        if interrupted is not None:
            raise JobCancelled(
                f"request {self.request_id}: the run was terminated"
            ) from interrupted
        if "error" in outcome:
            raise outcome["error"]
        try:
            self.store.record_observations(waterfall.stats.observed)
        except Exception as error:  # statistics for estimates: never worth failing a job over
            log.warning("could not record the providers' observations: %s", error)
        if on_progress is not None:
            on_progress(waterfall.entities_done)
        stopped = None
        if waterfall.stopped:
            if watch.stop_reason is None:
                # The journal was refused (a cancel the watch has not beaten on yet): ask now.
                with suppress(Exception):
                    watch.check_now()
            stopped = watch.stop_reason or "the request stopped accepting calls"
        return outcome["value"], stopped


def enrich_span(
    store: Store,
    request_id: str,
    target: JobTarget,
    chunk: Chunk,
    providers: Sequence[Provider],
    settings: JobSettings,
    *,
    cache: AnswerCache | None,
    flight: Flight | None = None,
    watch: RequestWatch | None = None,
    on_progress: Callable[[int], None] | None = None,
    unavailable: Mapping[str, str] | None = None,
    read: Mapping[str, int] | None = None,
    on_written: WrittenCallback | None = None,
    stopped: str | None = None,
) -> ChunkResult:
    """Enrich one span of rows and write them as they are answered, page by page.

    The chunk's own entities (first seen in its rows) go through the waterfall in the order
    its rows need them, `settings.concurrency` at a time, as `enrich_chunk` runs them. Beside
    them a writer reads the span in pages (`settings.write_page_size` rows first in the first
    span, each next page twice the last, up to `settings.page_size`; a later span's pages are
    `page_size` from the start); an entity a page needs that the chunk does not
    own (an earlier span's) is asked of the waterfall too, which finds it in the cache or waits
    for its buyer (single-flight); as soon as every entity of the page is answered, the page is
    written in one JSON-merge statement, with the same compare-and-set rules as `apply_results`
    (an edit made meanwhile wins). So rows reach the table while the lookups go on, and memory
    holds one chunk's outcomes, not the job's.

    A cancel (or `stopped`, a job cancelled before this chunk began) starts no new lookup: the
    pages are still read to the end, what was bought is written and the rest is counted
    `skipped: cancelled` and left untouched. Returns the chunk's figures with its
    `ApplySummary` (no outcomes: they are in the rows).
    """
    started = time.perf_counter()
    summary = ApplySummary()
    lookups = _Lookups(
        store,
        request_id,
        providers,
        settings,
        cache,
        flight,
        unavailable,
        entities=len(chunk.entities),
    )
    if stopped is not None:
        lookups.waterfall.stop()
    own_watch = watch is None
    watch = watch or RequestWatch(lookups.requests, request_id)
    owned = {request.key.id for request in chunk.entities}
    done = [0]
    if watch.progress is None:
        watch.progress = lambda: {"entities_done": done[0], **progress_counters(summary)}
    first_write: list[float] = []

    async def work(waterfall: Waterfall) -> None:
        outcomes: Outcomes = {}
        waiting: set[str] = set()
        ready = asyncio.Event()
        asked: set[str] = set(owned)

        def answered(outcome: EntityOutcome) -> None:
            entity = outcome.key.id
            outcomes[entity] = outcome.fields
            if entity in owned:
                done[0] += 1
            if entity in waiting:
                waiting.discard(entity)
                if not waiting:
                    ready.set()

        buying = asyncio.ensure_future(
            waterfall.enrich_many(
                chunk.entities, concurrency=settings.concurrency, on_outcome=answered, flush=False
            )
        )
        extra: list[asyncio.Future[None]] = []

        async def ask(others: list[EntityRequest]) -> None:
            # The outcomes reach `answered`; the batch's list of them is not kept.
            await waterfall.enrich_many(
                others, concurrency=settings.concurrency, on_outcome=answered, flush=False
            )

        try:
            pages = store.iter_row_pages(
                target.table_id,
                row_ids=chunk.row_ids(target),
                # The job's first rows come from its first span; a later one (in process,
                # after it) reads full pages from the start: ~2 statements fewer a span.
                page_size=settings.write_page_size if chunk.index == 0 else settings.page_size,
                grow_to=settings.page_size,
                after=chunk.after,
                upto=chunk.upto,
            )
            while True:
                rows = await asyncio.to_thread(next, pages, None)
                if rows is None:
                    break
                watch.raise_if_closed()
                needed = _page_entities(target, rows, request_id)
                others = [e for e in needed.values() if e.key.id not in asked]
                if others:
                    asked.update(e.key.id for e in others)
                    extra.append(asyncio.ensure_future(ask(others)))
                waiting.clear()
                waiting.update(entity for entity in needed if entity not in outcomes)
                if waiting:
                    ready.clear()
                    await _until(ready, [buying, *extra])
                if lookups.aborted:
                    break  # an interrupt: what is written stays; nothing more is
                if waterfall.stopped and watch.stop_reason is None:
                    # Calls were refused (the request ended or was cancelled under the job):
                    # learn which before writing, rather than at the next beat.
                    await asyncio.to_thread(watch.check_now)
                watch.raise_if_closed()
                writer = _CellWriter(target, outcomes, request_id, _missing(waterfall), read)
                await asyncio.to_thread(_write_page, store, writer, rows, summary, on_written)
                # What the page needed of earlier spans' entities goes once it is written: with
                # rows in random order a span needs nearly all of them, and held to its end
                # they made S5's peak (727 MiB). A later page asks again (a cache hit).
                for entity in [entity for entity in outcomes if entity not in owned]:
                    del outcomes[entity]
                    asked.discard(entity)
                for task in [task for task in extra if task.done()]:
                    task.result()  # a batch that failed raises here
                    extra.remove(task)
                if not first_write and summary.rows_written:
                    first_write.append(time.perf_counter() - started)
            await buying
            for task in extra:
                await task
        except BaseException:
            waterfall.stop()  # let the lookups in flight come back before the error goes on
            await asyncio.gather(buying, *extra, return_exceptions=True)
            raise

    with watch if own_watch else nullcontext():
        _, stopped_now = lookups.run(work, watch, on_progress)
    summary.seconds = time.perf_counter() - started
    return ChunkResult(
        outcomes={},
        stats=lookups.waterfall.stats,
        seconds=summary.seconds,
        stopped=stopped or stopped_now,
        summary=summary,
        first_write_s=first_write[0] if first_write else None,
    )


async def _until(ready: asyncio.Event, tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Wait for `ready`; a lookup task that fails meanwhile raises its error here, and if every
    task ends first the wait ends too (the writer then finds those entities unanswered)."""
    waiter = asyncio.ensure_future(ready.wait())
    try:
        while not ready.is_set():
            running = [task for task in tasks if not task.done()]
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise cast(BaseException, task.exception())
            if not running:
                return
            await asyncio.wait([waiter, *running], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


def _page_entities(
    target: JobTarget, rows: Sequence[RowRecord], request_id: str | None = None
) -> dict[str, EntityRequest]:
    """The entities one page's cells need, with the fields those cells ask of them."""
    fields: dict[str, tuple[EntityKey, set[str]]] = {}
    for row in rows:
        fill, _kept = target.split(row, request_id=request_id)
        for cell in targets_for_row(row.id, row.data, fill, target.identifiers):
            if cell.entity is not None and cell.column.field is not None:
                entry = fields.setdefault(cell.entity.id, (cell.entity, set()))
                entry[1].add(cell.column.field.name)
    return {
        entity: EntityRequest(key, frozenset(names), 0) for entity, (key, names) in fields.items()
    }


def _missing(waterfall: Waterfall) -> FieldOutcome:
    """A cell's outcome when its entity has none (a lookup the job never made)."""
    return FieldOutcome(CellStatus.SKIPPED, error=CANCELLED if waterfall.stopped else ROW_CHANGED)


def _write_page(
    store: Store,
    writer: _CellWriter,
    rows: list[RowRecord],
    summary: ApplySummary,
    on_written: WrittenCallback | None,
) -> None:
    """Write one page's patches in one statement; rows an edit beat are read again and
    rewritten (up to WRITE_ATTEMPTS times), their edited cells kept. The summary counts the
    page's statements: its read, its writes and re-reads."""
    summary.rows_read += len(rows)
    summary.statements += 1  # the page's read
    page_written: list[RowPatch] = []
    for _attempt in range(WRITE_ATTEMPTS):
        patches = [writer.patch(row) for row in rows]
        to_write = [p.write for p in patches if p.write]
        summary.statements += bool(to_write)
        written = store.apply_patches(to_write, request_id=writer.request_id)
        page_written += [p.write for p in patches if p.write and p.row_id in written]
        changed = [p.row_id for p in patches if p.write and p.row_id not in written]
        for patch in patches:
            if patch.row_id not in changed:
                summary.cells.update(patch.counts)
                summary.kept += patch.kept
        summary.rows_written += len(written)
        if not changed:
            break
        # Someone wrote one of these rows between the read and the write: read them again.
        rows = store.rows_by_id(changed)
        summary.statements += 1
    else:
        summary.cells[CellStatus.SKIPPED] += sum(len(p.write.meta) for p in patches if p.write)
    if on_written is not None and page_written:
        on_written(page_written)


def record_llm_calls(store: Store, request_id: str, providers: Iterable[Provider]) -> int:
    """Write the LLM attempts the providers made since the last time (an AI column's provider
    keeps them: `take_llm_calls`) to `llm_calls`, for the request; returns how many.

    Best effort: the tokens are a record of usage, the credits are in the spend ledger, so a
    failed write is logged and the chunk's answers are kept."""
    calls: list[Any] = []
    for provider in providers:
        if isinstance(provider, KeepsLlmCalls):
            calls.extend(provider.take_llm_calls())
    if calls:
        try:
            store.record_llm_calls(request_id, calls)
        except Exception as error:
            log.warning("could not record %d LLM calls of %s: %s", len(calls), request_id, error)
    return len(calls)


def _drain(finished: threading.Event, requests: RequestRepository, request_id: str) -> None:
    """After an interrupt: flag the request (no new call is journalled, a retried step stops
    at once), then let the lookups in flight come back, however many interrupts follow."""
    deadline = time.monotonic() + DRAIN_SECONDS
    flagged = False
    while not finished.is_set() and time.monotonic() < deadline:
        try:
            if not flagged:
                flagged = True
                requests.request_cancel(request_id)
            finished.wait(0.1)
        except BaseException:  # a repeated interrupt: keep draining until the deadline
            continue
    if not finished.is_set():
        log.warning("lookups of %s still in flight after %.0fs", request_id, DRAIN_SECONDS)


def stopped_chunk(chunk: Sequence[EntityRequest], reason: str) -> ChunkResult:
    """The result of a chunk the job never started (a cancel came first): nothing bought."""
    outcome = FieldOutcome(CellStatus.SKIPPED, error=CANCELLED)
    return ChunkResult(
        outcomes={e.key.id: dict.fromkeys(e.fields, outcome) for e in chunk},
        stats=WaterfallStats(),
        seconds=0.0,
        stopped=reason,
    )


@dataclass
class ApplySummary:
    rows_read: int = 0
    rows_written: int = 0
    cells: Counter[str] = field(default_factory=Counter)
    # Of the skipped cells, those left alone because they hold a value (the user's).
    kept: int = 0
    statements: int = 0
    seconds: float = 0.0

    @property
    def cells_total(self) -> int:
        return sum(self.cells.values())

    def merge(self, other: ApplySummary) -> None:
        """Add another chunk's writes (a job's summary is the sum of its chunks')."""
        self.rows_read += other.rows_read
        self.rows_written += other.rows_written
        self.cells.update(other.cells)
        self.kept += other.kept
        self.statements += other.statements
        self.seconds += other.seconds


ProgressCallback = Callable[[ApplySummary], None]
# Called with the patches of one page that were written (for live cell updates).
WrittenCallback = Callable[[Sequence[RowPatch]], None]


def cell_meta(outcome: FieldOutcome, request_id: str) -> dict[str, Any]:
    """What a cell's `meta` records: status, confidence, provenance, time, error."""
    value = outcome.value
    return {
        "status": outcome.status.value,
        "confidence": round(value.confidence, 4) if value else None,
        "source": value.source if value else None,
        "fetched_at": value.fetched_at.isoformat() if value else None,
        "error": redact(outcome.error) if outcome.error else None,
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
    watch: RequestWatch | None = None,
    cancelled: bool = False,
    read: Mapping[str, int] | None = None,
    on_written: WrittenCallback | None = None,
) -> ApplySummary:
    """Write every selected cell's outcome: one read and one JSON-merge UPDATE per page of rows.

    The rows written are let go of by this request in the same statement (their status is
    the patch's); rows it skips stay held until `finish_job` (or whatever ends it) lets go.

    A cell is written only if it still holds what the job read: empty, or for an overwriting
    job the value it fingerprinted at detection (`read`, `Detection.read`). The check is made
    on the page read and again inside the UPDATE (compare-and-set), so an edit made at any
    time before the write wins: its row is read again and the edited cell is kept (counted
    skipped, `kept`).

    With a `watch`, its beats carry the counters so far, and a request closed under the job
    stops it between pages (every row is then either fully written by this job or untouched).
    A `cancelled` job still writes what it bought; its cells with no answer are counted
    `skipped: cancelled` on the request and are left untouched in the rows.

    `on_written` hears each page's patches that were written (a row an edit beat is not among
    them), before `progress` hears the page's counters.
    """
    started = time.perf_counter()
    before = store.statements
    summary = ApplySummary()
    if watch is not None:
        watch.progress = lambda: progress_counters(summary)
    missing = FieldOutcome(CellStatus.SKIPPED, error=CANCELLED if cancelled else ROW_CHANGED)
    writer = _CellWriter(target, outcomes, request_id, missing, read)
    for page in store.iter_row_pages(
        target.table_id, row_ids=target.page_row_ids(), page_size=page_size
    ):
        if watch is not None:
            watch.raise_if_closed()
        _write_page(store, writer, list(page), summary, on_written)
        if progress is not None:
            progress(summary)
    summary.statements = store.statements - before
    summary.seconds = time.perf_counter() - started
    return summary


# How often a page's rows are read again when an edit beats the write (each time, only the
# rows that changed): an edit loop faster than this can only cost its cells, counted skipped.
WRITE_ATTEMPTS = 3
KEPT = "kept: the cell holds a value (ask with overwrite to replace it)"


@dataclass
class _RowWrite:
    row_id: str
    write: RowPatch | None
    counts: Counter[str]
    kept: int


@dataclass(frozen=True, slots=True)
class _Answer:
    """What the job writes for one set of cells and their outcomes, whichever row they are in:
    the values, each cell's meta, the counts, and the row status these cells alone give."""

    outcomes: tuple[FieldOutcome | None, ...]  # kept so the ids in the cache key stay theirs
    data: SharedDocument
    meta: SharedDocument
    counts: Counter[str]
    status: tuple[str, float | None, str | None]


_NO_IDENTIFIER = FieldOutcome(CellStatus.FAILED, error=NO_IDENTIFIER)
# A cell as the writer needs it: its data key, its field's name, and whether it is a person's.
_Cell = tuple[str, str, bool]


@dataclass
class _CellWriter:
    """Turns one row and the job's outcomes into its patch and what it counts.

    Rows about the same entity write the same thing: the values, cell meta, counts and row
    status for a set of cells and their outcomes are built once (`_Answer`, keyed by the cells'
    keys and the outcome objects) and shared by every such row, and equal cell meta is one
    object (`_cell_meta`, `_row_metas`): a shared object is encoded once for the whole job
    (`SharedDocument`) and parsed by the database once per page (`Store.apply_patches`).
    Per row only its own part is made: which cells it fills, which entities its identifiers
    name, what its cells hold now (`expect`), and its status if the row had `meta` already.
    """

    target: JobTarget
    outcomes: Outcomes
    request_id: str
    missing: FieldOutcome
    read: Mapping[str, int] | None  # None: no fingerprints (compare with the page read only)
    _answers: dict[tuple[object, ...], _Answer] = field(default_factory=dict, repr=False)
    _cell_metas: dict[tuple[object, ...], dict[str, Any]] = field(default_factory=dict, repr=False)
    _row_metas: dict[tuple[object, ...], SharedDocument] = field(default_factory=dict, repr=False)
    _all_cells: tuple[_Cell, ...] | None = field(default=None, repr=False)

    def patch(self, row: RowRecord) -> _RowWrite:
        fill, kept = self.target.split(row, request_id=self.request_id)
        if self.target.overwrite and self.read is not None:
            changed = [
                c
                for c in fill
                if not self._as_read(row, c.key) and not written_by(row, c.key, self.request_id)
            ]
            fill = [c for c in fill if c not in changed]
            kept = kept + changed
        cells = self._cells(fill)
        outcomes: list[FieldOutcome | None] = []
        shape: list[object] = []  # each cell's key and outcome: what the row writes
        if cells:
            found = identify_row(
                row.data, self.target.identifiers, person_wanted=any(c[2] for c in cells)
            )
            last: EntityKey | None = None
            answers: dict[str, FieldOutcome] = {}
            for key, name, is_person in cells:
                entity = found.person if is_person else found.company
                if entity is None:
                    outcome: FieldOutcome | None = _NO_IDENTIFIER
                else:
                    if entity is not last:  # a row's cells share one EntityKey object
                        last = entity
                        answers = self.outcomes.get(entity.id, {})
                    # None: the row's identifiers changed after detection, or the job was
                    # cancelled before it reached this entity: it has no answer for it.
                    outcome = answers.get(name)
                outcomes.append(outcome)
                shape += (key, id(outcome))
        shared = self._answers.get(tuple(shape))
        if shared is None:
            shared = self._answers[tuple(shape)] = self._answer(cells, tuple(outcomes))
        counts = shared.counts
        if kept:
            counts = counts.copy()
            counts[CellStatus.SKIPPED.value] += len(kept)
        meta = shared.meta
        if not meta:
            return _RowWrite(row.id, None, counts, len(kept))
        data = row.data
        expect = {key: data.get(key) for key in meta}  # what it holds now (None: empty)
        if row.meta:
            # Its cells had meta before (this job's or others'): the row's status is all of
            # them, in the row's order (which error comes first).
            aggregate, confidence, error = aggregate_row({**row.meta, **meta})
            status = (aggregate.value, confidence, error)
        else:
            status = shared.status
        write = RowPatch(row.id, shared.data, meta, *status, expect)
        return _RowWrite(row.id, write, counts, len(kept))

    def _cells(self, fill: Sequence[ColumnSpec]) -> tuple[_Cell, ...]:
        """The cells a row fills (every column of the job, most often: made once)."""
        columns = self.target.columns
        if len(fill) == len(columns):  # `fill` is a sublist of the job's columns
            if self._all_cells is None:
                self._all_cells = _writer_cells(columns)
            return self._all_cells
        return _writer_cells(fill)

    def _answer(self, cells: Sequence[_Cell], outcomes: tuple[FieldOutcome | None, ...]) -> _Answer:
        data = SharedDocument()
        metas: list[tuple[str, dict[str, Any]]] = []
        counts: Counter[str] = Counter()
        for (key, _name, _person), found in zip(cells, outcomes, strict=True):
            outcome = found or self.missing
            counts[outcome.status.value] += 1
            if outcome.error == CANCELLED:
                # A cell the cancelled job never reached is left as it was (its row goes back
                # to the status it had); the request counts it `skipped: cancelled`.
                continue
            metas.append((key, self._cell_meta(outcome)))
            if outcome.status is CellStatus.DONE and outcome.value is not None:
                data[key] = outcome.value.value
        shape = tuple((key, id(meta)) for key, meta in metas)
        meta = self._row_metas.get(shape)
        if meta is None:
            meta = self._row_metas[shape] = SharedDocument(metas)
        aggregate, confidence, error = aggregate_row(meta)
        return _Answer(outcomes, data, meta, counts, (aggregate.value, confidence, error))

    def _cell_meta(self, outcome: FieldOutcome) -> dict[str, Any]:
        """`cell_meta`, one object per distinct meta (what it records of the outcome)."""
        value = outcome.value
        # What `cell_meta` writes, exactly: 1 and 1.0 are equal keys but not equal JSON, nor are
        # two equal instants in different offsets.
        key = (
            (
                outcome.status,
                type(value.confidence),
                value.confidence,
                value.source,
                value.fetched_at.isoformat(),
                outcome.error,
            )
            if value is not None
            else (outcome.status, outcome.error)
        )
        meta = self._cell_metas.get(key)
        if meta is None:
            meta = self._cell_metas[key] = cell_meta(outcome, self.request_id)
        return meta

    def _as_read(self, row: RowRecord, key: str) -> bool:
        """The cell still holds what detection read (empty, or the fingerprinted value)."""
        value = row.data.get(key)
        remembered = self.read.get(cell_ref(row.id, key)) if self.read else None
        if remembered is None:
            return is_empty(value)
        return not is_empty(value) and cell_digest(value) == remembered


def _writer_cells(columns: Sequence[ColumnSpec]) -> tuple[_Cell, ...]:
    cells = []
    for column in columns:
        if column.field is None:  # validated away before a job starts
            raise ValueError(f"column {column.key!r} maps to no field")
        cells.append((column.key, column.field.name, column.field.entity_type is EntityType.PERSON))
    return tuple(cells)


def progress_counters(summary: ApplySummary) -> dict[str, int]:
    return {
        "rows_written": summary.rows_written,
        "cells_done": summary.cells[CellStatus.DONE],
        "cells_failed": summary.cells[CellStatus.FAILED],
        "cells_not_found": summary.cells[CellStatus.NOT_FOUND],
        "cells_skipped": summary.cells[CellStatus.SKIPPED],
    }


def merge_chunks(results: Iterable[ChunkResult]) -> tuple[Outcomes, WaterfallStats]:
    outcomes: Outcomes = {}
    stats = WaterfallStats()
    for result in results:
        outcomes.update(result.outcomes)
        stats.merge(result.stats)
    return outcomes, stats


def merge_estimates(results: Iterable[ChunkResult]) -> EstimatePart:
    """An estimate job's chunks as one estimate, in the job's entity order."""
    total = EstimatePart()
    for result in results:
        if result.estimate is not None:
            total.merge(result.estimate)
    return total


def relevant_providers(
    providers: Sequence[Provider], entities: Iterable[EntityRequest]
) -> list[Provider]:
    """The providers a job's waterfall may ask: of its entities' types, supplying a field they
    want. The preflight checks these, not every provider configured."""
    wanted: dict[EntityType, set[str]] = {}
    for request in entities:
        wanted.setdefault(request.key.type, set()).update(request.fields)
    return [p for p in providers if p.fields & wanted.get(p.entity_type, set())]


def unavailable_summary(unavailable: Mapping[str, str]) -> str:
    """How a request names the providers it could not use."""
    return "; ".join(
        f"provider unavailable: {name} ({reason})" for name, reason in sorted(unavailable.items())
    )


def final_status(cells: Counter[str], kept: int = 0) -> RequestStatus:
    """succeeded: every cell answered (a value or a clear "not found") or kept as the user
    left it; failed: nothing did."""
    answered = cells[CellStatus.DONE] + cells[CellStatus.NOT_FOUND]
    unanswered = cells[CellStatus.FAILED] + cells[CellStatus.SKIPPED] - kept
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
    cancelled: str | None = None,
    estimate: EstimatePart | None = None,
    providers: Sequence[Provider] = (),
    unavailable: Mapping[str, str] | None = None,
    budget: float | None = None,
) -> RequestStatus | None:
    """Close the request: terminal status with a reason, counters, calls and cost.

    The calls and cost are the spend ledger's (RequestRepository folds it in at every ending),
    not this process's counts. An `estimate` stores what the job would buy; a `pre_enrich`
    only warmed the cache; `cancelled` (the reason) ends it `cancelled` with what it wrote.
    Returns the status written, or None when the request had already ended (it is then left
    as it is: a terminal request is history). The lookups that never left the machine are
    recorded by provider and reason (`calls_not_sent`), and a provider found unusable is named
    in the request's error.

    Then the rows the request still holds (not written: a cancel, a row with nothing to fill)
    are let go of, after the ending, so no later page can hold one again.
    """
    requests = RequestRepository(store)
    unavailable = dict(unavailable or {})
    status: RequestStatus | None
    if kind is RequestKind.ESTIMATE and cancelled is None:
        report = estimate_report(
            estimate or EstimatePart(),
            providers=providers,
            entities=entities,
            cells=detection_cells,
            cells_without_identifier=cells_without_identifier,
            unavailable=unavailable,
            budget=budget,
        )
        counters = {"entities": entities, "cells_total": detection_cells, "estimate": report}
        written = requests.finish(request_id, RequestStatus.SUCCEEDED, counters=counters)
        status = RequestStatus.SUCCEEDED if written else None
    else:
        # Calls and cost are not among them: the spend ledger is their one source.
        counters = {
            "entities": entities,
            "rows_total": summary.rows_read,
            "cells_total": summary.cells_total if kind is RequestKind.ENRICH else detection_cells,
            "cache_hits": stats.cache_hits,
            **progress_counters(summary),
        }
        not_sent = stats.not_sent_dict()
        extra: dict[str, Any] = {"calls_not_sent": not_sent} if not_sent else {}
        if cancelled is not None:
            written = requests.cancel(request_id, cancelled, counters={**counters, **extra})
            status = RequestStatus.CANCELLED if written else None
        else:
            status = (
                final_status(summary.cells, summary.kept)
                if kind is RequestKind.ENRICH
                else RequestStatus.SUCCEEDED
            )
            failed = summary.cells[CellStatus.FAILED]
            skipped = summary.cells[CellStatus.SKIPPED] - summary.kept
            parts = [
                f"{failed} cells failed" if failed else "",
                f"{skipped} skipped" if skipped else "",
                f"{summary.kept} {KEPT}" if summary.kept else "",
            ]
            error = ", ".join(part for part in parts if part) or None
            if unavailable:
                error = "; ".join(filter(None, [error, unavailable_summary(unavailable)]))
            counters = {**counters, **extra}
            if not requests.finish(request_id, status, error=error, counters=counters):
                status = None
    store.release_rows(request_id)
    return status


def fail_job(store: Store, request_id: str, error: BaseException | str) -> bool:
    """Record that a job died, with the reason; rows keep what was written (consistent per row)
    and the rows it still held are let go of. False when the request had already ended."""
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    failed = RequestRepository(store).fail(request_id, reason)
    store.release_rows(request_id)
    return failed
