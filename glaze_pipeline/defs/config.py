"""Typed run config of `enrich_table`, validated into the core's Selection and JobSettings.

Every default is JobSettings' (core/engine.py), so the Launchpad, the CLI, the benchmark and the
engine never disagree on what an unset knob means.
"""

import enum
from typing import Any

from dagster import Config
from pydantic import Field

from glaze_pipeline.core.engine import JobSettings
from glaze_pipeline.core.models import CellRef, RequestKind, Selection


class JobKind(enum.StrEnum):
    """`RequestKind` as the run config spells it, so a bad kind fails config validation.

    Dagster matches a config enum by member *name*: the names are the lowercase values the
    sensor, the launcher, the CLI and the app already send (`kind: pre_enrich`).
    """

    enrich = "enrich"
    estimate = "estimate"
    pre_enrich = "pre_enrich"


class CellConfig(Config):
    row_id: str
    column_id: str


class EnrichTableConfig(Config):
    """Which cells of which table to fill, and how.

    Give exactly one selection shape: `column_ids` (+ optional `row_ids`, the grid), `cells`,
    or `whole_table: true` (every empty cell of every column that maps to a field).
    """

    table_id: str = Field(description="The table to enrich.")
    column_ids: list[str] = Field(default=[], description="Grid: the columns to fill.")
    row_ids: list[str] = Field(default=[], description="Grid: the rows (empty = all rows).")
    cells: list[CellConfig] = Field(default=[], description="Explicit cells to fill.")
    whole_table: bool = Field(default=False, description="Fill every empty enrichable cell.")
    overwrite: bool = Field(
        default=False,
        description="Grid or cells: also replace cells that hold a value (by default a cell "
        "someone filled is kept).",
    )
    budget: float | None = Field(default=None, description="Max spend; none = unlimited.")
    chunk_size: int = Field(
        default=JobSettings.chunk_size, description="Min entities per enrich step."
    )
    max_chunks: int | None = Field(
        default=JobSettings.max_chunks,
        description="Max enrich steps (fan-out width); none: 4 in process, where steps run one "
        "after another (more if a span would own over 20,000 entities), 16 when they run side "
        "by side (multiprocess, Celery).",
    )
    concurrency: int = Field(
        default=JobSettings.concurrency, description="Concurrent entity lookups per step."
    )
    threshold: float = Field(
        default=JobSettings.threshold, description="Confidence at which a field is done."
    )
    page_size: int = Field(
        default=JobSettings.page_size,
        description="Rows per page read by detection, and the most a streamed write grows to.",
    )
    write_page_size: int = Field(
        default=JobSettings.write_page_size,
        description="Rows in the first span's first streamed write (each next page twice the "
        "last, up to page_size; a later span starts at page_size): a page is written as soon "
        "as its entities are answered.",
    )
    batch_endpoints: bool = Field(
        default=JobSettings.batch_endpoints,
        description="Use the vendors' batch endpoints where a provider declares one (calls "
        "and cost are still counted per entity).",
    )
    kind: JobKind = Field(
        default=JobKind.enrich,
        description="enrich (fill cells), estimate (count what it would buy), pre_enrich "
        "(warm the cache, write no cell).",
    )
    request_id: str | None = Field(
        default=None, description="The queued request this run serves (set by the sensor)."
    )

    def op_config(self) -> dict[str, Any]:
        """What a run config carries for `detect_entities`: only the fields set here, so a knob
        left unset takes the job's default when the run starts (see `queue.job_run`)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def selection(self) -> Selection:
        return Selection(
            column_ids=self.column_ids,
            row_ids=self.row_ids,
            cells=[CellRef(row_id=c.row_id, column_id=c.column_id) for c in self.cells],
            whole_table=self.whole_table,
            overwrite=self.overwrite,
        )

    def request_kind(self) -> RequestKind:
        return RequestKind(self.kind.value)

    def settings(self) -> JobSettings:
        return JobSettings(
            budget=self.budget,
            chunk_size=self.chunk_size,
            max_chunks=self.max_chunks,
            concurrency=self.concurrency,
            threshold=self.threshold,
            page_size=self.page_size,
            write_page_size=self.write_page_size,
            batch_endpoints=self.batch_endpoints,
        )
