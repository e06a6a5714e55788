"""End to end with real processes: the daemon's sensor, the push launcher, a SIGKILLed run.

Each test runs against a fresh Postgres database, Redis, a throwaway DAGSTER_HOME with the
repo's dagster.yaml, and the mock provider server on loopback.
"""

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from dagster import DagsterEventType, DagsterInstance, build_sensor_context
from sqlalchemy import text

from glaze_pipeline.bench.stack import BIN, Stack, dagster_stack
from glaze_pipeline.core.models import TERMINAL_REQUEST_STATUSES, RequestStatus
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.spend import MAX_BLOCK_PER_IN_FLIGHT
from glaze_pipeline.core.store import Store
from glaze_pipeline.defs.executors import selected_executor
from glaze_pipeline.defs.resources import (
    STALE_AFTER_ENV,
    GlazeDatabase,
    ProgressChannel,
    RequestLiveness,
)
from glaze_pipeline.defs.sensors import request_reconciler
from glaze_pipeline.testing.mock_server import Latency, MockConfig, MockProviderServer, VendorConfig
from glaze_pipeline_tests.conftest import APP_TABLES

FIELDS = ["name", "domain", "industry", "employee_count", "location"]


@contextmanager
def cheap_vendor(latency_ms: float) -> Iterator[MockProviderServer]:
    """The mock server with one company vendor, `cheap`, answering in `latency_ms`."""
    config = MockConfig(
        vendors={
            "cheap": VendorConfig(
                entity_type="company", fields=FIELDS, latency=Latency(mean_ms=latency_ms)
            )
        }
    )
    with MockProviderServer(config) as server:
        yield server


@pytest.fixture
def mock() -> Iterator[MockProviderServer]:
    with cheap_vendor(100) as server:
        yield server


def providers_file(tmp_path: Path, mock: MockProviderServer, max_concurrency: int = 50) -> Path:
    path = tmp_path / "providers.yaml"
    entry = {
        "kind": "json_api",
        "name": "cheap_company",
        "entity_type": "company",
        "base_url": mock.vendor_url("cheap"),
        "lookups": {"domain": {"path": "/v1/companies", "params": {"domain": "{value}"}}},
        "record_path": "company",
        "fields": {"industry": "industry", "employee_count": "metrics.employees"},
        "cost_per_call": 1.0,
        "confidence": 0.85,
        "http": {
            "max_concurrency": max_concurrency,
            "rate_limit_per_s": 1000,
            "rate_limit_burst": 100,
        },
    }
    path.write_text(yaml.safe_dump({"providers": [entry]}))
    return path


@pytest.fixture
def app_store(postgres_url: str) -> Iterator[Store]:
    empty_app_tables(postgres_url)
    store = Store(postgres_url)
    yield store
    store.dispose()


@contextmanager
def daemon_stack(
    postgres_url: str, redis_url: str, tmp_path: Path, mock: MockProviderServer, **env: str
) -> Iterator[Stack]:
    """The Dagster daemon over the session's Postgres database, with the mock providers (and
    `env` in its environment)."""
    empty_app_tables(postgres_url)
    with dagster_stack(postgres_url, webserver=False) as stack:
        stack.env["GLAZE_PROVIDERS_FILE"] = str(providers_file(tmp_path, mock))
        stack.env["GLAZE_REDIS_URL"] = redis_url
        stack.env.update(env)
        # the daemon was started before these were set: restart it with them
        for process in list(stack.processes):
            stack.stop(process)
        stack.start(
            str(BIN / "dagster-daemon"), "run", "-m", "glaze_pipeline.definitions", name="daemon"
        )
        yield stack


@pytest.fixture
def stack(
    postgres_url: str, redis_url: str, tmp_path: Path, mock: MockProviderServer
) -> Iterator[Stack]:
    with daemon_stack(postgres_url, redis_url, tmp_path, mock) as stack:
        yield stack


def enrich_in_a_process(
    tmp_path: Path, mock: MockProviderServer, table: Any, database_url: str, **env: str
) -> tuple[list[str], dict[str, str]]:
    """`glaze enrich` of the industry column as a user runs it: the command and its env."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GLAZE_", "DAGSTER_"))}
    clean.update(
        GLAZE_DATABASE_URL=database_url,
        GLAZE_PROVIDERS_FILE=str(providers_file(tmp_path, mock)),
        GLAZE_HOME=str(tmp_path / ".glaze"),
        DAGSTER_HOME=str(tmp_path),
        **env,
    )
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    command = [str(BIN / "glaze"), "enrich", table.id, "--columns", "industry"]
    return [*command, "--concurrency", "4"], clean


def kill_mid_way(
    command: list[str], env: dict[str, str], tmp_path: Path, mock: MockProviderServer, calls: int
) -> None:
    """Start `command`, SIGKILL it once the mock has answered `calls` lookups."""
    victim = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while cheap_calls(mock) < calls:
            assert time.monotonic() < deadline and victim.poll() is None
            time.sleep(0.05)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    time.sleep(0.3)  # lookups sent just before the kill reach the mock's counter


def assert_on_record(calls: dict[str, int], cost: float, mock: MockProviderServer) -> None:
    """A killed worker's record never falls short of the vendor's bill: each lookup is journalled
    before it is sent. Call slots are journalled ahead in blocks (core/spend.py), so a kill can
    leave on record, counted charged, one intent per concurrent lookup (4) that never reached
    the vendor plus the unused slots of the last block (at most MAX_BLOCK_PER_IN_FLIGHT per
    lookup in flight)."""
    billed = mock.stats()["vendors"]["cheap"]
    journalled = calls["cheap_company"]
    slack = 4 + MAX_BLOCK_PER_IN_FLIGHT * 4
    assert billed["requests"] <= journalled <= billed["requests"] + slack, (calls, billed)
    assert cost == pytest.approx(journalled * billed["cost"] / billed["requests"])


def empty_app_tables(url: str) -> None:
    store = Store(url)
    with store.engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(APP_TABLES)} CASCADE"))
    store.dispose()


def cheap_calls(mock: MockProviderServer) -> int:
    return int(mock.stats()["vendors"].get("cheap", {}).get("requests", 0))


def wait_terminal(store: Store, request_id: str, timeout_s: float = 90) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        request = store.get_request(request_id)
        if RequestStatus(request.status) in TERMINAL_REQUEST_STATUSES:
            return request
        time.sleep(0.1)
    raise AssertionError(f"{request_id} still {store.get_request(request_id).status}")


def insert_request(store: Store, table: Any, *keys: str) -> str:
    """What the app does: one INSERT, nothing else."""
    selection = json.dumps({"column_ids": [table.column_by_key(k).id for k in keys]})
    with store.engine.begin() as connection:
        return str(
            connection.execute(
                text(
                    "INSERT INTO enrichment_requests (table_id, selection) "
                    "VALUES (:t, :s) RETURNING id"
                ),
                {"t": table.id, "s": selection},
            ).scalar()
        )


def test_sql_insert_is_launched_by_the_daemon_and_filled(
    stack: Stack, app_store: Store, mock: MockProviderServer
) -> None:
    store = app_store
    table = seed_generated(store, rows=20, unique_companies=5)
    request_id = insert_request(store, table, "industry", "employee_count")
    request = wait_terminal(store, request_id)
    assert request.status == "succeeded", request.error
    assert (request.cells_done, request.rows_written, request.entities) == (40, 20, 5)
    assert request.provider_calls == {"cheap_company": 5}
    assert cheap_calls(mock) == 5
    assert all(r.data["industry"] for r in store.rows_in_order(table.id))
    with DagsterInstance.from_config(str(stack.home)) as instance:
        run = instance.get_run_by_id(request.run_id)
        assert run is not None and run.tags["glaze/request"] == request_id


def test_a_large_request_from_the_queue_runs_its_steps_in_processes_of_their_own(
    postgres_url: str, redis_url: str, tmp_path: Path, mock: MockProviderServer
) -> None:
    """From GLAZE_MULTIPROCESS_ROWS held rows on (lowered to 10 here; 50,000 by default) the
    sensor launches an enrich on the multiprocess executor: each step in a process of its
    own, the result the same as in process."""
    with daemon_stack(
        postgres_url, redis_url, tmp_path, mock, GLAZE_MULTIPROCESS_ROWS="10"
    ) as stack:
        store = Store(postgres_url)
        try:
            table = seed_generated(store, rows=20, unique_companies=5)
            small = seed_generated(store, rows=5, unique_companies=5, name="small")
            request_id = insert_request(store, table, "industry", "employee_count")
            request = wait_terminal(store, request_id)
            assert request.status == "succeeded", request.error
            assert (request.cells_done, request.rows_written, request.entities) == (40, 20, 5)
            assert (
                request.provider_calls
                == {"cheap_company": 5}
                == {"cheap_company": cheap_calls(mock)}
            )
            assert all(r.data["industry"] for r in store.rows_in_order(table.id))
            small_id = insert_request(store, small, "industry")
            assert wait_terminal(store, small_id).status == "succeeded"
            with DagsterInstance.from_config(str(stack.home)) as instance:
                for done, executor in (
                    (request, "multiprocess"),
                    (store.get_request(small_id), "in_process"),
                ):
                    run = instance.get_run_by_id(done.run_id)
                    assert run is not None and selected_executor(run.run_config) == executor
                    workers = instance.get_records_for_run(
                        done.run_id, of_type=DagsterEventType.STEP_WORKER_STARTED
                    ).records
                    steps = {record.event_log_entry.step_key for record in workers}
                    # every step of the large run in its own process; none of the small run's
                    assert ("detect_entities" in steps) == (executor == "multiprocess")
        finally:
            store.dispose()


def test_a_multiprocess_run_on_the_sqlite_default_buys_once_within_the_vendors_limit(
    tmp_path: Path, mock: MockProviderServer
) -> None:
    """`dagster job execute` on two processes, as a user runs it, on the embedded default: a
    SQLite file, no Redis. The spans side by side share companies: each is bought once (file
    locks beside the database), and the vendor's max_concurrency (4) holds across the two
    processes (each takes its share, from the executor's max_concurrent)."""
    database = tmp_path / "glaze.db"
    store = Store(f"sqlite:///{database}")
    store.upgrade()
    table = seed_generated(store, rows=120, unique_companies=24)
    industry = table.column_by_key("industry").id
    run_config = {
        "ops": {
            "detect_entities": {
                "config": {
                    "table_id": table.id,
                    "column_ids": [industry],
                    "chunk_size": 1,
                    "page_size": 10,
                    "concurrency": 20,
                }
            }
        },
        "execution": {"config": {"multiprocess": {"max_concurrent": 2}}},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLAZE_", "DAGSTER_"))}
    env.update(
        GLAZE_DATABASE_URL=f"sqlite:///{database}",
        GLAZE_PROVIDERS_FILE=str(providers_file(tmp_path, mock, max_concurrency=4)),
        DAGSTER_HOME=str(tmp_path),
    )
    done = subprocess.run(
        [
            str(BIN / "dagster"),
            *("job", "execute", "-m", "glaze_pipeline.definitions", "-j", "enrich_table"),
            *("-c", str(tmp_path / "run.yaml")),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    try:
        [summary] = store.recent_requests()
        request = store.get_request(summary.id)
        assert request.status == "succeeded", request.error
        assert request.provider_calls == {"cheap_company": 24}
        rows = store.rows_in_order(table.id)
        assert len(rows) == 120 and all(row.data["industry"] for row in rows)
    finally:
        store.dispose()
    vendor = mock.stats()["vendors"]["cheap"]
    assert vendor["requests"] == 24  # each company once, whichever process bought it
    assert vendor["max_in_flight"] <= 4
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        [run] = instance.get_runs()
        started = instance.get_records_for_run(
            run.run_id, of_type=DagsterEventType.STEP_START
        ).records
        pids = {
            record.event_log_entry.dagster_event.pid
            for record in started
            if record.event_log_entry.step_key.startswith("enrich_entities")
        }
        assert len(pids) >= 2  # the spans ran in processes of their own


def test_the_fork_launcher_claims_and_runs_requests_ahead_of_the_sensor(
    stack: Stack, app_store: Store
) -> None:
    """Timing is the benchmark's job (`glaze bench launch`); this checks who launched what."""
    for process in list(stack.processes):  # no daemon: only the launcher can launch
        stack.stop(process)
    store = app_store
    table = seed_generated(store, rows=10, unique_companies=10)
    launcher = stack.start(str(BIN / "glaze"), "launcher", name="launcher")
    time.sleep(3)  # imports and LISTEN
    try:
        request_ids = [insert_request(store, table, "industry") for _ in range(3)]
        requests = [wait_terminal(store, r, timeout_s=60) for r in request_ids]
        assert [r.status for r in requests] == ["succeeded"] * 3, [r.error for r in requests]
        with DagsterInstance.from_config(str(stack.home)) as instance:
            for request in requests:
                run = instance.get_run_by_id(request.run_id)
                assert run is not None and run.tags["glaze/request"] == request.id
                deadline = time.monotonic() + 30
                while not run.is_finished and time.monotonic() < deadline:  # closing events
                    time.sleep(0.1)
                    run = instance.get_run_by_id(request.run_id)
                    assert run is not None
                assert run.status.value == "SUCCESS"
    finally:
        stack.stop(launcher)


def test_a_sigkilled_run_ends_failed_and_the_rerun_buys_nothing_twice(
    app_store: Store,
    postgres_url: str,
    redis_url: str,
    tmp_path: Path,
    mock: MockProviderServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = app_store
    table = seed_generated(store, rows=200, unique_companies=100)
    enrich, env = enrich_in_a_process(
        tmp_path, mock, table, postgres_url, GLAZE_REDIS_URL=redis_url
    )
    kill_mid_way(enrich, env, tmp_path, mock, calls=20)  # mid-way: ~20 of 100 companies bought
    asked_before_kill = cheap_calls(mock)
    assert 20 <= asked_before_kill < 100
    # Answers received before the kill were written through to Redis at once; only the
    # lookups in flight at the kill (at most the concurrency, 4) were lost with the process.
    client = redis.Redis.from_url(redis_url)
    kept = len(client.keys("glaze:answer:*"))
    client.close()
    assert asked_before_kill - 4 <= kept <= asked_before_kill

    with store.engine.connect() as connection:
        [request_id] = connection.execute(text("SELECT id FROM enrichment_requests")).scalars()
    assert store.get_request(request_id).status == "running"  # nobody told anyone: it died

    monkeypatch.setenv(STALE_AFTER_ENV, "1")
    time.sleep(1.5)
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        with build_sensor_context(
            instance=instance,
            resources={
                "glaze_db": GlazeDatabase(url=postgres_url),
                "progress": ProgressChannel(),
                "request_liveness": RequestLiveness(),
            },
        ) as context:
            request_reconciler(context)
        request = store.get_request(request_id)
        assert request.status == "failed"
        assert "no heartbeat" in request.error and "worker died" in request.error
        # Spend never lost: every call the killed worker sent is on its record, the ones in
        # flight at the kill included (journalled before they left).
        assert_on_record(request.provider_calls, request.cost, mock)
        run = instance.get_run_by_id(request.run_id)
        assert run is not None and run.status.value == "FAILURE"  # Dagster is told too

    rerun = subprocess.run(
        enrich, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "succeeded" in rerun.stdout
    # The re-run buys exactly what the killed run had not received: nothing twice.
    [rerun_id] = [r for r in rerun.stdout.split() if r.startswith("req_") and r != request_id]
    assert store.get_request(rerun_id).provider_calls == {"cheap_company": 100 - kept}
    assert store.get_request(rerun_id).cache_hits == kept
    assert cheap_calls(mock) == asked_before_kill + 100 - kept
    assert all(r.data["industry"] for r in store.rows_in_order(table.id))


def test_on_the_sqlite_default_a_sigkilled_run_keeps_what_it_bought(
    tmp_path: Path, mock: MockProviderServer
) -> None:
    """No Redis, SQLite: answers are written through to the entity_cache table every second
    and every call is journalled before it is sent, so a SIGKILL loses neither."""
    database = f"sqlite:///{tmp_path / 'glaze.db'}"
    store = Store(database)
    store.upgrade()
    table = seed_generated(store, rows=200, unique_companies=100)
    enrich, env = enrich_in_a_process(tmp_path, mock, table, database)
    kill_mid_way(enrich, env, tmp_path, mock, calls=40)  # ~40 bought, over a second or more
    billed = mock.stats()["vendors"]["cheap"]
    with store.engine.connect() as connection:
        [request_id] = connection.execute(text("SELECT id FROM enrichment_requests")).scalars()
        kept = connection.execute(
            text("SELECT count(*) FROM entity_cache WHERE provider = 'cheap_company'")
        ).scalar()
    # Every call sent is on record (journalled before it left).
    from glaze_pipeline.core.requests import RequestRepository

    spend = RequestRepository(store).spend(request_id)
    assert_on_record(spend.calls, spend.cost, mock)
    # Answers reach the cache within a second of arriving: at most a second's worth (about 40
    # at 4 x 100 ms) plus those in flight are lost, where before every one of them was.
    assert billed["requests"] - 45 <= kept <= billed["requests"]
    assert kept > 0, (kept, billed)
    store.dispose()
