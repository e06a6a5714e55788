"""Secrets never reach data or logs (issue 9, item 6).

Before: an API key with a trailing newline made httpx raise `Illegal header value b'sk-...\\n'`,
and that text, the key, was stored in `rows.meta[...].error`. Now a key is checked when it is
read (whitespace around it stripped; a control or non-ASCII character inside is a ConfigError
naming the provider and the variable, never the value), and every provider error is redacted
when it is made, whatever raised it: httpx, a vendor's body echoing the key, anything else.
Vendors here are loopback servers of the test's own (or the mock server), over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from dagster import DagsterInstance

from glaze_pipeline.core.budget import Budget
from glaze_pipeline.core.errors import ConfigError
from glaze_pipeline.core.models import CellStatus, EntityRequest
from glaze_pipeline.core.providers.base import CredentialsMissing, FatalProviderError, ProviderError
from glaze_pipeline.core.providers.http import ProviderClient, provider_session
from glaze_pipeline.core.providers.json_api import JsonApiConfig, JsonApiProvider
from glaze_pipeline.core.providers.registry import describe_providers, load_providers
from glaze_pipeline.core.redact import REDACTED, clean_secret, redact, register_secret
from glaze_pipeline.core.store import ColumnDef, Store
from glaze_pipeline.definitions import build_definitions
from glaze_pipeline_tests.provider_helpers import (
    LoopbackSite,
    Page,
    company,
    company_vendor,
    fast_http,
    run_waterfall,
)

KEY = "sk-live-4c8e2a9f71d3b6-DO-NOT-STORE"
KEY_ENV = "GLAZE_TEST_SECRET_KEY"
JSON = {"Content-Type": "application/json"}
FOUND = Page(200, json.dumps({"company": {"name": "Acme Corp"}}), JSON)


def echoing_401(key: str) -> Page:
    """What careless vendors do: quote the key they refused, in several spellings."""
    body = {"error": f"invalid API key: {key}", "sent": {"X-Api-Key": key}, "hint": repr(key)}
    return Page(401, json.dumps(body), JSON)


@pytest.fixture
def vendor() -> Iterator[LoopbackSite]:
    with LoopbackSite(default=FOUND) as site:
        yield site


def keyed_vendor_config(site: LoopbackSite) -> JsonApiConfig:
    return company_vendor(
        site.url,
        name="keyed_vendor",
        fields=["name"],
        auth={"header": "X-Api-Key", "env": KEY_ENV},
        http={"retries": 0, "breaker_threshold": 5},
    )


def keyed_vendor(site: LoopbackSite) -> JsonApiProvider:
    return JsonApiProvider(keyed_vendor_config(site))


def keyed_vendor_entry(site: LoopbackSite) -> dict[str, Any]:
    """The vendor as a providers-file entry."""
    return keyed_vendor_config(site).model_dump(mode="json")


def lookup_name(provider: JsonApiProvider) -> Any:
    async def go() -> Any:
        async with provider_session([provider]):
            return await provider.lookup(company("acme.com"), frozenset({"name"}))

    return asyncio.run(go())


# --- checked when loaded ------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [f"{KEY}\n", f"{KEY}\r\n", f"  {KEY}\t", f"\n{KEY}\n\n"])
def test_whitespace_around_a_key_is_stripped_and_the_key_works(
    vendor: LoopbackSite, monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    # `echo key > file` and friends: before, httpx refused the header and the cell got the key.
    monkeypatch.setenv(KEY_ENV, raw)
    answer = lookup_name(keyed_vendor(vendor))
    assert answer.values == {"name": "Acme Corp"}
    ((_, headers),) = vendor.requests
    assert headers["X-Api-Key"] == KEY


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        ("sk-live-ab\x07cd-0123456789", "a control character (U+0007) at position 11"),
        ("sk-live-ab\ncd-0123456789", "a control character (U+000A) at position 11"),
        ("sk-live-ab\x7fcd-0123456789", "a control character (U+007F) at position 11"),
        ("sk-live-abécd-0123456789", "a non-ASCII character at position 11"),
    ],
)
def test_a_key_with_a_bad_character_is_a_config_error_that_names_the_variable_not_the_key(
    vendor: LoopbackSite, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, raw: str, what: str
) -> None:
    monkeypatch.setenv(KEY_ENV, raw)
    expected = f"keyed_vendor: the API key in {KEY_ENV} has {what}; a key must be printable ASCII"

    # When the provider is built (here, as `load_providers` builds it from the file) ...
    path = tmp_path / "providers.yaml"
    path.write_text(json.dumps({"providers": [keyed_vendor_entry(vendor)]}))
    with pytest.raises(ConfigError) as at_load:
        load_providers(path)
    assert str(at_load.value) == expected

    # ... and when a lookup reads it (the variable changed after the providers were built).
    monkeypatch.setenv(KEY_ENV, KEY)
    provider = keyed_vendor(vendor)
    monkeypatch.setenv(KEY_ENV, raw)
    with pytest.raises(CredentialsMissing) as at_call:
        lookup_name(provider)
    assert str(at_call.value) == expected
    assert at_call.value.sent is False
    assert vendor.requests == []  # nothing sent with a key that cannot be sent
    # The preflight says the same, without the name in front, before any lookup is tried.
    verdict = asyncio.run(provider.preflight())
    assert (
        verdict.reason == provider.unavailable_reason() == expected.removeprefix("keyed_vendor: ")
    )
    assert vendor.requests == []

    for text in (str(at_load.value), repr(at_load.value), str(at_call.value)):
        assert raw not in text and raw.strip()[:12] not in text


def test_a_missing_key_still_fails_only_at_call_time(
    vendor: LoopbackSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    provider = keyed_vendor(vendor)  # no key yet: building is fine (set it before the run)
    monkeypatch.setenv(KEY_ENV, " \n")  # blank is missing too
    with pytest.raises(CredentialsMissing) as missing:
        lookup_name(provider)
    assert str(missing.value) == (
        f"keyed_vendor: API key missing: set the environment variable {KEY_ENV}"
    )
    assert isinstance(missing.value, FatalProviderError) and missing.value.sent is False
    assert vendor.requests == []


# --- redacted whatever raised it ----------------------------------------------------------------


def test_a_vendor_that_echoes_the_key_never_puts_it_in_a_cell_a_log_or_the_health(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    monkeypatch.setenv(KEY_ENV, KEY)
    with LoopbackSite(default=echoing_401(KEY)) as site:
        provider = keyed_vendor(site)
        request = EntityRequest(company("acme.com"), frozenset({"name"}))
        (outcome,), _ = asyncio.run(run_waterfall([provider], [request], Budget(None)))
        ((_, headers),) = site.requests

    assert headers["X-Api-Key"] == KEY  # the key was sent, and came back in the body
    cell = outcome.fields["name"]
    assert cell.status is CellStatus.FAILED
    assert cell.error is not None
    assert "refused (HTTP 401); check its API key" in cell.error
    assert f"invalid API key: {REDACTED}" in cell.error  # the vendor's words, without the key
    texts = [
        cell.error,
        caplog.text,
        str(provider.health()),
        json.dumps([d.as_dict() for d in describe_providers([provider])]),
    ]
    # The logs were live, at DEBUG for every logger (whatever the HTTP library traces).
    assert min(record.levelno for record in caplog.records) == logging.DEBUG
    for text in texts:
        assert KEY not in text


@pytest.mark.parametrize("transport", ["aiohttp", "httpcore"])
def test_an_illegal_header_error_is_redacted_registered_or_not(
    transport: str, vendor: LoopbackSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The original leak: h11 (httpcore, the guarded fetches' transport) quotes the whole header
    value. Whatever sends such a header; aiohttp (the vendors' transport) names no value."""
    monkeypatch.setenv(KEY_ENV, KEY)
    keyed_vendor(vendor)  # building it registers the key
    unregistered = "tok-never-registered-93f1"
    through = httpx.AsyncHTTPTransport() if transport == "httpcore" else None
    client = ProviderClient(
        "raw_client", fast_http(retries=0), base_url=vendor.url, transport=through
    )

    async def send(value: str) -> ProviderError:
        try:
            async with provider_session([client]):
                await client.fetch("GET", "/v1/companies", headers={"X-Api-Key": value})
        except ProviderError as error:
            return error
        raise AssertionError("the header should have been refused")

    registered_error = asyncio.run(send(f"{KEY}\n"))
    unregistered_error = asyncio.run(send(f"{unregistered}\nX-Injected: 1"))

    assert isinstance(registered_error, FatalProviderError)
    assert registered_error.sent is False and unregistered_error.sent is False
    assert "cannot send GET /v1/companies: LocalProtocolError" in str(registered_error)
    if transport == "httpcore":
        assert "LocalProtocolError: Illegal header value ***" in str(registered_error)
        assert "Illegal header value ***" in str(unregistered_error)
    assert KEY not in str(registered_error)
    assert unregistered not in str(unregistered_error)
    assert vendor.requests == []


def test_redact_hides_every_spelling_of_a_registered_key_and_obvious_credentials() -> None:
    key = "sk-test-8d1f0c\n"  # as read: with its newline
    register_secret(key)
    spellings = [
        "sk-test-8d1f0c",
        repr(key.encode()),  # b'sk-test-8d1f0c\\n'
        json.dumps(key),
        "sk-test-8d1f0c%0A",
    ]
    for text in spellings:
        assert "8d1f0c" not in redact(f"error: {text} was refused")

    assert redact("Authorization: Bearer eyJhbGciOi.abc-def") == "Authorization: Bearer ***"
    assert redact("headers {'x-api-key': 'abc123xyz'}") == "headers {'x-api-key': '***'}"
    assert redact("GET /v1?api_key=zz9&q=acme") == "GET /v1?api_key=***&q=acme"
    assert redact("token type bearer abc.def.ghi") == "token type bearer ***"
    assert redact("a key (GET /v1/companies)") == "a key (GET /v1/companies)"  # no false alarm
    assert redact("refused (HTTP 401); check its API key") == (
        "refused (HTTP 401); check its API key"
    )


def test_short_values_are_not_treated_as_secrets() -> None:
    register_secret("ab")
    assert redact("a table of abbreviations") == "a table of abbreviations"


def test_clean_secret_strips_and_registers() -> None:
    assert clean_secret("  sk-clean-5e7a\n", provider="p", env_var="V") == "sk-clean-5e7a"
    assert redact("echo sk-clean-5e7a") == f"echo {REDACTED}"


@pytest.mark.parametrize(
    "text",
    [
        "authorization=" * 80_000,
        "illegal header value b'" * 45_000,
        "bearer " * 150_000,
        "x-api-key: " + "a" * 1_000_000,
        "Illegal header value b'" + "x" * 1_000_000,
    ],
)
def test_redact_is_linear_on_long_adversarial_text(text: str) -> None:
    started = time.perf_counter()
    redact(text)
    assert time.perf_counter() - started < 1.0


def test_a_provider_error_is_redacted_when_it_is_made() -> None:
    register_secret(KEY)
    error = FatalProviderError(f"vendor said: bad key {KEY!r}", provider="v")
    assert KEY not in str(error) and KEY not in repr(error)


# --- the CLI and the stored data ----------------------------------------------------------------


def test_glaze_providers_prints_no_secret(
    vendor: LoopbackSite, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from glaze_pipeline.cli import cli

    monkeypatch.setenv(KEY_ENV, KEY)
    path = tmp_path / "providers.yaml"
    path.write_text(json.dumps({"providers": [keyed_vendor_entry(vendor)]}))

    result = CliRunner().invoke(cli, ["providers", "--config", str(path)])

    assert result.exit_code == 0, result.output
    assert "keyed_vendor" in result.output
    assert KEY not in result.output


def test_a_health_probe_refused_by_a_vendor_that_echoes_the_key_prints_no_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from glaze_pipeline.cli import cli

    monkeypatch.setenv(KEY_ENV, KEY)
    with LoopbackSite(pages={"/v1/health": echoing_401(KEY)}, default=FOUND) as site:
        entry = {**keyed_vendor_entry(site), "health": {"path": "/v1/health"}}
        path = tmp_path / "providers.yaml"
        path.write_text(json.dumps({"providers": [entry]}))
        table = CliRunner().invoke(cli, ["providers", "--config", str(path)])
        listed = CliRunner().invoke(cli, ["providers", "--config", str(path), "--json"])
        probes = [headers for probe_path, headers in site.requests if probe_path == "/v1/health"]

    assert table.exit_code == 0 and listed.exit_code == 0, table.output + listed.output
    assert [headers["X-Api-Key"] for headers in probes] == [KEY, KEY]  # the probe sent the key
    (row,) = json.loads(listed.output)
    assert (row["status"], row["reason"]) == ("unavailable", "API key refused (HTTP 401)")
    assert "API key refused (HTTP 401)" in table.output
    for text in (table.output, listed.output):
        assert KEY not in text


def test_enrich_table_job_stores_no_key_in_the_cell(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, f"{KEY}\n")  # the trailing newline of the original report
    with LoopbackSite(default=echoing_401(KEY)) as site:
        path = tmp_path / "providers.yaml"
        path.write_text(json.dumps({"providers": [keyed_vendor_entry(site)]}))
        table = store.create_table(
            "Leads", [ColumnDef("website"), ColumnDef("company_name", field="company.name")]
        )
        (row_id,) = store.insert_rows(table.id, [{"website": "acme.com"}])
        column = table.column_by_key("company_name")
        job = build_definitions(store.url, str(path)).get_job_def("enrich_table")
        config = {"table_id": table.id, "column_ids": [column.id]}
        with DagsterInstance.ephemeral() as instance:
            result = job.execute_in_process(
                run_config={"ops": {"detect_entities": {"config": config}}},
                instance=instance,
                raise_on_error=False,
            )
        assert result.success
        assert len(site.requests) == 1

    (row,) = store.rows_by_id([row_id])
    cell = row.meta["company_name"]
    assert cell["status"] == "failed"
    assert "refused (HTTP 401)" in cell["error"] and REDACTED in cell["error"]
    stored = json.dumps(row.meta) + json.dumps(row.data)
    request = store.get_request(cell["request_id"])
    for text in (stored, repr(request), caplog.text):
        assert KEY not in text
