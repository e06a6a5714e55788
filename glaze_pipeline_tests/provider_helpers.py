"""Helpers for provider tests: vendor configs aimed at the mock server, with short waits."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from glaze_pipeline.core.budget import Budget
from glaze_pipeline.core.models import EntityKey, EntityOutcome, EntityRequest, EntityType
from glaze_pipeline.core.providers.base import Provider
from glaze_pipeline.core.providers.http import HttpSettings, provider_session
from glaze_pipeline.core.providers.json_api import JsonApiConfig
from glaze_pipeline.core.waterfall import Waterfall
from glaze_pipeline.mock_server import COMPANY_LAYOUT, MockProviderServer

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
