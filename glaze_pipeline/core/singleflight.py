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
  lock expired never frees someone else's. Renewed while its holder lives; a crashed holder's
  lock expires after `lock_ttl` (10 s).
- `PostgresFlight`: `pg_try_advisory_lock` on a 64-bit hash of the key, held on one dedicated
  connection per flight. A crashed holder's session ends and frees its locks at once.
- `FileFlight`: the SQLite default's, for steps side by side on one machine: a lock on one
  byte, at a 62-bit hash of the key, of a lock file next to the database, taken without
  blocking. The kernel frees a crashed holder's locks at once.
- `FallbackFlight`: Redis first, the database's lock behind it, so Redis going down never
  turns single-flight off where the database has a lock to offer.
- `NoFlight`: a run in one process on SQLite (no one to share with: its spans run one after
  another, and meet in its cache), an in-memory database, and SQLite on a system without
  open-file-description locks (macOS).

A backend whose lock service fails reports the claim `unavailable` and holds nothing; on its
own it then fails open (the run proceeds unlocked, the error is logged).

Claims and releases are coalesced per tick of the event loop: the Redis ones go, with the
shared tier's reads and writes, as one pipeline on a `redis.asyncio` client (`RedisLink`, no
thread hop); the Postgres ones as one statement (`pg_try_advisory_lock` over an array of ids)
in one thread hop. A lock taken for a claimant that was cancelled meanwhile is given back.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import random
import secrets
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from glaze_pipeline.core.cache import (
    AnswerCache,
    CachedAnswer,
    CacheKey,
    TieredCache,
    read_one,
    write_one,
)
from glaze_pipeline.core.cache_redis import RedisBreaker, redis_link
from glaze_pipeline.core.coalesce import Coalescer, LoopLocal
from glaze_pipeline.core.flight import Claim, Flight

log = logging.getLogger(__name__)

# A held Redis lock is renewed every third of its TTL while its holder lives, so a holder's
# slow call never loses it, and a dead holder's lock frees others within the TTL.
DEFAULT_LOCK_TTL = timedelta(seconds=10)
DEFAULT_MAX_WAIT = timedelta(seconds=30)
FIRST_POLL_S = 0.01
MAX_POLL_S = 0.25
REDIS_PREFIX = "glaze:flight:"
PG_NAMESPACE = "glaze:flight:"

# A claim's token: random per process (the pid for forked children, which inherit it), then a
# counter: unique, without reading the system's random source per claim.
_TOKEN_PREFIX = secrets.token_hex(12) + ":"
_claims = itertools.count()

# Delete the lock only if it still holds our token: after an expiry it may be someone else's.
_RELEASE_SCRIPT = """
if redis.call("get", KEYS[1]) == ARGV[1] then
    return redis.call("del", KEYS[1])
end
return 0
"""

# Extend each lock (KEYS) that still holds its token (ARGV[2..]) by ARGV[1] ms: how many were.
_RENEW_SCRIPT = """
local renewed = 0
for i, name in ipairs(KEYS) do
    if redis.call("get", name) == ARGV[i + 1] then
        redis.call("pexpire", name, ARGV[1])
        renewed = renewed + 1
    end
end
return renewed
"""


async def _wait_for(
    try_lock: Callable[[], Awaitable[bool | None]], max_wait_s: float
) -> bool | None:
    """Try `try_lock` with a jittered exponential backoff until it holds or time runs out.

    `try_lock` returns True (held), False (someone else holds it) or None (the lock service
    failed: stop waiting). Returns True (held), False (`max_wait_s` ran out) or None (the lock
    service failed).
    """
    deadline = time.monotonic() + max_wait_s
    delay = FIRST_POLL_S
    while True:
        outcome = await try_lock()
        if outcome is not False:
            return outcome
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(delay * (0.5 + random.random()), remaining))
        delay = min(delay * 2, MAX_POLL_S)


def _took(reply: Any) -> bool:
    """Whether a `SET ... NX` reply says the lock was taken."""
    return reply is True or reply in (b"OK", "OK")


def _claim(outcome: bool | None, shared: AnswerCache | None) -> Claim:
    """The claim for a `_wait_for` outcome: held, outwaited (meet in `shared`), or failed."""
    return Claim.failed() if outcome is None else Claim(held=outcome, shared=shared)


class RedisFlight:
    """Single-flight across processes through Redis locks that expire after `lock_ttl`.

    A held lock is renewed every third of `lock_ttl` (one script for all the flight's held
    locks) for as long as its holder lives: a slow call keeps it, and a holder that died frees
    its keys within `lock_ttl` (a re-run after a crash waits that long at most, not a call's
    worst case). `renew=False` plays a holder that stopped renewing (tests). Claims and
    releases ride the client's `RedisLink`: one pipeline per tick with the shared tier's work.
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
        renew: bool = True,
    ) -> None:
        if lock_ttl <= timedelta(0) or max_wait < timedelta(0):
            raise ValueError("lock_ttl must be positive and max_wait not negative")
        self.client = client
        self.renew = renew
        self._held: dict[str, str] = {}  # lock name -> token, while held
        self._renewer: asyncio.Task[None] | None = None
        self.shared = shared
        self.prefix = prefix
        self.lock_ttl_ms = int(lock_ttl.total_seconds() * 1000)
        self.max_wait_s = max_wait.total_seconds()
        self.breaker = breaker if breaker is not None else RedisBreaker()
        self.link = redis_link(client, self.breaker)

    def lock_name(self, key: CacheKey) -> str:
        entity_id, provider = key
        return f"{self.prefix}{provider}:{entity_id}"

    @asynccontextmanager
    async def claim(self, key: CacheKey) -> AsyncIterator[Claim]:
        if self.breaker.open:  # known down: not even a round trip
            yield Claim.failed()
            return
        name = self.lock_name(key)
        token = f"{_TOKEN_PREFIX}{os.getpid()}:{next(_claims)}"

        def give_back(replies: list[Any]) -> None:
            # The lock was taken for a claimant cancelled meanwhile: nobody will release it.
            if replies and _took(replies[0]):
                asyncio.get_running_loop().create_task(self._unlock(name, token))

        async def try_lock() -> bool | None:
            replies = await self.link.execute(
                [("SET", name, token, "NX", "PX", self.lock_ttl_ms)], on_abandoned=give_back
            )
            if replies is None:
                return None
            if isinstance(replies[0], Exception):
                self.breaker.trip(replies[0], "taking a single-flight lock")
                return None
            return _took(replies[0])

        outcome = await _wait_for(try_lock, self.max_wait_s)
        if outcome:
            self._held[name] = token
            self._keep_renewing()
        try:
            yield _claim(outcome, self.shared)
        finally:
            if outcome:
                self._held.pop(name, None)
                if not self._held and self._renewer is not None:
                    self._renewer.cancel()  # nothing to renew: not left sleeping on the loop
                await asyncio.shield(self._unlock(name, token))

    def _keep_renewing(self) -> None:
        """Make sure a renewer runs on this loop while locks are held."""
        renewer = self._renewer
        loop = asyncio.get_running_loop()
        if not self.renew or (
            renewer is not None and not renewer.done() and renewer.get_loop() is loop
        ):
            return
        self._renewer = loop.create_task(self._renew_while_held())

    async def _renew_while_held(self) -> None:
        every = self.lock_ttl_ms / 3000
        while self._held:
            await asyncio.sleep(every)
            held = list(self._held.items())
            if not held:
                return
            names = [name for name, _ in held]
            tokens = [token for _, token in held]
            command = ("EVAL", _RENEW_SCRIPT, len(names), *names, self.lock_ttl_ms, *tokens)
            replies = await self.link.execute([command])
            if replies is None or isinstance(replies[0], Exception):
                log.warning("could not renew %d single-flight locks (they expire)", len(names))

    async def _unlock(self, name: str, token: str) -> None:
        # Token-checked: after an expiry the lock may be someone else's.
        replies = await self.link.execute([("EVAL", _RELEASE_SCRIPT, 1, name, token)])
        if replies is None or isinstance(replies[0], Exception):
            log.warning("could not release %s (it expires on its own)", name)

    def degraded(self) -> bool:
        # Alone, a failed Redis fails the claims themselves (`Claim.failed`): the waterfall
        # counts what it buys then as unshared; what Redis took before is Redis's to keep.
        return False

    def close(self) -> None:
        # The client belongs to whoever built it (it is shared with the Redis cache tier).
        return None


@dataclass(frozen=True, slots=True)
class _AdvisoryBatches:
    """One loop's coalesced advisory-lock statements: takes and releases."""

    take: Coalescer[int, bool | None]
    release: Coalescer[int, None]


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
        self._batches: LoopLocal[_AdvisoryBatches] = LoopLocal(self._loop_batches)

    @asynccontextmanager
    async def claim(self, key: CacheKey) -> AsyncIterator[Claim]:
        lock_id = advisory_lock_id(key, self.namespace)
        batches = self._batches.get()
        outcome = await _wait_for(lambda: batches.take.submit(lock_id), self.max_wait_s)
        try:
            yield _claim(outcome, self.shared)
        finally:
            if outcome:
                await asyncio.shield(batches.release.submit(lock_id))

    def _loop_batches(self) -> _AdvisoryBatches:
        release: Coalescer[int, None] = Coalescer(
            lambda ids: asyncio.to_thread(self._unlock_many, ids)
        )

        def give_back(lock_id: int, took: bool | None) -> None:
            # Taken for a claimant cancelled meanwhile: nobody else will let it go.
            if took:
                asyncio.get_running_loop().create_task(release.submit(lock_id))

        take: Coalescer[int, bool | None] = Coalescer(
            lambda ids: asyncio.to_thread(self._try_locks, ids), on_abandoned=give_back
        )
        return _AdvisoryBatches(take, release)

    def _try_locks(self, lock_ids: list[int]) -> list[bool | None]:
        """Try a tick's locks in one statement: True (taken), False (held by someone, this
        flight included), or None for all when the database is unavailable."""
        with self._io:
            wanted = [i for i in dict.fromkeys(lock_ids) if i not in self._held]
            got: set[int] = set()
            for attempt in (1, 2):  # a dropped session is reopened once
                if not wanted:
                    break
                try:
                    connection = self._connect()
                    rows = connection.execute(
                        text(
                            "SELECT id, pg_try_advisory_lock(id) "
                            "FROM unnest(CAST(:ids AS bigint[])) AS id"
                        ),
                        {"ids": wanted},
                    ).all()
                except DBAPIError as error:
                    self._drop_connection()
                    if attempt == 2:
                        log.warning("single-flight advisory lock unavailable: %s", error)
                        return [None] * len(lock_ids)
                    continue
                got = {lock_id for lock_id, taken in rows if taken}
                break
            outcomes: list[bool | None] = []
            for lock_id in lock_ids:
                took = lock_id in got
                got.discard(lock_id)  # a key claimed twice in one tick is granted once
                if took:
                    self._held[lock_id] = self._generation
                outcomes.append(took)
            return outcomes

    def _unlock_many(self, lock_ids: list[int]) -> list[None]:
        with self._io:
            mine = [i for i in lock_ids if self._held.pop(i, None) == self._generation]
            if mine and self._connection is not None:
                try:
                    self._connection.execute(
                        text(
                            "SELECT pg_advisory_unlock(id) FROM unnest(CAST(:ids AS bigint[])) AS id"
                        ),
                        {"ids": mine},
                    )
                except DBAPIError as error:
                    self._drop_connection()
                    log.warning("could not release advisory locks (session dropped): %s", error)
        return [None] * len(lock_ids)

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

    def degraded(self) -> bool:
        return False  # its tier is the database itself

    def close(self) -> None:
        """End the session: Postgres frees every lock it still holds."""
        with self._io:
            self._drop_connection()
            self._held.clear()
        self._engine.dispose()


# `struct flock` on Linux: type, whence, start, len, pid (0: an open file description's lock).
_FLOCK = "hhqqi0q"
_CONTENDED = (errno.EACCES, errno.EAGAIN)


def file_lock_offset(key: CacheKey, namespace: str = PG_NAMESPACE) -> int:
    """The byte of the lock file that stands for `key`: its advisory-lock hash, 62 bits."""
    return advisory_lock_id(key, namespace) & (2**62 - 1)


def offers_file_locks() -> bool:
    """Whether this system has open-file-description locks (Linux; not macOS): `FileFlight`
    needs them."""
    return hasattr(fcntl, "F_OFD_SETLK")


class FileFlight:
    """Single-flight across the processes of one machine (the SQLite default) through
    open-file-description locks (`F_OFD_SETLK`) on a lock file next to the database.

    A key is one byte of the file, at `file_lock_offset` (the file stays empty: a lock may lie
    past its end), taken without blocking and tried again on the advisory locks' backoff. The
    locks belong to this flight's open file, not its process: two flights conflict in one
    process as in two, a holder that dies frees its locks with its files at once (no TTL to
    outwait), and `close()` frees them all. An open file description re-grants its own locks,
    so a key this flight holds is refused in process first. The syscall takes microseconds: it
    is made on the loop, no thread hop nor coalescing.
    """

    backend = "file"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        shared: AnswerCache | None,
        namespace: str = PG_NAMESPACE,
        max_wait: timedelta = DEFAULT_MAX_WAIT,
    ) -> None:
        if max_wait < timedelta(0):
            raise ValueError("max_wait must not be negative")
        self.path = os.fspath(path)
        self.shared = shared
        self.namespace = namespace
        self.max_wait_s = max_wait.total_seconds()
        self._io = threading.Lock()  # the held set, across the loops of this process
        self._held: set[int] = set()
        self._pid = os.getpid()
        self._fd: int | None = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @asynccontextmanager
    async def claim(self, key: CacheKey) -> AsyncIterator[Claim]:
        offset = file_lock_offset(key, self.namespace)
        outcome = await _wait_for(lambda: self._try_lock(offset), self.max_wait_s)
        try:
            yield _claim(outcome, self.shared)
        finally:
            if outcome:
                self._unlock(offset)

    async def _try_lock(self, offset: int) -> bool | None:
        """True (taken), False (held: elsewhere, or by this flight), None (the lock failed)."""
        with self._io:
            if self._pid != os.getpid():  # a forked child shares the parent's open file
                self._pid, self._fd, self._held = os.getpid(), self._open(), set()
            if self._fd is None:
                return None  # closed
            if offset in self._held:
                return False  # this flight holds it: its file would grant it again
            try:
                self._lock(self._fd, fcntl.F_WRLCK, offset)
            except OSError as error:
                if error.errno in _CONTENDED:
                    return False
                log.warning("single-flight file lock %s unavailable: %s", self.path, error)
                return None
            self._held.add(offset)
            return True

    def _unlock(self, offset: int) -> None:
        with self._io:
            if offset in self._held and self._fd is not None:
                self._held.discard(offset)
                self._lock(self._fd, fcntl.F_UNLCK, offset)

    def _lock(self, fd: int, kind: int, offset: int) -> None:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, kind, 0, offset, 1, 0))

    def degraded(self) -> bool:
        return False  # its tier is the database itself

    def close(self) -> None:
        """Close the lock file: the kernel frees every lock this flight still holds."""
        with self._io:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None
            self._held.clear()


@dataclass
class _Outage:
    """What this process has seen of one Redis server's outages (shared by its flights)."""

    failed_at: float | None = None  # monotonic: the first failure of the outage under way
    guarded_until: float = 0.0  # after an outage: claims keep the database's guard until then


# Per Redis server (host, port, db): every chunk of a process opens its own flight, and an
# outage one has seen, or outwaited, holds for the next.
_OUTAGES: dict[str, _Outage] = {}


def forget_outages() -> None:
    """Forget the Redis outages seen (tests: one test's outage is not the next one's)."""
    _OUTAGES.clear()


def _outage_of(flight: Flight) -> _Outage:
    client = getattr(flight, "client", None)
    settings = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    server = "|".join(str(settings.get(name)) for name in ("host", "port", "path", "db"))
    return _OUTAGES.setdefault(server, _Outage())


class FallbackFlight:
    """Redis locks where runs wait, the database's lock behind them for when Redis dies.

    With Redis up, a claim is a Redis lock and contenders meet in Redis; a bought answer
    reaches the `entity_cache` table with the chunk's periodic flush (every 5 s while Redis
    holds it; within the second once this process sees Redis fail, or the answer did not reach
    it) and at its end, not under the lock. That keeps the database off the per-purchase path:
    on S3 at `--scale 0.05`, 1.58 ms of worker CPU per provider call and 126 statements,
    against 2.0 ms and 425 when every purchase also took the Postgres lock and read and wrote
    SQL under it.

    While the `primary` (Redis) is unavailable (its breaker is open, or taking the lock errs),
    claims take the `fallback` (Postgres advisory) lock and meet in SQL. Exactly once across
    the switch: the first claim to find Redis down first waits out `grace` (the waiters'
    `max_wait` and a flush; one wait per outage per process, whatever its chunks): a purchase
    made elsewhere under a Redis lock has by then ended and its answer been flushed to SQL,
    where the claims that fell back read it (or it outlasted its waiters, who went ahead).
    Once Redis is back, claims that win its lock also take the Postgres one and meet in both
    tiers for another `grace`, so purchases still under Postgres locks are seen too.
    `always_guard=True` keeps that on all the time (each purchase
    then takes part in an advisory-lock take and release and an SQL read and write, coalesced
    per tick) for a deployment where some processes may lose Redis while others keep it: a
    process cut off from Redis alone waits out `grace`, but purchases the others begin under
    Redis locks after that are not locked in Postgres, and may be bought twice.

    A fallback of `NoFlight` (no lock to offer: SQLite in one process or in memory, a system
    without file locks) makes Redis down an explicit "going ahead unlocked", without the wait.
    Either way it is logged once per flight. A primary that was outwaited (`max_wait`) is not
    followed by a second wait on the fallback: the run goes ahead, as it would on Redis alone.
    """

    def __init__(
        self,
        primary: Flight,
        fallback: Flight,
        *,
        grace: timedelta = DEFAULT_MAX_WAIT + timedelta(seconds=2),
        always_guard: bool = False,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self.grace_s = grace.total_seconds()
        self.always_guard = always_guard
        self._outage = _outage_of(primary)
        self._primary_breaker: RedisBreaker | None = getattr(primary, "breaker", None)
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
                await self._outwait_redis_holders()
                yield await stack.enter_async_context(self.fallback.claim(key))
            elif not first.held:
                yield first
            elif not self._guarded():
                yield Claim(held=True, shared=_RedisMeeting(self, key, first.shared, stack))
            else:
                behind = await stack.enter_async_context(self.fallback.claim(key))
                yield Claim(
                    held=behind.held or behind.unavailable,  # database down: Redis is all there is
                    shared=_meeting(first.shared, behind.shared),
                )

    def degraded(self) -> bool:
        """Whether Redis has failed since this flight's claims were granted (its breaker is
        open): contenders then meet in the fallback's tier, and answers written through to
        Redis may be lost with it."""
        return self._primary_breaker is not None and self._primary_breaker.open

    def _guarded(self) -> bool:
        """Whether a claim that holds the Redis lock also takes the database's."""
        outage = self._outage
        if outage.failed_at is not None:  # Redis is back: guard the way back too
            outage.failed_at = None
            outage.guarded_until = time.monotonic() + self.grace_s
        return self.always_guard or time.monotonic() < outage.guarded_until

    async def _outwait_redis_holders(self) -> None:
        """Before the first claims of an outage lock in the database: let purchases made under
        Redis locks end and reach SQL (`grace` after the outage was first seen)."""
        if self.fallback.backend == "none":
            return
        outage = self._outage
        now = time.monotonic()
        if outage.failed_at is None:
            outage.failed_at = now
            log.warning(
                "single-flight: waiting %.0f s for purchases under %s locks to end before "
                "locking in %s",
                self.grace_s,
                self.primary.backend,
                self.fallback.backend,
            )
        outage.guarded_until = max(outage.guarded_until, now + self.grace_s)
        wait = outage.failed_at + self.grace_s - now
        if wait > 0:
            await asyncio.sleep(wait)

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
            return
        log.warning(
            "single-flight: %s unavailable, falling back to %s locks while it is down",
            self.primary.backend,
            self.fallback.backend,
        )

    def close(self) -> None:
        self.primary.close()
        self.fallback.close()


class _RedisMeeting:
    """Where a claim held on Redis alone meets its contenders: in Redis, unless Redis fails
    under it. A re-read that finds Redis down is then done as a claim that fell back would:
    after waiting out the other Redis holders, under the database's lock, in SQL (which the
    holder that bought the answer meanwhile has flushed it to); and the answer this claim buys
    is written there too. Lives as long as its claim (`stack` is the claim's)."""

    def __init__(
        self,
        flight: FallbackFlight,
        key: CacheKey,
        redis_tier: AnswerCache | None,
        stack: AsyncExitStack,
    ) -> None:
        self._flight = flight
        self._key = key
        self._redis = redis_tier
        self._stack = stack
        self._database: AnswerCache | None = None

    @property
    def tiers(self) -> list[AnswerCache]:
        """The tiers an answer written here reaches (so the chunk's flush skips them)."""
        return [tier for tier in (self._redis, self._database) if tier is not None]

    async def get_async(self, key: CacheKey) -> CachedAnswer | None:
        found = await read_one(self._redis, key) if self._redis is not None else None
        if found is not None or not self._flight.degraded():
            return found
        flight = self._flight
        flight._note_fallback()
        await flight._outwait_redis_holders()
        behind = await self._stack.enter_async_context(flight.fallback.claim(self._key))
        self._database = behind.shared
        return await read_one(behind.shared, key) if behind.shared is not None else None

    async def put_async(self, key: CacheKey, answer: CachedAnswer) -> None:
        for tier in (self._redis, self._database):
            if tier is not None:
                await write_one(tier, key, answer)

    def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, CachedAnswer]:
        return self._redis.get_many(keys) if self._redis is not None else {}

    def put_many(self, answers: Mapping[CacheKey, CachedAnswer]) -> None:
        if self._redis is not None:
            self._redis.put_many(answers)


def _meeting(*tiers: AnswerCache | None) -> AnswerCache | None:
    """One tier for the given ones (fastest first), skipping the absent."""
    present = [tier for tier in tiers if tier is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else TieredCache(present)
