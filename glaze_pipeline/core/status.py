"""Row status and confidence, aggregated from the row's enriched cells (seed 001's table).

| the row                                   | row status         |
| held by a job (`rows.pending_request_id`) | `queued` / `running`, the hold's |
| all cells done                            | done               |
| all cells failed                          | failed             |
| no enriched cell                          | idle               |
| anything else (a mix, not found, skipped) | ambiguous          |

Cells are never stored `queued` or `running` (no record per cell): a job holds whole rows
instead (core/store.py `hold_rows`), `queued` once its request is queued or claimed, `running`
from detection, and lets go when it writes them or ends. Because a row's status is otherwise
derived from `meta` alone, it can always be recomputed, which is how a cancelled, failed or
killed job puts its rows back to what their cells say (`release_rows`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from glaze_pipeline.core.models import CellStatus, RequestStatus, RowStatus

# Seed 001's job status word for each request status (the API's `status`; `state` keeps ours).
# Seed 003's AI jobs use the same words but have no "cancelled" (core/ai/workflow.SEED_STATUS).
SEED_JOB_STATUS: dict[RequestStatus, str] = {
    RequestStatus.QUEUED: "pending",
    RequestStatus.LAUNCHED: "pending",
    RequestStatus.RUNNING: "running",
    RequestStatus.SUCCEEDED: "completed",
    RequestStatus.PARTIAL: "completed",
    RequestStatus.FAILED: "failed",
    RequestStatus.CANCELLED: "cancelled",
}


def aggregate_row(meta: Mapping[str, Any]) -> tuple[RowStatus, float | None, str | None]:
    """(status, mean confidence of done cells, first error) for a row's cell meta."""
    statuses: list[str] = []
    confidences: list[float] = []
    error: str | None = None
    for cell in meta.values():
        if not isinstance(cell, Mapping) or not cell.get("status"):
            continue  # not an engine outcome (a user's edit has none)
        statuses.append(cell["status"])
        if cell["status"] == CellStatus.DONE and cell.get("confidence") is not None:
            confidences.append(float(cell["confidence"]))
        if error is None and cell.get("error"):
            error = str(cell["error"])
    confidence = round(sum(confidences) / len(confidences), 4) if confidences else None
    if not statuses:
        return RowStatus.IDLE, None, None
    if RowStatus.RUNNING in statuses:
        return RowStatus.RUNNING, confidence, error
    if RowStatus.QUEUED in statuses:
        return RowStatus.QUEUED, confidence, error
    if all(s == CellStatus.DONE for s in statuses):
        return RowStatus.DONE, confidence, None
    if all(s == CellStatus.FAILED for s in statuses):
        return RowStatus.FAILED, None, error
    return RowStatus.AMBIGUOUS, confidence, error
