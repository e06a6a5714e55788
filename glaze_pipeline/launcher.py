"""The push launcher: launch a queued request the moment it lands, not at the next sensor tick.

Dagster's sensor daemon evaluates sensors every ~5 s whatever their interval, so a request
waits 4-7 s for the queue sensor. The launcher listens instead: on Postgres, a trigger NOTIFYs
`glaze_requests` on every queued request (migration 0002) and the launcher claims it and submits
the run through Dagster's GraphQL API at once; on SQLite it polls every `poll_s`. It claims with
the same atomic claim as the sensor, so the two never launch a request twice, and the sensor
stays as the durable catch-all: if the launcher is down, requests still run, only later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import make_url

from glaze_pipeline.core import queue
from glaze_pipeline.core.models import RequestStatus
from glaze_pipeline.core.store import GlazeError, Store

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "glaze_requests"

# (request, op config, tags) -> Dagster run id
LaunchFunction = Callable[[queue.ClaimedRequest, dict[str, Any], dict[str, str]], str]


class Launcher:
    """Claims queued requests and launches a run for each through `launch`."""

    def __init__(self, store: Store, launch: LaunchFunction, *, batch: int = 25) -> None:
        self.store = store
        self.launch = launch
        self.batch = batch
        self.launched = 0

    def launch_pending(self) -> int:
        """Claim and launch what is queued now; returns how many runs were launched."""
        launched = 0
        while claimed := queue.claim(self.store, limit=self.batch):
            for request in claimed:
                try:
                    config = queue.launch_config(self.store, request)
                except GlazeError as error:
                    queue.reject(self.store, request.id, str(error))
                    continue
                try:
                    run_id = self.launch(request, config, queue.run_tags(request))
                except Exception as error:
                    # Give it back to the queue: the sensor (or the next wake-up) launches it.
                    log.warning("launching %s failed, re-queued: %s", request.id, error)
                    self.store.update_request(request.id, status=RequestStatus.QUEUED.value)
                    return launched
                self.store.update_request(request.id, run_id=run_id)
                launched += 1
        self.launched += launched
        return launched

    def serve(self, stop: threading.Event, *, poll_s: float = 0.5) -> None:
        """Launch until `stop` is set: woken by NOTIFY on Postgres, by a timer elsewhere."""
        self.launch_pending()
        if self.store.dialect != "postgresql":
            while not stop.wait(poll_s):
                self.launch_pending()
            return
        import psycopg

        conninfo = make_url(self.store.url).set(drivername="postgresql")
        with psycopg.connect(
            conninfo.render_as_string(hide_password=False), autocommit=True
        ) as connection:
            connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self.launch_pending()  # whatever landed before LISTEN took effect
            while not stop.is_set():
                # Wait for one NOTIFY or the poll timeout (a catch-up tick), then claim all.
                for _ in connection.notifies(timeout=poll_s, stop_after=1):
                    pass
                self.launch_pending()


def graphql_launch(graphql_url: str) -> tuple[LaunchFunction, Callable[[], None]]:
    """A LaunchFunction submitting through Dagster's GraphQL API, and its close function."""
    from glaze_pipeline.graphql_client import DagsterGraphQLClient

    client = DagsterGraphQLClient(graphql_url)

    def launch(request: queue.ClaimedRequest, config: dict[str, Any], tags: dict[str, str]) -> str:
        return client.launch_enrich(config, tags=tags)

    return launch, client.close


def run_launcher(store: Store, graphql_url: str, stop: threading.Event, poll_s: float) -> int:
    launch, close = graphql_launch(graphql_url)
    launcher = Launcher(store, launch)
    started = time.monotonic()
    try:
        launcher.serve(stop, poll_s=poll_s)
    finally:
        close()
    log.info("launched %d runs in %.0fs", launcher.launched, time.monotonic() - started)
    return launcher.launched
