"""One job's progress, live, as Server-Sent Events (seed 004): `GET /realtime/jobs/{job_id}`.

A browser opens it with the job's `publicAccessToken` (`?token=`, as EventSource sends no
header) or a bearer; an API key or the session cookie reads it too. Events, camelCase JSON:

* `status`   `{jobId, status, state, runId}`: on connect, then on every change seen (with
  Redis the job's `started` says `running` at once; polling every `poll_s` can miss a state
  shorter than that: a job that runs 0.2 s may go from `pending` straight to `completed`);
* `progress` `{jobId, phase, progress, entitiesDone, entities, rowsWritten, rowsTotal,
  doneTasks, notFoundTasks, failedTasks, skippedTasks}`: on connect, then as it moves;
* `cells`    `{jobId, cells: [{rowId, columnKey, value, status, confidence, source}]}`: the
  cells a page wrote (with Redis only: the engine publishes them; without, reload on `finished`);
* `finished` `{jobId, status, state, progress, doneTasks, ..., cost, error}`: always the last
  event; the stream then ends. A `: heartbeat` comment goes out when nothing else did for
  `heartbeat_s`, so proxies keep the connection open.

The request row is the source of truth; Redis pub/sub (when `GLAZE_REDIS_URL` is set) only
makes the stream prompt and carries the cells. No ending can be lost:

* the channel is subscribed *before* the row is first read, so an ending recorded between the
  two is either in that read or arrives as a message;
* the engine publishes best effort, so the row is read again every `RESYNC_S` (every `poll_s`
  while the job waits to start: launches are not published) and on `started`/`finished`;
* without Redis, or when Redis fails, the row is polled every `poll_s`; a read that fails (the
  database restarting) is tried again, the client kept;
* a client that (re)connects, `Last-Event-ID` or not, first gets the state the row holds: after
  the end, `status` and `finished` at once. Event ids continue from `Last-Event-ID`, so they stay
  increasing across reconnects.

A client that goes away ends the stream: the server cancels its generator, which closes its
Redis connection (shielded from that cancellation).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import DBAPIError

from glaze_pipeline.api import auth
from glaze_pipeline.api.views import phase_and_progress, seed_status
from glaze_pipeline.core.models import TERMINAL_REQUEST_STATUSES, RequestStatus
from glaze_pipeline.core.progress import request_channel, resolve_prefix
from glaze_pipeline.core.redact import redact
from glaze_pipeline.core.requests import RequestRepository
from glaze_pipeline.core.schema import EnrichmentRequest
from glaze_pipeline.core.settings import redis_url
from glaze_pipeline.core.store import Store

log = logging.getLogger(__name__)

router = APIRouter()

# With Redis, how often the row is read again anyway once the job runs (publishing is best
# effort: a lost message must not leave a stream hanging past the job's end).
RESYNC_S = 2.0
# How long a client waits before reconnecting after a dropped connection (EventSource `retry`).
RETRY_MS = 1000
# Redis: connecting and the subscribe confirmation; beyond it the stream polls the row instead.
REDIS_CONNECT_S = 2.0
# A read of the row that failed (the database restarting) is tried again after this long.
DB_RETRY_S = 2.0

PHASES = ("queued", "enriching", "writing", "done")
COUNTERS = (
    "progress",
    "entitiesDone",
    "entities",
    "rowsWritten",
    "rowsTotal",
    "doneTasks",
    "notFoundTasks",
    "failedTasks",
    "skippedTasks",
)
# A progress message's keys (core/progress.py, defs/jobs.py) -> the event's.
MESSAGE_KEYS = {
    "progress": "progress",
    "entities_done": "entitiesDone",
    "entities": "entities",
    "rows_written": "rowsWritten",
    "rows_total": "rowsTotal",
    "cells_done": "doneTasks",
    "cells_not_found": "notFoundTasks",
    "cells_failed": "failedTasks",
    "cells_skipped": "skippedTasks",
}
CELL_KEYS = {
    "row_id": "rowId",
    "column_key": "columnKey",
    "value": "value",
    "status": "status",
    "confidence": "confidence",
    "source": "source",
}


@router.get(
    "/realtime/jobs/{job_id}",
    dependencies=[auth.ReadJob],
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The job's events."},
        401: {"description": "No valid token or key."},
        403: {"description": "A token for another job."},
        404: {"description": "No such job."},
    },
    tags=["realtime"],
)
async def job_events(
    request: Request,
    job_id: str,
    last_event_id: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> StreamingResponse:
    """Server-Sent Events of one job: `status`, `progress`, `cells`, then `finished` (last)."""
    settings: auth.ApiSettings = request.app.state.settings
    store: Store = request.app.state.store
    feed = await RedisFeed.open(redis_url(), job_id)  # subscribed before the first read
    try:
        row = await _read(store, job_id)  # an unknown job: 404 before any event
    except BaseException:
        if feed is not None:
            await feed.close()
        raise
    stream = JobStream(job_id, next_id=_resume_after(last_event_id) + 1)
    return StreamingResponse(
        _events(stream, row, store, feed, settings),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _resume_after(last_event_id: str | None) -> int:
    """The id the client saw last (0: none, or not one of ours)."""
    text = (last_event_id or "").strip()
    return int(text) if text.isdigit() and len(text) <= 15 else 0


async def _read(store: Store, job_id: str) -> EnrichmentRequest:
    return await run_in_threadpool(RequestRepository(store).get, job_id)


def _ended(row: EnrichmentRequest) -> bool:
    return RequestStatus(row.status) in TERMINAL_REQUEST_STATUSES


def _started(row: EnrichmentRequest) -> bool:
    return RequestStatus(row.status) not in (RequestStatus.QUEUED, RequestStatus.LAUNCHED)


async def _events(
    stream: JobStream,
    row: EnrichmentRequest,
    store: Store,
    feed: RedisFeed | None,
    settings: auth.ApiSettings,
) -> AsyncIterator[str]:
    """The stream: what the row says now, then changes until the job ends (or the client goes)."""
    try:
        yield f"retry: {RETRY_MS}\n\n"
        for event in stream.from_row(row):
            yield event
        last_sent = next_read = time.monotonic()
        while not stream.finished:
            if time.monotonic() >= next_read:
                try:
                    row = await _read(store, stream.job_id)
                except DBAPIError as error:  # the database is away: keep the client, try again
                    log.warning(
                        "realtime: job %s not read (%s); trying again",
                        stream.job_id,
                        redact(str(error).splitlines()[0]),
                    )
                    next_read = time.monotonic() + max(settings.poll_s, DB_RETRY_S)
                else:
                    for event in stream.from_row(row):
                        yield event
                        last_sent = time.monotonic()
                    if stream.finished:
                        break
                    every = RESYNC_S if feed is not None and stream.started else settings.poll_s
                    next_read = time.monotonic() + every
            if time.monotonic() - last_sent >= settings.heartbeat_s:
                yield ": heartbeat\n\n"
                last_sent = time.monotonic()
            wait = max(0.0, min(next_read, last_sent + settings.heartbeat_s) - time.monotonic())
            if feed is None:
                await anyio.sleep(wait)
                continue
            try:
                message = await feed.next(wait)
            except Exception as error:  # Redis went away: the row alone from here on
                log.warning("realtime: Redis failed (%s); polling job %s", error, stream.job_id)
                await feed.close()
                feed, next_read = None, time.monotonic()
                continue
            if message is None:
                continue
            events, read_now = stream.from_message(message)
            for event in events:
                yield event
                last_sent = time.monotonic()
            if read_now:
                next_read = time.monotonic()
    finally:
        if feed is not None:
            with anyio.CancelScope(shield=True):  # closing must outlive the client's cancel
                await feed.close()


@dataclass
class JobStream:
    """What one client has been told about one job, and the events that bring it up to date.

    Progress only moves forward: the row (read now and then) and the messages (as they come)
    are two views of the same counters, so each is merged in by taking the larger value."""

    job_id: str
    next_id: int = 1
    status: dict[str, Any] | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    sent_progress: dict[str, Any] | None = None
    started: bool = False
    finished: bool = False

    def event(self, name: str, data: Mapping[str, Any]) -> str:
        body = json.dumps({"jobId": self.job_id, **data}, default=str, separators=(",", ":"))
        event = f"id: {self.next_id}\nevent: {name}\ndata: {body}\n\n"
        self.next_id += 1
        return event

    def from_row(self, row: EnrichmentRequest) -> list[str]:
        """Events for what the row says: a new state, progress made, the ending."""
        events: list[str] = []
        self.started = self.started or _started(row)
        status = {"status": seed_status(row.status), "state": row.status, "runId": row.run_id}
        # A new state is news; a run id attached to the same state is not (it rides along
        # with the next state: `running` has it).
        if self.status is None or status["state"] != self.status.get("state"):
            self.status = status
            events.append(self.event("status", status))
        phase, percent = phase_and_progress(row)
        self._merge(
            phase,
            {
                "progress": percent,
                "entitiesDone": min(row.entities_done, row.entities),
                "entities": row.entities,
                "rowsWritten": row.rows_written,
                "rowsTotal": row.rows_total,
                "doneTasks": row.cells_done,
                "notFoundTasks": row.cells_not_found,
                "failedTasks": row.cells_failed,
                "skippedTasks": row.cells_skipped,
            },
        )
        if _ended(row):
            self.progress.update(phase="done", progress=100)
        events.extend(self._progress_event())
        if _ended(row):  # its figures are the row's, exactly (not merged)
            self.finished = True
            events.append(
                self.event(
                    "finished",
                    {
                        **status,
                        "progress": 100,
                        "doneTasks": row.cells_done,
                        "notFoundTasks": row.cells_not_found,
                        "failedTasks": row.cells_failed,
                        "skippedTasks": row.cells_skipped,
                        "cost": row.cost,
                        "error": row.error,
                    },
                )
            )
        return events

    def from_message(self, message: Mapping[str, Any]) -> tuple[list[str], bool]:
        """Events for one pub/sub message, and whether the row should be read now (a start or
        an ending: the row has the figures, and says which ending, exactly)."""
        kind = message.get("event")
        if kind == "cells":
            cells = [
                {CELL_KEYS[k]: v for k, v in cell.items() if k in CELL_KEYS}
                for cell in message.get("cells") or []
                if isinstance(cell, dict)
            ]
            return ([self.event("cells", {"cells": cells})] if cells else []), False
        if kind == "progress":
            counters = {
                MESSAGE_KEYS[k]: v
                for k, v in message.items()
                if k in MESSAGE_KEYS and isinstance(v, int)
            }
            self._merge(str(message.get("phase") or "queued"), counters)
            return self._now_running() + self._progress_event(), False
        if kind == "started":  # said by the running job: at once, however short it runs
            return self._now_running(), True
        return [], kind == "finished"

    def _now_running(self) -> list[str]:
        """`status` running, unless the client knows it already (or knows the ending)."""
        state = (self.status or {}).get("state")
        if state not in (RequestStatus.QUEUED.value, RequestStatus.LAUNCHED.value):
            return []
        self.started = True
        running = RequestStatus.RUNNING.value
        run_id = (self.status or {}).get("runId")
        self.status = {"status": seed_status(running), "state": running, "runId": run_id}
        return [self.event("status", self.status)]

    def _merge(self, phase: str, counters: Mapping[str, int]) -> None:
        before = self.progress.get("phase", "queued")
        rank = PHASES.index(phase) if phase in PHASES else 0
        self.progress["phase"] = PHASES[max(rank, PHASES.index(before))]
        for key in COUNTERS:
            if key in counters:
                self.progress[key] = max(counters[key], self.progress.get(key, 0))

    def _progress_event(self) -> list[str]:
        current = {"phase": "queued", **dict.fromkeys(COUNTERS, 0), **self.progress}
        if current == self.sent_progress:
            return []
        self.sent_progress = current
        return [self.event("progress", current)]


class RedisFeed:
    """One job's channel on Redis (asyncio), subscribed and confirmed before it is used."""

    def __init__(self, client: Any, pubsub: Any) -> None:
        self._client = client
        self._pubsub = pubsub

    @classmethod
    async def open(cls, url: str | None, job_id: str) -> RedisFeed | None:
        """Subscribed to the job's channel, or None (no Redis configured, or it cannot be
        reached: the stream polls the row instead, as progress is best effort)."""
        if not url:
            return None
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url, socket_connect_timeout=REDIS_CONNECT_S)
        pubsub = client.pubsub()
        feed = cls(client, pubsub)
        try:
            with anyio.fail_after(REDIS_CONNECT_S):
                await pubsub.subscribe(request_channel(resolve_prefix(url), job_id))
                while True:  # the confirmation: from here on, nothing published is missed
                    reply = await pubsub.get_message(timeout=REDIS_CONNECT_S)
                    if reply is not None and reply.get("type") == "subscribe":
                        return feed
        except Exception as error:
            log.warning("realtime: Redis unavailable (%s); polling job %s instead", error, job_id)
            await feed.close()
            return None

    async def next(self, timeout: float) -> dict[str, Any] | None:
        """The next message within `timeout` seconds (None: none came, or it was not JSON)."""
        message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
        if message is None or message.get("type") != "message":
            return None
        try:
            body = json.loads(message["data"])
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    async def close(self) -> None:
        try:
            await self._pubsub.aclose()
            await self._client.aclose()
        except Exception as error:  # closing a connection that already failed
            log.debug("realtime: closing Redis: %s", error)
