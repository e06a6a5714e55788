"""Executor selection by run config, and the step outputs table behind the shared IO manager."""

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dagster import DagsterInstance, ExecutorRequirement
from sqlalchemy import func, select

from glaze_pipeline.core import step_outputs
from glaze_pipeline.core.seed import LEADS_ENRICH_KEYS, LEADS_TABLE_ID, leads_column_id, seed_leads
from glaze_pipeline.core.step_outputs import StepOutputKey, StepOutputMissing, StepOutputRecord
from glaze_pipeline.core.store import Store
from glaze_pipeline.definitions import build_definitions
from glaze_pipeline.defs.executors import (
    PRELOAD,
    _requirements,
    glaze_executor,
    selected_executor,
    steps_at_once,
    with_forkserver_default,
)


def test_step_outputs_round_trip(store: Store) -> None:
    key = StepOutputKey("run-1", "enrich_entities[chunk_0]", "result")
    item = StepOutputKey("run-1", "detect_entities", "chunks", "chunk_0")
    step_outputs.save(store, key, b"first")
    step_outputs.save(store, key, b"second")  # a retried step writes again: replaced
    step_outputs.save(store, item, b"chunk")
    assert step_outputs.load(store, key) == b"second"
    assert step_outputs.load(store, item) == b"chunk"
    with pytest.raises(StepOutputMissing, match=r"detect_entities\.plan of run run-1"):
        step_outputs.load(store, StepOutputKey("run-1", "detect_entities", "plan"))

    step_outputs.save(store, StepOutputKey("run-2", "close_job", "result"), b"x")
    assert step_outputs.purge_older_than(store, timedelta(days=7)) == 0
    later = datetime.now(UTC) + timedelta(days=8)
    assert step_outputs.clear_run(store, "run-1") == 2
    assert step_outputs.purge_older_than(store, timedelta(days=7), now=later) == 1
    with store.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(StepOutputRecord)).scalar() == 0


def test_the_run_config_selects_the_executor() -> None:
    assert selected_executor({}) == "in_process"
    assert selected_executor({"execution": {"config": {"in_process": {}}}}) == "in_process"
    assert selected_executor({"execution": {"config": {"multiprocess": {}}}}) == "multiprocess"
    assert selected_executor({"execution": {"config": {"celery": {"broker": "x"}}}}) == "celery"
    # Other processes need a reconstructable job, a persistent instance, stored outputs.
    assert _requirements({"in_process": {}}) == []
    assert ExecutorRequirement.PERSISTENT_OUTPUTS in _requirements({"celery": {}})
    assert with_forkserver_default({"max_concurrent": 2}) == {
        "max_concurrent": 2,
        "start_method": {"forkserver": {"preload_modules": [PRELOAD]}},
    }
    spawn = {"start_method": {"spawn": {}}}
    assert with_forkserver_default(spawn) == spawn
    defs = build_definitions()
    assert defs.resolve_job_def("data_checks").executor_def is glaze_executor


def test_steps_at_once_is_what_the_executor_runs_side_by_side(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each step's share of a vendor's max_concurrency divides by this (defs/jobs.py)."""

    def on(config: dict) -> dict:
        return {"execution": {"config": config}}

    monkeypatch.delenv("DAGSTER_MULTIPROCESS_EXECUTOR_MAX_CONCURRENT", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert steps_at_once({}) == 1
    assert steps_at_once(on({"in_process": {}})) == 1
    assert steps_at_once(on({"celery": {"broker": "x"}})) == 1  # its pool: concurrent_steps
    assert steps_at_once(on({"multiprocess": {"max_concurrent": 3}})) == 3
    assert steps_at_once(on({"multiprocess": {}})) == 6  # Dagster's default: one per core
    assert steps_at_once(on({"multiprocess": {"max_concurrent": 0}})) == 6
    monkeypatch.setenv("DAGSTER_MULTIPROCESS_EXECUTOR_MAX_CONCURRENT", "4")
    assert steps_at_once(on({"multiprocess": None})) == 4


def test_a_run_in_process_keeps_its_outputs_in_memory(sqlite_store: Store) -> None:
    seed_leads(sqlite_store)
    job = build_definitions(sqlite_store.url).get_job_def("enrich_table")
    config = {
        "table_id": LEADS_TABLE_ID,
        "column_ids": [leads_column_id(key) for key in LEADS_ENRICH_KEYS],
    }
    with DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            run_config={"ops": {"detect_entities": {"config": config}}}, instance=instance
        )
    assert result.success
    with sqlite_store.engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(StepOutputRecord)).scalar() == 0


# What a step process does before its work, in a child of a process that imported PRELOAD:
# open its instance from the ref it is handed, reach the app database, detect a website.
_STEP_START = """
import gc, importlib, json, sys
importlib.import_module(sys.argv[1])
loaded, frozen = set(sys.modules), gc.get_freeze_count()
from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef
from dagster_postgres.run_storage import PostgresRunStorage  # a Postgres instance's
from glaze_pipeline.core.detection import company_domain
from glaze_pipeline.core.store import Store
with DagsterInstance.from_ref(InstanceRef.from_dir(sys.argv[2])) as instance:
    instance.get_runs(limit=1)
Store(sys.argv[3]).count_rows("no-such-table")
assert company_domain("https://www.acme.co.uk/about") == "acme.co.uk"
print(json.dumps({"imported": sorted(set(sys.modules) - loaded), "frozen": frozen}))
"""


def test_the_fork_server_preloads_what_a_step_imports_at_its_start(
    tmp_path: Path, postgres_url: str
) -> None:
    """A step process forked from the multiprocess executor's server (or a Celery worker's
    parent) imports no module before its work: the instance's storage, the drivers, tldextract
    came with PRELOAD (together they cost each step ~0.5 s of CPU when they did not), frozen."""
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    done = subprocess.run(
        [sys.executable, "-c", _STEP_START, PRELOAD, str(tmp_path), postgres_url],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["imported"] == []
    # And what it loaded is out of the cycle collector's sight (heap.freeze_before_fork).
    assert seen["frozen"] > 100_000
