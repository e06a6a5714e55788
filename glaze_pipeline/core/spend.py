"""The spend journal: every provider call is on record before it leaves the machine.

A chunk's lookups run concurrently; writing each call to the database on its own would cost a
transaction per call. The journal records calls ahead, in blocks: a call about to be sent takes
one of its provider's free slots, already on record, and goes at once; when there is none, it
waits while one writer reserves a block of slots (`calls += block`, in one transaction through
`RequestRepository.record_spend`, with every settlement pending). The block doubles with every
reservation, from the calls waiting at the time, up to `MAX_BLOCK_PER_IN_FLIGHT` times the most
calls this journal has had in flight (at most `MAX_BLOCK`); it starts at FIRST_BLOCK, or at a
quarter of the chunk's entities for a large chunk (`first_block_for`): a 6,000-call chunk at
200 in flight costs a handful of commits, however many calls there are. Settlements (a call's
answer came back, charged or not) ride along with the next reservation; they commit on their
own only once two blocks' worth are pending. `drain()` withdraws the slots left unused (the ledger's
`withdrawn`) and commits what is pending.

So a SIGKILL never under-counts spend: a call sent and never settled is on record, and counted
as charged. It may over-count, by the slots reserved and not yet used (at most one block per
provider) plus the calls answered free whose settlement was still pending (fewer than two
blocks): at most `3 * MAX_BLOCK` calls per provider, priced at its unit cost, and only when the
chunk dies without draining. And a request that has ended (or been
asked to stop) refuses the next reservation: from then on no call is sent; calls may still
leave on slots reserved before the ending, up to the block (the engine's watch stops the
lookups within a heartbeat).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class SpendDelta:
    """Increments to one provider's ledger row: calls sent, settled, charged, cost.

    `withdrawn`: calls journalled that never left the machine after all (refused on the way
    out, e.g. the circuit opened or the key went missing): taken off `calls`.
    """

    calls: int = 0
    withdrawn: int = 0
    settled: int = 0
    charged: int = 0
    cost: float = 0.0
    unit_cost: float = 0.0


# (deltas by provider) -> whether new calls were accepted; blocking, run in a thread.
SpendWriter = Callable[[Mapping[str, SpendDelta]], bool]


FIRST_BLOCK = 8  # the least first reservation of a provider (or the calls waiting, if more)
MAX_BLOCK = 4096  # the cap on one reservation, and so on what a crash can over-count
# A block is at most this many times the peak of calls in flight: at 100 ms a call, about 1.6 s
# of calls, so a journal at full speed commits less often than its request's heartbeat (at 8
# and 1,024, S3 took ~120 reservations for 120,000 calls: a quarter of its statements).
MAX_BLOCK_PER_IN_FLIGHT = 16


def first_block_for(entities: int) -> int:
    """A chunk's first reservation per provider: a quarter of its entities (each needs at
    least one call unless cached), so a large chunk reserves in a few blocks from the start
    while a small job's crash over-counts no more than FIRST_BLOCK calls."""
    return entities // 4


class SpendJournal:
    """Journals a chunk's calls ahead in blocks (before they are sent), settlements after."""

    def __init__(self, write: SpendWriter, *, first_block: int = FIRST_BLOCK) -> None:
        """`first_block`: the size of each provider's first reservation (at least
        FIRST_BLOCK, at most MAX_BLOCK): a caller that knows its chunk is large starts higher
        and skips the ramp up (see `first_block_for`)."""
        self._write = write
        self._first_block = min(MAX_BLOCK, max(FIRST_BLOCK, first_block))
        self._pending: dict[str, SpendDelta] = {}
        self._free: dict[str, int] = {}  # slots on record, not used yet, by provider
        self._block: dict[str, int] = {}  # the next reservation's size, by provider
        self._unit_cost: dict[str, float] = {}
        self._waiting: dict[str, list[asyncio.Future[bool]]] = {}
        self._unflushed = 0  # settlements pending since the last commit
        self._in_flight = 0
        self._peak_in_flight = 0
        self._writer: asyncio.Task[None] | None = None
        self._draining = False
        self.commits = 0
        self.refused = False  # the request stopped accepting calls
        self.error: BaseException | None = None

    async def send(self, provider: str, unit_cost: float) -> bool:
        """Journal one call to `provider`; True once it is on record and may be sent."""
        if self.refused or self.error is not None:
            return False
        free = self._free.get(provider, 0)
        if free > 0:
            self._free[provider] = free - 1
            self._took_slot()
            return True
        self._unit_cost[provider] = unit_cost  # the reservation carries it to the ledger
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(provider, []).append(waiter)
        self._kick()
        sent = await waiter
        if sent:
            self._took_slot()
        return sent

    def settle(self, provider: str, unit_cost: float, *, charged: bool, sent: bool = True) -> None:
        """A journalled call came back (or failed): charged at `unit_cost`, or not. A call that
        never left the machine (`sent=False`) is withdrawn from the ledger instead."""
        self._in_flight -= 1
        delta = self._delta(provider, unit_cost)
        if not sent:
            delta.withdrawn += 1
        else:
            delta.settled += 1
            if charged:
                delta.charged += 1
                delta.cost += unit_cost
        self._unflushed += 1
        if self._unflushed >= self._flush_after():
            self._kick()

    async def drain(self) -> None:
        """Give back the slots not used and wait until everything so far is committed."""
        for provider, free in self._free.items():
            if free:
                self._delta(provider).withdrawn += free
        self._free.clear()
        self._draining = True
        try:
            while self._writer is not None and not self._writer.done():
                await asyncio.shield(self._writer)
            if self._pending:
                self._kick()
                if self._writer is not None:
                    await asyncio.shield(self._writer)
        finally:
            self._draining = False

    def _took_slot(self) -> None:
        self._in_flight += 1
        self._peak_in_flight = max(self._peak_in_flight, self._in_flight)

    def _flush_after(self) -> int:
        """Settlements that commit on their own: two blocks' worth (else they ride along)."""
        return 2 * max(self._block.values(), default=self._first_block)

    def _delta(self, provider: str, unit_cost: float | None = None) -> SpendDelta:
        # The ledger prices unsettled calls at the last unit cost written: never write a 0 for
        # a delta (a withdrawal, a reservation) that was not given one.
        if unit_cost is None:
            unit_cost = self._unit_cost.get(provider, 0.0)
        else:
            self._unit_cost[provider] = unit_cost
        delta = self._pending.get(provider)
        if delta is None:
            delta = self._pending[provider] = SpendDelta(unit_cost=unit_cost)
        else:
            delta.unit_cost = unit_cost
        return delta

    def _kick(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._commit_pending())

    def _reserve(self) -> dict[str, int]:
        """Add a block to the pending deltas for every provider with calls waiting."""
        queued = sum(len(waiters) for waiters in self._waiting.values())
        peak = max(self._peak_in_flight, queued)
        cap = min(MAX_BLOCK, max(self._first_block, MAX_BLOCK_PER_IN_FLIGHT * peak))
        reserved: dict[str, int] = {}
        for provider, waiting in self._waiting.items():
            if not waiting:
                continue
            block = max(self._block.get(provider, self._first_block), len(waiting))
            self._delta(provider).calls += block
            reserved[provider] = block
            self._block[provider] = max(min(2 * block, cap), min(block, MAX_BLOCK))
        return reserved

    def _due(self) -> bool:
        """Whether to commit now: calls wait for slots, settlements piled up, or a drain."""
        if any(self._waiting.values()):
            return True
        return bool(self._pending) and (self._draining or self._unflushed >= self._flush_after())

    async def _commit_pending(self) -> None:
        while self._due():
            reserved = self._reserve()
            batch = self._pending
            self._pending, self._unflushed = {}, 0
            try:
                accepted = await asyncio.to_thread(self._write, batch)
            except Exception as error:
                # Nothing may be sent that is not on record: refuse the waiting calls. The
                # settlements of this batch are lost to the ledger; they stay in the run's
                # figures and its log.
                log.error("spend journal could not be written; stopping calls: %s", error)
                self.error = error
                accepted = False
            self.commits += 1
            if not accepted:
                self.refused = True
                for waiting in self._waiting.values():
                    for waiter in waiting:
                        if not waiter.done():
                            waiter.set_result(False)
                self._waiting.clear()
                # Slots on record and unused are withdrawn at `drain`; none is used from now.
                continue
            for provider, block in reserved.items():
                free = self._free.get(provider, 0) + block
                waiting = self._waiting.get(provider, [])
                while waiting and free:
                    waiter = waiting.pop(0)
                    if not waiter.done():
                        waiter.set_result(True)
                        free -= 1
                self._free[provider] = free
