"""Realtime progress on real Redis: channels under a prefix, and `finished` on every ending.

Pub/sub is server-wide (the database number does not scope it), so every test here publishes
under a prefix of its own: tests running at the same time on one server never hear each other,
which is the very property the prefix gives two environments.
"""

import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from dagster import (
    DagsterEventType,
    DagsterInstance,
    Definitions,
    build_run_status_sensor_context,
    build_sensor_context,
    job,
    op,
)

from glaze_pipeline.core import engine, queue
from glaze_pipeline.core.models import RequestStatus, Selection
from glaze_pipeline.core.progress import PREFIX_ENV, RedisProgress, resolve_prefix
from glaze_pipeline.core.requests import RequestRepository
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.store import Store, TableInfo
from glaze_pipeline.defs.jobs import enrich_table
from glaze_pipeline.defs.resources import (
    STALE_AFTER_ENV,
    EnrichmentProviders,
    GlazeDatabase,
    LanguageModel,
    ProgressChannel,
    RequestLiveness,
)
from glaze_pipeline.defs.sensors import (
    request_on_run_canceled,
    request_on_run_failure,
    request_reconciler,
)
from glaze_pipeline_tests.test_queue import app_cancels, columns


class Listener:
    """A subscriber to some channels; `until_finished()` collects what arrived."""

    def __init__(self, url: str, channels: list[str]) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(*channels)
        for _ in channels:  # the subscribe confirmations: listening from here on
            assert self.pubsub.get_message(timeout=2)["type"] == "subscribe"

    def received(self, *, timeout: float = 5.0, stop_at_finished: bool = True) -> list[Any]:
        messages: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.2)
            if message is None:
                if not stop_at_finished:
                    continue
                if messages and messages[-1][1]["event"] == "finished":
                    break
                continue
            messages.append((message["channel"].decode(), json.loads(message["data"])))
        return messages

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


@contextmanager
def listening(url: str, *channels: str) -> Iterator[Listener]:
    listener = Listener(url, list(channels))
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture
def channel(redis_url: str) -> ProgressChannel:
    """A progress resource under a prefix of this test's own."""
    return ProgressChannel(redis_url=redis_url, prefix=f"test-{secrets.token_hex(4)}")


def finished(messages: list[Any]) -> list[dict[str, Any]]:
    return [body for _, body in messages if body["event"] == "finished"]


# -- channel names --------------------------------------------------------------------------------


def test_the_default_prefix_separates_redis_databases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PREFIX_ENV, raising=False)
    assert resolve_prefix("redis://127.0.0.1:6379/0") == "glaze"
    assert resolve_prefix("redis://127.0.0.1:6379") == "glaze"
    assert resolve_prefix("redis://127.0.0.1:6379/9") == "glaze:db9"
    assert resolve_prefix("redis://127.0.0.1:6379/10") == "glaze:db10"
    assert resolve_prefix("unix:///run/redis.sock?db=3") == "glaze:db3"
    assert resolve_prefix("redis://127.0.0.1:6379/9", "staging") == "staging"
    # The environment is read when asked (a resource opening), never at import.
    monkeypatch.setenv(PREFIX_ENV, "ci-42:")
    assert resolve_prefix("redis://127.0.0.1:6379/9") == "ci-42"
    assert resolve_prefix("redis://127.0.0.1:6379/9", "staging") == "staging"
    assert ProgressChannel(redis_url="redis://127.0.0.1:6379/9").table_channel("t1") == (
        "ci-42:table:t1"
    )
    monkeypatch.delenv(PREFIX_ENV)
    channel = ProgressChannel(redis_url="redis://127.0.0.1:6379/9")
    assert channel.request_channel("r1") == "glaze:db9:request:r1"
    assert channel.table_channel("t1") == "glaze:db9:table:t1"


def test_two_prefixes_on_one_server_do_not_hear_each_other(redis_url: str) -> None:
    ours = ProgressChannel(redis_url=redis_url, prefix=f"env-a-{secrets.token_hex(4)}")
    theirs = ProgressChannel(redis_url=redis_url, prefix=f"env-b-{secrets.token_hex(4)}")
    with listening(redis_url, ours.request_channel("req_1"), ours.table_channel("tbl_1")) as ear:
        with theirs.publisher() as publisher:
            publisher.publish("finished", "req_1", "tbl_1", status="failed")
        assert ear.received(timeout=1.0, stop_at_finished=False) == []
        with ours.publisher() as publisher:
            publisher.publish("finished", "req_1", "tbl_1", status="succeeded")
        messages = ear.received()
    assert sorted(name for name, _ in messages) == [
        ours.request_channel("req_1"),
        ours.table_channel("tbl_1"),
    ]
    assert {body["status"] for _, body in messages} == {"succeeded"}


NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def test_cells_reach_a_subscriber_with_their_values_exact(redis_url: str) -> None:
    """Values a lead list holds (accents, CJK, emoji, a 20-digit id, nested JSON, a
    timestamp) come through the Redis message as the cell holds them."""
    channel = ProgressChannel(redis_url=redis_url, prefix=f"cells-{secrets.token_hex(4)}")
    value = {"city": "Zürich", "name": "株式会社", "tag": "🚀", "id": 12345678901234567890}
    with listening(redis_url, channel.table_channel("tbl_1")) as ear:
        with channel.publisher() as publisher:
            publisher.publish(
                "cells", "req_1", "tbl_1", cells=[{"row_id": "r1", "value": value}], at=NOW
            )
            publisher.publish("finished", "req_1", "tbl_1", status="succeeded")
        messages = ear.received()
    [cells] = [body for _, body in messages if body["event"] == "cells"]
    assert cells["cells"] == [{"row_id": "r1", "value": value}]
    assert cells["at"] == str(NOW)


def test_a_publisher_without_a_prefix_uses_its_database_default(redis_url: str) -> None:
    publisher = RedisProgress(redis_url)
    try:
        assert publisher.prefix == resolve_prefix(redis_url)
    finally:
        publisher.close()


# -- `finished` on every ending ---------------------------------------------------------------------


def job_defs(store: Store, channel: ProgressChannel) -> Any:
    return Definitions(
        jobs=[enrich_table],
        resources={
            "llm": LanguageModel(),
            "glaze_db": GlazeDatabase(url=store.url),
            "providers": EnrichmentProviders(),
            "progress": channel,
        },
    ).get_job_def("enrich_table")


def run_listening(
    store: Store, channel: ProgressChannel, redis_url: str, name: str, config: dict[str, Any]
) -> tuple[Any, list[Any]]:
    """Run enrich_table with `config` in process while listening on channel `name`."""
    with listening(redis_url, name) as ear:
        with DagsterInstance.ephemeral() as instance:
            result = job_defs(store, channel).execute_in_process(
                run_config={"ops": {"detect_entities": {"config": config}}},
                instance=instance,
                raise_on_error=False,
            )
        return result, ear.received()


def test_a_cancelled_job_publishes_finished_cancelled(
    pg_store: Store, redis_url: str, channel: ProgressChannel
) -> None:
    table = seed_generated(pg_store, rows=5, unique_companies=2)
    request_id = queue.enqueue(pg_store, table.id, columns(table, "industry"))
    [launchable], _ = queue.claim_launchable(pg_store, limit=1)
    app_cancels(pg_store, request_id)
    result, messages = run_listening(
        pg_store, channel, redis_url, channel.request_channel(request_id), launchable.config
    )
    assert not result.success
    [end] = finished(messages)
    assert end["status"] == "cancelled" and end["progress"] == 100
    assert pg_store.get_request(request_id).status == "cancelled"
    assert pg_store.held_rows(request_id) == 0


def test_a_failed_job_publishes_finished_failed(
    pg_store: Store, redis_url: str, channel: ProgressChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> int:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(Store, "apply_patches", broken)
    table = seed_generated(pg_store, rows=5, unique_companies=2)
    request_id = queue.enqueue(pg_store, table.id, columns(table, "industry"))
    [launchable], _ = queue.claim_launchable(pg_store, limit=1)
    result, messages = run_listening(
        pg_store, channel, redis_url, channel.table_channel(table.id), launchable.config
    )
    assert not result.success
    assert messages[0][1]["event"] == "started"
    [end] = finished(messages)
    assert end["status"] == "failed" and "the database went away" in end["error"]
    assert pg_store.held_rows(request_id) == 0
    assert {r.status for r in pg_store.rows_in_order(table.id)} == {"idle"}


def running_request(store: Store, table: TableInfo, run_id: str) -> str:
    """A claimed request whose run adopted it and held its rows `running`, then went silent."""
    request_id = queue.enqueue(store, table.id, columns(table, "industry"))
    [launchable], _ = queue.claim_launchable(store, limit=1)
    RequestRepository(store).adopt(request_id, run_id)
    selection = Selection.model_validate(launchable.request.selection)
    target = engine.resolve_target(store, table.id, selection)
    engine.detect_entities(store, target, request_id=request_id)
    assert store.held_rows(request_id) == 5
    return request_id


def test_the_reconciler_publishes_finished_when_it_fails_a_dead_run(
    pg_store: Store, redis_url: str, channel: ProgressChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STALE_AFTER_ENV, "0")  # any silence is too long
    table = seed_generated(pg_store, rows=5, unique_companies=2)
    request_id = running_request(pg_store, table, "run-that-is-gone")
    resources = {
        "glaze_db": GlazeDatabase(url=pg_store.url),
        "progress": channel,
        "request_liveness": RequestLiveness(),
    }
    with listening(redis_url, channel.request_channel(request_id)) as ear:
        with (
            DagsterInstance.ephemeral() as instance,
            build_sensor_context(instance=instance, resources=resources) as context,
        ):
            request_reconciler(context)
        messages = ear.received()
    [end] = finished(messages)
    assert end["status"] == "failed" and "stopped reporting" in end["error"]
    assert end["request_id"] == request_id and end["table_id"] == table.id
    assert pg_store.held_rows(request_id) == 0
    assert {r.status for r in pg_store.rows_in_order(table.id)} == {"idle"}


@op
def fails() -> None:
    raise RuntimeError("the worker crashed")


@op
def succeeds() -> None:
    return None


@job
def failing_run() -> None:
    fails()


@job
def plain_run() -> None:
    succeeds()


def test_the_run_failure_sensor_publishes_finished_failed(
    pg_store: Store, redis_url: str, channel: ProgressChannel
) -> None:
    table = seed_generated(pg_store, rows=5, unique_companies=2)
    resources = {"glaze_db": GlazeDatabase(url=pg_store.url), "progress": channel}
    with DagsterInstance.ephemeral() as instance:
        request_id = running_request(pg_store, table, "run-x")
        result = failing_run.execute_in_process(
            instance=instance, raise_on_error=False, tags={"glaze/request": request_id}
        )
        with (
            build_run_status_sensor_context(
                sensor_name=request_on_run_failure.name,
                dagster_instance=instance,
                dagster_run=result.dagster_run,
                dagster_event=result.get_run_failure_event(),
                resources=resources,
            ).for_run_failure() as context,
            listening(redis_url, channel.request_channel(request_id)) as ear,
        ):
            request_on_run_failure(context)
            messages = ear.received()
            request_on_run_failure(context)  # a second look changes nothing, announces nothing
            assert ear.received(timeout=1.0, stop_at_finished=False) == []
    [end] = finished(messages)
    assert end["status"] == "failed" and f"run {result.run_id} failed" in end["error"]
    assert pg_store.get_request(request_id).status == RequestStatus.FAILED
    assert pg_store.held_rows(request_id) == 0


def test_the_run_canceled_sensor_publishes_finished_cancelled(
    pg_store: Store, redis_url: str, channel: ProgressChannel
) -> None:
    table = seed_generated(pg_store, rows=5, unique_companies=2)
    resources = {"glaze_db": GlazeDatabase(url=pg_store.url), "progress": channel}
    with DagsterInstance.ephemeral() as instance:
        request_id = running_request(pg_store, table, "run-y")
        run = instance.create_run_for_job(plain_run, tags={"glaze/request": request_id})
        instance.report_run_canceled(run)
        [entry] = instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_CANCELED)
        assert entry.dagster_event is not None
        with (
            build_run_status_sensor_context(
                sensor_name=request_on_run_canceled.name,
                dagster_instance=instance,
                dagster_run=instance.get_run_by_id(run.run_id),
                dagster_event=entry.dagster_event,
                resources=resources,
            ) as context,
            listening(redis_url, channel.request_channel(request_id)) as ear,
        ):
            request_on_run_canceled(context)
            messages = ear.received()
    [end] = finished(messages)
    assert end["status"] == "cancelled"
    assert pg_store.get_request(request_id).status == RequestStatus.CANCELLED
    assert {r.status for r in pg_store.rows_in_order(table.id)} == {"idle"}


def test_the_definitions_give_every_ending_sensor_the_progress_resource() -> None:
    from glaze_pipeline.definitions import build_definitions

    defs = build_definitions("sqlite:///unused.db")
    Definitions.validate_loadable(defs)
    for sensor in (request_reconciler, request_on_run_failure, request_on_run_canceled):
        assert {"glaze_db", "progress"} <= set(sensor.required_resource_keys)
    assert isinstance(defs.resources["progress"], ProgressChannel)


def test_an_ending_is_announced_once_even_when_two_parties_record_it(
    pg_store: Store, redis_url: str, channel: ProgressChannel
) -> None:
    """The job closed its request itself; the reconciler's later look lets go and stays quiet."""
    table = seed_generated(pg_store, rows=5, unique_companies=2)
    request_id = running_request(pg_store, table, "run-z")
    with (
        channel.publisher() as publisher,
        listening(redis_url, channel.request_channel(request_id)) as ear,
    ):
        assert queue.close_for_run(
            pg_store, request_id, RequestStatus.FAILED, "run z failed", publisher
        )
        assert not queue.close_for_run(
            pg_store, request_id, RequestStatus.CANCELLED, "run z cancelled", publisher
        )
        queue.reconcile(
            pg_store,
            find_run=lambda r: None,
            cancel_run=lambda run_id: None,
            report_dead_run=lambda run_id, reason: None,
            now=pg_store.get_request(request_id).updated_at + timedelta(hours=1),
            stale_after=timedelta(minutes=5),
            publisher=publisher,
        )
        messages = ear.received(timeout=1.5, stop_at_finished=False)
    assert [body["status"] for body in finished(messages)] == ["failed"]
