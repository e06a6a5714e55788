"""The Dagster layer: Definitions load, one in-process run per database, failures recorded."""

import logging
from typing import Any

import pytest
from dagster import DagsterEventType, DagsterInstance, Definitions

from glaze_pipeline.core import engine, queue
from glaze_pipeline.core.seed import LEADS_ENRICH_KEYS, leads_column_id, seed_generated, seed_leads
from glaze_pipeline.core.store import Store
from glaze_pipeline.definitions import build_definitions, defs
from glaze_pipeline.defs.assets import ENRICHED_TABLE, ENTITY_CACHE


def run_job(store: Store, config: dict[str, Any], instance: DagsterInstance) -> Any:
    job = build_definitions(store.url).get_job_def("enrich_table")
    return job.execute_in_process(
        run_config={"ops": {"detect_entities": {"config": config}}},
        instance=instance,
        raise_on_error=False,
    )


def materializations(result: Any, key: Any) -> list[Any]:
    return [
        event.event_specific_data.materialization
        for event in result.all_events
        if event.event_type is DagsterEventType.ASSET_MATERIALIZATION
        and event.event_specific_data.materialization.asset_key == key
    ]


def test_definitions_load() -> None:
    Definitions.validate_loadable(defs)
    job = defs.get_job_def("enrich_table")
    assert {n.name for n in job.nodes} == {
        "detect_entities",
        "enrich_entities",
        "apply_results",
        "close_job",
    }
    assert {spec.key for spec in defs.assets or []} >= {ENRICHED_TABLE, ENTITY_CACHE}


def chunk_steps(result: Any) -> set[str]:
    return {
        event.step_key
        for event in result.all_events
        if event.step_key and event.step_key.startswith("enrich_entities[")
    }


def test_the_fan_out_width_by_executor_and_entities() -> None:
    settings = engine.JobSettings()
    assert settings.fan_out("in_process") == engine.IN_PROCESS_CHUNKS == 4
    # A span holds its own entities' outcomes: in process, spans of 20,000 at most.
    assert settings.fan_out("in_process", entities=80_000) == 4
    assert settings.fan_out("in_process", entities=110_000) == 6
    assert settings.fan_out("in_process", entities=5_000_000) == engine.MAX_CHUNKS == 16
    assert settings.fan_out("multiprocess", entities=10) == 16
    assert settings.fan_out("celery") == 16
    assert engine.JobSettings(max_chunks=3).fan_out("in_process", entities=110_000) == 3


def test_in_process_the_fan_out_is_narrow_unless_asked(store: Store) -> None:
    """In process the enrich steps run one after another: the job fans out to at most
    IN_PROCESS_CHUNKS of them (each costs a start, a tail and its fixed statements for no
    parallelism); `max_chunks` set in the config still wins. Every row is written either way."""
    table = seed_generated(store, rows=600, unique_companies=600)
    columns = [table.column_by_key(k).id for k in ("industry", "employee_count")]
    # A company a row, pages of 50 rows, at least 2 entities a span: 12 spans if nothing
    # narrowed them.
    config = {"table_id": table.id, "column_ids": columns, "chunk_size": 2, "page_size": 50}
    with DagsterInstance.ephemeral() as instance:
        narrow = run_job(store, config, instance)
        assert narrow.success
        assert len(chunk_steps(narrow)) == engine.IN_PROCESS_CHUNKS == 4
        [mat] = materializations(narrow, ENRICHED_TABLE)
        assert mat.metadata["rows_written"].value == 600

        overwrite = {**config, "max_chunks": 12, "overwrite": True}
        wide = run_job(store, overwrite, instance)
        assert wide.success
        assert len(chunk_steps(wide)) == 12
        [mat] = materializations(wide, ENRICHED_TABLE)
        assert mat.metadata["rows_written"].value == 600


def test_job_on_thousand_rows(store: Store) -> None:
    table = seed_generated(store, rows=1000, unique_companies=100)
    columns = [table.column_by_key(k).id for k in ("industry", "employee_count", "revenue")]
    with DagsterInstance.ephemeral() as instance:
        first = run_job(
            store, {"table_id": table.id, "column_ids": columns, "chunk_size": 40}, instance
        )
        assert first.success
        # 100 entities at >= 40 per chunk: 2 or 3 fat steps (spans of rows cut where each
        # owns its 40), not 100 or 3,000
        chunk_steps = {
            e.step_key
            for e in first.all_events
            if e.step_key and e.step_key.startswith("enrich_entities[")
        }
        assert 2 <= len(chunk_steps) <= 3
        [mat] = materializations(first, ENRICHED_TABLE)
        meta = {k: v.value for k, v in mat.metadata.items()}
        assert mat.partition == table.id
        assert meta["provider_calls"] == {"fake_company": 100}
        assert meta["rows_written"] == 1000
        # Each span (under 1,000 rows here) is one page: one read and one JSON-merge write.
        assert meta["apply_statements"] == 2 * len(chunk_steps)
        assert meta["entities"] == 100
        assert instance.has_dynamic_partition("glaze_tables", table.id)

        # The same grid again: every cell now holds a value, so each is kept, nothing bought.
        again = run_job(store, {"table_id": table.id, "column_ids": columns}, instance)
        [kept] = materializations(again, ENRICHED_TABLE)
        assert kept.metadata["cells_kept"].value == 3000
        assert (kept.metadata["entities"].value, kept.metadata["rows_written"].value) == (0, 0)
        again_id = again.output_for_node("detect_entities", "plan").request_id
        assert store.get_request(again_id).status == "succeeded"
        assert "3000 kept" in store.get_request(again_id).error

        # A refresh (overwrite): every company is looked up again, all from the cache.
        second = run_job(
            store, {"table_id": table.id, "column_ids": columns, "overwrite": True}, instance
        )
        [mat2] = materializations(second, ENRICHED_TABLE)
        assert mat2.metadata["provider_calls"].value == {}
        assert mat2.metadata["cache_hits"].value == 100
        assert materializations(second, ENTITY_CACHE) == []  # nothing bought

    request_id = first.output_for_node("detect_entities", "plan").request_id
    request = store.get_request(request_id)
    assert (request.status, request.cells_done, request.run_id) == ("succeeded", 3000, first.run_id)


def test_leads_demo_table(sqlite_store: Store) -> None:
    seed_leads(sqlite_store)
    config = {
        "table_id": "tbl_leads",
        "column_ids": [leads_column_id(k) for k in LEADS_ENRICH_KEYS],
    }
    with DagsterInstance.ephemeral() as instance:
        result = run_job(sqlite_store, config, instance)
        assert result.success
        # Launched like the Launchpad or the CLI (no tags given): the run is tagged all the same,
        # and a partial request (Katherine Johnson has no identifier) is visible on a green run.
        run = instance.get_run_by_id(result.run_id)
        assert run is not None
        request = sqlite_store.get_request(run.tags["glaze/request"])
        assert (request.status, request.run_id) == ("partial", result.run_id)
        assert run.tags["glaze/table"] == "tbl_leads" and run.tags["glaze/kind"] == "enrich"
        assert run.tags["glaze/outcome"] == "partial"
        warnings = [
            e.message
            for e in instance.all_logs(result.run_id)
            if e.level == logging.WARNING and e.message
        ]
        assert any(f"request {request.id} ended partial" in m for m in warnings)
    rows = {r.id: r for r in sqlite_store.rows_in_order("tbl_leads")}
    assert (
        rows["row_leads_01"].data["industry"] == rows["row_leads_07"].data["industry"]
    )  # one company
    assert rows["row_leads_08"].status == "failed"  # no identifier at all
    assert all(rows[f"row_leads_{i:02d}"].status == "done" for i in (1, 2, 3, 4, 5, 6, 7, 9, 10))


def test_bad_config_fails_the_run_with_a_clear_error(store: Store) -> None:
    with DagsterInstance.ephemeral() as instance:
        result = run_job(store, {"table_id": "tbl_nope", "whole_table": True}, instance)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "unknown table 'tbl_nope'" in str(
        failure.step_failure_data.user_failure_data or failure.step_failure_data.error
    )


def test_queued_request_ends_failed_with_the_reason(store: Store) -> None:
    table = seed_generated(store, rows=3, unique_companies=1)
    request_id = queue.enqueue(store, table.id, {"column_ids": ["col_nope"]})
    with DagsterInstance.ephemeral() as instance:
        result = run_job(
            store,
            {"table_id": table.id, "column_ids": ["col_nope"], "request_id": request_id},
            instance,
        )
    assert not result.success
    request = store.get_request(request_id)
    assert request.status == "failed"
    assert "col_nope" in (request.error or "")
    assert all(r.status == "idle" for r in store.rows_in_order(table.id))


@pytest.mark.parametrize("config", [{"budget": -5}, {"concurrency": 0}])
def test_invalid_settings_are_named(store: Store, config: dict[str, Any]) -> None:
    table = seed_generated(store, rows=1, unique_companies=1)
    with DagsterInstance.ephemeral() as instance:
        result = run_job(store, {"table_id": table.id, "whole_table": True, **config}, instance)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert next(iter(config)) in str(failure.step_failure_data.user_failure_data.description)


def test_progress_is_published_on_redis(postgres_url: str, pg_store: Store, redis_url: str) -> None:
    import json
    import threading

    import redis

    from glaze_pipeline.defs.jobs import enrich_table
    from glaze_pipeline.defs.resources import (
        EnrichmentProviders,
        GlazeDatabase,
        LanguageModel,
        ProgressChannel,
    )

    table = seed_generated(pg_store, rows=30, unique_companies=3)
    client = redis.Redis.from_url(redis_url)
    subscriber = client.pubsub()
    channel = ProgressChannel(redis_url=redis_url)
    subscriber.subscribe(channel.table_channel(table.id))
    subscriber.get_message(timeout=1)  # the subscribe confirmation
    messages: list[dict[str, Any]] = []

    def listen() -> None:
        while not messages or messages[-1]["event"] != "finished":
            message = subscriber.get_message(timeout=10)
            if message is None:
                return
            messages.append(json.loads(message["data"]))

    listener = threading.Thread(target=listen)
    listener.start()
    job = Definitions(
        jobs=[enrich_table],
        resources={
            "llm": LanguageModel(),
            "glaze_db": GlazeDatabase(url=postgres_url),
            "providers": EnrichmentProviders(),
            "progress": channel,
        },
    ).get_job_def("enrich_table")
    config = {
        "table_id": table.id,
        "column_ids": [table.column_by_key("industry").id],
        "page_size": 10,
        "write_page_size": 10,
    }
    with DagsterInstance.ephemeral() as instance:
        assert job.execute_in_process(
            run_config={"ops": {"detect_entities": {"config": config}}}, instance=instance
        ).success
    listener.join(timeout=20)
    subscriber.close()
    client.close()
    events = [m["event"] for m in messages]
    assert events[0] == "started" and events[-1] == "finished"
    # Progress comes with the chunk's beats (about every second, and at its end), from the
    # request's counters: the last one before `finished` has every lookup and row.
    progress_events = [m for m in messages if m["event"] == "progress"]
    last = progress_events[-1]
    assert (last["phase"], last["entities_done"], last["rows_written"]) == (
        "writing",
        last["entities"],
        30,
    )
    assert last["cells_done"] + last["cells_not_found"] == 30
    cells = [m["cells"] for m in messages if m["event"] == "cells"]
    assert [len(page) for page in cells] == [10, 10, 10]  # each page's written cells
    written = {c["row_id"]: c for page in cells for c in page}
    for row in pg_store.rows_in_order(table.id):
        cell = written[row.id]
        assert cell["column_key"] == "industry" and cell["value"] == row.data.get("industry")
        assert cell["status"] == row.meta["industry"]["status"]
    progress = [m["progress"] for m in messages if m["event"] != "cells"]
    assert progress == sorted(progress) and progress[0] == 0 and progress[-1] == 100
    assert messages[-1]["status"] == "succeeded" and messages[0]["cells_total"] == 30


def test_an_unknown_request_id_is_named(store: Store) -> None:
    table = seed_generated(store, rows=1, unique_companies=1)
    with DagsterInstance.ephemeral() as instance:
        result = run_job(
            store, {"table_id": table.id, "whole_table": True, "request_id": "req_nope"}, instance
        )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "unknown request 'req_nope'" in str(
        failure.step_failure_data.user_failure_data.description
    )
