"""Helpers for provider tests: vendor configs aimed at the mock server, with short waits."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from glaze_pipeline.core.budget import Budget
from glaze_pipeline.core.models import EntityKey, EntityOutcome, EntityRequest, EntityType
from glaze_pipeline.core.providers.base import Provider
from glaze_pipeline.core.providers.http import HttpSettings, RateLimiter, provider_session
from glaze_pipeline.core.providers.json_api import JsonApiConfig
from glaze_pipeline.core.waterfall import Waterfall
from glaze_pipeline.testing.mock_server import (
    COMPANY_LAYOUT,
    MockConfig,
    MockProviderServer,
    VendorConfig,
)

# Small timeouts and backoffs: every resilience path runs in milliseconds.
FAST_HTTP: dict[str, Any] = {
    "connect_timeout_s": 0.5,
    "read_timeout_s": 1.0,
    "attempt_timeout_s": 2.0,
    "retries": 2,
    "backoff_base_s": 0.01,
    "backoff_max_s": 0.02,
    "retry_after_max_s": 0.2,
    "breaker_threshold": None,
    "max_concurrency": 10,
}

CHEAP_FIELDS = ("name", "domain", "industry", "employee_count", "location")


def quiet_vendors() -> dict[str, VendorConfig]:
    """The seed file's vendors, answering at once and knowing every entity (until a test
    configures otherwise)."""
    return {
        "cheap": VendorConfig(
            entity_type=EntityType.COMPANY, fields=list(CHEAP_FIELDS), cost_per_call=1.0
        ),
        "premium": VendorConfig(
            entity_type=EntityType.COMPANY, cost_per_call=10.0, charges_misses=True
        ),
        "people": VendorConfig(entity_type=EntityType.PERSON, cost_per_call=3.0),
    }


def quiet_mock() -> MockProviderServer:
    """A mock server of `quiet_vendors` (start it with `with`)."""
    return MockProviderServer(
        MockConfig(vendors=quiet_vendors(), site_not_found_rate=0.0, hang_s=5.0)
    )


def fast_http(**overrides: Any) -> HttpSettings:
    return HttpSettings(**{**FAST_HTTP, **overrides})


def company_vendor(
    base_url: str,
    *,
    name: str = "premium_company",
    fields: Iterable[str] | None = None,
    params: dict[str, str] | None = None,
    http: dict[str, Any] | None = None,
    **overrides: Any,
) -> JsonApiConfig:
    """A company JSON API config for a mock vendor at `base_url` (e.g. `mock.vendor_url(...)`)."""
    wanted = list(fields) if fields is not None else list(COMPANY_LAYOUT)
    config: dict[str, Any] = {
        "name": name,
        "entity_type": "company",
        "base_url": base_url,
        "lookups": {
            "domain": {"path": "/v1/companies", "params": {"domain": "{value}", **(params or {})}},
            "name": {"path": "/v1/companies", "params": {"name": "{value}", **(params or {})}},
        },
        "batch": {
            "path": "/v1/companies/batch",
            "key_kind": "domain",
            "ids_field": "domains",
            "id_path": "query",
        },
        "record_path": "company",
        "fields": {field: COMPANY_LAYOUT[field] for field in wanted},
        "cost_per_call": 10.0,
        "confidence": 0.95,
        "http": {**FAST_HTTP, **(http or {})},
    }
    config.update(overrides)
    return JsonApiConfig.model_validate(config)


def company(domain: str) -> EntityKey:
    return EntityKey(EntityType.COMPANY, "domain", domain)


def configure_vendor(mock: MockProviderServer, vendor: str, **settings: Any) -> None:
    mock.configure({"vendors": {vendor: settings}})


async def run_waterfall(
    providers: list[Provider],
    requests: list[EntityRequest],
    budget: Budget,
    *,
    threshold: float = 0.8,
) -> tuple[list[EntityOutcome], Waterfall]:
    """What one engine chunk does: a waterfall over the requests, clients closed at the end."""
    waterfall = Waterfall(providers, budget=budget, threshold=threshold)
    async with provider_session(providers):
        outcomes = await waterfall.enrich_many(requests)
    return outcomes, waterfall


def wait_until(condition: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# --- loopback servers and names of a test's own --------------------------------------------------


@dataclass(frozen=True)
class Page:
    """What a LoopbackSite answers on one path."""

    status: int = 200
    body: str = ""
    headers: Mapping[str, str] = field(
        default_factory=lambda: {"Content-Type": "text/html; charset=utf-8"}
    )


class LoopbackSite:
    """A tiny HTTP server of the test's own on one loopback address, counting what it serves.

    `pages` by path (a path ending in `*` matches any path with that start), else `default`.
    `requests` lists every (path, headers) it received, so a test can show that a refused
    target was never even contacted.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        port: int = 0,
        pages: Mapping[str, Page] | None = None,
        default: Page | None = None,
    ) -> None:
        self.host = host
        self.pages = dict(pages or {})
        self.default = default or Page(404, "no such page")
        self.requests: list[tuple[str, dict[str, str]]] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.requests.append((self.path, dict(self.headers.items())))
                page = site.page(self.path)
                body = page.body.encode("utf-8")
                self.send_response(page.status)
                for name, value in page.headers.items():
                    self.send_header(name, value.replace("{port}", str(site.port)))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True

        self._server = Server((host, port), Handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def page(self, path: str) -> Page:
        for pattern, page in self.pages.items():
            if path == pattern or (pattern.endswith("*") and path.startswith(pattern[:-1])):
                return page
        return self.default

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> LoopbackSite:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self.close()
        self._thread.join(timeout=5)

    def close(self) -> None:
        """Release the socket (a site that was never started needs only this)."""
        self._server.server_close()


def fake_dns(monkeypatch: pytest.MonkeyPatch, names: Mapping[str, Any]) -> list[str]:
    """Resolve made-up names without a DNS server: `socket.getaddrinfo` answers `names` (a name
    to an address, a list of them, or a callable giving one per call), the real resolver
    everything else. Returns the log of the made-up names asked, in order."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in names:
            return real(host, port, *args, **kwargs)
        asked.append(name)
        found = names[name]
        found = found() if callable(found) else found
        addresses = [found] if isinstance(found, str) else list(found)
        number = int(port or 0)
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, number, 0, 0))
            if ":" in a
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, number))
            for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


class FrozenTime:
    """A clock that never moves and a sleep that records what it was asked and returns at once:
    a rate limiter on it hands out its waits as numbers a test can assert, in no time."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def clock(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        await asyncio.sleep(0)  # still a suspension point, as the real one is

    def limiter(self, rate_per_s: float | None, burst: int = 1) -> RateLimiter:
        return RateLimiter(rate_per_s, burst, clock=self.clock, sleep=self.sleep)
