"""The deterministic fake provider: seed 001's fake-value table, keyed by entity.

Seed 001 derived each value from the row id; entity-first, the same table is keyed by the
entity, so every row about one company gets the same answer, run after run.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from glaze_pipeline.core.fields import CATALOGUE, FIELDS
from glaze_pipeline.core.models import EntityKey, EntityType
from glaze_pipeline.core.providers.base import EntityNotFound, ProviderAnswer, ProviderKind

COMPANY_NAMES = ("Fake Corp", "Demo Inc", "Sample LLC", "Test Industries", "Mock Systems")
TITLES = ("Fake CEO", "Demo Manager", "Sample Engineer", "Test Director", "Mock VP of Sales")
LOCATIONS = ("San Francisco, CA", "New York, NY", "Austin, TX", "London, UK", "Berlin, DE")
INDUSTRIES = ("Technology", "Finance", "Healthcare", "Retail", "Manufacturing")
PERSON_NAMES = ("Alex Fake", "Sam Demo", "Jordan Sample", "Taylor Test", "Casey Mock")


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("|".join(parts).encode()).digest()[:8], "big")


def _slug(key: EntityKey) -> str:
    return re.sub(r"[^a-z0-9]+", "-", key.value.lower()).strip("-")[:40] or "x"


# Seed 001's value of each catalogue field, from the entity, its digest `n` (of the entity id
# and the field name) and its slug. Keyed by field name: `phone` and `location` are made the
# same way for a company and a person.
ValueMaker = Callable[[EntityKey, int, str], object]
_VALUES: dict[str, ValueMaker] = {
    "name": lambda key, n, slug: COMPANY_NAMES[n % len(COMPANY_NAMES)],
    "company": lambda key, n, slug: COMPANY_NAMES[n % len(COMPANY_NAMES)],
    "full_name": lambda key, n, slug: PERSON_NAMES[n % len(PERSON_NAMES)],
    "title": lambda key, n, slug: TITLES[n % len(TITLES)],
    "email": lambda key, n, slug: f"fake_{slug}@example.com",
    "bio": lambda key, n, slug: (
        f"This is a fake bio for {key.value}. They are a key decision maker."
    ),
    "description": lambda key, n, slug: f"This is a fake description of {key.value}.",
    "phone": lambda key, n, slug: f"+1-555-{n % 10000:04d}",
    "linkedin_url": lambda key, n, slug: (
        f"https://linkedin.com/{'company' if key.type is EntityType.COMPANY else 'in'}"
        f"/fake-user-{slug}"
    ),
    "location": lambda key, n, slug: LOCATIONS[n % len(LOCATIONS)],
    "industry": lambda key, n, slug: INDUSTRIES[n % len(INDUSTRIES)],
    "employee_count": lambda key, n, slug: 50 + n % 4951,
    "revenue": lambda key, n, slug: f"${1 + n % 500}M",
    "founded_year": lambda key, n, slug: 1950 + n % 74,
    "domain": lambda key, n, slug: key.value if key.kind == "domain" else f"{slug}.com",
}
# A catalogue field the fake cannot fill would leave the demos and every test without it.
_unfilled = sorted({str(field.ref) for field in FIELDS if field.name not in _VALUES})
if _unfilled:
    raise AssertionError(f"no fake value for catalogue fields {_unfilled}: add one to _VALUES")


def fake_value(key: EntityKey, field_name: str) -> object:
    """Seed 001's value for one field of one entity; the same inputs always give the same value."""
    make = _VALUES.get(field_name)
    if make is None:
        return f"Enriched: {field_name} ({key.value})"
    return make(key, _digest(key.id, field_name), _slug(key))


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


class FakeConfig(BaseModel):
    """The in-process fake provider (seed 001's values), for demos and tests."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["fake"] = "fake"
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    entity_type: EntityType
    cost_per_call: float = Field(default=1.0, ge=0)
    confidence: float = Field(default=0.9, ge=0, le=1)
    charges_misses: bool = False
    max_concurrency: int = Field(default=50, ge=1)
    latency_s: float = Field(default=0.0, ge=0)
    miss_rate: float = Field(default=0.0, ge=0, le=1)
    fields: list[str] | None = None
    enabled: bool = True

    @model_validator(mode="after")
    def _known_fields(self) -> FakeConfig:
        unknown = sorted(set(self.fields or ()) - CATALOGUE[self.entity_type])
        if unknown:
            raise ValueError(f"{self.name}: unknown {self.entity_type.value} fields {unknown}")
        return self


def build_fake(entry: FakeConfig) -> FakeProvider:
    """The fake provider a `kind: fake` entry describes."""
    return FakeProvider(
        entry.entity_type,
        name=entry.name,
        cost_per_call=entry.cost_per_call,
        confidence=entry.confidence,
        charges_misses=entry.charges_misses,
        max_concurrency=entry.max_concurrency,
        latency_s=entry.latency_s,
        miss_rate=entry.miss_rate,
        supplied_fields=frozenset(entry.fields) if entry.fields else None,
    )


KIND = ProviderKind(config=FakeConfig, provider=FakeProvider, build=build_fake)
