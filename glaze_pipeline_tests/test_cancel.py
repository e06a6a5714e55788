"""Cancel that stops, on the real stack (Postgres, the Dagster daemon, the mock vendor).

A request cancelled mid-enrichment, by its flag (what the app does) or by Dagster's Terminate
(the UI, GraphQL `terminateRun`), ends `cancelled` within 5 s; the vendor hears nothing after
the request ended; and what the request says it spent is what the vendor billed.
"""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance
from sqlalchemy import text

from glaze_pipeline.bench.stack import Stack
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.store import Store
from glaze_pipeline.testing.mock_server import MockProviderServer
from glaze_pipeline_tests.test_end_to_end import (
    cheap_vendor,
    daemon_stack,
    insert_request,
    wait_terminal,
)
from glaze_pipeline_tests.test_queue import app_cancels

COMPANIES = 3000  # at 300 ms and 50 at once: ~18 s of lookups, so there is a middle to cut


@pytest.fixture
def slow_mock() -> Iterator[MockProviderServer]:
    with cheap_vendor(300) as server:
        yield server


@pytest.fixture
def stack(
    postgres_url: str, redis_url: str, tmp_path: Path, slow_mock: MockProviderServer
) -> Iterator[Stack]:
    with daemon_stack(postgres_url, redis_url, tmp_path, slow_mock) as stack:
        yield stack


def vendor(mock: MockProviderServer) -> dict[str, Any]:
    return dict(mock.stats()["vendors"].get("cheap", {}))


def start_mid_enrichment(store: Store, mock: MockProviderServer) -> tuple[str, Any]:
    table = seed_generated(store, rows=COMPANIES, unique_companies=COMPANIES)
    request_id = insert_request(store, table, "industry")
    deadline = time.monotonic() + 90
    while vendor(mock).get("requests", 0) < 200:  # well into enrichment
        assert time.monotonic() < deadline, store.get_request(request_id).status
        time.sleep(0.05)
    return request_id, table


def ended_after(store: Store, request_id: str, since: float) -> float:
    """Seconds from `since` until the request ended."""
    wait_terminal(store, request_id, timeout_s=30)
    return time.monotonic() - since


def rows_with_status(store: Store, table_id: str, *statuses: str) -> int:
    with store.engine.connect() as connection:
        return int(
            connection.execute(
                text("SELECT count(*) FROM rows WHERE table_id = :t AND status = ANY(:s)"),
                {"t": table_id, "s": list(statuses)},
            ).scalar()
            or 0
        )


def assert_stopped_and_billed_as_recorded(
    store: Store, mock: MockProviderServer, request_id: str, table: Any, seconds: float
) -> None:
    request = store.get_request(request_id)
    assert request.status == "cancelled", request.error
    assert seconds <= 5.0, f"ended {seconds:.1f}s after the cancel"
    at_end = vendor(mock)
    time.sleep(1.5)
    assert vendor(mock)["requests"] == at_end["requests"]  # nothing after the end
    assert at_end["requests"] < COMPANIES  # it really stopped early
    # What the request says it spent is what the vendor billed: calls and cost.
    assert request.provider_calls == {"cheap_company": at_end["requests"]}
    assert request.cost == pytest.approx(at_end["cost"])
    assert rows_with_status(store, table.id, "queued", "running") == 0


def test_a_cancel_flag_stops_a_run_mid_enrichment(
    stack: Stack, postgres_url: str, slow_mock: MockProviderServer
) -> None:
    store = Store(postgres_url)
    try:
        request_id, table = start_mid_enrichment(store, slow_mock)
        app_cancels(store, request_id)
        seconds = ended_after(store, request_id, time.monotonic())
        assert_stopped_and_billed_as_recorded(store, slow_mock, request_id, table, seconds)
        request = store.get_request(request_id)
        # The answers bought before the cancel were written to their rows; the rows it never
        # reached are untouched, back to the status they had (idle: one cell per row here).
        assert request.cells_done > 0 and request.cells_skipped == COMPANIES - request.cells_done
        assert rows_with_status(store, table.id, "idle") == request.cells_skipped
    finally:
        store.dispose()


def test_terminating_the_dagster_run_stops_it_mid_enrichment(
    stack: Stack, postgres_url: str, slow_mock: MockProviderServer
) -> None:
    store = Store(postgres_url)
    try:
        request_id, table = start_mid_enrichment(store, slow_mock)
        run_id = store.get_request(request_id).run_id
        with DagsterInstance.from_config(str(stack.home)) as instance:
            instance.run_coordinator.cancel_run(run_id)  # what the UI's Terminate does
            seconds = ended_after(store, request_id, time.monotonic())
            assert_stopped_and_billed_as_recorded(store, slow_mock, request_id, table, seconds)
            deadline = time.monotonic() + 30
            run = instance.get_run_by_id(run_id)
            while run is not None and not run.is_finished and time.monotonic() < deadline:
                time.sleep(0.2)
                run = instance.get_run_by_id(run_id)
            assert run is not None and run.status.value == "CANCELED"
    finally:
        store.dispose()
