"""The website provider: homepages served by the mock server over loopback HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from glaze_pipeline.core.budget import Budget
from glaze_pipeline.core.models import CellStatus, EntityKey, EntityRequest, EntityType
from glaze_pipeline.core.providers.base import (
    BadResponse,
    EntityNotFound,
    ProviderAnswer,
    TransientProviderError,
)
from glaze_pipeline.core.providers.fake import fake_value
from glaze_pipeline.core.providers.http import UnsupportedLookup, provider_session
from glaze_pipeline.core.providers.json_api import JsonApiProvider
from glaze_pipeline.core.providers.website import (
    WebsiteConfig,
    WebsiteProvider,
    parse_homepage,
)
from glaze_pipeline.testing.mock_server import (
    MockConfig,
    MockProviderServer,
    VendorConfig,
    site_facts,
)
from glaze_pipeline_tests.provider_helpers import (
    FAST_HTTP,
    company,
    company_vendor,
    run_waterfall,
)


@pytest.fixture(scope="module")
def mock_server() -> Iterator[MockProviderServer]:
    vendors = {"premium": VendorConfig(entity_type=EntityType.COMPANY, cost_per_call=10.0)}
    with MockProviderServer(MockConfig(vendors=vendors, site_not_found_rate=0.0)) as server:
        yield server


@pytest.fixture
def mock(mock_server: MockProviderServer) -> MockProviderServer:
    mock_server.reset(config=True)
    return mock_server


def website(mock: MockProviderServer, **overrides: object) -> WebsiteProvider:
    """The website provider on the mock's loopback homepages: the development setting on (the
    SSRF guard refuses loopback otherwise; see test_ssrf.py)."""
    http = {**FAST_HTTP, "max_redirects": 5, "max_body_bytes": 256 * 1024}
    config = {
        "url_template": f"{mock.url}/site/{{domain}}/",
        "http": http,
        "allow_private_networks": True,
        **overrides,
    }
    return WebsiteProvider(WebsiteConfig.model_validate(config))


async def fetch(provider: WebsiteProvider, key: EntityKey) -> ProviderAnswer:
    async with provider_session([provider]):
        return await provider.lookup(key, provider.fields)


def test_reads_name_description_linkedin_and_phone_from_the_homepage(
    mock: MockProviderServer,
) -> None:
    provider = website(mock)

    answer = asyncio.run(fetch(provider, company("acme.com")))

    facts = site_facts("acme.com")
    assert dict(answer.values) == {
        "name": facts["name"],
        "description": facts["description"],
        "linkedin_url": facts["linkedin_url"],
        "phone": facts["phone"],
    }
    assert (provider.cost_per_call, provider.charges_misses) == (0.0, False)
    assert provider.confidence == 0.6


def test_sends_a_clear_user_agent_and_follows_bounded_redirects(
    mock: MockProviderServer,
) -> None:
    provider = website(mock, site_urls={"hops.com": f"{mock.url}/site/hops.com/hop/3"})

    answer = asyncio.run(fetch(provider, company("hops.com")))

    assert answer.values["name"] == site_facts("hops.com")["name"]
    assert provider.http.stats.attempts == 4  # three redirects and the page
    site = mock.stats()["site"]
    assert site["statuses"] == {"302": 3, "200": 1}
    assert site["user_agents"] == {"GlazeBot/0.1 (+https://glaze.dev/bot)": 4}


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("hop/9", BadResponse, "more than 5 redirects"),
        ("?_mode=redirect_loop", BadResponse, "more than 5 redirects"),
        ("?_mode=huge", BadResponse, "over the 262144-byte limit"),
        ("?_mode=error", TransientProviderError, "HTTP 500"),
    ],
)
def test_misbehaving_sites_end_in_provider_errors(
    mock: MockProviderServer, path: str, error: type[Exception], message: str
) -> None:
    provider = website(mock, site_urls={"odd.com": f"{mock.url}/site/odd.com/{path}"})
    with pytest.raises(error, match=message):
        asyncio.run(fetch(provider, company("odd.com")))


def test_missing_homepage_is_not_found(mock: MockProviderServer) -> None:
    mock.configure({"site_not_found_rate": 1.0})
    with pytest.raises(EntityNotFound):
        asyncio.run(fetch(website(mock), company("gone.com")))


def test_only_company_domains_are_looked_up(mock: MockProviderServer) -> None:
    provider = website(mock)
    for key in (
        EntityKey(EntityType.COMPANY, "name", "acme"),
        EntityKey(EntityType.COMPANY, "domain", "evil.com/../../admin"),
        EntityKey(EntityType.PERSON, "email", "a@acme.com"),
    ):
        with pytest.raises(UnsupportedLookup):
            asyncio.run(fetch(provider, key))
    assert mock.stats()["requests"] == 0


def test_free_weak_website_answer_is_improved_by_a_paid_vendor(mock: MockProviderServer) -> None:
    site = website(mock)
    premium = JsonApiProvider(company_vendor(mock.vendor_url("premium")))
    key = company("layered.com")
    request = EntityRequest(key, frozenset({"name", "phone", "industry"}))
    budget = Budget(100.0)

    (outcome,), waterfall = asyncio.run(run_waterfall([premium, site], [request], budget))

    # Free first; its 0.6 is under the threshold, so premium is asked and its 0.95 wins.
    assert waterfall.stats.calls == {"website": 1, "premium_company": 1}
    for name, field_outcome in outcome.fields.items():
        assert field_outcome.status is CellStatus.DONE
        assert field_outcome.value is not None
        assert field_outcome.value.source == "premium_company"
        assert field_outcome.value.value == fake_value(key, name)
    assert budget.spent == 10.0


def test_website_answer_stands_when_the_threshold_allows(mock: MockProviderServer) -> None:
    site = website(mock)
    premium = JsonApiProvider(company_vendor(mock.vendor_url("premium")))
    request = EntityRequest(company("enough.com"), frozenset({"name", "phone"}))

    (outcome,), waterfall = asyncio.run(
        run_waterfall([premium, site], [request], Budget(100.0), threshold=0.5)
    )

    assert waterfall.stats.calls == {"website": 1}
    assert {f.value.source for f in outcome.fields.values() if f.value} == {"website"}
    assert outcome.fields["name"].value is not None
    assert outcome.fields["name"].value.confidence == pytest.approx(0.6)


# --- parsing (pure) -----------------------------------------------------------------------------


def test_parse_prefers_og_site_name_and_meta_description() -> None:
    facts = parse_homepage(
        """<html><head><title>Home - Acme &amp; Co</title>
        <meta property="og:site_name" content="Acme &amp; Co">
        <meta property="og:description" content="From OG">
        <meta name="Description" content="  Makes   anvils. ">
        </head><body>
        <a href="https://uk.linkedin.com/company/acme-co/about/">in</a>
        <a href="https://www.linkedin.com/in/someone">a person, not the company</a>
        <a href="MAILTO:Sales@Acme.com?subject=hi">mail</a>
        <a href="mailto:sales@acme.com">again</a>
        <a href="tel:+1%20555%200100">call</a>
        </body></html>"""
    )
    assert facts.name == "Acme & Co"
    assert facts.values() == {
        "name": "Acme & Co",
        "description": "Makes anvils.",
        "linkedin_url": "https://www.linkedin.com/company/acme-co",
        "phone": "+1 555 0100",
    }
    assert facts.emails == ["sales@acme.com"]


def test_parse_falls_back_to_title_and_og_description_and_survives_broken_html() -> None:
    facts = parse_homepage(
        "<title>Globex | Solutions</title><meta property='og:description' content='OG only'>"
    )
    assert facts.values() == {"name": "Globex", "description": "OG only"}

    broken = parse_homepage("<html><title>Unclosed <b>title <meta content=<<<")
    assert broken.name is not None and broken.name.startswith("Unclosed")
    assert parse_homepage("").values() == {}
    assert parse_homepage("\x00\xff<<>>&&;;").values() == {}
