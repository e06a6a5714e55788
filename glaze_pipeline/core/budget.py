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
        """Set `cost` aside for one call; False when the budget cannot cover it."""
        if self.unlimited or cost <= 0:
            return True
        async with self._lock:
            if self._available + EPSILON < cost and self._lease is not None:
                # A block at a time; when no full block is left, just what this call needs.
                preferred = max(cost, self._block) - self._available
                granted = await asyncio.to_thread(self._lease, preferred, cost - self._available)
                self._available += granted
            if self._available + EPSILON < cost:
                self.exhausted = True
                return False
            self._available -= cost
            self.reserved += cost
            return True

    def commit(self, cost: float) -> None:
        """The reserved call was charged."""
        if self.unlimited or cost <= 0:
            self.spent += max(cost, 0.0)
            return
        self.reserved -= cost
        self.spent += cost

    def release(self, cost: float) -> None:
        """The reserved call was not charged (a free miss, an error)."""
        if self.unlimited or cost <= 0:
            return
        self.reserved -= cost
        self._available += cost
