"""Accepting an AI proposal: all or nothing, once, without duplicating rows the table has.

Proposals come from a real run against the mock LLM, or are recorded on a completed request
through the request repository (a proposal as the job stores it); SQLite and Postgres.
"""

import threading
from typing import Any

import pytest
from sqlalchemy import text

from glaze_pipeline.core.ai.accept import Accepted, ProposalNotAcceptableError, accept_proposal
from glaze_pipeline.core.ai.workflow import enqueue_ai
from glaze_pipeline.core.errors import InputError, UnknownRequestError, UnknownTableError
from glaze_pipeline.core.models import RequestKind, RequestStatus
from glaze_pipeline.core.requests import RequestRepository
from glaze_pipeline.core.store import ColumnDef, Store, TableInfo
from glaze_pipeline.testing.mock_llm import MockLlmServer
from glaze_pipeline_tests.test_ai_workflow import CONTEXT, companies_table, llm, run_request

__all__ = ["llm"]  # the fixture, shared with the module it comes from


def completed(
    store: Store,
    kind: RequestKind,
    result: dict[str, Any],
    *,
    table_id: str | None = None,
    count: int | None = None,
) -> str:
    """A request that ran and ended `succeeded` with `result` as its proposal."""
    enqueued = enqueue_ai(store, kind, CONTEXT, table_id=table_id, count=count)
    requests = RequestRepository(store)
    assert requests.claim_one(enqueued.request_id) is not None
    requests.adopt(enqueued.request_id, "run-accept")
    assert requests.finish(
        enqueued.request_id, RequestStatus.SUCCEEDED, counters={"result": result}
    )
    return enqueued.request_id


def column(key: str, role: str = "enrichment", **values: Any) -> dict[str, Any]:
    return {"key": key, "label": key.replace("_", " ").title(), "role": role, **values}


def proposal(**parts: Any) -> dict[str, Any]:
    return {"table": None, "columns": [], "rows": [], "notes": [], **parts}


NEW_TABLE = {
    "name": "Nordic payments",
    "description": "B2B payment companies",
    "entityType": "company",
}


def rows_of(store: Store, table_id: str) -> list[dict[str, Any]]:
    return [row.data for row in store.rows_in_order(table_id)]


def snapshot(store: Store, table_id: str) -> tuple[Any, ...]:
    info = store.get_table(table_id)
    return info.name, info.columns, rows_of(store, table_id)


def test_a_generated_table_is_created_once(store: Store, llm: MockLlmServer) -> None:
    enqueued = enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT, count=5)
    request = run_request(store, enqueued, llm)
    result = request.result
    first = accept_proposal(store, request.id)
    assert first == Accepted(
        table_id=enqueued.table_id,
        created=True,
        columns_added=[c["key"] for c in result["columns"]],
        rows_added=5,
        rows_duplicate=0,
    )
    table = store.get_table(enqueued.table_id)
    assert table.name == result["table"]["name"]
    for proposed in result["columns"]:
        stored = table.column_by_key(proposed["key"])
        assert (stored.label, stored.data_type) == (proposed["label"], proposed["dataType"])
        if proposed["role"] == "ai":
            assert (stored.field, stored.prompt) == (None, proposed["prompt"])
        else:
            assert (stored.field, stored.prompt) == (proposed["field"], None)
    assert rows_of(store, table.id) == [row["values"] for row in result["rows"]]
    # Again: the same table, nothing added.
    again = accept_proposal(store, request.id)
    assert (again.table_id, again.created, again.columns_added) == (enqueued.table_id, False, [])
    assert (again.rows_added, again.rows_duplicate) == (0, 5)
    assert again.notes == (
        "columns already in the table, not added again: "
        + ", ".join(c["key"] for c in result["columns"]),
    )
    assert len(store.get_table(table.id).columns) == len(result["columns"])
    assert store.count_rows(table.id) == 5


def test_rows_the_table_has_are_skipped_by_domain(store: Store) -> None:
    table = companies_table(store)  # holds Tave, website https://www.Tave.se/
    request_id = completed(
        store,
        RequestKind.ROW_SUGGESTIONS,
        proposal(
            rows=[
                {"values": {"company_name": "Tave AB", "website": "tave.se"}},
                {"values": {"company_name": "Kalo", "website": "kalo.io"}},
                {"values": {"company_name": "Kalo Pay", "website": "https://KALO.io/about"}},
            ]
        ),
        table_id=table.id,
        count=3,
    )
    accepted = accept_proposal(store, request_id)
    assert (accepted.created, accepted.rows_added, accepted.rows_duplicate) == (False, 1, 2)
    assert rows_of(store, table.id) == [
        {"company_name": "Tave", "website": "https://www.Tave.se/"},
        {"company_name": "Kalo", "website": "kalo.io"},
    ]


def test_people_the_table_has_are_skipped_by_email_and_linkedin(store: Store) -> None:
    table = store.create_table(
        "Contacts",
        [
            ColumnDef("full_name", field="person.full_name"),
            ColumnDef("email", field="person.email"),
            ColumnDef("linkedin", field="person.linkedin_url"),
        ],
    )
    store.insert_rows(
        table.id,
        [
            {"full_name": "Ada Lovelace", "email": "Ada@Acme.com"},
            {"full_name": "Alan Turing", "linkedin": "https://linkedin.com/in/alan-t"},
        ],
    )
    request_id = completed(
        store,
        RequestKind.ROW_SUGGESTIONS,
        proposal(
            rows=[
                {"values": {"full_name": "A. Lovelace", "email": "mailto:ada@acme.com"}},
                {
                    "values": {
                        "full_name": "A. Turing",
                        "linkedin": "https://www.linkedin.com/in/alan-t/",
                    }
                },
                {"values": {"full_name": "Grace Hopper", "email": "grace@navy.mil"}},
            ]
        ),
        table_id=table.id,
        count=3,
    )
    accepted = accept_proposal(store, request_id)
    assert (accepted.rows_added, accepted.rows_duplicate) == (1, 2)
    assert rows_of(store, table.id)[-1] == {"full_name": "Grace Hopper", "email": "grace@navy.mil"}


def test_a_new_table_is_written_all_or_nothing(store: Store) -> None:
    """Row 3 is over the limits: the table and columns written before it are rolled back."""
    request_id = completed(
        store,
        RequestKind.TABLE_GENERATION,
        proposal(
            table=NEW_TABLE,
            columns=[
                column("company_name", "identifier", field="company.name"),
                column("domain", "identifier", field="company.domain", dataType="url"),
                column("industry", field="company.industry"),
            ],
            rows=[
                {"values": {"company_name": "Kalo", "domain": "kalo.io"}},
                {"values": {"company_name": "Tave", "domain": "tave.se"}},
                {"values": {"company_name": "x" * 10_000, "domain": "big.io"}},
            ],
        ),
        count=3,
    )
    table_id = RequestRepository(store).get(request_id).table_id
    with pytest.raises(InputError, match="proposed row 3: the value of 'company_name' is 10000"):
        accept_proposal(store, request_id)
    with pytest.raises(UnknownTableError):
        store.get_table(table_id)
    with store.engine.connect() as connection:
        for table in ("columns", "rows"):
            count = connection.scalar(
                text(f"SELECT count(*) FROM {table} WHERE table_id = :t"), {"t": table_id}
            )
            assert count == 0, table
    # Without the rows, the same proposal is fine: the table and its columns.
    accepted = accept_proposal(store, request_id, with_rows=False)
    assert accepted.created and accepted.columns_added == ["company_name", "domain", "industry"]
    assert store.count_rows(table_id) == 0


def test_an_existing_table_is_extended_all_or_nothing(store: Store) -> None:
    table = companies_table(store)
    before = snapshot(store, table.id)
    request_id = completed(
        store,
        RequestKind.COLUMN_SUGGESTIONS,
        proposal(
            columns=[
                column("employee_count", field="company.employee_count", dataType="number"),
                column("b2b", "ai", prompt="Is {company} a B2B business?"),
                column("salary", "ai", prompt="What does {company} pay in {currency}?"),
            ]
        ),
        table_id=table.id,
    )
    with pytest.raises(InputError, match=r"unknown placeholder \{currency\}"):
        accept_proposal(store, request_id)
    assert snapshot(store, table.id) == before


def test_column_clashes_are_skipped_and_reported(store: Store) -> None:
    table = companies_table(
        store
    )  # company_name (company.name), website (company.domain), industry
    request_id = completed(
        store,
        RequestKind.TABLE_GENERATION,
        proposal(
            table={**NEW_TABLE, "name": "Another name"},
            columns=[
                column("industry", field="company.industry"),  # the same column: skipped
                column("company_name", field="company.description"),  # another meaning
                column("domain", "identifier", field="company.domain"),  # held by `website`
                column("revenue", field="company.revenue", dataType="number"),
            ],
            rows=[
                {"values": {"company_name": "Kalo", "domain": "kalo.io"}},
                {"values": {"domain": "tave.se"}},  # the table's Tave, by its website
            ],
        ),
        table_id=table.id,
        count=2,
    )
    accepted = accept_proposal(store, request_id)
    assert (accepted.created, accepted.columns_added) == (False, ["revenue"])
    assert (accepted.rows_added, accepted.rows_duplicate) == (1, 1)
    notes = "\n".join(accepted.notes)
    assert "'company_name' not added: the table's 'company_name' means company.name" in notes
    assert "'domain' not added: column 'website' already holds company.domain" in notes
    assert "row values under company_name not written" in notes
    assert "name 'Nordic fintechs' is kept" in notes
    assert "already in the table, not added again: industry" in notes
    assert store.get_table(table.id).name == "Nordic fintechs"
    # The domain went into the column that holds domains; the clashing name went nowhere.
    assert rows_of(store, table.id)[-1] == {"website": "kalo.io"}


def test_only_a_completed_ai_proposal_can_be_accepted(store: Store) -> None:
    table = companies_table(store)
    queued = enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT)
    with pytest.raises(ProposalNotAcceptableError, match="is queued: only a completed proposal"):
        accept_proposal(store, queued.request_id)
    enrich = RequestRepository(store).enqueue(table.id, {"whole_table": True})
    with pytest.raises(ProposalNotAcceptableError, match="not an AI proposal"):
        accept_proposal(store, enrich)
    with pytest.raises(UnknownRequestError):
        accept_proposal(store, "req_nope")
    malformed = completed(
        store, RequestKind.TABLE_GENERATION, {"columns": "DROP TABLE rows", "rows": []}
    )
    with pytest.raises(ProposalNotAcceptableError, match="proposal is malformed: columns"):
        accept_proposal(store, malformed)
    gone = completed(
        store,
        RequestKind.COLUMN_SUGGESTIONS,
        proposal(columns=[column("revenue", field="company.revenue")]),
        table_id=table.id,
    )
    with store.engine.begin() as connection:
        connection.execute(text("DELETE FROM tables WHERE id = :t"), {"t": table.id})
    with pytest.raises(UnknownTableError, match="no longer exists"):
        accept_proposal(store, gone)


def test_concurrent_accepts_write_the_proposal_once(store: Store, llm: MockLlmServer) -> None:
    enqueued = enqueue_ai(store, RequestKind.TABLE_GENERATION, CONTEXT, count=6)
    request = run_request(store, enqueued, llm)
    start = threading.Barrier(2)
    outcomes: list[Any] = []

    def accept() -> None:
        own = Store(store.url)  # its own connections, like a second API worker
        start.wait()
        try:
            outcomes.append(accept_proposal(own, request.id))
        except Exception as error:  # reported by the assertion below
            outcomes.append(error)
        finally:
            own.dispose()

    threads = [threading.Thread(target=accept) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(outcome, Accepted) for outcome in outcomes), outcomes
    assert sorted(o.created for o in outcomes) == [False, True]
    assert sorted(o.rows_added for o in outcomes) == [0, 6]
    table: TableInfo = store.get_table(enqueued.table_id)
    assert len(table.columns) == len(request.result["columns"])
    assert store.count_rows(table.id) == 6
