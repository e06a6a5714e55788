"""Single-flight: concurrent runs that need the same (entity, provider) answer buy it once.

A run that misses the cache claims the key before calling the provider:

    async with flight.claim(key) as claim:
        answer = <re-read claim.shared>   # another holder may have bought it meanwhile
        if answer is None:
            answer = <call the provider>
            <write it to claim.shared>    # at once, so waiters see it when the claim ends

The claim returns when this run holds the key, or when it has waited `max_wait` for a holder
that never let go (`claim.held` is then False and the run goes ahead on its own: a duplicate
call is better than a stuck job). `claim.shared` is the cache tier of the lock actually taken,
where every contender for that lock reads and writes: Redis with a Redis lock, the SQL table
with a Postgres one. It comes with the claim, not with the flight, because a flight that falls
back from one lock service to another must meet its contenders in the matching tier.

- `RedisFlight`: `SET key token NX PX ttl`; released by a token-checked script, so a holder whose
  lock expired never frees someone else's. A crashed holder's lock expires after `lock_ttl`.
- `PostgresFlight`: `pg_try_advisory_lock` on a 64-bit hash of the key, held on one dedicated
  connection per flight. A crashed holder's session ends and frees its locks at once.
- `FallbackFlight`: Redis first, the database's lock behind it, so Redis going down never
  turns single-flight off where the database has a lock to offer.
- `NoFlight`: SQLite and single-process runs, where there is no one to share with.

A backend whose lock service fails reports the claim `unavailable` and holds nothing; on its
own it then fails open (the run proceeds unlocked, the error is logged).
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
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from datetime import timedelta

import redis
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from glaze_pipeline.core.cache import AnswerCache, CacheKey, TieredCache
from glaze_pipeline.core.cache_redis import RedisBreaker
from glaze_pipeline.core.flight import Claim, Flight

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


async def _wait_for(
    try_lock: Callable[[], bool | None], unlock: Callable[[], None], max_wait_s: float
) -> bool | None:
    """Poll `try_lock` with a jittered exponential backoff until it holds or time runs out.

    `try_lock` (blocking, run in a thread) returns True (held), False (someone else holds it)
    or None (the lock service failed: stop waiting). Returns True (held), False (`max_wait_s`
    ran out) or None (the lock service failed).
    """
    deadline = time.monotonic() + max_wait_s
    delay = FIRST_POLL_S
    while True:
        outcome = await _attempt(try_lock, unlock)
        if outcome is not False:
            return outcome
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


def _claim(outcome: bool | None, shared: AnswerCache | None) -> Claim:
    """The claim for a `_wait_for` outcome: held, outwaited (meet in `shared`), or failed."""
    return Claim.failed() if outcome is None else Claim(held=outcome, shared=shared)


class RedisFlight:
    """Single-flight across processes through Redis locks that expire after `lock_ttl`.

    `lock_ttl` should outlast a provider call (timeouts and retries included): a call that runs
    longer loses its lock, and a waiter may then buy the same answer a second time.
    """

    backend = "redis"

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
    async def claim(self, key: CacheKey) -> AsyncIterator[Claim]:
        if self.breaker.open:  # known down: not even a thread hop
            yield Claim.failed()
            return
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

        outcome = await _wait_for(try_lock, unlock, self.max_wait_s)
        try:
            yield _claim(outcome, self.shared)
        finally:
            if outcome:
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

    backend = "postgres"

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
    async def claim(self, key: CacheKey) -> AsyncIterator[Claim]:
        lock_id = advisory_lock_id(key, self.namespace)
        outcome = await _wait_for(
            lambda: self._try_lock(lock_id), lambda: self._unlock(lock_id), self.max_wait_s
        )
        try:
            yield _claim(outcome, self.shared)
        finally:
            if outcome:
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
                        log.warning("single-flight advisory lock unavailable: %s", error)
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


class FallbackFlight:
    """Redis locks where runs wait, with the database's lock behind them for when Redis dies.

    A claim waits on the `primary` (Redis) lock. Once it holds that, it takes the `fallback`
    (Postgres advisory) lock as well before buying, and meets contenders in both tiers (Redis,
    then SQL). Holding both is what makes the fallback safe: when Redis dies mid-purchase, the
    contenders that fall back to Postgres find the purchase locked there, wait for it and read
    the answer from SQL, where it was written before the locks were let go. Taken only after the
    Redis lock, the Postgres lock is normally free at once; waiting stays in Redis. The price,
    with Redis up: each purchase also costs two lock round trips and an SQL read and write, as
    on Postgres alone; a fallback taken only once Redis is down would leave every purchase in
    flight at that moment unguarded, and the contenders that fell back would buy them again.

    While the primary is unavailable (its breaker is open, or taking the lock errs), claims go
    to the fallback alone, and meet in its tier only. A fallback of `NoFlight` (SQLite, which has
    no lock to offer) makes that an explicit "going ahead unlocked". Either way it is logged
    once per flight. A primary that was outwaited (`max_wait`) is not followed by a second wait
    on the fallback: the run goes ahead, as it would on Redis alone.
    """

    def __init__(self, primary: Flight, fallback: Flight) -> None:
        self.primary = primary
        self.fallback = fallback
        self._fell_back = False

    @property
    def backend(self) -> str:
        if self.fallback.backend == "none":
            return self.primary.backend
        return f"{self.primary.backend}+{self.fallback.backend}"

    @asynccontextmanager
    async def claim(self, key: CacheKey) -> AsyncIterator[Claim]:
        async with AsyncExitStack() as stack:
            first = await stack.enter_async_context(self.primary.claim(key))
            if first.unavailable:
                self._note_fallback()
                yield await stack.enter_async_context(self.fallback.claim(key))
            elif not first.held:
                yield first
            else:
                behind = await stack.enter_async_context(self.fallback.claim(key))
                yield Claim(
                    held=behind.held or behind.unavailable,  # database down: Redis is all there is
                    shared=_meeting(first.shared, behind.shared),
                )

    def _note_fallback(self) -> None:
        if self._fell_back:
            return
        self._fell_back = True
        if self.fallback.backend == "none":
            log.warning(
                "single-flight: %s unavailable and the store has no lock to fall back to; "
                "going ahead unlocked while it is down",
                self.primary.backend,
            )
        else:
            log.warning(
                "single-flight: %s unavailable, falling back to %s locks while it is down",
                self.primary.backend,
                self.fallback.backend,
            )

    def close(self) -> None:
        self.primary.close()
        self.fallback.close()


def _meeting(*tiers: AnswerCache | None) -> AnswerCache | None:
    """One tier for the given ones (fastest first), skipping the absent."""
    present = [tier for tier in tiers if tier is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else TieredCache(present)
