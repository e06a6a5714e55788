"""The estimate: an upper bound no run passes, an expectation from history, budget guidance.

The walk is checked against hand-computed figures; the whole estimate against real runs of the
engine on both databases (the same stages the Dagster ops call), with deterministic fake
vendors so every figure is reproducible.
"""

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest

from glaze_pipeline.core import engine
from glaze_pipeline.core.cache import CachedAnswer
from glaze_pipeline.core.cache_sql import SqlAnswerCache
from glaze_pipeline.core.engine import JobSettings
from glaze_pipeline.core.estimate import (
    PRIOR_FOUND,
    Rates,
    budget_guidance,
    guidance_text,
    observed_rates,
    walk,
)
from glaze_pipeline.core.models import (
    EntityKey,
    EntityRequest,
    EntityType,
    Observation,
    RequestKind,
    Selection,
)
from glaze_pipeline.core.providers.fake import FakeProvider
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.store import Store

ACME = EntityKey(EntityType.COMPANY, "domain", "acme.com")
NOW = datetime(2026, 11, 23, tzinfo=UTC)


def company(name: str, cost: float, fields: set[str], **options: Any) -> FakeProvider:
    return FakeProvider(
        EntityType.COMPANY,
        name=name,
        cost_per_call=cost,
        supplied_fields=frozenset(fields),
        **options,
    )


CHEAP = company("cheap", 1, {"industry", "employee_count"}, confidence=0.85)
PREMIUM = company(
    "premium", 10, {"industry", "employee_count", "revenue"}, confidence=0.95, charges_misses=True
)


def rates(found: float, charged: float, **filled: float) -> Rates:
    return Rates(found=found, charged=charged, filled=filled, default_filled=1.0)


def test_worst_case_asks_every_provider_that_could_be_asked_and_charges_every_call() -> None:
    request = EntityRequest(ACME, frozenset({"industry", "revenue"}))
    worst = walk([CHEAP, PREMIUM], request, rates=None, cached={}, threshold=0.8, unavailable={})
    assert worst.calls == {"cheap": 1.0, "premium": 1.0}
    assert worst.cost == {"cheap": 1.0, "premium": 10.0}
    assert worst.filled == 0


def test_expected_walk_follows_the_shares() -> None:
    # industry only: cheap finds 70 % (charged only when found); premium asked for the rest.
    request = EntityRequest(ACME, frozenset({"industry"}))
    shares = {"cheap": rates(0.7, 0.7), "premium": rates(0.9, 1.0)}
    expected = walk(
        [CHEAP, PREMIUM], request, rates=shares, cached={}, threshold=0.8, unavailable={}
    )
    assert expected.calls["cheap"] == pytest.approx(1.0)
    assert expected.calls["premium"] == pytest.approx(0.3)
    assert expected.cost["cheap"] == pytest.approx(0.7)
    assert expected.cost["premium"] == pytest.approx(3.0)
    assert expected.filled == pytest.approx(0.7 + 0.3 * 0.9)
    # The cost is 1 (cheap found it, 70 %) or 10 (premium, which charges misses, 30 %).
    assert expected.variance == pytest.approx((0.7 * 1 + 0.3 * 100) - 3.7**2)


def test_a_value_under_the_threshold_fills_the_cell_but_keeps_the_walk_going() -> None:
    weak = EntityKey(EntityType.COMPANY, "name", "acme", 0.8)  # 0.85 * 0.8 < 0.8
    request = EntityRequest(weak, frozenset({"industry"}))
    shares = {"cheap": rates(1.0, 1.0), "premium": rates(0.0, 1.0)}
    expected = walk(
        [CHEAP, PREMIUM], request, rates=shares, cached={}, threshold=0.8, unavailable={}
    )
    assert expected.calls == {"cheap": 1.0, "premium": 1.0}
    assert expected.filled == pytest.approx(1.0)


def test_field_fill_shares_branch_the_walk() -> None:
    # cheap finds every entity but fills employee_count half the time: premium is asked then.
    request = EntityRequest(ACME, frozenset({"industry", "employee_count"}))
    shares = {"cheap": rates(1.0, 1.0, employee_count=0.5), "premium": rates(1.0, 1.0)}
    expected = walk(
        [CHEAP, PREMIUM], request, rates=shares, cached={}, threshold=0.8, unavailable={}
    )
    assert expected.calls["premium"] == pytest.approx(0.5)
    assert expected.filled == pytest.approx(2.0)


def test_a_cached_answer_costs_nothing_and_closes_what_it_holds() -> None:
    request = EntityRequest(ACME, frozenset({"industry", "revenue"}))
    cached = {"cheap": CachedAnswer(True, {"industry": "Software"}, {}, NOW)}
    worst = walk(
        [CHEAP, PREMIUM], request, rates=None, cached=cached, threshold=0.8, unavailable={}
    )
    assert worst.calls == {"premium": 1.0}
    assert worst.cache_hits == 1.0
    assert worst.filled == 1.0


def test_an_unusable_provider_costs_nothing_and_its_fields_are_counted_as_skipped() -> None:
    request = EntityRequest(ACME, frozenset({"industry", "revenue"}))
    shares = {"cheap": rates(0.7, 0.7), "premium": rates(0.9, 1.0)}
    unavailable = {"premium": "API key missing"}
    expected = walk(
        [CHEAP, PREMIUM], request, rates=shares, cached={}, threshold=0.8, unavailable=unavailable
    )
    assert "premium" not in expected.calls
    # revenue always; industry when cheap missed it.
    assert expected.unavailable == pytest.approx(1 + 0.3)


def test_rates_start_from_a_stated_prior_and_follow_the_history() -> None:
    prior = observed_rates(CHEAP, None)
    assert prior.found == pytest.approx(PRIOR_FOUND)
    assert "prior" in prior.basis()
    history = Observation(lookups=1000, found=700, charged=700, errors=0, fields={})
    seen = observed_rates(CHEAP, history, NOW)
    assert seen.found == pytest.approx(0.7, abs=0.01)
    assert seen.basis() == "from 1,000 lookups since 2026-11-23"


def test_budget_guidance_quotes_the_spend_up_to_each_share() -> None:
    curve = [(10.0, 1.0)] * 10  # ten entities, 10 each, one cell each
    guidance = budget_guidance(curve, budget=45)
    budgets = {point["share_of_fillable"]: point["budget"] for point in guidance["points"]}
    assert budgets == {0.5: 50, 0.8: 80, 0.9: 90, 1.0: 100}
    assert guidance["at_budget"]["cells_filled"] == 4
    # One entity holding most cells: the shares it crosses are quoted once, at the largest.
    lumpy = budget_guidance([(1.0, 1.0), (5.0, 9.0)])
    assert [(p["budget"], p["share_of_fillable"]) for p in lumpy["points"]] == [(6.0, 1.0)]
    assert guidance_text(guidance) == (
        "budget 50 ~50%, 80 ~80%, 90 ~90% and 100 all of the ~10 cells this job is expected to fill"
    )


def test_observations_add_up_across_jobs(store: Store) -> None:
    first = Observation(10, 7, 7, 1, {"industry": [7, 6]})
    store.record_observations({("cheap", "domain"): first})
    store.record_observations({("cheap", "domain"): Observation(5, 5, 5, 0, {"industry": [5, 5]})})
    [(key, (total, since))] = store.provider_observations().items()
    assert key == ("cheap", "domain")
    assert (total.lookups, total.found, total.charged, total.errors) == (15, 12, 12, 1)
    assert total.fields == {"industry": [12, 11]}
    assert since.tzinfo is not None
    # Several rows at once, fields only one side has, chunks adding concurrently: nothing lost,
    # and on Postgres one statement per chunk, however many providers and key kinds.
    before = store.statements
    store.record_observations(
        {
            ("cheap", "domain"): Observation(2, 1, 1, 0, {"employee_count": [1, 1]}),
            ("cheap", "name"): Observation(3, 0, 0, 3, {}),
            ("idle", "domain"): Observation(0, 0, 0, 0, {}),  # no lookups: not written
        }
    )
    if store.dialect == "postgresql":
        assert store.statements - before == 1

    def add() -> None:
        own = Store(store.url)
        for _ in range(5):
            own.record_observations({("cheap", "domain"): Observation(1, 1, 1, 0, {"x": [1, 0]})})
        own.dispose()

    with ThreadPoolExecutor(3) as pool:
        for adding in [pool.submit(add) for _ in range(3)]:
            adding.result()  # an adder's error fails the test here, not silently
    totals = {key: total for key, (total, _since) in store.provider_observations().items()}
    assert set(totals) == {("cheap", "domain"), ("cheap", "name")}
    cheap = totals[("cheap", "domain")]
    assert (cheap.lookups, cheap.found, cheap.charged, cheap.errors) == (32, 28, 28, 1)
    assert cheap.fields == {"industry": [12, 11], "employee_count": [1, 1], "x": [15, 0]}
    assert totals[("cheap", "name")].errors == 3


def run_job(
    store: Store,
    table: Any,
    providers: list[Any],
    *,
    kind: RequestKind,
    budget: float | None = None,
    columns: tuple[str, ...] = ("industry", "employee_count", "revenue"),
) -> str:
    """The job's stages as the Dagster ops call them; returns the request id."""
    selection = Selection(column_ids=[table.column_by_key(k).id for k in columns])
    settings = JobSettings(budget=budget)
    target = engine.resolve_target(store, table.id, selection)
    request_id = engine.start_job(store, target, selection, settings, kind=kind)
    detection = engine.detect_entities(store, target)
    chunks = engine.plan_chunks(detection.entities, chunk_size=40, max_chunks=16)
    results = [
        engine.enrich_chunk(
            store,
            request_id,
            chunk,
            providers,
            settings,
            cache=SqlAnswerCache(store),
            dry_run=kind is RequestKind.ESTIMATE,
        )
        for chunk in chunks
    ]
    outcomes, stats = engine.merge_chunks(results)
    summary = engine.ApplySummary()
    if kind is RequestKind.ENRICH:
        summary = engine.apply_results(store, request_id, target, outcomes)
    engine.finish_job(
        store,
        request_id,
        entities=len(detection.entities),
        stats=stats,
        summary=summary,
        kind=kind,
        detection_cells=detection.cells_total,
        estimate=engine.merge_estimates(results),
        providers=providers,
        budget=budget,
    )
    return request_id


@pytest.mark.parametrize(
    "columns",
    [("industry", "employee_count", "revenue"), ("industry", "employee_count")],
    ids=["premium-always", "premium-on-a-miss"],
)
def test_after_one_table_the_estimate_of_a_second_is_within_ten_percent(
    store: Store, columns: tuple[str, ...]
) -> None:
    providers = [
        company("cheap", 1, {"industry", "employee_count"}, confidence=0.85, miss_rate=0.3),
        company(
            "premium",
            10,
            {"industry", "employee_count", "revenue"},
            confidence=0.95,
            charges_misses=True,
            miss_rate=0.05,
        ),
    ]
    # An expectation, not a prediction of each lookup: with 1,000 companies the chance share of
    # cheap's misses moves the premium-on-a-miss cost by ~3 % (one standard deviation).
    first = seed_generated(store, rows=1000, unique_companies=1000, name="first")
    second = seed_generated(store, rows=1000, unique_companies=1000, name="second", first=5000)
    run_job(store, first, providers, kind=RequestKind.ENRICH, columns=columns)

    estimated = run_job(store, second, providers, kind=RequestKind.ESTIMATE, columns=columns)
    report = store.get_request(estimated).estimate
    assert report is not None
    actual = store.get_request(
        run_job(store, second, providers, kind=RequestKind.ENRICH, columns=columns)
    )
    assert report["max_cost"] >= actual.cost
    assert abs(report["expected_cost"] - actual.cost) <= 0.1 * actual.cost
    low, high = report["expected_cost_range"]
    assert low <= actual.cost <= high <= report["max_cost"]
    assert report["providers"]["cheap"]["by_key_kind"]["domain"]["lookups"] > 0
    assert "from " in report["providers"]["cheap"]["by_key_kind"]["domain"]["basis"]
    assert report["guidance"]


UNUSABLE_PREMIUM = """
providers:
  - {kind: fake, name: cheap, entity_type: company, cost_per_call: 1, confidence: 0.85,
     fields: [industry, employee_count]}
  - kind: json_api
    name: premium
    entity_type: company
    base_url: http://127.0.0.1:9/premium
    auth: {header: X-Api-Key, env: GLAZE_TEST_UNSET_PREMIUM_KEY}
    lookups: {domain: {path: /v1/companies, params: {domain: "{value}"}}}
    record_path: company
    fields: {industry: industry, revenue: metrics.revenue}
    cost_per_call: 10
    charges_misses: true
"""


def run_in_dagster(store: Store, table: Any, providers_file: str, kind: str) -> tuple[Any, Any]:
    from dagster import DagsterInstance

    from glaze_pipeline.definitions import build_definitions

    job = build_definitions(store.url, providers_file).get_job_def("enrich_table")
    selection = {"column_ids": [table.column_by_key(k).id for k in ("industry", "revenue")]}
    with DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            run_config={
                "ops": {
                    "detect_entities": {"config": {"table_id": table.id, "kind": kind, **selection}}
                }
            },
            instance=instance,
        )
        logs = [
            event.message
            for event in instance.all_logs(result.run_id)
            if event.level >= 30  # warnings
        ]
        metadata = next(
            event.step_output_data.metadata
            for event in result.all_node_events
            if event.step_key == "close_job" and event.is_successful_output
        )
    request = store.get_request(result.output_for_node("detect_entities", "plan").request_id)
    return request, (logs, metadata)


def test_an_unusable_provider_is_named_before_the_run_buys_and_never_called(
    store: Store, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GLAZE_TEST_UNSET_PREMIUM_KEY", raising=False)
    providers_file = tmp_path / "providers.yaml"
    providers_file.write_text(UNUSABLE_PREMIUM)
    table = seed_generated(store, rows=20, unique_companies=10)
    reason = "API key missing: set the environment variable GLAZE_TEST_UNSET_PREMIUM_KEY"

    estimate, (logs, metadata) = run_in_dagster(store, table, str(providers_file), "estimate")
    report = estimate.estimate
    assert report["providers"]["premium"] == {
        **report["providers"]["premium"],
        "status": "unavailable",
        "reason": reason,
        "expected_calls": 0,
        "max_calls": 0,
    }
    # Revenue (only premium has it), and industry wherever the prior expects cheap to miss.
    assert 20 < report["cells_provider_unavailable"] < 40
    assert metadata["expected_cost"].value == report["expected_cost"]
    assert metadata["max_cost"].value == report["max_cost"] == 10
    assert any(f"provider premium unavailable: {reason}" in message for message in logs)

    request, (logs, metadata) = run_in_dagster(store, table, str(providers_file), "enrich")
    assert request.unavailable_providers == {"premium": reason}
    assert request.provider_calls == {"cheap": 10}
    assert (request.cells_failed, request.cells_skipped, request.cells_done) == (0, 20, 20)
    assert request.calls_not_sent == {"premium": {"provider unavailable": 10}}
    assert request.error.endswith(f"provider unavailable: premium ({reason})")
    assert metadata["unavailable_providers"].value == {"premium": reason}
    revenue = {row.meta["revenue"]["error"] for row in store.rows_in_order(table.id)}
    assert revenue == {f"provider unavailable (premium: {reason})"}
