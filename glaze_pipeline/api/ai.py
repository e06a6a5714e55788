"""Seed 003's AI endpoints: queue an AI job, read it, cancel it, accept its proposal.

Like enrichment, the API only writes requests and reads state: the job runs in Dagster
(launched by the launcher or the sensor), and a job's `publicAccessToken` reads that job and
its realtime stream (`/realtime/jobs/{jobId}`) only.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, status

from glaze_pipeline.api import auth
from glaze_pipeline.api.models import (
    AiAcceptBody,
    AiAccepted,
    AiColumnsBody,
    AiGenerateBody,
    AiJobOut,
    AiJobQueued,
    AiRowsBody,
    AiTableBody,
)
from glaze_pipeline.core import queue
from glaze_pipeline.core.ai.accept import accept_proposal
from glaze_pipeline.core.ai.workflow import ai_status, enqueue_ai, retry_ai, table_context
from glaze_pipeline.core.errors import UnknownRequestError
from glaze_pipeline.core.models import (
    AI_REQUEST_KINDS,
    TERMINAL_REQUEST_STATUSES,
    RequestKind,
    RequestStatus,
)
from glaze_pipeline.core.requests import RequestRepository
from glaze_pipeline.core.schema import EnrichmentRequest
from glaze_pipeline.core.store import Store


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _queued(
    request: Request,
    kind: RequestKind,
    context: str,
    *,
    table_id: str | None = None,
    count: int | None = None,
    idempotency_key: str | None = None,
) -> AiJobQueued:
    enqueued = enqueue_ai(
        _store(request),
        kind,
        context,
        table_id=table_id,
        count=count,
        idempotency_key=idempotency_key,
    )
    return _answer(request, enqueued.request_id)


def _answer(request: Request, job_id: str) -> AiJobQueued:
    """A queued AI job as the app reads it, with a token for it alone."""
    job = RequestRepository(_store(request)).get(job_id)
    signer: auth.TokenSigner = request.app.state.signer
    token, expires = signer.issue_job_token(job.id, job.table_id)
    return AiJobQueued(
        job_id=job.id,
        table_id=job.table_id,
        kind=job.kind,
        status=ai_status(job)["status"],
        public_access_token=token,
        token_expires_at=expires,
    )


def _ai_job(store: Store, job_id: str) -> EnrichmentRequest:
    """An AI job by id: 404 for an unknown id and for an enrichment job's id."""
    job = RequestRepository(store).get(job_id)
    if job.kind not in AI_REQUEST_KINDS:
        raise UnknownRequestError(f"unknown AI job {job_id!r} (it is an {job.kind} job)")
    return job


def ai_routes() -> APIRouter:
    """The routes that need an API key (or a session)."""
    router = APIRouter(prefix="/ai", tags=["ai"])

    @router.post("", response_model=AiJobQueued, status_code=status.HTTP_202_ACCEPTED)
    def generate(request: Request, body: AiGenerateBody) -> AiJobQueued:
        """The table-generation workflow: a table, its columns, then rows, each step given the
        ones before. Without `tableId` a new table's id is reserved (accepting creates it)."""
        return _queued(
            request,
            RequestKind.TABLE_GENERATION,
            body.context,
            table_id=body.table_id,
            count=body.rows,
            idempotency_key=body.idempotency_key,
        )

    @router.post(
        "/table-suggestions", response_model=AiJobQueued, status_code=status.HTTP_202_ACCEPTED
    )
    def table_suggestions(request: Request, body: AiTableBody) -> AiJobQueued:
        """Propose a table (name, description, what a row is) for a context."""
        return _queued(
            request,
            RequestKind.TABLE_SUGGESTIONS,
            body.context,
            idempotency_key=body.idempotency_key,
        )

    @router.post(
        "/column-suggestions", response_model=AiJobQueued, status_code=status.HTTP_202_ACCEPTED
    )
    def column_suggestions(request: Request, body: AiColumnsBody) -> AiJobQueued:
        """Propose columns for an existing table (identifiers, enrichment fields, AI columns)."""
        context = body.context or table_context(_store(request), body.table_id)
        return _queued(
            request,
            RequestKind.COLUMN_SUGGESTIONS,
            context,
            table_id=body.table_id,
            idempotency_key=body.idempotency_key,
        )

    @router.post(
        "/row-suggestions", response_model=AiJobQueued, status_code=status.HTTP_202_ACCEPTED
    )
    def row_suggestions(request: Request, body: AiRowsBody) -> AiJobQueued:
        """Propose `count` rows for an existing table, deduplicated against its rows."""
        context = body.context or table_context(_store(request), body.table_id)
        return _queued(
            request,
            RequestKind.ROW_SUGGESTIONS,
            context,
            table_id=body.table_id,
            count=body.count,
            idempotency_key=body.idempotency_key,
        )

    @router.post(
        "/jobs/{job_id}/cancel", response_model=AiJobOut, status_code=status.HTTP_202_ACCEPTED
    )
    def cancel(request: Request, job_id: str) -> AiJobOut:
        """Stop an AI job: a queued one ends at once, a running one within seconds (an LLM call
        in flight is abandoned). An ended job is left as it is."""
        store = _store(request)
        job = _ai_job(store, job_id)
        if RequestStatus(job.status) not in TERMINAL_REQUEST_STATUSES:
            queue.request_cancel(store, job_id, request.app.state.publisher)
        return AiJobOut.model_validate(ai_status(RequestRepository(store).get(job_id)))

    @router.post(
        "/jobs/{job_id}/retry", response_model=AiJobQueued, status_code=status.HTTP_202_ACCEPTED
    )
    def retry(request: Request, job_id: str) -> AiJobQueued:
        """Seed 003's retryJob: a failed or cancelled AI job asked again, as a new job (its
        `retryOf` is this one) on the same table; 422 for a job that succeeded or still runs."""
        store = _store(request)
        _ai_job(store, job_id)
        return _answer(request, retry_ai(store, job_id).request_id)

    @router.post("/jobs/{job_id}/accept", response_model=AiAccepted)
    def accept(request: Request, job_id: str, body: AiAcceptBody | None = None) -> AiAccepted:
        """Write a completed proposal into a real table (created or extended), all or nothing;
        suggested rows already in the table (same domain, LinkedIn or email) are skipped.
        Accepting again adds nothing and answers the same table."""
        store = _store(request)
        _ai_job(store, job_id)
        accepted = accept_proposal(store, job_id, with_rows=(body or AiAcceptBody()).rows)
        return AiAccepted(
            table_id=accepted.table_id,
            created=accepted.created,
            columns_added=list(accepted.columns_added),
            rows_added=accepted.rows_added,
            rows_duplicate=accepted.rows_duplicate,
            notes=list(accepted.notes),
        )

    return router


def ai_read_routes() -> APIRouter:
    """Reading one AI job: an API key, or that job's public token."""
    router = APIRouter(prefix="/ai", tags=["ai"], dependencies=[auth.ReadJob])

    @router.get("/jobs/{job_id}", response_model=AiJobOut)
    def get_job(request: Request, job_id: str) -> AiJobOut:
        """Seed 003's JobStatus: `status` (pending, running, completed, failed), `progress`
        (0-100), `result` (the proposal), `error`, `startedAt`, `completedAt`."""
        return AiJobOut.model_validate(ai_status(_ai_job(_store(request), job_id)))

    return router
