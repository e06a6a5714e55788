"""Seed 003's AI endpoints over real HTTP: a real `glaze serve` (launcher, Dagster runs) asking
the mock LLM (`glaze mock-llm`'s server) on loopback.

The whole flow a user goes through: `POST /ai` with a context, follow the job (its token, its
stream), read the proposal, accept it into a real table, enrich that table (its AI column
filled through the LLM, once per company); and the refusals on the way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from glaze_pipeline.testing.mock_llm import MockLlmServer
from glaze_pipeline_tests import llm_helpers
from glaze_pipeline_tests.api_helpers import Server, served
from glaze_pipeline_tests.test_realtime import stream

API_KEY = "ai-test-api-key-0123456789abcdef"
CONTEXT = "B2B payment companies in the Nordics, for outbound sales"


llm_server = llm_helpers.llm_server
llm = llm_helpers.llm


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, llm_server: MockLlmServer) -> Iterator[Server]:
    """API keys, the launcher, the mock LLM (SQLite: the embedded default)."""
    home = tmp_path_factory.mktemp("serve-ai")
    with served(
        home,
        api_key=API_KEY,
        extra_env={"GLAZE_LLM_BASE_URL": llm_server.url, "GLAZE_LLM_MODEL": "glaze-mock-1"},
    ) as running:
        yield running


def wait_for_ai_job(server: Server, job_id: str, *, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with server.client() as client:
        while True:
            job = client.get(f"/ai/jobs/{job_id}").json()
            if job["status"] in ("completed", "failed"):
                return dict(job)
            if time.monotonic() > deadline:
                raise AssertionError(f"AI job {job_id} did not end in {timeout}s: {job}")
            time.sleep(0.1)


def wait_for_enrich_job(
    server: Server, table_id: str, job_id: str, timeout: float = 60.0
) -> dict[str, Any]:
    return server.wait_for_job(table_id, job_id, timeout=timeout)


def test_generate_accept_enrich(server: Server, llm: MockLlmServer) -> None:
    with server.client() as client:
        queued = client.post("/ai", json={"context": CONTEXT, "rows": 5})
        assert queued.status_code == 202, queued.text
        body = queued.json()
        assert body["kind"] == "table_generation"
        assert body["status"] == "pending"
        job_id, table_id, token = body["jobId"], body["tableId"], body["publicAccessToken"]

        # The job's token reads the job and its stream, nothing else.
        with stream(server.base_url, job_id, token) as events:
            finished = events.until(lambda e: e.name == "finished", timeout=60)
        assert finished[-1].data["status"] == "completed", finished[-1].data
        job = client.get(f"/ai/jobs/{job_id}", params={"token": token}, headers={}).json()
        assert job["status"] == "completed", job
        assert job["progress"] == 100
        assert job["startedAt"] and job["completedAt"]
        result = job["result"]
        assert result["table"]["name"]
        keys = [column["key"] for column in result["columns"]]
        assert len(keys) == len(set(keys)) > 0
        assert 0 < len(result["rows"]) <= 5
        assert result["promptVersions"]
        # Each step was given the ones before: rows were asked with the columns proposed.
        assert llm.stats()["requests"] >= 3

        # The table does not exist until the proposal is accepted.
        assert client.get(f"/tables/{table_id}").status_code == 404
        accepted = client.post(f"/ai/jobs/{job_id}/accept", json={})
        assert accepted.status_code == 200, accepted.text
        first = accepted.json()
        assert first["tableId"] == table_id
        assert first["created"] is True
        assert first["rowsAdded"] == len(result["rows"])
        again = client.post(f"/ai/jobs/{job_id}/accept").json()
        assert again["tableId"] == table_id
        assert again["rowsAdded"] == 0 and again["columnsAdded"] == []

        table = client.get(f"/tables/{table_id}").json()
        assert [c["key"] for c in table["columns"]] == keys
        assert table["rowCount"] == len(result["rows"])
        ai_columns = [c for c in table["columns"] if c["prompt"]]

        # Enrich the accepted table: its catalogue and AI columns fill.
        enrich = client.post(f"/tables/{table_id}/enrich", json={"wholeTable": True})
        assert enrich.status_code == 202, enrich.text
        done = wait_for_enrich_job(server, table_id, enrich.json()["jobId"])
        assert done["status"] == "completed", done
        rows = client.get(f"/tables/{table_id}/rows").json()["items"]
        for column in ai_columns:
            assert all(row["data"].get(column["key"]) for row in rows), rows


def test_single_operations_on_an_existing_table(server: Server) -> None:
    with server.client() as client:
        columns = client.post(
            "/ai/column-suggestions", json={"tableId": "tbl_leads", "context": CONTEXT}
        )
        assert columns.status_code == 202, columns.text
        job = wait_for_ai_job(server, columns.json()["jobId"])
        assert job["status"] == "completed", job
        existing = {c["key"] for c in client.get("/tables/tbl_leads").json()["columns"]}
        # Nothing proposed clashes with a column the table has.
        assert not existing & {c["key"] for c in job["result"]["columns"]}

        rows = client.post(
            "/ai/row-suggestions", json={"tableId": "tbl_leads", "context": CONTEXT, "count": 3}
        )
        assert rows.status_code == 202, rows.text
        job = wait_for_ai_job(server, rows.json()["jobId"])
        assert job["status"] == "completed", job
        assert 0 < len(job["result"]["rows"]) <= 3

        table = client.post("/ai/table-suggestions", json={"context": CONTEXT})
        assert table.status_code == 202, table.text
        job = wait_for_ai_job(server, table.json()["jobId"])
        assert job["status"] == "completed", job
        assert job["result"]["table"]["name"]


def test_bad_input_is_refused_and_nothing_is_queued(server: Server) -> None:
    with server.client() as client:
        for body, code, words in (
            ({"context": ""}, 422, "context"),
            ({"context": "   "}, 422, "context"),
            ({"context": "x" * 100_000}, 422, "context"),
            ({"context": CONTEXT, "rows": 0}, 422, "rows"),
            ({"context": CONTEXT, "rows": 10_000}, 422, "rows"),
            ({"context": CONTEXT, "colour": "red"}, 422, "colour"),
        ):
            answer = client.post("/ai", json=body)
            assert answer.status_code == code, (body, answer.text)
            assert words in answer.text
        unknown = client.post(
            "/ai/column-suggestions", json={"tableId": "tbl_nope", "context": CONTEXT}
        )
        assert unknown.status_code == 404
        assert "tbl_nope" in unknown.text
        extend = client.post("/ai", json={"tableId": "tbl_nope", "context": CONTEXT})
        assert extend.status_code == 404 and "tbl_nope" in extend.text
        assert client.get("/ai/jobs/req_0000000000000000").status_code == 404
        # An enrichment job is not an AI job.
        enrich = client.post(
            "/tables/tbl_leads/enrich",
            json={"columnIds": ["col_leads_industry"], "rowIds": ["row_leads_01"]},
        ).json()
        assert client.get(f"/ai/jobs/{enrich['jobId']}").status_code == 404


def test_keys_and_tokens(server: Server) -> None:
    with server.client() as client:
        first = client.post("/ai/table-suggestions", json={"context": CONTEXT}).json()
        second = client.post("/ai/table-suggestions", json={"context": CONTEXT + "!"}).json()
    for job in (first, second):  # done before the next test queues its faults
        assert wait_for_ai_job(server, job["jobId"])["status"] == "completed"
    import httpx

    with httpx.Client(base_url=server.base_url, timeout=30) as anonymous:
        assert anonymous.post("/ai", json={"context": CONTEXT}).status_code == 401
        assert anonymous.get(f"/ai/jobs/{first['jobId']}").status_code == 401
        mine = anonymous.get(
            f"/ai/jobs/{first['jobId']}", params={"token": first["publicAccessToken"]}
        )
        assert mine.status_code == 200
        theirs = anonymous.get(
            f"/ai/jobs/{second['jobId']}", params={"token": first["publicAccessToken"]}
        )
        assert theirs.status_code == 403
        # A token reads; it does not accept or cancel.
        assert (
            anonymous.post(
                f"/ai/jobs/{first['jobId']}/cancel", params={"token": first["publicAccessToken"]}
            ).status_code
            == 401
        )


def test_cancel_a_running_ai_job(server: Server, llm: MockLlmServer) -> None:
    # Every table proposal hangs until the test ends (the reset), so the job is mid-call.
    llm.faults([{"mode": "hang", "timeout_s": 60, "times": 100, "operation": "table_suggestions"}])
    try:
        with server.client() as client:
            job_id = client.post("/ai/table-suggestions", json={"context": CONTEXT}).json()["jobId"]
            deadline = time.monotonic() + 30
            while client.get(f"/ai/jobs/{job_id}").json()["state"] != "running":
                assert time.monotonic() < deadline, "the job never started"
                time.sleep(0.1)
            asked = time.monotonic()
            answer = client.post(f"/ai/jobs/{job_id}/cancel")
            assert answer.status_code == 202, answer.text
            job = wait_for_ai_job(server, job_id, timeout=30)
            assert job["state"] == "cancelled", job
            assert time.monotonic() - asked < 15
            refused = client.post(f"/ai/jobs/{job_id}/accept")
            assert refused.status_code == 422, refused.text
    finally:
        llm.reset()
    # Retried (seed 003's retryJob): a new job asking the same, which now succeeds.
    with server.client() as client:
        retried = client.post(f"/ai/jobs/{job_id}/retry")
        assert retried.status_code == 202, retried.text
        again = wait_for_ai_job(server, retried.json()["jobId"])
        assert (again["status"], again["retryOf"]) == ("completed", job_id), again
        assert again["result"]["table"]["name"]
        twice = client.post(f"/ai/jobs/{again['id']}/retry")
        assert twice.status_code == 422 and "only a failed or cancelled" in twice.text
