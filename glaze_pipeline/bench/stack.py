"""A local Glaze + Dagster stack for benchmarks: a fresh Postgres database, webserver, daemon."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from glaze_pipeline.core.store import Store, normalize_url

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def fresh_postgres(base_url: str, *, migrate: bool = True) -> Iterator[str]:
    """A throwaway Postgres database on the server of `base_url`, migrated unless `migrate` is
    false, dropped on exit."""
    base = make_url(normalize_url(base_url))
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    name = f"glaze_tmp_{secrets.token_hex(4)}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    if migrate:
        store = Store(url)
        store.upgrade()
        store.dispose()
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class Stack:
    """Processes started for a benchmark, with their environment; stopped on exit."""

    database_url: str
    home: Path
    env: dict[str, str]
    graphql_url: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[int, BinaryIO] = field(default_factory=dict)

    def start(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        log = open(self.home / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        # Its own session: stopping it stops its children too (the daemon's code server).
        process = subprocess.Popen(
            list(args),
            cwd=self.home,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        self.logs[process.pid] = log
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        stop_process_group(process, timeout_s=20)
        self.processes.remove(process)
        self.logs.pop(process.pid).close()


@contextlib.contextmanager
def dagster_stack(
    database_url: str, *, webserver: bool = True, daemon: bool = True
) -> Iterator[Stack]:
    """DAGSTER_HOME in a temp dir with the repo's local dagster.yaml, plus webserver and daemon."""
    home = Path(tempfile.mkdtemp(prefix="glaze-bench-"))
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLAZE_", "DAGSTER_"))}
    env.update(
        DAGSTER_HOME=str(home), GLAZE_DATABASE_URL=database_url, GLAZE_HOME=str(home / ".glaze")
    )
    stack = Stack(database_url, home, env)
    module = ["-m", "glaze_pipeline.definitions"]
    try:
        if webserver:
            port = free_port()
            stack.start(
                str(BIN / "dagster-webserver"),
                *module,
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                name="webserver",
            )
            stack.graphql_url = f"http://127.0.0.1:{port}/graphql"
            wait_http(f"http://127.0.0.1:{port}/server_info", timeout_s=90)
        if daemon:
            stack.start(str(BIN / "dagster-daemon"), "run", *module, name="daemon")
        yield stack
    finally:
        for process in list(stack.processes):
            stack.stop(process)
        shutil.rmtree(home, ignore_errors=True)


def stop_process_group(process: subprocess.Popen[bytes], *, timeout_s: float = 30) -> None:
    """Stop a process started with `start_new_session=True` and everything it started (serve's
    launcher, the launcher's forked runs, the daemon's code server): SIGTERM to the group,
    SIGKILL after `timeout_s`, then SIGKILL to whatever of the group outlived its leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def wait_http(url: str, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


def dagster_postgres_yaml(storage_url: str) -> str:
    """A dagster.yaml whose instance keeps runs and events in `storage_url` (Postgres).

    dagster-postgres NOTIFYs with a bound parameter, which psycopg 3 (SQLAlchemy 2.1's default
    for postgresql://) sends server-side and Postgres refuses: psycopg2 it is (docs/scaling.md).
    """
    url = make_url(normalize_url(storage_url)).set(drivername="postgresql+psycopg2")
    rendered = url.render_as_string(hide_password=False)
    return f"storage:\n  postgres:\n    postgres_url: {rendered}\ntelemetry:\n  enabled: false\n"


def process_tree(root: int) -> set[int]:
    """Process `root` and its live descendants (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(entry.name)] = int(fields[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return tree


def process_tree_cpu(root: int) -> float:
    """User + system CPU of process `root` and its live descendants, with what each has
    collected from children it already reaped (/proc/<pid>/stat utime, stime, cutime, cstime)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended since the tree was read
        total += sum(int(value) for value in fields[11:15]) / tick
    return total


@dataclass
class CeleryWorkers:
    """`glaze worker` processes taking steps from one queue (`celery_workers`)."""

    queue: str
    names: list[str]
    processes: list[subprocess.Popen[bytes]]
    logs: list[Path]

    def cpu_seconds(self) -> float:
        """CPU of every worker and its pool processes so far."""
        return sum(process_tree_cpu(process.pid) for process in self.processes)

    def peak_rss_mib(self) -> float | None:
        """The largest peak resident set (VmHWM) of any worker or pool process, in MiB."""
        from glaze_pipeline.bench.services import peak_rss_mib

        peaks = [
            peak
            for process in self.processes
            for pid in process_tree(process.pid)
            if (peak := peak_rss_mib(pid)) is not None
        ]
        return round(max(peaks), 1) if peaks else None


@contextlib.contextmanager
def celery_workers(
    *,
    broker: str,
    queue: str,
    env: dict[str, str],
    workdir: Path,
    count: int = 2,
    ready_timeout_s: float = 30.0,
) -> Iterator[CeleryWorkers]:
    """`count` `glaze worker` processes (concurrency 1, node names w<i>-<queue>@host) on
    `queue`, each in a session of its own; yields once every one logged " ready.", stops them
    (SIGTERM to the group, then SIGKILL) and deletes the queue on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    started = CeleryWorkers(queue, [], [], [])
    try:
        for index in range(1, count + 1):
            name = f"w{index}-{queue}"
            log = workdir / f"celery-{name}.log"
            command = [
                *(sys.executable, "-m", "glaze_pipeline.cli", "worker"),
                *("--broker", broker, "-q", queue, "-n", f"{name}@%h"),
                *("--concurrency", "1", "--loglevel", "INFO"),
            ]
            with log.open("wb") as out:
                process = subprocess.Popen(
                    command,
                    cwd=workdir,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started.names.append(name)
            started.processes.append(process)
            started.logs.append(log)
        deadline = time.monotonic() + ready_timeout_s
        for name, process, log in zip(started.names, started.processes, started.logs, strict=True):
            while b" ready." not in log.read_bytes():
                if process.poll() is not None or time.monotonic() > deadline:
                    why = (
                        f"exited {process.returncode}"
                        if process.returncode is not None
                        else f"not ready within {ready_timeout_s:g} s"
                    )
                    tail = log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"celery worker {name} {why}; its log ends:\n{tail}")
                time.sleep(0.2)
        yield started
    finally:
        for process in started.processes:
            stop_process_group(process, timeout_s=10)
        _delete_queue(broker, queue)


def _delete_queue(broker: str, queue: str) -> None:
    """Drop the run's queue from the broker (a leftover is harmless, so failures are ignored)."""
    from kombu import Connection

    with contextlib.suppress(Exception), Connection(broker, connect_timeout=3) as connection:
        connection.default_channel.queue_delete(queue)
