"""The limits every edge checks, the same on both databases (SQLite does not enforce VARCHAR
lengths and stores 64-bit integers; Postgres refuses with a traceback): checked here with a
message that names the problem, and enforced again by the database (migration 0006)."""

from __future__ import annotations

import math
from typing import Any

from glaze_pipeline.core.errors import InputError, InvalidSelectionError
from glaze_pipeline.core.schema import EnrichmentRequest, GlazeColumn, GlazeTable


def _length(column: Any) -> int:
    return int(column.type.length)


# Read from the schema, so they cannot drift from what Postgres enforces.
MAX_TABLE_NAME = _length(GlazeTable.__table__.c.name)
MAX_COLUMN_KEY = _length(GlazeColumn.__table__.c.key)
MAX_COLUMN_LABEL = _length(GlazeColumn.__table__.c.label)
MAX_ID = _length(GlazeTable.__table__.c.id)  # table, column, row and request ids
MAX_IDEMPOTENCY_KEY = _length(EnrichmentRequest.__table__.c.idempotency_key)
MIN_PRIORITY, MAX_PRIORITY = -1_000_000, 1_000_000
# A budget is a number of credits; anything above this is a typo (or infinity), not a budget.
MAX_BUDGET = 1e12


def check_budget(budget: Any) -> float | None:
    """A budget: None (unlimited) or a finite number >= 0."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise InvalidSelectionError(f"budget must be a number >= 0, got {budget!r}")
    if not (math.isfinite(budget) and 0 <= budget <= MAX_BUDGET):
        raise InvalidSelectionError(
            f"budget must be a number >= 0 and <= {MAX_BUDGET:.0e}, got {budget}"
        )
    return float(budget)


def check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidSelectionError(f"priority must be an integer, got {priority!r}")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidSelectionError(
            f"priority must be between {MIN_PRIORITY:,} and {MAX_PRIORITY:,}, got {priority:,}"
        )
    return priority


def check_text(what: str, value: str | None, limit: int, *, required: bool = True) -> None:
    """A name, key or id: present (when required) and at most `limit` characters."""
    if value is None:
        if required:
            raise InputError(f"{what} is required")
        return
    if required and not value.strip():
        raise InputError(f"{what} must not be empty")
    if len(value) > limit:
        raise InputError(f"{what} is {len(value)} characters long; the limit is {limit}")
    if "\x00" in value:
        raise InputError(f"{what} contains a NUL character")
