"""Schemathesis against the API's OpenAPI schema: whatever it generates, valid or not, sent to a
running `glaze serve` over HTTP, no operation answers 5xx.

The schema is generated in process from `create_app` when this module is collected (the pytest
integration parametrizes by operation at collection, before any server runs), and
`test_served_schema_is_the_one_fuzzed` checks it is exactly what the running server serves at
`/openapi.json`. (`schemathesis.pytest.from_fixture`, which would load it from the server, fails
under pytest 9.2 in schemathesis 4.32.5: it reads `Function._nodeid`, gone from pytest.)

The server runs without a launcher: a generated request that is valid queues a job like any
other, and nothing here is about running it (the 2 cores stay with the server). Path parameters
are, at Hypothesis's choice, as generated or ids that exist (the Leads table, its rows, columns
and a queued job), so the fuzzing reaches the code behind the 404s, not only the 404s.

Left out: the SSE stream `/realtime/jobs/{jobId}`. For a job that has not ended it answers for as
long as the job runs, and here no job ever runs, so a request for the real job id would hang;
the realtime tests cover it with a real job.

Each operation gets MAX_EXAMPLES generated cases, on SQLite and on Postgres (a string with a NUL
or an odd id reaches a different database driver on each).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import Case
from schemathesis.checks import not_a_server_error

from glaze_pipeline.api.app import create_app
from glaze_pipeline.api.auth import ApiSettings
from glaze_pipeline.bench.stack import fresh_postgres
from glaze_pipeline.core.progress import open_progress
from glaze_pipeline.core.store import Store
from glaze_pipeline_tests.api_helpers import LEADS, Server, served
from glaze_pipeline_tests.conftest import PG_BASE_URL

MAX_EXAMPLES = 40
# An estimate that has not ended answers after `wait` seconds (up to 60): with no launcher it
# never ends, so a generated wait is cut to this (invalid values are sent as generated).
ESTIMATE_WAIT_S = 0.2
REAL_ROWS = ["row_leads_01", "row_leads_08"]
REAL_COLUMNS = ["col_leads_name", "col_leads_industry"]


def generated_openapi() -> dict[str, Any]:
    """The OpenAPI document of the app, as `glaze serve` generates it (no database used)."""
    store = Store("sqlite://")
    try:
        return dict(create_app(store, ApiSettings(), publisher=open_progress(None)).openapi())
    finally:
        store.dispose()


OPENAPI = generated_openapi()
schema = schemathesis.openapi.from_dict(OPENAPI).exclude(path_regex=r"^/realtime/")
REAL_IDS: dict[str, list[str]] = {
    "table_id": [LEADS],
    "row_id": REAL_ROWS,
    "column_id": REAL_COLUMNS,
    "job_id": [],  # filled by the `real_job` fixture
}


@schema.hook
def flatmap_path_parameters(
    context: Any, path_parameters: dict[str, Any] | None
) -> st.SearchStrategy[dict[str, Any] | None]:
    """Each path parameter as generated, or an id that exists (Hypothesis picks)."""
    del context
    if not path_parameters:
        return st.just(path_parameters)
    return st.fixed_dictionaries(
        {
            name: st.sampled_from([value, *REAL_IDS.get(name, [])])
            for name, value in path_parameters.items()
        }
    )


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def schema_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    home = tmp_path_factory.mktemp(f"schema-{request.param}")
    if request.param == "sqlite":
        with served(home, launcher=False) as running:
            yield running
        return
    with (
        fresh_postgres(PG_BASE_URL, migrate=False) as database_url,
        served(home, database_url=database_url, launcher=False) as running,
    ):
        yield running


@pytest.fixture(scope="module")
def real_job(schema_server: Server) -> Iterator[str]:
    """A queued job of the Leads table, for the generated job ids to hit now and then."""
    with schema_server.client() as client:
        response = client.post(
            f"/tables/{LEADS}/enrich", json={"columnIds": REAL_COLUMNS, "rowIds": REAL_ROWS}
        )
    assert response.status_code == 202, response.text
    REAL_IDS["job_id"] = [response.json()["jobId"]]
    yield REAL_IDS["job_id"][0]
    REAL_IDS["job_id"] = []


def test_served_schema_is_the_one_fuzzed(schema_server: Server) -> None:
    served_schema = httpx.get(f"{schema_server.base_url}/openapi.json", timeout=30).json()
    assert served_schema == OPENAPI


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same cases every run: a failure here reproduces
)
@schema.parametrize()
def test_no_server_error(case: Case, schema_server: Server, real_job: str) -> None:
    del real_job  # used through REAL_IDS
    if case.path.endswith("/estimate") and isinstance(case.query, dict):
        wait = case.query.get("wait")
        if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > 0:
            case.query["wait"] = min(wait, ESTIMATE_WAIT_S)
    try:
        case.call_and_validate(
            base_url=schema_server.base_url, checks=[not_a_server_error], timeout=30
        )
    except Exception:
        print(f"server log (tail):\n{_log_tail(schema_server)}")
        raise


def _log_tail(server: Server, lines: int = 80) -> str:
    return "\n".join(server.log().splitlines()[-lines:])


def test_schema_lists_every_operation() -> None:
    """The schema the fuzzing works from covers the API (a route missing from it is not fuzzed)."""
    paths = OPENAPI["paths"]
    operations = {(method.upper(), path) for path, item in paths.items() for method in item}
    assert operations >= {
        ("GET", "/health"),
        ("GET", "/tables"),
        ("POST", "/tables"),
        ("GET", "/tables/{table_id}"),
        ("POST", "/tables/{table_id}/columns"),
        ("GET", "/tables/{table_id}/rows"),
        ("PUT", "/tables/{table_id}/rows/{row_id}/cells/{column_id}"),
        ("POST", "/tables/{table_id}/enrich"),
        ("GET", "/tables/{table_id}/enrich/jobs"),
        ("GET", "/tables/{table_id}/enrich/jobs/{job_id}"),
        ("GET", "/tables/{table_id}/enrich/jobs/{job_id}/tasks"),
        ("POST", "/tables/{table_id}/enrich/jobs/{job_id}/cancel"),
        ("POST", "/v2/tables/{table_id}/enrich"),
        ("GET", "/v2/tables/{table_id}/jobs/{job_id}"),
        ("POST", "/v2/tables/{table_id}/enrich/estimate"),
    }
