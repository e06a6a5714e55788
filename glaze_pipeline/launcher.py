"""The push launcher: launch a queued request the moment it lands, not at the next sensor tick.

Dagster's sensor daemon evaluates sensors every ~5 s whatever their interval, so a request
waits 4-7 s for the queue sensor. The launcher listens instead: on Postgres, a trigger NOTIFYs
`glaze_requests` on every queued request (migration 0002) and the launcher claims it at once;
on SQLite it polls every `poll_s`. It claims with the same atomic claim as the sensor, so the
two never launch a request twice, and the sensor stays as the durable catch-all: if the
launcher is down, requests still run, only later.

Two ways to start the run:

* `graphql_launch`: submit through Dagster's GraphQL API; Dagster's run launcher starts a run
  worker process, which pays Python + Dagster + code imports (~2 s here) before STARTED.
* `fork_launch`: this process has already imported everything; it forks a child per request
  that executes the job against the same Dagster instance (a real run: events, logs and asset
  materializations in Dagster). STARTED follows the claim by a fraction of a second.
"""

from __future__ import annotations

import logging
import os
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


class LaunchRejected(Exception):
    """Dagster refused the run for good (invalid config, unknown job): fail the request."""


class AtCapacity(Exception):
    """No run slot free now: the request goes back to the queue."""


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
                except LaunchRejected as error:
                    queue.reject(self.store, request.id, f"launch refused: {error}")
                    continue
                except AtCapacity:
                    self.store.update_request(request.id, status=RequestStatus.QUEUED.value)
                    return launched
                except Exception as error:
                    # Give it back to the queue: the sensor (or the next wake-up) launches it.
                    # A launch function that may have created a run anyway (a lost GraphQL
                    # answer) checks for it before raising: see graphql_launch.
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
    from glaze_pipeline.graphql_client import (
        DagsterGraphQLClient,
        GraphQLTransportError,
        JobNotFoundError,
        RunConfigInvalidError,
    )

    client = DagsterGraphQLClient(graphql_url)

    def launch(request: queue.ClaimedRequest, config: dict[str, Any], tags: dict[str, str]) -> str:
        try:
            return client.launch_enrich(config, tags=tags)
        except (RunConfigInvalidError, JobNotFoundError) as error:
            raise LaunchRejected(str(error)) from error
        except GraphQLTransportError:
            # The answer was lost, not necessarily the launch: never launch a request twice.
            existing = client.find_runs({"glaze/request": request.id})
            if existing:
                return str(existing[0].run_id)
            raise

    return launch, client.close


def fork_launch(
    database_url: str | None, *, providers_file: str | None = None, max_runs: int = 4
) -> tuple[LaunchFunction, Callable[[], None]]:
    """A LaunchFunction that runs each request in a child forked from this warm process.

    The child executes `enrich_table` against $DAGSTER_HOME's instance with its own
    connections. At most `max_runs` children run at once; beyond that the request waits in
    the queue (AtCapacity), where this launcher or the sensor picks it up later.
    """
    from dagster import DagsterInstance
    from dagster._core.utils import make_new_run_id

    from glaze_pipeline.core.detection import normalize_domain
    from glaze_pipeline.definitions import build_definitions

    job = build_definitions(database_url, providers_file).get_job_def("enrich_table")
    normalize_domain("warm.example.com")  # load the suffix list now, not in every child
    with DagsterInstance.get():
        # Create (or migrate) the instance's storage once here: children forked at the same
        # moment would otherwise race to initialise a fresh SQLite storage.
        pass
    children: set[int] = set()

    def reap() -> None:
        for pid in list(children):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)

    def launch(request: queue.ClaimedRequest, config: dict[str, Any], tags: dict[str, str]) -> str:
        reap()
        if len(children) >= max_runs:
            raise AtCapacity(f"{len(children)} runs in progress")
        run_id = make_new_run_id()
        pid = os.fork()
        if pid == 0:  # the child: execute, then leave without running the parent's cleanup
            code = 1
            try:
                with DagsterInstance.get() as instance:
                    result = job.execute_in_process(
                        run_config={"ops": {"detect_entities": {"config": config}}},
                        instance=instance,
                        tags=tags,
                        run_id=run_id,
                        raise_on_error=False,
                    )
                code = 0 if result.success else 1
            except BaseException:
                log.exception("run %s for %s could not execute", run_id, request.id)
            finally:
                os._exit(code)
        children.add(pid)
        return run_id

    def close() -> None:
        for pid in list(children):
            os.waitpid(pid, 0)
            children.discard(pid)

    return launch, close


def run_launcher(store: Store, launch: LaunchFunction, stop: threading.Event, poll_s: float) -> int:
    launcher = Launcher(store, launch)
    started = time.monotonic()
    launcher.serve(stop, poll_s=poll_s)
    log.info("launched %d runs in %.0fs", launcher.launched, time.monotonic() - started)
    return launcher.launched
