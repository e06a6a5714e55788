"""Numbers and lengths: every edge refuses the same values on both databases, with a message
that names the problem, and the database refuses them too when someone writes SQL directly."""

import contextlib
import json
import math
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from glaze_pipeline.bench.stack import fresh_postgres
from glaze_pipeline.core import migrate
from glaze_pipeline.core.engine import JobSettings
from glaze_pipeline.core.errors import InputError, InvalidSelectionError
from glaze_pipeline.core.models import Selection
from glaze_pipeline.core.queue import claim_launchable
from glaze_pipeline.core.requests import RequestRepository
from glaze_pipeline.core.seed import seed_generated, seed_leads
from glaze_pipeline.core.store import ColumnDef, Store


def grid(store: Store) -> Selection:
    return Selection(column_ids=[store.get_table("tbl_leads").column_by_key("industry").id])


@pytest.mark.parametrize("budget", [math.nan, math.inf, -math.inf, -1, -0.001, 1e13])
def test_a_budget_that_is_not_a_finite_number_at_least_zero_is_refused_at_enqueue(
    store: Store, budget: float
) -> None:
    """Before: `budget 'NaN'` spent 1,500 where 25 spends 20, and a negative budget was
    accepted at enqueue and failed only at claim."""
    seed_leads(store)
    with pytest.raises(InvalidSelectionError, match="budget must be a number >= 0"):
        RequestRepository(store).enqueue("tbl_leads", grid(store), budget=budget)
    with pytest.raises(InvalidSelectionError, match="budget must be a number >= 0"):
        JobSettings(budget=budget)
    assert RequestRepository(store).active() == []  # nothing was queued


@pytest.mark.parametrize("budget", ["-1", "-0.5", "1e13"])
def test_the_database_refuses_a_bad_budget_written_directly(store: Store, budget: str) -> None:
    seed_leads(store)
    with pytest.raises(IntegrityError, match="budget_valid"), store.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO enrichment_requests (table_id, selection, budget) "
                f"VALUES ('tbl_leads', '{{}}', {budget})"
            )
        )


def test_postgres_refuses_nan_and_infinity_budgets(pg_store: Store) -> None:
    """Postgres takes 'NaN' in a float column and compares it greater than every number: the
    check is written so that NaN and infinity fail it."""
    seed_leads(pg_store)
    for value in ("NaN", "Infinity"):
        with (
            pytest.raises(IntegrityError, match="budget_valid"),
            pg_store.engine.begin() as connection,
        ):
            connection.execute(
                text(
                    "INSERT INTO enrichment_requests (table_id, selection, budget) "
                    "VALUES ('tbl_leads', '{}', CAST(:b AS float8))"
                ),
                {"b": value},
            )


def test_a_bad_budget_already_queued_is_rejected_at_claim_and_buys_nothing(
    sqlite_store: Store,
) -> None:
    """A row written past the checks (here with them switched off) still cannot run: the
    claim refuses a budget that is not a finite number >= 0 and fails that request alone."""
    store = sqlite_store
    seed_leads(store)
    repo = RequestRepository(store)
    request_id = repo.enqueue("tbl_leads", grid(store), budget=25)
    with store.engine.begin() as connection:  # bypass the check as an old row would
        connection.execute(text("PRAGMA ignore_check_constraints = ON"))
        connection.execute(
            text("UPDATE enrichment_requests SET budget = -3 WHERE id = :id"), {"id": request_id}
        )
        connection.execute(text("PRAGMA ignore_check_constraints = OFF"))
    launchable, rejected = claim_launchable(store, limit=10)
    assert launchable == [] and [r[0] for r in rejected] == [request_id]
    request = store.get_request(request_id)
    assert request.status == "failed" and "budget must be a number >= 0" in request.error


def test_priority_and_idempotency_key_limits_are_the_same_on_both_databases(store: Store) -> None:
    """Before: a priority of 99999999999 and a 300-character idempotency key were accepted on
    SQLite and a traceback on Postgres."""
    seed_leads(store)
    repo = RequestRepository(store)
    with pytest.raises(InvalidSelectionError, match="priority must be between"):
        repo.enqueue("tbl_leads", grid(store), priority=99_999_999_999)
    with pytest.raises(InputError, match="idempotency key is 300 characters long; the limit"):
        repo.enqueue("tbl_leads", grid(store), idempotency_key="k" * 300)
    with pytest.raises(InputError, match="table id is 41 characters"):
        repo.enqueue("t" * 41, grid(store))
    # At the limits, both accept.
    request_id = repo.enqueue(
        "tbl_leads", grid(store), priority=1_000_000, idempotency_key="k" * 200
    )
    assert store.get_request(request_id).priority == 1_000_000
    if store.dialect == "sqlite":  # SQLite enforces no VARCHAR length: the check does
        with (
            pytest.raises(IntegrityError, match="idempotency_key_length"),
            store.engine.begin() as connection,
        ):
            connection.execute(
                text(
                    "INSERT INTO enrichment_requests (table_id, selection, idempotency_key) "
                    "VALUES ('tbl_leads', '{}', :k)"
                ),
                {"k": "k" * 201},
            )


def test_names_keys_and_labels_are_limited_alike_on_both_databases(store: Store) -> None:
    """Before: a 200-character table name and a 100-character header were accepted on SQLite
    and a traceback on Postgres (past the limits)."""
    with pytest.raises(InputError, match="table name is 201 characters long; the limit is 200"):
        store.create_table("n" * 201, [ColumnDef("a")])
    with pytest.raises(InputError, match="column key is 101 characters long; the limit is 100"):
        store.create_table("ok", [ColumnDef("k" * 101)])
    with pytest.raises(InputError, match="label of column 'a' is 201 characters"):
        store.create_table("ok", [ColumnDef("a", "l" * 201)])
    with pytest.raises(InputError, match="table name must not be empty"):
        store.create_table("  ", [ColumnDef("a")])
    table = store.create_table("n" * 200, [ColumnDef("k" * 100, "l" * 200)])
    assert store.get_table(table.id).columns[0].key == "k" * 100
    assert store.list_tables() == [(table.id, "n" * 200, 0)]


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_migration_0006_keeps_every_row_and_fails_only_open_requests_it_refuses(
    dialect: str, tmp_path: Path, postgres_url: str
) -> None:
    """The checks arrive on databases that already hold data: nothing is lost (SQLite rebuilds
    the request and column tables to add them)."""
    with contextlib.ExitStack() as stack:
        if dialect == "sqlite":
            url = f"sqlite:///{tmp_path / 'old.db'}"
        else:
            url = stack.enter_context(fresh_postgres(postgres_url, migrate=False))
        store = Store(url)
        stack.callback(store.dispose)
        # The Leads table as an 0005 database held it: seeded by today's code, then taken
        # back to 0005 (the downgrades keep every row).
        migrate.upgrade(store.engine, "head")
        seed_leads(store)
        migrate.downgrade(store.engine, "0005")
        with store.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO enrichment_requests (id, table_id, selection, budget, status) "
                    "VALUES ('req_open', 'tbl_leads', :s, -5, 'queued'), "
                    "('req_done', 'tbl_leads', :s, 10, 'succeeded')"
                ),
                {"s": json.dumps({"whole_table": True})},
            )
        migrate.upgrade(store.engine, "head")
        with store.engine.connect() as connection:
            counts = [
                connection.execute(text(f"SELECT count(*) FROM {t}")).scalar()
                for t in ("tables", "columns", "rows", "enrichment_requests")
            ]
        assert counts == [1, 8, 10, 2]
        assert store.get_request("req_open").status == "failed"  # it could never have run
        assert store.get_request("req_done").budget == 10
        migrate.downgrade(store.engine, "0005")
        migrate.upgrade(store.engine, "head")


@pytest.mark.parametrize(
    ("rows", "companies", "people"), [(-1, 10, None), (10, 0, None), (10, 2, 0)]
)
def test_a_generated_table_with_bad_counts_is_refused_before_anything_is_written(
    store: Store, rows: int, companies: int, people: int | None
) -> None:
    """Before: `glaze seed --rows -1` left an empty table behind."""
    with pytest.raises(InvalidSelectionError, match="rows must be >= 0"):
        seed_generated(store, rows=rows, unique_companies=companies, unique_people=people)
    assert store.list_tables() == []
