"""The request queue: the app inserts rows into `enrichment_requests`; we claim, launch, close.

Life of a request: `queued` -> `launched` (claimed, run requested) -> `running` (the run's first
step adopted it) -> `succeeded` | `partial` | `failed` | `cancelled`. A claim is one UPDATE over
`FOR UPDATE SKIP LOCKED` rows on Postgres (a single writer does the same on SQLite), so two
sensors, daemons or listeners claiming at once never launch a request twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import and_, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from glaze_pipeline.core.engine import JobSettings, resolve_target
from glaze_pipeline.core.models import RequestKind, RequestStatus, Selection
from glaze_pipeline.core.schema import EnrichmentRequest
from glaze_pipeline.core.store import (
    REQUEST_DEFAULTS,
    InvalidSelectionError,
    Store,
    new_id,
    utcnow,
)

# Priority: higher first. Pre-enrichment runs below anything a user asked for.
PRIORITY_DEFAULT = 0
PRIORITY_PRE_ENRICH = -10
ACTIVE = (RequestStatus.LAUNCHED.value, RequestStatus.RUNNING.value)


@dataclass(frozen=True)
class ClaimedRequest:
    id: str
    table_id: str
    kind: str
    selection: dict[str, Any]
    budget: float | None
    priority: int


def enqueue(
    store: Store,
    table_id: str,
    selection: Selection | Mapping[str, Any],
    *,
    kind: RequestKind | str = RequestKind.ENRICH,
    budget: float | None = None,
    priority: int = PRIORITY_DEFAULT,
    idempotency_key: str | None = None,
) -> str:
    """Queue a request as the app would; the same idempotency key yields the same request."""
    if isinstance(selection, Selection):
        selection = selection.model_dump(mode="json")
    values = {
        "id": new_id("req"),
        "table_id": table_id,
        "kind": RequestKind(kind).value,
        "selection": dict(selection),
        "budget": budget,
        "priority": priority,
        "idempotency_key": idempotency_key,
        "status": RequestStatus.QUEUED.value,
        "created_at": utcnow(),
        "updated_at": utcnow(),
    }
    values = {**REQUEST_DEFAULTS, **values}
    insert = pg_insert if store.dialect == "postgresql" else sqlite_insert
    statement = insert(EnrichmentRequest).values(values)
    if idempotency_key is not None:
        statement = statement.on_conflict_do_nothing(index_elements=["table_id", "idempotency_key"])
    with store.engine.begin() as connection:
        connection.execute(statement)
        if idempotency_key is None:
            return str(values["id"])
        return str(
            connection.scalar(
                select(EnrichmentRequest.id).where(
                    EnrichmentRequest.table_id == table_id,
                    EnrichmentRequest.idempotency_key == idempotency_key,
                )
            )
        )


_CLAIM_SQL = """
    UPDATE enrichment_requests SET status = 'launched', launched_at = :now, updated_at = :now
    WHERE id IN (
        SELECT id FROM enrichment_requests
        WHERE status = 'queued' AND NOT cancel_requested
        ORDER BY priority DESC, created_at, id
        LIMIT :limit {lock}
    ) AND status = 'queued'
    RETURNING id, table_id, kind, selection, budget, priority
"""


def claim(store: Store, *, limit: int = 10) -> list[ClaimedRequest]:
    """Atomically move up to `limit` queued requests to `launched`, highest priority first."""
    lock = "FOR UPDATE SKIP LOCKED" if store.dialect == "postgresql" else ""
    with store.engine.begin() as connection:
        rows = connection.execute(
            text(_CLAIM_SQL.format(lock=lock)), {"now": utcnow(), "limit": limit}
        ).all()
    claimed = [
        ClaimedRequest(
            id=row.id,
            table_id=row.table_id,
            kind=row.kind,
            selection=_json(row.selection),
            budget=row.budget,
            priority=row.priority,
        )
        for row in rows
    ]
    return sorted(claimed, key=lambda r: (-r.priority, r.id))


def _json(value: Any) -> dict[str, Any]:
    if isinstance(value, str):  # SQLite hands raw JSON text back through text()
        return dict(json.loads(value))
    return dict(value or {})


def launch_config(store: Store, request: ClaimedRequest) -> dict[str, Any]:
    """The enrich_table op config for a claimed request; raises GlazeError when it is invalid."""
    try:
        kind = RequestKind(request.kind)
    except ValueError:
        raise InvalidSelectionError(
            f"unknown kind {request.kind!r}: use enrich, estimate or pre_enrich"
        ) from None
    try:
        selection = Selection.model_validate(request.selection)
    except ValidationError as error:
        problems = "; ".join(e["msg"] for e in error.errors())
        raise InvalidSelectionError(f"invalid selection: {problems}") from None
    JobSettings(budget=request.budget)  # validates the budget
    resolve_target(store, request.table_id, selection)  # unknown table / columns / no field
    return {
        "table_id": request.table_id,
        **selection.model_dump(mode="json", exclude_defaults=True),
        "budget": request.budget,
        "kind": kind.value,
        "request_id": request.id,
    }


def run_tags(request: ClaimedRequest) -> dict[str, str]:
    tags = {
        "glaze/table": request.table_id,
        "glaze/request": request.id,
        "glaze/kind": request.kind,
    }
    if request.kind == RequestKind.ENRICH:
        # Concurrency key: at most one enrich run per table (a tag limit in dagster.yaml).
        tags["glaze/enrich-table"] = request.table_id
    return tags


def reject(store: Store, request_id: str, reason: str) -> None:
    """End a claimed request `failed` without launching anything."""
    store.update_request(
        request_id, status=RequestStatus.FAILED.value, error=reason, finished_at=utcnow()
    )


def request_cancel(store: Store, request_id: str) -> str:
    """Set the cancel flag (what the app does); a queued request is cancelled at once."""
    with store.engine.begin() as connection:
        connection.execute(
            update(EnrichmentRequest)
            .where(EnrichmentRequest.id == request_id)
            .values(cancel_requested=True, updated_at=utcnow())
        )
        connection.execute(
            update(EnrichmentRequest)
            .where(
                EnrichmentRequest.id == request_id,
                EnrichmentRequest.status == RequestStatus.QUEUED.value,
            )
            .values(
                status=RequestStatus.CANCELLED.value,
                error="cancelled before launch",
                finished_at=utcnow(),
            )
        )
    return str(store.get_request(request_id).status)


def mark_cancelled(store: Store, request_id: str, reason: str = "cancelled") -> bool:
    """Close a request `cancelled` unless it already ended; True when this call closed it."""
    return _close_if_open(store, request_id, RequestStatus.CANCELLED, reason)


def mark_failed(store: Store, request_id: str, reason: str) -> bool:
    return _close_if_open(store, request_id, RequestStatus.FAILED, reason)


def _close_if_open(store: Store, request_id: str, status: RequestStatus, reason: str) -> bool:
    with store.engine.begin() as connection:
        result = connection.execute(
            update(EnrichmentRequest)
            .where(
                EnrichmentRequest.id == request_id,
                EnrichmentRequest.status.in_([RequestStatus.QUEUED.value, *ACTIVE]),
            )
            .values(
                status=status.value, error=reason[:2000], finished_at=utcnow(), updated_at=utcnow()
            )
        )
    return bool(result.rowcount)


@dataclass(frozen=True)
class ActiveRequest:
    id: str
    status: str
    run_id: str | None
    cancel_requested: bool
    launched_at: datetime | None
    updated_at: datetime | None


def active_requests(store: Store) -> list[ActiveRequest]:
    """Launched or running requests, and queued ones with a cancel flag: what reconciling checks."""
    with store.engine.connect() as connection:
        rows = connection.execute(
            select(
                EnrichmentRequest.id,
                EnrichmentRequest.status,
                EnrichmentRequest.run_id,
                EnrichmentRequest.cancel_requested,
                EnrichmentRequest.launched_at,
                EnrichmentRequest.updated_at,
            ).where(
                or_(
                    EnrichmentRequest.status.in_(ACTIVE),
                    and_(
                        EnrichmentRequest.status == RequestStatus.QUEUED.value,
                        EnrichmentRequest.cancel_requested,
                    ),
                )
            )
        ).all()
    return [ActiveRequest(*row) for row in rows]


def is_stale(moment: datetime | None, now: datetime, after: timedelta) -> bool:
    if moment is None:
        return True
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=now.tzinfo)
    return now - moment > after


@dataclass(frozen=True)
class RunView:
    """What reconciling needs to know of a request's Dagster run."""

    run_id: str
    status: str  # a DagsterRunStatus name: QUEUED, STARTING, STARTED, SUCCESS, FAILURE, ...


ACTIVE_RUN_STATUSES = frozenset({"NOT_STARTED", "QUEUED", "STARTING", "STARTED", "CANCELING"})


def reconcile(
    store: Store,
    *,
    find_run: Callable[[ActiveRequest], RunView | None],
    cancel_run: Callable[[str], None],
    report_dead_run: Callable[[str, str], None],
    now: datetime,
    stale_after: timedelta,
    relaunch_after: timedelta = timedelta(seconds=60),
) -> list[str]:
    """Bring every open request in line with reality; returns what it did, one line each.

    * a cancel flag: queued -> cancelled; with a live run -> the run is terminated (the job
      also stops by itself at its next heartbeat); with no live run -> cancelled;
    * a run that ended without closing its request -> failed (or cancelled), with the reason;
    * a running request whose heartbeat stopped (worker killed) -> failed, and its run is
      reported failed to Dagster;
    * a request claimed but never given a run (the tick died after the claim) -> queued again;
      the sensor's run_key keeps it from ever running twice.
    """
    actions: list[str] = []
    for request in active_requests(store):
        run = find_run(request)
        live = run is not None and run.status in ACTIVE_RUN_STATUSES
        if request.cancel_requested:
            if live and run is not None:
                cancel_run(run.run_id)
                actions.append(f"{request.id}: terminating run {run.run_id} (cancel requested)")
            elif mark_cancelled(store, request.id, "cancelled by the user"):
                actions.append(f"{request.id}: cancelled")
        elif run is None:
            if request.status == RequestStatus.LAUNCHED.value and is_stale(
                request.launched_at, now, relaunch_after
            ):
                with store.engine.begin() as connection:
                    connection.execute(
                        update(EnrichmentRequest)
                        .where(
                            EnrichmentRequest.id == request.id,
                            EnrichmentRequest.status == RequestStatus.LAUNCHED.value,
                        )
                        .values(status=RequestStatus.QUEUED.value, updated_at=now)
                    )
                actions.append(f"{request.id}: no run was created; queued again")
            elif request.status == RequestStatus.RUNNING.value and is_stale(
                request.updated_at, now, stale_after
            ):
                mark_failed(store, request.id, "its run is gone and it stopped reporting")
                actions.append(f"{request.id}: failed (run gone)")
        elif not live:
            reason = f"run {run.run_id} ended {run.status} before closing the request"
            if run.status == "CANCELED":
                closed = mark_cancelled(store, request.id, f"run {run.run_id} was cancelled")
            else:
                closed = mark_failed(store, request.id, reason)
            if closed:
                actions.append(f"{request.id}: {reason}")
        elif request.status == RequestStatus.RUNNING.value and is_stale(
            request.updated_at, now, stale_after
        ):
            reason = (
                f"no heartbeat from run {run.run_id} for over {int(stale_after.total_seconds())}s:"
                " its worker died"
            )
            if mark_failed(store, request.id, reason):
                report_dead_run(run.run_id, reason)
                actions.append(f"{request.id}: {reason}")
    return actions
