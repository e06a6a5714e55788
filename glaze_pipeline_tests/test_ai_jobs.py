"""The AI jobs in Dagster: launched like enrichment, retried when worth it, cancelled at once.

Each job runs in process against the mock LLM over real HTTP (the `LanguageModel` resource
pointed at it), on SQLite and Postgres; progress is heard on real Redis.
"""

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dagster import (
    DagsterEventType,
    DagsterInstance,
    Definitions,
    RunRequest,
    SensorResult,
    build_sensor_context,
    validate_run_config,
)

from glaze_pipeline.core import queue
from glaze_pipeline.core.ai.accept import ProposalNotAcceptableError, accept_proposal
from glaze_pipeline.core.ai.workflow import AI_JOBS, enqueue_ai
from glaze_pipeline.core.errors import InputError, UnknownTableError
from glaze_pipeline.core.models import AI_REQUEST_KINDS, RequestKind
from glaze_pipeline.core.requests import RequestRepository
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.store import Store
from glaze_pipeline.definitions import defs
from glaze_pipeline.defs.ai_jobs import AI_JOB_DEFS, run_ai_in_process
from glaze_pipeline.defs.resources import GlazeDatabase, LanguageModel, ProgressChannel
from glaze_pipeline.defs.sensors import enrichment_queue_sensor
from glaze_pipeline.launcher import Launcher, fork_launch
from glaze_pipeline.testing.mock_llm import MockLlmServer
from glaze_pipeline_tests.provider_helpers import wait_until
from glaze_pipeline_tests.test_ai_workflow import CONTEXT, attempts, companies_table, llm
from glaze_pipeline_tests.test_launcher import insert_request
from glaze_pipeline_tests.test_progress import channel, finished, listening
from glaze_pipeline_tests.test_queue import columns

__all__ = ["channel", "llm"]  # fixtures shared with the modules they come from


def ai_job(
    store: Store, llm: MockLlmServer, name: str, progress: ProgressChannel | None = None
) -> Any:
    """One AI job bound to this store, the mock LLM and a progress channel."""
    return Definitions(
        jobs=AI_JOB_DEFS,
        resources={
            "glaze_db": GlazeDatabase(url=store.url),
            "llm": LanguageModel(base_url=llm.url),
            "progress": progress or ProgressChannel(),
        },
    ).get_job_def(name)


def claimed(store: Store) -> queue.Launchable:
    [item], rejected = queue.claim_launchable(store, limit=1)
    assert rejected == []
    return item


def execute(
    store: Store,
    llm: MockLlmServer,
    item: queue.Launchable,
    instance: DagsterInstance,
    progress: ProgressChannel | None = None,
) -> Any:
    """Run a claimed request's job as the sensor would launch it."""
    return ai_job(store, llm, item.job_name, progress).execute_in_process(
        run_config=item.run_config, instance=instance, tags=item.tags, raise_on_error=False
    )


def output_metadata(result: Any) -> dict[str, Any]:
    """The metadata of the job's last output: what the run reports in the Dagster UI."""
    outputs = [e for e in result.all_events if e.event_type is DagsterEventType.STEP_OUTPUT]
    metadata = outputs[-1].event_specific_data.metadata
    return {key: value.value for key, value in metadata.items()}


def proposal_of(store: Store, request_id: str) -> dict[str, Any]:
    result = store.get_request(request_id).result
    assert result is not None
    return result


def retries(result: Any) -> int:
    return sum(1 for e in result.all_events if e.event_type is DagsterEventType.STEP_UP_FOR_RETRY)


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with DagsterInstance.ephemeral() as ephemeral:
        yield ephemeral


# --- definitions and launching -----------------------------------------------------------------


def test_the_definitions_hold_every_ai_job_with_its_first_op() -> None:
    Definitions.validate_loadable(defs)
    # Run configs written outside the code (Launchpad, scripts) name these: they stay put.
    assert AI_JOBS == {
        RequestKind.TABLE_SUGGESTIONS: ("table_suggestions", "propose_table"),
        RequestKind.COLUMN_SUGGESTIONS: ("column_suggestions", "propose_columns"),
        RequestKind.ROW_SUGGESTIONS: ("row_suggestions", "propose_rows"),
        RequestKind.TABLE_GENERATION: ("table_generation", "generate_table"),
    }
    for kind in AI_REQUEST_KINDS:
        job_name, op_name = AI_JOBS[kind]
        job = defs.get_job_def(job_name)
        assert op_name in {node.name for node in job.nodes}
    generation = defs.get_job_def("table_generation")
    assert {node.name for node in generation.nodes} == {
        "generate_table",
        "generate_columns",
        "generate_rows",
    }
    assert {t.job_name for t in enrichment_queue_sensor.targets} == {
        "enrich_table",
        *(name for name, _ in AI_JOBS.values()),
    }


def test_the_sensor_launches_each_request_with_its_own_job(store: Store) -> None:
    enrich_table = seed_generated(store, rows=3, unique_companies=2)
    enrich = queue.enqueue(store, enrich_table.id, columns(enrich_table, "industry"))
    table = companies_table(store)
    ai = {
        "table_suggestions": enqueue_ai(store, RequestKind.TABLE_SUGGESTIONS, CONTEXT),
        "column_suggestions": enqueue_ai(
            store, RequestKind.COLUMN_SUGGESTIONS, CONTEXT, table_id=table.id
        ),
        "row_suggestions": enqueue_ai(
            store, RequestKind.ROW_SUGGESTIONS, CONTEXT, table_id=table.id, count=5
        ),
        "table_generation": enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT),
    }
    bad = insert_request(store, "tbl_x", '{"context": ""}', "table_generation")
    resources = {"glaze_db": GlazeDatabase(url=store.url), "progress": ProgressChannel()}
    with (
        DagsterInstance.ephemeral() as instance,
        build_sensor_context(instance=instance, resources=resources) as context,
    ):
        result = enrichment_queue_sensor(context)
    assert isinstance(result, SensorResult) and result.run_requests is not None
    runs = {run.run_key: run for run in result.run_requests}
    assert set(runs) == {enrich, *(e.request_id for e in ai.values())}
    assert runs[enrich].job_name == "enrich_table"
    assert runs[enrich].run_config["ops"]["detect_entities"]["config"]["request_id"] == enrich
    for job_name, enqueued in ai.items():
        run = runs[enqueued.request_id]
        assert isinstance(run, RunRequest) and run.job_name == job_name
        assert run.tags["glaze/kind"] == job_name and run.tags["glaze/table"] == enqueued.table_id
        [(op_name, op)] = run.run_config["ops"].items()
        assert op_name == AI_JOBS[RequestKind(job_name)][1]
        assert op["config"]["request_id"] == enqueued.request_id
        assert validate_run_config(defs.get_job_def(job_name), run.run_config)
    assert store.get_request(bad).status == "failed"
    assert "context is empty" in (store.get_request(bad).error or "")


# --- each operation as a job ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "steps"),
    [
        (RequestKind.TABLE_SUGGESTIONS, ["table"]),
        (RequestKind.COLUMN_SUGGESTIONS, ["columns"]),
        (RequestKind.ROW_SUGGESTIONS, ["rows"]),
        (RequestKind.TABLE_GENERATION, ["table", "columns", "rows"]),
    ],
)
def test_each_operation_runs_as_a_job(
    store: Store,
    llm: MockLlmServer,
    instance: DagsterInstance,
    channel: ProgressChannel,
    redis_url: str,
    kind: RequestKind,
    steps: list[str],
) -> None:
    table = companies_table(store)
    per_kind: dict[RequestKind, dict[str, Any]] = {
        RequestKind.COLUMN_SUGGESTIONS: {"table_id": table.id},
        RequestKind.ROW_SUGGESTIONS: {"table_id": table.id, "count": 4},
        RequestKind.TABLE_GENERATION: {"count": 4},
    }
    options = per_kind.get(kind, {})
    enqueued = enqueue_ai(store, kind, CONTEXT, **options)
    item = claimed(store)
    with listening(redis_url, channel.request_channel(enqueued.request_id)) as ear:
        result = execute(store, llm, item, instance, channel)
        messages = [body for _, body in ear.received()]
    assert result.success
    request = store.get_request(enqueued.request_id)
    assert (request.status, request.run_id) == ("succeeded", result.run_id)
    assert (request.entities, request.entities_done) == (len(steps), len(steps))
    proposal = proposal_of(store, request.id)
    assert set(proposal["promptVersions"]) == set(steps)
    assert (proposal["table"] is not None) == ("table" in steps)
    assert bool(proposal["rows"]) == ("rows" in steps)
    if "columns" in steps:
        assert proposal["columns"]
    # Token usage and cost: on the request and in the run's metadata.
    usage = store.llm_usage(request.id)
    assert usage.calls == len(steps) == llm.stats()["requests"]
    metadata = output_metadata(result)
    assert metadata["prompt_tokens"] == usage.prompt_tokens == llm.stats()["prompt_tokens"]
    assert metadata["completion_tokens"] == usage.completion_tokens
    assert metadata["llm_calls"] == len(steps) and metadata["cost"] == request.cost
    assert metadata["prompt_versions"] == proposal["promptVersions"]
    run = instance.get_run_by_id(result.run_id)
    assert run is not None and run.tags["glaze/outcome"] == "succeeded"
    # Realtime: started, one progress per step, finished.
    events = [m["event"] for m in messages]
    assert events == ["started", *(["progress"] * len(steps)), "finished"]
    assert [m["phase"] for m in messages if m["event"] == "progress"] == steps
    [end] = finished([(None, m) for m in messages])
    assert end["status"] == "succeeded" and end["progress"] == 100


def test_a_run_without_a_request_records_one(
    store: Store, llm: MockLlmServer, instance: DagsterInstance
) -> None:
    """The Launchpad or `dagster job execute`: the run records its own request."""
    job = ai_job(store, llm, "table_generation")
    result = job.execute_in_process(
        run_config={"ops": {"generate_table": {"config": {"context": CONTEXT, "count": 3}}}},
        instance=instance,
        raise_on_error=False,
    )
    assert result.success
    request_id = store.request_for_run(result.run_id)
    assert request_id is not None
    request = store.get_request(request_id)
    assert (request.kind, request.status) == ("table_generation", "succeeded")
    assert request.selection == {"context": CONTEXT, "count": 3}
    assert len(proposal_of(store, request_id)["rows"]) == 3
    with pytest.raises(UnknownTableError):
        store.get_table(request.table_id)  # reserved until accepted
    # Column suggestions need a table: refused before any request or LLM call.
    refused = ai_job(store, llm, "column_suggestions").execute_in_process(
        run_config={"ops": {"propose_columns": {"config": {"context": CONTEXT}}}},
        instance=instance,
        raise_on_error=False,
    )
    assert not refused.success
    assert llm.stats()["requests"] == 3
    assert len(RequestRepository(store).for_table(request.table_id)[0]) == 1


# --- retries and failures ------------------------------------------------------------------------


def test_a_retryable_failure_retries_the_step(
    store: Store, llm: MockLlmServer, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client tries once (GLAZE_LLM_MAX_ATTEMPTS=1), so the 500 reaches the step: Dagster
    retries it and the request, left running meanwhile, succeeds."""
    monkeypatch.setenv("GLAZE_LLM_MAX_ATTEMPTS", "1")
    llm.faults([{"mode": "error", "operation": "column_suggestions"}])
    enqueued = enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT, count=2)
    result = execute(store, llm, claimed(store), instance)
    assert result.success and retries(result) == 1
    request = store.get_request(enqueued.request_id)
    assert request.status == "succeeded" and len(proposal_of(store, request.id)["rows"]) == 2
    assert attempts(store, request.id) == [
        ("table_suggestions", "ok"),
        ("column_suggestions", "failed"),
        ("column_suggestions", "ok"),
        ("row_suggestions", "ok"),
    ]
    assert llm.stats()["by_operation"] == {
        "table_suggestions": 1,  # the table step is not asked again
        "column_suggestions": 2,
        "row_suggestions": 1,
    }


def test_a_non_retryable_failure_fails_the_request_at_once(
    store: Store, llm: MockLlmServer, instance: DagsterInstance
) -> None:
    llm.faults([{"mode": "unauthorized"}])
    enqueued = enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT)
    result = execute(store, llm, claimed(store), instance)
    assert not result.success and retries(result) == 0
    request = store.get_request(enqueued.request_id)
    assert request.status == "failed"
    assert "HTTP 401" in (request.error or "") and "GLAZE_LLM_API_KEY" in (request.error or "")
    assert llm.stats()["requests"] == 1  # neither the client nor Dagster tried again
    assert request.result is None


def test_retries_spent_fail_the_request_with_the_llm_s_reason(
    sqlite_store: Store,
    llm: MockLlmServer,
    instance: DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GLAZE_LLM_MAX_ATTEMPTS", "1")
    llm.faults([{"mode": "error", "times": 5}])
    enqueued = enqueue_ai(sqlite_store, RequestKind.TABLE_SUGGESTIONS, CONTEXT)
    result = execute(sqlite_store, llm, claimed(sqlite_store), instance)
    assert not result.success and retries(result) == 2
    request = sqlite_store.get_request(enqueued.request_id)
    assert request.status == "failed" and "HTTP 500" in (request.error or "")
    assert llm.stats()["requests"] == 3


def test_an_llm_that_is_not_configured_fails_the_request_naming_the_setting(
    store: Store, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GLAZE_LLM_BASE_URL", raising=False)
    enqueued = enqueue_ai(store, RequestKind.TABLE_SUGGESTIONS, CONTEXT)
    item = claimed(store)
    job = Definitions(
        jobs=AI_JOB_DEFS,
        resources={
            "glaze_db": GlazeDatabase(url=store.url),
            "llm": LanguageModel(),
            "progress": ProgressChannel(),
        },
    ).get_job_def(item.job_name)
    result = job.execute_in_process(
        run_config=item.run_config, instance=instance, raise_on_error=False
    )
    assert not result.success and retries(result) == 0
    request = store.get_request(enqueued.request_id)
    assert request.status == "failed" and "GLAZE_LLM_BASE_URL" in (request.error or "")


# --- cancel ---------------------------------------------------------------------------------------


def test_a_cancel_stops_the_job_within_seconds_and_nothing_can_be_accepted(
    store: Store, llm: MockLlmServer, instance: DagsterInstance
) -> None:
    llm.faults([{"mode": "hang", "timeout_s": 60, "operation": "column_suggestions"}])
    enqueued = enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT)
    item = claimed(store)
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(execute(store, llm, item, instance)))
    worker.start()
    assert wait_until(lambda: llm.stats()["requests"] == 2, timeout_s=20)  # hung on columns
    cancelled_at = time.monotonic()
    queue.request_cancel(store, enqueued.request_id)
    worker.join(timeout=15)
    assert not worker.is_alive()
    assert time.monotonic() - cancelled_at < 5
    [result] = results
    assert not result.success and retries(result) == 0
    request = store.get_request(enqueued.request_id)
    assert request.status == "cancelled" and "cancelled by the user" in (request.error or "")
    assert llm.stats()["by_operation"] == {"table_suggestions": 1, "column_suggestions": 1}
    with pytest.raises(ProposalNotAcceptableError, match="cancelled"):
        accept_proposal(store, enqueued.request_id)
    with pytest.raises(UnknownTableError):
        store.get_table(enqueued.table_id)


# --- in process (the CLI) --------------------------------------------------------------------------


def test_run_ai_in_process_claims_runs_and_never_runs_twice(
    store: Store, llm: MockLlmServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv("GLAZE_LLM_BASE_URL", llm.url)
    table = companies_table(store)
    enqueued = enqueue_ai(store, RequestKind.ROW_SUGGESTIONS, CONTEXT, table_id=table.id, count=3)
    request = run_ai_in_process(store.url, enqueued.request_id, log_level="WARNING")
    assert request.status == "succeeded" and len(proposal_of(store, request.id)["rows"]) == 3
    with pytest.raises(InputError, match="is succeeded, not queued"):
        run_ai_in_process(store.url, enqueued.request_id)
    broken = insert_request(store, table.id, '{"context": "x"}', "row_suggestions")
    with pytest.raises(InputError, match="needs a count"):
        run_ai_in_process(store.url, broken)
    assert store.get_request(broken).status == "failed"
    assert llm.stats()["requests"] == 1


def test_the_fork_launcher_runs_an_ai_request_with_its_job(
    store: Store, llm: MockLlmServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv("GLAZE_LLM_BASE_URL", llm.url)
    enqueued = enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT, count=2)
    starter = fork_launch(store.url, max_runs=1)
    try:
        assert Launcher(store, starter.launch, capacity=starter.capacity).launch_pending() == 1
        assert wait_until(
            lambda: store.get_request(enqueued.request_id).status == "succeeded", timeout_s=60
        ), store.get_request(enqueued.request_id).error
    finally:
        starter.close()
    request = store.get_request(enqueued.request_id)
    with DagsterInstance.get() as instance:
        run = instance.get_run_by_id(request.run_id or "")
        assert run is not None and run.job_name == "table_generation"
    assert llm.stats()["requests"] == 3
