"""The SSRF guard (issue 9, item 5): a user's domain never makes us fetch our own network.

Every target is a loopback server of the test's own: an "internal" site that serves
`secret db_password=hunter2` to whoever asks (and counts who asked), and a site on another
loopback address (127.0.0.2) that plays a public homepage. Made-up names resolve through a
patched `socket.getaddrinfo` (no DNS server); the only other seam is in the redirect tests,
which call exactly 127.0.0.2 public while every other address is judged by the real
`address_refusal`. Nothing here connects anywhere but loopback: the guard's verdicts on
other addresses are checked without connecting.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterInstance

from glaze_pipeline.core.budget import Budget
from glaze_pipeline.core.errors import ConfigError
from glaze_pipeline.core.models import CellStatus, EntityRequest
from glaze_pipeline.core.providers.base import (
    AddressRefused,
    FatalProviderError,
    ProviderAnswer,
)
from glaze_pipeline.core.providers.egress import (
    METADATA_ADDRESSES,
    EgressGuard,
    IPAddress,
    address_refusal,
)
from glaze_pipeline.core.providers.http import provider_session
from glaze_pipeline.core.providers.json_api import placeholders
from glaze_pipeline.core.providers.website import WebsiteConfig, WebsiteProvider
from glaze_pipeline.core.settings import ALLOW_PRIVATE_NETWORKS_ENV
from glaze_pipeline.core.store import ColumnDef, Store
from glaze_pipeline.definitions import build_definitions
from glaze_pipeline_tests.provider_helpers import (
    FAST_HTTP,
    LoopbackSite,
    Page,
    company,
    fake_dns,
    run_waterfall,
)

SECRET = "secret db_password=hunter2"
SECRET_PAGE = Page(200, f"<html><head><title>{SECRET}</title></head><body>admin</body></html>")
PUBLIC_STAND_IN = "127.0.0.2"  # plays a public web server in the redirect tests only
PUBLIC_PAGE = Page(200, "<html><head><title>Shop | Home</title></head></html>")


@pytest.fixture(autouse=True)
def no_development_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default: whatever the environment running the tests says, the guard is on."""
    monkeypatch.delenv(ALLOW_PRIVATE_NETWORKS_ENV, raising=False)


@pytest.fixture
def internal() -> Iterator[LoopbackSite]:
    """An internal admin page, on 127.0.0.1, that must never reach a cell."""
    with LoopbackSite("127.0.0.1", default=SECRET_PAGE) as site:
        yield site


@pytest.fixture
def internal_v6() -> Iterator[LoopbackSite]:
    with LoopbackSite("::1", default=SECRET_PAGE) as site:
        yield site


def website(
    template: str = "", egress: EgressGuard | None = None, **config: Any
) -> WebsiteProvider:
    http = {**FAST_HTTP, "retries": 0, "max_redirects": 5}
    settings: dict[str, Any] = {"http": http, **config}
    if template:
        settings["url_template"] = template
    return WebsiteProvider(WebsiteConfig.model_validate(settings), egress=egress)


async def fetch(provider: WebsiteProvider, domain: str) -> ProviderAnswer:
    async with provider_session([provider]):
        return await provider.lookup(company(domain), provider.fields)


def public_stand_in(address: IPAddress) -> str | None:
    """The real verdict for every address but the stand-in for the public internet."""
    if address == ipaddress.ip_address(PUBLIC_STAND_IN):
        return None
    return address_refusal(address)


# --- a domain that resolves to our own network ---------------------------------------------------


def test_a_domain_resolving_to_loopback_is_refused_and_nothing_is_fetched(
    internal: LoopbackSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns(monkeypatch, {"intranet-acme.com": "127.0.0.1"})
    provider = website(f"http://{{domain}}:{internal.port}/")  # the default guard

    with pytest.raises(AddressRefused) as refused:
        asyncio.run(fetch(provider, "intranet-acme.com"))

    assert str(refused.value) == (
        "website: refused: intranet-acme.com resolves to 127.0.0.1 (loopback), not a public address"
    )
    assert isinstance(refused.value, FatalProviderError)  # give up on it: not "not found"
    assert internal.requests == []  # refused before connecting: not one byte sent
    assert provider.http.stats.outcomes["refused"] == 1


def test_the_waterfall_records_the_refusal_and_never_the_page(
    internal: LoopbackSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns(monkeypatch, {"intranet-acme.com": "127.0.0.1"})
    provider = website(f"http://{{domain}}:{internal.port}/")
    request = EntityRequest(company("intranet-acme.com"), frozenset({"name", "description"}))

    (outcome,), waterfall = asyncio.run(run_waterfall([provider], [request], Budget(10.0)))

    for cell in outcome.fields.values():
        assert cell.status is CellStatus.FAILED
        assert cell.value is None
        assert cell.error is not None and "resolves to 127.0.0.1 (loopback)" in cell.error
        assert "hunter2" not in cell.error
    # Refused before connecting: no call, no error of the provider's, counted apart.
    assert waterfall.stats.calls["website"] == 0
    assert waterfall.stats.not_sent_dict() == {"website": {"refused": 1}}
    assert internal.requests == []


def test_a_name_with_one_public_and_one_loopback_address_is_refused(
    internal: LoopbackSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two A records, one of them ours: the classic way to slip past a check of the first one.
    fake_dns(monkeypatch, {"split.example.com": [PUBLIC_STAND_IN, "127.0.0.1"]})
    provider = website(
        f"http://{{domain}}:{internal.port}/", egress=EgressGuard(classify=public_stand_in)
    )
    with pytest.raises(AddressRefused, match=r"resolves to 127\.0\.0\.1 \(loopback\)"):
        asyncio.run(fetch(provider, "split.example.com"))
    assert internal.requests == []


def test_the_checked_address_is_the_one_connected_to_no_rebinding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rebinding DNS gives the public address to the check and ours to any later lookup.

    The public stand-in and the internal page listen on the same port number, so only the
    address decides which one a connection reaches.
    """
    with same_port_pair() as (shop, secret):
        answers = iter([PUBLIC_STAND_IN])
        asked = fake_dns(monkeypatch, {"rebind.example.com": lambda: next(answers, "127.0.0.1")})
        provider = website(
            f"http://{{domain}}:{shop.port}/", egress=EgressGuard(classify=public_stand_in)
        )
        answer = asyncio.run(fetch(provider, "rebind.example.com"))

    assert answer.values["name"] == "Shop"
    assert asked == ["rebind.example.com"]  # resolved once: the socket went to that address
    assert len(shop.requests) == 1 and secret.requests == []


@contextmanager
def same_port_pair() -> Iterator[tuple[LoopbackSite, LoopbackSite]]:
    """The public stand-in on 127.0.0.2 and the internal page on 127.0.0.1, one port number."""
    for _ in range(20):
        shop = LoopbackSite(PUBLIC_STAND_IN, default=PUBLIC_PAGE)
        try:
            secret = LoopbackSite("127.0.0.1", port=shop.port, default=SECRET_PAGE)
        except OSError:  # that number is taken on 127.0.0.1: try another
            shop.close()
            continue
        with shop, secret:
            yield shop, secret
        return
    raise AssertionError("no port number free on both 127.0.0.1 and 127.0.0.2")


def test_a_refusal_does_not_count_against_the_providers_health(
    internal: LoopbackSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sheet full of internal domains must not switch the provider off for everyone."""
    fake_dns(monkeypatch, {"intranet-acme.com": "127.0.0.1"})
    http = {**FAST_HTTP, "retries": 0, "breaker_threshold": 1}
    provider = website(f"http://{{domain}}:{internal.port}/", http=http)
    for _ in range(3):
        with pytest.raises(AddressRefused):
            asyncio.run(fetch(provider, "intranet-acme.com"))
    health = provider.health()
    assert (health.circuit, health.consecutive_failures) == ("closed", 0)


@pytest.mark.parametrize("domain", ["127.0.0.1", "0x7f.0.0.1", "127.1", "localhost.localdomain"])
def test_a_users_domain_that_is_an_ip_literal_is_refused(
    internal: LoopbackSite, domain: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns(monkeypatch, {"localhost.localdomain": "127.0.0.1"})
    provider = website(f"http://{{domain}}:{internal.port}/")
    assert provider.supports(company(domain))  # it looks like a domain to the provider
    with pytest.raises(AddressRefused, match=r"\(loopback\)"):
        asyncio.run(fetch(provider, domain))
    assert internal.requests == []


# --- redirects -----------------------------------------------------------------------------------


def test_a_public_homepage_that_redirects_to_loopback_is_refused_at_the_redirect(
    internal: LoopbackSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    redirect = Page(302, "", {"Location": f"http://localhost:{internal.port}/admin"})
    pages = {"/": redirect, "/home": PUBLIC_PAGE}
    with LoopbackSite(PUBLIC_STAND_IN, pages=pages) as shop:
        fake_dns(monkeypatch, {"www.shop.com": PUBLIC_STAND_IN})
        guard = EgressGuard(classify=public_stand_in)
        provider = website(f"http://{{domain}}:{shop.port}/", egress=guard)

        with pytest.raises(AddressRefused) as refused:
            asyncio.run(fetch(provider, "www.shop.com"))

        # Control: the stand-in itself is reachable, so the refusal above is the redirect's.
        home = website(f"http://{{domain}}:{shop.port}/home", egress=guard)
        assert asyncio.run(fetch(home, "www.shop.com")).values["name"] == "Shop"

    assert str(refused.value) == (
        "website: refused: localhost resolves to 127.0.0.1 (loopback), not a public address "
        "(after 1 redirect)"
    )
    assert [path for path, _ in shop.requests] == ["/", "/home"]
    assert internal.requests == []  # the internal admin page was never asked


def test_every_hop_is_checked_not_only_the_first_redirect(
    internal: LoopbackSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two public hops, then the internal one (by its IP literal this time).
    pages = {
        "/": Page(302, "", {"Location": "/step2"}),
        "/step2": Page(302, "", {"Location": f"http://127.0.0.1:{internal.port}/admin"}),
    }
    with LoopbackSite(PUBLIC_STAND_IN, pages=pages) as shop:
        fake_dns(monkeypatch, {"www.shop.com": PUBLIC_STAND_IN})
        provider = website(
            f"http://{{domain}}:{shop.port}/", egress=EgressGuard(classify=public_stand_in)
        )
        with pytest.raises(AddressRefused, match=r"127\.0\.0\.1 \(loopback\).*after 2 redirects"):
            asyncio.run(fetch(provider, "www.shop.com"))
    assert internal.requests == []


# --- IP literals in any notation -----------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "2130706433",  # decimal
        "0x7f.0.0.1",  # hex octet
        "0x7f000001",  # hex
        "017700000001",  # octal
        "127.1",  # short form
        "0.0.0.0",  # unspecified (Linux connects it to the local host)
        "0",
        "localhost",
    ],
)
def test_loopback_in_any_notation_is_refused(
    internal: LoopbackSite, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = website(site_urls={"acme.com": f"http://{host}:{internal.port}/admin"})
    with pytest.raises(AddressRefused, match=r"\((loopback|unspecified)\)"):
        asyncio.run(fetch(provider, "acme.com"))
    assert internal.requests == []

    # The same URL with the development setting reaches the page: the refusal was the guard's.
    monkeypatch.setenv(ALLOW_PRIVATE_NETWORKS_ENV, "1")
    allowed = website(site_urls={"acme.com": f"http://{host}:{internal.port}/admin"})
    assert asyncio.run(fetch(allowed, "acme.com")).values["name"] == SECRET


@pytest.mark.parametrize("host", ["[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]"])
def test_ipv6_loopback_literals_are_refused(
    internal: LoopbackSite, internal_v6: LoopbackSite, host: str
) -> None:
    port = internal_v6.port if host == "[::1]" else internal.port
    provider = website(site_urls={"acme.com": f"http://{host}:{port}/admin"})
    with pytest.raises(AddressRefused, match="loopback"):
        asyncio.run(fetch(provider, "acme.com"))
    assert internal.requests == [] and internal_v6.requests == []


def test_an_octal_dotted_literal_httpx_will_not_parse_fails_without_a_request(
    internal: LoopbackSite,
) -> None:
    provider = website(site_urls={"acme.com": f"http://0177.0.0.1:{internal.port}/admin"})
    with pytest.raises(FatalProviderError, match="cannot build GET /admin"):
        asyncio.run(fetch(provider, "acme.com"))
    assert internal.requests == []


# --- what counts as public ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "shared address space (CGNAT)"),
        ("fc00::1", "unique local"),
        ("fd12:3456::1", "unique local"),
        ("169.254.169.254", "cloud metadata service"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("ff0e::1", "multicast"),  # "global" to Python's is_global
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.10", "special-purpose"),  # documentation
        ("198.18.0.1", "special-purpose"),  # benchmarking
        ("::ffff:127.0.0.1", "loopback, inside an IPv6 address"),
        ("::ffff:10.0.0.1", "private, inside an IPv6 address"),
        ("::ffff:169.254.169.254", "cloud metadata service, inside an IPv6 address"),
        ("2002:7f00:1::", "loopback, inside an IPv6 address"),  # 6to4
        ("2002:a9fe:a9fe::", "cloud metadata service, inside an IPv6 address"),
        ("64:ff9b::a00:1", "private, inside an IPv6 address"),  # NAT64
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback, inside an IPv6 address"),  # Teredo
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_refusal_names_what_is_not_public(address: str, reason: str | None) -> None:
    assert address_refusal(ipaddress.ip_address(address)) == reason


def test_the_guard_refuses_private_targets_without_connecting() -> None:
    """Non-loopback targets are judged from the resolver's answer alone: never dialled here."""
    names = {
        "db.internal.example.com": ["10.0.0.5"],
        "metadata.example.com": ["169.254.169.254"],
        "cgnat.example.com": ["100.64.1.1"],
        "v6.example.com": ["fd00::5"],
        "public.example.com": ["93.184.216.34", "2606:4700:4700::1111"],
    }

    async def resolve(host: str, port: int) -> list[str]:
        return names[host]

    async def verdicts(guard: EgressGuard) -> dict[str, str]:
        found = {}
        for host in names:
            try:
                found[host] = ",".join(await guard.addresses(host, 443))
            except AddressRefused as error:
                found[host] = str(error)
        return found

    strict = asyncio.run(verdicts(EgressGuard(resolve=resolve)))
    assert strict == {
        "db.internal.example.com": "refused: db.internal.example.com resolves to 10.0.0.5 "
        "(private), not a public address",
        "metadata.example.com": "refused: metadata.example.com resolves to 169.254.169.254 "
        "(cloud metadata service), not a public address",
        "cgnat.example.com": "refused: cgnat.example.com resolves to 100.64.1.1 "
        "(shared address space (CGNAT)), not a public address",
        "v6.example.com": "refused: v6.example.com resolves to fd00::5 (unique local), "
        "not a public address",
        "public.example.com": "93.184.216.34,2606:4700:4700::1111",
    }
    # The development setting opens private networks, never the metadata service.
    relaxed = asyncio.run(verdicts(EgressGuard(resolve=resolve, allow_private=True)))
    assert relaxed["db.internal.example.com"] == "10.0.0.5"
    assert relaxed["v6.example.com"] == "fd00::5"
    assert relaxed["metadata.example.com"].startswith("refused:")
    assert ipaddress.ip_address("169.254.169.254") in METADATA_ADDRESSES


# --- the development setting ---------------------------------------------------------------------


def test_loopback_is_allowed_only_with_the_explicit_setting(
    internal: LoopbackSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = f"http://localhost:{internal.port}/{{domain}}"
    with pytest.raises(AddressRefused):
        asyncio.run(fetch(website(template), "acme.com"))
    assert internal.requests == []

    # In the providers file ...
    by_config = website(template, allow_private_networks=True)
    assert asyncio.run(fetch(by_config, "acme.com")).values["name"] == SECRET
    # ... or in the environment.
    for value in ("1", "true", "YES", "on"):
        monkeypatch.setenv(ALLOW_PRIVATE_NETWORKS_ENV, value)
        assert asyncio.run(fetch(website(template), "acme.com")).values["name"] == SECRET
    for value in ("0", "false", "no", "off", ""):
        monkeypatch.setenv(ALLOW_PRIVATE_NETWORKS_ENV, value)
        with pytest.raises(AddressRefused):
            asyncio.run(fetch(website(template), "acme.com"))
    assert len(internal.requests) == 5


def test_a_typo_in_the_setting_is_a_config_error_not_an_open_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ALLOW_PRIVATE_NETWORKS_ENV, "ture")
    with pytest.raises(ConfigError, match=f"{ALLOW_PRIVATE_NETWORKS_ENV} must be 1/true"):
        website("http://{domain}/")


def test_the_mock_providers_file_turns_the_setting_on_for_its_website_entry() -> None:
    import yaml

    document = yaml.safe_load(
        (Path(__file__).parent.parent / "seed/providers.mock.yaml").read_text()
    )
    (site,) = [p for p in document["providers"] if p["kind"] == "website"]
    assert site["allow_private_networks"] is True
    assert WebsiteConfig().allow_private_networks is False  # off unless asked


def test_json_api_user_values_stay_inside_the_path() -> None:
    """Operator base URLs are trusted; a user's value cannot name another host."""
    from glaze_pipeline.core.providers.json_api import fill

    values = placeholders(company("evil.com@127.0.0.1:80/#?"))
    assert fill("/v1/companies/{value}", values, quote_values=True) == (
        "/v1/companies/evil.com%40127.0.0.1%3A80%2F%23%3F"
    )


# --- end to end: the enrich_table job ------------------------------------------------------------


def test_enrich_table_job_leaves_the_cell_failed_without_the_secret(
    store: Store,
    internal: LoopbackSite,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_dns(monkeypatch, {"intranet-acme.com": "127.0.0.1"})
    providers = tmp_path / "providers.yaml"
    providers.write_text(
        "providers:\n"
        "  - kind: website\n"
        f"    url_template: 'http://{{domain}}:{internal.port}/'\n"
        "    http: {retries: 0, max_redirects: 5}\n"
    )
    table = store.create_table(
        "Leads", [ColumnDef("website"), ColumnDef("company_name", field="company.name")]
    )
    (row_id,) = store.insert_rows(table.id, [{"website": "intranet-acme.com"}])
    column = table.column_by_key("company_name")

    job = build_definitions(store.url, str(providers)).get_job_def("enrich_table")
    with DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            run_config={
                "ops": {
                    "detect_entities": {"config": {"table_id": table.id, "column_ids": [column.id]}}
                }
            },
            instance=instance,
            raise_on_error=False,
        )
    assert result.success

    (row,) = store.rows_by_id([row_id])
    assert not row.data.get("company_name")
    cell = row.meta["company_name"]
    assert cell["status"] == "failed"
    assert cell["error"].startswith(
        "website: refused: intranet-acme.com resolves to 127.0.0.1 (loopback)"
    )  # the provider named once
    assert "hunter2" not in str(row.data) + str(row.meta) + caplog.text
    assert internal.requests == []
