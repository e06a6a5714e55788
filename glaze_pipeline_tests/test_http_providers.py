"""HTTP providers against the mock provider server, over real loopback HTTP.

Nothing of ours is mocked: each test starts from a JSON API provider pointed at a vendor of
the mock server, makes the vendor misbehave (429 storms, timeouts, 500s, garbage, 10 MB
bodies, a closed port), and checks what the provider raises, what the waterfall records
(status, provenance, budget) and what the server saw (calls, cost).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from glaze_pipeline.bench.stack import free_port
from glaze_pipeline.core.budget import Budget
from glaze_pipeline.core.models import CellStatus, EntityKey, EntityRequest, EntityType
from glaze_pipeline.core.providers.base import (
    AddressRefused,
    BadResponse,
    CredentialsMissing,
    EntityNotFound,
    FatalProviderError,
    ProviderAnswer,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    TransientProviderError,
    Unreachable,
)
from glaze_pipeline.core.providers.egress import EgressGuard, IPAddress, address_refusal
from glaze_pipeline.core.providers.fake import fake_value
from glaze_pipeline.core.providers.http import (
    CircuitBreaker,
    CircuitState,
    ProviderClient,
    RateLimiter,
    UnsupportedLookup,
    parse_retry_after,
    provider_session,
)
from glaze_pipeline.core.providers.json_api import JsonApiProvider
from glaze_pipeline.core.providers.registry import describe_providers, load_providers
from glaze_pipeline.core.providers.website import WebsiteConfig, WebsiteProvider
from glaze_pipeline.testing.mock_server import (
    COMPANY_LAYOUT,
    MockProviderServer,
)
from glaze_pipeline_tests.provider_helpers import (
    CHEAP_FIELDS,
    FrozenTime,
    LoopbackSite,
    Page,
    company,
    company_vendor,
    configure_vendor,
    fake_dns,
    fast_http,
    run_waterfall,
    wait_until,
)

SECRET = "sk-live-7f3a9c1e5b2d-DO-NOT-LOG"
KEY_ENV = "GLAZE_TEST_VENDOR_KEY"


async def lookup(provider: JsonApiProvider, key: EntityKey, fields: set[str]) -> ProviderAnswer:
    async with provider_session([provider]):
        return await provider.lookup(key, frozenset(fields))


async def lookups(
    provider: JsonApiProvider, keys: list[EntityKey]
) -> list[ProviderAnswer | BaseException]:
    async with provider_session([provider]):
        return await asyncio.gather(
            *(provider.lookup(key, frozenset({"name"})) for key in keys), return_exceptions=True
        )


# --- answers --------------------------------------------------------------------------------


def test_lookup_maps_the_vendor_json_onto_catalogue_fields(mock: MockProviderServer) -> None:
    provider = JsonApiProvider(company_vendor(mock.vendor_url("premium")))
    key = company("acme.com")

    answer = asyncio.run(lookup(provider, key, {"name", "employee_count"}))

    assert dict(answer.values) == {field: fake_value(key, field) for field in COMPANY_LAYOUT}
    assert isinstance(answer.values["employee_count"], int)
    assert provider.http.stats.attempts == 1
    premium = mock.stats()["vendors"]["premium"]
    assert (premium["requests"], premium["cost"]) == (1, 10.0)


def test_batch_lookup_maps_results_back_and_reports_misses(mock: MockProviderServer) -> None:
    configure_vendor(mock, "premium", not_found_rate=0.3)
    provider = JsonApiProvider(company_vendor(mock.vendor_url("premium"), http={"retries": 0}))
    keys = [company(f"batch{i}.com") for i in range(25)]

    async def run() -> dict[str, ProviderAnswer | ProviderError]:
        async with provider_session([provider]):
            return await provider.lookup_many(keys, frozenset({"name"}))

    results = asyncio.run(run())

    assert set(results) == {key.id for key in keys}
    found = {k: v for k, v in results.items() if isinstance(v, ProviderAnswer)}
    missed = [v for v in results.values() if isinstance(v, EntityNotFound)]
    assert found and missed and len(found) + len(missed) == 25
    for key in keys:
        if key.id in found:
            assert found[key.id].values["industry"] == fake_value(key, "industry")
    assert provider.http.stats.attempts == 1  # 25 entities, one request
    assert mock.stats()["vendors"]["premium"]["entities"] == 25


# --- 429 ------------------------------------------------------------------------------------


def test_429_storm_is_retried_a_bounded_number_of_times_then_failed_not_charged(
    mock: MockProviderServer,
) -> None:
    configure_vendor(mock, "premium", rate_limit_rate=1.0, retry_after="0.05")
    provider = JsonApiProvider(company_vendor(mock.vendor_url("premium"), http={"retries": 3}))
    requests = [EntityRequest(company("storm0.com"), frozenset({"name", "industry"}))]
    requests += [EntityRequest(company(f"storm{i}.com"), frozenset({"name"})) for i in (1, 2)]
    budget = Budget(100.0)
    frozen = FrozenTime()
    provider.http.limiter = frozen.limiter(None)  # no rate limit: only Retry-After holds it

    outcomes, waterfall = asyncio.run(run_waterfall([provider], requests, budget))

    for outcome in outcomes:
        for field_outcome in outcome.fields.values():
            assert field_outcome.status is CellStatus.FAILED
            assert field_outcome.error is not None
            assert "rate limited (HTTP 429) after 4 attempts" in field_outcome.error
    # Bounded and counted: 3 lookups x (1 try + 3 retries), every one of them a 429.
    assert provider.http.stats.attempts == 12
    assert provider.http.stats.retries == 9
    assert mock.stats()["vendors"]["premium"]["statuses"] == {"429": 12}
    # Never charged, nothing left reserved, the vendor billed nothing either.
    assert budget.spent == 0 and budget.reserved == 0
    assert not waterfall.stats.cost
    assert waterfall.stats.errors["premium_company"] == 3
    assert mock.stats()["vendors"]["premium"]["cost"] == 0
    # Retry-After was honoured: each of the 9 retries waited the 0.05 s the server asked for.
    assert len(frozen.slept) >= 9 and set(frozen.slept) == {0.05}


def test_rate_limited_carries_retry_after_and_the_cap_bounds_the_wait(
    mock: MockProviderServer,
) -> None:
    configure_vendor(mock, "premium", rate_limit_rate=1.0, retry_after="30")
    provider = JsonApiProvider(
        company_vendor(mock.vendor_url("premium"), http={"retries": 2, "retry_after_max_s": 0.05})
    )

    frozen = FrozenTime()
    provider.http.limiter = frozen.limiter(None)
    with pytest.raises(RateLimited) as caught:
        asyncio.run(lookup(provider, company("slow-down.com"), {"name"}))

    assert caught.value.retry_after == 30.0
    assert caught.value.provider == "premium_company"
    assert provider.http.stats.attempts == 3
    assert frozen.slept == [0.05, 0.05]  # capped at 0.05 s a retry, not 30 s


# --- timeouts, 5xx ----------------------------------------------------------------------------


def test_slow_vendor_times_out_each_attempt_then_is_transient(mock: MockProviderServer) -> None:
    configure_vendor(mock, "premium", latency={"kind": "fixed", "mean_ms": 500})
    provider = JsonApiProvider(
        company_vendor(mock.vendor_url("premium"), http={"read_timeout_s": 0.05, "retries": 1})
    )

    started = time.perf_counter()
    with pytest.raises(TransientProviderError, match=r"timed out .*after 2 attempts"):
        asyncio.run(lookup(provider, company("slow.com"), {"name"}))

    assert time.perf_counter() - started < 0.9  # did not wait for the 500 ms answers
    assert provider.http.stats.attempts == 2
    assert provider.http.stats.outcomes["timeout"] == 2


def test_hanging_response_is_cut_by_the_attempt_deadline(mock: MockProviderServer) -> None:
    provider = JsonApiProvider(
        company_vendor(
            mock.vendor_url("premium"),
            params={"_mode": "hang"},
            http={"read_timeout_s": 30, "attempt_timeout_s": 0.2, "retries": 0},
        )
    )

    started = time.perf_counter()
    with pytest.raises(TransientProviderError, match=r"no complete answer within 0\.2s"):
        asyncio.run(lookup(provider, company("hang.com"), {"name"}))

    assert time.perf_counter() - started < 1.5
    assert provider.http.stats.attempts == 1


def test_500s_are_retried_with_full_jitter_backoff_then_transient(
    mock: MockProviderServer,
) -> None:
    configure_vendor(mock, "premium", error_rate=1.0)
    config = company_vendor(
        mock.vendor_url("premium"),
        http={"retries": 3, "backoff_base_s": 0.1, "backoff_max_s": 0.25},
    )
    pauses: list[float] = []

    async def record(seconds: float) -> None:
        pauses.append(seconds)

    client = ProviderClient(config.name, config.http, base_url=config.base_url, sleep=record)
    provider = JsonApiProvider(config, http=client)

    with pytest.raises(TransientProviderError, match="HTTP 500 after 4 attempts"):
        asyncio.run(lookup(provider, company("broken.com"), {"name"}))

    assert mock.stats()["vendors"]["premium"]["statuses"] == {"500": 4}
    assert len(pauses) == 3
    for retry, pause in enumerate(pauses):
        assert 0 <= pause <= min(0.25, 0.1 * 2**retry)  # full jitter under an exponential cap
    assert len(set(pauses)) == 3  # jittered, not a fixed schedule


def test_intermittent_500s_are_absorbed_by_retries(mock: MockProviderServer) -> None:
    configure_vendor(mock, "premium", error_rate=0.5)
    provider = JsonApiProvider(company_vendor(mock.vendor_url("premium"), http={"retries": 8}))

    async def run() -> list[ProviderAnswer]:
        async with provider_session([provider]):
            return [
                await provider.lookup(company(f"flaky{i}.com"), frozenset({"name"}))
                for i in range(10)
            ]

    answers = asyncio.run(run())

    assert len(answers) == 10
    statuses = mock.stats()["vendors"]["premium"]["statuses"]
    assert statuses["200"] == 10 and statuses["500"] > 0
    assert provider.http.stats.retries == statuses["500"]


# --- bad bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "message"),
    [("garbage", "invalid JSON"), ("wrong_shape", "does not fit CompanyRecord")],
)
def test_garbage_answers_are_bad_responses_never_crashes_never_charged(
    mock: MockProviderServer, mode: str, message: str
) -> None:
    provider = JsonApiProvider(company_vendor(mock.vendor_url("premium"), params={"_mode": mode}))
    with pytest.raises(BadResponse, match=message):
        asyncio.run(lookup(provider, company("garbage.com"), {"name"}))
    assert provider.http.stats.attempts == 1  # garbage is not retried

    budget = Budget(100.0)
    request = EntityRequest(company("garbage2.com"), frozenset({"name", "employee_count"}))
    (outcome,), waterfall = asyncio.run(run_waterfall([provider], [request], budget))

    assert {f.status for f in outcome.fields.values()} == {CellStatus.FAILED}
    assert all(message in (f.error or "") for f in outcome.fields.values())
    assert budget.spent == 0 and not waterfall.stats.cost


def test_ten_megabyte_body_is_aborted_while_streaming(mock: MockProviderServer) -> None:
    provider = JsonApiProvider(
        company_vendor(
            mock.vendor_url("premium"),
            params={"_mode": "huge"},
            http={"max_body_bytes": 64 * 1024, "retries": 0},
        )
    )

    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(BadResponse, match="over the 65536-byte limit, aborted"):
            asyncio.run(lookup(provider, company("huge.com"), {"name"}))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 3 * 1024 * 1024  # a 10 MB body never sat in memory
    assert time.perf_counter() - started < 3.0
    assert provider.http.stats.outcomes["too_large"] == 1


def test_declared_oversize_body_is_refused_before_reading(mock: MockProviderServer) -> None:
    provider = JsonApiProvider(
        company_vendor(
            mock.vendor_url("premium"),
            params={"_mode": "huge_declared"},
            http={"max_body_bytes": 64 * 1024, "retries": 0},
        )
    )
    with pytest.raises(BadResponse, match="body of 10485760 bytes is over the 65536-byte limit"):
        asyncio.run(lookup(provider, company("huge.com"), {"name"}))


# --- a provider that is down: the circuit breaker ---------------------------------------------


def test_down_provider_opens_the_circuit_then_is_skipped_without_io() -> None:
    port = free_port()  # nobody listens there: connection refused
    provider = JsonApiProvider(
        company_vendor(
            f"http://127.0.0.1:{port}",
            http={"retries": 1, "breaker_threshold": 2, "breaker_cooldown_s": 0.3},
        )
    )

    async def attempt(domain: str) -> tuple[ProviderError, float]:
        started = time.perf_counter()
        try:
            await provider.lookup(company(domain), frozenset({"name"}))
        except ProviderError as error:
            return error, time.perf_counter() - started
        raise AssertionError("a closed port answered")

    async def scenario() -> list[tuple[ProviderError, float]]:
        async with provider_session([provider]):
            return [await attempt(f"down{i}.com") for i in range(4)]

    results = asyncio.run(scenario())

    first, second, third, fourth = (error for error, _ in results)
    assert isinstance(first, TransientProviderError) and "connection failed" in str(first)
    # No attempt connected: nothing was asked of the vendor (not a call), yet it is down (the
    # breaker counts it).
    assert isinstance(first, Unreachable) and first.sent is False
    assert isinstance(second, TransientProviderError)
    assert isinstance(third, ProviderUnavailable) and "circuit open" in str(third)
    assert isinstance(fourth, ProviderUnavailable)
    assert results[2][1] < 0.05 and results[3][1] < 0.05  # skipped fast
    assert provider.http.stats.attempts == 4  # 2 lookups x 2 tries; the skipped ones sent nothing
    assert provider.http.stats.short_circuits == 2
    health = provider.health()
    assert health.circuit == CircuitState.OPEN
    assert health.last_error is not None and "connection failed" in health.last_error
    assert "circuit open" in describe_providers([provider])[0].health

    # After the cooldown one probe goes through; it fails, so the circuit opens again.
    time.sleep(0.35)
    assert provider.health().circuit == CircuitState.HALF_OPEN
    (probe, _), (after, _) = asyncio.run(_two_attempts(provider))
    assert isinstance(probe, TransientProviderError)
    assert isinstance(after, ProviderUnavailable)
    assert provider.http.stats.attempts == 6


def test_a_vendor_that_answers_once_makes_a_failed_lookup_a_call(mock: MockProviderServer) -> None:
    """A 500 came back: the request reached the vendor, so the lookup counts as sent."""
    mock.configure({"vendors": {"cheap": {"mode": "error"}}})
    provider = JsonApiProvider(company_vendor(mock.vendor_url("cheap"), http={"retries": 1}))
    with pytest.raises(TransientProviderError) as failed:
        asyncio.run(lookup(provider, company("acme.com"), {"name"}))
    assert not isinstance(failed.value, Unreachable)
    assert failed.value.sent is True


async def _two_attempts(provider: JsonApiProvider) -> list[tuple[ProviderError, float]]:
    results = []
    async with provider_session([provider]):
        for domain in ("probe.com", "after.com"):
            try:
                await provider.lookup(company(domain), frozenset({"name"}))
            except ProviderError as error:
                results.append((error, 0.0))
    return results


def test_circuit_closes_again_when_the_half_open_probe_succeeds(
    mock: MockProviderServer,
) -> None:
    configure_vendor(mock, "premium", error_rate=1.0)
    provider = JsonApiProvider(
        company_vendor(
            mock.vendor_url("premium"),
            http={"retries": 0, "breaker_threshold": 1, "breaker_cooldown_s": 0.2},
        )
    )
    with pytest.raises(TransientProviderError):
        asyncio.run(lookup(provider, company("a.com"), {"name"}))
    with pytest.raises(ProviderUnavailable):
        asyncio.run(lookup(provider, company("b.com"), {"name"}))

    configure_vendor(mock, "premium", error_rate=0.0)  # the vendor recovers
    time.sleep(0.25)
    answer = asyncio.run(lookup(provider, company("c.com"), {"name"}))

    assert answer.values["name"] == fake_value(company("c.com"), "name")
    assert provider.health().circuit == CircuitState.CLOSED
    assert provider.health().consecutive_failures == 0


def test_breaker_lets_one_probe_through_and_counts_not_found_as_healthy() -> None:
    now = [0.0]
    breaker = CircuitBreaker("vendor", threshold=2, cooldown_s=5.0, clock=lambda: now[0])

    def fail() -> None:
        with pytest.raises(TransientProviderError), breaker.guard():
            raise TransientProviderError("boom")

    fail()
    with pytest.raises(EntityNotFound), breaker.guard():
        raise EntityNotFound("a miss is an answer")
    assert breaker.consecutive_failures == 0
    fail()
    fail()
    assert breaker.state == CircuitState.OPEN
    with pytest.raises(ProviderUnavailable), breaker.guard():
        pass

    now[0] = 5.0
    assert breaker.state == CircuitState.HALF_OPEN
    probe = breaker.guard()
    probe.__enter__()  # the probe is in flight...
    with pytest.raises(ProviderUnavailable), breaker.guard():
        pass  # ...so a second caller is still refused
    probe.__exit__(None, None, None)
    assert breaker.state == CircuitState.CLOSED


# --- not found and the budget -----------------------------------------------------------------


@pytest.mark.parametrize(("charges_misses", "spent"), [(False, 0.0), (True, 10.0)])
def test_not_found_is_charged_only_when_the_vendor_charges_misses(
    mock: MockProviderServer, charges_misses: bool, spent: float
) -> None:
    configure_vendor(mock, "premium", not_found_rate=1.0, charges_misses=charges_misses)
    provider = JsonApiProvider(
        company_vendor(mock.vendor_url("premium"), charges_misses=charges_misses)
    )
    budget = Budget(100.0)
    request = EntityRequest(company("nobody.com"), frozenset({"name", "industry"}))

    (outcome,), waterfall = asyncio.run(run_waterfall([provider], [request], budget))

    assert {f.status for f in outcome.fields.values()} == {CellStatus.NOT_FOUND}
    assert all(f.error is None for f in outcome.fields.values())
    assert budget.spent == spent
    assert waterfall.stats.cost.get("premium_company", 0.0) == spent
    assert mock.stats()["vendors"]["premium"]["cost"] == spent  # we agree with the vendor's bill
    assert provider.http.stats.attempts == 1  # a 404 is an answer: no retry


# --- the waterfall over real vendors ------------------------------------------------------------


def cheap_and_premium(mock: MockProviderServer) -> tuple[JsonApiProvider, JsonApiProvider]:
    cheap = JsonApiProvider(
        company_vendor(
            mock.vendor_url("cheap"),
            name="cheap_company",
            fields=CHEAP_FIELDS,
            cost_per_call=1.0,
            confidence=0.85,
        )
    )
    premium = JsonApiProvider(company_vendor(mock.vendor_url("premium")))
    return cheap, premium


def test_waterfall_falls_through_a_failing_cheap_vendor_to_premium(
    mock: MockProviderServer,
) -> None:
    configure_vendor(mock, "cheap", error_rate=1.0)
    cheap, premium = cheap_and_premium(mock)
    wanted = frozenset({"name", "industry", "description"})
    keys = [company("first.com"), company("second.com")]
    budget = Budget(50.0)

    outcomes, waterfall = asyncio.run(
        run_waterfall([premium, cheap], [EntityRequest(k, wanted) for k in keys], budget)
    )

    for outcome in outcomes:
        assert set(outcome.fields) == wanted
        for name, field_outcome in outcome.fields.items():
            assert field_outcome.status is CellStatus.DONE
            value = field_outcome.value
            assert value is not None
            assert value.source == "premium_company"
            assert value.value == fake_value(outcome.key, name)
            assert value.confidence == pytest.approx(0.95)
    assert waterfall.stats.calls == {"cheap_company": 2, "premium_company": 2}
    assert waterfall.stats.errors == {"cheap_company": 2}
    assert budget.spent == 20.0  # the failed cheap calls cost nothing
    stats = mock.stats()["vendors"]
    assert stats["cheap"]["cost"] == 0 and stats["premium"]["cost"] == 20.0
    assert cheap.http.stats.attempts == 2 * 3  # each cheap lookup: 1 try + 2 retries


def test_waterfall_stops_at_the_cheap_vendor_when_it_is_good_enough(
    mock: MockProviderServer,
) -> None:
    cheap, premium = cheap_and_premium(mock)
    budget = Budget(50.0)
    cheap_only = EntityRequest(company("enough.com"), frozenset({"industry", "employee_count"}))
    needs_more = EntityRequest(company("more.com"), frozenset({"industry", "description"}))

    (enough, more), waterfall = asyncio.run(
        run_waterfall([cheap, premium], [cheap_only, needs_more], budget)
    )

    for field_outcome in enough.fields.values():
        assert field_outcome.status is CellStatus.DONE
        assert field_outcome.value is not None and field_outcome.value.source == "cheap_company"
    description = more.fields["description"]
    assert description.status is CellStatus.DONE
    assert description.value is not None and description.value.source == "premium_company"
    assert description.value.value == fake_value(company("more.com"), "description")
    assert waterfall.stats.calls == {"cheap_company": 2, "premium_company": 1}
    assert budget.spent == 1.0 + 1.0 + 10.0
    assert mock.stats()["vendors"]["premium"]["requests"] == 1


def test_cheap_miss_falls_through_to_premium_and_is_not_charged(
    mock: MockProviderServer,
) -> None:
    configure_vendor(mock, "cheap", not_found_rate=1.0)
    cheap, premium = cheap_and_premium(mock)
    budget = Budget(50.0)
    request = EntityRequest(company("hidden.com"), frozenset({"industry"}))

    (outcome,), _ = asyncio.run(run_waterfall([cheap, premium], [request], budget))

    industry = outcome.fields["industry"]
    assert industry.status is CellStatus.DONE
    assert industry.value is not None and industry.value.source == "premium_company"
    assert budget.spent == 10.0


# --- limits -------------------------------------------------------------------------------------


def test_concurrency_limit_holds_under_load(mock: MockProviderServer) -> None:
    configure_vendor(mock, "premium", latency={"kind": "fixed", "mean_ms": 40})
    provider = JsonApiProvider(
        company_vendor(mock.vendor_url("premium"), http={"max_concurrency": 3})
    )

    results = asyncio.run(lookups(provider, [company(f"load{i}.com") for i in range(15)]))

    assert all(isinstance(r, ProviderAnswer) for r in results)
    assert mock.stats()["vendors"]["premium"]["max_in_flight"] == 3
    assert provider.max_concurrency == 3


def test_rate_limit_spaces_requests(mock: MockProviderServer) -> None:
    provider = JsonApiProvider(
        company_vendor(mock.vendor_url("premium"), http={"rate_limit_per_s": 20.0})
    )
    assert provider.http.limiter.rate_per_s == 20.0  # the setting reaches the limiter
    frozen = FrozenTime()
    provider.http.limiter = frozen.limiter(20.0)

    results = asyncio.run(lookups(provider, [company(f"rate{i}.com") for i in range(6)]))

    assert all(isinstance(r, ProviderAnswer) for r in results)
    # Six requests at once at 20/s: the first leaves now, the next five 50 ms apart.
    assert sorted(frozen.slept) == [0.05, 0.1, 0.15, 0.2, 0.25]


def test_token_bucket_allows_a_burst_then_spaces_requests_and_holds() -> None:
    now = [0.0]
    limiter = RateLimiter(10.0, burst=3, clock=lambda: now[0])

    assert [round(limiter.reserve(), 3) for _ in range(5)] == [0, 0, 0, 0.1, 0.2]
    now[0] = 10.0  # long idle: the bucket is full again
    assert limiter.reserve() == 0
    limiter.hold(1.0)  # a Retry-After pauses everyone
    assert limiter.reserve() == pytest.approx(1.0)


def test_parse_retry_after_reads_seconds_and_http_dates() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-3") == 0.0


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:8080", "https://api.example/v2/"])
@pytest.mark.parametrize(
    ("path", "params", "headers"),
    [
        ("/v1/companies", {"domain": "acme.com"}, {"Accept": "application/json"}),
        ("v1/people/J%C3%BCrgen", None, None),
        ("/v1/c", {"name": "Acme & Sons / é+x", "q": "a=b"}, {"X-Api-Key": "k", "user-agent": "u"}),
        ("/v1/c?fixed=1", {"more": "2"}, None),  # a query already there: httpx merges it
        ("https://elsewhere.example/abs", {"a": "b"}, None),
    ],
)
def test_requests_built_as_strings_match_what_httpx_builds(
    base_url: str, path: str, params: dict[str, str] | None, headers: dict[str, str] | None
) -> None:
    """The short way a request is built (skipping the client's merging) sends the very URL,
    headers (names in the caller's case, the caller's winning) and timeouts httpx would."""
    from glaze_pipeline.core.providers.http.client import _build_request, _Session

    http = ProviderClient("v", fast_http(), base_url=base_url)

    async def both() -> tuple[Any, Any]:
        session = _Session(http._open_client, 10)
        client = session.client()
        try:
            assert session.transport is not None  # the short way is taken
            ours = _build_request(session, client, "GET", path, params, None, headers)
            theirs = client.build_request("GET", path, params=params, headers=dict(headers or {}))
            return ours, theirs
        finally:
            await session.aclose()

    ours, theirs = asyncio.run(both())
    assert str(ours.url) == str(theirs.url)
    assert sorted(ours.headers.raw) == sorted(theirs.headers.raw)
    assert ours.extensions == theirs.extensions


# --- event loops and connections ----------------------------------------------------------------


def test_one_event_loop_per_chunk_works_and_leaks_no_connection(
    mock: MockProviderServer,
) -> None:
    provider = JsonApiProvider(company_vendor(mock.vendor_url("premium")))

    # The engine runs each chunk under its own asyncio.run; the provider outlives them all.
    for chunk in range(3):
        key = company(f"chunk{chunk}.com")
        answer = asyncio.run(provider.lookup(key, frozenset({"name"})))  # no session on purpose
        assert answer.values["name"] == fake_value(key, "name")

    # No session: each call had a client of its own, closed as the call returned.
    assert wait_until(lambda: mock.open_connections() == 0)
    assert provider.http.open_clients == 0
    assert provider.http.stats.attempts == 3


def test_provider_session_closes_clients_inside_the_loop(mock: MockProviderServer) -> None:
    provider = JsonApiProvider(company_vendor(mock.vendor_url("premium")))

    async def run() -> tuple[int, int]:
        async with provider_session([provider]):
            await provider.lookup(company("session.com"), frozenset({"name"}))
            during = provider.http.open_clients
        return during, provider.http.open_clients

    during, after = asyncio.run(run())

    assert (during, after) == (1, 0)
    assert wait_until(lambda: mock.open_connections() == 0)


# --- secrets ------------------------------------------------------------------------------------


def test_api_key_never_appears_in_logs_reprs_or_errors(
    mock: MockProviderServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    config = company_vendor(
        mock.vendor_url("premium"),
        auth={"header": "X-Api-Key", "env": KEY_ENV},
        http={"retries": 1, "breaker_threshold": 3},
    )
    provider = JsonApiProvider(config)
    # Set after the provider is built: the key is read at call time.
    monkeypatch.setenv(KEY_ENV, SECRET)
    configure_vendor(mock, "premium", api_key=SECRET)

    answer = asyncio.run(lookup(provider, company("keyed.com"), {"name"}))
    assert answer.values["name"]  # the vendor checked the key, so it was sent

    errors: list[ProviderError] = []
    configure_vendor(mock, "premium", api_key="a-different-key")
    with pytest.raises(FatalProviderError) as refused:
        asyncio.run(lookup(provider, company("refused.com"), {"name"}))
    errors.append(refused.value)
    configure_vendor(mock, "premium", api_key=SECRET, error_rate=1.0)
    with pytest.raises(TransientProviderError) as broken:
        asyncio.run(lookup(provider, company("broken.com"), {"name"}))
    errors.append(broken.value)
    (outcome,), _ = asyncio.run(
        run_waterfall(
            [provider], [EntityRequest(company("w.com"), frozenset({"name"}))], Budget(None)
        )
    )
    with pytest.raises(ProviderUnavailable) as skipped:
        asyncio.run(lookup(provider, company("skipped.com"), {"name"}))
    errors.append(skipped.value)

    texts = [
        caplog.text,
        *(str(error) for error in errors),
        *(repr(error) for error in errors),
        *(f.error or "" for f in outcome.fields.values()),
        repr(provider),
        repr(provider.config),
        repr(provider.http),
        provider.config.model_dump_json(),
        str(provider.health()),
        json.dumps([d.as_dict() for d in describe_providers([provider])]),
    ]
    # The logs were live, and at DEBUG (the client says so of each failed attempt).
    assert "attempt 1 of" in caplog.text
    assert "401" in str(refused.value)
    for text in texts:
        assert SECRET not in text


def test_missing_api_key_is_fatal_and_names_the_variable(
    mock: MockProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    provider = JsonApiProvider(
        company_vendor(mock.vendor_url("premium"), auth={"header": "X-Api-Key", "env": KEY_ENV})
    )
    with pytest.raises(CredentialsMissing, match=KEY_ENV) as missing:
        asyncio.run(lookup(provider, company("nokey.com"), {"name"}))
    assert isinstance(missing.value, FatalProviderError) and missing.value.sent is False
    assert mock.stats()["requests"] == 0  # nothing sent without a key


# --- did a request leave the machine? ------------------------------------------------------------


def test_each_error_class_says_whether_its_errors_were_sent() -> None:
    sent = [EntityNotFound, RateLimited, TransientProviderError, BadResponse, FatalProviderError]
    refused_here = [
        ProviderUnavailable,
        UnsupportedLookup,
        AddressRefused,
        CredentialsMissing,
        Unreachable,
    ]
    assert ProviderError.sent is True
    assert all(kind.sent is True for kind in sent)
    assert all(kind.sent is False for kind in refused_here)
    assert all(kind("x").sent is kind.sent for kind in sent + refused_here)


async def _error_of(provider: JsonApiProvider, key: EntityKey) -> ProviderError:
    async with provider_session([provider]):
        try:
            await provider.lookup(key, frozenset({"name"}))
        except ProviderError as error:
            return error
    raise AssertionError(f"{key} was answered")


def test_refusals_on_our_side_are_not_sent_and_vendor_errors_are(
    mock: MockProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyed = JsonApiProvider(
        company_vendor(
            mock.vendor_url("premium"),
            auth={"header": "X-Api-Key", "env": KEY_ENV},
            http={"retries": 0, "breaker_threshold": 2, "breaker_cooldown_s": 30},
        )
    )

    def sent_now(key: EntityKey) -> tuple[type[ProviderError], bool, int]:
        """The error's class, its `sent`, and how many requests the mock has seen so far."""
        error = asyncio.run(_error_of(keyed, key))
        return type(error), error.sent, mock.stats()["requests"]

    monkeypatch.delenv(KEY_ENV, raising=False)
    assert sent_now(company("a.com")) == (CredentialsMissing, False, 0)
    monkeypatch.setenv(KEY_ENV, "sk-right-key-1111")
    configure_vendor(mock, "premium", api_key="sk-right-key-1111", not_found_rate=1.0)
    person = EntityKey(EntityType.PERSON, "email", "ada@example.com")
    assert sent_now(person) == (UnsupportedLookup, False, 0)
    assert sent_now(company("b.com")) == (EntityNotFound, True, 1)
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-0000")
    assert sent_now(company("c.com")) == (FatalProviderError, True, 2)  # 401: failure 1
    monkeypatch.setenv(KEY_ENV, "sk-right-key-1111")
    configure_vendor(mock, "premium", not_found_rate=0.0, mode="error")
    assert sent_now(company("d.com")) == (TransientProviderError, True, 3)  # failure 2: open
    assert sent_now(company("e.com")) == (ProviderUnavailable, False, 3)
    assert keyed.http.stats.attempts == 3


def test_a_missing_key_never_opens_the_circuit(
    mock: MockProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run: the key unset, five failures opened the breaker, and every later cell
    # read "circuit open ... API key missing". A key refused on our side says nothing of the
    # vendor's health.
    monkeypatch.delenv(KEY_ENV, raising=False)
    provider = JsonApiProvider(
        company_vendor(
            mock.vendor_url("premium"),
            auth={"header": "X-Api-Key", "env": KEY_ENV},
            http={"breaker_threshold": 2},
        )
    )
    errors = [asyncio.run(_error_of(provider, company(f"k{i}.com"))) for i in range(5)]

    assert {type(error) for error in errors} == {CredentialsMissing}
    health = provider.health()
    assert (health.circuit, health.consecutive_failures, health.attempts) == ("closed", 0, 0)
    assert provider.unavailable_reason() == (
        f"API key missing: set the environment variable {KEY_ENV}"
    )

    monkeypatch.setenv(KEY_ENV, "sk-now-set-2222")
    assert provider.unavailable_reason() is None
    assert asyncio.run(lookup(provider, company("k9.com"), {"name"})).values["name"]
    assert mock.stats()["requests"] == 1


def test_a_request_that_cannot_be_built_or_sent_is_not_sent(mock: MockProviderServer) -> None:
    client = ProviderClient("raw_client", fast_http(retries=2), base_url=mock.vendor_url("cheap"))

    async def error_of(url: str, headers: dict[str, str] | None = None) -> ProviderError:
        async with provider_session([client]):
            try:
                await client.fetch("GET", url, headers=headers)
            except ProviderError as error:
                return error
        raise AssertionError("sent")

    unbuildable = asyncio.run(error_of("http://[::1"))  # not a URL httpx can parse
    unsendable = asyncio.run(error_of("/v1/companies", {"X-Token": "bad\nvalue"}))
    unspoken = asyncio.run(error_of("ftp://127.0.0.1/file"))

    for error, said in (
        (unbuildable, "cannot build"),
        (unsendable, "cannot send"),
        (unspoken, "cannot send"),
    ):
        assert isinstance(error, FatalProviderError) and said in str(error)
        assert error.sent is False
    assert mock.stats()["requests"] == 0
    assert client.stats.retries == 0  # refused once, not retried


PUBLIC_STAND_IN = "127.0.0.2"  # plays a public web server; every other address is judged


def _public_stand_in(address: IPAddress) -> str | None:
    return None if str(address) == PUBLIC_STAND_IN else address_refusal(address)


def test_a_refusal_on_a_redirect_hop_was_sent_and_one_on_the_first_hop_was_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with LoopbackSite("127.0.0.1") as internal:
        pages = {"/": Page(302, "", {"Location": f"http://localhost:{internal.port}/admin"})}
        with LoopbackSite(PUBLIC_STAND_IN, pages=pages) as shop:
            fake_dns(monkeypatch, {"www.shop.com": PUBLIC_STAND_IN, "intranet.com": "127.0.0.1"})

            def site(port: int) -> WebsiteProvider:
                config = WebsiteConfig(
                    url_template=f"http://{{domain}}:{port}/",
                    http={**fast_http(retries=0, max_redirects=3).model_dump()},
                )
                return WebsiteProvider(config, egress=EgressGuard(classify=_public_stand_in))

            async def refusal(provider: WebsiteProvider, domain: str) -> ProviderError:
                async with provider_session([provider]):
                    try:
                        await provider.lookup(company(domain), provider.fields)
                    except ProviderError as error:
                        return error
                raise AssertionError("fetched")

            first_hop = asyncio.run(refusal(site(internal.port), "intranet.com"))
            redirected = asyncio.run(refusal(site(shop.port), "www.shop.com"))

        assert isinstance(first_hop, AddressRefused) and first_hop.sent is False
        assert isinstance(redirected, AddressRefused) and redirected.sent is True
        assert "(after 1 redirect)" in str(redirected)
        assert [path for path, _ in shop.requests] == ["/"]  # the homepage request went out
        assert internal.requests == []


# --- nothing leaves the machine ---------------------------------------------------------------


def _host(host: Any) -> str:
    return host.decode() if isinstance(host, bytes) else str(host)


def _loopback(host: Any) -> bool:
    text = _host(host)
    return text in ("127.0.0.1", "::1", "localhost") or text.startswith("127.")


def test_no_request_leaves_the_machine(
    mock: MockProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbound: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _loopback(host):
            outbound.append(f"resolve {_host(host)}")
            raise socket.gaierror(socket.EAI_NONAME, "blocked by the egress guard")
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded_connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            outbound.append(f"connect {_host(address[0])}")
            raise ConnectionRefusedError("blocked by the egress guard")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setenv("GLAZE_MOCK_PROVIDERS_URL", mock.url)
    monkeypatch.setenv("GLAZE_PREMIUM_API_KEY", "anything")

    # The seed vendors, the website provider and the waterfall, as a job would run them.
    providers = load_providers(Path(__file__).resolve().parent.parent / "seed/providers.mock.yaml")
    site = WebsiteConfig(url_template=f"{mock.url}/site/{{domain}}/", allow_private_networks=True)
    providers.append(WebsiteProvider(site))
    requests = [
        EntityRequest(company(f"egress{i}.com"), frozenset({"name", "industry", "phone"}))
        for i in range(5)
    ]
    requests.append(
        EntityRequest(EntityKey(EntityType.PERSON, "email", "ada@egress.com"), frozenset({"title"}))
    )
    outcomes, waterfall = asyncio.run(run_waterfall(providers, requests, Budget(None)))

    assert outbound == []
    assert mock.stats()["requests"] >= len(requests)
    assert all(f.status is CellStatus.DONE for o in outcomes for f in o.fields.values())
    assert set(waterfall.stats.calls) >= {"website", "cheap_company", "people_vendor"}

    # Control: the guard does catch a vendor off the machine (so the check above means something).
    remote = JsonApiProvider(company_vendor("http://api.vendor.invalid", http={"retries": 0}))
    with pytest.raises(TransientProviderError, match="connection failed"):
        asyncio.run(lookup(remote, company("remote.com"), {"name"}))
    assert outbound == ["resolve api.vendor.invalid"]


def test_settings_defaults_identify_the_bot() -> None:
    settings = fast_http()
    assert settings.user_agent == "GlazeBot/0.1 (+https://glaze.dev/bot)"
    assert settings.trust_env is False  # no proxy or .netrc from the environment
