"""Estimates: what a job would buy, without buying anything, as an upper bound and an expectation.

Both walk each entity through the real waterfall's order (cheapest first, a provider asked only
for fields still open, its key kinds respected, the threshold and the key's strength applied)
against a read-only view of the cache: a cached answer costs nothing and closes what it closes.

* The **upper bound** assumes every uncached lookup misses and is charged: every provider that
  could be asked is asked. No run of the job can spend more (nor more than its budget).
* The **expectation** follows each provider's observed shares, per kind of key: how often a
  lookup found the entity, how often it was charged, and how often each field asked of a found
  entity came back filled (`provider_observations`, recorded by every enrichment job). With no
  history yet it uses a stated prior, weighted as `PRIOR_WEIGHT` lookups, which the history
  outweighs as it grows.

Each entity's walk is a small distribution over (fields still open, fields holding a value,
fields only an unusable provider could have answered): exact, not sampled, so the figures are
the same every time for the same table and history. Entities with no cached answer and the same
kind of key and fields share one walk.

Unusable providers (the preflight's verdicts) are never asked, as in the job: their fields are
counted as cells the job will skip, and they cost nothing.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from glaze_pipeline.core.cache import AnswerCache, CachedAnswer
from glaze_pipeline.core.models import EntityRequest, Observation
from glaze_pipeline.core.providers.base import AlwaysAnswers, Provider
from glaze_pipeline.core.waterfall import supports, waterfall_order

# The prior when a provider has no history for a kind of key: it finds 80 % of what it is asked
# about, and a found record holds 90 % of the fields it declares. Worth PRIOR_WEIGHT lookups.
PRIOR_FOUND = 0.8
PRIOR_FILLED = 0.9
PRIOR_WEIGHT = 10
# Fields whose fill share is this close to 0 or 1 do not branch the walk; past MAX_BRANCHING
# uncertain fields, a field counts as filled when its share is at least a half (so a request for
# a dozen fields stays a small walk).
CERTAIN = 1e-3
MAX_BRANCHING = 6
# Shares of the fillable cells the budget guidance quotes a budget for.
GUIDANCE_SHARES = (0.5, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class Rates:
    """What a lookup of one provider by one kind of key is expected to do."""

    found: float
    charged: float
    filled: Mapping[str, float]
    default_filled: float
    lookups: int = 0
    since: datetime | None = None
    prior_found: float = PRIOR_FOUND

    def fill(self, name: str) -> float:
        return self.filled.get(name, self.default_filled)

    def basis(self) -> str:
        if self.lookups == 0:
            return (
                f"prior, no history yet: {self.prior_found:.0%} found, "
                f"{self.default_filled:.0%} of a found record's fields filled"
            )
        since = f" since {self.since:%Y-%m-%d}" if self.since is not None else ""
        return f"from {self.lookups:,} lookups{since}"


WORST = Rates(found=0.0, charged=1.0, filled={}, default_filled=0.0)


def observed_rates(
    provider: Provider, observation: Observation | None, since: datetime | None = None
) -> Rates:
    """The provider's shares for one kind of key: its history, smoothed toward the prior.

    A provider that says it `always_answers` (an LLM answers every question it is asked) has a
    prior of every lookup found and every field filled; any other, PRIOR_FOUND and PRIOR_FILLED.
    """
    always = isinstance(provider, AlwaysAnswers) and bool(provider.always_answers)
    prior_found, prior_filled = (1.0, 1.0) if always else (PRIOR_FOUND, PRIOR_FILLED)
    prior_charged = prior_found + (1 - prior_found) * float(provider.charges_misses)
    seen = observation or Observation()
    weight = seen.lookups + PRIOR_WEIGHT

    def share(count: int, prior: float) -> float:
        return (count + prior * PRIOR_WEIGHT) / weight

    filled = {
        name: (hits + prior_filled * PRIOR_WEIGHT) / (asked + PRIOR_WEIGHT)
        for name, (asked, hits) in seen.fields.items()
    }
    return Rates(
        found=share(seen.found, prior_found),
        charged=share(seen.charged, prior_charged),
        filled=filled,
        default_filled=prior_filled,
        lookups=seen.lookups,
        since=since if seen.lookups else None,
        prior_found=prior_found,
    )


Observations = Mapping[tuple[str, str], tuple[Observation, datetime]]


@dataclass
class Walk:
    """One entity's expected (or worst-case) walk through the waterfall."""

    calls: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    cache_hits: float = 0.0
    filled: float = 0.0  # expected fields that end with a value
    unavailable: float = 0.0  # expected fields left to an unusable provider
    variance: float = 0.0  # of the entity's cost (of the total, once walks are added up)


# (open fields, fields holding a value, fields an unusable provider was needed for) -> chance
_State = tuple[frozenset[str], frozenset[str], frozenset[str]]


class _Mass:
    """One state's chance, with the first and second moments of the cost paid to reach it
    (E[cost; state], E[cost²; state]): enough for the walk's mean and variance."""

    __slots__ = ("chance", "cost", "square")

    def __init__(self) -> None:
        self.chance = self.cost = self.square = 0.0

    def add(self, source: _Mass, share: float, mean: float = 0.0, variance: float = 0.0) -> None:
        """Move `share` of `source` here, paying a cost of this `mean` and `variance` on the
        way (independent of what was paid before)."""
        self.chance += share * source.chance
        self.cost += share * (source.cost + source.chance * mean)
        self.square += share * (
            source.square + 2 * mean * source.cost + source.chance * (mean * mean + variance)
        )


def walk(
    order: Sequence[Provider],
    request: EntityRequest,
    *,
    rates: Mapping[str, Rates] | None,
    cached: Mapping[str, CachedAnswer],
    threshold: float,
    unavailable: Mapping[str, str],
) -> Walk:
    """The expected walk of one entity (`rates` by provider name; None: the worst case)."""
    key = request.key
    result = Walk()
    start = _Mass()
    start.chance = 1.0
    states: dict[_State, _Mass] = {(request.fields, frozenset(), frozenset()): start}
    for provider in order:
        if not supports(provider, key):
            continue
        following: defaultdict[_State, _Mass] = defaultdict(_Mass)
        for (open_, held, blocked), mass in states.items():
            chance = mass.chance
            asked = open_ & provider.fields
            if not asked:
                following[(open_, held, blocked)].add(mass, 1.0)
                continue
            answer = cached.get(provider.name)
            if answer is not None:
                result.cache_hits += chance
                have = frozenset(n for n in asked if answer.found and _has(answer.values, n))
                done = frozenset(
                    n
                    for n in have
                    if answer.confidence.get(n, provider.confidence) * key.strength >= threshold
                )
                following[(open_ - done, held | have, blocked)].add(mass, 1.0)
                continue
            if provider.name in unavailable:
                following[(open_, held, blocked | asked)].add(mass, 1.0)
                continue
            rate = rates[provider.name] if rates is not None else WORST
            price = provider.cost_per_call
            result.calls[provider.name] = result.calls.get(provider.name, 0.0) + chance
            result.cost[provider.name] = (
                result.cost.get(provider.name, 0.0) + chance * rate.charged * price
            )
            when_found, when_missed = _charged_shares(rate, provider.charges_misses)
            missed = _charge(price, when_missed)
            following[(open_, held, blocked)].add(mass, 1 - rate.found, *missed)
            if rate.found <= 0:
                continue
            found = _charge(price, when_found)
            closing = provider.confidence * key.strength >= threshold
            for filled, share in _outcomes(asked, rate):
                done = filled if closing else frozenset()
                following[(open_ - done, held | filled, blocked)].add(
                    mass, rate.found * share, *found
                )
        states = following
    spent = square = 0.0
    for (_open, held, blocked), mass in states.items():
        result.filled += mass.chance * len(held)
        result.unavailable += mass.chance * len(blocked - held)
        spent += mass.cost
        square += mass.square
    result.variance = max(0.0, square - spent * spent)
    return result


def _charged_shares(rate: Rates, charges_misses: bool) -> tuple[float, float]:
    """(P(charged | found), P(charged | missed)) consistent with the overall charged share: a
    vendor that charges misses charges every found lookup, one that does not charges no miss
    (the shares an error, charged nothing, takes off the rest)."""
    if charges_misses:
        missed = (rate.charged - rate.found) / (1 - rate.found) if rate.found < 1 else 0.0
        return 1.0, min(1.0, max(0.0, missed))
    found = rate.charged / rate.found if rate.found > 0 else 0.0
    return min(1.0, max(0.0, found)), 0.0


def _charge(price: float, share: float) -> tuple[float, float]:
    """Mean and variance of a charge of `price` made with chance `share`."""
    return price * share, price * price * share * (1 - share)


def _has(values: Mapping[str, Any], name: str) -> bool:
    value = values.get(name)
    return value is not None and value != ""


def _outcomes(asked: frozenset[str], rate: Rates) -> Iterable[tuple[frozenset[str], float]]:
    """Which of `asked` a found record fills, with their chances (fields independent)."""
    certain = frozenset(n for n in asked if rate.fill(n) >= 1 - CERTAIN)
    uncertain = sorted(n for n in asked if CERTAIN < rate.fill(n) < 1 - CERTAIN)
    if len(uncertain) > MAX_BRANCHING:
        certain |= frozenset(n for n in uncertain if rate.fill(n) >= 0.5)
        uncertain = []
    for picks in itertools.product((True, False), repeat=len(uncertain)):
        share = 1.0
        filled = set(certain)
        for name, pick in zip(uncertain, picks, strict=True):
            share *= rate.fill(name) if pick else 1 - rate.fill(name)
            if pick:
                filled.add(name)
        yield frozenset(filled), share


@dataclass
class EstimatePart:
    """The estimate of one chunk of entities; parts merge into the job's."""

    expected: Walk = field(default_factory=Walk)
    worst: Walk = field(default_factory=Walk)
    # Per entity in the job's order: (expected cost, expected cells filled), for the guidance.
    curve: list[tuple[float, float]] = field(default_factory=list)
    entities: dict[str, int] = field(default_factory=dict)  # by entity type
    cells_unavailable: float = 0.0  # expected cells skipped: only an unusable provider had them
    bases: dict[str, dict[str, Any]] = field(default_factory=dict)  # provider -> key kind -> ...
    # How much the expected cost moves when a provider's found share for a kind of key is one
    # standard error higher: the share is learnt from a finite history, so it is uncertain too.
    sensitivity: dict[tuple[str, str], float] = field(default_factory=dict)

    def merge(self, other: EstimatePart) -> None:
        for mine, theirs in ((self.expected, other.expected), (self.worst, other.worst)):
            _add(mine, theirs, 1.0)
        self.curve.extend(other.curve)
        for kind, count in other.entities.items():
            self.entities[kind] = self.entities.get(kind, 0) + count
        self.cells_unavailable += other.cells_unavailable
        for name, kinds in other.bases.items():
            for kind, basis in kinds.items():
                self.bases.setdefault(name, {}).setdefault(kind, basis)
        for pair, delta in other.sensitivity.items():
            self.sensitivity[pair] = self.sensitivity.get(pair, 0.0) + delta

    def cost_variance(self) -> float:
        """Of the total expected cost: chance in each lookup plus the shares' uncertainty."""
        return self.expected.variance + sum(d * d for d in self.sensitivity.values())


def _add(total: Walk, part: Walk, times: float) -> None:
    for name, calls in part.calls.items():
        total.calls[name] = total.calls.get(name, 0.0) + calls * times
    for name, cost in part.cost.items():
        total.cost[name] = total.cost.get(name, 0.0) + cost * times
    total.cache_hits += part.cache_hits * times
    total.filled += part.filled * times
    total.unavailable += part.unavailable * times
    total.variance += part.variance * times  # entities answer independently


def estimate_chunk(
    chunk: Sequence[EntityRequest],
    providers: Sequence[Provider],
    *,
    cache: AnswerCache | None,
    observations: Observations,
    threshold: float,
    unavailable: Mapping[str, str],
) -> EstimatePart:
    """The upper bound and the expectation for one chunk (one batched cache read)."""
    order = waterfall_order(providers)
    cached: dict[tuple[str, str], CachedAnswer] = {}
    if cache is not None:
        cached = cache.get_many(
            (request.key.id, provider.name)
            for request in chunk
            for provider in order.get(request.key.type, [])
        )
    rates: dict[str, dict[str, Rates]] = {}  # key kind -> provider -> rates
    part = EstimatePart()

    def walk_with(
        request: EntityRequest,
        sequence: Sequence[Provider],
        shares: Mapping[str, Rates] | None,
        mine: Mapping[str, CachedAnswer],
    ) -> Walk:
        return walk(
            sequence,
            request,
            rates=shares,
            cached=mine,
            threshold=threshold,
            unavailable=unavailable,
        )

    # Each entity once: its walks (shared by uncached entities alike), kept for the
    # sensitivity pass below with what it needs.
    walked: list[tuple[EntityRequest, list[Provider], dict[str, CachedAnswer], float]] = []
    shared: dict[tuple[Any, ...], tuple[Walk, Walk]] = {}
    for request in chunk:
        key = request.key
        sequence = order.get(key.type, [])
        by_name = rates.setdefault(key.kind, {})
        for provider in sequence:
            if provider.name not in by_name:
                seen = observations.get((provider.name, key.kind))
                by_name[provider.name] = observed_rates(
                    provider, seen[0] if seen else None, seen[1] if seen else None
                )
        mine = {p.name: cached[(key.id, p.name)] for p in sequence if (key.id, p.name) in cached}
        signature = (key.type, key.kind, key.strength, request.fields)
        walks = shared.get(signature) if not mine else None
        if walks is None:
            walks = (
                walk_with(request, sequence, by_name, mine),
                walk_with(request, sequence, None, mine),
            )
            if not mine:
                shared[signature] = walks
        expected, worst = walks
        _add(part.expected, expected, 1.0)
        _add(part.worst, worst, 1.0)
        part.entities[key.type.value] = part.entities.get(key.type.value, 0) + 1
        per_field = (request.cells or len(request.fields)) / max(1, len(request.fields))
        part.cells_unavailable += expected.unavailable * per_field
        spend = sum(expected.cost.values())
        part.curve.append((spend, expected.filled * per_field))
        walked.append((request, sequence, mine, spend))

    by_provider = {provider.name: provider for provider in providers}
    for kind, by_name in rates.items():
        for name, rate in by_name.items():
            part.bases.setdefault(name, {})[kind] = _basis(rate)
            if name in unavailable:
                continue
            provider = by_provider[name]
            changed = {**by_name, name: _one_error_higher(rate, provider.charges_misses)}
            moved = 0.0
            memo: dict[tuple[Any, ...], float] = {}  # uncached entities alike walk alike
            for request, sequence, mine, spend in walked:
                if request.key.kind != kind or provider not in sequence:
                    continue
                same = (request.key.type, request.key.strength, request.fields)
                if not mine and same in memo:
                    moved += memo[same]
                    continue
                delta = sum(walk_with(request, sequence, changed, mine).cost.values()) - spend
                if not mine:
                    memo[same] = delta
                moved += delta
            part.sensitivity[(name, kind)] = moved
    return part


def _one_error_higher(rate: Rates, charges_misses: bool) -> Rates:
    """`rate` with its found share one standard error higher (the charged share following
    it as the vendor charges), for the estimate's sensitivity to a short history."""
    weight = rate.lookups + PRIOR_WEIGHT
    error = math.sqrt(max(rate.found * (1 - rate.found), 0.0) / weight)
    found = min(1.0, rate.found + error)
    when_found, when_missed = _charged_shares(rate, charges_misses)
    return Rates(
        found=found,
        charged=found * when_found + (1 - found) * when_missed,
        filled=rate.filled,
        default_filled=rate.default_filled,
        lookups=rate.lookups,
        since=rate.since,
        prior_found=rate.prior_found,
    )


def _basis(rate: Rates) -> dict[str, Any]:
    return {
        "found_share": round(rate.found, 4),
        "charged_share": round(rate.charged, 4),
        "lookups": rate.lookups,
        "basis": rate.basis(),
    }


def budget_guidance(
    curve: Sequence[tuple[float, float]], *, budget: float | None = None
) -> dict[str, Any]:
    """Which budget fills what share of the cells the job is expected to fill.

    The job spends entity after entity in its order, so the budget that fills a share is the
    expected spend up to the entity where that share of the expected cells is reached.
    """
    total_cells = sum(cells for _cost, cells in curve)
    points: list[dict[str, Any]] = []
    spent = filled = 0.0
    shares = list(GUIDANCE_SHARES)
    for cost, cells in curve:
        spent += cost
        filled += cells
        while shares and total_cells > 0 and filled >= shares[0] * total_cells - 1e-9:
            point = {
                "budget": _round_up(spent),
                "share_of_fillable": shares.pop(0),
                "cells_filled": round(filled),
            }
            if points and points[-1]["budget"] == point["budget"]:
                points[-1] = point  # the same budget fills the larger share: quote that one
            else:
                points.append(point)
    guidance: dict[str, Any] = {"points": points, "expected_cells_filled": round(total_cells)}
    if budget is not None:
        spent = filled = 0.0
        for cost, cells in curve:
            if spent + cost > budget + 1e-9:
                break
            spent += cost
            filled += cells
        guidance["at_budget"] = {
            "budget": budget,
            "cells_filled": round(filled),
            "share_of_fillable": round(filled / total_cells, 4) if total_cells else 1.0,
            "expected_cost": round(spent, 6),
        }
    return guidance


def _round_up(amount: float) -> float:
    """A budget to quote: rounded up to two significant figures (never below the amount)."""
    if amount <= 0:
        return 0.0
    step = 10 ** (math.floor(math.log10(amount)) - 1)
    return round(math.ceil(amount / step - 1e-9) * step, 6)


def guidance_text(guidance: Mapping[str, Any]) -> str:
    """E.g. "budget 1,100 fills ~50 %, 1,800 ~80 %, 2,000 ~90 % and 2,200 all of the ~1,175
    cells this job is expected to fill"."""
    points = guidance.get("points") or []
    if not points:
        return "no cell is expected to be filled"
    quoted = [
        f"{point['budget']:,.6g} "
        + ("all" if point["share_of_fillable"] >= 1 else f"~{point['share_of_fillable']:.0%}")
        for point in points
    ]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
    total = guidance.get("expected_cells_filled", 0)
    return f"budget {listed} of the ~{total:,} cells this job is expected to fill"


def estimate_report(
    part: EstimatePart,
    *,
    providers: Sequence[Provider],
    entities: int,
    cells: int,
    cells_without_identifier: int,
    unavailable: Mapping[str, str],
    budget: float | None = None,
) -> dict[str, Any]:
    """The figures stored on an `estimate` request (JSON), per provider and in total.

    `expected_*` is the expectation, `max_*` the upper bound (with a budget, the spend can never
    pass the budget either: `max_cost` says the bound, `budget` the cap).
    """
    expected, worst = part.expected, part.worst
    per_provider: dict[str, Any] = {}
    for provider in sorted(providers, key=lambda p: (p.entity_type, p.cost_per_call, p.name)):
        name = provider.name
        if name not in part.bases and name not in unavailable:
            continue
        reason = unavailable.get(name)
        of_type = part.entities.get(provider.entity_type.value, 0)
        per_provider[name] = {
            "entity_type": provider.entity_type.value,
            "status": "unavailable" if reason else "ok",
            "reason": reason,
            "expected_calls": round(expected.calls.get(name, 0.0), 1),
            "expected_cost": round(expected.cost.get(name, 0.0), 2),
            "max_calls": round(worst.calls.get(name, 0.0)),
            "max_cost": round(worst.cost.get(name, 0.0), 6),
            # How far the waterfall is expected to go: the share of its entities it is asked.
            "reach": round(expected.calls.get(name, 0.0) / of_type, 4) if of_type else 0.0,
            "by_key_kind": part.bases.get(name, {}),
        }
    expected_cost = round(sum(expected.cost.values()), 2)
    max_cost = round(sum(worst.cost.values()), 6)
    # Chance alone (which entities each vendor turns out to know) spreads the cost around the
    # expectation; ~95 % of runs land within two standard deviations. The rates' own
    # uncertainty (a short history) is not in it.
    spread = math.sqrt(part.cost_variance())
    cost_range = [
        round(max(0.0, expected_cost - 2 * spread), 2),
        round(min(max_cost, expected_cost + 2 * spread), 2),
    ]
    guidance = budget_guidance(part.curve, budget=budget)
    return {
        "unique_entities": entities,
        "cells": cells,
        "cells_without_identifier": cells_without_identifier,
        "cache_hits": round(expected.cache_hits),
        "expected_cost": expected_cost,
        "expected_cost_sd": round(spread, 2),
        "expected_cost_range": cost_range,
        "max_cost": max_cost,
        "budget": budget,
        "expected_cells_filled": guidance["expected_cells_filled"],
        "cells_provider_unavailable": round(part.cells_unavailable),
        "expected_provider_calls": {k: round(v, 1) for k, v in sorted(expected.calls.items()) if v},
        "expected_cost_by_provider": {
            k: round(v, 2) for k, v in sorted(expected.cost.items()) if v
        },
        "max_provider_calls": {k: round(v) for k, v in sorted(worst.calls.items()) if v},
        "max_cost_by_provider": {k: round(v, 6) for k, v in sorted(worst.cost.items()) if v},
        "providers": per_provider,
        "unavailable_providers": dict(unavailable),
        "budget_guidance": guidance,
        "guidance": guidance_text(guidance),
    }
