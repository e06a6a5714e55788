"""The HTTP API over real HTTP: a real `glaze serve` (uvicorn, launcher, Dagster runs) per module.

Five servers, each shared by the tests that do not disturb one another:

* `server`: the open server with its launcher, on the embedded SQLite default and on Postgres
  with Redis: seed 001's flow and every job mode, tables, columns, rows and cell edits. Each test
  uses cells of the Leads table no other test of this module fills (or a table of its own), so
  the order the tests run in does not matter.
* `locked`: API keys, no launcher (jobs stay queued), a 1 MB upload limit: auth, public job
  tokens, the login link, refused input (nothing written), oversize uploads, cancelling a
  queued job.
* `slow`: a launcher whose providers answer after a few seconds: a user's edit landing while a
  job runs, and cancelling a running job.
* `keyless`: a launcher over JSON API vendors of the mock provider server, one of which needs an
  API key that is not set: the estimate and the job name it, and the job never calls it.
* a server that must refuse to start (no key, not loopback).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis
import yaml

from glaze_pipeline.api.auth import TokenSigner
from glaze_pipeline.api.models import Estimate
from glaze_pipeline.bench.stack import fresh_postgres
from glaze_pipeline.core.estimate import estimate_chunk, estimate_report
from glaze_pipeline.core.models import EntityKey, EntityRequest, EntityType
from glaze_pipeline.core.providers.registry import load_providers
from glaze_pipeline.testing.mock_server import (
    COMPANY_LAYOUT,
    MockConfig,
    MockProviderServer,
    VendorConfig,
)
from glaze_pipeline_tests.api_helpers import (
    GLAZE,
    LEADS,
    TEST_TOKEN_SECRET,
    Server,
    served,
    server_env,
)
from glaze_pipeline_tests.conftest import PG_BASE_URL, REDIS_TEST_URL

API_KEY = "test-api-key-0123456789abcdef"
ROW = "row_leads_{:02d}"
COLUMN = "col_leads_{}"


def row(number: int) -> str:
    return ROW.format(number)


def column(key: str) -> str:
    return COLUMN.format(key)


def leads_csv(rows: int = 3) -> bytes:
    """A small Leads-like CSV: companies with a website, empty industry to fill."""
    lines = ["company,website,industry"]
    lines += [f"Company {n},company{n}.example.com," for n in range(1, rows + 1)]
    return ("\n".join(lines) + "\n").encode()


# -- servers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_database() -> Iterator[str]:
    """The test Redis database (GLAZE_TEST_REDIS_URL), emptied before and after; a missing
    Redis fails loudly."""
    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        client.ping()
        client.flushdb()
        yield REDIS_TEST_URL
        client.flushdb()
    except redis.RedisError as error:
        pytest.fail(f"Redis is required for these tests ({REDIS_TEST_URL}): {error}")
    finally:
        client.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The open server with its launcher: SQLite (embedded default), or Postgres with Redis
    (a database of its own, so its Leads table is this module's alone)."""
    home = tmp_path_factory.mktemp(f"serve-{request.param}")
    if request.param == "sqlite":
        with served(home) as running:
            yield running
        return
    with (
        redis_database() as redis_url,
        fresh_postgres(PG_BASE_URL, migrate=False) as database_url,
        served(home, database_url=database_url, redis_url=redis_url) as running,
    ):
        yield running


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """API keys, no launcher (every job stays queued), uploads limited to 1 MB."""
    home = tmp_path_factory.mktemp("serve-locked")
    with served(
        home, api_key=API_KEY, launcher=False, extra_env={"GLAZE_MAX_UPLOAD_MB": "1"}
    ) as running:
        yield running


SLOW_PROVIDERS = """\
providers:
  - {kind: fake, name: slow_company, entity_type: company, cost_per_call: 1.0,
     confidence: 0.9, charges_misses: false, max_concurrency: 50, latency_s: %(latency)s}
  - {kind: fake, name: slow_person, entity_type: person, cost_per_call: 1.0,
     confidence: 0.9, charges_misses: false, max_concurrency: 50, latency_s: %(latency)s}
"""
SLOW_LATENCY_S = 3.0


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A launcher whose providers take SLOW_LATENCY_S per call: a job stays in its enriching
    phase long enough to edit or cancel it there, on purpose and without sleeping."""
    home = tmp_path_factory.mktemp("serve-slow")
    providers = home / "providers.yaml"
    providers.write_text(SLOW_PROVIDERS % {"latency": SLOW_LATENCY_S})
    with served(home, extra_env={"GLAZE_PROVIDERS_FILE": str(providers)}) as running:
        yield running


# The key the premium vendor needs; `served` passes no GLAZE_* variable of the test's own, so it
# is unset in the server, as for a user who forgot it.
MISSING_KEY_ENV = "GLAZE_TEST_PREMIUM_API_KEY"


def vendor_entry(mock: MockProviderServer, vendor: str, **entry: Any) -> dict[str, Any]:
    """A json_api company provider aimed at one mock vendor (fields named in `entry`)."""
    fields = entry.pop("fields")
    return {
        "kind": "json_api",
        "entity_type": "company",
        "base_url": mock.vendor_url(vendor),
        "health": {"path": "/v1/health"},
        "lookups": {"domain": {"path": "/v1/companies", "params": {"domain": "{value}"}}},
        "record_path": "company",
        "fields": {name: COMPANY_LAYOUT[name] for name in fields},
        "http": {"retries": 0, "max_concurrency": 10},
        **entry,
    }


@pytest.fixture(scope="module")
def keyless_mock() -> Iterator[MockProviderServer]:
    """A cheap vendor that knows every company's industry, and a premium one (industry and
    revenue) that wants an API key."""
    config = MockConfig(
        vendors={
            "cheap": VendorConfig(entity_type="company", fields=["domain", "industry"]),
            "premium": VendorConfig(
                entity_type="company", cost_per_call=10.0, api_key="premium-key-0123456789"
            ),
        }
    )
    with MockProviderServer(config) as mock:
        yield mock


@pytest.fixture(scope="module")
def keyless(
    tmp_path_factory: pytest.TempPathFactory, keyless_mock: MockProviderServer
) -> Iterator[Server]:
    """A launcher over the mock vendors, the premium vendor's key unset."""
    home = tmp_path_factory.mktemp("serve-keyless")
    providers = home / "providers.yaml"
    entries = [
        vendor_entry(
            keyless_mock, "cheap", name="cheap_company", fields=["industry"], cost_per_call=1.0
        ),
        vendor_entry(
            keyless_mock,
            "premium",
            name="premium_company",
            fields=["industry", "revenue"],
            cost_per_call=10.0,
            charges_misses=True,
            confidence=0.95,
            auth={"header": "X-Api-Key", "env": MISSING_KEY_ENV},
        ),
    ]
    providers.write_text(yaml.safe_dump({"providers": entries}))
    with served(home, extra_env={"GLAZE_PROVIDERS_FILE": str(providers)}) as running:
        yield running


def company_table(client: httpx.Client, name: str, rows: int = 3) -> str:
    """An uploaded table of `rows` companies with empty industry and revenue: its id."""
    lines = ["company,website,industry,revenue"]
    lines += [f"{name} {n},{name.lower()}{n}.com,," for n in range(1, rows + 1)]
    response = upload(client, ("\n".join(lines) + "\n").encode(), name=name)
    assert response.status_code == 201, response.text
    table = response.json()
    fields = {c["key"]: c["field"] for c in table["columns"]}
    assert (fields["industry"], fields["revenue"]) == ("company.industry", "company.revenue")
    return str(table["id"])


# -- small helpers ------------------------------------------------------------------------------


def enqueue(client: httpx.Client, body: dict[str, Any], table: str = LEADS) -> dict[str, Any]:
    response = client.post(f"/tables/{table}/enrich", json=body)
    assert response.status_code == 202, response.text
    return dict(response.json())


def grid(columns: list[str], rows: list[str]) -> dict[str, Any]:
    """Seed 001's grid mode over Leads columns (by key) and rows (by id)."""
    return {"columnIds": [column(c) for c in columns], "rowIds": rows}


def job_path(job_id: str, table: str = LEADS) -> str:
    return f"/tables/{table}/enrich/jobs/{job_id}"


def rows_by_id(client: httpx.Client, table: str = LEADS) -> dict[str, dict[str, Any]]:
    page = client.get(f"/tables/{table}/rows", params={"limit": 500}).json()
    return {r["id"]: r for r in page["items"]}


def upload(client: httpx.Client, content: bytes, *, name: str | None = None) -> httpx.Response:
    data = {"name": name} if name else None
    return client.post("/tables", files={"file": ("upload.csv", content, "text/csv")}, data=data)


def wait_for(
    read: Callable[[], dict[str, Any]], until: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    """Poll `read` until `until` holds of its answer; the last answer in the failure."""
    deadline = time.monotonic() + timeout
    while True:
        answer = read()
        if until(answer):
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout}s: {answer}")
        time.sleep(0.05)


def snapshot(client: httpx.Client) -> dict[str, Any]:
    """What a rejected request must leave as it was: jobs, tables, the Leads columns and rows."""
    return {
        "jobs": client.get(f"/tables/{LEADS}/enrich/jobs", params={"limit": 500}).json(),
        "tables": client.get("/tables", params={"limit": 500}).json(),
        "columns": client.get(f"/tables/{LEADS}").json()["columns"],
        "rows": client.get(f"/tables/{LEADS}/rows", params={"limit": 500}).json(),
    }


# -- seed 001's flow and the job modes (SQLite and Postgres + Redis) -------------------------------


def test_seed_001_flow(server: Server) -> None:
    """Enrich 2 columns x 3 rows: 202 with 6 tasks at once, then completed with progress 100;
    the job is listed, its 6 tasks read back, none failed; cancelling it now changes nothing."""
    rows = [row(1), row(2), row(3)]
    with server.client() as client:
        queued = enqueue(client, grid(["industry", "title"], rows))
        assert queued["tableId"] == LEADS
        assert queued["status"] == "pending"
        assert queued["totalTasks"] == 6
        assert queued["runId"] is None or isinstance(queued["runId"], str)
        assert queued["publicAccessToken"] and queued["tokenExpiresAt"]
        assert "6 cells" in queued["message"]

        job = server.wait_for_job(LEADS, queued["jobId"])
        assert (job["status"], job["state"], job["phase"]) == ("completed", "succeeded", "done")
        assert job["progress"] == 100
        assert (job["totalTasks"], job["doneTasks"], job["failedTasks"]) == (6, 6, 0)
        assert job["runId"] and job["startedAt"] and job["completedAt"]
        assert job["cost"] == 6.0 and job["providerCalls"]
        listed = client.get(f"/tables/{LEADS}/enrich/jobs", params={"limit": 500}).json()
        assert job in listed["items"]

        data = rows_by_id(client)
        for row_id in rows:
            assert data[row_id]["data"]["industry"] and data[row_id]["data"]["title"]
            assert data[row_id]["meta"]["industry"]["status"] == "done"

        tasks = client.get(f"{job_path(queued['jobId'])}/tasks").json()
        assert tasks["total"] == 6 and len(tasks["items"]) == 6
        assert {(t["rowId"], t["columnId"]) for t in tasks["items"]} == {
            (r, column(c)) for r in rows for c in ("industry", "title")
        }
        assert all(t["status"] == "done" and t["value"] and t["source"] for t in tasks["items"])
        first = client.get(f"{job_path(queued['jobId'])}/tasks", params={"limit": 4}).json()
        second = client.get(
            f"{job_path(queued['jobId'])}/tasks", params={"limit": 4, "page": 2}
        ).json()
        assert (len(first["items"]), len(second["items"]), second["total"]) == (4, 2, 6)
        assert first["items"] + second["items"] == tasks["items"]
        failed = client.get(f"{job_path(queued['jobId'])}/tasks", params={"status": "failed"})
        assert failed.json()["items"] == [] and failed.json()["total"] == 0

        cancelled = client.post(f"{job_path(queued['jobId'])}/cancel")
        assert cancelled.status_code == 202
        assert cancelled.json()["status"] == "completed"
        assert cancelled.json()["cancelRequested"] is False
        assert client.get(job_path(queued["jobId"])).json() == job


def test_jobs_list_newest_first_and_paged(server: Server) -> None:
    with server.client() as client:
        first = enqueue(client, {"cellIds": [{"rowId": row(4), "columnId": column("linkedin")}]})
        second = enqueue(client, {"cellIds": [{"rowId": row(5), "columnId": column("linkedin")}]})
        listed = client.get(f"/tables/{LEADS}/enrich/jobs").json()
        ids = [j["jobId"] for j in listed["items"]]
        assert ids.index(second["jobId"]) < ids.index(first["jobId"])
        assert ids[0] == second["jobId"]
        assert (listed["page"], listed["limit"], listed["total"]) == (1, 20, len(ids))

        page_two = client.get(f"/tables/{LEADS}/enrich/jobs", params={"page": 2, "limit": 1})
        assert page_two.json()["items"][0]["jobId"] == first["jobId"]
        assert (page_two.json()["page"], page_two.json()["limit"]) == (2, 1)
        assert page_two.json()["total"] == listed["total"]
        beyond = client.get(
            f"/tables/{LEADS}/enrich/jobs", params={"page": listed["total"] + 1, "limit": 1}
        )
        assert beyond.json()["items"] == []
        for queued in (first, second):
            server.wait_for_job(LEADS, queued["jobId"])


def test_failed_cells_are_filtered(server: Server) -> None:
    """Katherine Johnson's row (08) has no company, email or website: its employee_count cell
    fails `no identifier`; filtering the tasks by failed returns exactly that cell."""
    with server.client() as client:
        queued = enqueue(client, grid(["employee_count"], [row(7), row(8)]))
        job = server.wait_for_job(LEADS, queued["jobId"])
        assert (job["status"], job["state"]) == ("completed", "partial")
        assert (job["doneTasks"], job["failedTasks"], job["progress"]) == (1, 1, 100)

        failed = client.get(f"{job_path(queued['jobId'])}/tasks", params={"status": "failed"})
        assert failed.json()["total"] == 1
        [task] = failed.json()["items"]
        assert (task["rowId"], task["columnId"], task["columnKey"]) == (
            row(8),
            column("employee_count"),
            "employee_count",
        )
        assert task["status"] == "failed" and "no identifier" in task["error"]
        done = client.get(f"{job_path(queued['jobId'])}/tasks", params={"status": "done"})
        assert [t["rowId"] for t in done.json()["items"]] == [row(7)]


def test_explicit_cells(server: Server) -> None:
    """cellIds mode: exactly the cells named (here one per row), the others untouched."""
    cells = [
        {"rowId": row(9), "columnId": column("title")},
        {"rowId": row(10), "columnId": column("industry")},
    ]
    with server.client() as client:
        queued = enqueue(client, {"cellIds": cells})
        assert queued["totalTasks"] == 2
        job = server.wait_for_job(LEADS, queued["jobId"])
        assert (job["status"], job["doneTasks"]) == ("completed", 2)
        data = rows_by_id(client)
        assert data[row(9)]["data"]["title"] and data[row(10)]["data"]["industry"]
        assert data[row(9)]["data"]["industry"] == "" and data[row(10)]["data"]["title"] == ""
        tasks = client.get(f"{job_path(queued['jobId'])}/tasks").json()["items"]
        assert {(t["rowId"], t["columnId"]) for t in tasks} == {
            (c["rowId"], c["columnId"]) for c in cells
        }


def test_whole_table_on_an_uploaded_table(server: Server) -> None:
    """A CSV uploaded through the API, then enriched whole: every empty cell filled."""
    with server.client() as client:
        created = upload(client, leads_csv(3), name="Whole table")
        assert created.status_code == 201, created.text
        table = created.json()["id"]
        queued = enqueue(client, {"wholeTable": True}, table=table)
        # At enqueue: the empty cells of the columns with a field (industry x 3 rows), which
        # is what the job fills and counts: the total does not change under the user.
        assert queued["totalTasks"] == 3
        job = server.wait_for_job(table, queued["jobId"])
        assert (job["status"], job["state"], job["doneTasks"]) == ("completed", "succeeded", 3)
        assert job["totalTasks"] == queued["totalTasks"]
        answered = ("doneTasks", "notFoundTasks", "failedTasks", "skippedTasks")
        assert sum(job[k] for k in answered) == job["totalTasks"]
        data = rows_by_id(client, table)
        assert len(data) == 3
        assert all(r["data"]["industry"] for r in data.values())
        assert all(r["meta"]["industry"]["status"] == "done" for r in data.values())


def test_v2_enrich_and_job_view(server: Server) -> None:
    with server.client() as client:
        response = client.post(
            f"/v2/tables/{LEADS}/enrich", json=grid(["employee_count"], [row(9), row(10)])
        )
        assert response.status_code == 202, response.text
        queued = response.json()
        assert (queued["status"], queued["totalTasks"]) == ("pending", 2)
        assert queued["publicAccessToken"]
        server.wait_for_job(LEADS, queued["jobId"])
        view = client.get(f"/v2/tables/{LEADS}/jobs/{queued['jobId']}")
        assert view.status_code == 200
        job = view.json()
        assert (job["entityCount"], job["processedCount"]) == (2, 2)
        assert job["entityCount"] == job["entities"] and job["status"] == "completed"


def test_estimate_buys_nothing(server: Server) -> None:
    """The estimate answers entities, expected and upper-bound calls and cost per provider,
    each provider's verdict and basis, and a budget guidance, and buys nothing: no row
    changes, no cost, and the same estimate again (nothing it looked at was cached)."""
    body = grid(["industry", "title"], [row(6), row(7)])
    path = f"/v2/tables/{LEADS}/enrich/estimate"
    with server.client() as client:
        before = rows_by_id(client)
        response = client.post(path, params={"wait": 60}, json=body)
        assert response.status_code == 200, response.text
        job = response.json()
        assert (job["kind"], job["status"], job["state"]) == ("estimate", "completed", "succeeded")
        estimate = job["estimate"]
        assert (estimate["uniqueEntities"], estimate["cells"]) == (4, 4)
        expected, most = estimate["expectedProviderCalls"], estimate["maxProviderCalls"]
        assert set(expected) <= set(most) <= {"fake_company", "fake_person"}
        assert sum(most.values()) + estimate["cacheHits"] == 4  # earlier tests may cache some
        assert all(0 < expected[name] <= most[name] for name in expected)
        # 1.0 per call: the bound charges every call, the expectation at most every call
        assert estimate["maxCost"] == float(sum(most.values()))
        assert 0 <= estimate["expectedCost"] <= estimate["maxCost"]
        assert estimate["unavailableProviders"] == {} and estimate["cellsProviderUnavailable"] == 0
        for name in most:
            provider = estimate["providers"][name]
            assert (provider["status"], provider["reason"]) == ("ok", None)
            assert provider["expectedCost"] <= provider["maxCost"] == float(most[name])
            assert provider["byKeyKind"], provider
            for basis in provider["byKeyKind"].values():
                assert 0 <= basis["chargedShare"] <= 1 and 0 <= basis["foundShare"] <= 1
                assert basis["basis"].startswith(("from ", "prior, no history yet"))
        guidance = estimate["budgetGuidance"]
        assert guidance["expectedCellsFilled"] == estimate["expectedCellsFilled"] <= 4
        if estimate["expectedCellsFilled"]:  # all cached: nothing left to buy or fill
            assert guidance["points"][-1]["shareOfFillable"] == 1.0
            assert guidance["points"][-1]["budget"] >= estimate["expectedCost"]
            assert estimate["guidance"].startswith("budget ")
        else:
            assert estimate["guidance"] == "no cell is expected to be filled"
        assert job["cost"] == 0 and job["providerCalls"] == {} and job["costByProvider"] == {}
        assert job["callsNotSent"] == {} and job["unavailableProviders"] == {}
        assert rows_by_id(client) == before
        again = client.post(path, params={"wait": 60}, json=body).json()
        assert again["jobId"] != job["jobId"] and again["estimate"] == estimate


def test_estimate_with_a_budget_says_what_it_fills(server: Server) -> None:
    """A budget on the estimate: the guidance says what that budget is expected to fill."""
    body = {**grid(["employee_count"], [row(1), row(2)]), "budget": 1}
    with server.client() as client:
        response = client.post(
            f"/v2/tables/{LEADS}/enrich/estimate", params={"wait": 60}, json=body
        )
        assert response.status_code == 200, response.text
        estimate = response.json()["estimate"]
    assert estimate["budget"] == 1
    at_budget = estimate["budgetGuidance"]["atBudget"]
    assert at_budget["budget"] == 1 and at_budget["expectedCost"] <= 1
    assert 0 <= at_budget["cellsFilled"] <= estimate["expectedCellsFilled"]


def test_estimate_model_carries_the_whole_report() -> None:
    """Every figure of the engine's estimate report reaches the API, camelCased, none dropped
    (the model ignores unknown keys, so a figure missing from it would vanish silently)."""
    providers = load_providers(None)  # the bundled fakes
    company, person = (p.name for p in providers)
    requests = [
        EntityRequest(
            EntityKey(EntityType.COMPANY, "domain", "acme.com"), frozenset({"industry"}), 1
        ),
        EntityRequest(EntityKey(EntityType.PERSON, "email", "a@acme.com"), frozenset({"title"}), 1),
    ]
    unavailable = {person: "API key missing: set the environment variable X"}
    part = estimate_chunk(
        requests, providers, cache=None, observations={}, threshold=0.8, unavailable=unavailable
    )
    report = estimate_report(
        part,
        providers=providers,
        entities=2,
        cells=2,
        cells_without_identifier=0,
        unavailable=unavailable,
        budget=5.0,
    )
    estimate = Estimate.model_validate(report)
    assert estimate.model_dump() == report
    read = estimate.model_dump(by_alias=True)
    assert read["providers"][company]["status"] == "ok"
    assert read["providers"][person]["status"] == "unavailable"
    assert read["cellsProviderUnavailable"] == 1
    assert read["budgetGuidance"]["atBudget"]["budget"] == 5.0


def test_estimate_model_reads_an_old_estimate() -> None:
    """An estimate stored before expected costs existed (int calls, no bound, no providers)
    still reads: its figures as stored, every newer one at its default."""
    old = {
        "unique_entities": 4,
        "cells": 6,
        "cells_without_identifier": 1,
        "cache_hits": 1,
        "expected_provider_calls": {"fake_company": 2, "fake_person": 1},
        "expected_cost_by_provider": {"fake_company": 2.0, "fake_person": 1.0},
        "expected_cost": 3.0,
    }
    read = Estimate.model_validate(old).model_dump(by_alias=True)
    assert read == {
        "uniqueEntities": 4,
        "cells": 6,
        "cellsWithoutIdentifier": 1,
        "cacheHits": 1,
        "expectedCost": 3.0,
        "maxCost": None,
        "expectedCostSd": None,
        "expectedCostRange": None,
        "budget": None,
        "expectedCellsFilled": None,
        "cellsProviderUnavailable": 0,
        "expectedProviderCalls": {"fake_company": 2.0, "fake_person": 1.0},
        "expectedCostByProvider": {"fake_company": 2.0, "fake_person": 1.0},
        "maxProviderCalls": {},
        "maxCostByProvider": {},
        "providers": {},
        "unavailableProviders": {},
        "budgetGuidance": None,
        "guidance": None,
    }


def test_idempotency_key(server: Server) -> None:
    body = {"cellIds": [{"rowId": row(6), "columnId": column("linkedin")}]}
    with server.client() as client:
        jobs_before = client.get(f"/tables/{LEADS}/enrich/jobs").json()["total"]
        first = enqueue(client, {**body, "idempotencyKey": "import-42"})
        again = enqueue(client, {**body, "idempotencyKey": "import-42"})
        assert again["jobId"] == first["jobId"]
        assert client.get(f"/tables/{LEADS}/enrich/jobs").json()["total"] == jobs_before + 1
        server.wait_for_job(LEADS, first["jobId"])
        after_end = enqueue(client, {**body, "idempotencyKey": "import-42"})
        assert after_end["jobId"] == first["jobId"]


# -- tables, rows, columns, cells -------------------------------------------------------------------


def test_upload_csv(server: Server) -> None:
    content = "name,email,Employee Count\nAda,ada@analytical.io,12\nJosé,,\n".encode()
    with server.client() as client:
        response = upload(client, content, name="Uploaded")
        assert response.status_code == 201, response.text
        table = response.json()
        assert (table["name"], table["rowCount"]) == ("Uploaded", 2)
        assert [c["key"] for c in table["columns"]] == ["name", "email", "employee_count"]
        assert [c["position"] for c in table["columns"]] == [0, 1, 2]
        assert table["columns"][2]["field"] == "company.employee_count"
        rows = client.get(f"/tables/{table['id']}/rows").json()
        assert rows["total"] == 2
        assert [r["data"] for r in rows["items"]] == [
            {"name": "Ada", "email": "ada@analytical.io", "employee_count": "12"},
            {"name": "José", "email": "", "employee_count": ""},
        ]
        assert client.get(f"/tables/{table['id']}").json() == table

        unnamed = client.post("/tables", files={"file": ("people list.csv", b"a\n1\n")})
        assert unnamed.status_code == 201 and unnamed.json()["name"] == "people list"


def test_tables_list_paged(server: Server) -> None:
    with server.client() as client:
        for n in range(2):
            assert upload(client, b"a,b\n1,2\n", name=f"Paging {n}").status_code == 201
        listed = client.get("/tables").json()
        assert listed["total"] == len(listed["items"]) >= 3
        assert LEADS in {t["id"] for t in listed["items"]}
        leads = next(t for t in listed["items"] if t["id"] == LEADS)
        assert (leads["name"], leads["rowCount"]) == ("Leads", 10)
        assert set(leads) == {"id", "name", "description", "rowCount", "createdAt"}
        pages = [
            client.get("/tables", params={"page": p, "limit": 2}).json()
            for p in range(1, (listed["total"] + 1) // 2 + 2)
        ]
        assert all(p["total"] == listed["total"] and p["limit"] == 2 for p in pages)
        assert [len(p["items"]) for p in pages[:-1]] == [2] * (listed["total"] // 2) + (
            [1] if listed["total"] % 2 else []
        )
        assert pages[-1]["items"] == []
        paged_ids = [t["id"] for p in pages for t in p["items"]]
        assert sorted(paged_ids) == sorted(t["id"] for t in listed["items"])


def test_table_json_and_html(server: Server) -> None:
    with server.client() as client:
        table = client.get(f"/tables/{LEADS}")
        assert table.status_code == 200
        assert table.headers["content-type"].startswith("application/json")
        body = table.json()
        assert (body["id"], body["name"], body["rowCount"]) == (LEADS, "Leads", 10)
        keys = [c["key"] for c in body["columns"]]
        assert keys[:8] == [
            "name",
            "email",
            "company",
            "website",
            "title",
            "linkedin",
            "industry",
            "employee_count",
        ]
        industry = next(c for c in body["columns"] if c["key"] == "industry")
        assert industry == {
            "id": column("industry"),
            "key": "industry",
            "label": "Industry",
            "dataType": "text",
            "field": "company.industry",
            "position": 6,
            "prompt": None,
        }
        browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        page = client.get(f"/tables/{LEADS}", headers={"Accept": browser})
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "<html" in page.text.lower()
        as_json = client.get(f"/tables/{LEADS}", headers={"Accept": "application/json"})
        assert as_json.json() == body


def test_rows_paged(server: Server) -> None:
    with server.client() as client:
        everything = client.get(f"/tables/{LEADS}/rows").json()
        assert (everything["total"], everything["page"], everything["limit"]) == (10, 1, 100)
        assert [r["id"] for r in everything["items"]] == [row(n) for n in range(1, 11)]
        assert [r["position"] for r in everything["items"]] == list(range(10))
        third = client.get(f"/tables/{LEADS}/rows", params={"page": 3, "limit": 4}).json()
        assert [r["id"] for r in third["items"]] == [row(9), row(10)]
        assert third["total"] == 10
        ada = everything["items"][0]
        assert ada["data"]["name"] == "Ada Lovelace"
        assert set(ada) == {
            "id",
            "position",
            "data",
            "meta",
            "status",
            "confidence",
            "error",
            "lastRunAt",
        }


def test_add_column(server: Server) -> None:
    with server.client() as client:
        table = upload(client, b"company,website\nW3C,w3.org\n", name="Columns").json()
        path = f"/tables/{table['id']}/columns"
        added = client.post(path, json={"key": "industry", "label": "Sector"})
        assert added.status_code == 201, added.text
        assert {k: v for k, v in added.json().items() if k != "id"} == {
            "key": "industry",
            "label": "Sector",
            "dataType": "text",
            "field": "company.industry",
            "position": 2,
            "prompt": None,
        }
        explicit = client.post(
            path, json={"key": "size", "dataType": "number", "field": "company.employee_count"}
        )
        assert explicit.status_code == 201, explicit.text
        assert (explicit.json()["field"], explicit.json()["dataType"]) == (
            "company.employee_count",
            "number",
        )
        notes = client.post(path, json={"key": "notes"})
        assert notes.status_code == 201 and notes.json()["field"] is None
        columns = client.get(f"/tables/{table['id']}").json()["columns"]
        assert [c["key"] for c in columns] == ["company", "website", "industry", "size", "notes"]

        duplicate = client.post(path, json={"key": "industry"})
        assert duplicate.status_code == 422
        assert "industry" in duplicate.json()["detail"]
        bad_key = client.post(path, json={"key": "no spaces please"})
        assert bad_key.status_code == 422
        assert bad_key.json()["detail"][0]["loc"] == ["body", "key"]
        assert len(client.get(f"/tables/{table['id']}").json()["columns"]) == 5

        # An AI column: its cells are the LLM's answers, asked once per company.
        question = "Does {company} sell to enterprises? Answer yes or no."
        ai = client.post(path, json={"key": "enterprise", "prompt": question})
        assert ai.status_code == 201, ai.text
        assert (ai.json()["prompt"], ai.json()["field"]) == (question, None)
        for body, words in (
            ({"key": "ai_bad", "prompt": "Is {ceo} nice?"}, "unknown placeholder {ceo}"),
            ({"key": "ai_braces", "prompt": "Is {company nice?"}, "braces"),
            ({"key": "ai_both", "prompt": question, "field": "company.industry"}, "both"),
        ):
            refused = client.post(path, json=body)
            assert refused.status_code == 422, refused.text
            assert words in refused.json()["detail"], refused.text
        assert len(client.get(f"/tables/{table['id']}").json()["columns"]) == 6


def test_edit_cell(server: Server) -> None:
    with server.client() as client:
        table = upload(client, b"company,website,notes\nW3C,w3.org,\n", name="Edits").json()
        row_id = client.get(f"/tables/{table['id']}/rows").json()["items"][0]["id"]
        notes = next(c["id"] for c in table["columns"] if c["key"] == "notes")
        path = f"/tables/{table['id']}/rows/{row_id}/cells/{notes}"
        edited = client.put(path, json={"value": "call back in May"})
        assert edited.status_code == 200, edited.text
        assert edited.json()["data"] == {
            "company": "W3C",
            "website": "w3.org",
            "notes": "call back in May",
        }
        assert client.get(f"/tables/{table['id']}/rows").json()["items"][0] == edited.json()
        structured = client.put(path, json={"value": {"tags": ["a", "b"], "n": 2}})
        assert structured.json()["data"]["notes"] == {"tags": ["a", "b"], "n": 2}
        emptied = client.put(path, json={"value": None})
        # Postgres keeps the key as null, SQLite's json_patch drops it: empty either way.
        assert emptied.status_code == 200 and emptied.json()["data"].get("notes") is None


def test_an_edit_replaces_the_cells_provenance_and_the_row_status_follows(
    server: Server,
) -> None:
    """A cell a job failed (no identifier), then typed in by a user: its meta no longer claims
    an engine outcome, the row is no longer `failed`, and the job's task list moves on."""
    with server.client() as client:
        table = upload(client, b"company,industry\n,\n", name="Provenance").json()
        industry = next(c["id"] for c in table["columns"] if c["key"] == "industry")
        row_id = client.get(f"/tables/{table['id']}/rows").json()["items"][0]["id"]
        queued = enqueue(client, {"columnIds": [industry], "rowIds": [row_id]}, table=table["id"])
        job = server.wait_for_job(table["id"], queued["jobId"])
        assert job["failedTasks"] == 1  # nothing identifies the company
        before = client.get(f"/tables/{table['id']}/rows").json()["items"][0]
        assert before["status"] == "failed" and before["meta"]["industry"]["status"] == "failed"

        edited = client.put(
            f"/tables/{table['id']}/rows/{row_id}/cells/{industry}", json={"value": "Retail"}
        )
        assert edited.status_code == 200, edited.text
        row = edited.json()
        assert row["data"]["industry"] == "Retail"
        cell = row["meta"]["industry"]
        assert cell["source"] == "user" and cell["edited_at"]
        assert not cell.get("status") and not cell.get("error") and not cell.get("request_id")
        assert (row["status"], row["error"]) == ("idle", None)  # no engine outcome left
        tasks = client.get(f"{job_path(queued['jobId'], table['id'])}/tasks").json()
        assert tasks["total"] == 0  # the job's outcome for that cell is gone with it


# -- hostile input: refused with a 4xx, never a 500, never stored half-way --------------------------

HOSTILE_VALUES = {
    "NUL in text": b'{"value": "a\\u0000b"}',
    "NUL in a key": b'{"value": {"k\\u0000": 1}}',
    "lone surrogate": b'{"value": "a\\ud800b"}',
    "NaN": b'{"value": NaN}',
    "Infinity": b'{"value": Infinity}',
    "1e400": b'{"value": 1e400}',
}


@pytest.mark.parametrize("body", HOSTILE_VALUES.values(), ids=HOSTILE_VALUES.keys())
def test_hostile_cell_value_is_not_a_500(server: Server, body: bytes) -> None:
    """A value JSON can carry but a table cannot hold (Postgres' JSONB refuses \\u0000, UTF-8
    refuses a lone surrogate, JSON has no NaN): either stored and read back, or refused with
    a 422; never a 500, and never stored so that the table can no longer be read."""
    with server.client() as client:
        table = upload(client, b"company,notes\nW3C,\n", name="Hostile values").json()
        row_id = client.get(f"/tables/{table['id']}/rows").json()["items"][0]["id"]
        notes = next(c["id"] for c in table["columns"] if c["key"] == "notes")
    with server.client() as client:  # a 500 closes the connection: one client per request
        edit = client.put(
            f"/tables/{table['id']}/rows/{row_id}/cells/{notes}",
            content=body,
            headers={"Content-Type": "application/json"},
        )
    assert edit.status_code in (200, 422), edit.text
    with server.client() as client:
        rows = client.get(f"/tables/{table['id']}/rows")
        assert rows.status_code == 200, "the table can no longer be read"
        stored = rows.json()["items"][0]["data"].get("notes")
        assert stored == (edit.json()["data"]["notes"] if edit.status_code == 200 else "")


NOT_FOUND_OR_INVALID = (404, 422)  # an id in a body: unknown (404) or malformed (422), both fine
HOSTILE_REQUESTS: list[tuple[str, str, bytes | None, tuple[int, ...]]] = [
    # (method, path, raw JSON body, the 4xx expected)
    ("GET", "/tables/tbl%00x", None, (404,)),
    ("GET", "/tables/tbl%00x/rows", None, (404,)),
    ("GET", "/tables/tbl%00x/enrich/jobs", None, (404,)),
    ("GET", job_path("req%00x"), None, (404,)),
    ("GET", f"{job_path('req%00x')}/tasks", None, (404,)),
    ("POST", f"{job_path('req%00x')}/cancel", None, (404,)),
    ("GET", f"/v2/tables/{LEADS}/jobs/req%00x", None, (404,)),
    ("PUT", f"/tables/{LEADS}/rows/row%00x/cells/{column('name')}", b'{"value": 1}', (404,)),
    (
        "POST",
        f"/tables/{LEADS}/enrich",
        b'{"columnIds": ["col_leads_industry"], "rowIds": ["row\\u0000x"]}',
        NOT_FOUND_OR_INVALID,
    ),
    (
        "POST",
        f"/tables/{LEADS}/enrich",
        b'{"cellIds": [{"rowId": "row\\u0000x", "columnId": "col_leads_industry"}]}',
        NOT_FOUND_OR_INVALID,
    ),
    ("POST", f"/tables/{LEADS}/enrich", b'{"columnIds": ["col\\udc00"]}', NOT_FOUND_OR_INVALID),
    (
        "POST",
        f"/tables/{LEADS}/enrich",
        b'{"wholeTable": true, "idempotencyKey": "\\udc00"}',
        (422,),
    ),
    ("POST", f"/tables/{LEADS}/columns", b'{"key": "fine", "label": "\\ud800"}', (422,)),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    HOSTILE_REQUESTS,
    ids=[f"{m} {p} {b!r}"[:80] for m, p, b, _ in HOSTILE_REQUESTS],
)
def test_hostile_ids_are_4xx(
    server: Server, method: str, path: str, body: bytes | None, expected: tuple[int, ...]
) -> None:
    """A NUL (which Postgres' text cannot hold) or a lone surrogate (which UTF-8 cannot encode)
    in an id, a key or a label: the same 404/422 as any unknown id or bad field, on both
    databases, and nothing written."""
    with server.client() as client:
        jobs = client.get(f"/tables/{LEADS}/enrich/jobs").json()["total"]
        columns = client.get(f"/tables/{LEADS}").json()["columns"]
    with server.client() as client:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        response = client.request(method, path, content=body, headers=headers)
    assert response.status_code in expected, response.text
    assert response.json()["detail"]
    with server.client() as client:
        assert client.get(f"/tables/{LEADS}/enrich/jobs").json()["total"] == jobs
        assert client.get(f"/tables/{LEADS}").json()["columns"] == columns


# -- a user's edit while a job runs, and cancelling a running job -----------------------------------


def test_edit_while_job_runs_is_kept(slow: Server) -> None:
    """The job has read its rows and is waiting on its providers when the user edits one of its
    cells: the job finishes, writes the other cells and keeps the user's value (counted
    skipped, said in its message)."""
    cells = grid(["industry"], [row(1), row(2), row(3)])
    with slow.client() as client:
        queued = enqueue(client, cells)
        wait_for(
            lambda: client.get(job_path(queued["jobId"])).json(),
            lambda job: job["state"] == "running" and job["entities"] > 0,
            timeout=60,
        )  # detection has read the rows; the providers take SLOW_LATENCY_S to answer
        edit = client.put(
            f"/tables/{LEADS}/rows/{row(2)}/cells/{column('industry')}",
            json={"value": "Typed by a person"},
        )
        assert edit.status_code == 200
        during = client.get(job_path(queued["jobId"])).json()
        assert (during["phase"], during["rowsWritten"], during["doneTasks"]) == (
            "enriching",
            0,
            0,
        ), "the edit must land before the job writes, or this test proves nothing"

        job = slow.wait_for_job(LEADS, queued["jobId"])
        assert (job["status"], job["state"]) == ("completed", "succeeded")
        assert (job["doneTasks"], job["skippedTasks"], job["failedTasks"]) == (2, 1, 0)
        assert "kept" in job["error"]
        data = rows_by_id(client)
        assert data[row(2)]["data"]["industry"] == "Typed by a person"
        # The job wrote no outcome over the edit: the cell's meta is the edit's own.
        assert data[row(2)]["meta"]["industry"]["source"] == "user"
        assert not data[row(2)]["meta"]["industry"].get("status")
        assert data[row(1)]["data"]["industry"] and data[row(3)]["data"]["industry"]
        assert data[row(1)]["data"]["industry"] != "Typed by a person"
        done = client.get(f"{job_path(queued['jobId'])}/tasks", params={"status": "done"})
        assert {t["rowId"] for t in done.json()["items"]} == {row(1), row(3)}


def test_cancel_running_job(slow: Server) -> None:
    with slow.client() as client:
        queued = enqueue(client, grid(["title"], [row(4), row(5)]))
        wait_for(
            lambda: client.get(job_path(queued["jobId"])).json(),
            lambda job: job["state"] == "running",
            timeout=60,
        )
        response = client.post(f"{job_path(queued['jobId'])}/cancel")
        assert response.status_code == 202
        assert response.json()["cancelRequested"] is True
        job = slow.wait_for_job(LEADS, queued["jobId"])
        assert (job["status"], job["state"], job["progress"]) == ("cancelled", "cancelled", 100)
        again = client.post(f"{job_path(queued['jobId'])}/cancel").json()
        assert again["status"] == "cancelled" and again["completedAt"] == job["completedAt"]
        statuses = {r: rows_by_id(client)[r]["status"] for r in (row(4), row(5))}
        assert "queued" not in statuses.values() and "running" not in statuses.values()


# -- a provider that cannot be used (its API key unset) ------------------------------------------


def test_estimate_names_an_unavailable_provider(keyless: Server) -> None:
    """Before anything is bought, the estimate says the premium vendor cannot be used and why,
    prices nothing for it, and counts the cells only it could fill as skipped."""
    with keyless.client() as client:
        table = company_table(client, "Estimated")
        response = client.post(
            f"/v2/tables/{table}/enrich/estimate", params={"wait": 60}, json={"wholeTable": True}
        )
        assert response.status_code == 200, response.text
        job = response.json()
    estimate = job["estimate"]
    premium = estimate["providers"]["premium_company"]
    assert premium["status"] == "unavailable"
    assert MISSING_KEY_ENV in premium["reason"]
    assert (premium["expectedCost"], premium["maxCost"], premium["maxCalls"]) == (0, 0, 0)
    assert estimate["unavailableProviders"] == {"premium_company": premium["reason"]}
    assert estimate["providers"]["cheap_company"]["status"] == "ok"
    # the 3 revenue cells, and the industry cells the cheap vendor is expected to miss
    assert 3 <= estimate["cellsProviderUnavailable"] <= 6
    assert "premium_company" not in estimate["maxProviderCalls"]
    assert 0 < estimate["expectedCost"] <= estimate["maxCost"] == 3.0  # 3 cheap lookups


def test_job_skips_an_unavailable_provider(
    keyless: Server, keyless_mock: MockProviderServer
) -> None:
    """The job names the unusable vendor with its reason, never sends it a request, skips the
    cells only it could fill (not failed one by one), and counts only lookups that were sent."""
    before = keyless_mock.stats()["vendors"]
    with keyless.client() as client:
        table = company_table(client, "Skipped")
        queued = enqueue(client, {"wholeTable": True}, table=table)
        job = keyless.wait_for_job(table, queued["jobId"])
        skipped = client.get(
            f"{job_path(queued['jobId'], table)}/tasks", params={"status": "skipped"}
        ).json()
        failed = client.get(
            f"{job_path(queued['jobId'], table)}/tasks", params={"status": "failed"}
        ).json()
    after = keyless_mock.stats()["vendors"]
    reason = job["unavailableProviders"]["premium_company"]
    assert MISSING_KEY_ENV in reason and set(job["unavailableProviders"]) == {"premium_company"}
    assert job["status"] == "completed"
    assert (job["doneTasks"], job["skippedTasks"], job["failedTasks"]) == (3, 3, 0)
    assert failed["total"] == 0
    assert {t["columnKey"] for t in skipped["items"]} == {"revenue"}
    for task in skipped["items"]:
        assert task["error"].startswith("provider unavailable (premium_company: "), task
    assert f"provider unavailable: premium_company ({reason})" in job["error"]
    assert job["providerCalls"] == {"cheap_company": 3}
    assert job["costByProvider"] == {"cheap_company": 3.0} and job["cost"] == 3.0
    sent = after["cheap"]["requests"] - before.get("cheap", {}).get("requests", 0)
    assert sent == job["providerCalls"]["cheap_company"]
    assert after.get("premium", {}).get("requests", 0) == 0
    # premium's lookups (one per company, for revenue) were counted apart, never sent
    assert job["callsNotSent"] == {"premium_company": {"provider unavailable": 3}}


# -- a queued job (no launcher): cancel, estimate that does not end in time ---------------------


def test_cancel_queued_job(locked: Server) -> None:
    with locked.client() as client:
        queued = enqueue(client, grid(["industry"], [row(4)]))
        assert rows_by_id(client)[row(4)]["status"] == "queued"
        response = client.post(f"{job_path(queued['jobId'])}/cancel")
        assert response.status_code == 202
        job = response.json()
        assert (job["status"], job["state"], job["progress"]) == ("cancelled", "cancelled", 100)
        assert rows_by_id(client)[row(4)]["status"] == "idle"
        assert client.get(job_path(queued["jobId"])).json() == job
        again = client.post(f"{job_path(queued['jobId'])}/cancel")
        assert again.status_code == 202 and again.json() == job


def test_estimate_not_done_in_time_answers_202(locked: Server) -> None:
    with locked.client() as client:
        response = client.post(
            f"/v2/tables/{LEADS}/enrich/estimate", params={"wait": 0}, json={"wholeTable": True}
        )
        assert response.status_code == 202, response.text
        job = response.json()
        assert (job["kind"], job["status"], job["estimate"]) == ("estimate", "pending", None)
        assert job["publicAccessToken"]
        with anonymous(locked) as browser:
            own = browser.get(job_path(job["jobId"]), params={"token": job["publicAccessToken"]})
            assert own.status_code == 200 and own.json()["kind"] == "estimate"


# -- refused input: 404 / 413 / 415 / 422 naming the problem, nothing written -------------------

NOT_FOUND: list[tuple[str, str, dict[str, Any] | None, str]] = [
    ("GET", "/tables/tbl_nope", None, "tbl_nope"),
    ("GET", "/tables/tbl_nope/rows", None, "tbl_nope"),
    ("POST", "/tables/tbl_nope/columns", {"key": "x"}, "tbl_nope"),
    ("POST", "/tables/tbl_nope/enrich", {"wholeTable": True}, "tbl_nope"),
    ("POST", "/v2/tables/tbl_nope/enrich", {"wholeTable": True}, "tbl_nope"),
    ("POST", "/v2/tables/tbl_nope/enrich/estimate", {"wholeTable": True}, "tbl_nope"),
    ("GET", "/tables/tbl_nope/enrich/jobs", None, "tbl_nope"),
    ("POST", f"/tables/{LEADS}/enrich", grid(["industry", "nope"], []), "col_leads_nope"),
    ("POST", f"/tables/{LEADS}/enrich", grid(["industry"], ["row_nope"]), "row_nope"),
    (
        "POST",
        f"/tables/{LEADS}/enrich",
        {"cellIds": [{"rowId": row(1), "columnId": "col_nope"}]},
        "col_nope",
    ),
    (
        "POST",
        f"/tables/{LEADS}/enrich",
        {"cellIds": [{"rowId": "row_nope", "columnId": column("industry")}]},
        "row_nope",
    ),
    ("GET", job_path("req_nope"), None, "req_nope"),
    ("GET", f"/v2/tables/{LEADS}/jobs/req_nope", None, "req_nope"),
    ("GET", f"{job_path('req_nope')}/tasks", None, "req_nope"),
    ("POST", f"{job_path('req_nope')}/cancel", None, "req_nope"),
    ("PUT", f"/tables/{LEADS}/rows/row_nope/cells/{column('name')}", {"value": 1}, "row_nope"),
    ("PUT", f"/tables/{LEADS}/rows/{row(1)}/cells/col_nope", {"value": 1}, "col_nope"),
    ("PUT", f"/tables/tbl_nope/rows/{row(1)}/cells/{column('name')}", {"value": 1}, "tbl_nope"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "named"), NOT_FOUND, ids=[f"{m} {p}" for m, p, *_ in NOT_FOUND]
)
def test_unknown_ids_are_404(
    locked: Server, method: str, path: str, body: dict[str, Any] | None, named: str
) -> None:
    with locked.client() as client:
        before = snapshot(client)
        response = client.request(method, path, json=body)
        assert response.status_code == 404, response.text
        assert named in response.json()["detail"]
        assert snapshot(client) == before


def test_another_tables_job_is_404(locked: Server) -> None:
    """A job id is found only under its own table."""
    with locked.client() as client:
        other = upload(client, leads_csv(1), name="Other").json()["id"]
        queued = enqueue(client, {"wholeTable": True}, table=other)
        for path in (job_path(queued["jobId"]), f"/v2/tables/{LEADS}/jobs/{queued['jobId']}"):
            response = client.get(path)
            assert response.status_code == 404 and queued["jobId"] in response.json()["detail"]
        assert client.post(f"{job_path(queued['jobId'])}/cancel").status_code == 404
        assert client.get(job_path(queued["jobId"], other)).json()["status"] == "pending"


ENRICH = f"/tables/{LEADS}/enrich"
INVALID: list[tuple[str, str, Any, str]] = [
    # (method, path, JSON body or raw bytes, the field the 422 must name)
    ("POST", ENRICH, b'{"wholeTable": tru', "body"),
    ("POST", ENRICH, b"", "body"),
    ("POST", ENRICH, {"columnIds": "col_leads_industry"}, "columnIds"),
    ("POST", ENRICH, {"cellIds": [{"rowId": row(1)}]}, "columnId"),
    ("POST", ENRICH, {"wholeTable": "yes please"}, "wholeTable"),
    ("POST", ENRICH, {"wholeTable": True, "colour": "blue"}, "colour"),
    ("POST", ENRICH, {"wholeTable": True, "columnIds": [column("industry")]}, "columnIds"),
    ("POST", ENRICH, {}, "wholeTable"),
    ("POST", ENRICH, {"rowIds": [row(1)], "cellIds": []}, "rowIds"),
    ("POST", ENRICH, {"wholeTable": True, "overwrite": True}, "overwrite"),
    ("POST", ENRICH, {"wholeTable": True, "budget": -1}, "budget"),
    ("POST", ENRICH, {"wholeTable": True, "idempotencyKey": ""}, "idempotencyKey"),
    ("POST", f"/v2{ENRICH}", {"wholeTable": True, "cellIds": [{}]}, "rowId"),
    ("POST", f"/v2{ENRICH}/estimate?wait=61", {"wholeTable": True}, "wait"),
    ("POST", f"/v2{ENRICH}/estimate?wait=soon", {"wholeTable": True}, "wait"),
    ("GET", f"/tables/{LEADS}/enrich/jobs?limit=0", None, "limit"),
    ("GET", f"/tables/{LEADS}/rows?limit=501", None, "limit"),
    ("GET", "/tables?page=0", None, "page"),
    ("GET", f"{job_path('req_any')}/tasks?status=exploded", None, "status"),
    ("POST", f"/tables/{LEADS}/columns", {"key": "ok", "dataType": "colour"}, "dataType"),
    ("POST", f"/tables/{LEADS}/columns", {"label": "no key"}, "key"),
    ("POST", f"/tables/{LEADS}/columns", {"key": "name"}, "name"),
    ("PUT", f"/tables/{LEADS}/rows/{row(1)}/cells/{column('name')}", {}, "value"),
    (
        "PUT",
        f"/tables/{LEADS}/rows/{row(1)}/cells/{column('name')}",
        {"value": "x", "by": "me"},
        "by",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    INVALID,
    ids=[f"{m} {p} {b!r}"[:90] for m, p, b, _ in INVALID],
)
def test_invalid_input_is_422_naming_the_field(
    locked: Server, method: str, path: str, body: Any, field: str
) -> None:
    with locked.client() as client:
        before = snapshot(client)
        if isinstance(body, bytes):
            sent = client.request(
                method, path, content=body, headers={"Content-Type": "application/json"}
            )
        else:
            sent = client.request(method, path, json=body)
        assert sent.status_code == 422, sent.text
        detail = sent.json()["detail"]
        if isinstance(detail, list):  # FastAPI's own: the field is in `loc` (or the message)
            named = [str(part) for error in detail for part in error["loc"]]
            named += [error["msg"] for error in detail]
            assert any(field in text for text in named), detail
        else:
            assert field in detail
        assert snapshot(client) == before


def test_upload_without_file_is_422(locked: Server) -> None:
    with locked.client() as client:
        tables = client.get("/tables").json()["total"]
        no_file = client.post("/tables", data={"name": "nothing"}, files={"other": ("a", b"x")})
        assert no_file.status_code == 422 and "file" in no_file.json()["detail"]
        extra = client.post(
            "/tables", data={"name": "x", "nmae": "typo"}, files={"file": ("a.csv", b"a\n1\n")}
        )
        assert extra.status_code == 422 and "'nmae'" in extra.json()["detail"]
        as_json = client.post("/tables", json={"file": "a,b\n1,2\n"})
        assert as_json.status_code == 415 and "multipart" in as_json.json()["detail"]
        assert client.get("/tables").json()["total"] == tables


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"", "empty"),
        (b"name,email\nAda,ada@analytical.io\nBad\xff\xfebyte,x\n", "UTF-8"),
        (b"name,email\nAda,ada@analytical.io,extra\n", "3 fields"),
        (b"name,email\nA\x00da,x\n", "NUL"),
        (b"name,name\nAda,Ada\n", "name"),
    ],
    ids=["empty", "bad-encoding", "ragged", "nul", "duplicate-header"],
)
def test_malformed_csv_is_422(locked: Server, content: bytes, named: str) -> None:
    with locked.client() as client:
        tables = client.get("/tables").json()["total"]
        response = upload(client, content, name="Malformed")
        assert response.status_code == 422, response.text
        assert named in response.json()["detail"]
        assert client.get("/tables").json()["total"] == tables


def test_upload_in_another_encoding(locked: Server) -> None:
    """A Windows-1252 file: refused as UTF-8 with advice in the upload's own terms (a form
    field, not a CLI option), then read right with `encoding`."""
    content = "company,city\nSociété Générale,Paris\n".encode("cp1252")
    with locked.client() as client:
        refused = upload(client, content, name="Latin")
        assert refused.status_code == 422
        detail = refused.json()["detail"]
        assert "encoding=cp1252" in detail and "--encoding" not in detail
        accepted = client.post(
            "/tables",
            data={"name": "Latin", "encoding": "cp1252"},
            files={"file": ("latin.csv", content, "text/csv")},
        )
        assert accepted.status_code == 201, accepted.text
        rows = client.get(f"/tables/{accepted.json()['id']}/rows").json()["items"]
        assert rows[0]["data"]["company"] == "Société Générale"
        unknown = client.post(
            "/tables", data={"encoding": "klingon"}, files={"file": ("a.csv", content)}
        )
        assert unknown.status_code == 422 and "klingon" in unknown.json()["detail"]
        for hostile in ("utf\x008", "undefined"):  # were 500s (found by schemathesis)
            answer = client.post(
                "/tables", data={"encoding": hostile}, files={"file": ("a.csv", content)}
            )
            assert answer.status_code == 422, (hostile, answer.text)


def test_oversize_upload_is_413(locked: Server) -> None:
    """Over GLAZE_MAX_UPLOAD_MB (1 here): refused by its declared length, and, sent chunked
    without one, as soon as the body passes the limit. No table is made either way."""
    big = b"company,website\n" + b"Acme,acme.example.com\n" * 60_000  # 1.3 MB
    assert len(big) > 1024 * 1024
    with locked.client() as client:
        tables = client.get("/tables").json()["total"]
        declared = upload(client, big, name="Too big")
        assert declared.status_code == 413
        assert "1 MB" in declared.json()["detail"]

        boundary = "glaze-test-boundary"

        def chunks() -> Iterator[bytes]:
            yield (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="big.csv"\r\nContent-Type: text/csv\r\n\r\n'
            ).encode()
            for start in range(0, len(big), 64 * 1024):
                yield big[start : start + 64 * 1024]
            yield f"\r\n--{boundary}--\r\n".encode()

        streamed = client.post(
            "/tables",
            content=chunks(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert "content-length" not in {k.lower() for k in streamed.request.headers}
        assert streamed.status_code == 413
        assert client.get("/tables").json()["total"] == tables
        names = {t["name"] for t in client.get("/tables", params={"limit": 500}).json()["items"]}
        assert "Too big" not in names and "big" not in names


# -- auth: keys, public job tokens, the login link ---------------------------------------------


def anonymous(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=30)


def test_health_is_open(locked: Server) -> None:
    with anonymous(locked) as client:
        response = client.get("/health")
        assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/tables", None),
        ("GET", f"/tables/{LEADS}", None),
        ("GET", f"/tables/{LEADS}/rows", None),
        ("GET", f"/tables/{LEADS}/enrich/jobs", None),
        ("POST", f"/tables/{LEADS}/enrich", {"wholeTable": True}),
        ("POST", f"/v2/tables/{LEADS}/enrich/estimate?wait=0", {"wholeTable": True}),
        ("POST", f"/tables/{LEADS}/columns", {"key": "auth_probe"}),
        ("PUT", f"/tables/{LEADS}/rows/{row(1)}/cells/{column('title')}", {"value": "x"}),
    ],
)
def test_api_key_required(locked: Server, method: str, path: str, body: Any) -> None:
    with locked.client() as keyed:
        before = snapshot(keyed)
    with anonymous(locked) as client:
        missing = client.request(method, path, json=body)
        assert missing.status_code == 401, missing.text
        assert missing.headers["www-authenticate"] == "Bearer"
        assert "API key" in missing.json()["detail"]
        wrong = client.request(
            method, path, json=body, headers={"Authorization": f"Bearer {API_KEY}x"}
        )
        assert wrong.status_code == 401
        not_bearer = client.request(method, path, json=body, headers={"Authorization": API_KEY})
        assert not_bearer.status_code == 401
    with locked.client() as keyed:
        assert snapshot(keyed) == before
        if method == "GET":
            assert keyed.request(method, path).status_code == 200


@pytest.fixture(scope="module")
def two_jobs(locked: Server) -> dict[str, Any]:
    """Two queued jobs on Leads and one on another table, each with its public token."""
    with locked.client() as client:
        other = upload(client, leads_csv(1), name="Token table").json()["id"]
        return {
            "mine": enqueue(client, {"cellIds": [{"rowId": row(7), "columnId": column("title")}]}),
            "another": enqueue(
                client, {"cellIds": [{"rowId": row(8), "columnId": column("title")}]}
            ),
            "other_table": enqueue(client, {"wholeTable": True}, table=other),
            "other_table_id": other,
        }


def test_public_token_reads_its_own_job(locked: Server, two_jobs: dict[str, Any]) -> None:
    mine = two_jobs["mine"]
    token = mine["publicAccessToken"]
    claims = jwt.decode(token, TEST_TOKEN_SECRET, algorithms=["HS256"])
    assert (claims["sub"], claims["tbl"], claims["scope"]) == (mine["jobId"], LEADS, "job:read")
    assert claims["exp"] - claims["iat"] == 3600
    with anonymous(locked) as client:
        by_query = client.get(job_path(mine["jobId"]), params={"token": token})
        assert by_query.status_code == 200 and by_query.json()["jobId"] == mine["jobId"]
        by_bearer = client.get(
            job_path(mine["jobId"]), headers={"Authorization": f"Bearer {token}"}
        )
        assert by_bearer.status_code == 200 and by_bearer.json() == by_query.json()
        v2 = client.get(f"/v2/tables/{LEADS}/jobs/{mine['jobId']}", params={"token": token})
        assert v2.status_code == 200 and v2.json()["entityCount"] == 0


def test_public_token_refused_for_anything_else(locked: Server, two_jobs: dict[str, Any]) -> None:
    mine, another, elsewhere = two_jobs["mine"], two_jobs["another"], two_jobs["other_table"]
    other_table = two_jobs["other_table_id"]
    token = mine["publicAccessToken"]
    bearer = {"Authorization": f"Bearer {token}"}
    forbidden_reads = [
        job_path(another["jobId"]),
        f"/v2/tables/{LEADS}/jobs/{another['jobId']}",
        job_path(mine["jobId"], other_table),  # its job id under another table
        job_path(elsewhere["jobId"], other_table),
        f"{job_path(mine['jobId'])}/tasks",  # the token reads the job, not its cells
        f"/tables/{LEADS}/enrich/jobs",
        f"/tables/{LEADS}",
        f"/tables/{LEADS}/rows",
        "/tables",
    ]
    with locked.client() as keyed:
        before = snapshot(keyed)
    with anonymous(locked) as client:
        for path in forbidden_reads:
            response = client.get(path, headers=bearer)
            assert response.status_code == 403, (path, response.text)
        for path in forbidden_reads[:4]:
            assert client.get(path, params={"token": token}).status_code == 403, path
        writes: list[tuple[str, str, Any]] = [
            ("POST", f"/tables/{LEADS}/enrich", {"wholeTable": True}),
            ("POST", f"/v2/tables/{LEADS}/enrich", {"wholeTable": True}),
            ("POST", f"{job_path(mine['jobId'])}/cancel", None),
            ("POST", f"/tables/{LEADS}/columns", {"key": "by_token"}),
            ("PUT", f"/tables/{LEADS}/rows/{row(7)}/cells/{column('title')}", {"value": "x"}),
        ]
        for method, path, body in writes:
            response = client.request(method, path, json=body, headers=bearer)
            assert response.status_code in (401, 403), (path, response.text)
            query = client.request(method, path, json=body, params={"token": token})
            assert query.status_code in (401, 403), (path, query.text)
        upload_response = client.post(
            "/tables", files={"file": ("t.csv", b"a\n1\n")}, headers=bearer
        )
        assert upload_response.status_code in (401, 403)
    with locked.client() as keyed:
        assert snapshot(keyed) == before
        assert keyed.get(job_path(mine["jobId"])).json()["status"] == "pending"


def forged(claims: dict[str, Any], secret: str = TEST_TOKEN_SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def test_expired_and_tampered_tokens_are_401(locked: Server, two_jobs: dict[str, Any]) -> None:
    mine = two_jobs["mine"]
    now = int(time.time())
    claims = {"sub": mine["jobId"], "tbl": LEADS, "scope": "job:read"}
    valid = mine["publicAccessToken"]
    header, payload, signature = valid.split(".")
    flipped = signature[:-2] + ("AA" if not signature.endswith("AA") else "BB")
    bad_tokens = {
        "expired": forged({**claims, "iat": now - 7200, "exp": now - 3600}),
        "tampered signature": f"{header}.{payload}.{flipped}",
        "tampered claims": f"{header}.{forged({**claims, 'iat': now, 'exp': now + 60}).split('.')[1]}.{signature}",
        "another secret": forged({**claims, "iat": now, "exp": now + 60}, "not-the-secret-" * 3),
        "no expiry": forged({**claims, "iat": now}),
        "alg none": jwt.encode({**claims, "iat": now, "exp": now + 60}, None, algorithm="none"),
        "garbage": "not.a.token",
    }
    with anonymous(locked) as client:
        for name, token in bad_tokens.items():
            by_query = client.get(job_path(mine["jobId"]), params={"token": token})
            assert by_query.status_code == 401, (name, by_query.text)
            by_bearer = client.get(
                job_path(mine["jobId"]), headers={"Authorization": f"Bearer {token}"}
            )
            assert by_bearer.status_code == 401, (name, by_bearer.text)
        signer_token, _ = TokenSigner(TEST_TOKEN_SECRET).issue_job_token(mine["jobId"], LEADS)
        assert client.get(job_path(mine["jobId"]), params={"token": signer_token}).is_success


def test_login_link_sets_session_once(locked: Server) -> None:
    token = TokenSigner(TEST_TOKEN_SECRET).issue_login()
    with anonymous(locked) as client:
        assert client.get("/tables").status_code == 401
        login = client.get("/login", params={"token": token, "next": f"/tables/{LEADS}"})
        assert login.status_code == 303
        assert login.headers["location"] == f"/tables/{LEADS}"
        cookie = login.headers["set-cookie"]
        assert cookie.startswith("glaze_session=")
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert client.cookies.get("glaze_session")
        assert client.get("/tables").status_code == 200  # the cookie authorizes the API
        assert client.get(f"/tables/{LEADS}/rows").status_code == 200

    with anonymous(locked) as client:
        again = client.get("/login", params={"token": token, "next": f"/tables/{LEADS}"})
        assert again.status_code == 401
        assert "set-cookie" not in again.headers
        assert client.get("/tables").status_code == 401
        forged_cookie = forged({"scope": "session", "iat": 0, "exp": 1})
        client.cookies.set("glaze_session", forged_cookie)
        assert client.get("/tables").status_code == 401


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example",
        "https://evil.example/",
        "/\\evil.example",  # a browser reads a backslash as a slash
        "/\t/evil.example",  # and drops tabs and newlines
        "/\n/evil.example",
        "evil.example",
        "///evil",
    ],
)
def test_login_never_redirects_off_site(locked: Server, target: str) -> None:
    token = TokenSigner(TEST_TOKEN_SECRET).issue_login()
    with anonymous(locked) as client:
        login = client.get("/login", params={"token": token, "next": target})
        assert login.status_code == 303
        location = login.headers["location"]
        # A path on this server, which no browser can read as another host.
        assert location.startswith("/") and not location.startswith("//"), location
        assert not any(c in location for c in "\\\t\n\r"), location
        assert httpx.URL(locked.base_url).join(location).host == "127.0.0.1"


def test_tokens_and_keys_never_logged(locked: Server, two_jobs: dict[str, Any]) -> None:
    job_token = two_jobs["mine"]["publicAccessToken"]
    login_token = TokenSigner(TEST_TOKEN_SECRET).issue_login()
    with anonymous(locked) as client:
        client.get(job_path(two_jobs["mine"]["jobId"]), params={"token": job_token})
        client.get(job_path(two_jobs["another"]["jobId"]), params={"token": job_token})
        client.get("/login", params={"token": login_token, "next": "/"})
        client.get("/tables", params={"token": job_token})
    with locked.client() as keyed:
        assert keyed.get("/tables").status_code == 200
    log = wait_for(
        lambda: {"log": locked.log()}, lambda seen: '"GET /tables HTTP/1.1" 200' in seen["log"], 10
    )["log"]
    access = [line for line in log.splitlines() if '"GET /' in line]
    assert any("/login" in line for line in access)  # the requests are logged, tokens are not
    assert not [line for line in access if "token" in line]
    for secret in (job_token, login_token, API_KEY, TEST_TOKEN_SECRET):
        assert secret not in log


def test_page_shell_needs_no_key(locked: Server) -> None:
    with anonymous(locked) as client:
        page = client.get(f"/tables/{LEADS}", headers={"Accept": "text/html"})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "Ada Lovelace" not in page.text  # a shell: its data comes through the API
        unknown = client.get("/tables/tbl_nope", headers={"Accept": "text/html"})
        assert unknown.status_code == 200 and unknown.text == page.text
        assert (
            client.get(f"/tables/{LEADS}", headers={"Accept": "application/json"}).status_code
            == 401
        )


# -- glaze serve refuses to be open beyond loopback ----------------------------------------------


def test_serve_without_key_refuses_public_host(tmp_path: Path) -> None:
    env = server_env(tmp_path)
    done = subprocess.run(
        [*GLAZE, "serve", "--host", "0.0.0.0", "--port", "1", "--no-launcher"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "GLAZE_API_KEYS" in done.stderr + done.stdout


def test_fresh_token_for_a_job_needs_a_key(locked: Server, two_jobs: dict[str, Any]) -> None:
    """A page opened while a job runs asks for a token to follow it; only full access may."""
    mine, another = two_jobs["mine"], two_jobs["another"]
    path = f"{job_path(mine['jobId'])}/token"
    with anonymous(locked) as client:
        assert client.post(path).status_code == 401
        refused = client.post(
            path, headers={"Authorization": f"Bearer {mine['publicAccessToken']}"}
        )
        assert refused.status_code == 403  # a token cannot mint tokens, not even its own job's
    with locked.client() as keyed:
        issued = keyed.post(path)
        assert issued.status_code == 200, issued.text
        assert keyed.post(f"{job_path('req_nope')}/token").status_code == 404
    token = issued.json()["publicAccessToken"]
    claims = jwt.decode(token, TEST_TOKEN_SECRET, algorithms=["HS256"])
    assert (claims["sub"], claims["tbl"]) == (mine["jobId"], LEADS)
    with anonymous(locked) as client:
        assert client.get(job_path(mine["jobId"]), params={"token": token}).status_code == 200
        assert client.get(job_path(another["jobId"]), params={"token": token}).status_code == 403
