"""AI requests as plain functions (no Dagster): queue, claim, run the steps, status.

Every LLM call goes over real HTTP to the mock LLM (glaze_pipeline.testing.mock_llm) on loopback, on
SQLite and Postgres. What the model was told is read off the wire by a transport that forwards
each request to the mock and keeps the operation and the JSON input the mock itself reads.
"""

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from glaze_pipeline.core import queue
from glaze_pipeline.core.ai.client import AIJobError, LlmSettings
from glaze_pipeline.core.ai.workflow import (
    AiEnqueued,
    ai_status,
    enqueue_ai,
    retry_ai,
    run_ai,
)
from glaze_pipeline.core.engine import JobCancelled, RequestWatch
from glaze_pipeline.core.errors import InputError, InvalidSelectionError, UnknownTableError
from glaze_pipeline.core.models import RequestKind, RequestStatus
from glaze_pipeline.core.requests import Adoption, RequestRepository
from glaze_pipeline.core.schema import LlmCallRecord
from glaze_pipeline.core.store import ColumnDef, Store, TableInfo
from glaze_pipeline.testing.mock_llm import MockLlmServer, input_of, operation_of
from glaze_pipeline_tests.provider_helpers import wait_until
from glaze_pipeline_tests.test_launcher import insert_request

CONTEXT = "B2B payment companies in the Nordics, for outbound sales"


@pytest.fixture
def llm() -> Iterator[MockLlmServer]:
    with MockLlmServer() as server:
        yield server


def llm_settings(llm: MockLlmServer, **changes: Any) -> LlmSettings:
    """The mock's address, with backoffs short enough for a test."""
    return LlmSettings(base_url=llm.url, backoff_s=0.01, max_backoff_s=0.05, **changes)


class RecordingTransport(httpx.AsyncBaseTransport):
    """Forwards every request to the mock over real HTTP and keeps (operation, input) of each,
    as the mock reads them from the prompt."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self._inner: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        messages = json.loads(request.content)["messages"]
        self.sent.append((operation_of(messages), input_of(messages)))
        if self._inner is None:  # one per step: each step's client closes its transport
            self._inner = httpx.AsyncHTTPTransport()
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            await inner.aclose()

    def input(self, operation: str) -> dict[str, Any]:
        [found] = [data for name, data in self.sent if name == operation]
        return found


@contextmanager
def running(store: Store, request_id: str) -> Iterator[RequestWatch]:
    """The request claimed and adopted as its run would, and watched (cancel, heartbeat)."""
    requests = RequestRepository(store)
    assert requests.claim_one(request_id) is not None
    assert requests.adopt(request_id, "run-test") is Adoption.ADOPTED
    with RequestWatch(requests, request_id) as watch:
        yield watch


def run_request(
    store: Store,
    enqueued: AiEnqueued,
    llm: MockLlmServer,
    transport: httpx.AsyncBaseTransport | None = None,
    **settings: Any,
) -> Any:
    with running(store, enqueued.request_id) as watch:
        run_ai(
            store,
            enqueued.request_id,
            settings=llm_settings(llm, **settings),
            stop=watch,
            transport=transport,
        )
    return store.get_request(enqueued.request_id)


def attempts(store: Store, request_id: str) -> list[tuple[str, str]]:
    """(operation, outcome) of every LLM attempt the request recorded, in order."""
    with store.engine.connect() as connection:
        rows = connection.execute(
            select(LlmCallRecord.operation, LlmCallRecord.outcome)
            .where(LlmCallRecord.request_id == request_id)
            .order_by(LlmCallRecord.id)
        ).all()
    return [(row.operation, row.outcome) for row in rows]


def request_count(store: Store) -> int:
    with store.engine.connect() as connection:
        return int(connection.scalar(text("SELECT count(*) FROM enrichment_requests")) or 0)


def companies_table(store: Store) -> TableInfo:
    """A table someone imported: identifiers under their own keys, one row already in it."""
    table = store.create_table(
        "Nordic fintechs",
        [
            ColumnDef("company_name", "Company", field="company.name"),
            ColumnDef("website", "Website", field="company.domain"),
            ColumnDef("industry", "Industry"),
        ],
        description="Payment companies to call",
    )
    store.insert_rows(table.id, [{"company_name": "Tave", "website": "https://www.Tave.se/"}])
    return table


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "context", "options", "error", "message"),
    [
        (RequestKind.TABLE_GENERATION, "   ", {}, InputError, "context is empty"),
        (RequestKind.TABLE_GENERATION, "x" * 100_000, {}, InputError, "the limit is 4000"),
        (RequestKind.TABLE_GENERATION, "a\x00b", {}, InputError, "NUL"),
        (
            RequestKind.COLUMN_SUGGESTIONS,
            CONTEXT,
            {"table_id": "tbl_nope"},
            UnknownTableError,
            "unknown table 'tbl_nope'",
        ),
        (RequestKind.COLUMN_SUGGESTIONS, CONTEXT, {}, InputError, "needs the id of the table"),
        (
            RequestKind.ROW_SUGGESTIONS,
            CONTEXT,
            {"table_id": "tbl_nope", "count": 5},
            UnknownTableError,
            "unknown table",
        ),
        (RequestKind.TABLE_GENERATION, CONTEXT, {"count": 0}, InvalidSelectionError, "1 to 200"),
        (
            RequestKind.TABLE_GENERATION,
            CONTEXT,
            {"count": 10_000},
            InvalidSelectionError,
            "got 10000",
        ),
        (RequestKind.TABLE_SUGGESTIONS, CONTEXT, {"count": 5}, InvalidSelectionError, "no count"),
        (RequestKind.ENRICH, CONTEXT, {}, InvalidSelectionError, "not an AI request kind"),
    ],
)
def test_bad_input_is_refused_before_anything_is_queued(
    store: Store,
    kind: RequestKind,
    context: str,
    options: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        enqueue_ai(store, kind, context, **options)
    assert request_count(store) == 0


def test_row_suggestions_need_a_count(store: Store) -> None:
    table = companies_table(store)
    with pytest.raises(InvalidSelectionError, match="needs a count"):
        enqueue_ai(store, RequestKind.ROW_SUGGESTIONS, CONTEXT, table_id=table.id)
    assert request_count(store) == 0


def test_a_new_table_id_is_reserved_and_one_key_is_one_request(store: Store) -> None:
    first = enqueue_ai(store, RequestKind.TABLE_GENERATION, f"  {CONTEXT}  ")
    request = store.get_request(first.request_id)
    assert (request.kind, request.status, request.table_id) == (
        "table_generation",
        "queued",
        first.table_id,
    )
    assert request.selection == {"context": CONTEXT, "count": 10}  # stripped; 10 rows by default
    with pytest.raises(UnknownTableError):
        store.get_table(first.table_id)  # reserved: accepting creates it
    keyed = enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT, idempotency_key="k1")
    again = enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT, idempotency_key="k1")
    other = enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT, idempotency_key="k2")
    assert again == keyed and other.request_id != keyed.request_id
    assert len({first.table_id, keyed.table_id, other.table_id}) == 3
    table = companies_table(store)
    queue.enqueue(store, table.id, {"whole_table": True}, idempotency_key="k3")
    with pytest.raises(InputError, match="'k3' was used for enrich request"):
        enqueue_ai(
            store, RequestKind.COLUMN_SUGGESTIONS, CONTEXT, table_id=table.id, idempotency_key="k3"
        )
    assert request_count(store) == 4


def test_a_malformed_ai_request_in_the_queue_fails_alone_at_claim(store: Store) -> None:
    """What the app may write directly: each bad one ends failed with its reason, the good
    one is launched with its job's run config."""
    table = companies_table(store)
    good = enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT, count=3)
    poisoned = {
        insert_request(store, "tbl_new1", '"a string"', "table_generation"): "expected an object",
        insert_request(
            store, "tbl_new2", '{"context": ""}', "table_suggestions"
        ): "context is empty",
        insert_request(
            store, "tbl_new3", '{"context": "x", "count": 10000}', "table_generation"
        ): "count must be",
        insert_request(
            store, "tbl_new4", '{"context": "x", "sql": "DROP TABLE rows"}', "table_generation"
        ): "sql: Extra inputs are not permitted",
        insert_request(store, "tbl_gone", '{"context": "x"}', "column_suggestions"): (
            "unknown table 'tbl_gone'"
        ),
        insert_request(store, table.id, '{"context": "x"}', "row_suggestions"): "needs a count",
    }
    launchable, rejected = queue.claim_launchable(store, limit=20)
    [item] = launchable
    assert item.request.id == good.request_id
    assert item.job_name == "table_generation"
    assert item.run_config == {
        "ops": {
            "generate_table": {
                "config": {
                    "table_id": good.table_id,
                    "context": CONTEXT,
                    "count": 3,
                    "request_id": good.request_id,
                }
            }
        }
    }
    assert item.tags == {
        "glaze/table": good.table_id,
        "glaze/request": good.request_id,
        "glaze/kind": "table_generation",
    }
    assert {request_id for request_id, _ in rejected} == set(poisoned)
    for request_id, reason in poisoned.items():
        request = store.get_request(request_id)
        assert request.status == "failed"
        assert request.error is not None and reason in request.error, request.error


# --- the steps -------------------------------------------------------------------------------


def test_table_generation_passes_each_step_what_the_ones_before_proposed(
    store: Store, llm: MockLlmServer
) -> None:
    context = "Heads of engineering at Nordic fintechs"
    enqueued = enqueue_ai(store, RequestKind.TABLE_GENERATION, context, count=4)
    wire = RecordingTransport()
    request = run_request(store, enqueued, llm, transport=wire)
    assert request.status == "succeeded"
    assert [name for name, _ in wire.sent] == [
        "table_suggestions",
        "column_suggestions",
        "row_suggestions",
    ]
    result = request.result
    table = result["table"]
    assert table["entityType"] == "person"
    # The columns step is told the proposed table...
    told = wire.input("column_suggestions")
    assert told["context"] == context
    assert (told["table"]["name"], told["table"]["description"]) == (
        table["name"],
        table["description"],
    )
    assert told["table"]["entity_type"] == "person" and told["table"]["columns"] == []
    # ...and the rows step the table and its proposed identifier columns.
    told = wire.input("row_suggestions")
    assert told["table"]["name"] == table["name"] and told["count"] == 4
    identifiers = {c["key"] for c in result["columns"] if c["role"] == "identifier"}
    assert {c["key"] for c in told["identifier_columns"]} == identifiers
    assert len(result["rows"]) == 4
    assert all(set(row["values"]) <= identifiers for row in result["rows"])
    assert set(result["promptVersions"]) == {"table", "columns", "rows"}
    assert result["usage"]["calls"] == 3 and result["model"] == "glaze-mock-1"
    assert (request.entities, request.entities_done) == (3, 3)
    # Every call: in llm_calls, and journalled then settled in the spend ledger.
    assert llm.stats()["requests"] == 3
    assert [outcome for _, outcome in attempts(store, request.id)] == ["ok", "ok", "ok"]
    assert request.provider_calls == {"llm": 3}
    assert RequestRepository(store).spend(request.id).unsettled == 0
    assert store.llm_usage(request.id).prompt_tokens == llm.stats()["prompt_tokens"]


def test_suggestions_for_an_existing_table_see_its_columns_and_rows(
    store: Store, llm: MockLlmServer
) -> None:
    table = companies_table(store)
    columns = enqueue_ai(store, RequestKind.COLUMN_SUGGESTIONS, CONTEXT, table_id=table.id)
    wire = RecordingTransport()
    request = run_request(store, columns, llm, transport=wire)
    told = wire.input("column_suggestions")["table"]
    assert told["name"] == "Nordic fintechs" and told["description"] == "Payment companies to call"
    assert {(c["key"], c["field"]) for c in told["columns"]} == {
        ("company_name", "company.name"),
        ("website", "company.domain"),
        ("industry", "company.industry"),  # inferred from its key
    }
    proposed = request.result["columns"]
    assert proposed and not {c["key"] for c in proposed} & {"company_name", "website", "industry"}
    assert not {c["field"] for c in proposed} & {
        "company.name",
        "company.domain",
        "company.industry",
    }

    rows = enqueue_ai(store, RequestKind.ROW_SUGGESTIONS, CONTEXT, table_id=table.id, count=3)
    wire = RecordingTransport()
    request = run_request(store, rows, llm, transport=wire)
    told = wire.input("row_suggestions")
    # The table's own identifier columns, and the entity its row already has, to leave out.
    assert [c["key"] for c in told["identifier_columns"]] == ["company_name", "website"]
    assert "company:domain:tave.se" in told["exclude"]
    assert len(request.result["rows"]) == 3
    assert all(set(r["values"]) <= {"company_name", "website"} for r in request.result["rows"])
    assert request.result["columns"] == []  # the table has its identifier columns


def test_a_priced_model_costs_what_its_tokens_say(store: Store, llm: MockLlmServer) -> None:
    enqueued = enqueue_ai(store, RequestKind.TABLE_SUGGESTIONS, CONTEXT)
    request = run_request(store, enqueued, llm, price_input_per_1k=2.0, price_output_per_1k=10.0)
    stats = llm.stats()
    expected = round(
        stats["prompt_tokens"] * 2.0 / 1000 + stats["completion_tokens"] * 10 / 1000, 6
    )
    assert expected > 0
    assert request.cost == pytest.approx(expected)
    assert request.cost_by_provider == {"llm": pytest.approx(expected)}
    assert request.result["usage"]["cost"] == pytest.approx(expected)
    assert ai_status(request)["cost"] == pytest.approx(expected)
    assert store.llm_usage(request.id).cost == pytest.approx(expected)


def test_a_rate_limit_is_retried_and_every_attempt_recorded(
    store: Store, llm: MockLlmServer
) -> None:
    llm.faults([{"mode": "rate_limited", "retry_after": 0, "times": 1}])
    enqueued = enqueue_ai(store, RequestKind.TABLE_SUGGESTIONS, CONTEXT)
    request = run_request(store, enqueued, llm)
    assert request.status == "succeeded"
    assert llm.stats()["statuses"] == {"429": 1, "200": 1}
    assert attempts(store, request.id) == [
        ("table_suggestions", "retried"),
        ("table_suggestions", "ok"),
    ]
    assert request.provider_calls == {"llm": 2}


def test_a_non_retryable_error_fails_at_once(store: Store, llm: MockLlmServer) -> None:
    llm.faults([{"mode": "bad_request"}])
    enqueued = enqueue_ai(store, RequestKind.TABLE_SUGGESTIONS, CONTEXT)
    with pytest.raises(AIJobError, match="HTTP 400") as raised:
        run_request(store, enqueued, llm)
    assert raised.value.retryable is False
    assert llm.stats()["requests"] == 1
    assert attempts(store, enqueued.request_id) == [("table_suggestions", "failed")]
    assert store.get_request(enqueued.request_id).result is None


def test_a_cancel_interrupts_the_call_in_flight(store: Store, llm: MockLlmServer) -> None:
    llm.faults([{"mode": "hang", "timeout_s": 60}])
    enqueued = enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT)
    outcome: list[BaseException] = []

    def work() -> None:
        try:
            run_request(store, enqueued, llm)
        except BaseException as error:
            outcome.append(error)

    worker = threading.Thread(target=work)
    worker.start()
    assert wait_until(lambda: llm.stats()["requests"] == 1, timeout_s=10)
    cancelled_at = time.monotonic()
    queue.request_cancel(store, enqueued.request_id)
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert time.monotonic() - cancelled_at < 3  # a heartbeat, not the 60 s hang
    [error] = outcome
    assert isinstance(error, JobCancelled) and "cancelled by the user" in str(error)
    assert llm.stats()["requests"] == 1  # nothing asked after the cancel
    # The call left and never came back: journalled, never settled.
    assert RequestRepository(store).spend(enqueued.request_id).unsettled == 1


def test_ai_status_follows_the_request_lifecycle(store: Store) -> None:
    enqueued = enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT)
    requests = RequestRepository(store)

    def status() -> dict[str, Any]:
        return ai_status(requests.get(enqueued.request_id))

    queued = status()
    assert (queued["status"], queued["state"], queued["progress"]) == ("pending", "queued", 0)
    assert queued["tableId"] == enqueued.table_id and queued["kind"] == "table_generation"
    assert queued["startedAt"] is None and queued["result"] is None
    requests.claim_one(enqueued.request_id)
    assert status()["status"] == "pending"
    requests.adopt(enqueued.request_id, "run-1")
    requests.record_counters(enqueued.request_id, entities=3, entities_done=1)
    requests.record_result(enqueued.request_id, {"table": None, "notes": []})
    running = status()
    assert (running["status"], running["progress"]) == ("running", 33)
    assert running["startedAt"] is not None and running["result"] == {"table": None, "notes": []}
    requests.finish(enqueued.request_id, RequestStatus.SUCCEEDED, counters={"result": {"rows": []}})
    done = status()
    assert (done["status"], done["state"], done["progress"]) == ("completed", "succeeded", 100)
    assert done["completedAt"] is not None and done["result"] == {"rows": []}

    cancelled = enqueue_ai(store, RequestKind.TABLE_SUGGESTIONS, CONTEXT)
    queue.request_cancel(store, cancelled.request_id)
    view = ai_status(requests.get(cancelled.request_id))
    assert (view["status"], view["state"]) == ("failed", "cancelled")
    assert "cancel" in view["error"]


def test_a_failed_request_is_retried_as_a_new_one(store: Store, llm: MockLlmServer) -> None:
    """Seed 003's retryJob: the same ask (kind, payload, reserved table) as a new request that
    points at the failed one; a request that succeeded or still runs is not retried."""
    llm.faults([{"mode": "bad_request"}])
    failed = enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT, count=4)
    with pytest.raises(AIJobError):
        run_request(store, failed, llm)
    # What the job's error handling records when the step fails for good.
    assert RequestRepository(store).fail(failed.request_id, "HTTP 400 from the LLM")
    with pytest.raises(InputError, match="is running"):
        retry_ai(store, enqueue_and_start(store))
    retried = retry_ai(store, failed.request_id)
    assert retried.request_id != failed.request_id
    assert retried.table_id == failed.table_id  # the new table's reserved id, kept
    again = store.get_request(retried.request_id)
    assert (again.kind, again.retry_of, again.selection) == (
        "table_generation",
        failed.request_id,
        {"context": CONTEXT, "count": 4},
    )
    done = run_request(store, retried, llm)
    assert done.status == "succeeded"
    assert ai_status(done)["retryOf"] == failed.request_id
    with pytest.raises(InputError, match="is succeeded: only a failed or cancelled"):
        retry_ai(store, retried.request_id)
    enrich = queue.enqueue(store, "tbl_anything", {"whole_table": True})
    with pytest.raises(InputError, match="not an AI request"):
        retry_ai(store, enrich)


def enqueue_and_start(store: Store) -> str:
    """An AI request left running (adopted by a run that is still going)."""
    enqueued = enqueue_ai(store, RequestKind.TABLE_SUGGESTIONS, CONTEXT)
    requests = RequestRepository(store)
    requests.claim_one(enqueued.request_id)
    requests.adopt(enqueued.request_id, "run-still-going")
    return enqueued.request_id


def test_a_table_named_by_the_caller_must_exist(store: Store) -> None:
    with pytest.raises(UnknownTableError, match="tbl_nope"):
        enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT, table_id="tbl_nope")
    assert request_count(store) == 0
