"""The push launcher: a queue nothing can jam.

A malformed request fails alone (through the launcher and the sensor, on SQLite and Postgres);
a full launcher claims nothing; a failed launch is re-queued and retried with backoff; a Postgres
restart is survived (on a throwaway cluster of this test's own: the shared server is never
touched); bad options are refused; `glaze launcher` runs without DAGSTER_HOME.
"""

import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from dagster import DagsterInstance, RunRequest, build_sensor_context, validate_run_config
from sqlalchemy import text

from glaze_pipeline.bench.stack import BIN, free_port
from glaze_pipeline.cli import cli
from glaze_pipeline.core import queue
from glaze_pipeline.core.requests import RequestRepository
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.settings import MULTIPROCESS_ROWS_ENV, multiprocess_rows
from glaze_pipeline.core.store import Store
from glaze_pipeline.definitions import build_definitions
from glaze_pipeline.defs.executors import selected_executor
from glaze_pipeline.defs.resources import GlazeDatabase, ProgressChannel
from glaze_pipeline.defs.sensors import enrichment_queue_sensor
from glaze_pipeline.launcher import NOTIFY_CHANNEL, Launcher, fork_launch
from glaze_pipeline_tests.conftest import REDIS_TEST_URL
from glaze_pipeline_tests.provider_helpers import wait_until

LAUNCHER_LOG = "glaze_pipeline.launcher"
# One line per failed attempt: what went wrong and how long it waits.
RETRY_LINE = re.compile(r"launcher: \w+: [^\n]*; retrying in \d+\.\ds")


@dataclass
class RecordingLaunch:
    """A LaunchFunction that starts nothing: it records what it was asked to launch."""

    ids: list[str] = field(default_factory=list)
    failures_left: int = 0
    attempts: list[float] = field(default_factory=list)
    executors: dict[str, str] = field(default_factory=dict)

    def __call__(self, item: queue.Launchable) -> str:
        self.attempts.append(time.monotonic())
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionError("dagster unreachable")
        request = item.request
        assert item.config["request_id"] == request.id == item.tags["glaze/request"]
        self.ids.append(request.id)
        self.executors[request.id] = item.executor
        return f"run-{request.id}"


def sensor_resources(store: Store) -> dict[str, Any]:
    return {"glaze_db": GlazeDatabase(url=store.url), "progress": ProgressChannel()}


def insert_request(store: Store, table_id: str, selection: str, kind: str = "enrich") -> str:
    """What the app does: one INSERT of whatever it has, valid or not."""
    with store.engine.begin() as connection:
        return str(
            connection.execute(
                text(
                    "INSERT INTO enrichment_requests (table_id, selection, kind) "
                    "VALUES (:t, :s, :k) RETURNING id"
                ),
                {"t": table_id, "s": selection, "k": kind},
            ).scalar()
        )


def state(store: Store, request_id: str) -> tuple[str, str | None, str | None]:
    """(status, run id, error), in SQL: the ORM cannot even load a non-JSON selection."""
    with store.engine.connect() as connection:
        row = connection.execute(
            text("SELECT status, run_id, error FROM enrichment_requests WHERE id = :id"),
            {"id": request_id},
        ).one()
    return row.status, row.run_id, row.error


def queue_poisoned_batch(store: Store) -> tuple[list[str], dict[str, str]]:
    """Two good requests around malformed ones: (good ids, {poisoned id: expected reason})."""
    table = seed_generated(store, rows=3, unique_companies=2)
    industry = f'{{"column_ids": ["{table.column_by_key("industry").id}"]}}'
    good = [insert_request(store, table.id, industry)]
    poisoned = {
        insert_request(store, table.id, '"a string"'): "invalid selection",
        insert_request(store, table.id, "[1, 2]"): "invalid selection",
        insert_request(store, table.id, industry, kind="bogus"): "unknown kind 'bogus'",
    }
    if store.dialect == "sqlite":  # Postgres refuses text that is not JSON at the INSERT
        poisoned[insert_request(store, table.id, "not json {")] = "invalid selection"
    good.append(insert_request(store, table.id, industry))
    return good, poisoned


def assert_failed_alone(store: Store, poisoned: dict[str, str]) -> None:
    requests = RequestRepository(store)
    for request_id, reason in poisoned.items():
        status, run_id, error = state(store, request_id)
        assert (status, run_id) == ("failed", None)
        assert error is not None and reason in error
        # (the app's INSERT writes no history: the first transition is the claim)
        assert requests.transitions(request_id) == [("queued", "launched"), ("launched", "failed")]


def test_a_poisoned_request_fails_alone_and_the_launcher_launches_the_rest(store: Store) -> None:
    good, poisoned = queue_poisoned_batch(store)
    launches = RecordingLaunch()
    launcher = Launcher(store, launches)
    assert launcher.launch_pending() == 2
    assert sorted(launches.ids) == sorted(good)
    for request_id in good:
        assert state(store, request_id) == ("launched", f"run-{request_id}", None)
    assert_failed_alone(store, poisoned)
    assert launcher.launch_pending() == 0  # nothing left behind, nothing claimed again
    assert len(launches.ids) == 2


def test_a_poisoned_request_fails_alone_and_the_sensor_launches_the_rest(store: Store) -> None:
    good, poisoned = queue_poisoned_batch(store)
    with (
        DagsterInstance.ephemeral() as instance,
        build_sensor_context(instance=instance, resources=sensor_resources(store)) as context,
    ):
        result = enrichment_queue_sensor(context)
    runs = result.run_requests
    assert all(isinstance(run, RunRequest) for run in runs)
    assert sorted(run.run_key for run in runs) == sorted(good)
    assert all(state(store, request_id)[0] == "launched" for request_id in good)
    assert_failed_alone(store, poisoned)


def test_a_large_request_runs_on_every_core_from_the_launcher_and_the_sensor(
    store: Store, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """An enrich request holding GLAZE_MULTIPROCESS_ROWS rows or more is launched with its
    steps in processes of their own (a run config enrich_table accepts); a smaller one, an
    estimate, any request on one core or with the setting at 0 stays in process. (On SQLite
    the processes share their purchases through Redis: see the next test.)"""
    monkeypatch.setenv(MULTIPROCESS_ROWS_ENV, "4")
    if store.dialect == "sqlite":
        monkeypatch.setenv("GLAZE_REDIS_URL", redis_url)
    small = seed_generated(store, rows=3, unique_companies=2)
    large = seed_generated(store, rows=6, unique_companies=2)
    everything = {"whole_table": True}
    expected = {
        queue.enqueue(store, small.id, everything): queue.IN_PROCESS,
        queue.enqueue(store, large.id, everything): queue.MULTIPROCESS,
        queue.enqueue(store, large.id, everything, kind="estimate"): queue.IN_PROCESS,
    }
    launches = RecordingLaunch()
    assert Launcher(store, launches).launch_pending() == 3
    assert launches.executors == expected

    for request_id in expected:  # again, through the sensor
        RequestRepository(store).requeue(request_id, "again, through the sensor")
    with (
        DagsterInstance.ephemeral() as instance,
        build_sensor_context(instance=instance, resources=sensor_resources(store)) as context,
    ):
        runs = {run.run_key: run for run in enrichment_queue_sensor(context).run_requests}
    job = build_definitions().resolve_job_def(queue.ENRICH_JOB)
    for request_id, executor in expected.items():
        run_config = runs[request_id].run_config
        assert selected_executor(run_config) == executor
        assert validate_run_config(job, run_config)["ops"]["detect_entities"]["config"]
    processes = runs[next(iter(k for k, v in expected.items() if v == queue.MULTIPROCESS))]
    assert processes.run_config["execution"]["config"]["multiprocess"]["max_concurrent"] == (
        os.cpu_count()
    )

    other = seed_generated(store, rows=6, unique_companies=2)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    big = queue.enqueue(store, other.id, everything)
    assert Launcher(store, launches).launch_pending() == 1
    assert store.held_rows(big) == 6
    assert launches.executors[big] == queue.IN_PROCESS  # one core: nothing to gain


def test_on_sqlite_without_redis_a_large_request_stays_in_one_process(
    sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps side by side there meet in file locks, each purchase written through to SQLite
    under its lock behind the rows' writes: slower than one process (measured, see
    `queue.shares_purchases`), so the size does not matter: in process, and no count."""
    monkeypatch.setenv(MULTIPROCESS_ROWS_ENV, "4")
    monkeypatch.delenv("GLAZE_REDIS_URL", raising=False)
    table = seed_generated(sqlite_store, rows=6, unique_companies=2)
    request_id = queue.enqueue(sqlite_store, table.id, {"whole_table": True})
    counted: list[str] = []
    monkeypatch.setattr(sqlite_store, "held_rows", counted.append)
    launches = RecordingLaunch()
    assert Launcher(sqlite_store, launches).launch_pending() == 1
    assert launches.executors == {request_id: queue.IN_PROCESS}
    assert counted == []


def test_a_request_naming_fewer_rows_than_the_threshold_is_not_counted(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its size is in the selection: no count of held rows (a statement) to choose."""
    monkeypatch.setenv(MULTIPROCESS_ROWS_ENV, "4")
    monkeypatch.setenv("GLAZE_REDIS_URL", REDIS_TEST_URL)  # SQLite shares purchases through it
    table = seed_generated(store, rows=7, unique_companies=2)
    rows = [row.id for row in store.rows_in_order(table.id)]
    industry = [table.column_by_key("industry").id]
    counted: list[str] = []
    count = store.held_rows
    monkeypatch.setattr(
        store, "held_rows", lambda request: counted.append(request) or count(request)
    )
    few = queue.enqueue(store, table.id, {"column_ids": industry, "row_ids": rows[:3]})
    many = queue.enqueue(store, table.id, {"column_ids": industry, "row_ids": rows[3:]})
    launches = RecordingLaunch()
    assert Launcher(store, launches).launch_pending() == 2
    assert launches.executors == {few: queue.IN_PROCESS, many: queue.MULTIPROCESS}
    assert counted == [many]


def test_a_bad_multiprocess_setting_claims_nothing_and_names_itself(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's mistake, not the request's: the claim raises before it takes anything, and
    the request waits in the queue for the setting to be mended."""
    table = seed_generated(store, rows=3, unique_companies=2)
    request_id = queue.enqueue(store, table.id, {"whole_table": True})
    for value, problem in (("many", "a number"), ("2.5", "a whole number of rows")):
        monkeypatch.setenv(MULTIPROCESS_ROWS_ENV, value)
        with pytest.raises(ValueError, match=f"{MULTIPROCESS_ROWS_ENV} must be {problem}"):
            Launcher(store, RecordingLaunch()).launch_pending()
        assert state(store, request_id) == ("queued", None, None)
    monkeypatch.setenv(MULTIPROCESS_ROWS_ENV, "0")
    assert multiprocess_rows() is None
    assert multiprocess_rows(3) == 3
    launches = RecordingLaunch()
    assert Launcher(store, launches).launch_pending() == 1
    assert launches.executors == {request_id: queue.IN_PROCESS}


def test_a_full_launcher_claims_nothing_and_at_most_its_free_slots(store: Store) -> None:
    table = seed_generated(store, rows=2, unique_companies=1)
    ids = [queue.enqueue(store, table.id, {"whole_table": True}) for _ in range(5)]
    slots = [0]
    launches = RecordingLaunch()
    launcher = Launcher(store, launches, capacity=lambda: slots[0] - len(launches.ids))
    assert launcher.launch_pending() == 0
    requests = RequestRepository(store)
    assert all(requests.transitions(r) == [(None, "queued")] for r in ids)  # never claimed

    slots[0] = 2
    assert launcher.launch_pending() == 2
    assert sorted(launches.ids) == sorted(ids[:2])  # the oldest
    # The other three were never claimed, so never re-queued (on Postgres, a NOTIFY each).
    assert all(requests.transitions(r) == [(None, "queued")] for r in ids[2:])
    assert [state(store, r)[0] for r in ids] == ["launched"] * 2 + ["queued"] * 3


@contextlib.contextmanager
def serving(launcher: Launcher) -> Iterator[threading.Thread]:
    """`launcher.serve` in a thread, stopped (and checked to have stopped) on exit."""
    stop = threading.Event()
    thread = threading.Thread(target=launcher.serve, args=(stop,), name="launcher")
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        if launcher.store.dialect == "postgresql":
            with contextlib.suppress(Exception), launcher.store.engine.begin() as connection:
                # end its wait for a NOTIFY now, not at its next poll
                connection.execute(text(f"NOTIFY {NOTIFY_CHANNEL}"))
        thread.join(timeout=10)
    assert not thread.is_alive(), "the launcher did not stop"


def test_a_full_launcher_does_not_spin_and_starts_when_a_slot_frees(pg_store: Store) -> None:
    """At capacity nothing is claimed, so no re-queue NOTIFYs wake it in a loop."""
    store = pg_store
    table = seed_generated(store, rows=2, unique_companies=1)
    ids = [queue.enqueue(store, table.id, {"whole_table": True}) for _ in range(3)]
    slots = [0]
    checks = [0]

    launches = RecordingLaunch()

    def capacity() -> int:
        checks[0] += 1
        return slots[0] - len(launches.ids)

    launcher = Launcher(store, launches, capacity=capacity, poll_s=0.1)
    with serving(launcher):
        time.sleep(1.0)  # ~10 poll ticks
        requests = RequestRepository(store)
        assert all(requests.transitions(r) == [(None, "queued")] for r in ids)
        assert checks[0] < 30  # a wake-up per tick, not a hot loop
        slots[0] = 3
        assert wait_until(lambda: len(launches.ids) == 3, timeout_s=5)
    assert sorted(launches.ids) == sorted(ids)


def test_a_failed_launch_is_requeued_and_retried_with_backoff(
    pg_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Its re-queue NOTIFYs at once: only the backoff keeps it from a claim/fail hot loop."""
    store = pg_store
    table = seed_generated(store, rows=2, unique_companies=1)
    request_id = queue.enqueue(store, table.id, {"whole_table": True})
    launches = RecordingLaunch(failures_left=2)
    launcher = Launcher(store, launches, poll_s=30, retry_first_s=0.2, retry_max_s=5)
    with caplog.at_level(logging.INFO, logger=LAUNCHER_LOG), serving(launcher):
        assert wait_until(lambda: launches.ids == [request_id], timeout_s=5)
    first, second, third = launches.attempts
    assert second - first >= 0.2 and third - second >= 0.4  # waited, doubling
    assert RequestRepository(store).transitions(request_id) == [
        (None, "queued"),
        ("queued", "launched"),
        ("launched", "queued"),
        ("queued", "launched"),
        ("launched", "queued"),
        ("queued", "launched"),
    ]
    assert state(store, request_id) == ("launched", f"run-{request_id}", None)
    warnings = launcher_warnings(caplog)
    assert len(warnings) == 2
    assert all(RETRY_LINE.fullmatch(w) for w in warnings), warnings
    assert all("dagster unreachable" in w and "1 re-queued" in w for w in warnings)
    assert "back to normal after 2 failed attempts" in caplog.text


def launcher_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in list(caplog.records)
        if record.name == LAUNCHER_LOG and record.levelno == logging.WARNING
    ]


@dataclass
class Cluster:
    """A throwaway Postgres cluster of this test's own, on its own port."""

    data: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def pg_ctl(self, *args: str) -> None:
        run_as_postgres(
            pg_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.data / "server.log"), *args
        )

    def start(self) -> None:
        self.pg_ctl("-w", "start")

    def stop(self) -> None:
        self.pg_ctl("-m", "fast", "-w", "stop")


def pg_binary(name: str) -> str:
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is required to start a throwaway Postgres cluster")
    return found


def run_as_postgres(*args: str) -> None:
    """Postgres refuses to run as root: as root, run it as the postgres user."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # With -l the server's output goes to its log file, so nothing holds these pipes open.
    done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args[:1])} failed: {done.stdout}{done.stderr}")


@pytest.fixture
def own_postgres() -> Iterator[Cluster]:
    """A fresh cluster (initdb ~0.6 s) that the test may stop and start; never the shared one."""
    root = Path(tempfile.mkdtemp(prefix="glaze-pg-"))  # not tmp_path: postgres must reach it
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    cluster = Cluster(root / "data", free_port())
    try:
        run_as_postgres(
            pg_binary("initdb"), "-D", str(cluster.data), "-U", "postgres", "--auth=trust", "-N"
        )
        with open(cluster.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {cluster.port}\nlisten_addresses = '127.0.0.1'\n"
                "unix_socket_directories = ''\nfsync = off\n"
            )
        cluster.start()
        yield cluster
    finally:
        if (cluster.data / "postmaster.pid").exists():
            cluster.pg_ctl("-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def listening(store: Store) -> bool:
    """Whether some session (the launcher's) has LISTENed on the channel."""
    with contextlib.suppress(Exception), store.engine.connect() as connection:
        return bool(
            connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE query = :listen AND pid <> pg_backend_pid()"
                ),
                {"listen": f"LISTEN {NOTIFY_CHANNEL}"},
            )
        )
    return False


def test_the_launcher_survives_a_postgres_restart(
    own_postgres: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(own_postgres.url)
    store.upgrade()
    table = seed_generated(store, rows=2, unique_companies=1)
    launches = RecordingLaunch()
    # Polling every 30 s: a launch within seconds can only come from a NOTIFY or a catch-up.
    launcher = Launcher(store, launches, poll_s=30, retry_first_s=0.2, retry_max_s=1)
    try:
        with caplog.at_level(logging.INFO, logger=LAUNCHER_LOG), serving(launcher) as thread:
            assert wait_until(lambda: listening(store), timeout_s=5)
            before = queue.enqueue(store, table.id, {"whole_table": True})
            assert wait_until(lambda: launches.ids == [before], timeout_s=3)

            own_postgres.stop()
            # it keeps trying (and failing) while the server is down
            assert wait_until(lambda: len(launcher_warnings(caplog)) >= 3, timeout_s=5)
            own_postgres.start()
            # Queued before it reconnected: the catch-up after reconnecting launches it.
            meanwhile = queue.enqueue(store, table.id, {"whole_table": True})
            assert wait_until(lambda: launches.ids == [before, meanwhile], timeout_s=5)
            # LISTENing again: a new request is launched on its NOTIFY.
            assert wait_until(lambda: listening(store), timeout_s=5)
            after = queue.enqueue(store, table.id, {"whole_table": True})
            assert wait_until(lambda: launches.ids == [before, meanwhile, after], timeout_s=3)
            assert thread.is_alive()  # the same launcher throughout
    finally:
        store.dispose()
    assert launcher.launched == 3
    warnings = launcher_warnings(caplog)
    assert all(RETRY_LINE.fullmatch(w) for w in warnings), warnings
    assert len(warnings) < 10  # backed off (0.2 s doubling to 1 s), not a reconnect storm
    assert "back to normal" in caplog.text


def test_bad_launcher_options_are_refused() -> None:
    runner = CliRunner()
    for args, message in (
        (["--max-runs", "0"], "Invalid value for '--max-runs': 0 is not in the range x>=1."),
        (["--poll", "-1"], "Invalid value for '--poll': -1.0 is not in the range x>0."),
        (["--poll", "0"], "Invalid value for '--poll': 0.0 is not in the range x>0."),
    ):
        result = runner.invoke(cli, ["launcher", *args])
        assert result.exit_code == 2 and message in result.output, result.output
    store = Store("sqlite://")
    with pytest.raises(ValueError, match="poll_s must be > 0"):
        Launcher(store, RecordingLaunch(), poll_s=0)
    with pytest.raises(ValueError, match="poll_s must be > 0"):
        Launcher(store, RecordingLaunch(), poll_s=-1)
    with pytest.raises(ValueError, match="batch must be >= 1"):
        Launcher(store, RecordingLaunch(), batch=0)
    with pytest.raises(ValueError, match="retry_first_s"):
        Launcher(store, RecordingLaunch(), retry_first_s=0)
    with pytest.raises(ValueError, match="max_runs must be >= 1"):
        fork_launch(None, max_runs=0)
    store.dispose()


def test_glaze_launcher_without_dagster_home_runs_requests_in_glaze_dagster(
    tmp_path: Path,
) -> None:
    """The real command, forking real runs, on the SQLite default; a poisoned request too."""
    home = tmp_path / ".glaze"
    home.mkdir()
    store = Store(f"sqlite:///{home / 'glaze.db'}")
    store.upgrade()
    good, poisoned = queue_poisoned_batch(store)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLAZE_", "DAGSTER_"))}
    env["GLAZE_HOME"] = str(home)
    log_path = tmp_path / "launcher.log"
    with open(log_path, "wb") as log_file:
        launcher = subprocess.Popen(
            [str(BIN / "glaze"), "launcher", "--poll", "0.2"],
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: (
                launcher.poll() is not None or all(state(store, r)[0] == "succeeded" for r in good)
            ),
            timeout_s=60,
        )
        assert launcher.poll() is None, f"the launcher exited:\n{log_path.read_text()[-3000:]}"
        assert [state(store, r)[0] for r in good] == ["succeeded"] * 2, log_path.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGTERM)
        launcher.wait(timeout=30)
    output = log_path.read_text()
    assert launcher.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert f"runs recorded in {home / 'dagster'}" in " ".join(output.split())
    assert_failed_alone(store, poisoned)
    with DagsterInstance.from_config(str(home / "dagster")) as instance:
        for request_id in good:
            run = instance.get_run_by_id(str(state(store, request_id)[1]))
            assert run is not None and run.tags["glaze/request"] == request_id
    store.dispose()
