"""Spend control: reserve before a paid call, commit when charged, release when not.

A job's budget lives in one place (the request row). A chunk draws from it in blocks through a
`lease` callable, so parallel chunks (or processes) can never spend past it together, while a
single paid call costs no database round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

EPSILON = 1e-9


class Budget:
    """The money one chunk may spend. `limit=None` means unlimited.

    `lease(preferred, minimum)` draws more from the job's shared budget and returns what it
    granted (0 when even `minimum` is not left).
    """

    def __init__(
        self,
        limit: float | None,
        *,
        lease: Callable[[float, float], float] | None = None,
        block: float = 0.0,
    ) -> None:
        self.limit = limit
        self._lease = lease
        self._block = block
        self._available = 0.0 if lease is not None else (limit or 0.0)
        self._lock = asyncio.Lock()
        self._settled = asyncio.Event()
        self.spent = 0.0
        self.reserved = 0.0
        self.exhausted = False

    @property
    def unlimited(self) -> bool:
        return self.limit is None

    @property
    def unused(self) -> float:
        """Leased (or granted) but neither reserved nor spent: to be given back at the end."""
        return self._available

    async def reserve(self, cost: float) -> bool:
        """Set `cost` aside for one call; False when the budget cannot cover it.

        While other calls of this chunk hold reservations that may yet be given back (a free
        miss, an error), it waits for them rather than refusing: the budget is exhausted only
        when what is spent and what is in flight leave no room.
        """
        if self.unlimited or cost <= 0:
            return True
        while True:
            async with self._lock:
                if self._available + EPSILON < cost and self._lease is not None:
                    # A block at a time; when no full block is left, just what this call needs.
                    preferred = max(cost, self._block) - self._available
                    granted = await asyncio.to_thread(
                        self._lease, preferred, cost - self._available
                    )
                    self._available += granted
                if self._available + EPSILON >= cost:
                    self._available -= cost
                    self.reserved += cost
                    return True
                if self.reserved <= EPSILON:
                    self.exhausted = True
                    return False
                self._settled.clear()
            await self._settled.wait()  # a reservation in flight was charged or given back

    def commit(self, cost: float) -> None:
        """The reserved call was charged."""
        if self.unlimited or cost <= 0:
            self.spent += max(cost, 0.0)
            return
        self.reserved -= cost
        self.spent += cost
        self._settled.set()

    def release(self, cost: float) -> None:
        """The reserved call was not charged (a free miss, an error)."""
        if self.unlimited or cost <= 0:
            return
        self.reserved -= cost
        self._available += cost
        self._settled.set()
