"""The app's launch path: GraphQL against a real `dagster dev`, and docs/graphql.md run as written.

`dagster dev` is started by the doc's own setup block (`export DAGSTER_HOME=$PWD`, `glaze seed`,
`dagster dev`) in a throwaway folder laid out like the repo root (its `pyproject.toml`, which
names the code location, its `dagster.yaml`, and `.venv`), so the location, the instance and the
app database are what a user gets. The launch tests share one such server on the test Postgres;
the docs test runs the doc's shell blocks top to bottom in one `bash` against it and against a
second one on the embedded SQLite default. Unions the server cannot be made to return here
(PythonError, UnauthorizedError, RunConflict, ...) are checked over an injected transport.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dagster import DagsterInstance, RunsFilter
from sqlalchemy import text
from sqlalchemy.engine import make_url

from glaze_pipeline.bench.stack import free_port
from glaze_pipeline.core.seed import (
    LEADS_TABLE_ID,
    leads_column_id,
    leads_row_id,
    seed_generated,
    seed_leads,
)
from glaze_pipeline.core.store import Store
from glaze_pipeline.graphql_client import (
    DEFAULT_REPOSITORY,
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
from glaze_pipeline_tests.test_pre_enrich_schedule import app_state

# dagster-graphql 1.13 calls gql 4 the old way (`execute(..., variable_values=...)`), which gql
# deprecates on every call with variables: the library's business, not a failure here.
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "graphql.md"
DOCUMENTS = REPO / "glaze_pipeline" / "graphql"  # the raw GraphQL the doc's commands send
# What `dagster dev` names the location: pyproject.toml's [tool.dagster], not workspace.yaml.
LOCATION = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"][
    "code_location_name"
]
DOC_PORT = "3000"  # the port the doc's commands use; each server here gets a free one
STARTUP_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 45.0


@dataclass(frozen=True)
class DagsterServer:
    url: str
    home: Path  # the folder `dagster dev` runs in: DAGSTER_HOME and the "repo root"
    env: dict[str, str]
    port: int


@dataclass(frozen=True)
class Block:
    """A fenced block of the doc: ```bash, ```bash sqlite (only on SQLite), ```json, ..."""

    info: str
    text: str

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info else ""

    @property
    def only_on(self) -> str | None:
        words = self.info.split()
        return words[1] if len(words) > 1 else None

    @property
    def file(self) -> str | None:
        """The document file a ```graphql block shows, relative to the repo root."""
        words = self.info.split()
        return words[1] if self.language == "graphql" and len(words) > 1 else None


def doc_blocks() -> list[Block]:
    fences = re.finditer(r"^```([^\n]*)\n(.*?)^```$", DOC.read_text(), re.MULTILINE | re.DOTALL)
    return [Block(match.group(1).strip(), match.group(2)) for match in fences]


def setup_block() -> Block:
    """The doc's "What must be running" block: the first shell block, ending in `dagster dev`."""
    block = next(block for block in doc_blocks() if block.language == "bash")
    assert "dagster dev" in block.text, block.text
    return block


def on_port(command: str, port: int) -> str:
    return command.replace(f"127.0.0.1:{DOC_PORT}", f"127.0.0.1:{port}").replace(
        f"dagster dev -p {DOC_PORT}", f"dagster dev -p {port}"
    )


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


@contextlib.contextmanager
def dagster_dev(home: Path, database_url: str | None) -> Iterator[DagsterServer]:
    """The doc's setup block in `home`, a folder laid out like the repo root; stopped after.

    `database_url` is exported as GLAZE_DATABASE_URL, as the doc says for Postgres; None is the
    embedded default (`.glaze/glaze.db` under `home`).
    """
    for name in ("pyproject.toml", "dagster.yaml"):
        (home / name).write_bytes((REPO / name).read_bytes())
    (home / ".venv").symlink_to(BIN.parent)
    # The package whole (the commands read its .graphql files): a folder holding only those
    # would be a namespace package that shadows the installed one for `dagster dev`.
    (home / "glaze_pipeline").symlink_to(REPO / "glaze_pipeline")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLAZE_", "DAGSTER_"))}
    if database_url is not None:
        env["GLAZE_DATABASE_URL"] = database_url
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (home / "dagster-dev.log").open("wb") as log:
        process = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", on_port(setup_block().text, port)],
            cwd=home,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() gets all of it
        )
    try:
        wait_until_ready(url, home, [process])
        yield DagsterServer(url, home, env, port)
    finally:
        stop([process])


@pytest.fixture(scope="module")
def dagster_server(
    postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DagsterServer]:
    """`dagster dev` on the test Postgres for this module, stopped whatever happens."""
    # The daemon's queue sensor would launch any queued request another test left behind.
    store = Store(postgres_url)
    with store.engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(APP_TABLES)} CASCADE"))
    store.dispose()
    # The URL a user exports (psql reads it too): plain `postgresql://`, no driver.
    plain_url = make_url(postgres_url).set(drivername="postgresql")
    with dagster_dev(
        tmp_path_factory.mktemp("repo_root"), plain_url.render_as_string(hide_password=False)
    ) as server:
        yield server


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
    pytest.fail(f"dagster dev not ready ({last_error}):\n{log_tail(home / 'dagster-dev.log')}")


@pytest.fixture
def client(dagster_server: DagsterServer) -> Iterator[DagsterGraphQLClient]:
    with DagsterGraphQLClient(dagster_server.url, timeout=30.0) as client:
        yield client


def record_launched(store: Store, request_id: str, selection: dict[str, Any]) -> None:
    """Record a request as the app does before launching its run: one INSERT, as `launched`.

    Not `queued` (the queue sensor would launch it too), and with `launched_at`: the
    reconciler re-queues a launched request that has no run tagged with its id for 60 s.
    """
    with store.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO enrichment_requests (id, table_id, selection, status, launched_at) "
                "VALUES (:id, :table_id, :selection, 'launched', CURRENT_TIMESTAMP)"
            ),
            {"id": request_id, "table_id": LEADS_TABLE_ID, "selection": json.dumps(selection)},
        )


def leads_request(store: Store, column_keys: list[str], row_ids: list[str]) -> dict[str, Any]:
    """Seed tbl_leads, record a request for these cells, and return the run's op config."""
    seed_leads(store)
    column_ids = [leads_column_id(key) for key in column_keys]
    request_id = f"req_{uuid.uuid4().hex[:16]}"
    record_launched(store, request_id, {"column_ids": column_ids, "row_ids": row_ids})
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

    # What the Launchpad checks too: a kind that is not a RequestKind, in one line.
    with pytest.raises(RunConfigInvalidError) as kind:
        client.launch_enrich({"table_id": LEADS_TABLE_ID, "whole_table": True, "kind": "all"})
    assert [(error.reason, error.message) for error in kind.value.errors] == [
        (
            "RUNTIME_TYPE_MISMATCH",
            "Value at path root:ops:detect_entities:config:kind not in enum type JobKind got all",
        )
    ]


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


SCHEDULE = {
    "repositoryLocationName": LOCATION,
    "repositoryName": DEFAULT_REPOSITORY,
    "scheduleName": "pre_enrich_schedule",
}
PREVIEW_TICK = """
mutation PreviewTick($selector: ScheduleSelector!, $timestamp: Float!) {
  scheduleDryRun(selectorData: $selector, timestamp: $timestamp) {
    __typename
    ... on DryRunInstigationTick {
      evaluationResult {
        runRequests { runKey tags { key value } runConfigYaml }
        skipReason
        error { message }
      }
    }
    ... on PythonError { message }
  }
}
"""
SCHEDULE_STATUS = """
query ScheduleStatus($selector: ScheduleSelector!) {
  scheduleOrError(scheduleSelector: $selector) {
    __typename
    ... on Schedule { scheduleState { status } }
  }
}
"""


def graphql(server: DagsterServer, document: str, variables: dict[str, Any]) -> Any:
    answer = httpx.post(
        f"{server.url}/graphql", json={"query": document, "variables": variables}, timeout=30
    )
    answer.raise_for_status()
    return answer.json()["data"]


def test_the_uis_preview_of_a_schedule_tick_buys_nothing(
    dagster_server: DagsterServer, pg_store: Store
) -> None:
    """The UI's "Preview tick result" evaluates the schedule in the code server, as here."""
    table = seed_generated(pg_store, rows=3, unique_companies=1)
    before = app_state(pg_store)

    preview = graphql(
        dagster_server, PREVIEW_TICK, {"selector": SCHEDULE, "timestamp": time.time()}
    )["scheduleDryRun"]

    assert preview["__typename"] == "DryRunInstigationTick", preview
    result = preview["evaluationResult"]
    assert (result["error"], result["skipReason"]) == (None, None)
    [run] = result["runRequests"]
    assert run["runKey"] == f"pre_enrich:{table.id}"
    assert yaml.safe_load(run["runConfigYaml"]) == {
        "ops": {
            "detect_entities": {
                "config": {
                    "table_id": table.id,
                    "whole_table": True,
                    "kind": "pre_enrich",
                    "budget": 100.0,  # GLAZE_PRE_ENRICH_BUDGET is unset: the default cap
                }
            }
        }
    }
    tags = {tag["key"]: tag["value"] for tag in run["tags"]}
    assert (tags["glaze/kind"], tags["glaze/table"], tags["dagster/priority"]) == (
        "pre_enrich",
        table.id,
        "-10",
    )
    # Nothing happened: no request, no partition, no run; and the schedule is still off.
    assert app_state(pg_store) == before
    with DagsterInstance.from_config(str(dagster_server.home)) as instance:
        assert not instance.has_dynamic_partition("glaze_tables", table.id)
        assert instance.get_runs(RunsFilter(tags={"glaze/table": table.id})) == []
    status = graphql(dagster_server, SCHEDULE_STATUS, {"selector": SCHEDULE})["scheduleOrError"]
    assert status["scheduleState"]["status"] == "STOPPED"


def test_the_readme_turns_pre_enrichment_on_and_off(dagster_server: DagsterServer) -> None:
    """The README's command, run where `dagster dev` runs, switches what the daemon sees."""
    readme = (REPO / "README.md").read_text()
    [start] = re.findall(r"`(\.venv/bin/dagster schedule start pre_enrich_schedule)`", readme)
    env = {**dagster_server.env, "DAGSTER_HOME": str(dagster_server.home)}

    def run(command: str) -> str:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=dagster_server.home,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        status = graphql(dagster_server, SCHEDULE_STATUS, {"selector": SCHEDULE})
        return str(status["scheduleOrError"]["scheduleState"]["status"])

    try:
        assert run(start) == "RUNNING"
    finally:
        assert run(start.replace(" start ", " stop ")) == "STOPPED"


def test_the_docs_show_the_documents_verbatim() -> None:
    shown = {block.file: block.text for block in doc_blocks() if block.language == "graphql"}
    files = sorted(DOCUMENTS.glob("*.graphql"))
    assert sorted(shown) == [str(file.relative_to(REPO)) for file in files]
    for file in files:
        assert shown[str(file.relative_to(REPO))] == file.read_text(), file.name


def test_every_documented_query_is_the_one_its_command_sends() -> None:
    blocks = doc_blocks()
    shell = "\n".join(block.text for block in blocks if block.language == "bash")
    documents = [block for block in blocks if block.language == "graphql"]
    assert len(documents) == 7
    for document in documents:
        assert f"--rawfile query {document.file} " in shell, document.text.splitlines()[0]


# -- docs/graphql.md, run as a user runs it -------------------------------------------------

BLOCK_MARKER = "@@docs block {}@@"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def json_values(output: str) -> list[Any]:
    """The JSON documents printed one after the other (compact or pretty)."""
    decoder, values, position = json.JSONDecoder(), [], 0
    while position < len(output.rstrip()):
        value, end = decoder.raw_decode(output, position)
        values.append(value)
        position = end
        while position < len(output) and output[position].isspace():
            position += 1
    return values


def shape_mismatches(example: Any, actual: Any, path: str = "$") -> list[str]:
    """Where `actual` is not like the doc's example answer.

    A GraphQL object (it has `__typename`) must have the same typename and keys; a plain map
    (run tags) must have at least the documented keys; lists are compared by first element.
    """
    if isinstance(example, dict) and isinstance(actual, dict):
        if "__typename" in example and (
            example["__typename"] != actual.get("__typename") or example.keys() != actual.keys()
        ):
            return [
                f"{path}: {json.dumps(actual)[:300]} is not a documented {example['__typename']}"
            ]
        if not example.keys() <= actual.keys():
            return [f"{path}: no {sorted(example.keys() - actual.keys())}"]
        return [m for k in example for m in shape_mismatches(example[k], actual[k], f"{path}.{k}")]
    if isinstance(example, list) and isinstance(actual, list):
        pairs = zip(example[:1], actual[:1], strict=False)
        return [m for e, a in pairs for m in shape_mismatches(e, a, f"{path}[0]")]
    if None in (example, actual) or type(example) is type(actual):
        return []
    if isinstance(example, int | float) and isinstance(actual, int | float):
        return []
    return [f"{path}: {actual!r} is not like the documented {example!r}"]


def mask(line: str) -> str:
    """What differs from run to run (run ids, times, pids, counts) masked."""
    return re.sub(r"\d+", "0", UUID.sub("<run>", line)).rstrip()


def printed_as_documented(documented: str, printed: str) -> bool:
    """The same lines once masked; a documented line ending in "…" is cut short there."""
    shown, got = documented.splitlines(), printed.splitlines()
    return len(shown) == len(got) and all(
        mask(g).startswith(mask(s[:-1])) if s.endswith("…") else mask(g) == mask(s)
        for s, g in zip(shown, got, strict=True)
    )


def run_the_docs(server: DagsterServer, database: str) -> tuple[list[Block], dict[int, str]]:
    """Every shell block after the setup one, for this database, in one bash, in order."""
    blocks = doc_blocks()
    setup = blocks.index(setup_block())
    steps = [
        index
        for index, block in enumerate(blocks)
        if index > setup and block.language == "bash" and block.only_on in (None, database)
    ]
    script = "\n".join(
        # curl prints no final newline: the marker starts a line of its own.
        f"printf '\\n{BLOCK_MARKER.format(index)}\\n'\n{on_port(blocks[index].text, server.port)}"
        for index in steps
    )
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=server.home,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    parts = re.split(r"^@@docs block (\d+)@@$", result.stdout, flags=re.MULTILINE)
    outputs = {
        int(index): output.strip("\n")
        for index, output in zip(parts[1::2], parts[2::2], strict=True)
    }
    assert sorted(outputs) == steps
    return blocks, outputs


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_the_docs_commands_work_as_written(
    database: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    with contextlib.ExitStack() as stack:
        if database == "sqlite":
            home = tmp_path / "repo_root"
            home.mkdir()
            server = stack.enter_context(dagster_dev(home, None))
            store = Store(f"sqlite:///{home / '.glaze' / 'glaze.db'}")
        else:
            server = request.getfixturevalue("dagster_server")
            store = request.getfixturevalue("pg_store")  # emptied: other tests ran here
            seed_leads(store)  # what the setup block's `glaze seed` did
        stack.callback(store.dispose)
        blocks, outputs = run_the_docs(server, database)

        # Each command printed what the doc shows after it (same keys and typenames; the same
        # text once run ids, times and numbers are masked, up to a documented "…").
        problems = []
        for index, output in outputs.items():
            example, command = blocks[index + 1], blocks[index].text.splitlines()[0]
            if example.language == "json":
                documented, printed = json_values(example.text), json_values(output)
                if len(printed) != len(documented):
                    problems.append(f"{command}: printed {len(printed)} answers:\n{output}")
                for shown, got in zip(documented, printed, strict=False):
                    problems += [f"{command}: {m}" for m in shape_mismatches(shown, got)]
            elif example.language == "text" and not printed_as_documented(example.text, output):
                problems.append(f"{command}: printed\n{output}")
        assert problems == [], "\n\n".join(problems)

        # And did what it says: the run served the request recorded in SQL...
        launch = json.loads((server.home / "launch.json").read_text())
        run_id = launch["data"]["launchRun"]["run"]["runId"]
        recorded = store.get_request("req_app_0001")
        assert (recorded.status, recorded.run_id) == ("partial", run_id), recorded.error
        assert (recorded.cells_total, recorded.cells_done, recorded.cells_failed) == (20, 18, 2)
        # ...and its whole event log came back in one page, figures included.
        logs = json.loads((server.home / "logs.json").read_text())["data"]["logsForRun"]
        assert logs["hasMore"] is False
        events = [event["__typename"] for event in logs["events"]]
        assert {"RunStartEvent", "LogMessageEvent", "RunSuccessEvent"} <= set(events)
        assert not {"RunFailureEvent", "ExecutionStepFailureEvent"} & set(events)
        [materialization] = [
            event
            for event in logs["events"]
            if event["__typename"] == "MaterializationEvent"
            and event["assetKey"]["path"] == ["glaze", "enriched_table"]
        ]
        assert materialization["partition"] == LEADS_TABLE_ID
        figures = {entry["label"]: entry for entry in materialization["metadataEntries"]}
        assert figures["status"]["text"] == "partial"
        assert figures["rows_written"]["intValue"] == recorded.rows_written > 0

        # The Python example, for a second request recorded as in step 1.
        [python] = [block.text for block in blocks if block.language == "python"]
        assert 'request_id = "req_app_0002"' in python
        record_launched(store, "req_app_0002", {"column_ids": [leads_column_id("industry")]})
        snippet = subprocess.run(
            [sys.executable, "-c", on_port(python, server.port)],
            cwd=server.home,
            env=server.env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert snippet.returncode == 0, snippet.stderr
        second = store.get_request("req_app_0002")
        assert second.status == "partial" and second.run_id is not None, second.error


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
    # dagster-graphql launches with `launchPipelineExecution`, `launchRun`'s older name.
    transport = answering({"data": {"launchPipelineExecution": result}})
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
