"""Fuzzing run-config and queue-row parsing: whatever an app or a person writes, the engine
either accepts it or refuses it with its own error (a GlazeError or Dagster's config error),
in bounded time, and never lets one bad request stop the others."""

import json
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
from dagster import DagsterInvalidConfigError, validate_run_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from glaze_pipeline.core.errors import GlazeError
from glaze_pipeline.core.queue import claim_launchable, launch_config
from glaze_pipeline.core.requests import ClaimedRequest
from glaze_pipeline.core.seed import seed_leads
from glaze_pipeline.core.store import Store
from glaze_pipeline.defs.jobs import enrich_table

TRIED: dict[str, int] = {
    "queue rows": 0,
    "queue rows accepted": 0,
    "run configs": 0,
    "run configs accepted": 0,
    "claim batches": 0,
}
SLOWEST: dict[str, float] = {}

LEADS_COLUMNS = [f"col_leads_{k}" for k in ("industry", "title", "name", "nope")]
LEADS_ROWS = [f"row_leads_{i:02d}" for i in (1, 2, 10, 11)]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(LEADS_COLUMNS + LEADS_ROWS + ["tbl_leads", ""])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)
# Selections near the real shapes, so the fuzzer reaches the deep checks, not only the first.
selections = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "column_ids": st.lists(st.sampled_from(LEADS_COLUMNS) | st.text(max_size=8)),
            "row_ids": st.lists(st.sampled_from(LEADS_ROWS) | st.text(max_size=8)),
            "cells": st.lists(
                st.fixed_dictionaries(
                    {"row_id": st.sampled_from(LEADS_ROWS), "column_id": json_values}
                ),
                max_size=3,
            ),
            "whole_table": json_values,
            "overwrite": st.booleans() | json_values,
            "extra": json_values,
        },
    ),
)
# ... and plausible ones, so that many are accepted and the accepted path is checked too.
plausible = st.one_of(
    st.fixed_dictionaries(
        {"column_ids": st.lists(st.sampled_from(LEADS_COLUMNS[:3]), min_size=1, max_size=3)},
        optional={
            "row_ids": st.lists(st.sampled_from(LEADS_ROWS), max_size=3),
            "overwrite": st.booleans(),
        },
    ),
    st.fixed_dictionaries({"whole_table": st.just(True)}),
)
selections = st.one_of(selections, plausible)
budgets = st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 10**15)


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    """Prints how many inputs each fuzz test tried, and the slowest one (`pytest -s`)."""
    yield
    print(f"\nfuzz inputs tried: {TRIED}; slowest per input (s): {SLOWEST}")


def _timed(kind: str, started: float) -> None:
    elapsed = time.perf_counter() - started
    SLOWEST[kind] = max(SLOWEST.get(kind, 0.0), elapsed)
    assert elapsed < 2.0, f"{kind}: one input took {elapsed:.2f}s"


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    selection=selections,
    budget=budgets,
    kind=st.sampled_from(["enrich", "estimate", "pre_enrich", "", "ENRICH", "drop table"]),
    table_id=st.sampled_from(["tbl_leads", "tbl_nope", "", "x" * 50]),
)
def test_a_queue_row_is_launchable_or_refused_with_a_glaze_error(
    sqlite_store: Store, selection: Any, budget: Any, kind: str, table_id: str
) -> None:
    store = sqlite_store
    if not store.list_tables():
        seed_leads(store)
    TRIED["queue rows"] += 1
    request = ClaimedRequest("req_fuzz", table_id, kind, selection, budget, 0)
    started = time.perf_counter()
    try:
        config = launch_config(store, request)
    except GlazeError:
        pass
    else:
        TRIED["queue rows accepted"] += 1
        # What is accepted is runnable: a finite budget >= 0 and a config Dagster accepts.
        assert config["budget"] is None or (math.isfinite(config["budget"]) and budget >= 0)
        validate_run_config(enrich_table, {"ops": {"detect_entities": {"config": config}}})
    _timed("queue rows", started)


@settings(max_examples=150, deadline=None)
@given(
    config=st.fixed_dictionaries(
        {"table_id": st.text(max_size=10) | json_values},
        optional={
            "column_ids": st.lists(st.text(max_size=8)) | json_values,
            "row_ids": st.lists(st.text(max_size=8)) | json_values,
            "whole_table": st.booleans() | json_values,
            "overwrite": st.booleans() | json_values,
            "budget": budgets | json_values,
            "chunk_size": st.integers(-3, 10**6) | json_values,
            "concurrency": st.integers(-3, 10**6) | json_values,
            "threshold": st.floats() | json_values,
            "kind": st.sampled_from(["enrich", "estimate", "pre_enrich", "x"]) | json_values,
            "bogus": json_values,
        },
    )
)
def test_a_run_config_is_valid_or_refused_by_dagster_with_a_message(config: dict[str, Any]) -> None:
    """What the Launchpad and GraphQL accept is checked by Dagster's config schema first."""
    TRIED["run configs"] += 1
    started = time.perf_counter()
    try:
        validate_run_config(enrich_table, {"ops": {"detect_entities": {"config": config}}})
    except DagsterInvalidConfigError as error:
        assert str(error)
    else:
        TRIED["run configs accepted"] += 1
    _timed("run configs", started)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(st.tuples(selections, budgets), min_size=1, max_size=6))
def test_a_batch_of_fuzzed_rows_never_jams_the_queue(
    sqlite_store: Store, batch: list[tuple[Any, Any]]
) -> None:
    """Rows the app INSERTs (JSON it wrote, budgets the database accepted): a claim ends each
    one launchable or failed with its reason, and nothing stays claimed without a run."""
    store = sqlite_store
    if not store.list_tables():
        seed_leads(store)
    TRIED["claim batches"] += 1
    ids = []
    with store.engine.begin() as connection:
        for selection, budget in batch:
            ok_budget = (
                budget
                if budget is None
                or (
                    isinstance(budget, int | float)
                    and math.isfinite(budget)
                    and 0 <= budget <= 1e12
                )
                else None
            )  # the database refuses the rest (test_limits)
            ids.append(
                connection.execute(
                    text(
                        "INSERT INTO enrichment_requests (table_id, selection, budget) "
                        "VALUES ('tbl_leads', :s, :b) RETURNING id"
                    ),
                    {"s": json.dumps(selection, allow_nan=True), "b": ok_budget},
                ).scalar()
            )
    started = time.perf_counter()
    launchable, rejected = claim_launchable(store, limit=len(ids))
    _timed("claim batches", started)
    assert sorted([item.request.id for item in launchable] + [r[0] for r in rejected]) == sorted(
        ids
    )
    for request_id, reason in rejected:
        assert store.get_request(request_id).status == "failed" and reason
    with store.engine.begin() as connection:  # the next example starts from an empty queue
        connection.execute(text("DELETE FROM enrichment_requests"))
        connection.execute(text("UPDATE rows SET pending_request_id = NULL, status = 'idle'"))
