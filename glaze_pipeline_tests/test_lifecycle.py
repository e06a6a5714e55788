"""A job's lifecycle in Dagster: retried steps, re-executed runs, failures that keep the spend."""

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from dagster import (
    DagsterEventType,
    DagsterInstance,
    Definitions,
    ReexecutionOptions,
    execute_job,
    reconstructable,
)

from glaze_pipeline.core import queue
from glaze_pipeline.core.models import EntityKey, EntityType
from glaze_pipeline.core.providers.base import Provider, ProviderAnswer
from glaze_pipeline.core.providers.fake import FakeProvider
from glaze_pipeline.core.requests import RequestRepository
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.store import Store
from glaze_pipeline.definitions import build_definitions
from glaze_pipeline.defs.jobs import enrich_table
from glaze_pipeline.defs.resources import (
    EnrichmentProviders,
    GlazeDatabase,
    LanguageModel,
    ProgressChannel,
)


@dataclass
class BrokenWorker(FakeProvider):
    """A fake vendor whose worker crashes (not a provider error: a bug, a lost connection)
    on call number `crash_at`, once, or on every call from then on with `always`."""

    crash_at: int = 10
    always: bool = False
    crashed: int = 0

    async def lookup(self, key: EntityKey, fields: frozenset[str]) -> ProviderAnswer:
        if self.total_calls + 1 >= self.crash_at and (self.always or not self.crashed):
            self.crashed += 1
            self.calls[key.id] += 1  # the request left the machine and was billed
            raise RuntimeError("worker crashed")
        return await super().lookup(key, fields)


class FixedProviders(EnrichmentProviders):
    """The test's provider objects, the same across the run's steps and retries (Dagster
    rebuilds resources from their config, so they are held by the class)."""

    fixed: ClassVar[list[Provider]] = []

    def providers(self, steps_at_once: int = 1) -> list[Provider]:
        return list(self.fixed)


def definitions(store: Store, provider: Provider) -> Definitions:
    FixedProviders.fixed = [provider]
    return Definitions(
        jobs=[enrich_table],
        resources={
            "llm": LanguageModel(),
            "glaze_db": GlazeDatabase(url=store.url),
            "providers": FixedProviders(),
            "progress": ProgressChannel(),
        },
    )


def queued_run(store: Store, table: Any, provider: Provider) -> tuple[str, Any]:
    """Enqueue, claim and run a request the way the sensor does, in process."""
    request_id = queue.enqueue(
        store, table.id, {"column_ids": [table.column_by_key("industry").id]}
    )
    [item], _ = queue.claim_launchable(store, limit=1)
    job = definitions(store, provider).get_job_def("enrich_table")
    with DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            run_config=item.run_config,
            instance=instance,
            tags=item.tags,
            raise_on_error=False,
        )
    return request_id, result


def test_a_step_that_fails_once_and_succeeds_on_retry_ends_succeeded(store: Store) -> None:
    table = seed_generated(store, rows=40, unique_companies=40)
    provider = BrokenWorker(EntityType.COMPANY, crash_at=10, max_concurrency=1)
    request_id, result = queued_run(store, table, provider)

    assert result.success
    events = {e.event_type for e in result.all_events}
    assert DagsterEventType.STEP_UP_FOR_RETRY in events  # Dagster retried the chunk
    requests = RequestRepository(store)
    # Every transition of the request, in order: no terminal status was ever written twice.
    assert requests.transitions(request_id) == [
        (None, "queued"),
        ("queued", "launched"),
        ("launched", "running"),
        ("running", "succeeded"),
    ]
    request = requests.get(request_id)
    assert (request.status, request.error, request.cells_done) == ("succeeded", None, 40)
    # The answers bought before the crash were cached: the retry bought only the rest, and
    # the record holds every call that left the machine, the crashed one included.
    assert provider.total_calls == 41
    assert request.provider_calls == {provider.name: 41}
    assert request.cost == 40.0  # the crashed call was not charged (it raised)


def test_a_failed_run_records_what_it_bought(store: Store) -> None:
    table = seed_generated(store, rows=40, unique_companies=40)
    provider = BrokenWorker(EntityType.COMPANY, crash_at=15, always=True, max_concurrency=1)
    request_id, result = queued_run(store, table, provider)

    assert not result.success
    request = RequestRepository(store).get(request_id)
    assert request.status == "failed" and "worker crashed" in (request.error or "")
    # 14 answers bought before the first crash, then one crashed call per attempt.
    assert request.provider_calls == {provider.name: provider.total_calls}
    assert request.cost == 14.0


def enrich_job_from_env() -> Any:
    """The job as a run worker loads it, for re-execution (GLAZE_DATABASE_URL names the db)."""
    return build_definitions().get_job_def("enrich_table")


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    with DagsterInstance.local_temp(str(tmp_path)) as instance:
        yield instance


def test_re_executing_a_run_never_rewrites_its_request(
    store: Store, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLAZE_DATABASE_URL", store.url)
    monkeypatch.delenv("GLAZE_PROVIDERS_FILE", raising=False)
    table = seed_generated(store, rows=6, unique_companies=3)
    request_id = queue.enqueue(
        store,
        table.id,
        {"column_ids": [table.column_by_key(k).id for k in ("industry", "title")]},
    )
    [item], _ = queue.claim_launchable(store, limit=1)
    job = reconstructable(enrich_job_from_env)
    with execute_job(job, instance, run_config=item.run_config, tags=item.tags) as first:
        assert first.success
    requests = RequestRepository(store)
    before = requests.get(request_id)
    assert before.status == "succeeded" and before.cost > 0

    with execute_job(
        job,
        instance,
        reexecution_options=ReexecutionOptions(parent_run_id=first.run_id),
    ) as again:
        assert again.success
    after = requests.get(request_id)
    fields = ("status", "cost", "provider_calls", "cells_done", "run_id", "finished_at")
    assert {f: getattr(after, f) for f in fields} == {f: getattr(before, f) for f in fields}
    assert requests.transitions(request_id)[-1] == ("running", "succeeded")  # nothing after
    # The re-execution's work is its own request, linked to the original.
    [retry_id] = [
        r
        for r in store_request_ids(store)
        if r != request_id and requests.get(r).retry_of == request_id
    ]
    retry = requests.get(retry_id)
    assert retry.status == "succeeded" and retry.run_id == again.run_id
    assert retry.provider_calls == {}  # everything was cached by the first run
    run = instance.get_run_by_id(again.run_id)
    assert run is not None and run.tags["glaze/request"] == retry_id


def store_request_ids(store: Store) -> list[str]:
    from sqlalchemy import text

    with store.engine.connect() as connection:
        return list(connection.execute(text("SELECT id FROM enrichment_requests")).scalars())


def test_a_worker_whose_request_was_failed_under_it_stops_and_rewrites_nothing(
    store: Store,
) -> None:
    """The reconciler decided the worker was dead; the worker was only slow. It must stop at
    its next beat, buy nothing more, and leave the request and the rows as they are."""
    table = seed_generated(store, rows=60, unique_companies=60)
    provider = FakeProvider(EntityType.COMPANY, latency_s=0.05, max_concurrency=2)
    requests = RequestRepository(store)
    request_id = queue.enqueue(
        store, table.id, {"column_ids": [table.column_by_key("industry").id]}
    )
    [item], _ = queue.claim_launchable(store, limit=1)

    def reconciler_fails_it() -> None:
        while requests.get(request_id).status != "running" or provider.total_calls < 4:
            time.sleep(0.01)
        requests.fail(request_id, "no heartbeat: its worker died")

    watcher = threading.Thread(target=reconciler_fails_it)
    watcher.start()
    job = definitions(store, provider).get_job_def("enrich_table")
    with DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            run_config=queue.job_run(item.request.kind, {**item.config, "concurrency": 2})[1],
            instance=instance,
            tags=item.tags,
            raise_on_error=False,
        )
    watcher.join()
    assert not result.success
    calls_at_end = provider.total_calls
    assert calls_at_end < 60  # it stopped buying
    request = requests.get(request_id)
    assert (request.status, request.error) == ("failed", "no heartbeat: its worker died")
    assert requests.transitions(request_id)[-1] == ("running", "failed")  # nothing after it
    assert request.provider_calls == {provider.name: calls_at_end}  # its spend is on record
    rows = store.rows_in_order(table.id)
    assert all("industry" not in row.meta for row in rows)  # it wrote no cell
    assert all(row.status == "idle" for row in rows)  # and holds no row
