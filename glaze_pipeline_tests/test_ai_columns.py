"""AI columns (issue 11): a column filled by the LLM as one more provider, entity-first.

Real HTTP against the mock LLM (`glaze_pipeline.testing.mock_llm`), the real `enrich_table` job in
process, on SQLite and Postgres. The mock answers an AI column's question from a hash of the
filled question, so every expected cell is known; its `/_stats` counts the chat requests it
saw, which is what "one LLM call per entity" is checked against.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dagster import DagsterEventType, DagsterInstance
from sqlalchemy import update

from glaze_pipeline.bench.stack import free_port
from glaze_pipeline.core.ai.client import LlmConfigError, LlmSettings
from glaze_pipeline.core.ai.columns import (
    InvalidPromptError,
    ai_field,
    fill_template,
    question_input,
)
from glaze_pipeline.core.detection import ColumnSpec, IdentifierColumns, identify_row
from glaze_pipeline.core.engine import resolve_target
from glaze_pipeline.core.errors import InvalidSelectionError
from glaze_pipeline.core.models import EntityKey, EntityType, Selection
from glaze_pipeline.core.preflight import check_providers
from glaze_pipeline.core.providers.base import FatalProviderError, TransientProviderError
from glaze_pipeline.core.providers.llm_column import ai_column_providers, provider_name
from glaze_pipeline.core.schema import GlazeColumn
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.store import ColumnDef, Store, TableInfo
from glaze_pipeline.definitions import build_definitions
from glaze_pipeline.defs.assets import ENRICHED_TABLE
from glaze_pipeline.testing.mock_llm import MockLlmServer, ai_answer
from glaze_pipeline_tests import llm_helpers

QUESTION = "Does {company} sell to enterprises? Answer yes or no."
MODEL = "glaze-mock-1"


llm_server = llm_helpers.llm_server


@pytest.fixture
def llm(llm_server: MockLlmServer, monkeypatch: pytest.MonkeyPatch) -> MockLlmServer:
    """The mock LLM, counters and faults cleared, configured the way a deployment would be."""
    llm_server.reset()
    for variable in (
        "GLAZE_LLM_MODEL",
        "GLAZE_LLM_API_KEY",
        "GLAZE_LLM_PRICE_PER_ANSWER",
        "GLAZE_LLM_MAX_ATTEMPTS",
        "GLAZE_PROVIDERS_FILE",
        "GLAZE_REDIS_URL",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("GLAZE_LLM_BASE_URL", llm_server.url)
    return llm_server


def ai_table(store: Store, *, rows: int, companies: int, template: str = QUESTION) -> TableInfo:
    """seed_generated's table (name, email, company, website, ...) with one AI column."""
    table = seed_generated(store, rows=rows, unique_companies=companies)
    store.add_column(table.id, ColumnDef("enterprise", "Sells to enterprises?", prompt=template))
    return store.get_table(table.id)


def run_job(store: Store, instance: DagsterInstance, **config: Any) -> Any:
    job = build_definitions(store.url).get_job_def("enrich_table")
    return job.execute_in_process(
        run_config={"ops": {"detect_entities": {"config": config}}},
        instance=instance,
        raise_on_error=False,
    )


def request_of(result: Any) -> str:
    return str(result.output_for_node("detect_entities", "plan").request_id)


def job_metadata(result: Any) -> dict[str, Any]:
    [materialization] = [
        event.event_specific_data.materialization
        for event in result.all_events
        if event.event_type is DagsterEventType.ASSET_MATERIALIZATION
        and event.event_specific_data.materialization.asset_key == ENRICHED_TABLE
    ]
    return {key: value.value for key, value in materialization.metadata.items()}


def expected_answers(store: Store, table: TableInfo, template: str = QUESTION) -> dict[str, str]:
    """Row id -> what the mock answers for the row's company."""
    ids = IdentifierColumns.from_columns(table.specs())
    expected = {}
    for row in store.rows_in_order(table.id):
        key = identify_row(row.data, ids).company
        assert key is not None
        expected[row.id] = ai_answer(fill_template(template, key))["answer"]
    return expected


def ai_provider(model: str = MODEL) -> str:
    """The name the AI column's provider has for `model` (its cache key and spend entry)."""
    return provider_name(ai_field(QUESTION), "ai_column.v1", model)


AI_SPEC = ColumnSpec("col_ai", "enterprise", ai_field(QUESTION), QUESTION)


# -- the pieces ---------------------------------------------------------------------------------


def test_question_input_and_provider_names() -> None:
    key = EntityKey(EntityType.COMPANY, "domain", "acme.com")
    assert question_input(QUESTION, key) == {
        "template": "Does acme.com sell to enterprises? Answer yes or no.",
        "entity_type": "company",
        "entity": "acme.com",
    }
    person = EntityKey(EntityType.PERSON, "name_company", "ada berg|acme")
    asked = question_input("Is {person} a buyer at {company}? Ask {full_name}.", person)
    assert asked["template"] == "Is ada berg (acme) a buyer at acme? Ask ada berg."
    assert asked["entity_type"] == "person"
    field = ai_field(QUESTION)
    name = provider_name(field, "ai_column.v1", MODEL)
    assert name.startswith("llm_" + field.name.removeprefix("ai_") + "_") and len(name) <= 100
    # The entity cache is keyed by provider name: another model or prompt version asks again.
    assert provider_name(field, "ai_column.v1", "other-model") != name
    assert provider_name(field, "ai_column.v2", MODEL) != name
    assert provider_name(ai_field(QUESTION + " Be brief."), "ai_column.v1", MODEL) != name


def test_price_per_answer() -> None:
    def price_per_answer(env: dict[str, str]) -> float:
        return LlmSettings.from_env(
            {"GLAZE_LLM_BASE_URL": "http://llm.test/v1", **env}
        ).price_per_answer

    assert price_per_answer({}) == 1.0
    assert price_per_answer({"GLAZE_LLM_PRICE_PER_ANSWER": "0.25"}) == 0.25
    for bad in ("cheap", "-1", "nan", "inf"):
        with pytest.raises(LlmConfigError, match="GLAZE_LLM_PRICE_PER_ANSWER"):
            price_per_answer({"GLAZE_LLM_PRICE_PER_ANSWER": bad})


def test_unknown_placeholder_is_refused_at_column_creation(store: Store) -> None:
    table = seed_generated(store, rows=2, unique_companies=1)
    bad = ColumnDef("pay", prompt="What does {company} pay in {currency}?")
    with pytest.raises(InvalidPromptError, match=r"unknown placeholder \{currency\}"):
        store.add_column(table.id, bad)
    with pytest.raises(InvalidPromptError, match="unknown placeholder"):
        store.create_table("t", [ColumnDef("website"), bad])
    assert [c.key for c in store.get_table(table.id).columns] == [
        c.key for c in table.columns
    ]  # nothing added


def test_resolve_target_accepts_ai_columns(sqlite_store: Store) -> None:
    table = ai_table(sqlite_store, rows=2, companies=1)
    column = table.column_by_key("enterprise")
    target = resolve_target(sqlite_store, table.id, Selection(column_ids=[column.id]))
    [spec] = target.columns
    assert (spec.field, spec.prompt) == (ai_field(QUESTION), QUESTION)
    whole = resolve_target(sqlite_store, table.id, Selection(whole_table=True))
    assert spec in whole.columns and table.column_by_key("industry").spec() in whole.columns
    # A key with no field and no prompt is still refused, and the error says what to give it.
    plain = sqlite_store.add_column(table.id, ColumnDef("notes"))
    with pytest.raises(InvalidSelectionError, match="or an AI prompt"):
        resolve_target(sqlite_store, table.id, Selection(column_ids=[plain.id]))
    # A template stored before today's rules is refused before the job asks anything.
    with sqlite_store.engine.begin() as connection:
        connection.execute(
            update(GlazeColumn).where(GlazeColumn.id == column.id).values(prompt="{salary}?")
        )
    with pytest.raises(InvalidPromptError, match=r"column 'enterprise'.*\{salary\}"):
        resolve_target(sqlite_store, table.id, Selection(whole_table=True))


def test_provider_lookup_and_errors_over_http(llm: MockLlmServer) -> None:
    key = EntityKey(EntityType.COMPANY, "domain", "acme.com")

    async def ask(settings: LlmSettings) -> Any:
        [provider] = ai_column_providers([AI_SPEC], settings)
        try:
            return provider, await provider.lookup(key, provider.fields)
        finally:
            await provider.aclose()

    settings = LlmSettings(base_url=llm.url, model=MODEL, backoff_s=0.01, price_per_answer=2.0)
    provider, answer = asyncio.run(ask(settings))
    expected = ai_answer(fill_template(QUESTION, key))
    assert answer.values == {provider.field.name: expected["answer"]}
    assert answer.confidence == {provider.field.name: expected["confidence"]}
    assert provider.cost_per_call == 2.0 and provider.entity_type is EntityType.COMPANY
    assert [call.outcome for call in provider.take_llm_calls()] == ["ok"]

    llm.faults([{"mode": "bad_request", "operation": "ai_column"}])
    with pytest.raises(FatalProviderError, match="HTTP 400"):
        asyncio.run(ask(settings))
    llm.faults([{"mode": "error", "operation": "ai_column", "times": 2}])
    with pytest.raises(TransientProviderError, match="HTTP 500"):
        asyncio.run(ask(LlmSettings(base_url=llm.url, max_attempts=2, backoff_s=0.01)))


def test_preflight(llm: MockLlmServer) -> None:
    [unconfigured] = ai_column_providers([AI_SPEC], None, problem="GLAZE_LLM_BASE_URL is not set")
    [configured] = ai_column_providers([AI_SPEC], LlmSettings(base_url=llm.url))
    dead_url = f"http://127.0.0.1:{free_port()}/v1"
    [dead] = ai_column_providers([AI_SPEC], LlmSettings(base_url=dead_url))
    verdicts = check_providers([unconfigured, configured])
    assert not verdicts[unconfigured.name].usable
    assert verdicts[unconfigured.name].reason == "GLAZE_LLM_BASE_URL is not set"
    assert verdicts[unconfigured.name].checks == ("configured",)
    assert verdicts[configured.name].usable
    assert verdicts[configured.name].checks == ("configured", "probe")
    # The same template and model as `configured`, so the same name: checked on its own.
    only_dead = check_providers([dead])[dead.name]
    assert not only_dead.usable and "health probe failed" in (only_dead.reason or "")
    assert llm.stats()["requests"] == 0  # the probe is GET /models: no chat request, free


# -- the job ------------------------------------------------------------------------------------


def test_thousand_rows_over_hundred_companies(
    store: Store, llm: MockLlmServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLAZE_LLM_PRICE_PER_ANSWER", "2.5")
    table = ai_table(store, rows=1000, companies=100)
    column = table.column_by_key("enterprise")
    provider = ai_provider()
    with DagsterInstance.ephemeral() as instance:
        first = run_job(store, instance, table_id=table.id, column_ids=[column.id])
        assert first.success
        assert llm.stats()["by_operation"] == {"ai_column": 100}  # one call per company
        meta = job_metadata(first)
        assert meta["provider_calls"] == {provider: 100}
        assert meta["llm_usage"]["calls"] == 100

        request_id = request_of(first)
        request = store.get_request(request_id)
        assert (request.status, request.cells_done, request.cost) == ("succeeded", 1000, 250.0)
        usage = store.llm_usage(request_id)
        assert usage.calls == 100 and usage.prompt_tokens > 0 and usage.completion_tokens > 0

        expected = expected_answers(store, table)
        rows = store.rows_in_order(table.id)
        assert {row.id: row.data["enterprise"] for row in rows} == expected
        meta_of_cell = rows[0].meta["enterprise"]
        assert meta_of_cell["status"] == "done"
        assert meta_of_cell["source"] == f"{provider} ({MODEL}, ai_column.v1)"
        assert meta_of_cell["request_id"] == request_id

        # A re-run (overwrite) with the same model: every answer from the cache, no LLM call.
        again = run_job(store, instance, table_id=table.id, column_ids=[column.id], overwrite=True)
        assert again.success
        assert llm.stats()["requests"] == 100
        assert job_metadata(again)["cache_hits"] == 100
        assert store.get_request(request_of(again)).cost == 0
        assert store.llm_usage(request_of(again)).calls == 0

        # Another model asks again (the cache is keyed by prompt version and model too).
        monkeypatch.setenv("GLAZE_LLM_MODEL", "glaze-mock-2")
        other = run_job(store, instance, table_id=table.id, column_ids=[column.id], overwrite=True)
        assert other.success
        assert llm.stats()["requests"] == 200
        assert job_metadata(other)["provider_calls"] == {ai_provider("glaze-mock-2"): 100}


def test_budget_bounds_the_answers_bought(store: Store, llm: MockLlmServer) -> None:
    table = ai_table(store, rows=1000, companies=100)
    column = table.column_by_key("enterprise")
    with DagsterInstance.ephemeral() as instance:
        result = run_job(store, instance, table_id=table.id, column_ids=[column.id], budget=50)
    assert result.success
    bought = llm.stats()["requests"]
    assert 0 < bought <= 50
    request = store.get_request(request_of(result))
    assert request.status == "partial" and request.cost <= 50
    assert request.cost == bought  # 1.0 credit per answer, the default price
    cells = [row.meta["enterprise"] for row in store.rows_in_order(table.id)]
    done = [cell for cell in cells if cell["status"] == "done"]
    skipped = [cell for cell in cells if cell["status"] == "skipped"]
    assert len(done) == bought * 10 and len(done) + len(skipped) == 1000
    assert {cell["error"] for cell in skipped} == {"budget exhausted"}


def test_estimate_prices_ai_answers(sqlite_store: Store, llm: MockLlmServer) -> None:
    table = ai_table(sqlite_store, rows=200, companies=40)
    column = table.column_by_key("enterprise")
    provider = ai_provider()
    with DagsterInstance.ephemeral() as instance:
        result = run_job(
            sqlite_store, instance, table_id=table.id, column_ids=[column.id], kind="estimate"
        )
    assert result.success
    estimate = sqlite_store.get_request(request_of(result)).estimate
    assert estimate is not None
    # A model answers every question: 40 answers at 1.0 expected, and at most.
    assert (estimate["expected_cost"], estimate["max_cost"]) == (40.0, 40.0)
    assert estimate["providers"][provider]["expected_calls"] == 40
    assert llm.stats()["requests"] == 0  # an estimate buys nothing


def test_llm_not_configured_skips_the_cells(
    store: Store, llm: MockLlmServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GLAZE_LLM_BASE_URL")
    table = ai_table(store, rows=20, companies=5)
    column = table.column_by_key("enterprise")
    with DagsterInstance.ephemeral() as instance:
        result = run_job(store, instance, table_id=table.id, column_ids=[column.id])
    assert result.success
    provider = ai_provider("")
    request = store.get_request(request_of(result))
    assert (request.status, request.cost, request.cells_skipped) == ("partial", 0, 20)
    assert request.unavailable_providers is not None
    assert "GLAZE_LLM_BASE_URL is not set" in request.unavailable_providers[provider]
    assert f"provider unavailable: {provider} (GLAZE_LLM_BASE_URL" in (request.error or "")
    errors = {row.meta["enterprise"]["error"] for row in store.rows_in_order(table.id)}
    [error] = errors
    assert error.startswith(f"provider unavailable ({provider}: GLAZE_LLM_BASE_URL is not set")
    assert llm.stats()["requests"] == 0


def test_rate_limited_then_answered(store: Store, llm: MockLlmServer) -> None:
    llm.faults(
        [{"mode": "rate_limited", "retry_after": 0.05, "times": 2, "operation": "ai_column"}]
    )
    table = ai_table(store, rows=20, companies=5)
    column = table.column_by_key("enterprise")
    with DagsterInstance.ephemeral() as instance:
        result = run_job(store, instance, table_id=table.id, column_ids=[column.id])
    assert result.success
    assert llm.stats()["statuses"] == {"429": 2, "200": 5}
    request_id = request_of(result)
    request = store.get_request(request_id)
    assert (request.status, request.cells_done, request.cost) == ("succeeded", 20, 5.0)
    rows = store.rows_in_order(table.id)
    assert {row.id: row.data["enterprise"] for row in rows} == expected_answers(store, table)
    # Every attempt is on record, the rate-limited ones included, under the request.
    usage = store.llm_usage(request_id)
    assert usage.calls == 7


def test_non_retryable_error_fails_the_cells_uncharged(store: Store, llm: MockLlmServer) -> None:
    llm.faults([{"mode": "bad_request", "times": 5, "operation": "ai_column"}])
    table = ai_table(store, rows=20, companies=5)
    column = table.column_by_key("enterprise")
    with DagsterInstance.ephemeral() as instance:
        result = run_job(store, instance, table_id=table.id, column_ids=[column.id])
    assert result.success
    assert llm.stats()["statuses"] == {"400": 5}  # not retried
    request = store.get_request(request_of(result))
    assert (request.status, request.cells_failed, request.cost) == ("failed", 20, 0)
    cells = [row.meta["enterprise"] for row in store.rows_in_order(table.id)]
    assert {cell["status"] for cell in cells} == {"failed"}
    assert all("HTTP 400" in cell["error"] for cell in cells)
    assert all(not row.data.get("enterprise") for row in store.rows_in_order(table.id))
    assert store.llm_usage(request.id).calls == 5


def test_whole_table_with_catalogue_and_ai_columns(store: Store, llm: MockLlmServer) -> None:
    table = ai_table(store, rows=50, companies=10)
    with DagsterInstance.ephemeral() as instance:
        result = run_job(store, instance, table_id=table.id, whole_table=True)
    assert result.success
    calls = job_metadata(result)["provider_calls"]
    assert calls[ai_provider()] == 10 and calls["fake_company"] == 10
    assert llm.stats()["by_operation"] == {"ai_column": 10}
    expected = expected_answers(store, table)
    for row in store.rows_in_order(table.id):
        assert row.data["enterprise"] == expected[row.id]
        assert row.data["industry"] and row.meta["industry"]["source"] == "fake_company"


def test_a_person_question_says_what_the_persons_key_knows() -> None:
    """A template names identifiers; each is filled from what the entity's key carries (a
    person found by email: the email, and its domain as the company), else `unknown`."""
    template = "What does {full_name} do at {company}? ({email}, {linkedin})"
    by_email = EntityKey(EntityType.PERSON, "email", "ada@analytical-engines.co.uk")
    assert fill_template(template, by_email) == (
        "What does unknown do at analytical-engines.co.uk? (ada@analytical-engines.co.uk, unknown)"
    )
    by_name = EntityKey(EntityType.PERSON, "name_company", "ada lovelace|analytical-engines.co.uk")
    assert fill_template(template, by_name) == (
        "What does ada lovelace do at analytical-engines.co.uk? (unknown, unknown)"
    )
    by_linkedin = EntityKey(EntityType.PERSON, "linkedin", "ada-lovelace")
    assert fill_template(template, by_linkedin) == (
        "What does unknown do at unknown? (unknown, ada-lovelace)"
    )
