"""Live progress for the app (seed 004's realtime view): Redis pub/sub, one message per page.

Channels: `glaze:request:<request id>` and `glaze:table:<table id>`. Each message is JSON:
`{"event": "started" | "progress" | "finished", "request_id", "table_id", ...counters}` with
`progress` in percent of cells. Publishing is fire-and-forget: a missing or failing Redis never
slows or fails a job (the request row stays the source of truth).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

log = logging.getLogger(__name__)


def channels(request_id: str, table_id: str) -> tuple[str, str]:
    return f"glaze:request:{request_id}", f"glaze:table:{table_id}"


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

    def __init__(self, url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        self._failed = False

    def publish(self, event: str, request_id: str, table_id: str, **counters: Any) -> None:
        message = json.dumps(
            {"event": event, "request_id": request_id, "table_id": table_id, **counters},
            default=str,
        )
        try:
            pipe = self._client.pipeline(transaction=False)
            for channel in channels(request_id, table_id):
                pipe.publish(channel, message)
            pipe.execute()
        except Exception as error:  # progress is best effort by design
            if not self._failed:
                log.warning("progress not published (%s); the request row has it", error)
            self._failed = True

    def close(self) -> None:
        self._client.close()


def percent(done: int, total: int) -> int:
    return 100 if total <= 0 else min(100, done * 100 // total)


def open_progress(redis_url: str | None) -> ProgressPublisher:
    return RedisProgress(redis_url) if redis_url else NoProgress()
