"""The push launcher: launch a queued request the moment it lands, not at the next sensor tick.

Dagster's sensor daemon evaluates sensors every ~5 s whatever their interval, so a request
waits 4-7 s for the queue sensor. The launcher listens instead: on Postgres, a trigger NOTIFYs
`glaze_requests` on every queued request (migration 0002) and the launcher claims it at once;
on SQLite it polls every `poll_s`. It claims with the same atomic claim as the sensor, so the
two never launch a request twice, and the sensor stays as the durable catch-all: if the
launcher is down, requests still run, only later.

Nothing but its stop event ends it: a database restart, a lost connection or a failed launch
is logged in one line, waited out (0.5 s, doubling up to 5 s), and followed by a reconnect, a
new LISTEN and a catch-up claim of whatever was queued meanwhile.

Two ways to start the run, each a `RunStarter`:

* `graphql_launch`: submit through Dagster's GraphQL API; Dagster's run launcher starts a run
  worker process, which pays Python + Dagster + code imports (~2 s here) before STARTED.
  Unbounded: Dagster's run coordinator decides how many run at once.
* `fork_launch`: this process has already imported everything; it forks a child per request
  that executes the job against the same Dagster instance (a real run: events, logs and asset
  materializations in Dagster). STARTED follows the claim by a fraction of a second. At most
  `max_runs` at once: the launcher claims no more than the free slots, so the rest stays queued.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.engine import make_url

from glaze_pipeline.core import queue
from glaze_pipeline.core.ai.workflow import AI_JOBS
from glaze_pipeline.core.errors import ConfigError, ServiceUnavailableError
from glaze_pipeline.core.queue import ENRICH_JOB
from glaze_pipeline.core.requests import RequestRepository
from glaze_pipeline.core.schema import EnrichmentRequest
from glaze_pipeline.core.store import Store

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "glaze_requests"

# A claimed request (its first op's config, tags, executor) -> Dagster run id. The job is the
# request's kind's (`queue.job_run`): enrich_table, or an AI job.
LaunchFunction = Callable[[queue.Launchable], str]
# How many more runs may start now; None: no limit here.
Capacity = Callable[[], int | None]


class LaunchRejected(Exception):
    """Dagster refused the run for good (invalid config, unknown job): fail the request."""


class AtCapacity(Exception):
    """No run slot free now: the request goes back to the queue."""


class LaunchFailed(Exception):
    """A launch failed for a reason that may pass (Dagster unreachable): the claimed requests
    went back to the queue, and the launcher waits before it tries again."""


def unbounded() -> int | None:
    return None


def _nothing_to_close() -> None:
    return None


@dataclass(frozen=True)
class RunStarter:
    """How runs start: `launch` one, how many may start now (`capacity`), `close` at the end."""

    launch: LaunchFunction
    capacity: Capacity = unbounded
    close: Callable[[], None] = _nothing_to_close


class Launcher:
    """Claims queued requests and launches a run for each through `launch`.

    `capacity` says how many runs may start now (None: no limit): the launcher never claims
    more, so a full launcher leaves the queue alone instead of claiming and re-queueing (which
    on Postgres NOTIFYs, and would wake it again at once).
    """

    def __init__(
        self,
        store: Store,
        launch: LaunchFunction,
        *,
        capacity: Capacity = unbounded,
        batch: int = 25,
        poll_s: float = 0.5,
        retry_first_s: float = 0.5,
        retry_max_s: float = 5.0,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        if not 0 < retry_first_s <= retry_max_s:
            raise ValueError(
                f"need 0 < retry_first_s <= retry_max_s, got {retry_first_s}, {retry_max_s}"
            )
        self.store = store
        self.launch = launch
        self.capacity = capacity
        self.batch = batch
        self.poll_s = poll_s
        self.retry_first_s = retry_first_s
        self.retry_max_s = retry_max_s
        self.launched = 0

    def launch_pending(self) -> int:
        """Claim and launch what is queued now, up to the free run slots; returns how many.

        A request that cannot run fails alone at claim. When a launch fails, the unlaunched rest
        of the claimed batch goes back to the queue at once (for this launcher or the sensor)
        and LaunchFailed is raised, so that `serve` waits before trying again.
        """
        requests = RequestRepository(self.store)
        launched = 0
        try:
            while (limit := self._free_slots()) > 0:
                batch, rejected = queue.claim_launchable(self.store, limit=limit)
                for position, item in enumerate(batch):
                    request = item.request
                    try:
                        run_id = self.launch(item)
                    except LaunchRejected as error:
                        if requests.reject(request.id, f"launch refused: {error}"):
                            queue.settle_ended(self.store, request.id)  # let go of its rows
                        continue
                    except Exception as error:
                        # AtCapacity (a slot taken since we counted), or the launch failed (a
                        # lost GraphQL answer is checked for a run first: see graphql_launch).
                        unlaunched = batch[position:]
                        for item_back in unlaunched:
                            requests.requeue(item_back.request.id, f"not launched: {error}")
                        if isinstance(error, AtCapacity):
                            return launched
                        raise LaunchFailed(
                            f"launching {request.id} failed, {len(unlaunched)} re-queued: "
                            f"{_one_line(error)}"
                        ) from error
                    requests.attach_run(request.id, run_id)
                    launched += 1
                if len(batch) + len(rejected) < limit:
                    break  # the queue is empty: no need to ask again
        finally:
            self.launched += launched
        return launched

    def _free_slots(self) -> int:
        free = self.capacity()
        return self.batch if free is None else max(0, min(self.batch, free))

    def serve(self, stop: threading.Event) -> None:
        """Launch until `stop` is set: woken by NOTIFY on Postgres, every `poll_s` anyway.

        On any error (the database restarting, a failed launch) it logs one line, waits (from
        `retry_first_s`, doubling up to `retry_max_s`), reconnects and catches up.
        """
        delay = self.retry_first_s
        failures = 0
        while not stop.is_set():
            try:
                with contextlib.closing(self._wakeups(stop)) as wakeups:
                    for _ in wakeups:
                        self.launch_pending()
                        if failures:
                            log.info("launcher: back to normal after %d failed attempts", failures)
                        delay, failures = self.retry_first_s, 0
            except Exception as error:
                failures += 1
                log.warning("launcher: %s; retrying in %.1fs", _one_line(error), delay)
                stop.wait(delay)
                delay = min(delay * 2, self.retry_max_s)

    def _wakeups(self, stop: threading.Event) -> Generator[None, None, None]:
        """Yield whenever something may be waiting: at once (the catch-up), then on each NOTIFY
        (Postgres) and every `poll_s`, until `stop` is set."""
        if self.store.dialect != "postgresql":
            yield
            while not stop.wait(self.poll_s):
                yield
            return
        import psycopg

        conninfo = make_url(self.store.url).set(drivername="postgresql")
        with psycopg.connect(
            conninfo.render_as_string(hide_password=False),
            autocommit=True,
            connect_timeout=10,
            # a peer that vanished without closing (a network cut) is noticed within ~25 s
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        ) as connection:
            connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
            yield  # whatever landed before LISTEN took effect, or while we were away
            while not stop.is_set():
                for _ in connection.notifies(timeout=self.poll_s, stop_after=1):
                    pass
                for _ in connection.notifies(timeout=0):
                    pass  # the rest of a burst: one claim serves them all
                yield


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def check_database(store: Store) -> None:
    """At start: the database must answer and hold the queue, else the launcher stops at once.

    Once running, a lost database is waited out (`Launcher.serve`); at start, an outage or a
    database never migrated is a mistake to report, not to retry forever. Raises what the
    driver raises; the CLI names it in one line.
    """
    with store.engine.connect() as connection:
        connection.execute(select(EnrichmentRequest.id).limit(1)).all()


def graphql_launch(graphql_url: str) -> RunStarter:
    """Start runs through Dagster's GraphQL API (no limit here: Dagster queues them).

    Dagster must answer and serve `enrich_table` now: a wrong URL or a webserver that is down
    is a ServiceUnavailableError, a webserver whose loaded code has no such job a ConfigError,
    before anything is claimed. A code location still loading (or failing to) is only logged:
    it may be ready by the first launch, and a launch it cannot serve (an AI job its code does
    not have yet, say) is refused per request."""
    from glaze_pipeline.defs.executors import run_config_on
    from glaze_pipeline.graphql_client import (
        CodeLocationError,
        DagsterGraphQLClient,
        GraphQLTransportError,
        JobNotFoundError,
        RunConfigInvalidError,
    )

    client = DagsterGraphQLClient(graphql_url)
    try:
        client.locate_job(ENRICH_JOB)
    except GraphQLTransportError as error:
        client.close()
        reason = error.__cause__ or error  # httpx's own words ("[Errno 111] Connection refused")
        raise ServiceUnavailableError(
            f"cannot reach Dagster's GraphQL API at {graphql_url}: {reason}"
        ) from error
    except JobNotFoundError as error:
        client.close()
        raise ConfigError(f"Dagster at {graphql_url} cannot run {ENRICH_JOB}: {error}") from error
    except CodeLocationError as error:
        log.warning("launcher: %s; launching anyway", _one_line(error))

    def launch(item: queue.Launchable) -> str:
        request = item.request
        # A large enrich runs on every core (queue.executor_for), as from the sensor.
        run_config = run_config_on(item.run_config, item.executor)
        try:
            return client.launch_run(item.job_name, run_config, tags=item.tags)
        except (RunConfigInvalidError, JobNotFoundError) as error:
            raise LaunchRejected(str(error)) from error
        except GraphQLTransportError:
            # The answer was lost, not necessarily the launch: never launch a request twice.
            existing = client.find_runs({queue.REQUEST_TAG: request.id})
            if existing:
                return str(existing[0].run_id)
            raise

    return RunStarter(launch, close=client.close)


def fork_launch(
    database_url: str | None, *, providers_file: str | None = None, max_runs: int = 4
) -> RunStarter:
    """Start each run in a child forked from this warm process, at most `max_runs` at once.

    The child executes the request's job (`enrich_table`, or an AI job) against
    $DAGSTER_HOME's instance with its own connections. `capacity` counts the free slots, so the
    launcher claims no more than it can start and the rest waits in the queue, for this
    launcher or the sensor.
    """
    if max_runs < 1:
        raise ValueError(f"max_runs must be >= 1, got {max_runs}")
    from dagster import DagsterInstance
    from dagster._core.utils import make_new_run_id

    from glaze_pipeline.core.detection import load_suffix_list
    from glaze_pipeline.core.heap import freeze_before_fork
    from glaze_pipeline.definitions import build_definitions
    from glaze_pipeline.runner import run_in_process

    definitions = build_definitions(database_url, providers_file)
    for name in (ENRICH_JOB, *(job_name for job_name, _ in AI_JOBS.values())):
        definitions.get_job_def(name)  # built now, once, not in every child
    load_suffix_list()  # now, not in every child
    with DagsterInstance.get():
        # Create (or migrate) the instance's storage once here: children forked at the same
        # moment would otherwise race to initialise a fresh SQLite storage.
        pass
    freeze_before_fork()  # what is loaded now: out of the children's collections
    children: set[int] = set()

    def capacity() -> int:
        for pid in list(children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # already reaped
                done = pid
            if done:
                children.discard(pid)
        return max_runs - len(children)

    def launch(item: queue.Launchable) -> str:
        if capacity() < 1:
            raise AtCapacity(f"{len(children)} runs in progress")
        # In process whatever its size (`item.executor` aside): the child executes the job
        # right here (execute_in_process), which is what makes this path fast to start.
        request, job_name, run_config = item.request, item.job_name, item.run_config
        run_id = make_new_run_id()
        pid = os.fork()
        if pid == 0:  # the child: execute, then leave without running the parent's cleanup
            code = 1
            try:
                with DagsterInstance.get() as instance:
                    outcome = run_in_process(
                        job_name,
                        run_config,
                        database_url=database_url,
                        definitions=definitions,
                        instance=instance,
                        tags=item.tags,
                        run_id=run_id,
                        log_level=None,  # Dagster's own console log, as any launched run's
                        one_line_log=False,
                    )
                code = 0 if outcome.success else 1
            except BaseException:
                log.exception("run %s for %s could not execute", run_id, request.id)
            finally:
                os._exit(code)
        children.add(pid)
        return run_id

    def close() -> None:
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            children.discard(pid)

    return RunStarter(launch, capacity=capacity, close=close)


def run_launcher(store: Store, starter: RunStarter, stop: threading.Event, poll_s: float) -> int:
    launcher = Launcher(store, starter.launch, capacity=starter.capacity, poll_s=poll_s)
    started = time.monotonic()
    launcher.serve(stop)
    log.info("launched %d runs in %.0fs", launcher.launched, time.monotonic() - started)
    return launcher.launched
