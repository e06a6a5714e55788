"""Live progress for the app (seed 004's realtime view): Redis pub/sub, one message per page.

Channels: `<prefix>:request:<request id>` and `<prefix>:table:<table id>`. Each message is JSON:
`{"event": "started" | "progress" | "cells" | "finished", "request_id", "table_id", ...}` with
`progress` in percent of cells. `cells` lists the cells a page wrote (`publish_cells`, at most
`CELLS_PER_MESSAGE` a message). `finished` is sent on every ending (succeeded, partial, failed,
cancelled), whoever records it: the job itself, the run status sensors or the reconciler.
Publishing is fire-and-forget: a missing or failing Redis never slows or fails a job (the
request row stays the source of truth).

The prefix: explicit (`ProgressChannel(prefix=...)`), else `GLAZE_PROGRESS_PREFIX` (read when
a publisher opens, never at import), else one derived from the Redis database: `glaze` for
db 0, `glaze:db<N>` for db N. Pub/sub ignores the database number (a channel is server-wide),
so without this two environments sharing one Redis server on different databases would hear
each other; environments sharing one database need distinct `GLAZE_PROGRESS_PREFIX`es.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Protocol

from glaze_pipeline.core import jsontext

if TYPE_CHECKING:
    from collections.abc import Sequence

    from glaze_pipeline.core.schema import EnrichmentRequest
    from glaze_pipeline.core.store import RowPatch

log = logging.getLogger(__name__)

PREFIX_ENV = "GLAZE_PROGRESS_PREFIX"
# Share of a job's progress bar for enrichment (entities looked up); writing the rows fills
# the rest. The job publishes it, the API's job view and stream show it.
ENRICH_SHARE = 90
DEFAULT_PREFIX = "glaze"


def default_prefix(db: int) -> str:
    """`glaze` on database 0 (the channels every earlier version used), `glaze:db<N>` else."""
    return DEFAULT_PREFIX if db == 0 else f"{DEFAULT_PREFIX}:db{db}"


def resolve_prefix(redis_url: str | None, explicit: str | None = None) -> str:
    """The channel prefix: explicit, else GLAZE_PROGRESS_PREFIX, else by the URL's database."""
    chosen = explicit or os.environ.get(PREFIX_ENV, "").strip()
    if chosen:
        return chosen.rstrip(":")
    if not redis_url:
        return DEFAULT_PREFIX
    from redis.connection import parse_url  # redis only where Redis is configured

    return default_prefix(int(parse_url(redis_url).get("db") or 0))


def request_channel(prefix: str, request_id: str) -> str:
    return f"{prefix}:request:{request_id}"


def table_channel(prefix: str, table_id: str) -> str:
    return f"{prefix}:table:{table_id}"


def channels(request_id: str, table_id: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    return request_channel(prefix, request_id), table_channel(prefix, table_id)


class ProgressPublisher(Protocol):
    def publish(self, event: str, request_id: str, table_id: str, **counters: Any) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    def publish(self, event: str, request_id: str, table_id: str, **counters: Any) -> None:
        return None

    def close(self) -> None:
        return None


class RedisProgress:
    """Publishes progress events to Redis; errors are logged once and otherwise ignored."""

    def __init__(self, url: str, prefix: str | None = None) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        self.prefix = prefix or resolve_prefix(url)
        self._failed = False

    def publish(self, event: str, request_id: str, table_id: str, **counters: Any) -> None:
        # orjson (`jsontext`): a job publishes every cell it writes (with `json`, its encoding
        # was ~1.3 % of the worker's samples in S5).
        message = jsontext.dumps_bytes(
            {"event": event, "request_id": request_id, "table_id": table_id, **counters}
        )
        try:
            pipe = self._client.pipeline(transaction=False)
            for channel in channels(request_id, table_id, self.prefix):
                pipe.publish(channel, message)
            pipe.execute()
        except Exception as error:  # progress is best effort by design
            if not self._failed:
                log.warning("progress not published (%s); the request row has it", error)
            self._failed = True

    def close(self) -> None:
        self._client.close()


def publish_finished(publisher: ProgressPublisher, request: EnrichmentRequest) -> None:
    """`finished` for a request that ended, from what its row records (status, reason, counts):
    how endings recorded outside the job (sensors, reconciler) reach subscribers."""
    publisher.publish(
        "finished",
        request.id,
        request.table_id,
        status=request.status,
        error=request.error,
        rows_written=request.rows_written,
        cells={
            "done": request.cells_done,
            "not_found": request.cells_not_found,
            "failed": request.cells_failed,
            "skipped": request.cells_skipped,
        },
        cost=request.cost,
        progress=100,
    )


# Cells in one `cells` message: a page of 5000 rows is split, so a message stays small
# (a subscriber holds it whole) whatever the page size.
CELLS_PER_MESSAGE = 500


def publish_cells(
    publisher: ProgressPublisher, request_id: str, table_id: str, patches: Sequence[RowPatch]
) -> None:
    """`cells` for the patches a page wrote: each cell's value (None: nothing found), status,
    confidence and source, so a live grid can fill in without reading the rows again."""
    if isinstance(publisher, NoProgress):
        return  # nobody to tell: do not build the messages
    cells = [
        {
            "row_id": patch.id,
            "column_key": key,
            "value": patch.data.get(key),
            "status": meta.get("status"),
            "confidence": meta.get("confidence"),
            "source": meta.get("source"),
        }
        for patch in patches
        for key, meta in patch.meta.items()
    ]
    for start in range(0, len(cells), CELLS_PER_MESSAGE):
        publisher.publish(
            "cells", request_id, table_id, cells=cells[start : start + CELLS_PER_MESSAGE]
        )


def percent(done: int, total: int) -> int:
    return 100 if total <= 0 else min(100, done * 100 // total)


def job_progress(
    *, entities_done: int, entities: int, cells_answered: int, cells_total: int
) -> tuple[str, int]:
    """A running job's phase and percent (whole percent, half up, as a person rounds).

    Rows are written while the lookups go on (each page as soon as its entities are
    answered), so the percent weighs both: the lookups for ENRICH_SHARE, the cells written for
    the rest, and never 100 before the job has ended. The phase is `writing` once every lookup
    is done (only the last pages are left), `enriching` before: detection included, while
    the job does not yet know its entities."""

    def share(part: int, whole: int) -> int:
        part = max(0, min(part, whole))
        return (200 * part + whole) // (2 * whole) if whole > 0 else 0

    looked_up = share(entities_done, entities)
    written = share(cells_answered, cells_total)
    value = (looked_up * ENRICH_SHARE + written * (100 - ENRICH_SHARE)) // 100
    finished_lookups = entities > 0 and entities_done >= entities
    phase = "writing" if finished_lookups or (cells_answered and not entities) else "enriching"
    return phase, min(value, 99)


def open_progress(redis_url: str | None, prefix: str | None = None) -> ProgressPublisher:
    """A publisher on `redis_url` (none: silent) under `resolve_prefix(redis_url, prefix)`."""
    return (
        RedisProgress(redis_url, resolve_prefix(redis_url, prefix)) if redis_url else NoProgress()
    )
