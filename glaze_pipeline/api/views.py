"""A request row as the app sees a job: seed 001's status words, progress in percent, camelCase.

The engine's states are richer than seed 001's five; `state` carries them, `status` maps them:

| engine `state`        | seed `status` |
|-----------------------|---------------|
| queued, launched      | pending       |
| running               | running       |
| succeeded, partial    | completed     |
| failed                | failed        |
| cancelled             | cancelled     |

(`partial` is a completed job with some cells failed: `failedTasks` says how many.)
"""

from __future__ import annotations

from typing import Any, cast

from glaze_pipeline.api.models import Estimate, JobOut, JobPhase, SeedStatus
from glaze_pipeline.core.models import RequestStatus
from glaze_pipeline.core.progress import job_progress
from glaze_pipeline.core.schema import EnrichmentRequest
from glaze_pipeline.core.status import SEED_JOB_STATUS


def seed_status(state: str) -> SeedStatus:
    """Seed 001's status word for a request status (core/status.SEED_JOB_STATUS)."""
    return cast(SeedStatus, SEED_JOB_STATUS[RequestStatus(state)])


def cells_answered(request: EnrichmentRequest) -> int:
    return (
        request.cells_done + request.cells_not_found + request.cells_failed + request.cells_skipped
    )


def phase_and_progress(request: EnrichmentRequest) -> tuple[JobPhase, int]:
    """Where the job is and how far, from the counters on its row."""
    state = RequestStatus(request.status)
    if state not in (RequestStatus.QUEUED, RequestStatus.LAUNCHED, RequestStatus.RUNNING):
        return "done", 100
    if state is not RequestStatus.RUNNING:
        return "queued", 0
    phase, progress = job_progress(
        entities_done=request.entities_done,
        entities=request.entities,
        cells_answered=cells_answered(request),
        cells_total=request.cells_total,
    )
    return cast(JobPhase, phase), progress


def job_out(request: EnrichmentRequest, **extra: Any) -> JobOut:
    phase, progress = phase_and_progress(request)
    estimate = (
        Estimate.model_validate(request.estimate)
        if request.kind == "estimate" and request.estimate
        else None
    )
    return JobOut(
        job_id=request.id,
        table_id=request.table_id,
        kind=request.kind,
        status=seed_status(request.status),
        state=request.status,
        cancel_requested=bool(request.cancel_requested),
        phase=phase,
        progress=progress,
        total_tasks=request.cells_total,
        done_tasks=request.cells_done,
        not_found_tasks=request.cells_not_found,
        failed_tasks=request.cells_failed,
        skipped_tasks=request.cells_skipped,
        entities=request.entities,
        entities_done=min(request.entities_done, request.entities),
        cache_hits=request.cache_hits,
        rows_total=request.rows_total,
        rows_written=request.rows_written,
        cost=request.cost,
        budget=request.budget,
        cost_by_provider=dict(request.cost_by_provider or {}),
        provider_calls=dict(request.provider_calls or {}),
        calls_not_sent=dict(request.calls_not_sent or {}),
        unavailable_providers=dict(request.unavailable_providers or {}),
        run_id=request.run_id,
        created_at=request.created_at,
        started_at=request.started_at,
        completed_at=request.finished_at,
        error=request.error,
        estimate=estimate,
        entity_count=request.entities,
        processed_count=min(request.entities_done, request.entities),
        **extra,
    )
