"""A mock provider server: real HTTP on loopback for development, tests and benchmarks.

It plays several vendors at once, each under its own path prefix (`/cheap/...`,
`/premium/...`, `/people/...`), answering with seed 001's deterministic values (`fake_value`)
for the entity asked about, so a lookup through HTTP returns what the in-process fake provider
would. Per vendor it simulates what real vendors do to us: latency (fixed, uniform or
lognormal), 500s, 429s with `Retry-After`, misses (deterministic by identifier), a price per
call. It also serves company homepages under `/site/<domain>/` for the website provider.

Endpoints:
  GET  /<vendor>/v1/companies?domain=...|name=...      one company
  POST /<vendor>/v1/companies/batch {"domains": [...]}  many companies
  GET  /<vendor>/v1/people?linkedin=...|email=...|name=...&company=...
  POST /<vendor>/v1/people/batch {"emails": [...]} or {"linkedins": [...]}
  GET  /<vendor>/v1/health                              free: is the vendor up, is our key good
  GET  /site/<domain>/                                  a homepage (HTML)
  GET  /site/<domain>/hop/<n>                           n redirects, then the homepage
  GET  /_stats   POST /_reset   GET|POST /_config   GET /_health

Tests switch on bad behaviour per vendor (`POST /_config`, `MockProviderServer.configure`) or
per request with a `_mode` query parameter: `garbage` (invalid JSON), `wrong_shape` (valid JSON,
wrong types), `huge` (a 10 MB body, streamed), `huge_declared` (the same with Content-Length),
`hang` (no answer until the server stops or `hang_s` passes), `error` (500), `rate_limited`
(429) and `redirect_loop` (homepages).

Health probes are free and counted apart (`probes` in `/_stats`), never in `requests`,
`entities` or `billed`: so `requests` is exactly the HTTP requests that reached a vendor, one
per lookup when no batch endpoint is used. A batch request is one of `requests` and also
counted in `batch_requests`; the identifiers it asked about in `batch_entities`, whatever the
answer (`entities` counts only those of answered batches, as before); `lookups` is the entity
lookups that reached the vendor (`requests - batch_requests + batch_entities`), what a caller
counts as calls; `billed` and `cost` are per entity either way.

`MockProviderServer` runs it in a background thread on a free port; `serve()` runs it in the
foreground (`glaze mock-providers`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import socket
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from html import escape
from typing import Any, Literal
from urllib.parse import quote

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from glaze_pipeline.core.fields import CATALOGUE, catalogue_fields
from glaze_pipeline.core.models import EntityKey, EntityType
from glaze_pipeline.core.providers.fake import fake_value
from glaze_pipeline.testing import loopback

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765

# Where a vendor nests a catalogue field in its JSON record, when not at the top under the
# field's own name (the providers YAML maps them back). Every catalogue field is served: one
# added to the catalogue appears at the top of every record, with its fake value.
_NESTED: dict[EntityType, dict[str, str]] = {
    EntityType.COMPANY: {
        "employee_count": "metrics.employees",
        "revenue": "metrics.revenue",
        "location": "hq.location",
        "founded_year": "founded",
        "linkedin_url": "social.linkedin",
    },
    EntityType.PERSON: {
        "title": "job.title",
        "company": "job.company",
        "email": "contact.email",
        "phone": "contact.phone",
    },
}


def _layout(entity_type: EntityType) -> dict[str, str]:
    nested = _NESTED[entity_type]
    unknown = sorted(set(nested) - CATALOGUE[entity_type])
    if unknown:
        raise AssertionError(f"mock layout names {entity_type.value} fields {unknown}")
    return {
        field.name: nested.get(field.name, field.name) for field in catalogue_fields(entity_type)
    }


# Catalogue field -> dotted path in a vendor's record, by entity type.
LAYOUTS: dict[EntityType, dict[str, str]] = {
    entity_type: _layout(entity_type) for entity_type in EntityType
}
COMPANY_LAYOUT = LAYOUTS[EntityType.COMPANY]
PERSON_LAYOUT = LAYOUTS[EntityType.PERSON]
RECORD_KEYS = {EntityType.COMPANY: "company", EntityType.PERSON: "person"}
IDENTIFIERS = {
    EntityType.COMPANY: "domain or name",
    EntityType.PERSON: "linkedin, email, or name and company",
}
# Batch request body keys -> key kinds.
BATCH_KINDS = {"domains": "domain", "names": "name", "emails": "email", "linkedins": "linkedin"}

Mode = Literal[
    "normal",
    "garbage",
    "wrong_shape",
    "huge",
    "huge_declared",
    "hang",
    "error",
    "rate_limited",
    "unauthorized",
]
MODES: frozenset[str] = frozenset(Mode.__args__)  # type: ignore[attr-defined]


# --- configuration -------------------------------------------------------------------------


class Latency(BaseModel):
    """How long a vendor takes: fixed, uniform in [min, max], or lognormal around a mean."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["fixed", "uniform", "lognormal"] = "fixed"
    mean_ms: float = Field(default=0.0, ge=0)
    min_ms: float = Field(default=0.0, ge=0)
    max_ms: float = Field(default=0.0, ge=0)
    sigma: float = Field(default=0.5, gt=0)  # lognormal shape

    def sample(self, rng: random.Random) -> float:
        """One latency in seconds."""
        if self.kind == "uniform":
            return rng.uniform(self.min_ms, max(self.min_ms, self.max_ms)) / 1000
        if self.kind == "lognormal" and self.mean_ms > 0:
            # E[X] = exp(mu + sigma^2 / 2) = mean
            mu = math.log(self.mean_ms) - self.sigma**2 / 2
            return rng.lognormvariate(mu, self.sigma) / 1000
        return self.mean_ms / 1000


class VendorConfig(BaseModel):
    """One simulated vendor."""

    model_config = ConfigDict(extra="forbid")

    entity_type: EntityType
    fields: list[str] | None = None  # None: every catalogue field of the entity type
    cost_per_call: float = Field(default=1.0, ge=0)
    charges_misses: bool = False
    latency: Latency = Field(default_factory=Latency)
    not_found_rate: float = Field(default=0.0, ge=0, le=1)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    rate_limit_rate: float = Field(default=0.0, ge=0, le=1)
    retry_after: str | None = "1"  # the Retry-After header sent with a 429 (None: no header)
    mode: Mode = "normal"
    api_key: str | None = None  # when set, requests must carry it in `api_key_header`
    api_key_header: str = "X-Api-Key"

    @model_validator(mode="after")
    def _known_fields(self) -> VendorConfig:
        unknown = sorted(set(self.fields or ()) - CATALOGUE[self.entity_type])
        if unknown:
            raise ValueError(f"unknown {self.entity_type.value} fields {unknown}")
        return self


def default_vendors() -> dict[str, VendorConfig]:
    """A cheap company vendor (few fields, many misses), a premium one, and a person vendor."""
    return {
        "cheap": VendorConfig(
            entity_type=EntityType.COMPANY,
            fields=["name", "domain", "industry", "employee_count", "location"],
            cost_per_call=1.0,
            not_found_rate=0.3,
            latency=Latency(kind="lognormal", mean_ms=40),
        ),
        "premium": VendorConfig(
            entity_type=EntityType.COMPANY,
            cost_per_call=10.0,
            charges_misses=True,
            not_found_rate=0.05,
            latency=Latency(kind="lognormal", mean_ms=120),
        ),
        "people": VendorConfig(
            entity_type=EntityType.PERSON,
            cost_per_call=3.0,
            not_found_rate=0.1,
            latency=Latency(kind="lognormal", mean_ms=80),
        ),
    }


class MockConfig(BaseModel):
    """The whole mock: its vendors, its homepages, and the knobs tests turn."""

    model_config = ConfigDict(extra="forbid")

    vendors: dict[str, VendorConfig] = Field(default_factory=default_vendors)
    site_not_found_rate: float = Field(default=0.1, ge=0, le=1)
    site_latency: Latency = Field(default_factory=Latency)
    seed: int = 0
    hang_s: float = Field(default=30.0, ge=0)
    huge_bytes: int = Field(default=10 * 1024 * 1024, ge=0)

    def merged(self, patch: Mapping[str, Any]) -> MockConfig:
        """This config with `patch` deep-merged into it (validated)."""
        return MockConfig.model_validate(_deep_merge(self.model_dump(), patch))


# --- deterministic data --------------------------------------------------------------------


def _share(*parts: str) -> float:
    digest = hashlib.sha256("|".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_miss(vendor: str, key: EntityKey, rate: float) -> bool:
    """Whether `vendor` knows nothing of `key`: the same answer every time."""
    return rate > 0 and _share(vendor, key.id) < rate


def record_for(key: EntityKey, fields: list[str] | None = None) -> dict[str, Any]:
    """The vendor JSON record for an entity: `fake_value`s laid out as a vendor nests them."""
    record: dict[str, Any] = {}
    for name, path in LAYOUTS[key.type].items():
        if fields is None or name in fields:
            _put(record, path, fake_value(key, name))
    return record


def site_facts(domain: str) -> dict[str, str]:
    """What the homepage of `domain` says (the website provider should read exactly this)."""
    key = EntityKey(EntityType.COMPANY, "domain", domain)
    slug = "".join(c if c.isalnum() else "-" for c in domain.lower()).strip("-")
    return {
        "name": str(fake_value(key, "name")),
        "description": str(fake_value(key, "description")),
        "linkedin_url": f"https://www.linkedin.com/company/{slug}",
        "phone": str(fake_value(key, "phone")),
        "email": f"hello@{domain}",
    }


def homepage_html(domain: str) -> str:
    facts = {k: escape(v) for k, v in site_facts(domain).items()}
    return f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{facts["name"]} | Home</title>
  <meta name="description" content="{facts["description"]}">
  <meta property="og:site_name" content="{facts["name"]}">
  <meta property="og:description" content="{facts["description"]} (og)">
</head>
<body>
  <h1>Welcome to {facts["name"]}</h1>
  <a href="/about">About</a>
  <a href="{facts["linkedin_url"]}">Follow us on LinkedIn</a>
  <a href="https://twitter.com/example">Twitter</a>
  <a href="mailto:{quote(facts["email"], safe="@")}?subject=Hi">Email us</a>
  <a href="tel:{quote(facts["phone"], safe="+-")}">Call us</a>
</body>
</html>
"""


# --- state ---------------------------------------------------------------------------------


@dataclass
class _VendorCounters:
    requests: int = 0
    probes: int = 0  # health probes: free, and never in requests, entities or billed
    entities: int = 0
    billed: int = 0
    cost: float = 0.0
    in_flight: int = 0
    max_in_flight: int = 0
    batch_requests: int = 0  # requests to the batch endpoint (also in `requests`)
    batch_entities: int = 0  # identifiers those requests asked about, whatever the answer
    user_agents: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)


class MockState(loopback.Pauses):
    """Config and counters, shared by the server thread and the thread that reads them."""

    def __init__(self, config: MockConfig) -> None:
        super().__init__()
        self._initial = config
        self.config = config
        self._lock = threading.Lock()
        self._vendors: dict[str, _VendorCounters] = {}
        self._site = _VendorCounters()
        self.rng = random.Random(config.seed)

    def counters(self, vendor: str) -> _VendorCounters:
        with self._lock:
            return self._vendors.setdefault(vendor, _VendorCounters())

    def count(
        self,
        counters: _VendorCounters,
        status: int,
        *,
        entities: int = 0,
        user_agent: str = "",
        batch_of: int | None = None,
    ) -> None:
        """One request served; `batch_of`: a batch request asking about that many entities."""
        with self._lock:
            counters.requests += 1
            if batch_of is not None:
                counters.batch_requests += 1
                counters.batch_entities += batch_of
            counters.user_agents[user_agent] += 1
            counters.entities += entities
            counters.statuses[str(status)] += 1

    @contextmanager
    def in_flight(self, counters: _VendorCounters) -> Iterator[None]:
        """Track concurrent requests (tests check clients respect their concurrency limit)."""
        with self._lock:
            counters.in_flight += 1
            counters.max_in_flight = max(counters.max_in_flight, counters.in_flight)
        try:
            yield
        finally:
            with self._lock:
                counters.in_flight -= 1

    def count_probe(self, counters: _VendorCounters) -> None:
        with self._lock:
            counters.probes += 1

    def bill(self, counters: _VendorCounters, calls: int, price: float) -> None:
        with self._lock:
            counters.billed += calls
            counters.cost += calls * price

    def site_counters(self) -> _VendorCounters:
        return self._site

    def snapshot(self) -> dict[str, Any]:
        """Calls and cost so far, by vendor (the body of `GET /_stats`)."""
        with self._lock:
            vendors: dict[str, dict[str, Any]] = {
                name: {
                    "requests": c.requests,
                    "probes": c.probes,
                    "entities": c.entities,
                    "billed": c.billed,
                    "cost": round(c.cost, 6),
                    "statuses": dict(c.statuses),
                    "in_flight": c.in_flight,
                    "max_in_flight": c.max_in_flight,
                    "user_agents": dict(c.user_agents),
                    "batch_requests": c.batch_requests,
                    "batch_entities": c.batch_entities,
                    # Entity lookups that reached the vendor: one per single request, one per
                    # entity of a batch request (failed ones included), as a caller counts calls.
                    "lookups": c.requests - c.batch_requests + c.batch_entities,
                }
                for name, c in sorted(self._vendors.items())
            }
            site: dict[str, Any] = {
                "requests": self._site.requests,
                "statuses": dict(self._site.statuses),
                "user_agents": dict(self._site.user_agents),
            }
        return {
            "vendors": vendors,
            "site": site,
            "requests": sum(v["requests"] for v in vendors.values()) + site["requests"],
            "batch_requests": sum(v["batch_requests"] for v in vendors.values()),
            "lookups": sum(v["lookups"] for v in vendors.values()),
            "probes": sum(v["probes"] for v in vendors.values()),
            "cost": round(sum(v["cost"] for v in vendors.values()), 6),
        }

    def reset(self, *, config: bool = False) -> None:
        """Zero the counters; with `config`, also go back to the config the server started with."""
        with self._lock:
            self._vendors.clear()
            self._site = _VendorCounters()
            if config:
                self.config = self._initial
                self.rng = random.Random(self._initial.seed)

    def configure(self, patch: Mapping[str, Any]) -> MockConfig:
        with self._lock:
            self.config = self.config.merged(patch)
            return self.config


# --- the app -------------------------------------------------------------------------------


def create_app(config: MockConfig | None = None, *, state: MockState | None = None) -> Starlette:
    """The mock as an ASGI app (`state` lets the caller read counters without HTTP)."""
    state = state or MockState(config or MockConfig())

    async def lookup_company(request: Request) -> Response:
        return await _lookup(state, request, EntityType.COMPANY)

    async def lookup_person(request: Request) -> Response:
        return await _lookup(state, request, EntityType.PERSON)

    async def batch_company(request: Request) -> Response:
        return await _batch(state, request, EntityType.COMPANY)

    async def batch_person(request: Request) -> Response:
        return await _batch(state, request, EntityType.PERSON)

    async def homepage(request: Request) -> Response:
        return await _homepage(state, request)

    async def vendor_health(request: Request) -> Response:
        return await _vendor_health(state, request)

    async def stats(request: Request) -> Response:
        return JSONResponse(state.snapshot())

    async def reset(request: Request) -> Response:
        state.reset(config=request.query_params.get("config") in ("1", "true"))
        return JSONResponse(state.snapshot())

    async def show_config(request: Request) -> Response:
        if request.method == "POST":
            try:
                patch = await request.json()
                if not isinstance(patch, dict):
                    raise ValueError("the body must be a JSON object")
                state.configure(patch)
            except ValueError as error:  # pydantic's ValidationError is a ValueError
                return JSONResponse({"error": str(error)}, status_code=400)
        return JSONResponse(state.config.model_dump(mode="json"))

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[
            Route("/_stats", stats),
            Route("/_reset", reset, methods=["POST"]),
            Route("/_config", show_config, methods=["GET", "POST"]),
            Route("/_health", health),
            Route("/site/{domain}/", homepage),
            Route("/site/{domain}/hop/{hops:int}", homepage),
            Route("/{vendor}/v1/companies", lookup_company),
            Route("/{vendor}/v1/companies/batch", batch_company, methods=["POST"]),
            Route("/{vendor}/v1/people", lookup_person),
            Route("/{vendor}/v1/people/batch", batch_person, methods=["POST"]),
            Route("/{vendor}/v1/health", vendor_health),
        ]
    )
    app.state.mock = state
    return app


def _vendor(state: MockState, request: Request, entity_type: EntityType) -> tuple[str, Any]:
    name = request.path_params["vendor"]
    vendor = state.config.vendors.get(name)
    if vendor is None:
        return name, _error(400, f"unknown vendor {name!r}")
    if vendor.entity_type is not entity_type:
        return name, _error(400, f"vendor {name!r} serves {vendor.entity_type.value} lookups")
    return name, vendor


async def _misbehave(
    state: MockState, request: Request, vendor: VendorConfig, record_key: str
) -> Response | None:
    """The vendor's bad day, if it is one: latency first, then auth, errors, odd bodies."""
    config = state.config
    await state.pause(vendor.latency.sample(state.rng))
    mode = request.query_params.get("_mode") or vendor.mode
    if mode not in MODES:
        return _error(400, f"unknown _mode {mode!r}")
    if vendor.api_key is not None or mode == "unauthorized":
        sent = request.headers.get(vendor.api_key_header)
        if mode == "unauthorized" or sent != vendor.api_key:
            return _error(401, "invalid or missing API key")
    if mode == "hang":
        await state.pause(config.hang_s)
        return _error(503, "hung up")
    if mode == "rate_limited" or (
        vendor.rate_limit_rate and state.rng.random() < vendor.rate_limit_rate
    ):
        headers = {"Retry-After": vendor.retry_after} if vendor.retry_after is not None else {}
        return _error(429, "slow down", headers=headers)
    if mode == "error" or (vendor.error_rate and state.rng.random() < vendor.error_rate):
        return _error(500, "internal error")
    if mode == "garbage":
        return Response(
            b'{"' + record_key.encode() + b'": {"name": "Acme", <html>',
            200,
            media_type="application/json",
        )
    if mode == "wrong_shape":
        return JSONResponse(
            {record_key: {"name": {"first": "A"}, "metrics": {"employees": "lots"}, "founded": []}}
        )
    if mode in ("huge", "huge_declared"):
        size = config.huge_bytes
        declared = {"Content-Length": str(size)} if mode == "huge_declared" else None
        return StreamingResponse(
            _huge_body(record_key, size), media_type="application/json", headers=declared
        )
    return None


async def _vendor_health(state: MockState, request: Request) -> Response:
    """A vendor's free health endpoint: its key check and its `mode`, never its latency,
    error or rate-limit rates (one unlucky draw must not call a healthy vendor down)."""
    name = request.path_params["vendor"]
    vendor = state.config.vendors.get(name)
    if vendor is None:
        return _error(404, f"unknown vendor {name!r}")
    state.count_probe(state.counters(name))
    mode = vendor.mode
    sent_key = request.headers.get(vendor.api_key_header)
    if mode == "unauthorized" or (vendor.api_key is not None and sent_key != vendor.api_key):
        return _error(401, "invalid or missing API key")
    if mode == "hang":
        await state.pause(state.config.hang_s)
        return _error(503, "hung up")
    if mode == "rate_limited":
        headers = {"Retry-After": vendor.retry_after} if vendor.retry_after is not None else {}
        return _error(429, "slow down", headers=headers)
    if mode == "error":
        return _error(500, "internal error")
    return JSONResponse({"ok": True, "vendor": name})


async def _huge_body(record_key: str, size: int) -> AsyncIterator[bytes]:
    """A valid JSON document of `size` bytes, produced 64 KiB at a time (never all in memory)."""
    head = b'{"' + record_key.encode() + b'": {"name": "'
    tail = b'"}}'
    yield head
    remaining = max(0, size - len(head) - len(tail))
    chunk = b"x" * 65536
    while remaining > 0:
        piece = chunk[: min(len(chunk), remaining)]
        remaining -= len(piece)
        yield piece
    yield tail


async def _lookup(state: MockState, request: Request, entity_type: EntityType) -> Response:
    name, vendor = _vendor(state, request, entity_type)
    if isinstance(vendor, Response):
        return vendor
    counters = state.counters(name)
    with state.in_flight(counters):
        response = await _lookup_response(state, request, name, vendor, entity_type)
    state.count(counters, response.status_code, entities=1, user_agent=_agent(request))
    if response.status_code == 200 or (response.status_code == 404 and vendor.charges_misses):
        state.bill(counters, 1, vendor.cost_per_call)
    return response


async def _lookup_response(
    state: MockState,
    request: Request,
    name: str,
    vendor: VendorConfig,
    entity_type: EntityType,
) -> Response:
    record_key = RECORD_KEYS[entity_type]
    key = _key_from_query(entity_type, request.query_params)
    if key is None:
        return _error(400, f"give one identifier: {IDENTIFIERS[entity_type]}")
    bad = await _misbehave(state, request, vendor, record_key)
    if bad is not None:
        return bad
    if is_miss(name, key, vendor.not_found_rate):
        return _error(404, f"no {entity_type.value} for {key.value}")
    return JSONResponse({record_key: record_for(key, vendor.fields), "vendor": name, "id": key.id})


async def _batch(state: MockState, request: Request, entity_type: EntityType) -> Response:
    name, vendor = _vendor(state, request, entity_type)
    if isinstance(vendor, Response):
        return vendor
    counters = state.counters(name)
    record_key = RECORD_KEYS[entity_type]
    try:
        body = await request.json()
    except ValueError:
        body = None
    found: list[dict[str, Any]] = []
    misses: list[str] = []
    bad: Response | None = None
    asked = 0  # identifiers in a well-formed body
    if not isinstance(body, dict) or len(body) != 1 or next(iter(body)) not in BATCH_KINDS:
        bad = _error(400, f"body must be one of {sorted(BATCH_KINDS)} -> list of identifiers")
    else:
        ((field_name, values),) = body.items()
        kind = BATCH_KINDS[field_name]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            bad = _error(400, f"{field_name} must be a list of strings")
        else:
            asked = len(values)
            with state.in_flight(counters):
                bad = await _misbehave(state, request, vendor, "results")
            for value in values if bad is None else []:
                key = EntityKey(entity_type, kind, value)
                if is_miss(name, key, vendor.not_found_rate):
                    misses.append(value)
                else:
                    found.append({"query": value, record_key: record_for(key, vendor.fields)})
    if bad is not None:
        state.count(counters, bad.status_code, user_agent=_agent(request), batch_of=asked)
        return bad
    state.count(
        counters,
        200,
        entities=len(found) + len(misses),
        user_agent=_agent(request),
        batch_of=asked,
    )
    state.bill(
        counters, len(found) + (len(misses) if vendor.charges_misses else 0), vendor.cost_per_call
    )
    return JSONResponse({"results": found, "not_found": misses, "vendor": name})


async def _homepage(state: MockState, request: Request) -> Response:
    domain = request.path_params["domain"].lower()
    counters = state.site_counters()
    response = await _homepage_response(state, request, domain)
    state.count(counters, response.status_code, user_agent=_agent(request))
    return response


async def _homepage_response(state: MockState, request: Request, domain: str) -> Response:
    await state.pause(state.config.site_latency.sample(state.rng))
    mode = request.query_params.get("_mode", "normal")
    if mode == "redirect_loop":
        return RedirectResponse(str(request.url), status_code=302)
    hops = request.path_params.get("hops")
    if hops:
        target = f"/site/{domain}/hop/{hops - 1}" if hops > 1 else f"/site/{domain}/"
        return RedirectResponse(target, status_code=302)
    if mode == "error":
        return _error(500, "internal error")
    if mode == "huge":
        return StreamingResponse(
            _huge_body("html", state.config.huge_bytes), media_type="text/html"
        )
    key = EntityKey(EntityType.COMPANY, "domain", domain)
    if is_miss("site", key, state.config.site_not_found_rate):
        return HTMLResponse("<html><title>Not found</title></html>", status_code=404)
    return HTMLResponse(homepage_html(domain))


def _key_from_query(entity_type: EntityType, query: Mapping[str, str]) -> EntityKey | None:
    def given(name: str) -> str:
        return (query.get(name) or "").strip()

    if entity_type is EntityType.COMPANY:
        for kind in ("domain", "name"):
            if given(kind):
                return EntityKey(entity_type, kind, given(kind).lower())
        return None
    if given("linkedin"):
        return EntityKey(entity_type, "linkedin", given("linkedin"))
    if given("email"):
        return EntityKey(entity_type, "email", given("email").lower())
    if given("name") and given("company"):
        return EntityKey(entity_type, "name_company", f"{given('name')}|{given('company')}")
    return None


def _agent(request: Request) -> str:
    return request.headers.get("user-agent", "")


def _error(status: int, message: str, *, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


def _put(record: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        record = record.setdefault(part, {})
    record[leaf] = value


def _deep_merge(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --- running it ----------------------------------------------------------------------------


def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    config: MockConfig | None = None,
    *,
    sock: socket.socket | None = None,
) -> None:
    """Run the mock in the foreground until interrupted (`glaze mock-providers`); `sock` as in
    `loopback.serve`."""
    state = MockState(config or MockConfig())
    loopback.serve(create_app(state=state), host, port, sock=sock, on_stop=state.wake_sleepers)


class MockProviderServer(loopback.LoopbackServer):
    """The mock on a free loopback port, in a background thread; a context manager.

    with MockProviderServer() as mock:
        mock.url            # "http://127.0.0.1:<port>"
        mock.stats()        # calls and cost by vendor
        mock.configure({"vendors": {"cheap": {"error_rate": 1.0}}})
    """

    def __init__(self, config: MockConfig | None = None, *, host: str = DEFAULT_HOST) -> None:
        self.state = MockState(config or MockConfig())
        super().__init__(
            create_app(state=self.state),
            name="mock provider",
            host=host,
            on_stop=self.state.wake_sleepers,
        )

    @property
    def url(self) -> str:
        return self.root_url

    def vendor_url(self, vendor: str) -> str:
        return f"{self.url}/{vendor}"

    def site_url(self, domain: str) -> str:
        return f"{self.url}/site/{domain}/"

    def stats(self) -> dict[str, Any]:
        return self.state.snapshot()

    def reset(self, *, config: bool = False) -> None:
        self.state.reset(config=config)

    def configure(self, patch: Mapping[str, Any]) -> MockConfig:
        return self.state.configure(patch)


def load_mock_config(path: str | None) -> MockConfig:
    """A mock config from a JSON or YAML file (None: the defaults)."""
    if not path:
        return MockConfig()
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) if path.endswith((".yaml", ".yml")) else json.load(handle)
    return MockConfig.model_validate(data or {})
