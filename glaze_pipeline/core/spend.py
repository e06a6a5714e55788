"""The spend journal: every provider call is on record before it leaves the machine.

A chunk's lookups run concurrently; writing each call to the database on its own would cost a
transaction per call. The journal group-commits instead: a call about to be sent adds itself
to the pending batch and waits; one writer at a time commits everything pending in a single
transaction (`RequestRepository.record_spend`) and releases the calls it covered. While one
commit runs the next batch forms, so the wait is one commit at most and the writes per second
stay few however many calls there are. Settlements (a call's answer came back, charged or not)
ride along with the next commit without anyone waiting for them.

So a SIGKILL loses nothing that was bought: a call sent and never settled is on record, and
counted as charged. And a request that has ended (or been asked to stop) refuses the batch:
no call is sent after it.
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


class SpendJournal:
    """Group-commits a chunk's calls (before they are sent) and settlements (after)."""

    def __init__(self, write: SpendWriter) -> None:
        self._write = write
        self._pending: dict[str, SpendDelta] = {}
        self._waiters: list[asyncio.Future[bool]] = []
        self._writer: asyncio.Task[None] | None = None
        self.refused = False  # the request stopped accepting calls
        self.error: BaseException | None = None

    async def send(self, provider: str, unit_cost: float) -> bool:
        """Journal one call to `provider`; True once it is on record and may be sent."""
        if self.refused or self.error is not None:
            return False
        self._delta(provider, unit_cost).calls += 1
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._kick()
        return await waiter

    def settle(self, provider: str, unit_cost: float, *, charged: bool, sent: bool = True) -> None:
        """A journalled call came back (or failed): charged at `unit_cost`, or not. A call that
        never left the machine (`sent=False`) is withdrawn from the ledger instead."""
        delta = self._delta(provider, unit_cost)
        if not sent:
            delta.withdrawn += 1
            self._kick()
            return
        delta.settled += 1
        if charged:
            delta.charged += 1
            delta.cost += unit_cost
        self._kick()

    async def drain(self) -> None:
        """Wait until everything journalled so far is committed."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        if self._pending:
            self._kick()
            if self._writer is not None:
                await asyncio.shield(self._writer)

    def _delta(self, provider: str, unit_cost: float) -> SpendDelta:
        delta = self._pending.get(provider)
        if delta is None:
            delta = self._pending[provider] = SpendDelta(unit_cost=unit_cost)
        return delta

    def _kick(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._commit_pending())

    async def _commit_pending(self) -> None:
        while self._pending:
            batch, waiters = self._pending, self._waiters
            self._pending, self._waiters = {}, []
            try:
                accepted = await asyncio.to_thread(self._write, batch)
            except Exception as error:
                # Nothing may be sent that is not on record: refuse the waiting calls. The
                # settlements of this batch are lost to the ledger; they stay in the run's
                # figures and its log.
                log.error("spend journal could not be written; stopping calls: %s", error)
                self.error = error
                accepted = False
            if not accepted:
                self.refused = True
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(accepted)
