"""The free website provider: what a company's own homepage says about it.

It fetches `<scheme>://<domain>/` (bounded redirects, bounded body, a clear user agent) and
reads the name, description, LinkedIn page and phone number from the HTML with the standard
library's parser. It costs nothing, so the waterfall asks it first; its answers are weaker than
a vendor's (`confidence` 0.6 by default), so a paid provider can still improve on them.

The host it fetches comes from a user's cell, so every connection, redirects included, goes
through the SSRF guard (`egress.EgressGuard`): a domain that resolves to a loopback, private,
link-local or metadata address ends the lookup with `AddressRefused` before anything is sent,
and the cell fails with that reason. `allow_private_networks` (or the environment's
`GLAZE_ALLOW_PRIVATE_NETWORKS=1`) lets loopback through for the mock server and tests only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Literal
from urllib.parse import unquote

import httpx
from pydantic import BaseModel, ConfigDict, Field

from glaze_pipeline.core.fields import CATALOGUE
from glaze_pipeline.core.models import EntityKey, EntityType
from glaze_pipeline.core.providers.base import ProviderAnswer, ProviderKind
from glaze_pipeline.core.providers.egress import EgressGuard
from glaze_pipeline.core.providers.http import (
    HttpBackedProvider,
    HttpSettings,
    ProviderClient,
    UnsupportedLookup,
)
from glaze_pipeline.core.settings import allow_private_networks

WEBSITE_FIELDS = frozenset({"name", "description", "linkedin_url", "phone"})
# A catalogue field renamed under the website provider's feet fails here, not in a job.
_uncatalogued = sorted(WEBSITE_FIELDS - CATALOGUE[EntityType.COMPANY])
if _uncatalogued:
    raise AssertionError(f"website fields outside the catalogue: {_uncatalogued}")
_DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9-]{1,63})+$"
)
_LINKEDIN_COMPANY_RE = re.compile(
    r"^https?://(?:[a-z]{2,3}\.)?linkedin\.com/company/([^/?#\s]+)", re.IGNORECASE
)
_TITLE_SEPARATORS = re.compile(r"\s+[|\-\u2013\u2014:\u00b7]\s+")
_MAX_TEXT = 2_000
_ACCEPT_HTML = {"Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.1"}


def _website_http() -> HttpSettings:
    # One dead site says nothing about the next: no breaker. Few retries: a homepage that
    # fails twice will not answer a third time in this run.
    return HttpSettings(
        retries=1,
        max_redirects=5,
        max_body_bytes=1_000_000,
        breaker_threshold=None,
        max_concurrency=20,
    )


class WebsiteConfig(BaseModel):
    """The website provider, as written in the providers YAML."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["website"] = "website"
    name: str = Field(default="website", pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    scheme: Literal["http", "https"] = "https"
    # Where a domain's homepage is; `{scheme}` and `{domain}` are filled in.
    url_template: str = "{scheme}://{domain}/"
    # Exact homepage URLs for some domains (tests and demos point these at loopback).
    site_urls: dict[str, str] = Field(default_factory=dict)
    confidence: float = Field(default=0.6, ge=0, le=1)
    # Development only: reach loopback and private addresses (the mock server). Off, any host
    # that is not public is refused, on the first request and on every redirect.
    allow_private_networks: bool = False
    http: HttpSettings = Field(default_factory=_website_http)
    enabled: bool = True


@dataclass
class HomepageFacts:
    """What a homepage says, before it is mapped to catalogue fields."""

    title: str | None = None
    site_name: str | None = None
    description: str | None = None
    og_description: str | None = None
    linkedin_urls: list[str] = field(default_factory=list)
    emails: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)

    @property
    def name(self) -> str | None:
        if self.site_name:
            return self.site_name
        if self.title:
            return _TITLE_SEPARATORS.split(self.title, maxsplit=1)[0].strip() or None
        return None

    def values(self) -> dict[str, str]:
        found = {
            "name": self.name,
            "description": self.description or self.og_description,
            "linkedin_url": self.linkedin_urls[0] if self.linkedin_urls else None,
            "phone": self.phones[0] if self.phones else None,
        }
        return {k: v for k, v in found.items() if v}


class _HomepageParser(HTMLParser):
    """Collects title, meta tags and contact links; ignores everything else."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.facts = HomepageFacts()
        self._in_title = False
        self._title: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k.lower(): (v or "") for k, v in attrs}
        if tag == "title" and self.facts.title is None:
            self._in_title = True
        elif tag == "meta":
            self._meta(attributes)
        elif tag == "a":
            self._link(attributes.get("href", "").strip())

    def handle_endtag(self, tag: str) -> None:
        if tag == "title" and self._in_title:
            self._in_title = False
            self.facts.title = _clean("".join(self._title))

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self._title.append(data)

    def close(self) -> None:
        super().close()
        if self._in_title and self.facts.title is None:  # an unclosed <title>
            self.facts.title = _clean("".join(self._title))

    def _meta(self, attributes: dict[str, str]) -> None:
        key = (attributes.get("property") or attributes.get("name") or "").lower()
        content = _clean(attributes.get("content", ""))
        if not content:
            return
        facts = self.facts
        if key == "og:site_name" and facts.site_name is None:
            facts.site_name = content
        elif key == "description" and facts.description is None:
            facts.description = content
        elif key == "og:description" and facts.og_description is None:
            facts.og_description = content

    def _link(self, href: str) -> None:
        lowered = href.lower()
        facts = self.facts
        if lowered.startswith("mailto:"):
            address = unquote(href[7:].split("?", 1)[0]).strip().lower()
            if "@" in address and address not in facts.emails:
                facts.emails.append(address)
        elif lowered.startswith("tel:"):
            number = _clean(unquote(href[4:]))
            if number and number not in facts.phones:
                facts.phones.append(number)
        else:
            match = _LINKEDIN_COMPANY_RE.match(href)
            if match:
                url = f"https://www.linkedin.com/company/{match.group(1)}"
                if url not in facts.linkedin_urls:
                    facts.linkedin_urls.append(url)


def parse_homepage(html: str) -> HomepageFacts:
    """Facts from a homepage's HTML; malformed HTML gives fewer facts, never an error."""
    parser = _HomepageParser()
    parser.feed(html)
    parser.close()
    return parser.facts


class WebsiteProvider(HttpBackedProvider):
    """A Provider that reads company facts from the company's homepage (keyed by domain)."""

    config: WebsiteConfig

    cost_per_call = 0.0
    charges_misses = False
    entity_type = EntityType.COMPANY

    def __init__(
        self, config: WebsiteConfig | None = None, *, egress: EgressGuard | None = None
    ) -> None:
        """`egress` replaces the guard the config asks for (tests resolve made-up names)."""
        self.config = config or WebsiteConfig()
        self.egress = egress or EgressGuard(
            allow_private=self.config.allow_private_networks or allow_private_networks()
        )
        self.http = ProviderClient(self.config.name, self.config.http, egress=self.egress)

    def __repr__(self) -> str:
        return f"WebsiteProvider(name={self.name!r})"

    @property
    def fields(self) -> frozenset[str]:
        return WEBSITE_FIELDS

    def supports(self, key: EntityKey) -> bool:
        return (
            key.type is EntityType.COMPANY
            and key.kind == "domain"
            and bool(_DOMAIN_RE.match(key.value))
        )

    def _configuration_problem(self) -> str | None:
        # The preflight: no key, and no probe (which homepage would say the provider is up?).
        template = self.config.url_template
        url = self.homepage_url("example.com")
        try:
            host = httpx.URL(url).host
        except httpx.InvalidURL as error:
            return f"url_template {template!r} makes no valid URL: {error}"
        return None if host else f"url_template {template!r} makes URLs with no host"

    def homepage_url(self, domain: str) -> str:
        override = self.config.site_urls.get(domain)
        if override:
            return override
        return self.config.url_template.replace("{scheme}", self.config.scheme).replace(
            "{domain}", domain
        )

    async def lookup(self, key: EntityKey, fields: frozenset[str]) -> ProviderAnswer:
        if not self.supports(key):
            raise UnsupportedLookup(
                f"{self.name}: only company domains have a homepage (got {key.kind})",
                provider=self.name,
            )
        with self.http.guard():
            response = await self.http.fetch(
                "GET", self.homepage_url(key.value), headers=_ACCEPT_HTML
            )
            content_type = response.headers.get("content-type", "").lower()
            if content_type and "html" not in content_type:
                return ProviderAnswer({})  # answered, but nothing a homepage parser can read
            return ProviderAnswer(parse_homepage(response.text()).values())


KIND = ProviderKind(
    config=WebsiteConfig,
    provider=WebsiteProvider,
    build=WebsiteProvider,
    url_settings=("url_template",),
    url_maps=("site_urls",),
)


def _clean(text: str) -> str:
    return " ".join(text.split())[:_MAX_TEXT]
