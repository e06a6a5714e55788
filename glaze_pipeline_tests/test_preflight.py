"""Provider preflight (issue 14): what can be known before a job spends, over real HTTP.

Vendors are the mock provider server's. Every verdict is checked against what the mock saw:
a health probe is counted in its `probes`, never in `requests`, `entities` or `billed`; a
provider refused before its probe (no key, an open circuit) sends nothing at all; and the
probe leaves the provider's own lookup stats and circuit breaker alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from glaze_pipeline.bench.stack import free_port
from glaze_pipeline.core.models import EntityType
from glaze_pipeline.core.preflight import check_providers, unusable
from glaze_pipeline.core.providers.base import (
    ProviderUnavailable,
    TransientProviderError,
    Verdict,
)
from glaze_pipeline.core.providers.fake import FakeProvider
from glaze_pipeline.core.providers.http import CircuitState, provider_session
from glaze_pipeline.core.providers.json_api import JsonApiProvider
from glaze_pipeline.core.providers.website import WebsiteConfig, WebsiteProvider
from glaze_pipeline.core.redact import REDACTED, register_secret
from glaze_pipeline.testing.mock_server import MockProviderServer
from glaze_pipeline_tests.provider_helpers import (
    company,
    company_vendor,
    configure_vendor,
    quiet_mock,
)

KEY = "sk-preflight-5d2e9a71c4b8"
KEY_ENV = "GLAZE_TEST_PREFLIGHT_KEY"
REPO = Path(__file__).resolve().parent.parent
MOCK_FILE = REPO / "seed" / "providers.mock.yaml"


@pytest.fixture(scope="module")
def mock_server() -> Iterator[MockProviderServer]:
    with quiet_mock() as server:
        yield server


@pytest.fixture
def mock(mock_server: MockProviderServer, monkeypatch: pytest.MonkeyPatch) -> MockProviderServer:
    mock_server.reset(config=True)
    monkeypatch.delenv(KEY_ENV, raising=False)
    return mock_server


def vendor(
    base_url: str,
    *,
    name: str = "premium_company",
    keyed: bool = False,
    health: dict[str, Any] | None = None,
    probe: bool = True,
    **http: Any,
) -> JsonApiProvider:
    """The premium vendor as a provider; `probe` declares its health endpoint."""
    extra: dict[str, Any] = {}
    if keyed:
        extra["auth"] = {"header": "X-Api-Key", "env": KEY_ENV}
    if probe:
        extra["health"] = {"path": "/v1/health", "timeout_s": 1.0, **(health or {})}
    return JsonApiProvider(company_vendor(base_url, name=name, http=http, **extra))


def preflight(provider: Any, *, probe: bool = True) -> Verdict:
    return asyncio.run(provider.preflight(probe=probe))


def seen(mock: MockProviderServer, name: str = "premium") -> dict[str, Any]:
    """What the mock counted for one vendor (zeros when it never heard of it)."""
    empty = {"requests": 0, "probes": 0, "entities": 0, "billed": 0, "cost": 0.0}
    return {k: v for k, v in mock.stats()["vendors"].get(name, empty).items() if k in empty}


NOTHING = {"requests": 0, "probes": 0, "entities": 0, "billed": 0, "cost": 0.0}
ONE_PROBE = {**NOTHING, "probes": 1}


# --- a healthy vendor ----------------------------------------------------------------------------


def test_a_healthy_keyed_vendor_is_usable_after_one_probe_that_is_not_a_lookup(
    mock: MockProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    configure_vendor(mock, "premium", api_key=KEY)  # so a 200 proves the key was sent
    provider = vendor(mock.vendor_url("premium"), keyed=True, breaker_threshold=3)

    verdict = preflight(provider)

    assert verdict == Verdict(
        "premium_company", True, None, ("configured", "credentials", "circuit", "probe")
    )
    assert verdict.as_dict() == {
        "provider": "premium_company",
        "status": "ok",
        "reason": None,
        "checks": ["configured", "credentials", "circuit", "probe"],
    }
    assert provider.unavailable_reason() is None
    assert seen(mock) == ONE_PROBE  # counted apart: no request, no entity, nothing billed
    assert mock.stats()["requests"] == 0 and mock.stats()["probes"] == 1
    # ... and not a lookup on our side either.
    assert provider.http.stats.attempts == 0 and not provider.http.stats.outcomes
    assert provider.http.open_clients == 0


def test_without_probe_or_health_endpoint_nothing_is_sent(mock: MockProviderServer) -> None:
    configure_vendor(mock, "premium", mode="error")  # a probe would fail
    with_endpoint = vendor(mock.vendor_url("premium"))
    without_endpoint = vendor(mock.vendor_url("premium"), probe=False)

    assert preflight(with_endpoint, probe=False) == Verdict(
        "premium_company", True, None, ("configured",)
    )
    assert preflight(without_endpoint) == Verdict("premium_company", True, None, ("configured",))
    assert seen(mock) == NOTHING


# --- credentials ---------------------------------------------------------------------------------


def test_a_missing_key_is_named_and_nothing_is_sent(mock: MockProviderServer) -> None:
    provider = vendor(mock.vendor_url("premium"), keyed=True)

    verdict = preflight(provider)

    reason = f"API key missing: set the environment variable {KEY_ENV}"
    assert verdict == Verdict("premium_company", False, reason, ("configured", "credentials"))
    assert verdict.status == "unavailable"
    assert provider.unavailable_reason() == reason
    assert seen(mock) == NOTHING  # not even the probe: it would only be refused


def test_a_malformed_key_is_named_by_its_variable_never_its_value(
    mock: MockProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = vendor(mock.vendor_url("premium"), keyed=True)
    malformed = "sk-preflight-ab\x07cd-0123"
    monkeypatch.setenv(KEY_ENV, malformed)  # after building: it is read at each check

    verdict = preflight(provider)

    reason = (
        f"the API key in {KEY_ENV} has a control character (U+0007) at position 16; "
        "a key must be printable ASCII"
    )
    assert verdict == Verdict("premium_company", False, reason, ("configured", "credentials"))
    assert provider.unavailable_reason() == reason
    assert "sk-preflight" not in json.dumps(verdict.as_dict())
    assert seen(mock) == NOTHING


def test_a_key_the_vendor_refuses_is_found_by_the_probe(
    mock: MockProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    configure_vendor(mock, "premium", api_key="the-vendors-real-key")
    provider = vendor(mock.vendor_url("premium"), keyed=True)

    verdict = preflight(provider)

    assert verdict == Verdict(
        "premium_company",
        False,
        "API key refused (HTTP 401)",
        ("configured", "credentials", "probe"),
    )
    assert provider.unavailable_reason() is None  # the key is present: a lookup may be tried
    assert seen(mock) == ONE_PROBE


def test_a_vendor_that_wants_a_key_none_is_configured_for(mock: MockProviderServer) -> None:
    configure_vendor(mock, "premium", mode="unauthorized")

    verdict = preflight(vendor(mock.vendor_url("premium")))

    assert not verdict.usable
    assert verdict.reason == (
        "health probe refused (HTTP 401) and no API key is configured "
        f"(GET {mock.url}/premium/v1/health)"
    )


# --- the probe's failures ------------------------------------------------------------------------


def test_a_failing_probe_names_the_status_and_leaves_the_breaker_alone(
    mock: MockProviderServer,
) -> None:
    configure_vendor(mock, "premium", mode="error")
    provider = vendor(mock.vendor_url("premium"), breaker_threshold=1)

    verdicts = [preflight(provider) for _ in range(3)]

    reason = f"health probe failed: HTTP 500 (GET {mock.url}/premium/v1/health)"
    assert (
        verdicts
        == [Verdict("premium_company", False, reason, ("configured", "circuit", "probe"))] * 3
    )
    assert seen(mock) == {**NOTHING, "probes": 3}
    health = provider.health()  # three failed probes, threshold 1: still closed
    assert (health.circuit, health.consecutive_failures, health.attempts) == ("closed", 0, 0)


def test_a_vendor_that_is_down_is_named_with_the_connection_failure() -> None:
    port = free_port()  # nobody listens there
    provider = vendor(f"http://127.0.0.1:{port}/premium")

    verdict = preflight(provider)

    assert verdict.reason == (
        "health probe failed: connection failed (Connection refused) "
        f"(GET http://127.0.0.1:{port}/premium/v1/health)"
    )
    assert provider.http.stats.attempts == 0


def test_a_hanging_probe_is_cut_at_its_timeout(mock: MockProviderServer) -> None:
    configure_vendor(mock, "premium", mode="hang")
    provider = vendor(mock.vendor_url("premium"), health={"timeout_s": 0.3})

    started = time.perf_counter()
    verdict = preflight(provider)
    elapsed = time.perf_counter() - started

    assert verdict.reason == (
        f"health probe failed: no answer within 0.3s (GET {mock.url}/premium/v1/health)"
    )
    assert elapsed < 1.5
    assert seen(mock)["probes"] == 1 and seen(mock)["requests"] == 0


# --- the circuit ---------------------------------------------------------------------------------


def test_an_open_circuit_is_a_verdict_and_the_cooled_down_probe_slot_stays_free(
    mock: MockProviderServer,
) -> None:
    configure_vendor(mock, "premium", mode="error")
    provider = vendor(
        mock.vendor_url("premium"), retries=0, breaker_threshold=1, breaker_cooldown_s=0.4
    )

    async def one_lookup(domain: str) -> Exception | None:
        async with provider_session([provider]):
            try:
                await provider.lookup(company(domain), frozenset({"name"}))
            except Exception as error:
                return error
        return None

    assert isinstance(asyncio.run(one_lookup("a.com")), TransientProviderError)
    configure_vendor(mock, "premium", mode="normal")  # the vendor recovers
    verdict = preflight(provider)

    assert not verdict.usable and verdict.checks == ("configured", "circuit")
    assert verdict.reason is not None
    assert verdict.reason.startswith("circuit open after 1 consecutive failures; next probe in ")
    assert "last error: premium_company: HTTP 500" in verdict.reason
    reason = provider.unavailable_reason()
    assert reason is not None and reason.startswith("circuit open after 1 consecutive failures")
    refused = asyncio.run(one_lookup("b.com"))  # the breaker refuses with the same words
    assert isinstance(refused, ProviderUnavailable)
    assert str(refused).startswith(f"premium_company: {reason.split('; next probe')[0]}")
    assert seen(mock)["probes"] == 0 and seen(mock)["requests"] == 1

    time.sleep(0.45)  # cooled down: the next lookup is the breaker's own probe
    assert provider.health().circuit == CircuitState.HALF_OPEN
    assert provider.unavailable_reason() is None
    assert preflight(provider).usable  # a free health probe, which closes nothing...
    assert provider.health().circuit == CircuitState.HALF_OPEN
    assert asyncio.run(one_lookup("c.com")) is None  # ...the lookup does
    assert provider.health().circuit == CircuitState.CLOSED


# --- the website provider ------------------------------------------------------------------------


def test_the_website_provider_needs_no_key_and_is_not_probed(mock: MockProviderServer) -> None:
    site = WebsiteProvider(
        WebsiteConfig(url_template=f"{mock.url}/site/{{domain}}/", allow_private_networks=True)
    )
    assert preflight(site) == Verdict("website", True, None, ("configured",))
    assert site.unavailable_reason() is None
    assert mock.stats()["site"]["requests"] == 0

    broken = WebsiteProvider(WebsiteConfig(url_template="http:///{domain}"))
    verdict = preflight(broken)
    assert not verdict.usable and verdict.checks == ("configured",)
    assert verdict.reason == "url_template 'http:///{domain}' makes URLs with no host"


# --- check_providers -----------------------------------------------------------------------------


class BrokenPreflight:
    """A provider whose own preflight fails: its verdict says so, the others are unharmed."""

    name = "broken"
    entity_type = EntityType.COMPANY

    async def preflight(self, *, probe: bool = True) -> Verdict:
        raise RuntimeError("the check itself crashed")


class SlowPreflight:
    name = "slow"
    entity_type = EntityType.COMPANY

    async def preflight(self, *, probe: bool = True) -> Verdict:
        await asyncio.sleep(10)
        return Verdict(self.name, True)


def mixed_providers(mock: MockProviderServer) -> list[Any]:
    return [
        FakeProvider(EntityType.PERSON),
        vendor(mock.vendor_url("cheap"), name="cheap_company"),
        vendor(mock.vendor_url("premium"), keyed=True),
        BrokenPreflight(),
        SlowPreflight(),
    ]


def test_check_providers_gives_every_verdict_and_unusable_the_reasons(
    mock: MockProviderServer,
) -> None:
    providers = mixed_providers(mock)

    started = time.perf_counter()
    verdicts = check_providers(providers, timeout_s=0.5)
    elapsed = time.perf_counter() - started

    assert verdicts["fake_person"] == Verdict("fake_person", True, None, ("in process",))
    assert verdicts["cheap_company"].usable
    assert verdicts["cheap_company"].checks == ("configured", "probe")
    assert unusable(verdicts) == {
        "premium_company": f"API key missing: set the environment variable {KEY_ENV}",
        "broken": "preflight failed: RuntimeError: the check itself crashed",
        "slow": "preflight gave no verdict within 0.5s",
    }
    assert elapsed < 2.0  # the slow one is bounded, not waited for
    assert seen(mock, "cheap") == ONE_PROBE and seen(mock, "premium") == NOTHING

    assert check_providers([]) == {}
    assert unusable({"x": Verdict("x", False)}) == {"x": "unavailable"}


def test_check_providers_from_inside_a_running_event_loop(mock: MockProviderServer) -> None:
    providers = [vendor(mock.vendor_url("premium")), FakeProvider(EntityType.COMPANY)]

    async def from_a_coroutine() -> dict[str, Verdict]:
        # Sync code called on a loop's thread (a Dagster op, an async route): no re-entry.
        return check_providers(providers)

    verdicts = asyncio.run(from_a_coroutine())

    assert {name: v.usable for name, v in verdicts.items()} == {
        "premium_company": True,
        "fake_company": True,
    }
    assert seen(mock) == ONE_PROBE


def test_probes_run_concurrently(mock: MockProviderServer) -> None:
    configure_vendor(mock, "premium", mode="hang")
    providers = [
        vendor(mock.vendor_url("premium"), name=f"hanging_{i}", health={"timeout_s": 0.5})
        for i in range(4)
    ]

    started = time.perf_counter()
    verdicts = check_providers(providers)
    elapsed = time.perf_counter() - started

    assert len(unusable(verdicts)) == 4
    assert elapsed < 1.5  # four 0.5 s timeouts side by side, not one after another


def test_a_verdict_reason_is_redacted() -> None:
    register_secret(KEY)
    verdict = Verdict("v", False, f"vendor said: bad key {KEY}")
    assert verdict.reason == f"vendor said: bad key {REDACTED}"


# --- glaze providers -----------------------------------------------------------------------------


def test_glaze_providers_shows_the_verdicts_of_the_seed_file(
    mock: MockProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from glaze_pipeline.cli import cli

    monkeypatch.setenv("GLAZE_PROVIDERS_FILE", str(MOCK_FILE))
    monkeypatch.setenv("GLAZE_MOCK_PROVIDERS_URL", mock.url)
    monkeypatch.delenv("GLAZE_PREMIUM_API_KEY", raising=False)
    missing = "API key missing: set the environment variable GLAZE_PREMIUM_API_KEY"

    listed = CliRunner().invoke(cli, ["providers", "--json"])

    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: row for row in json.loads(listed.output)}
    assert {name: (row["status"], row["reason"]) for name, row in rows.items()} == {
        "cheap_company": ("ok", None),
        "premium_company": ("unavailable", missing),
        "people_vendor": ("ok", None),
    }
    stats = mock.stats()
    assert stats["probes"] == 2 and stats["requests"] == 0  # cheap and people, nothing bought

    table = CliRunner().invoke(cli, ["providers", "--no-probe"])
    assert table.exit_code == 0, table.output
    assert "unavailable: API key missing" in table.output
    assert mock.stats()["probes"] == 2  # --no-probe sent nothing

    configure_vendor(mock, "cheap", mode="error")
    configure_vendor(mock, "premium", api_key="dev-key")
    monkeypatch.setenv("GLAZE_PREMIUM_API_KEY", "dev-key")
    rows = {
        row["name"]: row
        for row in json.loads(CliRunner().invoke(cli, ["providers", "--json"]).output)
    }
    assert rows["cheap_company"]["reason"] == (
        f"health probe failed: HTTP 500 (GET {mock.url}/cheap/v1/health)"
    )
    assert rows["premium_company"]["status"] == "ok"
