"""The mock provider server itself: deterministic data, billing, knobs, clean shutdown."""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from glaze_pipeline.core.fields import CATALOGUE
from glaze_pipeline.core.models import EntityKey, EntityType
from glaze_pipeline.core.providers.fake import fake_value
from glaze_pipeline.testing.mock_server import (
    COMPANY_LAYOUT,
    LAYOUTS,
    PERSON_LAYOUT,
    Latency,
    MockConfig,
    MockProviderServer,
    VendorConfig,
    is_miss,
    record_for,
)
from glaze_pipeline_tests.provider_helpers import wait_until


def vendors() -> dict[str, VendorConfig]:
    return {
        "cheap": VendorConfig(
            entity_type=EntityType.COMPANY,
            fields=["name", "industry"],
            cost_per_call=1.0,
            not_found_rate=0.5,
        ),
        "premium": VendorConfig(
            entity_type=EntityType.COMPANY, cost_per_call=10.0, charges_misses=True
        ),
        "people": VendorConfig(entity_type=EntityType.PERSON, cost_per_call=3.0),
    }


@pytest.fixture(scope="module")
def mock_server() -> Iterator[MockProviderServer]:
    with MockProviderServer(MockConfig(vendors=vendors(), hang_s=30.0)) as server:
        yield server


@pytest.fixture
def mock(mock_server: MockProviderServer) -> Iterator[MockProviderServer]:
    mock_server.reset(config=True)
    yield mock_server


@pytest.fixture
def http(mock: MockProviderServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mock.url, timeout=5.0) as client:
        yield client


def test_company_answers_are_seed_values_for_the_entity(http: httpx.Client) -> None:
    key = EntityKey(EntityType.COMPANY, "domain", "acme.com")

    first = http.get("/premium/v1/companies", params={"domain": "ACME.com"}).json()
    again = http.get("/premium/v1/companies", params={"domain": "acme.com"}).json()

    assert first == again
    assert first["company"]["industry"] == fake_value(key, "industry")
    assert first["company"]["metrics"]["employees"] == fake_value(key, "employee_count")
    assert first["company"] == record_for(key)


def test_person_lookup_by_name_and_company(http: httpx.Client) -> None:
    key = EntityKey(EntityType.PERSON, "name_company", "ada lovelace|acme.com")
    body = http.get("/people/v1/people", params={"name": "ada lovelace", "company": "acme.com"})
    assert body.json()["person"]["job"]["title"] == fake_value(key, "title")
    assert http.get("/people/v1/people").status_code == 400  # no identifier


def test_cheap_vendor_returns_only_its_fields(http: httpx.Client) -> None:
    domain = next(
        d
        for d in (f"d{i}.com" for i in range(100))
        if not is_miss("cheap", EntityKey(EntityType.COMPANY, "domain", d), 0.5)
    )
    record = http.get("/cheap/v1/companies", params={"domain": domain}).json()["company"]
    assert set(record) == {"name", "industry"}


def test_misses_are_deterministic_by_identifier(http: httpx.Client) -> None:
    domains = [f"m{i}.com" for i in range(40)]
    first = [http.get("/cheap/v1/companies", params={"domain": d}).status_code for d in domains]
    second = [http.get("/cheap/v1/companies", params={"domain": d}).status_code for d in domains]
    assert first == second
    assert set(first) == {200, 404}
    for domain, status in zip(domains, first, strict=True):
        expected = is_miss("cheap", EntityKey(EntityType.COMPANY, "domain", domain), 0.5)
        assert (status == 404) == expected


def test_billing_counts_found_and_charged_misses_only(
    mock: MockProviderServer, http: httpx.Client
) -> None:
    mock.configure({"vendors": {"premium": {"not_found_rate": 0.5}}})
    statuses = [
        http.get("/premium/v1/companies", params={"domain": f"b{i}.com"}).status_code
        for i in range(10)
    ]
    http.get("/premium/v1/companies", params={"domain": "x.com", "_mode": "error"})
    http.get("/premium/v1/companies", params={"domain": "x.com", "_mode": "rate_limited"})

    premium = http.get("/_stats").json()["vendors"]["premium"]
    assert premium["requests"] == 12
    assert premium["billed"] == 10  # premium charges misses; the 500 and the 429 are free
    assert premium["cost"] == 100.0
    assert premium["statuses"]["500"] == 1 and premium["statuses"]["429"] == 1
    assert premium["statuses"].get("404", 0) == statuses.count(404)

    assert http.post("/_reset").json()["requests"] == 0
    assert mock.stats()["cost"] == 0


def test_batch_endpoint_answers_found_and_lists_misses(http: httpx.Client) -> None:
    domains = [f"batch{i}.com" for i in range(20)]
    body = http.post("/cheap/v1/companies/batch", json={"domains": domains}).json()

    found = {item["query"] for item in body["results"]}
    assert found | set(body["not_found"]) == set(domains)
    assert found.isdisjoint(body["not_found"])
    cheap = http.get("/_stats").json()["vendors"]["cheap"]
    assert cheap["requests"] == 1 and cheap["entities"] == 20
    assert cheap["cost"] == len(found) * 1.0  # cheap does not charge misses

    assert http.post("/cheap/v1/companies/batch", json={"ids": domains}).status_code == 400


def test_stats_count_batch_requests_apart_and_lookups_per_entity(http: httpx.Client) -> None:
    http.get("/premium/v1/companies", params={"domain": "single.com"})
    http.post("/premium/v1/companies/batch", json={"domains": ["a.com", "b.com", "c.com"]})
    http.post(
        "/premium/v1/companies/batch",
        params={"_mode": "error"},
        json={"domains": ["d.com", "e.com"]},
    )

    stats = http.get("/_stats").json()
    premium = stats["vendors"]["premium"]
    # The existing keys keep their meaning: HTTP requests; entities of answered requests.
    assert (premium["requests"], premium["entities"]) == (3, 4)
    # Batches apart: 2 batch requests asking about 5 entities (the failed one's 2 included);
    # lookups per entity, as a caller counts calls: 1 single + 5 in batches.
    assert (premium["batch_requests"], premium["batch_entities"], premium["lookups"]) == (2, 5, 6)
    assert (premium["billed"], premium["cost"]) == (4, 40.0)  # the failed batch is free
    assert (stats["batch_requests"], stats["lookups"]) == (2, 6)


def test_config_endpoint_switches_behaviour_and_rejects_nonsense(http: httpx.Client) -> None:
    changed = http.post("/_config", json={"vendors": {"premium": {"mode": "garbage"}}})
    assert changed.status_code == 200
    assert changed.json()["vendors"]["premium"]["mode"] == "garbage"
    garbage = http.get("/premium/v1/companies", params={"domain": "a.com"})
    assert garbage.status_code == 200
    with pytest.raises(ValueError):
        garbage.json()

    assert http.post("/_config", json={"vendors": {"premium": {"mode": "x"}}}).status_code == 400
    assert http.post("/_config", json=[1, 2]).status_code == 400
    http.post("/_reset", params={"config": "1"})
    assert http.get("/premium/v1/companies", params={"domain": "a.com"}).json()["company"]


def test_rate_limited_answers_carry_retry_after(http: httpx.Client) -> None:
    http.post("/_config", json={"vendors": {"people": {"rate_limit_rate": 1.0}}})
    response = http.get("/people/v1/people", params={"email": "a@b.com"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"


def test_api_key_is_checked_when_configured(http: httpx.Client) -> None:
    http.post("/_config", json={"vendors": {"premium": {"api_key": "k1"}}})
    params = {"domain": "a.com"}
    assert http.get("/premium/v1/companies", params=params).status_code == 401
    ok = http.get("/premium/v1/companies", params=params, headers={"X-Api-Key": "k1"})
    assert ok.status_code == 200


def test_health_probes_are_free_and_counted_apart_from_requests(
    mock: MockProviderServer, http: httpx.Client
) -> None:
    http.post("/_config", json={"vendors": {"premium": {"error_rate": 1.0}}})
    answers = [http.get("/premium/v1/health") for _ in range(3)]
    http.get("/premium/v1/companies", params={"domain": "a.com"})  # one lookup (a 500)
    http.get("/cheap/v1/health")

    # The rates are a lookup's bad luck, not the vendor's health: every probe answers.
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].json() == {"ok": True, "vendor": "premium"}
    stats = http.get("/_stats").json()
    premium, cheap = stats["vendors"]["premium"], stats["vendors"]["cheap"]
    assert (premium["requests"], premium["probes"], premium["entities"]) == (1, 3, 1)
    assert premium["billed"] == 0 and premium["statuses"] == {"500": 1}
    assert (cheap["requests"], cheap["probes"], cheap["entities"], cheap["billed"]) == (0, 1, 0, 0)
    assert (stats["requests"], stats["probes"], stats["cost"]) == (1, 4, 0)

    mock.reset()
    assert mock.stats()["probes"] == 0


def test_health_probes_check_the_key_and_follow_the_vendors_mode(http: httpx.Client) -> None:
    http.post("/_config", json={"vendors": {"premium": {"api_key": "k1"}}})
    assert http.get("/premium/v1/health").status_code == 401
    assert http.get("/premium/v1/health", headers={"X-Api-Key": "wrong"}).status_code == 401
    assert http.get("/premium/v1/health", headers={"X-Api-Key": "k1"}).status_code == 200

    expected = {"error": 500, "unauthorized": 401, "rate_limited": 429, "normal": 200}
    for mode, status in expected.items():
        http.post("/_config", json={"vendors": {"cheap": {"mode": mode}}})
        assert http.get("/cheap/v1/health").status_code == status, mode

    assert http.get("/nobody/v1/health").status_code == 404
    assert http.get("/_stats").json()["requests"] == 0  # all of it was probes


def test_wrong_vendor_or_endpoint_is_a_client_error(http: httpx.Client) -> None:
    assert http.get("/nobody/v1/companies", params={"domain": "a.com"}).status_code == 400
    assert http.get("/people/v1/companies", params={"domain": "a.com"}).status_code == 400


def test_latency_distributions() -> None:
    rng = random.Random(7)
    fixed = Latency(kind="fixed", mean_ms=25)
    assert fixed.sample(rng) == 0.025
    uniform = [Latency(kind="uniform", min_ms=10, max_ms=20).sample(rng) for _ in range(2000)]
    assert min(uniform) >= 0.010 and max(uniform) <= 0.020
    lognormal = [
        Latency(kind="lognormal", mean_ms=100, sigma=0.5).sample(rng) for _ in range(20000)
    ]
    assert statistics.fmean(lognormal) == pytest.approx(0.100, rel=0.05)
    assert max(lognormal) > 0.2  # a long tail, unlike the fixed latency


def test_latency_is_applied(mock: MockProviderServer, http: httpx.Client) -> None:
    mock.configure({"vendors": {"premium": {"latency": {"kind": "fixed", "mean_ms": 150}}}})
    started = time.perf_counter()
    http.get("/premium/v1/companies", params={"domain": "a.com"})
    assert time.perf_counter() - started >= 0.15


def test_server_stops_promptly_with_a_request_hanging() -> None:
    server = MockProviderServer(MockConfig(vendors=vendors(), hang_s=60.0)).start()
    statuses: list[int] = []

    def hang() -> None:
        with httpx.Client(base_url=server.url, timeout=10.0) as client:
            params = {"domain": "a.com", "_mode": "hang"}
            statuses.append(client.get("/premium/v1/companies", params=params).status_code)

    caller = threading.Thread(target=hang)
    caller.start()
    assert wait_until(lambda: server.stats()["vendors"].get("premium", {}).get("in_flight") == 1)
    started = time.perf_counter()
    server.stop()
    caller.join(5)

    assert time.perf_counter() - started < 3.0
    assert statuses == [503]  # woken by the shutdown and answered, not cut off


def test_vendor_records_lay_out_exactly_the_catalogue() -> None:
    # Read from the catalogue: a field added there is served, at the top of the record.
    for entity_type, layout in LAYOUTS.items():
        assert set(layout) == CATALOGUE[entity_type]
    assert COMPANY_LAYOUT == {
        "name": "name",
        "domain": "domain",
        "description": "description",
        "industry": "industry",
        "employee_count": "metrics.employees",
        "revenue": "metrics.revenue",
        "location": "hq.location",
        "founded_year": "founded",
        "linkedin_url": "social.linkedin",
        "phone": "phone",
    }
    assert PERSON_LAYOUT == {
        "full_name": "full_name",
        "title": "job.title",
        "company": "job.company",
        "email": "contact.email",
        "phone": "contact.phone",
        "linkedin_url": "linkedin_url",
        "location": "location",
        "bio": "bio",
    }
    key = EntityKey(EntityType.PERSON, "email", "ada@acme.com")
    assert record_for(key)["contact"] == {
        "email": fake_value(key, "email"),
        "phone": fake_value(key, "phone"),
    }
