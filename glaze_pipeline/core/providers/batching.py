"""A micro-batcher in front of a provider with a batch endpoint: the waterfall still asks one
entity at a time, while the requests go out many entities at once.

The waterfall's bookkeeping stays per entity (a budget reservation, a spend-journal entry, a
call in its stats, a charge or not), which is how batch vendors bill: per entity in the batch.
Only the transport changes. `BatchingProvider.lookup(key, fields)` queues the key and waits;
the queue goes out as one `lookup_many` when `max_size` keys wait or `max_wait_s` after the
first one came (0: on the next turn of the event loop). Each waiting lookup then gets what its
entity got, as if it had been asked alone:

- an answer: a charged call;
- `EntityNotFound` for an entity the batch answer left out: a call, charged if the vendor
  charges misses;
- the batch's error for every member of a failed batch, with the batch's `sent` (a 500 after
  the request went out is a failed call for each member; a refusal before anything was sent,
  such as a missing key, an open circuit or a vendor nobody could connect to, is no call for
  any of them).

Fields: a batch asks the union of its members' fields. The batch endpoints we know take no
field list (a vendor answers with its whole record, as a single lookup already does), and the
waterfall reads only the fields it wanted from an answer; one queue per provider fills batches
fastest, where grouping by field set would split them for nothing.

Keys of a kind the batch endpoint does not take (a company known only by name) are looked up
alone at once, never queued. The same key asked twice while queued goes out once and both
lookups get its answer (the waterfall's single-flight makes that rare).

Queues are per event loop: each engine chunk runs in a loop of its own, and a batch is sent
from the context of the lookup that opened it, so it uses that chunk's HTTP session.
"""

from __future__ import annotations

import asyncio
import copy
import weakref
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, cast

from glaze_pipeline.core.models import EntityKey, EntityType
from glaze_pipeline.core.providers.base import (
    AlwaysAnswers,
    ChecksItself,
    ChoosesKeys,
    EntityNotFound,
    KeepsLlmCalls,
    KnowsWhenUnavailable,
    LooksUpMany,
    NamesItsSource,
    Provider,
    ProviderAnswer,
    ProviderError,
    ReportsHealth,
    Verdict,
    has_capability,
)
from glaze_pipeline.core.providers.session import ClosableProvider, SessionedProvider

# Long enough for the lookups a chunk starts together to meet (they arrive within a few event
# loop turns, a thread hop or two apart), short against any vendor's latency (40 ms and up).
DEFAULT_MAX_WAIT_S = 0.005


@dataclass(eq=False)
class _Queue:
    """The keys waiting for the next batch of one provider in one event loop."""

    keys: dict[str, EntityKey] = field(default_factory=dict)  # by entity id, in arrival order
    waiters: dict[str, list[asyncio.Future[ProviderAnswer]]] = field(default_factory=dict)
    fields: set[str] = field(default_factory=set)
    timer: asyncio.Handle | None = None  # the flush scheduled when its first key came


class BatchingProvider:
    """A provider that sends its inner provider's lookups as batches (see the module doc).

    Build it with `batching_provider` (or `with_batching`): that makes it an instance of a
    subclass with exactly the optional capabilities of the inner provider, so that the
    per-class capability checks (`has_capability`) stay right. Cheap to make: the engine can
    wrap a chunk's providers per chunk, so nothing of it is shared between threads.
    """

    def __init__(
        self,
        inner: Provider,
        *,
        max_size: int | None = None,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
    ) -> None:
        if not has_capability(inner, LooksUpMany):
            raise TypeError(f"{inner.name}: has no batch endpoint (no lookup_many)")
        many = cast(LooksUpMany, inner)
        limit = many.batch_size
        if limit < 1:
            raise ValueError(f"{inner.name}: has no batch endpoint configured")
        if max_size is not None and max_size < 1:
            raise ValueError("max_size must be >= 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0")
        self.inner = inner
        self._many = many
        self.max_size = min(limit, max_size) if max_size is not None else limit
        self.max_wait_s = max_wait_s
        self.batches_sent = 0  # batch requests asked of the inner provider (lookup_many calls)
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue] = (
            weakref.WeakKeyDictionary()
        )
        self._sending: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"BatchingProvider({self.inner!r}, max_size={self.max_size})"

    # -- what the waterfall reads: the inner provider's

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def entity_type(self) -> EntityType:
        return self.inner.entity_type

    @property
    def fields(self) -> frozenset[str]:
        return self.inner.fields

    @property
    def cost_per_call(self) -> float:
        return self.inner.cost_per_call

    @property
    def confidence(self) -> float:
        return self.inner.confidence

    @property
    def charges_misses(self) -> bool:
        return self.inner.charges_misses

    @property
    def max_concurrency(self) -> int:
        """Lookups the waterfall lets in at once: enough to fill the inner provider's
        `max_concurrency` requests with full batches (its HTTP client still caps the requests)."""
        return self.inner.max_concurrency * self.max_size

    # -- lookups

    async def lookup(self, key: EntityKey, fields: frozenset[str]) -> ProviderAnswer:
        if not self._many.batches(key):
            return await self.inner.lookup(key, fields)
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = _Queue()
        future: asyncio.Future[ProviderAnswer] = loop.create_future()
        queue.keys.setdefault(key.id, key)
        queue.waiters.setdefault(key.id, []).append(future)
        queue.fields |= fields
        if len(queue.keys) >= self.max_size:
            self._flush(loop, queue)
        elif queue.timer is None:
            queue.timer = (
                loop.call_later(self.max_wait_s, self._flush, loop, queue)
                if self.max_wait_s > 0
                else loop.call_soon(self._flush, loop, queue)
            )
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop, queue: _Queue) -> None:
        """Send what `queue` holds as one batch (from the context of the lookup that called or
        scheduled this, so the batch uses its HTTP session)."""
        if self._queues.get(loop) is queue:
            del self._queues[loop]
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        # A lookup cancelled while it waited (a stopped job) is not sent.
        live = {
            entity: waiters
            for entity, waiters in queue.waiters.items()
            if any(not waiter.done() for waiter in waiters)
        }
        if not live:
            return
        keys = [queue.keys[entity] for entity in live]
        task = loop.create_task(self._send(keys, frozenset(queue.fields), live))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(
        self,
        keys: Sequence[EntityKey],
        fields: frozenset[str],
        waiters: dict[str, list[asyncio.Future[ProviderAnswer]]],
    ) -> None:
        self.batches_sent += 1
        try:
            results = await self._many.lookup_many(keys, fields)
        except ProviderError as error:  # lookup_many answers per entity; in case one raises
            results = {key.id: error for key in keys}
        except asyncio.CancelledError:
            for futures in waiters.values():
                for future in futures:
                    future.cancel()
            raise
        except BaseException as error:  # a crash: every member sees it, as it would alone
            for futures in waiters.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        for key in keys:
            result = results.get(key.id)
            if result is None:
                result = EntityNotFound(f"{self.name}: not in batch answer", provider=self.name)
            for future in waiters[key.id]:
                if future.done():
                    continue
                if isinstance(result, ProviderError):
                    future.set_exception(_own_error(result))
                else:
                    future.set_result(result)


def _own_error(error: ProviderError) -> ProviderError:
    """A copy of a batch's error for one member: each lookup raises an exception of its own
    (one raised in many tasks would gather all their tracebacks). Same class, message, `sent`."""
    try:
        return copy.copy(error)
    except Exception:  # an error class that cannot be rebuilt from its message: share it
        return error


# --- the inner provider's optional capabilities, forwarded ----------------------------------
#
# One mixin per capability; `batching_provider` picks those the inner provider has, so a
# wrapper is of a class with exactly its capabilities (they are decided per class).


class _Forwarding:
    inner: Any


class _ForwardsSupports(_Forwarding):
    def supports(self, key: EntityKey) -> bool:
        return bool(self.inner.supports(key))


class _ForwardsSource(_Forwarding):
    @property
    def source(self) -> str:
        return str(self.inner.source)


class _ForwardsUnavailable(_Forwarding):
    def unavailable_reason(self) -> str | None:
        reason: str | None = self.inner.unavailable_reason()
        return reason


class _ForwardsAlwaysAnswers(_Forwarding):
    @property
    def always_answers(self) -> bool:
        return bool(self.inner.always_answers)


class _ForwardsLlmCalls(_Forwarding):
    def take_llm_calls(self) -> list[Any]:
        calls: list[Any] = self.inner.take_llm_calls()
        return calls


class _ForwardsHealth(_Forwarding):
    def health(self) -> object:
        return self.inner.health()


class _ForwardsPreflight(_Forwarding):
    async def preflight(self, *, probe: bool) -> Verdict:
        verdict: Verdict = await self.inner.preflight(probe=probe)
        return verdict


class _ForwardsSession(_Forwarding):
    def open_session(self) -> AbstractAsyncContextManager[None]:
        session: AbstractAsyncContextManager[None] = self.inner.open_session()
        return session


class _ForwardsClose(_Forwarding):
    async def aclose(self) -> None:
        await self.inner.aclose()


_FORWARDS: tuple[tuple[type, type], ...] = (
    (ChoosesKeys, _ForwardsSupports),
    (NamesItsSource, _ForwardsSource),
    (KnowsWhenUnavailable, _ForwardsUnavailable),
    (AlwaysAnswers, _ForwardsAlwaysAnswers),
    (KeepsLlmCalls, _ForwardsLlmCalls),
    (ReportsHealth, _ForwardsHealth),
    (ChecksItself, _ForwardsPreflight),
    (SessionedProvider, _ForwardsSession),
    (ClosableProvider, _ForwardsClose),
)
_WRAPPERS: dict[tuple[type, ...], type[BatchingProvider]] = {}


def batching_provider(
    inner: Provider, *, max_size: int | None = None, max_wait_s: float = DEFAULT_MAX_WAIT_S
) -> BatchingProvider:
    """A `BatchingProvider` in front of `inner`, with the optional capabilities `inner` has."""
    mixins = tuple(mixin for capability, mixin in _FORWARDS if isinstance(inner, capability))
    cls = _WRAPPERS.get(mixins)
    if cls is None:
        name = "Batching" + "".join(m.__name__.removeprefix("_Forwards") for m in mixins)
        cls = _WRAPPERS[mixins] = type(name, (BatchingProvider, *mixins), {})
    return cls(inner, max_size=max_size, max_wait_s=max_wait_s)


def declares_batches(provider: Provider) -> bool:
    """Whether `provider` has a batch endpoint configured."""
    return has_capability(provider, LooksUpMany) and cast(LooksUpMany, provider).batch_size > 0


def with_batching(
    providers: Sequence[Provider],
    *,
    max_size: int | None = None,
    max_wait_s: float = DEFAULT_MAX_WAIT_S,
) -> list[Provider]:
    """The providers, each one with a batch endpoint behind a micro-batcher (the others as they
    are). `max_size` caps a batch below the vendor's own `batch.max_size`; `max_wait_s` is how
    long the first key of a batch waits for others (0: the next turn of the event loop)."""
    return [
        cast(Provider, batching_provider(p, max_size=max_size, max_wait_s=max_wait_s))
        if declares_batches(p)
        else p
        for p in providers
    ]
