"""`glaze bench estimate` at a small scale: the figures it prints and writes add up.

Real parts throughout: the mock vendors over HTTP, SQLite databases, the enrich_table job in
process. The actual cost is checked against what the mock charges, computed here from its
deterministic misses, so the bench cannot agree with the engine by reading the engine.
"""

import json
import os
from dataclasses import replace
from pathlib import Path

from click.testing import CliRunner

from glaze_pipeline.bench.estimate_accuracy import (
    PREMIUM,
    PREMIUM_KEY_ENV,
    EstimateBenchSettings,
    SeedFigures,
    run,
)
from glaze_pipeline.cli import cli
from glaze_pipeline.core.models import EntityKey, EntityType
from glaze_pipeline.testing.mock_server import default_vendors, is_miss

ROWS, COMPANIES = 60, 20
ENVIRONMENT = ("GLAZE_PROVIDERS_FILE", "GLAZE_MOCK_PROVIDERS_URL", PREMIUM_KEY_ENV, "GLAZE_HOME")


def mock_charges(seed: int, *, premium: bool) -> float:
    """What the mock bills for enriching a seed's second table (companies and people numbered
    from its offset), from the vendors' deterministic misses and prices."""
    vendors = default_vendors()
    first = (2 * (seed - 1) + 1) * max(ROWS, COMPANIES)
    cheap, people = vendors["cheap"], vendors["people"]
    companies = [
        EntityKey(EntityType.COMPANY, "domain", f"company{first + c:06d}.com")
        for c in range(COMPANIES)
    ]
    persons = [
        EntityKey(
            EntityType.PERSON, "email", f"person{first + i}@company{first + i % COMPANIES:06d}.com"
        )
        for i in range(ROWS)
    ]
    found_companies = sum(not is_miss("cheap", k, cheap.not_found_rate) for k in companies)
    found_people = sum(not is_miss("people", k, people.not_found_rate) for k in persons)
    cost = found_companies * cheap.cost_per_call + found_people * people.cost_per_call
    if premium:  # asked for every company (only it has revenue), and it charges misses
        cost += COMPANIES * vendors["premium"].cost_per_call
    return cost


def check_consistent(figures: SeedFigures) -> None:
    assert figures.within_bound and figures.counters_match and figures.cost_matches
    assert figures.mock_requests == figures.provider_calls
    assert figures.mock_cost == figures.actual_cost
    assert 0 < figures.expected_cost <= figures.max_cost
    assert figures.error_pct is not None
    expected_error = (figures.expected_cost - figures.actual_cost) / figures.actual_cost * 100
    assert abs(figures.error_pct - expected_error) < 1e-9
    # The second table shares no entity with the first: nothing cached, every entity asked.
    assert figures.provider_calls["cheap_company"] == COMPANIES
    assert figures.provider_calls["people_vendor"] == ROWS
    assert figures.cells_failed == 0


def test_bench_estimate_prints_and_writes_figures_that_add_up(tmp_path: Path) -> None:
    output = tmp_path / "estimate.json"
    before = {name: os.environ.get(name) for name in ENVIRONMENT}

    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "estimate",
            "--seeds",
            "2",
            "--rows",
            str(ROWS),
            "--companies",
            str(COMPANIES),
            "--output",
            str(output),
        ],
    )

    assert result.exit_code == 0, result.output
    assert {name: os.environ.get(name) for name in ENVIRONMENT} == before
    written = json.loads(output.read_text())
    assert written["problems"] == []
    assert [s["seed"] for s in written["seeds"]] == [1, 2]
    for seed in written["seeds"]:
        assert seed["actual_cost"] == mock_charges(seed["seed"], premium=True)
        assert seed["provider_calls"] == {
            "cheap_company": COMPANIES,
            "people_vendor": ROWS,
            PREMIUM: COMPANIES,
        }
        assert seed["mock_requests"] == seed["provider_calls"]
        # Upper bound: every lookup charged (cheap 1, premium 10, people 3).
        assert seed["max_cost"] == COMPANIES * 1 + COMPANIES * 10 + ROWS * 3
        assert seed["max_cost"] >= seed["actual_cost"] and seed["within_bound"]
        assert seed["premium_estimate"]["status"] == "ok"
        assert seed["premium_requests"] == 2 * COMPANIES  # both tables, the key checked
        error = (seed["expected_cost"] - seed["actual_cost"]) / seed["actual_cost"] * 100
        assert seed["error_pct"] == round(error, 2)
        # The printed row: seed, expected, max, actual, error %, yes, requests / calls, billed.
        calls = sum(seed["provider_calls"].values())
        printed = [
            f"{seed['expected_cost']:,.2f}",
            f"{seed['max_cost']:,.2f}",
            f"{seed['actual_cost']:,.2f}",
            f"{error:+.1f}",
            "yes",
            f"{calls:,} / {calls:,}",
        ]
        assert any(all(part in line for part in printed) for line in result.output.splitlines())
    assert written["summary"] in " ".join(result.output.split())
    worst = max(abs(s["error_pct"]) for s in written["seeds"])
    assert abs(written["worst_error_pct"] - worst) < 0.01


def test_bench_estimate_with_the_premium_key_unset_names_the_problem_and_buys_nothing_of_it() -> (
    None
):
    before = os.environ.get(PREMIUM_KEY_ENV)
    report = run(
        EstimateBenchSettings(seeds=1, rows=ROWS, companies=COMPANIES, premium_key_set=False)
    )

    assert os.environ.get(PREMIUM_KEY_ENV) == before
    assert report.problems() == []
    (figures,) = report.seeds
    check_consistent(figures)
    missing = f"API key missing: set the environment variable {PREMIUM_KEY_ENV}"
    assert figures.premium_estimate["status"] == "unavailable"
    assert figures.premium_estimate["reason"] == missing
    assert figures.premium_estimate["expected_cost"] == 0
    assert figures.premium_requests == 0
    assert PREMIUM not in figures.provider_calls
    assert figures.actual_cost == mock_charges(1, premium=False)
    assert figures.max_cost == COMPANIES * 1 + ROWS * 3
    # Revenue only the premium vendor has: every revenue cell skipped, none failed.
    assert figures.cells_skipped >= ROWS and figures.cells_failed == 0
    assert figures.unavailable_providers == {PREMIUM: missing}
    assert figures.error is not None and f"{PREMIUM} ({missing})" in figures.error
    assert "premium key UNSET" in report.summary()

    # A bound below the actual cost, or counters that disagree, is reported as a bug.
    broken = replace(figures, max_cost=figures.actual_cost - 1, provider_calls={})
    problems = broken.problems(premium_key_set=False)
    assert any("upper bound" in problem for problem in problems)
    assert any("provider_calls" in problem for problem in problems)
