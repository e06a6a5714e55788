"""The request queue: enqueue, claim races, the sensor, reconciling, cancellation, kinds."""

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from dagster import DagsterInstance, RunRequest, SkipReason, build_sensor_context
from sqlalchemy import text

from glaze_pipeline.core import engine, queue
from glaze_pipeline.core.cache_sql import SqlAnswerCache
from glaze_pipeline.core.engine import JobSettings
from glaze_pipeline.core.errors import InvalidSelectionError
from glaze_pipeline.core.models import EntityType, RequestKind, Selection
from glaze_pipeline.core.providers.fake import FakeProvider
from glaze_pipeline.core.requests import Adoption, RequestRepository
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.store import Store, utcnow
from glaze_pipeline.definitions import build_definitions
from glaze_pipeline.defs.resources import (
    STALE_AFTER_ENV,
    GlazeDatabase,
    ProgressChannel,
    RequestLiveness,
)
from glaze_pipeline.defs.sensors import enrichment_queue_sensor, request_reconciler
from glaze_pipeline.graphql_client import enrich_tags


def columns(table: Any, *keys: str) -> dict[str, Any]:
    return {"column_ids": [table.column_by_key(k).id for k in keys]}


def app_cancels(store: Store, request_id: str) -> None:
    """What the app does to cancel: one plain SQL UPDATE of the flag."""
    with store.engine.begin() as connection:
        connection.execute(
            text("UPDATE enrichment_requests SET cancel_requested = true WHERE id = :id"),
            {"id": request_id},
        )


def test_idempotency_key_yields_one_request(store: Store) -> None:
    first = queue.enqueue(store, "tbl_x", {"whole_table": True}, idempotency_key="upload-1")
    second = queue.enqueue(store, "tbl_x", {"whole_table": True}, idempotency_key="upload-1")
    other_table = queue.enqueue(store, "tbl_y", {"whole_table": True}, idempotency_key="upload-1")
    assert first == second != other_table


def test_claim_in_priority_order_and_never_a_cancelled_one(store: Store) -> None:
    low = queue.enqueue(store, "t", {"whole_table": True}, priority=-10)
    high = queue.enqueue(store, "t", {"whole_table": True}, priority=5)
    cancelled = queue.enqueue(store, "t", {"whole_table": True}, priority=9)
    assert queue.request_cancel(store, cancelled) == "cancelled"
    requests = RequestRepository(store)
    claimed = requests.claim(limit=1)
    assert [c.id for c in claimed] == [high]
    assert [c.id for c in requests.claim(limit=10)] == [low]
    assert requests.claim() == []
    assert store.get_request(cancelled).status == "cancelled"
    assert store.get_request(high).status == "launched"


def test_two_concurrent_claimers_launch_each_request_once(store: Store) -> None:
    ids = {queue.enqueue(store, "t", {"whole_table": True}) for _ in range(1000)}
    claimed: list[list[str]] = [[], []]
    start = threading.Barrier(2)

    def claimer(slot: int) -> None:
        own = Store(store.url)  # its own connections, like a second daemon
        start.wait()
        while batch := RequestRepository(own).claim(limit=5):
            claimed[slot].extend(r.id for r in batch)
        own.dispose()

    threads = [threading.Thread(target=claimer, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = claimed[0] + claimed[1]
    assert len(everything) == 1000  # nobody claimed a request twice...
    assert set(everything) == ids  # ...and every request was claimed
    if store.dialect == "postgresql":  # SQLite serialises writers: one may drain it all
        assert claimed[0] and claimed[1]  # both claimers really competed


def test_sensor_launches_valid_requests_and_fails_bad_ones(store: Store) -> None:
    table = seed_generated(store, rows=5, unique_companies=2)
    good = queue.enqueue(store, table.id, columns(table, "industry"), budget=10)
    unknown_table = queue.enqueue(store, "tbl_nope", {"whole_table": True})
    with pytest.raises(InvalidSelectionError, match="budget must be a number >= 0"):
        queue.enqueue(store, table.id, columns(table, "industry"), budget=-1)  # refused at once
    bad_shape = queue.enqueue(store, table.id, {"column_ids": [], "cells": []})
    unknown_column = queue.enqueue(store, table.id, {"column_ids": ["col_nope"]})
    resources = {"glaze_db": GlazeDatabase(url=store.url), "progress": ProgressChannel()}
    with DagsterInstance.ephemeral() as instance:
        with build_sensor_context(instance=instance, resources=resources) as context:
            result = enrichment_queue_sensor(context)
        [run] = result.run_requests
        assert isinstance(run, RunRequest) and run.run_key == good
        assert run.tags["glaze/request"] == good and run.tags["glaze/table"] == table.id
        assert run.tags["glaze/kind"] == "enrich"
        config = run.run_config["ops"]["detect_entities"]["config"]
        assert config["request_id"] == good and config["budget"] == 10
        with build_sensor_context(instance=instance, resources=resources) as context:
            again = enrichment_queue_sensor(context)
        assert isinstance(again, SkipReason) and "no queued requests" in str(again.skip_message)
    reasons = {r: store.get_request(r) for r in (unknown_table, bad_shape, unknown_column)}
    assert all(r.status == "failed" for r in reasons.values())
    assert "unknown table 'tbl_nope'" in reasons[unknown_table].error
    assert "invalid selection" in reasons[bad_shape].error
    assert "col_nope" in reasons[unknown_column].error
    assert store.get_request(good).status == "launched"


def test_every_launch_path_builds_the_same_run(store: Store) -> None:
    """The sensor and the launcher (a claimed request) and a GraphQL launch (its op config)
    start one job with one run config and one set of tags: `job_run` and `tags_for`."""
    table = seed_generated(store, rows=3, unique_companies=1)
    request_id = queue.enqueue(store, table.id, columns(table, "industry"))
    [item], _ = queue.claim_launchable(store, limit=1)
    assert (
        item.tags
        == enrich_tags(item.config)
        == {
            "glaze/kind": "enrich",
            "glaze/table": table.id,
            "glaze/enrich-table": table.id,
            "glaze/request": request_id,
        }
    )
    assert (item.job_name, item.run_config) == queue.job_run(RequestKind.ENRICH, item.config)
    assert item.run_config == {"ops": {"detect_entities": {"config": item.config}}}


def test_only_enrich_runs_take_the_per_table_concurrency_key() -> None:
    assert queue.tags_for(RequestKind.ESTIMATE, "tbl_a", "req_1") == {
        "glaze/kind": "estimate",
        "glaze/table": "tbl_a",
        "glaze/request": "req_1",
    }
    assert queue.tags_for(RequestKind.PRE_ENRICH, "tbl_a") == {
        "glaze/kind": "pre_enrich",
        "glaze/table": "tbl_a",
    }
    assert queue.tags_for("enrich", "tbl_a") == {
        "glaze/kind": "enrich",
        "glaze/table": "tbl_a",
        "glaze/enrich-table": "tbl_a",
    }


def test_stale_after_comes_from_the_reconcilers_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STALE_AFTER_ENV, raising=False)
    assert RequestLiveness().stale_after() == timedelta(seconds=300)
    monkeypatch.setenv(STALE_AFTER_ENV, "1.5")  # read when the reconciler ticks, not at import
    assert RequestLiveness().stale_after() == timedelta(seconds=1.5)
    assert RequestLiveness(stale_after_seconds=0).stale_after() == timedelta(0)  # config wins
    # A typo fails the tick, naming the variable, never a guess.
    monkeypatch.setenv(STALE_AFTER_ENV, "soon")
    with pytest.raises(ValueError, match=f"^{STALE_AFTER_ENV} must be a number of seconds"):
        RequestLiveness().stale_after()
    monkeypatch.setenv(STALE_AFTER_ENV, "-1")
    with pytest.raises(ValueError, match="non-negative"):
        RequestLiveness().stale_after()
    # The deployed reconciler is given it.
    definitions = build_definitions()
    assert "request_liveness" in request_reconciler.required_resource_keys
    assert isinstance(definitions.resources["request_liveness"], RequestLiveness)


def test_the_reconciler_fails_a_silent_request_after_its_configured_stale_after(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(STALE_AFTER_ENV, raising=False)
    silent = queue.enqueue(store, "t", {"whole_table": True})
    requests = RequestRepository(store)
    requests.claim(limit=1)
    assert requests.adopt(silent, "run-gone") is Adoption.ADOPTED

    def tick(stale_after_seconds: float | None) -> None:
        resources = {
            "glaze_db": GlazeDatabase(url=store.url),
            "progress": ProgressChannel(),
            "request_liveness": RequestLiveness(stale_after_seconds=stale_after_seconds),
        }
        with (
            DagsterInstance.ephemeral() as instance,
            build_sensor_context(instance=instance, resources=resources) as context,
        ):
            request_reconciler(context)

    tick(None)  # the default 300 s: a request adopted just now is not silent
    assert store.get_request(silent).status == "running"
    tick(0)
    assert store.get_request(silent).status == "failed"
    assert "stopped reporting" in store.get_request(silent).error


def test_reconcile_cancels_requeues_and_fails_dead_runs(store: Store) -> None:
    cancel_me = queue.enqueue(store, "t", {"whole_table": True})
    app_cancels(store, cancel_me)
    lost = queue.enqueue(store, "t", {"whole_table": True})
    dead = queue.enqueue(store, "t", {"whole_table": True})
    ended = queue.enqueue(store, "t", {"whole_table": True})
    requests = RequestRepository(store)
    requests.claim(limit=10)
    assert requests.adopt(dead, "run-dead") is Adoption.ADOPTED
    assert requests.adopt(ended, "run-ended") is Adoption.ADOPTED
    runs = {
        dead: queue.RunView("run-dead", "STARTED"),
        ended: queue.RunView("run-ended", "FAILURE"),
    }
    reported: list[str] = []
    later = utcnow() + timedelta(minutes=10)
    actions = queue.reconcile(
        store,
        find_run=lambda r: runs.get(r.id),
        cancel_run=lambda run_id: None,
        report_dead_run=lambda run_id, reason: reported.append(run_id),
        now=later,
        stale_after=timedelta(minutes=5),
    )
    assert store.get_request(cancel_me).status == "cancelled"
    assert store.get_request(lost).status == "queued"  # claimed, never launched: back in line
    assert store.get_request(dead).status == "failed"
    assert "no heartbeat" in store.get_request(dead).error
    assert reported == ["run-dead"]
    assert store.get_request(ended).status == "failed"
    assert "ended FAILURE" in store.get_request(ended).error
    assert len(actions) == 4
    assert requests.transitions(lost) == [
        (None, "queued"),
        ("queued", "launched"),
        ("launched", "queued"),
    ]
    assert requests.transitions(dead)[-1] == ("running", "failed")
    # Reconciling again changes nothing: closed requests are history.
    assert (
        queue.reconcile(
            store,
            find_run=lambda r: runs.get(r.id),
            cancel_run=lambda run_id: None,
            report_dead_run=lambda run_id, reason: reported.append(run_id),
            now=later,
            stale_after=timedelta(minutes=5),
        )
        == []
    )


def test_cancel_stops_a_running_chunk(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "HEARTBEAT_SECONDS", 0.05)
    table = seed_generated(store, rows=40, unique_companies=40)
    selection = Selection(**columns(table, "industry"))
    target = engine.resolve_target(store, table.id, selection)
    request_id = engine.start_job(store, target, selection, JobSettings())
    detection = engine.detect_entities(store, target)
    provider = FakeProvider(EntityType.COMPANY, latency_s=0.05, max_concurrency=2)

    def cancel_once_buying() -> None:  # mid-chunk, however slow the machine is to get there
        deadline = time.monotonic() + 30
        while provider.total_calls < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        app_cancels(store, request_id)

    threading.Thread(target=cancel_once_buying, daemon=True).start()
    result = engine.enrich_chunk(
        store,
        request_id,
        detection.entities,
        [provider],
        JobSettings(concurrency=2),
        cache=SqlAnswerCache(store),
    )
    assert result.stopped == "cancelled by the user"
    assert 0 < provider.total_calls < 40  # stopped early
    cancelled = [o for o in result.outcomes.values() if o["industry"].error == "cancelled"]
    assert len(cancelled) == 40 - provider.total_calls
    bought = SqlAnswerCache(store).get_many((e.key.id, provider.name) for e in detection.entities)
    assert len(bought) == provider.total_calls  # what was paid for is kept for the re-run
    spend = RequestRepository(store).spend(request_id)
    assert spend.calls == {provider.name: provider.total_calls} and spend.unsettled == 0


def run_kind(store: Store, table: Any, kind: str, instance: DagsterInstance, **config: Any) -> Any:
    job = build_definitions(store.url).get_job_def("enrich_table")
    result = job.execute_in_process(
        run_config={
            "ops": {"detect_entities": {"config": {"table_id": table.id, "kind": kind, **config}}}
        },
        instance=instance,
    )
    return store.get_request(result.output_for_node("detect_entities", "plan").request_id)


def test_estimate_then_pre_enrich_then_enrich_buys_once(store: Store) -> None:
    table = seed_generated(store, rows=30, unique_companies=10)
    selection = columns(table, "industry", "employee_count", "title")
    with DagsterInstance.ephemeral() as instance:
        estimate = run_kind(store, table, "estimate", instance, **selection)
        assert estimate.status == "succeeded"
        assert estimate.estimate["expected_provider_calls"] == {
            "fake_company": 10,
            "fake_person": 30,
        }
        # The upper bound charges every call; with no history, the expectation is the stated
        # prior's (80 % found, a miss free at these vendors).
        assert estimate.estimate["max_cost"] == 40
        assert estimate.estimate["expected_cost"] == 32
        assert estimate.estimate["cache_hits"] == 0
        assert all(r.meta == {} for r in store.rows_in_order(table.id))  # wrote nothing

        warm = run_kind(store, table, "pre_enrich", instance, whole_table=True)
        assert warm.status == "succeeded"
        assert warm.provider_calls == {"fake_company": 10, "fake_person": 30}
        assert all(r.meta == {} and r.status == "idle" for r in store.rows_in_order(table.id))

        again = run_kind(store, table, "estimate", instance, **selection)
        assert again.estimate["expected_provider_calls"] == {}
        assert again.estimate["max_cost"] == 0
        assert again.estimate["cache_hits"] == 40

        enriched = run_kind(store, table, "enrich", instance, **selection)
        assert enriched.provider_calls == {}  # the click after pre-enrichment buys nothing
        assert enriched.cells_done == 90


def test_the_app_inserts_a_request_with_plain_sql(store: Store) -> None:
    """The app is not Python: a two-column INSERT is a complete, claimable request."""
    from sqlalchemy import text

    table = seed_generated(store, rows=2, unique_companies=1)
    with store.engine.begin() as connection:
        connection.execute(
            text("INSERT INTO enrichment_requests (table_id, selection) VALUES (:t, :s)"),
            {"t": table.id, "s": '{"whole_table": true}'},
        )
    [claimed] = RequestRepository(store).claim()
    assert claimed.id.startswith("req_") and claimed.kind == "enrich"
    assert queue.launch_config(store, claimed)["whole_table"] is True
    request = store.get_request(claimed.id)
    assert (request.status, request.cells_done, request.cancel_requested) == ("launched", 0, False)
