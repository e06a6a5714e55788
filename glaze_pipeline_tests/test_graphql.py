"""The app's launch path: GraphQL against a real `dagster-webserver` and `dagster-daemon`.

Both run as subprocesses on loopback with a throwaway DAGSTER_HOME (a copy of the repo's
dagster.yaml) and the test Postgres as the app database. The daemon is needed: with no
`run_coordinator` in dagster.yaml, Dagster 1.13 queues runs (`launchRun` answers QUEUED and the
daemon starts them, about every 5 s), and it runs the queue sensors and the reconciler, which
must leave a GraphQL-launched request alone. Unions the server cannot be made to return here
(PythonError, UnauthorizedError, RunConflict, ...) are checked over an injected transport.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from dagster import DagsterInstance
from sqlalchemy import text

from glaze_pipeline.bench.stack import free_port
from glaze_pipeline.core.seed import LEADS_TABLE_ID, leads_column_id, leads_row_id, seed_leads
from glaze_pipeline.core.store import Store, utcnow
from glaze_pipeline.graphql_client import (
    DEFAULT_REPOSITORY,
    LAUNCH_RUN_MUTATION,
    RUN_STATUS_QUERY,
    RUNS_BY_TAGS_QUERY,
    TERMINATE_RUN_MUTATION,
    WORKSPACE_QUERY,
    CodeLocationError,
    DagsterGraphQLClient,
    DagsterGraphQLError,
    DagsterPythonError,
    GraphQLQueryError,
    GraphQLTransportError,
    InvalidSubsetError,
    JobNotFoundError,
    RunConfigInvalidError,
    RunConflictError,
    RunLaunchError,
    RunNotFoundError,
    RunStatus,
    UnauthorizedError,
    enrich_tags,
)
from glaze_pipeline_tests.conftest import APP_TABLES

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
LOCATION = "glaze_pipeline.definitions"  # what `-m glaze_pipeline.definitions` names it
STARTUP_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 45.0


@dataclass(frozen=True)
class DagsterServer:
    url: str
    home: Path


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group we started (gRPC code servers are children), then SIGKILL."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        # Whatever is left of the group (a stuck leader, an orphaned code server or run worker).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@pytest.fixture(scope="module")
def dagster_server(
    postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DagsterServer]:
    """dagster-webserver + dagster-daemon for this module, stopped whatever happens."""
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    # Create the instance's SQLite storage once here: the webserver and the daemon both
    # creating it at the same moment race ("table alembic_version already exists").
    with DagsterInstance.from_config(str(home)):
        pass
    # The daemon's queue sensor would launch any queued request another test left behind.
    store = Store(postgres_url)
    with store.engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(APP_TABLES)} CASCADE"))
    store.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLAZE_", "DAGSTER_"))}
    env.update(
        DAGSTER_HOME=str(home), GLAZE_DATABASE_URL=postgres_url, GLAZE_HOME=str(home / ".glaze")
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    commands = {
        "webserver": [
            str(BIN / "dagster-webserver"),
            *("-m", "glaze_pipeline.definitions", "-h", "127.0.0.1", "-p", str(port)),
        ],
        "daemon": [str(BIN / "dagster-daemon"), "run", "-m", "glaze_pipeline.definitions"],
    }
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name, command in commands.items():
            with (home / f"{name}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        command,
                        cwd=home,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group, so stop() gets all
                    )
                )
        wait_until_ready(url, home, processes)
        yield DagsterServer(url, home)
    finally:
        stop(processes)


def wait_until_ready(url: str, home: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """/server_info answers, then the code location has loaded (it may still be LOADING)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error: Exception | None = None
    with httpx.Client(timeout=2.0) as http, DagsterGraphQLClient(url) as client:
        while time.monotonic() < deadline:
            if any(process.poll() is not None for process in processes):
                break
            try:
                http.get(f"{url}/server_info").raise_for_status()
                client.locate_job("enrich_table")
                return
            except (httpx.HTTPError, DagsterGraphQLError) as error:
                last_error = error
                time.sleep(0.25)
    pytest.fail(
        f"dagster webserver/daemon not ready ({last_error}):\n"
        f"{log_tail(home / 'webserver.log')}\n{log_tail(home / 'daemon.log')}"
    )


@pytest.fixture
def client(dagster_server: DagsterServer) -> Iterator[DagsterGraphQLClient]:
    with DagsterGraphQLClient(dagster_server.url, timeout=30.0) as client:
        yield client


def leads_request(store: Store, column_keys: list[str], row_ids: list[str]) -> dict[str, Any]:
    """Seed tbl_leads and record a request as the app does before launching its run.

    `launched`, not `queued` (the queue sensor would launch it too), with `launched_at`: the
    reconciler re-queues a launched request that has no run tagged with its id for 60 s.
    """
    seed_leads(store)
    column_ids = [leads_column_id(key) for key in column_keys]
    request_id = store.create_request(
        table_id=LEADS_TABLE_ID,
        selection={"column_ids": column_ids, "row_ids": row_ids},
        status="launched",
        launched_at=utcnow(),
    )
    return {
        "table_id": LEADS_TABLE_ID,
        "column_ids": column_ids,
        "row_ids": row_ids,
        "request_id": request_id,
        "concurrency": 20,
    }


def test_the_job_is_found_in_the_workspace(client: DagsterGraphQLClient) -> None:
    location = client.locate_job("enrich_table")
    assert (location.location_name, location.repository_name) == (LOCATION, DEFAULT_REPOSITORY)
    with pytest.raises(JobNotFoundError, match=r"no code location has job __repository__\.nope"):
        client.locate_job("nope")


def test_launch_enrich_fills_the_cells_and_serves_the_request(
    client: DagsterGraphQLClient, dagster_server: DagsterServer, pg_store: Store
) -> None:
    # Every row but row 8, which has no identifier at all (it would end the request partial).
    rows = [leads_row_id(i) for i in range(10) if i != 7]
    op_config = leads_request(pg_store, ["industry", "title"], rows)
    request_id = op_config["request_id"]

    run_id = client.launch_enrich(op_config, tags={"glaze/origin": "test"})

    assert client.wait(run_id, timeout_s=RUN_TIMEOUT_S, poll_s=0.25) == RunStatus.SUCCESS
    request = pg_store.get_request(request_id)
    assert request.status == "succeeded", request.error
    assert request.run_id == run_id
    assert request.cells_total == request.cells_done == 18
    assert request.rows_written == 9 and request.entities > 0
    assert request.finished_at is not None
    for row in pg_store.rows_in_order(LEADS_TABLE_ID):
        selected = row.id in rows
        assert bool(row.data["industry"] and row.data["title"]) is selected, row
        assert (row.meta.get("industry", {}).get("status") == "done") is selected, row
    with DagsterInstance.from_config(str(dagster_server.home)) as instance:
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.job_name == "enrich_table"
        assert run.tags["glaze/table"] == LEADS_TABLE_ID
        assert run.tags["glaze/request"] == request_id
        assert run.tags["glaze/kind"] == "enrich"
        assert run.tags["glaze/origin"] == "test"
    assert [run.run_id for run in client.find_runs({"glaze/request": request_id})] == [run_id]

    # A finished run cannot be terminated: the server says so, the client reports it.
    termination = client.terminate(run_id)
    assert not termination.accepted and termination.status == RunStatus.SUCCESS
    assert termination.message is not None and "could not be terminated" in termination.message


def test_invalid_config_is_a_typed_error_naming_the_problem(client: DagsterGraphQLClient) -> None:
    with pytest.raises(RunConfigInvalidError) as unknown:
        client.launch_enrich({"table_id": LEADS_TABLE_ID, "whole_table": True, "colums": ["x"]})
    assert [error.reason for error in unknown.value.errors] == ["FIELD_NOT_DEFINED"]
    assert 'unexpected config entry "colums"' in str(unknown.value)
    assert unknown.value.job_name == "enrich_table"

    with pytest.raises(RunConfigInvalidError) as missing:
        client.launch_enrich({"whole_table": True})
    assert [error.reason for error in missing.value.errors] == ["MISSING_REQUIRED_FIELD"]
    assert 'Missing required config entry "table_id"' in str(missing.value)

    with pytest.raises(RunConfigInvalidError, match="budget"):
        client.launch_enrich({"table_id": LEADS_TABLE_ID, "whole_table": True, "budget": "lots"})


def test_wrong_location_or_job_is_named(client: DagsterGraphQLClient) -> None:
    config = {"table_id": LEADS_TABLE_ID, "whole_table": True}
    with pytest.raises(JobNotFoundError, match="location 'elsewhere'"):
        client.launch_enrich(config, repository_location_name="elsewhere")
    with pytest.raises(JobNotFoundError, match="repository 'repo'"):
        client.launch_enrich(config, repository_location_name=LOCATION, repository_name="repo")
    with pytest.raises(JobNotFoundError, match="no code location has job"):
        client.launch_run("no_such_job", {})


def test_terminate_a_run_just_launched(client: DagsterGraphQLClient, pg_store: Store) -> None:
    op_config = leads_request(pg_store, ["industry"], [leads_row_id(0)])

    run_id = client.launch_enrich(op_config)
    termination = client.terminate(run_id)

    final = client.wait(run_id, timeout_s=RUN_TIMEOUT_S, poll_s=0.25)
    if termination.accepted:
        # Still QUEUED (the daemon dequeues every few seconds): cancelled on the spot.
        assert final == RunStatus.CANCELED
    else:
        # Not cancelable at that moment: STARTING (an instance without a queue launches at
        # once, and Dagster refuses to cancel a STARTING run) or already finished.
        assert termination.message is not None
        assert f"having status {termination.status.value}" in termination.message
    again = client.terminate(run_id)
    assert not again.accepted and again.status == final
    with pytest.raises(RunNotFoundError, match="could not be found"):
        client.terminate("00000000-0000-0000-0000-000000000000")
    with pytest.raises(RunNotFoundError):
        client.run_status("00000000-0000-0000-0000-000000000000")


def test_the_graphql_endpoint_itself_is_accepted(dagster_server: DagsterServer) -> None:
    with DagsterGraphQLClient(f"{dagster_server.url}/graphql/") as client:
        assert client.endpoint == f"{dagster_server.url}/graphql"
        assert client.find_runs({"glaze/request": "req_none"}) == []


def test_the_docs_show_the_documents_verbatim() -> None:
    docs = (REPO / "docs" / "graphql.md").read_text()
    for document in (
        WORKSPACE_QUERY,
        LAUNCH_RUN_MUTATION,
        RUN_STATUS_QUERY,
        TERMINATE_RUN_MUTATION,
        RUNS_BY_TAGS_QUERY,
    ):
        assert f"```graphql\n{document}\n```" in docs, document.splitlines()[0]


def test_an_unreachable_webserver_is_a_transport_error() -> None:
    with (
        DagsterGraphQLClient(f"http://127.0.0.1:{free_port()}", timeout=2.0) as client,
        pytest.raises(GraphQLTransportError, match="cannot reach"),
    ):
        client.run_status("any")


def test_enrich_tags_follow_the_queue_sensor() -> None:
    assert enrich_tags({"table_id": "t", "request_id": "r"}) == {
        "glaze/kind": "enrich",
        "glaze/table": "t",
        "glaze/enrich-table": "t",
        "glaze/request": "r",
    }
    # Only enrich runs take the per-table concurrency slot.
    assert enrich_tags({"table_id": "t", "kind": "pre_enrich"}) == {
        "glaze/kind": "pre_enrich",
        "glaze/table": "t",
    }


# -- union members a local server cannot be made to return, over an injected transport ---


def answering(payload: dict[str, Any], status_code: int = 200) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["query"].lstrip().startswith(("mutation", "query"))
        return httpx.Response(status_code, json=payload)

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    ("result", "error_type", "text"),
    [
        (
            {"__typename": "PythonError", "message": "boom\n", "className": "X", "stack": []},
            DagsterPythonError,
            "the Dagster server raised: boom",
        ),
        ({"__typename": "UnauthorizedError", "message": "no"}, UnauthorizedError, "no"),
        ({"__typename": "RunConflict", "message": "exists"}, RunConflictError, "exists"),
        ({"__typename": "InvalidSubsetError", "message": "ops"}, InvalidSubsetError, "ops"),
        ({"__typename": "InvalidStepError", "invalidStepKey": "s"}, RunLaunchError, "'s'"),
        (
            {"__typename": "NoModeProvidedError", "message": "mode", "pipelineName": "j"},
            RunLaunchError,
            "NoModeProvidedError: mode",
        ),
    ],
)
def test_every_launch_result_maps_to_a_typed_error(
    result: dict[str, Any], error_type: type[Exception], text: str
) -> None:
    transport = answering({"data": {"launchRun": result}})
    with (
        DagsterGraphQLClient(transport=transport) as client,
        pytest.raises(error_type, match=text),
    ):
        client.launch_enrich({"table_id": "t"}, repository_location_name=LOCATION)


def test_graphql_errors_and_bad_answers_are_named() -> None:
    errors = answering({"data": None, "errors": [{"message": "Cannot query field"}]}, 400)
    with (
        DagsterGraphQLClient(transport=errors) as client,
        pytest.raises(GraphQLQueryError, match="Cannot query field"),
    ):
        client.run_status("r")
    html = httpx.MockTransport(lambda _: httpx.Response(502, text="<html>bad gateway</html>"))
    with (
        DagsterGraphQLClient(transport=html) as client,
        pytest.raises(GraphQLTransportError, match="HTTP 502"),
    ):
        client.run_status("r")


def test_a_location_that_failed_to_load_is_reported() -> None:
    workspace = {
        "__typename": "Workspace",
        "locationEntries": [
            {
                "name": LOCATION,
                "loadStatus": "LOADED",
                "locationOrLoadError": {"__typename": "PythonError", "message": "ImportError"},
            }
        ],
    }
    transport = answering({"data": {"workspaceOrError": workspace}})
    with (
        DagsterGraphQLClient(transport=transport) as client,
        pytest.raises(CodeLocationError, match=f"location {LOCATION} failed to load: ImportError"),
    ):
        client.launch_enrich({"table_id": "t"})
