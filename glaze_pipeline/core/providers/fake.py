"""The deterministic fake provider: seed 001's fake-value table, keyed by entity.

Seed 001 derived each value from the row id; entity-first, the same table is keyed by the
entity, so every row about one company gets the same answer, run after run.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

from glaze_pipeline.core.fields import CATALOGUE
from glaze_pipeline.core.models import EntityKey, EntityType
from glaze_pipeline.core.providers.base import EntityNotFound, ProviderAnswer

COMPANY_NAMES = ("Fake Corp", "Demo Inc", "Sample LLC", "Test Industries", "Mock Systems")
TITLES = ("Fake CEO", "Demo Manager", "Sample Engineer", "Test Director", "Mock VP of Sales")
LOCATIONS = ("San Francisco, CA", "New York, NY", "Austin, TX", "London, UK", "Berlin, DE")
INDUSTRIES = ("Technology", "Finance", "Healthcare", "Retail", "Manufacturing")
PERSON_NAMES = ("Alex Fake", "Sam Demo", "Jordan Sample", "Taylor Test", "Casey Mock")


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("|".join(parts).encode()).digest()[:8], "big")


def _slug(key: EntityKey) -> str:
    return re.sub(r"[^a-z0-9]+", "-", key.value.lower()).strip("-")[:40] or "x"


def fake_value(key: EntityKey, field_name: str) -> object:
    """Seed 001's value for one field of one entity; the same inputs always give the same value."""
    n = _digest(key.id, field_name)
    slug = _slug(key)
    if field_name in ("name", "company"):
        return COMPANY_NAMES[n % len(COMPANY_NAMES)]
    if field_name == "full_name":
        return PERSON_NAMES[n % len(PERSON_NAMES)]
    if field_name == "title":
        return TITLES[n % len(TITLES)]
    if field_name == "email":
        return f"fake_{slug}@example.com"
    if field_name == "bio":
        return f"This is a fake bio for {key.value}. They are a key decision maker."
    if field_name == "description":
        return f"This is a fake description of {key.value}."
    if field_name == "phone":
        return f"+1-555-{n % 10000:04d}"
    if field_name == "linkedin_url":
        kind = "company" if key.type is EntityType.COMPANY else "in"
        return f"https://linkedin.com/{kind}/fake-user-{slug}"
    if field_name == "location":
        return LOCATIONS[n % len(LOCATIONS)]
    if field_name == "industry":
        return INDUSTRIES[n % len(INDUSTRIES)]
    if field_name == "employee_count":
        return 50 + n % 4951
    if field_name == "revenue":
        return f"${1 + n % 500}M"
    if field_name == "founded_year":
        return 1950 + n % 74
    if field_name == "domain":
        return key.value if key.kind == "domain" else f"{slug}.com"
    return f"Enriched: {field_name} ({key.value})"


@dataclass
class FakeProvider:
    """In-process provider with seed 001's values; latency and misses are configurable.

    `miss_rate` makes a deterministic share of entities "not found"; `calls` counts lookups by
    entity id, so tests can check that each entity was asked exactly once.
    """

    entity_type: EntityType
    name: str = ""
    cost_per_call: float = 1.0
    confidence: float = 0.9
    charges_misses: bool = False
    max_concurrency: int = 50
    latency_s: float = 0.0
    miss_rate: float = 0.0
    supplied_fields: frozenset[str] | None = None
    calls: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"fake_{self.entity_type.value}"

    @property
    def fields(self) -> frozenset[str]:
        return self.supplied_fields or CATALOGUE[self.entity_type]

    async def lookup(self, key: EntityKey, fields: frozenset[str]) -> ProviderAnswer:
        self.calls[key.id] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.miss_rate and (_digest(self.name, key.id) % 10_000) < self.miss_rate * 10_000:
            raise EntityNotFound(f"{key} is unknown to {self.name}", provider=self.name)
        return ProviderAnswer({name: fake_value(key, name) for name in self.fields})

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())
