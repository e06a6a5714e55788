"""`glaze bench estimate`: is the estimate a figure a user can hold us to?

Per seed, two tables of the same shape about different companies and people (issue 14's table:
rows over companies, columns industry, employee_count, revenue and title). The first is
enriched, so the engine has observed the vendors; the second is then estimated (an `estimate`
request) and enriched, and the estimate's expected cost and upper bound are set beside what the
run cost. The mock's `/_stats` is read around the second enrichment: the requests that reached
the vendors must be the request's `provider_calls`, and what they billed its `cost`.

Everything is the real thing: the mock vendors over HTTP (`seed/providers.mock.yaml` as a user
runs it, pointed at a `MockProviderServer`), a throwaway SQLite database per seed (or the
database given), and the `enrich_table` job run in process as `glaze enrich` and `glaze
estimate` run it. The mock answers without latency: which entities a vendor knows is a hash of
the vendor and the identifier, and prices are fixed, so latency changes no figure here, only the
time taken. That time is set by the client-side rate limits in the providers file (the people
vendor's 100 lookups a second).

With `premium_key_set=False` the same flow runs with GLAZE_PREMIUM_API_KEY unset: the estimate
must name the premium vendor unavailable, and no run may send it anything or fail a cell for it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from glaze_pipeline.bench.services import (
    MOCK_PROVIDERS_FILE,
    bench_mock_config,
    mock_vendor_of,
    provider_configs,
)
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.store import Store, TableInfo
from glaze_pipeline.testing.mock_server import MockConfig, MockProviderServer

COLUMNS = ("industry", "employee_count", "revenue", "title")
PREMIUM = "premium_company"
PREMIUM_KEY_ENV = "GLAZE_PREMIUM_API_KEY"
# The premium vendor is configured to demand this key, so "key set" runs prove it is sent.
BENCH_PREMIUM_KEY = "glaze-bench-premium-key"
TARGET_ERROR_PCT = 10.0

Echo = Callable[[str], None]


@dataclass(frozen=True)
class EstimateBenchSettings:
    seeds: int = 3
    rows: int = 1000
    companies: int = 100
    premium_key_set: bool = True
    # None: a throwaway SQLite database per seed. Given: every seed's tables go there (use a
    # fresh database: entities a previous run cached are cache hits for this one).
    database_url: str | None = None


@dataclass
class SeedFigures:
    """One seed: the second table's estimate beside what enriching it then did."""

    seed: int
    table_ids: tuple[str, str]
    estimate_request: str
    enrich_request: str
    expected_cost: float
    max_cost: float
    actual_cost: float
    expected_range: tuple[float, float]  # ~95 % of runs, by the estimate
    expected_calls: dict[str, float]
    max_calls: dict[str, int]
    provider_calls: dict[str, int]
    # During the second enrichment, by provider: what reached the mock and what it billed.
    mock_requests: dict[str, int]
    mock_cost: float
    # The estimate's entry for the premium vendor, and the requests it got over the whole seed.
    premium_estimate: dict[str, Any]
    premium_requests: int
    cells_failed: int
    cells_skipped: int
    expected_cells_skipped: int  # the estimate's cells_provider_unavailable
    unavailable_providers: dict[str, str]
    calls_not_sent: dict[str, Any]
    error: str | None
    seconds: float

    @property
    def error_pct(self) -> float | None:
        """Expected vs actual, in % of actual (None when nothing was spent)."""
        if self.actual_cost <= 0:
            return None
        return (self.expected_cost - self.actual_cost) / self.actual_cost * 100

    @property
    def within_range(self) -> bool:
        """The actual cost inside the estimate's ~95 % range (reported, not enforced)."""
        low, high = self.expected_range
        return low - 1e-6 <= self.actual_cost <= high + 1e-6

    @property
    def within_bound(self) -> bool:
        return self.max_cost >= self.actual_cost - 1e-6

    @property
    def counters_match(self) -> bool:
        return _nonzero(self.mock_requests) == _nonzero(self.provider_calls)

    @property
    def cost_matches(self) -> bool:
        return abs(self.mock_cost - self.actual_cost) < 1e-6

    def problems(self, *, premium_key_set: bool) -> list[str]:
        """What would be a bug, as sentences (the 10 % target is not one of them)."""
        found: list[str] = []
        where = f"seed {self.seed}"
        if not self.within_bound:
            found.append(f"{where}: the upper bound {self.max_cost:g} is below the actual cost")
        if not self.counters_match:
            found.append(
                f"{where}: the mock served {_nonzero(self.mock_requests)} but the request "
                f"counts provider_calls {_nonzero(self.provider_calls)}"
            )
        if not self.cost_matches:
            found.append(
                f"{where}: the vendors billed {self.mock_cost:g} but the request says it "
                f"cost {self.actual_cost:g}"
            )
        if not premium_key_set:
            if self.premium_estimate.get("status") != "unavailable":
                found.append(f"{where}: the estimate does not call {PREMIUM} unavailable")
            if self.premium_requests:
                found.append(f"{where}: {self.premium_requests} requests reached {PREMIUM}")
            if self.cells_failed:
                found.append(f"{where}: {self.cells_failed} cells failed")
            if PREMIUM not in self.unavailable_providers or PREMIUM not in (self.error or ""):
                found.append(f"{where}: the request does not say {PREMIUM} is unavailable")
        return found

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "error_pct": None if self.error_pct is None else round(self.error_pct, 2),
            "within_bound": self.within_bound,
            "counters_match": self.counters_match,
            "cost_matches": self.cost_matches,
        }


@dataclass
class EstimateBenchReport:
    settings: EstimateBenchSettings
    seeds: list[SeedFigures] = field(default_factory=list)

    def problems(self) -> list[str]:
        return [
            problem
            for figures in self.seeds
            for problem in figures.problems(premium_key_set=self.settings.premium_key_set)
        ]

    def worst_error_pct(self) -> float | None:
        errors = [abs(f.error_pct) for f in self.seeds if f.error_pct is not None]
        return max(errors) if errors else None

    def summary(self) -> str:
        settings = self.settings
        worst = self.worst_error_pct()
        accuracy = (
            "nothing was spent"
            if worst is None
            else f"expected cost within {worst:.1f} % of the actual cost at worst "
            f"(target {TARGET_ERROR_PCT:g} %: {'met' if worst <= TARGET_ERROR_PCT else 'missed'})"
        )
        bound = (
            "upper bound never below it"
            if all(f.within_bound for f in self.seeds)
            else "UPPER BOUND BELOW IT"
        )
        counters = (
            "mock requests = provider_calls and billed = cost in every seed"
            if all(f.counters_match and f.cost_matches for f in self.seeds)
            else "COUNTERS DISAGREE"
        )
        key = "premium key set" if settings.premium_key_set else "premium key UNSET"
        return (
            f"{len(self.seeds)} seeds, {settings.rows:,} rows / {settings.companies:,} companies, "
            f"{key}: {accuracy}; {bound}; {counters}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "columns": list(COLUMNS),
            "target_error_pct": TARGET_ERROR_PCT,
            "worst_error_pct": self.worst_error_pct(),
            "seeds": [figures.as_dict() for figures in self.seeds],
            "problems": self.problems(),
            "summary": self.summary(),
        }


def run(settings: EstimateBenchSettings, *, echo: Echo = lambda _line: None) -> EstimateBenchReport:
    """Every seed in turn, against one mock and, per seed, a fresh database (unless given)."""
    report = EstimateBenchReport(settings)
    vendors = mock_vendors()
    with (
        tempfile.TemporaryDirectory(prefix="glaze-bench-estimate-") as workdir,
        MockProviderServer(mock_config(vendors)) as mock,
        environment(
            GLAZE_PROVIDERS_FILE=str(MOCK_PROVIDERS_FILE),
            GLAZE_MOCK_PROVIDERS_URL=mock.url,
            GLAZE_PREMIUM_API_KEY=BENCH_PREMIUM_KEY if settings.premium_key_set else None,
            # The Dagster runs and anything else the job keeps go to the throwaway folder, and
            # no Redis: the answer cache is the bench database's, so no earlier run's answers
            # (nor a user's) are cache hits here.
            GLAZE_HOME=workdir,
            DAGSTER_HOME=None,
            GLAZE_REDIS_URL=None,
        ),
    ):
        for seed in range(1, settings.seeds + 1):
            url = settings.database_url or f"sqlite:///{Path(workdir) / f'seed{seed}.db'}"
            figures = measure_seed(settings, seed, url, mock.url, vendors)
            report.seeds.append(figures)
            echo(
                f"seed {seed}: expected {figures.expected_cost:,.2f} "
                f"(~95 % within {figures.expected_range[0]:,.0f}-{figures.expected_range[1]:,.0f}), "
                f"max {figures.max_cost:,.2f}, "
                f"actual {figures.actual_cost:,.2f} ({figures.seconds:.1f} s)"
            )
    return report


def measure_seed(
    settings: EstimateBenchSettings,
    seed: int,
    database_url: str,
    mock_url: str,
    vendors: Mapping[str, str],
) -> SeedFigures:
    """Enrich table 1, estimate table 2, enrich table 2; the figures of the last two."""
    from glaze_pipeline.runner import run_enrich_job

    started = time.perf_counter()
    # Companies and people are numbered from `first`: no two tables share an entity.
    stride = max(settings.rows, settings.companies)
    store = Store(database_url)
    try:
        store.upgrade()
        first, second = (
            seed_generated(
                store,
                rows=settings.rows,
                unique_companies=settings.companies,
                first=(2 * (seed - 1) + n) * stride,
                name=f"bench estimate seed {seed} table {n + 1}",
            )
            for n in (0, 1)
        )
    finally:
        store.dispose()

    at_start = mock_stats(mock_url)
    run_enrich_job(database_url, job_config(first), log_level="WARNING")
    estimated = run_enrich_job(
        database_url, {**job_config(second), "kind": "estimate"}, log_level="WARNING"
    )
    before = mock_stats(mock_url)
    enriched = run_enrich_job(database_url, job_config(second), log_level="WARNING")
    after = mock_stats(mock_url)

    report: dict[str, Any] = dict(estimated.estimate or {})
    requests = by_provider(after, before, "requests", vendors)
    billed = by_provider(after, before, "cost", vendors)
    premium_vendor = next((v for v, p in vendors.items() if p == PREMIUM), PREMIUM)
    premium_requests = _vendor_figure(after, premium_vendor, "requests") - _vendor_figure(
        at_start, premium_vendor, "requests"
    )
    return SeedFigures(
        seed=seed,
        table_ids=(first.id, second.id),
        estimate_request=estimated.id,
        enrich_request=enriched.id,
        expected_cost=float(report.get("expected_cost", 0.0)),
        max_cost=float(report.get("max_cost", 0.0)),
        actual_cost=float(enriched.cost or 0.0),
        expected_range=tuple(report.get("expected_cost_range") or (0.0, 0.0)),
        expected_calls=dict(report.get("expected_provider_calls") or {}),
        max_calls=dict(report.get("max_provider_calls") or {}),
        provider_calls={k: int(v) for k, v in (enriched.provider_calls or {}).items()},
        mock_requests={k: int(v) for k, v in requests.items()},
        mock_cost=round(sum(billed.values()), 6),
        premium_estimate=dict((report.get("providers") or {}).get(PREMIUM) or {}),
        premium_requests=int(premium_requests),
        cells_failed=int(enriched.cells_failed or 0),
        cells_skipped=int(enriched.cells_skipped or 0),
        expected_cells_skipped=int(report.get("cells_provider_unavailable", 0)),
        unavailable_providers=dict(enriched.unavailable_providers or {}),
        calls_not_sent=dict(enriched.calls_not_sent or {}),
        error=enriched.error,
        seconds=round(time.perf_counter() - started, 2),
    )


def job_config(table: TableInfo) -> dict[str, Any]:
    """The op config `glaze enrich TABLE --columns industry,employee_count,revenue,title` runs."""
    return {
        "table_id": table.id,
        "column_ids": [table.column_by_key(key).id for key in COLUMNS],
        "row_ids": [],
    }


def mock_vendors() -> dict[str, str]:
    """Mock vendor -> provider name, from the providers file (`/cheap` -> cheap_company)."""
    document = yaml.safe_load(MOCK_PROVIDERS_FILE.read_text(encoding="utf-8"))
    return {mock_vendor_of(config): config.name for config in provider_configs(document)}


def mock_config(vendors: Mapping[str, str]) -> MockConfig:
    """The mock's default vendors (fields, prices, miss rates) without latency; the premium
    vendor demands `BENCH_PREMIUM_KEY`, as a real one would."""
    config = bench_mock_config(0.0)
    premium = next(vendor for vendor, provider in vendors.items() if provider == PREMIUM)
    return config.merged({"vendors": {premium: {"api_key": BENCH_PREMIUM_KEY}}})


def mock_stats(mock_url: str) -> dict[str, Any]:
    """The mock's `/_stats`, over HTTP like any client would read it."""
    response = httpx.get(f"{mock_url}/_stats", timeout=10)
    response.raise_for_status()
    stats: dict[str, Any] = response.json()
    return stats


def by_provider(
    after: Mapping[str, Any], before: Mapping[str, Any], figure: str, vendors: Mapping[str, str]
) -> dict[str, float]:
    """A `/_stats` vendor figure's change, by provider name (an unmapped vendor by its own)."""
    names = set(after.get("vendors", {})) | set(before.get("vendors", {}))
    changes = {
        vendors.get(name, name): _vendor_figure(after, name, figure)
        - _vendor_figure(before, name, figure)
        for name in sorted(names)
    }
    return {name: change for name, change in changes.items() if change}


def _vendor_figure(stats: Mapping[str, Any], vendor: str, figure: str) -> float:
    return float((stats.get("vendors", {}).get(vendor) or {}).get(figure, 0))


def _nonzero(counts: Mapping[str, float]) -> dict[str, float]:
    return {name: count for name, count in sorted(counts.items()) if count}


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (a string) or unset (None) environment variables; restore them afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            _set(name, value)
        yield
    finally:
        for name, value in saved.items():
            _set(name, value)


def _set(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
