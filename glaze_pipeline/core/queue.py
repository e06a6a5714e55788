"""Launching queued requests: claim, validate, build the run's config and tags; reconcile.

This module is the launch contract every path shares (the queue sensor, the pre-enrich
schedule, the launcher, the GraphQL client, the CLI): `job_run` builds a run's job name and
run config, `tags_for` / `run_tags` its tags. Nothing else spells them out.

Life of a request: `queued` -> `launched` (claimed, run requested) -> `running` (the run's first
step adopted it) -> `succeeded` | `partial` | `failed` | `cancelled`. Every status write goes
through `RequestRepository` (core/requests.py); this module decides *what* to write. A claim is
one UPDATE over `FOR UPDATE SKIP LOCKED` rows on Postgres (a single writer does the same on
SQLite), so two sensors, daemons or listeners claiming at once never launch a request twice,
and a request that cannot run fails alone, at claim, with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from glaze_pipeline.core.ai.workflow import AI_JOBS, ai_kind, check_task
from glaze_pipeline.core.engine import JobSettings, JobTarget, resolve_target
from glaze_pipeline.core.errors import GlazeError, InvalidSelectionError
from glaze_pipeline.core.models import (
    AI_REQUEST_KINDS,
    RequestKind,
    RequestStatus,
    RowStatus,
    Selection,
)
from glaze_pipeline.core.progress import ProgressPublisher, publish_finished
from glaze_pipeline.core.requests import (
    PRIORITY_DEFAULT,
    PRIORITY_PRE_ENRICH,
    ActiveRequest,
    ClaimedRequest,
    RequestRepository,
)
from glaze_pipeline.core.settings import multiprocess_rows, redis_url
from glaze_pipeline.core.store import Store

__all__ = [
    "ENRICH_JOB",
    "ENRICH_OP",
    "ENRICH_TABLE_TAG",
    "IN_PROCESS",
    "KIND_TAG",
    "MULTIPROCESS",
    "PRIORITY_DEFAULT",
    "PRIORITY_PRE_ENRICH",
    "PRIORITY_TAG",
    "REQUEST_TAG",
    "TABLE_TAG",
    "ActiveRequest",
    "ClaimedRequest",
    "Launchable",
    "RunView",
    "claim_launchable",
    "close_for_run",
    "enqueue",
    "executor_for",
    "job_run",
    "launch_config",
    "reconcile",
    "request_cancel",
    "run_tags",
    "settle_ended",
    "shares_purchases",
    "tags_for",
]


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
    """Queue a request as the app would (see RequestRepository.enqueue)."""
    return RequestRepository(store).enqueue(
        table_id,
        selection,
        kind=kind,
        budget=budget,
        priority=priority,
        idempotency_key=idempotency_key,
    )


def request_cancel(
    store: Store, request_id: str, publisher: ProgressPublisher | None = None
) -> RequestStatus:
    """Ask for a cancel (see RequestRepository.request_cancel); returns the status now.

    A queued request ends at once, lets go of the rows it held `queued` and, with a
    `publisher`, is announced `finished`."""
    requests = RequestRepository(store)
    before = RequestStatus(requests.get(request_id).status)
    status = requests.request_cancel(request_id)
    if status is RequestStatus.CANCELLED and before is not RequestStatus.CANCELLED:
        settle_ended(store, request_id, publisher)
    return status


def settle_ended(store: Store, request_id: str, publisher: ProgressPublisher | None = None) -> int:
    """After a request ended: put the rows it still holds back to what their cells say, then,
    with a `publisher`, tell its subscribers (`finished`, with the status as stored). Rows
    first, so an app that reloads on `finished` sees them final. Returns rows let go of."""
    released = store.release_rows(request_id)
    if publisher is not None:
        publish_finished(publisher, store.get_request(request_id))
    return released


def close_for_run(
    store: Store,
    request_id: str,
    status: RequestStatus,
    reason: str,
    publisher: ProgressPublisher | None = None,
) -> bool:
    """End an open request `failed` or `cancelled` because its run did (the run status sensors).

    Its rows are let go of whoever closed it; `finished` is published only when this call
    closed it (an ending the job recorded itself was announced by the job)."""
    requests = RequestRepository(store)
    if status is RequestStatus.CANCELLED:
        closed = requests.cancel(request_id, reason)
    elif status is RequestStatus.FAILED:
        closed = requests.fail(request_id, reason)
    else:
        raise ValueError(f"a run ends its request failed or cancelled, not {status}")
    settle_ended(store, request_id, publisher if closed else None)
    return closed


ENRICH_JOB = "enrich_table"
ENRICH_OP = "detect_entities"  # the op of enrich_table that takes the run config


def job_run(kind: RequestKind | str, config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(job name, full run config) of a request's run, from its first op's config: an AI kind
    runs its own job (core/ai/workflow.AI_JOBS), everything else `enrich_table`.

    The one place a run config is shaped, so a run launched by the sensor, the schedule, the
    launcher, GraphQL or the CLI is the same run."""
    job_name, op_name = (
        AI_JOBS[ai_kind(kind)] if kind in AI_REQUEST_KINDS else (ENRICH_JOB, ENRICH_OP)
    )
    return job_name, {"ops": {op_name: {"config": dict(config)}}}


IN_PROCESS = "in_process"
MULTIPROCESS = "multiprocess"


@dataclass(frozen=True)
class Launchable:
    """A claimed, valid request: its first op's config, its run's tags, which job runs it, and
    where its steps should run (`executor`: see `executor_for`)."""

    request: ClaimedRequest
    config: dict[str, Any]
    tags: dict[str, str]
    executor: str = IN_PROCESS

    @property
    def job_name(self) -> str:
        return job_run(self.request.kind, self.config)[0]

    @property
    def run_config(self) -> dict[str, Any]:
        return job_run(self.request.kind, self.config)[1]


def claim_launchable(
    store: Store, *, limit: int, publisher: ProgressPublisher | None = None
) -> tuple[list[Launchable], list[tuple[str, str]]]:
    """Claim up to `limit` requests; the invalid ones end `failed` here, each with its reason.

    Returns (what to launch, [(request id, reason)] of what was rejected). A malformed request
    never stops the rest of its batch; with a `publisher`, its subscribers hear it `finished`.

    A valid `enrich` request holds its rows `queued` here (seed 001: queued once claimed),
    one set-based statement per request: the rows it names, or, for a whole-table selection,
    the table's rows with a cell to fill (rows with nothing to fill are never held); requests
    `enqueue` already held cost an index probe per row and no write. Invalid requests let go
    of whatever `enqueue` held. Where processes would share their purchases
    (`shares_purchases`), a held `enrich` over the whole table, or naming `multiprocess_rows()`
    rows or more, is counted (one more statement) to choose where its steps run
    (`executor_for`).
    """
    # Read before anything is claimed: a bad setting is the server's mistake, not a request's,
    # so it raises here (naming the variable) and every request stays queued.
    threshold = multiprocess_rows()
    if not shares_purchases(store):
        threshold = None
    requests = RequestRepository(store)
    launchable: list[Launchable] = []
    rejected: list[tuple[str, str]] = []
    for request in requests.claim(limit=limit):
        try:
            config, target = _launch(store, request)
        except Exception as error:  # whatever is wrong with one request fails it alone
            reason = str(error) if isinstance(error, GlazeError) else f"invalid request: {error!r}"
            if requests.reject(request.id, reason):
                settle_ended(store, request.id, publisher)
            rejected.append((request.id, reason))
            continue
        executor = IN_PROCESS
        if target is not None and config["kind"] == RequestKind.ENRICH.value:
            hold_queued(store, request.id, target)
            executor = executor_for(store, request.id, threshold, target)
        launchable.append(Launchable(request, config, run_tags(request), executor))
    return launchable, rejected


def executor_for(
    store: Store, request_id: str, threshold: int | None, target: JobTarget | None = None
) -> str:
    """Where a claimed `enrich` request's steps should run when its launch path can choose
    (the queue sensor, the GraphQL launcher): `multiprocess`, one process per core, when it
    holds `threshold` rows or more (`settings.multiprocess_rows()`: 50,000 unless
    GLAZE_MULTIPROCESS_ROWS says otherwise; one count over the held rows' index), else in
    process. In one process a job that large is bound by the worker's CPU, not by the
    vendors; a smaller one loses more to the processes' start than the other core gives back
    (S3 on two cores: 30,000 rows 34 s in one process, 41 s on two; 60,000 rows 68 s, 63 s).
    A `target` naming fewer rows than that is answered without the count; no `threshold`
    (`claim_launchable` passes none where the processes could not share their purchases:
    `shares_purchases`) is in process."""
    if threshold is None:
        return IN_PROCESS
    if target is not None and target.row_ids is not None and len(target.row_ids) < threshold:
        return IN_PROCESS
    if store.held_rows(request_id) < threshold:
        return IN_PROCESS
    return MULTIPROCESS


def shares_purchases(store: Store) -> bool:
    """Whether steps in processes of their own buy each entity once, cheaply, with this store
    and GLAZE_REDIS_URL: through Redis, or Postgres's advisory locks. On the SQLite default
    without Redis they meet in file locks beside the database, each purchase written through
    to SQLite under its lock, behind the rows' writes for its one writer: a 60,000-row table
    (6,000 companies, 60,000 people) took 65-78 s on two processes against 59-73 s in one. So
    the queue keeps such a request in one process, whatever its size."""
    return bool(redis_url()) or store.dialect == "postgresql"


def hold_queued(store: Store, request_id: str, target: JobTarget) -> int:
    """Hold the rows a claimed request will fill `queued` (one statement)."""
    return store.hold_rows(
        target.table_id,
        request_id,
        RowStatus.QUEUED,
        row_ids=target.page_row_ids(),
        empty_keys=[c.key for c in target.columns] if target.only_empty else None,
    )


def launch_config(store: Store, request: ClaimedRequest) -> dict[str, Any]:
    """The first op's config for a claimed request; raises GlazeError when it is invalid."""
    return _launch(store, request)[0]


def _launch(store: Store, request: ClaimedRequest) -> tuple[dict[str, Any], JobTarget | None]:
    try:
        kind = RequestKind(request.kind)
    except ValueError:
        kinds = ", ".join(k.value for k in RequestKind)
        raise InvalidSelectionError(f"unknown kind {request.kind!r}: use one of {kinds}") from None
    if kind in AI_REQUEST_KINDS:
        if request.budget is not None:
            raise InvalidSelectionError(f"{kind.value} takes no budget")
        task = check_task(store, kind, request.table_id, request.selection)
        return task.op_config(request.id), None
    try:
        selection = Selection.model_validate(request.selection)
    except ValidationError as error:
        problems = "; ".join(e["msg"] for e in error.errors())
        raise InvalidSelectionError(f"invalid selection: {problems}") from None
    JobSettings(budget=request.budget)  # validates the budget
    target = resolve_target(store, request.table_id, selection)  # table, columns, fields
    config = {
        "table_id": request.table_id,
        **selection.model_dump(mode="json", exclude_defaults=True),
        "budget": request.budget,
        "kind": kind.value,
        "request_id": request.id,
    }
    return config, target


# A run's tags: how the reconciler and the run-status sensors find a request's run, and what
# the run coordinator limits.
TABLE_TAG = "glaze/table"
REQUEST_TAG = "glaze/request"
KIND_TAG = "glaze/kind"
# Concurrency key: at most one enrich run per table (a tag limit in dagster.yaml). Estimate and
# pre-enrich runs write no cells and do not carry it.
ENRICH_TABLE_TAG = "glaze/enrich-table"
PRIORITY_TAG = "dagster/priority"  # QueuedRunCoordinator order; higher first, default 0


def tags_for(
    kind: RequestKind | str, table_id: str | None = None, request_id: str | None = None
) -> dict[str, str]:
    """The Glaze tags of a run of `kind`, so every launch path looks the same in Dagster.

    A run launched before its request exists (the pre-enrich schedule, a bare GraphQL launch)
    has no `request_id`: the job records its request and tags the run when it starts.
    """
    tags = {KIND_TAG: str(kind)}
    if table_id:
        tags[TABLE_TAG] = str(table_id)
        if kind == RequestKind.ENRICH:
            tags[ENRICH_TABLE_TAG] = str(table_id)
    if request_id:
        tags[REQUEST_TAG] = str(request_id)
    return tags


def run_tags(request: ClaimedRequest) -> dict[str, str]:
    """The tags of a claimed request's run."""
    return tags_for(request.kind, request.table_id, request.id)


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
    publisher: ProgressPublisher | None = None,
) -> list[str]:
    """Bring every open request in line with reality; returns what it did, one line each.

    * a cancel flag: queued -> cancelled; with a live run -> the run is terminated (the job
      itself stops within a second or two, on its own watch); with no live run -> cancelled;
    * a run that ended without closing its request -> failed (or cancelled), with the reason;
    * a running request whose heartbeat stopped (its worker beats every second or so in every
      phase, so silence means it is gone) -> failed, and its run reported failed to Dagster; a
      worker that was only slow sees the request failed at its next beat and stops;
    * a request claimed but never given a run (the tick died after the claim) -> queued again;
      the sensor's run_key keeps it from ever running twice;
    * rows still held by a request that ended (an ending that died before letting go of them)
      are let go of.

    Every write is a guarded transition: whatever raced with it (the job closing its own
    request) wins or loses cleanly, and a closed request is never reopened. Every request this
    closes lets go of its rows and, with a `publisher`, is announced `finished`.
    """
    requests = RequestRepository(store)
    actions: list[str] = []

    def ended(request_id: str) -> None:
        settle_ended(store, request_id, publisher)

    for request in requests.active():
        run = find_run(request)
        live = run is not None and run.status in ACTIVE_RUN_STATUSES
        if request.cancel_requested:
            if live and run is not None:
                cancel_run(run.run_id)
                actions.append(f"{request.id}: terminating run {run.run_id} (cancel requested)")
            elif requests.cancel(request.id, "cancelled by the user"):
                ended(request.id)
                actions.append(f"{request.id}: cancelled")
        elif run is None:
            if request.status == RequestStatus.LAUNCHED.value and is_stale(
                request.launched_at, now, relaunch_after
            ):
                if requests.requeue(request.id, "no run was created for the claim"):
                    actions.append(f"{request.id}: no run was created; queued again")
            elif request.status == RequestStatus.RUNNING.value and is_stale(  # noqa: SIM102 (the branches must not fall through to the next)
                request.updated_at, now, stale_after
            ):
                if requests.fail(request.id, "its run is gone and it stopped reporting"):
                    ended(request.id)
                    actions.append(f"{request.id}: failed (run gone)")
        elif not live:
            reason = f"run {run.run_id} ended {run.status} before closing the request"
            if run.status == "CANCELED":
                closed = requests.cancel(request.id, f"run {run.run_id} was cancelled")
            else:
                closed = requests.fail(request.id, reason)
            if closed:
                ended(request.id)
                actions.append(f"{request.id}: {reason}")
        elif request.status == RequestStatus.RUNNING.value and is_stale(
            request.updated_at, now, stale_after
        ):
            reason = (
                f"no heartbeat from run {run.run_id} for over {int(stale_after.total_seconds())}s:"
                " its worker died"
            )
            if requests.fail(request.id, reason):
                report_dead_run(run.run_id, reason)
                ended(request.id)
                actions.append(f"{request.id}: {reason}")
    for request_id in store.held_by_ended_requests():
        released = store.release_rows(request_id)
        if released:
            actions.append(f"{request_id}: let go of {released} rows it held after it ended")
    return actions
