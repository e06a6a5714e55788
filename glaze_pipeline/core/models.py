"""Domain types shared by every part of the engine (no Dagster, no SQL)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EntityType(enum.StrEnum):
    COMPANY = "company"
    PERSON = "person"


class CellStatus(enum.StrEnum):
    """Terminal outcome of one cell; "not found" and "failed" are never the same thing."""

    DONE = "done"
    NOT_FOUND = "not_found"
    FAILED = "failed"
    SKIPPED = "skipped"


class RowStatus(enum.StrEnum):
    IDLE = "idle"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    AMBIGUOUS = "ambiguous"


class RequestStatus(enum.StrEnum):
    QUEUED = "queued"
    LAUNCHED = "launched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_REQUEST_STATUSES = frozenset(
    {
        RequestStatus.SUCCEEDED,
        RequestStatus.PARTIAL,
        RequestStatus.FAILED,
        RequestStatus.CANCELLED,
    }
)


class RequestKind(enum.StrEnum):
    ENRICH = "enrich"
    ESTIMATE = "estimate"
    PRE_ENRICH = "pre_enrich"
    # The AI workflows of seed 003: each proposes, nothing is written until it is accepted.
    TABLE_SUGGESTIONS = "table_suggestions"
    COLUMN_SUGGESTIONS = "column_suggestions"
    ROW_SUGGESTIONS = "row_suggestions"
    TABLE_GENERATION = "table_generation"


AI_REQUEST_KINDS = frozenset(
    {
        RequestKind.TABLE_SUGGESTIONS,
        RequestKind.COLUMN_SUGGESTIONS,
        RequestKind.ROW_SUGGESTIONS,
        RequestKind.TABLE_GENERATION,
    }
)


@dataclass(frozen=True, slots=True)
class EntityKey:
    """Which real-world entity a cell is about, e.g. company by registrable domain.

    `strength` is how much we trust the identifier itself: a domain pins a company, a
    normalised name only suggests one, so values found through it get lower confidence.
    """

    type: EntityType
    kind: str  # domain | name | linkedin | email | name_company
    value: str
    strength: float = 1.0
    # Computed once: a job hashes each key once per cell it reads (the entity index, the
    # outcomes), and the generated hash calls EntityType's Python-level __hash__ every time.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.type, self.kind, self.value, self.strength)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[Callable[..., EntityKey], tuple[EntityType, str, str, float]]:
        # Never the hash: str hashes differ between processes (a pickled chunk is read by
        # another step process), so it is computed again where the key is unpickled.
        return EntityKey, (self.type, self.kind, self.value, self.strength)

    @property
    def id(self) -> str:
        return f"{self.type.value}:{self.kind}:{self.value}"

    def __str__(self) -> str:
        return self.id


class CellRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    row_id: str
    column_id: str


class Selection(BaseModel):
    """Which cells to fill: a grid (columns x rows), explicit cells, or the whole table.

    Exactly one shape is given. In the grid shape, an empty `row_ids` means every row.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    column_ids: list[str] = Field(default_factory=list)
    row_ids: list[str] = Field(default_factory=list)
    cells: list[CellRef] = Field(default_factory=list)
    whole_table: bool = False
    # A cell that holds a value is the user's: it is kept unless the request says overwrite
    # (a grid or explicit cells only; a whole-table job fills empty cells, always).
    overwrite: bool = False

    @model_validator(mode="after")
    def _one_shape(self) -> Selection:
        shapes = [bool(self.column_ids), bool(self.cells), self.whole_table]
        if sum(shapes) != 1:
            raise ValueError(
                "selection must give exactly one of: column_ids (+ optional row_ids), "
                "cells, or whole_table=true"
            )
        if self.row_ids and not self.column_ids:
            raise ValueError("row_ids needs column_ids (grid selection)")
        if self.overwrite and self.whole_table:
            raise ValueError(
                "overwrite needs column_ids or cells: a whole-table job fills empty cells only"
            )
        return self

    @property
    def shape(self) -> str:
        if self.cells:
            return "cells"
        if self.whole_table:
            return "whole_table"
        return "grid"


# The per-entity result types are slotted dataclasses, not pydantic models: a large job
# holds hundreds of thousands of them, and they never cross a trust boundary.


@dataclass(frozen=True, slots=True)
class FieldValue:
    """One value for one field of one entity, with where it came from."""

    value: Any
    confidence: float
    source: str
    fetched_at: datetime

    def __reduce__(self) -> tuple[type[FieldValue], tuple[Any, float, str, datetime]]:
        # Pickled as a constructor call: a frozen slotted dataclass's default unpickling
        # calls `dataclasses.fields()` per object (~8 us: 0.8 s per 100,000 of a step's input).
        return FieldValue, (self.value, self.confidence, self.source, self.fetched_at)


@dataclass(frozen=True, slots=True)
class FieldOutcome:
    """How one requested field of one entity ended: a value, or why there is none."""

    status: CellStatus
    value: FieldValue | None = None
    error: str | None = None

    def __reduce__(self) -> tuple[type[FieldOutcome], tuple[Any, ...]]:
        return FieldOutcome, (self.status, self.value, self.error)  # as FieldValue's


@dataclass(frozen=True, slots=True)
class EntityRequest:
    """A unique entity to enrich and the fields the job's cells want from it."""

    key: EntityKey
    fields: frozenset[str]
    cells: int = 0  # how many of the job's cells are about it (0: not counted)

    def __reduce__(self) -> tuple[type[EntityRequest], tuple[Any, ...]]:
        return EntityRequest, (self.key, self.fields, self.cells)  # as FieldValue's


@dataclass(frozen=True, slots=True)
class EntityOutcome:
    key: EntityKey
    fields: dict[str, FieldOutcome]

    def __reduce__(self) -> tuple[type[EntityOutcome], tuple[Any, ...]]:
        return EntityOutcome, (self.key, self.fields)  # as FieldValue's


@dataclass
class Observation:
    """What one provider's lookups by one kind of key answered: the estimate's evidence.

    `fields`: per field asked of a found entity, [times asked, times filled].
    """

    lookups: int = 0
    found: int = 0
    charged: int = 0
    errors: int = 0
    fields: dict[str, list[int]] = field(default_factory=dict)

    def merge(self, other: Observation) -> None:
        self.lookups += other.lookups
        self.found += other.found
        self.charged += other.charged
        self.errors += other.errors
        for name, (asked, filled) in other.fields.items():
            mine = self.fields.setdefault(name, [0, 0])
            mine[0] += asked
            mine[1] += filled
