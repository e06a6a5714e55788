"""The single-flight protocol the waterfall speaks: a `Flight` grants `Claim`s on cache keys.

The implementations that coordinate through Redis or Postgres live in `singleflight`; this
module holds only the protocol and `NoFlight`, so the waterfall depends on no lock service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from glaze_pipeline.core.cache import AnswerCache, CacheKey


@dataclass(frozen=True, slots=True)
class Claim:
    """What a claim got: whether this run holds the key, and where its contenders meet.

    `shared` is the tier matching the lock(s) actually taken: re-read it first, write a bought
    answer through to it before the claim ends. None: there is no one to meet. `unavailable`:
    the lock service failed, so nothing was taken or waited for (see `FallbackFlight`).
    """

    held: bool
    shared: AnswerCache | None = None
    unavailable: bool = False

    @classmethod
    def failed(cls) -> Claim:
        return cls(held=False, shared=None, unavailable=True)


class Flight(Protocol):
    """Who may buy a key's answer now; see the module docstring for the protocol."""

    @property
    def backend(self) -> str:
        """Where runs meet ("redis", "postgres", "redis+postgres", "none"), for logs."""
        ...

    def claim(self, key: CacheKey) -> AbstractAsyncContextManager[Claim]:
        """Wait until this run holds `key`, `max_wait` ran out, or the lock service failed."""
        ...

    def degraded(self) -> bool:
        """Whether the shared tier that granted claims wrote answers through to has failed
        since: answers bought under those claims are then in no shared tier until flushed."""
        ...

    def close(self) -> None: ...


class NoFlight:
    """No contenders to coordinate with: every claim is granted at once."""

    backend = "none"

    @asynccontextmanager
    async def claim(self, key: CacheKey) -> AsyncIterator[Claim]:
        yield Claim(held=True)

    def degraded(self) -> bool:
        return False

    def close(self) -> None:
        return None
