"""The waterfall: ask providers cheapest first, stop as soon as every field is good enough."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from glaze_pipeline.core.budget import Budget
from glaze_pipeline.core.cache import (
    AnswerCache,
    CachedAnswer,
    CacheKey,
    read_one,
    tiers_of,
    write_one,
)
from glaze_pipeline.core.detection import (
    NAME_KEY_STRENGTH,
    company_domain,
    linkedin_slug,
    normalize_company_name,
    normalize_email,
    normalize_person_name,
    work_email_domain,
)
from glaze_pipeline.core.flight import Flight, NoFlight
from glaze_pipeline.core.models import (
    CellStatus,
    EntityKey,
    EntityOutcome,
    EntityRequest,
    EntityType,
    FieldOutcome,
    FieldValue,
    Observation,
)
from glaze_pipeline.core.providers.base import (
    ChoosesKeys,
    CredentialsMissing,
    EntityNotFound,
    KnowsWhenUnavailable,
    NamesItsSource,
    Provider,
    ProviderAnswer,
    ProviderError,
    ProviderUnavailable,
    Unreachable,
    has_capability,
)
from glaze_pipeline.core.spend import SpendJournal

log = logging.getLogger(__name__)

BUDGET_EXHAUSTED = "budget exhausted"
CANCELLED = "cancelled"
DEFAULT_THRESHOLD = 0.8
# Why a lookup never left the machine (`WaterfallStats.not_sent`).
NOT_SENT_UNAVAILABLE = "provider unavailable"  # preflight verdict, open circuit, missing key
NOT_SENT_BUDGET = "budget"  # the budget could not cover it
NOT_SENT_REFUSED = "refused"  # refused on the way out (e.g. an address the guard refuses)
NOT_SENT_UNREACHABLE = "unreachable"  # no attempt could connect to the vendor


def unavailable_error(provider: str, reason: str) -> str:
    """A cell's error when the only providers left for it could not be asked."""
    return f"provider unavailable ({provider}: {reason})"


@dataclass
class WaterfallStats:
    """What a batch of lookups cost: calls and spend per provider, cache hits.

    `shared_hits` counts the cache hits that another run bought while this one was between its
    prefetch and its single-flight claim (they are counted in `cache_hits` too).

    `calls` are lookups that left the machine; `not_sent` counts, by provider and reason, the
    ones that never did (an unusable provider, the budget, a refusal on the way out).
    `observed` is what the calls answered, by (provider, key kind), for the estimate.
    """

    calls: Counter[str] = field(default_factory=Counter)
    cost: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    errors: Counter[str] = field(default_factory=Counter)
    cache_hits: int = 0
    shared_hits: int = 0
    not_sent: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    observed: dict[tuple[str, str], Observation] = field(default_factory=dict)

    def merge(self, other: WaterfallStats) -> None:
        self.calls.update(other.calls)
        for name, cost in other.cost.items():
            self.cost[name] += cost
        self.errors.update(other.errors)
        self.cache_hits += other.cache_hits
        self.shared_hits += other.shared_hits
        for name, reasons in other.not_sent.items():
            self.not_sent[name].update(reasons)
        for key, observation in other.observed.items():
            self.observed.setdefault(key, Observation()).merge(observation)

    def not_sent_dict(self) -> dict[str, dict[str, int]]:
        return {name: dict(reasons) for name, reasons in sorted(self.not_sent.items()) if reasons}

    def observe(self, provider: str, kind: str) -> Observation:
        return self.observed.setdefault((provider, kind), Observation())


@dataclass
class _Progress:
    """The running state of one entity's waterfall."""

    wanted: frozenset[str]
    best: dict[str, FieldValue] = field(default_factory=dict)
    not_found: set[str] = field(default_factory=set)
    skipped: set[str] = field(default_factory=set)
    cancelled: set[str] = field(default_factory=set)
    unavailable: dict[str, str] = field(default_factory=dict)  # field -> the first reason
    unsupported: set[str] = field(default_factory=set)
    errors: dict[str, list[str]] = field(default_factory=dict)

    def open_fields(self, threshold: float) -> frozenset[str]:
        return frozenset(
            name
            for name in self.wanted
            if name not in self.best or self.best[name].confidence < threshold
        )

    def take(self, provider: Provider, key: EntityKey, answer: CachedAnswer) -> None:
        for name in self.wanted & provider.fields:
            value = answer.values.get(name) if answer.found else None
            if value is None or value == "":
                self.not_found.add(name)
                continue
            confidence = answer.confidence.get(name, provider.confidence) * key.strength
            current = self.best.get(name)
            if current is None or confidence > current.confidence:
                self.best[name] = FieldValue(
                    value, confidence, provider_source(provider), answer.fetched_at
                )

    def stopped(self, key: EntityKey) -> EntityOutcome:
        outcome = FieldOutcome(CellStatus.SKIPPED, error=CANCELLED)
        return EntityOutcome(key, dict.fromkeys(self.wanted, outcome))

    def outcome(self, key: EntityKey) -> EntityOutcome:
        fields: dict[str, FieldOutcome] = {}
        for name in self.wanted:
            if name in self.best:
                fields[name] = FieldOutcome(CellStatus.DONE, self.best[name])
            elif name in self.cancelled:
                fields[name] = FieldOutcome(CellStatus.SKIPPED, error=CANCELLED)
            elif name in self.unavailable:
                # A provider that could have answered was not asked: the walk is unfinished,
                # whatever the others said, and the user needs the reason, not a failure.
                fields[name] = FieldOutcome(CellStatus.SKIPPED, error=self.unavailable[name])
            elif name in self.skipped:
                fields[name] = FieldOutcome(CellStatus.SKIPPED, error=BUDGET_EXHAUSTED)
            elif name in self.not_found:
                fields[name] = FieldOutcome(CellStatus.NOT_FOUND)
            else:
                errors = self.errors.get(name) or [
                    f"no provider can look up a {key.type.value} by {key.kind}"
                    if name in self.unsupported
                    else f"no provider supplies {key.type.value}.{name}"
                ]
                fields[name] = FieldOutcome(CellStatus.FAILED, error="; ".join(errors))
        return EntityOutcome(key, fields)


def alias_keys(key: EntityKey, values: Mapping[str, Any]) -> list[EntityKey]:
    """The other keys of the same entity that its answer reveals.

    A person found by name + company (or by email) whose answer carries a LinkedIn URL is the
    person keyed by that slug; a company found by name is the company keyed by the domain and
    LinkedIn page its answer gives. Caching the answer under those keys too means a later job
    that identifies the entity the other way (say, by the LinkedIn column an earlier job
    filled) buys nothing again. From any key, weak ones included: whichever key found it, the
    answer is the provider's record of one entity, and that record's own LinkedIn URL, email
    and domain are that entity's keys (read through them, its values are trusted as much as a
    lookup by them would be). The person's name with the domain of their email, or with their
    employer's name, is a (weak) key too: so a person first known by name and company name is
    found again once a run has filled the company's website.
    """
    aliases: list[EntityKey] = []
    if key.type is EntityType.PERSON:
        slug = linkedin_slug(values.get("linkedin_url"))
        if slug:
            aliases.append(EntityKey(EntityType.PERSON, "linkedin", slug))
        email = normalize_email(values.get("email"))
        if email:
            aliases.append(EntityKey(EntityType.PERSON, "email", email))
        # The name as the row gave it (a name + company key's) and as the provider gives it,
        # with the company as a row may give it next time: the domain of the person's email
        # (a later run that filled the website keys the company by domain) or its name.
        names = [normalize_person_name(values.get("full_name"))]
        if key.kind == "name_company":
            names.insert(0, key.value.partition("|")[0])
        companies = (work_email_domain(email), normalize_company_name(values.get("company")))
        for name in dict.fromkeys(names):
            for company in companies:
                if name and company:
                    aliases.append(
                        EntityKey(
                            EntityType.PERSON,
                            "name_company",
                            f"{name}|{company}",
                            NAME_KEY_STRENGTH,
                        )
                    )
    else:
        domain = company_domain(values.get("domain"))
        if domain:
            aliases.append(EntityKey(EntityType.COMPANY, "domain", domain))
        page = linkedin_slug(values.get("linkedin_url"), kind="company")
        if page:
            aliases.append(EntityKey(EntityType.COMPANY, "linkedin", page))
    unique = {alias.id: alias for alias in aliases if alias.id != key.id}
    return list(unique.values())


def _write_all(writes: list[tuple[AnswerCache, dict[CacheKey, CachedAnswer]]]) -> None:
    for tier, answers in writes:
        tier.put_many(answers)


def waterfall_order(providers: Iterable[Provider]) -> dict[EntityType, list[Provider]]:
    """The order providers are asked in, per entity type: cheapest first, then most confident."""
    order: dict[EntityType, list[Provider]] = {}
    for provider in sorted(providers, key=lambda p: (p.cost_per_call, -p.confidence)):
        order.setdefault(provider.entity_type, []).append(provider)
    return order


def supports(provider: Provider, key: EntityKey) -> bool:
    """Providers may declare which key kinds they can look up (`supports(key)`); default: all."""
    if not has_capability(provider, ChoosesKeys):
        return True
    return bool(cast(ChoosesKeys, provider).supports(key))


def provider_source(provider: Provider) -> str:
    """What a cell filled by `provider` records as its source: the provider's `source` when it
    says more than its name (an LLM names its model and prompt version), else its name."""
    if has_capability(provider, NamesItsSource):
        source = cast(NamesItsSource, provider).source
        if isinstance(source, str) and source:
            return source
    return provider.name


def unavailable_now(provider: Provider) -> str | None:
    """Why `provider` cannot be called right now (open circuit, missing key), if it says so;
    checked before a lookup is journalled, so such an attempt never counts as a call."""
    if not has_capability(provider, KnowsWhenUnavailable):
        return None
    return cast(KnowsWhenUnavailable, provider).unavailable_reason()


class Waterfall:
    """Cheapest-first enrichment of entities under a budget, with a cache in front of providers.

    Per entity, providers are asked in cost order for the fields still open (no value, or one
    under `threshold`); the walk stops as soon as none is open. A provider error is recorded and
    the next provider is tried; only charged calls count against the budget.

    Cache reads are batched per chunk (`enrich_many` prefetches every key at once). On a miss,
    `flight` makes concurrent runs buy each (entity, provider) answer once: the first claimant
    calls the provider and writes the answer through to its claim's `shared` tier at once; the
    others wait, then read it there as a cache hit, with no charge and no budget reservation. The
    default `NoFlight` keeps everything batched, for single-process runs.
    """

    def __init__(
        self,
        providers: Sequence[Provider],
        *,
        budget: Budget,
        cache: AnswerCache | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        flight: Flight | None = None,
        journal: SpendJournal | None = None,
        unavailable: Mapping[str, str] | None = None,
    ) -> None:
        self.providers: dict[EntityType, list[Provider]] = {}
        # Providers the preflight found unusable (name -> reason): never called, cache read.
        self.unavailable = dict(unavailable or {})
        for provider in sorted(providers, key=lambda p: (p.cost_per_call, -p.confidence)):
            self.providers.setdefault(provider.entity_type, []).append(provider)
        self.budget = budget
        self.cache = cache
        self.threshold = threshold
        self.flight: Flight = flight if flight is not None else NoFlight()
        self.journal = journal
        self.stopped = False
        self.entities_done = 0
        self.stats = WaterfallStats()
        self._limits = {p.name: asyncio.Semaphore(max(1, p.max_concurrency)) for p in providers}
        self._cached: dict[CacheKey, CachedAnswer] = {}
        self._new_answers: dict[CacheKey, CachedAnswer] = {}
        # Bought answers already written through to a claim's shared tiers: ids of those tiers.
        self._shared_in: dict[CacheKey, set[int]] = {}
        # Bought since the last flush and in no shared tier (yet): only the flush keeps them.
        # When each was bought (time.monotonic), oldest first (insertion order).
        self._unshared: dict[CacheKey, float] = {}
        # An answer bought since the last flush under a claim with no shared tier (no Redis):
        # nothing will share it, so it is urgent at once.
        self._unshareable = False

    async def enrich_many(
        self,
        requests: Iterable[EntityRequest],
        *,
        concurrency: int = 50,
        on_outcome: Callable[[EntityOutcome], None] | None = None,
        flush: bool = True,
    ) -> list[EntityOutcome]:
        """Enrich a batch: one cache read up front, one cache write at the end (unless
        `flush` is off: a caller that flushes on its own clock, off the event loop).

        `concurrency` workers take the entities in the order given, one at a time, so memory
        holds `concurrency` lookups, not a task per entity (a span of 27,500 entities as tasks
        waiting at a semaphore: ~40 MiB more at the peak in S3 at scale 1). `on_outcome`
        hears each one as soon as it is settled (a streaming writer's cue), and then the
        outcomes are not also collected: the list returned is empty. Otherwise it holds them
        in order."""
        requests = list(requests)
        await self._prefetch(requests)
        collected: list[EntityOutcome | None] = [None] * len(requests) if on_outcome is None else []
        # A position per request, each filled by the worker that took it (or the list empty).
        queue = iter(enumerate(requests))

        async def worker() -> None:
            for position, request in queue:
                if self.stopped:  # drain: calls in flight finish, nothing new starts
                    outcome = _Progress(request.fields).stopped(request.key)
                else:
                    outcome = await self.enrich(request)
                    self.entities_done += 1
                if on_outcome is None:
                    collected[position] = outcome
                else:
                    on_outcome(outcome)

        workers = min(max(1, concurrency), len(requests))
        try:
            await asyncio.gather(*(worker() for _ in range(workers)))
            return cast(list[EntityOutcome], collected)
        finally:
            if flush:
                self.flush_cache()
            # The batch's answers are settled and in the cache tiers: a waterfall that serves
            # many batches (a span's pages) does not hold them all to its end.
            for request in requests:
                for provider in self.providers.get(request.key.type, []):
                    self._cached.pop((request.key.id, provider.name), None)

    def stop(self) -> None:
        """Start no new entity (a cancelled job); lookups in flight complete and are cached."""
        self.stopped = True

    async def enrich(self, request: EntityRequest) -> EntityOutcome:
        key = request.key
        progress = _Progress(request.fields)
        for provider in self.providers.get(key.type, []):
            asked = progress.open_fields(self.threshold) & provider.fields
            if not asked:
                continue
            if self.stopped:  # a cancel: no new lookup, not even the next provider's
                progress.cancelled.update(asked)
                continue
            if not supports(provider, key):
                # A vendor that cannot be asked about this kind of key (a domain-only API and a
                # company known by name) is passed over: no call, no charge, no error.
                progress.unsupported.update(asked)
                continue
            answer = await self._answer(provider, key, asked, progress)
            if answer is not None:
                progress.take(provider, key, answer)
            if not progress.open_fields(self.threshold):
                break
        return progress.outcome(key)

    async def _answer(
        self, provider: Provider, key: EntityKey, asked: frozenset[str], progress: _Progress
    ) -> CachedAnswer | None:
        cache_key = (key.id, provider.name)
        cached = self._cached.get(cache_key) or self._new_answers.get(cache_key)
        if cached is not None:
            self.stats.cache_hits += 1
            return cached
        reason = self.unavailable.get(provider.name) or unavailable_now(provider)
        if reason is not None:
            self._not_sent(provider, asked, progress, reason)
            return None
        async with self.flight.claim(cache_key) as claim:
            # Meet contenders in the tier of the lock actually taken (SQL when Redis is down).
            shared = claim.shared
            if shared is not None:
                # Another run may have bought it since the prefetch (or while we waited).
                found = await read_one(shared, cache_key)
                if found is not None:
                    self.stats.cache_hits += 1
                    self.stats.shared_hits += 1
                    self._cached[cache_key] = found
                    return found
            answer = await self._buy(provider, key, asked, progress)
            if answer is not None:
                if shared is not None:
                    await self._publish(shared, cache_key, answer)
                else:
                    self._unshareable = True
            return answer

    async def _buy(
        self, provider: Provider, key: EntityKey, asked: frozenset[str], progress: _Progress
    ) -> CachedAnswer | None:
        """Call the provider under the budget; None when skipped or failed (noted in progress)."""
        cost = provider.cost_per_call
        if not await self.budget.reserve(cost):
            progress.skipped.update(asked)
            self.stats.not_sent[provider.name][NOT_SENT_BUDGET] += 1
            return None
        if self.journal is not None and not await self.journal.send(provider.name, cost):
            # The request ended or was cancelled (or its spend cannot be recorded): nothing
            # may leave the machine that is not on record.
            self.budget.release(cost)
            self.stopped = True
            progress.cancelled.update(asked)
            return None
        self.stats.calls[provider.name] += 1
        charged = False
        sent = True
        observed = self.stats.observe(provider.name, key.kind)
        try:
            async with self._limits[provider.name]:
                found: ProviderAnswer | None = await provider.lookup(key, asked)
            charged = True
        except EntityNotFound:
            found = None
            charged = provider.charges_misses
        except ProviderError as error:
            said = str(error)  # HTTP providers name themselves already
            prefix = f"{provider.name}: "
            if not error.sent:
                # Refused before anything left the machine: not a call, and nothing to charge.
                sent = False
                self.stats.calls[provider.name] -= 1
                reason = said.removeprefix(prefix)
                if isinstance(error, ProviderUnavailable | CredentialsMissing):
                    self._not_sent(provider, asked, progress, reason)
                    return None
                if isinstance(error, Unreachable):
                    self.stats.errors[provider.name] += 1
                    self.stats.not_sent[provider.name][NOT_SENT_UNREACHABLE] += 1
                else:
                    self.stats.not_sent[provider.name][NOT_SENT_REFUSED] += 1
            else:
                self.stats.errors[provider.name] += 1
                observed.errors += 1
            if not said.startswith(prefix):
                said = prefix + said
            for name in asked:
                progress.errors.setdefault(name, []).append(said)
            return None
        finally:
            # Anything but a charged answer gives the reservation back, crashes included.
            if charged:
                self.budget.commit(cost)
                self.stats.cost[provider.name] += cost
            else:
                self.budget.release(cost)
            if sent:
                observed.lookups += 1
                observed.charged += charged
            if self.journal is not None:
                self.journal.settle(provider.name, cost, charged=charged, sent=sent)
        if found is not None:
            observed.found += 1
            for name in asked:
                counts = observed.fields.setdefault(name, [0, 0])
                counts[0] += 1
                counts[1] += found.values.get(name) not in (None, "")
        answer = CachedAnswer(
            found=found is not None,
            values=dict(found.values) if found is not None else {},
            confidence=dict(found.confidence) if found is not None else {},
            fetched_at=datetime.now(UTC),
        )
        self._new_answers[(key.id, provider.name)] = answer
        self._unshared.setdefault((key.id, provider.name), time.monotonic())
        if answer.found:  # written with the chunk's answers: no call, no charge, no budget
            for alias in alias_keys(key, answer.values):
                self._new_answers.setdefault((alias.id, provider.name), answer)
        return answer

    def _not_sent(
        self, provider: Provider, asked: frozenset[str], progress: _Progress, reason: str
    ) -> None:
        """A lookup `provider` cannot take: counted apart, its fields left for the others (or
        skipped with the reason, if no other provider fills them)."""
        self.stats.not_sent[provider.name][NOT_SENT_UNAVAILABLE] += 1
        error = unavailable_error(provider.name, reason)
        for name in asked:
            progress.unavailable.setdefault(name, error)

    async def _publish(
        self, shared: AnswerCache, cache_key: CacheKey, answer: CachedAnswer
    ) -> None:
        """Write one bought answer through to the shared tier, before the claim is released.

        Best effort: the answer is paid for and stays queued for the chunk's batched flush, so
        a failing shared tier costs the waiters a duplicate call, never this run its answer.
        The tiers it reached are noted, so the flush does not write it to them again.
        """
        try:
            await write_one(shared, cache_key, answer)
        except Exception:
            log.warning("could not share the answer for %s", cache_key, exc_info=True)
            return
        self._shared_in[cache_key] = {id(tier) for tier in tiers_of(shared)}
        self._unshared.pop(cache_key, None)

    async def _prefetch(self, requests: Sequence[EntityRequest]) -> None:
        """The batch's cached answers, read in one go off the event loop: a chunk's read (a
        Redis MGET, then the database for what Redis lacks) grows with the chunk, and on the
        loop it would stall every lookup in flight and the flight's lock renewal meanwhile."""
        if self.cache is None:
            return
        keys = [
            (request.key.id, provider.name)
            for request in requests
            for provider in self.providers.get(request.key.type, [])
        ]
        if keys:
            self._cached.update(await asyncio.to_thread(self.cache.get_many, keys))

    def unshared_for(self, seconds: float = 0.0) -> bool:
        """Whether an answer bought since the last flush has been in no shared tier for
        `seconds` or more (bought without a claim that wrote it through, e.g. while Redis is
        down), or the shared tier has failed since (`Flight.degraded`): only the flush keeps
        such answers if the process dies, and contenders that fell back to the database meet
        them there. One bought a moment ago is usually on its way to Redis under its claim (at
        2,000 calls a second there always is one, and a flush at every such sight was one a
        second: ~45 of S3's statements instead of ~20); one bought with no shared tier to go to
        counts at once."""
        if self._unshareable:
            return True
        oldest = next(iter(self._unshared.values()), None)
        if oldest is not None and time.monotonic() - oldest >= seconds:
            return True
        return bool(self._new_answers) and self.flight.degraded()

    def take_new_answers(self) -> dict[CacheKey, CachedAnswer]:
        """The answers bought since the last call, handed over for one batched cache write
        (call it on the event loop; write them anywhere)."""
        answers, self._new_answers = self._new_answers, {}
        self._unshared.clear()
        self._unshareable = False
        self._cached.update(answers)
        return answers

    async def flush_cache_async(self) -> None:
        """Write the answers bought so far through to the cache while lookups go on, so a
        killed run's purchases survive it."""
        writes = self._cache_writes(self.take_new_answers())
        if writes:
            await asyncio.to_thread(_write_all, writes)

    def flush_cache(self) -> None:
        """Write the answers bought since the last flush to the cache, in one batch."""
        _write_all(self._cache_writes(self.take_new_answers()))

    def _cache_writes(
        self, answers: dict[CacheKey, CachedAnswer]
    ) -> list[tuple[AnswerCache, dict[CacheKey, CachedAnswer]]]:
        """What each cache tier still needs of `answers`: all of them, but the ones written
        through to that tier under a claim (most of a chunk's purchases, on a shared stack)."""
        if self.cache is None or not answers:
            return []
        shared_in = self._shared_in
        self._shared_in = {k: v for k, v in shared_in.items() if k not in answers}
        writes = []
        for tier in tiers_of(self.cache):
            wanted = {
                key: answer
                for key, answer in answers.items()
                if id(tier) not in shared_in.get(key, ())
            }
            if wanted:
                writes.append((tier, wanted))
        return writes
