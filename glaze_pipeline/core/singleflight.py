"""Single-flight: concurrent runs that need the same (entity, provider) answer buy it once.

A run that misses the cache claims the key before calling the provider:

    async with flight.claim(key) as held:
        answer = <re-read flight.shared>   # another holder may have bought it meanwhile
        if answer is None:
            answer = <call the provider>
            <write it to flight.shared>    # at once, so waiters see it when the claim ends

The claim returns when this run holds the key, or when it has waited `max_wait` for a holder
that never let go (`held` is then False and the run goes ahead on its own: a duplicate call is
better than a stuck job). `shared` is the cache tier every contender reads and writes: Redis
with the Redis flight, the SQL table with the Postgres one. Every backend fails open: when the
lock service errs, the run proceeds unlocked and the error is logged.

- `RedisFlight`: `SET key token NX PX ttl`; released by a token-checked script, so a holder whose
  lock expired never frees someone else's. A crashed holder's lock expires after `lock_ttl`.
- `PostgresFlight`: `pg_try_advisory_lock` on a 64-bit hash of the key, held on one dedicated
  connection per flight. A crashed holder's session ends and frees its locks at once.
- `NoFlight`: SQLite and single-process runs, where there is no one to share with.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from datetime import timedelta
from typing import Protocol

import redis
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from glaze_pipeline.core.cache import AnswerCache, CacheKey
from glaze_pipeline.core.cache_redis import RedisBreaker

log = logging.getLogger(__name__)

DEFAULT_LOCK_TTL = timedelta(seconds=30)
DEFAULT_MAX_WAIT = timedelta(seconds=30)
FIRST_POLL_S = 0.01
MAX_POLL_S = 0.25
REDIS_PREFIX = "glaze:flight:"
PG_NAMESPACE = "glaze:flight:"

# Delete the lock only if it still holds our token: after an expiry it may be someone else's.
_RELEASE_SCRIPT = """
if redis.call("get", KEYS[1]) == ARGV[1] then
    return redis.call("del", KEYS[1])
end
return 0
"""


class Flight(Protocol):
    """Who may buy a key's answer now; see the module docstring for the protocol."""

    @property
    def shared(self) -> AnswerCache | None:
        """The tier contenders re-read after a claim and write through to; None: no sharing."""
        ...

    def claim(self, key: CacheKey) -> AbstractAsyncContextManager[bool]:
        """Wait until this run holds `key` (True) or `max_wait` ran out (False)."""
        ...

    def close(self) -> None: ...


class NoFlight:
    """No contenders to coordinate with: every claim is granted at once."""

    shared: AnswerCache | None = None

    @asynccontextmanager
    async def claim(self, key: CacheKey) -> AsyncIterator[bool]:
        yield True

    def close(self) -> None:
        return None


async def _wait_for(
    try_lock: Callable[[], bool | None], unlock: Callable[[], None], max_wait_s: float
) -> bool:
    """Poll `try_lock` with a jittered exponential backoff until it holds or time runs out.

    `try_lock` (blocking, run in a thread) returns True (held), False (someone else holds it)
    or None (the lock service failed: stop waiting, proceed unlocked).
    """
    deadline = time.monotonic() + max_wait_s
    delay = FIRST_POLL_S
    while True:
        outcome = await _attempt(try_lock, unlock)
        if outcome is not False:
            return bool(outcome)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(delay * (0.5 + random.random()), remaining))
        delay = min(delay * 2, MAX_POLL_S)


async def _attempt(try_lock: Callable[[], bool | None], unlock: Callable[[], None]) -> bool | None:
    """One `try_lock` in a thread; a lock it takes after its caller was cancelled is given back.

    Cancelling the await does not stop the thread, so without this a cancelled job (the engine
    cancels on the request's cancel flag) could leave a lock behind it.
    """
    guard = threading.Lock()
    state: dict[str, bool | None] = {"abandoned": False, "outcome": None}

    def attempt() -> bool | None:
        outcome = try_lock()
        with guard:
            if state["abandoned"]:
                if outcome:
                    unlock()
                return False
            state["outcome"] = outcome
        return outcome

    try:
        return await asyncio.to_thread(attempt)
    except asyncio.CancelledError:
        with guard:
            state["abandoned"] = True
            took = bool(state["outcome"])
        if took:
            unlock()  # the thread got the lock just before we were cancelled
        raise


class RedisFlight:
    """Single-flight across processes through Redis locks that expire after `lock_ttl`.

    `lock_ttl` should outlast a provider call (timeouts and retries included): a call that runs
    longer loses its lock, and a waiter may then buy the same answer a second time.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        shared: AnswerCache | None,
        prefix: str = REDIS_PREFIX,
        lock_ttl: timedelta = DEFAULT_LOCK_TTL,
        max_wait: timedelta = DEFAULT_MAX_WAIT,
        breaker: RedisBreaker | None = None,
    ) -> None:
        if lock_ttl <= timedelta(0) or max_wait < timedelta(0):
            raise ValueError("lock_ttl must be positive and max_wait not negative")
        self.client = client
        self.shared = shared
        self.prefix = prefix
        self.lock_ttl_ms = int(lock_ttl.total_seconds() * 1000)
        self.max_wait_s = max_wait.total_seconds()
        self.breaker = breaker if breaker is not None else RedisBreaker()
        self._release = client.register_script(_RELEASE_SCRIPT)

    def lock_name(self, key: CacheKey) -> str:
        entity_id, provider = key
        return f"{self.prefix}{provider}:{entity_id}"

    @asynccontextmanager
    async def claim(self, key: CacheKey) -> AsyncIterator[bool]:
        name = self.lock_name(key)
        token = secrets.token_hex(16)

        def try_lock() -> bool | None:
            if self.breaker.open:
                return None
            try:
                return bool(self.client.set(name, token, nx=True, px=self.lock_ttl_ms))
            except redis.RedisError as error:
                self.breaker.trip(error, "taking a single-flight lock")
                return None

        def unlock() -> None:
            try:
                self._release(keys=[name], args=[token])
            except redis.RedisError as error:
                log.warning("could not release %s (it expires on its own): %s", name, error)

        held = await _wait_for(try_lock, unlock, self.max_wait_s)
        try:
            yield held
        finally:
            if held:
                await asyncio.to_thread(unlock)

    def close(self) -> None:
        # The client belongs to whoever built it (it is shared with the Redis cache tier).
        return None


def advisory_lock_id(key: CacheKey, namespace: str = PG_NAMESPACE) -> int:
    """A stable signed 64-bit id for `key`, as pg_advisory_lock takes it."""
    entity_id, provider = key
    digest = hashlib.blake2b(f"{namespace}{provider}:{entity_id}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


class PostgresFlight:
    """Single-flight across processes through Postgres session advisory locks.

    Every lock this flight holds lives on one dedicated autocommit connection (not one from the
    store's pool, which a chunk's 50 concurrent lookups would drain). A session re-acquires its
    own advisory locks freely, so claims of the same key within this flight are refused in
    process first. The lock lives as long as its session: a crashed holder frees it at once,
    a hung one is outwaited after `max_wait`.
    """

    def __init__(
        self,
        url: str,
        *,
        shared: AnswerCache | None,
        namespace: str = PG_NAMESPACE,
        max_wait: timedelta = DEFAULT_MAX_WAIT,
        connect_timeout_s: int = 5,
    ) -> None:
        if max_wait < timedelta(0):
            raise ValueError("max_wait must not be negative")
        self.shared = shared
        self.namespace = namespace
        self.max_wait_s = max_wait.total_seconds()
        self._engine: Engine = create_engine(
            url,
            poolclass=NullPool,
            isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": connect_timeout_s},
        )
        self._connection: Connection | None = None
        self._generation = 0  # bumped on reconnect: locks of an older session are gone
        self._held: dict[int, int] = {}  # lock id -> generation it was taken in
        self._io = threading.Lock()  # one statement at a time on the dedicated connection

    @asynccontextmanager
    async def claim(self, key: CacheKey) -> AsyncIterator[bool]:
        lock_id = advisory_lock_id(key, self.namespace)
        held = await _wait_for(
            lambda: self._try_lock(lock_id), lambda: self._unlock(lock_id), self.max_wait_s
        )
        try:
            yield held
        finally:
            if held:
                await asyncio.to_thread(self._unlock, lock_id)

    def _try_lock(self, lock_id: int) -> bool | None:
        with self._io:
            if lock_id in self._held:
                return False
            for attempt in (1, 2):  # a dropped session is reopened once
                try:
                    connection = self._connect()
                    got = connection.execute(
                        text("SELECT pg_try_advisory_lock(:id)"), {"id": lock_id}
                    ).scalar_one()
                except DBAPIError as error:
                    self._drop_connection()
                    if attempt == 2:
                        log.warning(
                            "single-flight advisory lock unavailable, going ahead: %s", error
                        )
                        return None
                    continue
                if got:
                    self._held[lock_id] = self._generation
                return bool(got)
            return None

    def _unlock(self, lock_id: int) -> None:
        with self._io:
            generation = self._held.pop(lock_id, None)
            if generation != self._generation or self._connection is None:
                return  # that session is gone, and its locks with it
            try:
                self._connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": lock_id})
            except DBAPIError as error:
                self._drop_connection()
                log.warning("could not release advisory lock (session dropped): %s", error)

    def _connect(self) -> Connection:
        if self._connection is None or self._connection.closed:
            self._connection = self._engine.connect()
            self._generation += 1
        return self._connection

    def _drop_connection(self) -> None:
        if self._connection is not None:
            with suppress(DBAPIError):
                self._connection.close()
            self._connection = None

    def close(self) -> None:
        """End the session: Postgres frees every lock it still holds."""
        with self._io:
            self._drop_connection()
            self._held.clear()
        self._engine.dispose()
