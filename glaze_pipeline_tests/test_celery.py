"""enrich_table on two Celery workers (the `celery` executor), against the same run in process.

Real parts throughout: RabbitMQ on 127.0.0.1:5672 (GLAZE_TEST_CELERY_BROKER; the test fails if
it is down), two `glaze worker` processes with distinct node names on a queue of this test's
own, a Dagster instance with Postgres storage in a temporary DAGSTER_HOME, and Postgres for the
Glaze data. The workers reach the data and the step outputs (defs/io_manager.py) through the
database only.
"""

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    DagsterEventType,
    DagsterInstance,
    JobDefinition,
    execute_job,
    reconstructable,
)
from kombu import Connection
from sqlalchemy import select

from glaze_pipeline.bench.stack import fresh_postgres, stop_process_group
from glaze_pipeline.core.schema import GlazeRow
from glaze_pipeline.core.seed import LEADS_ENRICH_KEYS, LEADS_TABLE_ID, leads_column_id, seed_leads
from glaze_pipeline.core.step_outputs import StepOutputRecord
from glaze_pipeline.core.store import Store
from glaze_pipeline.defs.executors import glaze_executor
from glaze_pipeline_tests.conftest import PG_BASE_URL

BROKER = os.environ.get("GLAZE_TEST_CELERY_BROKER", "pyamqp://guest:guest@127.0.0.1:5672//")
WORKERS = ("alpha", "beta")
# Cells' provenance that differs between two runs of the same work.
VOLATILE_META = {"fetched_at", "request_id"}


def enrich_table_job() -> JobDefinition:
    """The Definitions' enrich_table, as it is: on glaze_executor (for `reconstructable`)."""
    from glaze_pipeline.definitions import build_definitions

    job = build_definitions().get_job_def("enrich_table")
    assert job.executor_def is glaze_executor
    return job


def job_config(**execution: Any) -> dict[str, Any]:
    # Pages of 2 rows, a chunk per page that brings a new entity: the 10 Leads rows make 5
    # enrich steps when they run side by side (multiprocess, Celery: cut to equal work, each
    # page's new entities and rows weighed), 3 in process, where at most 4 are planned
    # (`JobSettings.fan_out`), each owning its share of the entities, and the last takes the
    # rest.
    config = {
        "table_id": LEADS_TABLE_ID,
        "column_ids": [leads_column_id(key) for key in LEADS_ENRICH_KEYS],
        "chunk_size": 1,
        "page_size": 2,
    }
    run_config: dict[str, Any] = {"ops": {"detect_entities": {"config": config}}}
    if execution:
        run_config["execution"] = {"config": execution}
    return run_config


def cells(url: str) -> dict[str, tuple[dict, dict]]:
    """Each Leads row's data and meta, the meta without what differs from run to run."""
    store = Store(url)
    try:
        with store.engine.connect() as connection:
            rows = connection.execute(
                select(GlazeRow.id, GlazeRow.data, GlazeRow.meta).where(
                    GlazeRow.table_id == LEADS_TABLE_ID
                )
            ).all()
    finally:
        store.dispose()
    return {
        row_id: (
            data,
            {
                key: {k: v for k, v in cell.items() if k not in VOLATILE_META}
                for key, cell in (meta or {}).items()
            },
        )
        for row_id, data, meta in rows
    }


def differences(got: dict[str, tuple[dict, dict]], want: dict[str, tuple[dict, dict]]) -> list:
    """(row, "data" or "meta", column, got, want) for each cell that differs."""
    found = []
    for row_id in sorted(set(got) | set(want)):
        for part, name in enumerate(("data", "meta")):
            mine = got.get(row_id, ({}, {}))[part]
            theirs = want.get(row_id, ({}, {}))[part]
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    found.append((row_id, name, key, mine.get(key), theirs.get(key)))
    return found


def require_broker() -> None:
    try:
        with Connection(BROKER, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as error:  # the broker is required: fail, never skip
        pytest.fail(f"a Celery broker is required for this test ({BROKER}): {error}")


@pytest.fixture
def dagster_home(tmp_path: Path) -> Iterator[Path]:
    """A DAGSTER_HOME whose instance keeps runs and events in a throwaway Postgres database."""
    with fresh_postgres(PG_BASE_URL, migrate=False) as storage_url:
        home = tmp_path / "dagster_home"
        home.mkdir()
        # dagster-postgres NOTIFYs with a bound parameter, which psycopg 3 (SQLAlchemy 2.1's
        # default for postgresql://) sends server-side and Postgres refuses: psycopg2 it is.
        url = storage_url.replace("postgresql+psycopg://", "postgresql+psycopg2://")
        (home / "dagster.yaml").write_text(
            f"storage:\n  postgres:\n    postgres_url: {url}\ntelemetry:\n  enabled: false\n"
        )
        yield home


@pytest.fixture
def glaze_databases() -> Iterator[tuple[str, str]]:
    """Two Glaze databases seeded alike: one for the run in process, one for Celery."""
    with fresh_postgres(PG_BASE_URL) as in_process, fresh_postgres(PG_BASE_URL) as on_celery:
        for url in (in_process, on_celery):
            store = Store(url)
            seed_leads(store)
            store.dispose()
        yield in_process, on_celery


def start_workers(
    tmp_path: Path, env: dict[str, str], queue: str
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    started = []
    for name in WORKERS:
        log = tmp_path / f"worker-{name}.log"
        command = [
            *(sys.executable, "-m", "glaze_pipeline.cli", "worker"),
            *("--broker", BROKER, "-q", queue, "-n", f"{name}-{queue}@%h"),
            *("--concurrency", "1", "--loglevel", "INFO"),
        ]
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        started.append((process, log))
    deadline = time.monotonic() + 30
    for process, log in started:
        while b" ready." not in log.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
    return started


def worker_of_each_step(instance: DagsterInstance, run_id: str) -> dict[str, str]:
    """The Celery worker that ran each step: dagster-celery's task reports its hostname."""
    ran_on = {}
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        assert event is not None
        metadata = event.event_specific_data.metadata  # type: ignore[union-attr]
        if "Celery worker" in metadata:
            ran_on[str(event.step_key)] = str(metadata["Celery worker"].value)
    return ran_on


# dagster-celery registers its `execute_plan` task again for every step it submits.
@pytest.mark.filterwarnings("ignore::celery.exceptions.DuplicateTaskNameWarning")
def test_enrich_table_on_two_celery_workers(
    tmp_path: Path, dagster_home: Path, glaze_databases: tuple[str, str], monkeypatch: Any
) -> None:
    require_broker()
    in_process_url, celery_url = glaze_databases
    queue = f"glaze-test-{secrets.token_hex(4)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLAZE_", "DAGSTER_"))}
    env.update(
        DAGSTER_HOME=str(dagster_home),
        GLAZE_DATABASE_URL=celery_url,
        GLAZE_HOME=str(tmp_path / ".glaze"),
    )
    for key in [k for k in os.environ if k.startswith(("GLAZE_", "DAGSTER_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("GLAZE_HOME", str(tmp_path / ".glaze"))

    # The reference: the same job in process, on its own copy of the table.
    monkeypatch.setenv("GLAZE_DATABASE_URL", in_process_url)
    with DagsterInstance.ephemeral() as instance:
        reference = enrich_table_job().execute_in_process(
            run_config=job_config(), instance=instance
        )
    assert reference.success
    chunk_steps = {
        event.step_key
        for event in reference.all_events
        if event.step_key and event.step_key.startswith("enrich_entities[")
    }
    assert len(chunk_steps) == 3  # in process: at most IN_PROCESS_CHUNKS

    monkeypatch.setenv("GLAZE_DATABASE_URL", celery_url)
    workers = start_workers(tmp_path, env, queue)
    try:
        celery = {
            "broker": BROKER,
            "backend": "rpc://",
            "config_source": {"task_default_queue": queue},
        }
        with DagsterInstance.from_config(str(dagster_home)) as instance:
            started = time.monotonic()
            with execute_job(
                reconstructable(enrich_table_job), instance, run_config=job_config(celery=celery)
            ) as result:
                wall = time.monotonic() - started
                assert result.success, [
                    str(e.event_specific_data) for e in result.all_events if e.is_failure
                ]
                ran_on = worker_of_each_step(instance, result.run_id)
    finally:
        for process, _log in workers:
            stop_process_group(process, timeout_s=10)
        with Connection(BROKER) as connection:
            connection.default_channel.queue_delete(queue)

    print(f"celery run: {wall:.1f}s wall, steps on {sorted(set(ran_on.values()))}")
    # Every step ran on a worker, the 5 chunks (side by side, spans of equal work) on both.
    celery_chunks = {step for step in ran_on if step.startswith("enrich_entities[")}
    assert set(ran_on) == {"detect_entities", "apply_results", "close_job", *celery_chunks}
    assert len(celery_chunks) == 5
    chunk_workers = {ran_on[step].partition("-")[0] for step in celery_chunks}
    assert chunk_workers == set(WORKERS)
    # The same cells, values and provenance as the run in process (3 spans, not 5).
    assert differences(cells(celery_url), cells(in_process_url)) == []
    # The steps handed their outputs over through the database, one row per output.
    store = Store(celery_url)
    try:
        with store.engine.connect() as connection:
            handed = connection.execute(
                select(StepOutputRecord.step_key).where(StepOutputRecord.run_id == result.run_id)
            ).scalars()
            assert set(handed) == set(ran_on)
    finally:
        store.dispose()


def test_enrich_table_multiprocess_on_the_embedded_default(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Every core of one machine, on SQLite (the default): each step in its own process (the
    forkserver, preloaded), the outputs handed over through the `step_outputs` table."""
    for key in [k for k in os.environ if k.startswith(("GLAZE_", "DAGSTER_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("GLAZE_HOME", str(tmp_path / ".glaze"))
    urls = {name: f"sqlite:///{tmp_path / name}.db" for name in ("in_process", "multiprocess")}
    for url in urls.values():
        store = Store(url)
        store.upgrade()
        seed_leads(store)
        store.dispose()

    monkeypatch.setenv("GLAZE_DATABASE_URL", urls["in_process"])
    with DagsterInstance.ephemeral() as instance:
        reference = enrich_table_job().execute_in_process(
            run_config=job_config(), instance=instance
        )
        assert reference.success

    monkeypatch.setenv("GLAZE_DATABASE_URL", urls["multiprocess"])
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with (
        DagsterInstance.from_config(str(home)) as instance,
        execute_job(
            reconstructable(enrich_table_job),
            instance,
            run_config=job_config(multiprocess={"max_concurrent": 2}),
        ) as result,
    ):
        assert result.success
        run_id = result.run_id
        started = [
            record.dagster_event.pid
            for record in instance.all_logs(run_id, of_type=DagsterEventType.STEP_START)
            if record.dagster_event is not None
        ]
    assert len(set(started)) == len(started) == 8  # a process per step: 5 of them chunks

    assert differences(cells(urls["multiprocess"]), cells(urls["in_process"])) == []
    store = Store(urls["multiprocess"])
    try:
        with store.engine.connect() as connection:
            handed = connection.execute(
                select(StepOutputRecord.step_key).where(StepOutputRecord.run_id == run_id)
            ).scalars()
            assert "detect_entities" in set(handed)
    finally:
        store.dispose()
