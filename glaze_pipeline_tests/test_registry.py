"""Providers from YAML: the bundled default, the mock vendors' file, and bad files."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from glaze_pipeline.core.budget import Budget
from glaze_pipeline.core.fields import CATALOGUE, COMPANY_FIELDS, PERSON_FIELDS
from glaze_pipeline.core.models import CellStatus, EntityKey, EntityRequest, EntityType
from glaze_pipeline.core.providers.base import Provider, Verdict
from glaze_pipeline.core.providers.fake import FakeConfig, FakeProvider, fake_value
from glaze_pipeline.core.providers.json_api import (
    RECORDS,
    JsonApiConfig,
    JsonApiProvider,
)
from glaze_pipeline.core.providers.registry import (
    PROVIDER_KINDS,
    PROVIDERS_FILE_ENV,
    ProviderConfigError,
    build_provider,
    describe_providers,
    load_providers,
    parse_providers,
    providers_file,
)
from glaze_pipeline.core.providers.website import WebsiteConfig, WebsiteProvider
from glaze_pipeline.testing.mock_server import MockConfig, MockProviderServer
from glaze_pipeline_tests.provider_helpers import run_waterfall

REPO = Path(__file__).resolve().parent.parent
MOCK_FILE = REPO / "seed" / "providers.mock.yaml"


@pytest.fixture
def mock_server() -> Iterator[MockProviderServer]:
    with MockProviderServer(MockConfig()) as server:  # the default vendors, as `glaze` runs them
        yield server


def by_name(providers: list[Provider]) -> dict[str, Provider]:
    return {provider.name: provider for provider in providers}


def test_bundled_default_is_the_two_fake_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROVIDERS_FILE_ENV, raising=False)

    providers = by_name(load_providers())

    assert set(providers) == {"fake_company", "fake_person"}
    assert all(isinstance(p, FakeProvider) for p in providers.values())
    assert providers["fake_company"].entity_type is EntityType.COMPANY
    assert providers["fake_person"].fields == CATALOGUE[EntityType.PERSON]
    assert providers_file().name == "providers.yaml" and providers_file().is_file()


def test_environment_variable_is_read_at_call_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(
        "providers:\n"
        "  - {kind: fake, name: only_people, entity_type: person, cost_per_call: 2.5,"
        " fields: [title]}\n"
    )
    monkeypatch.setenv(PROVIDERS_FILE_ENV, str(path))

    (provider,) = load_providers()

    assert provider.name == "only_people" and provider.cost_per_call == 2.5
    assert provider.fields == frozenset({"title"})
    assert "cheap_company" in {p.name for p in load_providers(MOCK_FILE)}  # a path wins


def test_mock_vendor_file_loads_three_vendors_with_website_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GLAZE_MOCK_PROVIDERS_URL", "http://127.0.0.1:9999")

    providers = by_name(load_providers(MOCK_FILE))

    assert set(providers) == {"cheap_company", "premium_company", "people_vendor"}
    premium = providers["premium_company"]
    assert isinstance(premium, JsonApiProvider)
    assert premium.config.base_url == "http://127.0.0.1:9999/premium"
    assert premium.config.auth is not None and premium.config.auth.env == "GLAZE_PREMIUM_API_KEY"
    assert (premium.cost_per_call, premium.charges_misses) == (10.0, True)
    assert providers["people_vendor"].entity_type is EntityType.PERSON

    monkeypatch.delenv("GLAZE_MOCK_PROVIDERS_URL")
    cheap = by_name(load_providers(MOCK_FILE))["cheap_company"]
    assert isinstance(cheap, JsonApiProvider)
    assert cheap.config.base_url == "http://127.0.0.1:8765/cheap"  # the default


def test_mock_vendor_file_enriches_through_the_mock_server_and_costs_agree(
    mock_server: MockProviderServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GLAZE_MOCK_PROVIDERS_URL", mock_server.url)
    monkeypatch.setenv("GLAZE_PREMIUM_API_KEY", "dev-key")
    # The same file with the website provider switched on.
    text = MOCK_FILE.read_text().replace("enabled: false", "enabled: true", 1)
    (tmp_path / "providers.yaml").write_text(text)
    providers = load_providers(tmp_path / "providers.yaml")
    assert any(isinstance(p, WebsiteProvider) for p in providers)

    requests = [
        EntityRequest(
            EntityKey(EntityType.COMPANY, "domain", f"co{i}.com"),
            frozenset({"name", "industry", "revenue"}),
        )
        for i in range(12)
    ] + [
        EntityRequest(EntityKey(EntityType.PERSON, "email", f"p{i}@co.com"), frozenset({"title"}))
        for i in range(6)
    ]
    budget = Budget(None)

    outcomes, waterfall = asyncio.run(run_waterfall(providers, requests, budget))

    statuses = {f.status for o in outcomes for f in o.fields.values()}
    assert statuses <= {CellStatus.DONE, CellStatus.NOT_FOUND}
    assert CellStatus.DONE in statuses
    # What we think we spent is what the vendors billed us.
    billed = mock_server.stats()["vendors"]
    vendor_of = {"cheap_company": "cheap", "premium_company": "premium", "people_vendor": "people"}
    for name, vendor in vendor_of.items():
        assert waterfall.stats.cost.get(name, 0.0) == pytest.approx(billed[vendor]["cost"])
    assert budget.spent == pytest.approx(mock_server.stats()["cost"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("providers: [{kind: carrier_pigeon, name: x}]", "kind"),
        (
            "providers: [{kind: fake, name: a, entity_type: company},"
            " {kind: fake, name: a, entity_type: person}]",
            "repeated: ['a']",
        ),
        ("providers: [{kind: fake, name: a, entity_type: company, fields: [title]}]", "title"),
        (
            "providers: [{kind: json_api, name: v, entity_type: company, base_url: 'http://x',"
            " lookups: {domain: {path: '/c/{nope}'}}, fields: {name: name}}]",
            "unknown placeholders ['nope']",
        ),
        (
            "providers: [{kind: json_api, name: v, entity_type: person, base_url: 'http://x',"
            " lookups: {domain: {path: '/p'}}, fields: {full_name: n}}]",
            "cannot look up a person by 'domain'",
        ),
        (
            "providers: [{kind: json_api, name: v, entity_type: company, base_url: '${NO_SUCH_VAR}',"
            " lookups: {domain: {path: '/c'}}, fields: {name: name}}]",
            "NO_SUCH_VAR is not set",
        ),
        ("providers: {not: a list}", "providers"),
        ("- just a list", "must be a mapping"),
        ("providers: [unclosed", "not valid YAML"),
    ],
)
def test_bad_files_fail_with_a_message_that_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    monkeypatch.delenv("NO_SUCH_VAR", raising=False)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ProviderConfigError) as caught:
        load_providers(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ProviderConfigError, match="cannot read providers file"):
        load_providers(tmp_path / "nope.yaml")


def test_describe_providers_lists_price_fields_and_health(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLAZE_MOCK_PROVIDERS_URL", "http://127.0.0.1:9999")
    providers = load_providers(MOCK_FILE) + load_providers(None)

    described = {d.name: d for d in describe_providers(providers)}

    premium = described["premium_company"]
    assert premium.entity_type == "company" and premium.kind == "json_api"
    assert premium.cost_per_call == 10.0 and premium.charges_misses is True
    assert "founded_year" in premium.fields
    assert premium.health == "ok" and premium.circuit == "closed" and premium.attempts == 0
    assert described["fake_company"].health == "ok (in process)"
    order = [d.name for d in describe_providers(providers)]
    assert order.index("cheap_company") < order.index("premium_company")  # cheapest first


def test_every_mock_vendor_declares_its_free_health_endpoint() -> None:
    vendors = [p for p in load_providers(MOCK_FILE) if isinstance(p, JsonApiProvider)]
    assert len(vendors) == 3
    for vendor in vendors:
        assert vendor.config.health is not None, vendor.name
        assert (vendor.config.health.path, vendor.config.health.timeout_s) == ("/v1/health", 2.0)


def test_describe_providers_carries_the_preflight_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLAZE_MOCK_PROVIDERS_URL", "http://127.0.0.1:9999")
    providers = load_providers(MOCK_FILE)
    verdicts = {
        "premium_company": Verdict("premium_company", False, "API key missing", ("credentials",)),
        "cheap_company": Verdict("cheap_company", True),
    }

    described = {d.name: d.as_dict() for d in describe_providers(providers, verdicts)}
    plain = {d.name: d.as_dict() for d in describe_providers(providers)}

    assert (described["premium_company"]["status"], described["premium_company"]["reason"]) == (
        "unavailable",
        "API key missing",
    )
    assert (described["cheap_company"]["status"], described["cheap_company"]["reason"]) == (
        "ok",
        None,
    )
    assert described["people_vendor"]["status"] is None  # no verdict given for it
    assert all(row["status"] is None and row["reason"] is None for row in plain.values())


def test_record_models_cover_the_whole_catalogue() -> None:
    # A field added to the catalogue must be added to the vendor record models too.
    for entity_type, record in RECORDS.items():
        assert set(record.model_fields) == CATALOGUE[entity_type]


def test_json_api_config_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="unknown company fields"):
        JsonApiConfig.model_validate(
            {
                "name": "v",
                "entity_type": "company",
                "base_url": "http://127.0.0.1:1",
                "lookups": {"domain": {"path": "/c"}},
                "fields": {"shoe_size": "x"},
            }
        )


def test_each_kind_is_declared_once_and_read_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_VAR", raising=False)
    assert [kind.name for kind in PROVIDER_KINDS] == ["fake", "json_api", "website"]
    with pytest.raises(ProviderConfigError) as caught:
        parse_providers({"providers": [{"kind": "carrier_pigeon", "name": "x"}]})
    assert "expected tags: 'fake', 'json_api', 'website'" in str(caught.value)

    entries = parse_providers(
        {
            "providers": [
                {"kind": "fake", "name": "f", "entity_type": "person", "fields": ["title"]},
                {
                    "kind": "website",
                    "allow_private_networks": True,
                    "url_template": "${NO_SUCH_VAR:-http://127.0.0.1:1}/site/{domain}/",
                    "site_urls": {"a.com": "${NO_SUCH_VAR:-http://127.0.0.1:2}/a/"},
                },
            ]
        }
    ).providers
    assert [type(entry) for entry in entries] == [FakeConfig, WebsiteConfig]
    fake, site = (build_provider(entry) for entry in entries)
    assert isinstance(fake, FakeProvider) and fake.fields == frozenset({"title"})
    assert isinstance(site, WebsiteProvider) and site.config is entries[1]
    # Each kind names its URL settings: filled from the environment at load.
    assert site.homepage_url("b.com") == "http://127.0.0.1:1/site/b.com/"
    assert site.homepage_url("a.com") == "http://127.0.0.1:2/a/"
    described = {d.name: d.kind for d in describe_providers([fake, site])}
    assert described == {"f": "fake", "website": "website"}


def test_record_models_take_their_value_types_from_the_catalogue() -> None:
    company = RECORDS[EntityType.COMPANY]
    assert company.__name__ == "CompanyRecord"  # as BadResponse messages name it
    record = company.model_validate({"name": "  Acme ", "employee_count": 12, "revenue": 5})
    assert record.model_dump(exclude_none=True) == {
        "name": "Acme",
        "employee_count": 12,
        "revenue": "5",
    }
    for bad in ({"employee_count": -1}, {"founded_year": 3000}, {"shoe_size": 4}):
        with pytest.raises(ValidationError):
            company.model_validate(bad)
    assert company.model_validate({"industry": "  "}).industry is None  # blank is missing


def test_fake_values_are_seed_001s() -> None:
    # The demos, the tests and the bench compare these: any change is a behaviour change.
    company = EntityKey(EntityType.COMPANY, "domain", "acme.com")
    assert {name: fake_value(company, name) for name in COMPANY_FIELDS} == {
        "name": "Fake Corp",
        "domain": "acme.com",
        "description": "This is a fake description of acme.com.",
        "industry": "Finance",
        "employee_count": 782,
        "revenue": "$20M",
        "location": "Austin, TX",
        "founded_year": 1996,
        "linkedin_url": "https://linkedin.com/company/fake-user-acme-com",
        "phone": "+1-555-7002",
    }
    person = EntityKey(EntityType.PERSON, "email", "x@y.com")
    assert {name: fake_value(person, name) for name in PERSON_FIELDS} == {
        "full_name": "Alex Fake",
        "title": "Sample Engineer",
        "email": "fake_x-y-com@example.com",
        "phone": "+1-555-1107",
        "linkedin_url": "https://linkedin.com/in/fake-user-x-y-com",
        "location": "London, UK",
        "bio": "This is a fake bio for x@y.com. They are a key decision maker.",
        "company": "Test Industries",
    }
    assert fake_value(company, "shoe_size") == "Enriched: shoe_size (acme.com)"


def test_each_kind_has_the_optional_capabilities_the_engine_uses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The waterfall, the engine, the estimate, preflight and `glaze providers` find a
    provider's optional capabilities by these protocols: each kind has the ones it means to."""
    from glaze_pipeline.core.ai.columns import ai_field
    from glaze_pipeline.core.detection import ColumnSpec
    from glaze_pipeline.core.providers import base
    from glaze_pipeline.core.providers.llm_column import ai_column_providers

    monkeypatch.setenv("GLAZE_MOCK_PROVIDERS_URL", "http://127.0.0.1:9999")
    text = MOCK_FILE.read_text().replace("enabled: false", "enabled: true", 1)
    (tmp_path / "providers.yaml").write_text(text)
    providers = load_providers(tmp_path / "providers.yaml")
    prompt = "Does {company} sell to enterprises?"
    providers += ai_column_providers(
        [ColumnSpec("col_1", "enterprise", ai_field(prompt), prompt=prompt)],
        None,
        problem="GLAZE_LLM_BASE_URL is not set",
    )
    providers.append(FakeProvider(EntityType.COMPANY))
    capabilities = (
        base.ChoosesKeys,
        base.NamesItsSource,
        base.KnowsWhenUnavailable,
        base.AlwaysAnswers,
        base.KeepsLlmCalls,
        base.ReportsHealth,
        base.ChecksItself,
        base.LooksUpMany,
    )
    found = {
        type(p).__name__: {c.__name__ for c in capabilities if isinstance(p, c)} for p in providers
    }
    http = {"ChoosesKeys", "KnowsWhenUnavailable", "ReportsHealth", "ChecksItself"}
    assert found == {
        "JsonApiProvider": http | {"LooksUpMany"},  # a batch endpoint, where configured
        "WebsiteProvider": http,
        "AiColumnProvider": {
            "NamesItsSource",
            "KnowsWhenUnavailable",
            "AlwaysAnswers",
            "KeepsLlmCalls",
            "ChecksItself",
        },
        "FakeProvider": set(),
    }
    # Not configured: the AI column's provider says why without a call; its preflight agrees.
    [ai] = [p for p in providers if type(p).__name__ == "AiColumnProvider"]
    assert isinstance(ai, base.KnowsWhenUnavailable)
    assert ai.unavailable_reason() == "GLAZE_LLM_BASE_URL is not set"
