"""The shared cache tier: provider answers in Redis, seen by every process at once.

One key per (provider, entity): `glaze:answer:<provider>:<entity id>`, holding compact JSON.
Provider first, so one provider's answers can be dropped with a single `SCAN MATCH`. A batch is
one round trip each way (MGETs or SETs in one pipeline). An answer lives until its
`fetched_at` plus its TTL, whichever tier writes it: a back-fill from the SQL tier never makes an
old answer live longer. Redis being down costs cache hits, never the job: reads miss and writes
are dropped, with a warning, and a `RedisBreaker` keeps the tier (and the Redis single-flight)
off Redis for a few seconds after an error rather than paying a timeout on every call.

On the event loop (`get_async`, `put_async`, and the Redis single-flight), the work of all the
lookups of one tick goes to Redis as one pipeline on a `redis.asyncio` client (`RedisLink`),
with no thread hop: a chunk of 200 concurrent lookups costs a few round trips per wave, not
several per lookup.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff

from glaze_pipeline.core import jsontext
from glaze_pipeline.core.cache import CachedAnswer, CacheKey
from glaze_pipeline.core.coalesce import Coalescer, LoopLocal

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "glaze:answer:"
DEFAULT_TTL = timedelta(days=7)
DEFAULT_MISS_TTL = timedelta(hours=6)
KEYS_PER_COMMAND = 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
DEFAULT_COOLDOWN_S = 5.0


class RedisBreaker:
    """After a Redis error, skip Redis for `cooldown_s`: one slow failure, not one per call."""

    def __init__(self, cooldown_s: float = DEFAULT_COOLDOWN_S) -> None:
        self.cooldown_s = cooldown_s
        self._open_until = 0.0

    @property
    def open(self) -> bool:
        """True while Redis is being skipped."""
        return time.monotonic() < self._open_until

    def trip(self, error: Exception, doing: str) -> None:
        if not self.open:
            log.warning(
                "redis unavailable (%s), skipping it for %.0f s: %s", doing, self.cooldown_s, error
            )
        self._open_until = time.monotonic() + self.cooldown_s


Command = tuple[Any, ...]  # one Redis command: name and arguments
# A submission: its commands and what to do with their replies if its caller was cancelled.
Submission = tuple[Sequence[Command], Callable[[list[Any]], None] | None]
# The async client copies these settings of the blocking one (timeouts, server, credentials).
_COPIED_SETTINGS = (
    "host",
    "port",
    "db",
    "username",
    "password",
    "socket_timeout",
    "socket_connect_timeout",
    "health_check_interval",
    "client_name",
)


class RedisLink:
    """The event-loop side of one Redis server: per loop, a `redis.asyncio` client and a
    `Coalescer` that sends the commands of one tick as one pipeline.

    Built from the blocking client the rest of the process uses (same server, database,
    timeouts); the async client is made on the loop that uses it and closed when that loop
    shuts down. `execute` returns each command's reply (an exception object for a command that
    failed on its own), or None when Redis could not be reached (the breaker is tripped).
    """

    def __init__(self, client: redis.Redis, breaker: RedisBreaker) -> None:
        self.client = client
        self.breaker = breaker
        self._per_loop: LoopLocal[tuple[aredis.Redis, Coalescer[Submission, list[Any] | None]]]
        self._per_loop = LoopLocal(self._open, self._close)

    async def execute(
        self,
        commands: Sequence[Command],
        *,
        on_abandoned: Callable[[list[Any]], None] | None = None,
    ) -> list[Any] | None:
        """Send `commands` with everything else submitted this tick; their replies, or None."""
        if self.breaker.open:
            return None
        _, batch = self._per_loop.get()
        return await batch.submit((commands, on_abandoned))

    @property
    def pipelines(self) -> int:
        """Pipelines this loop's link has sent (tests)."""
        return self._per_loop.get()[1].batches

    def _open(self) -> tuple[aredis.Redis, Coalescer[Submission, list[Any] | None]]:
        pool = self.client.connection_pool
        settings = {k: v for k, v in pool.connection_kwargs.items() if k in _COPIED_SETTINGS and v}
        if "path" in pool.connection_kwargs:
            settings["unix_socket_path"] = pool.connection_kwargs["path"]
        if "ssl" in pool.connection_class.__name__.lower():
            settings["ssl"] = True
        # The read timeout bounds each pipeline as a whole (`_send`): redis-py would arm one
        # per reply, and wrap each send in `wait_for` (~3 % of the worker's samples in S3).
        timeout = settings.pop("socket_timeout", None)
        client = aredis.Redis(
            **settings,
            socket_timeout=None,  # not redis-py's default (5 s per read)
            retry=AsyncRetry(ExponentialBackoff(cap=0.1, base=0.02), 1),
        )
        return client, Coalescer(
            lambda submissions: self._send(client, submissions, timeout), on_abandoned=_abandoned
        )

    @staticmethod
    async def _close(state: tuple[aredis.Redis, Coalescer[Submission, list[Any] | None]]) -> None:
        await state[0].aclose()

    async def _send(
        self, client: aredis.Redis, submissions: list[Submission], timeout: float | None
    ) -> list[list[Any] | None]:
        if self.breaker.open:
            return [None] * len(submissions)
        pipe = client.pipeline(transaction=False)
        for commands, _ in submissions:
            for command in commands:
                pipe.execute_command(*command)
        try:
            # A timeout cancels the pipeline; redis-py drops the connection it was reading.
            async with asyncio.timeout(timeout):
                replies = await pipe.execute(raise_on_error=False)
        except (redis.RedisError, OSError) as error:  # TimeoutError is an OSError
            self.breaker.trip(error, f"a pipeline of {len(pipe)} commands")
            return [None] * len(submissions)
        results: list[list[Any] | None] = []
        at = 0
        for commands, _ in submissions:
            results.append(list(replies[at : at + len(commands)]))
            at += len(commands)
        return results


def _abandoned(submission: Submission, replies: list[Any] | None) -> None:
    _, on_abandoned = submission
    if on_abandoned is not None and replies is not None:
        on_abandoned(replies)


_LINKS: weakref.WeakKeyDictionary[redis.Redis, list[RedisLink]] = weakref.WeakKeyDictionary()


def redis_link(client: redis.Redis, breaker: RedisBreaker) -> RedisLink:
    """The link of `client` and `breaker`: the cache tier and the flight that share both share
    its pipelines too (one per tick for claims, re-reads, write-throughs and releases)."""
    links = _LINKS.setdefault(client, [])
    for link in links:
        if link.breaker is breaker:
            return link
    links.append(RedisLink(client, breaker))
    return links[-1]


class RedisAnswerCache:
    """Answers in Redis with a TTL per provider; misses ("not found") expire sooner.

    `ttl_by_provider` overrides `ttl` for the providers it names; a miss lives `miss_ttl`, never
    longer than its provider's TTL. With `fail_open` (the default), a Redis error is logged and
    treated as a miss (reads) or dropped (writes), since the other tiers still hold the answer;
    `breaker` (shared with the Redis flight when both use one server) then keeps calls off
    Redis for a while.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: timedelta = DEFAULT_TTL,
        ttl_by_provider: Mapping[str, timedelta] | None = None,
        miss_ttl: timedelta = DEFAULT_MISS_TTL,
        fail_open: bool = True,
        breaker: RedisBreaker | None = None,
    ) -> None:
        for name, value in {"ttl": ttl, "miss_ttl": miss_ttl, **(ttl_by_provider or {})}.items():
            if value <= timedelta(0):
                raise ValueError(f"TTL for {name} must be positive, got {value}")
        self.client = client
        self.prefix = prefix
        self.ttl = ttl
        self.ttl_by_provider = dict(ttl_by_provider or {})
        self.miss_ttl = miss_ttl
        self.fail_open = fail_open
        self.breaker = breaker if breaker is not None else RedisBreaker()
        self.link = redis_link(client, self.breaker)
        self._set_many = client.register_script(_SET_MANY)  # loaded on its first call
        self._scripted = True  # until the server refuses the script

    def key(self, cache_key: CacheKey) -> str:
        entity_id, provider = cache_key
        return f"{self.prefix}{provider}:{entity_id}"

    def ttl_for(self, provider: str, *, found: bool) -> timedelta:
        """How long an answer of `provider` lives after it was fetched."""
        ttl = self.ttl_by_provider.get(provider, self.ttl)
        return ttl if found else min(self.miss_ttl, ttl)

    def get_many(self, keys: Iterable[CacheKey]) -> dict[CacheKey, CachedAnswer]:
        wanted = list(dict.fromkeys(keys))
        if not wanted or (self.fail_open and self.breaker.open):
            return {}
        pipe = self.client.pipeline(transaction=False)
        for start in range(0, len(wanted), KEYS_PER_COMMAND):
            pipe.mget([self.key(key) for key in wanted[start : start + KEYS_PER_COMMAND]])
        try:
            replies: list[list[bytes | str | None]] = pipe.execute()
        except redis.RedisError as error:
            if not self.fail_open:
                raise
            self.breaker.trip(error, "reading answers")
            return {}
        found: dict[CacheKey, CachedAnswer] = {}
        payloads = (payload for reply in replies for payload in reply)
        for key, payload in zip(wanted, payloads, strict=True):
            if payload is None:
                continue
            answer = _decode(payload)
            if answer is None:
                log.warning("ignoring unreadable cached answer at %s", self.key(key))
                continue
            found[key] = answer
        return found

    async def get_async(self, key: CacheKey) -> CachedAnswer | None:
        """One answer, read on the event loop with this tick's other Redis work (fails open)."""
        replies = await self.link.execute([("GET", self.key(key))])
        if not replies or replies[0] is None or isinstance(replies[0], Exception):
            return None
        answer = _decode(replies[0])
        if answer is None:
            log.warning("ignoring unreadable cached answer at %s", self.key(key))
        return answer

    async def put_async(self, key: CacheKey, answer: CachedAnswer) -> None:
        """Write one answer through on the event loop, with this tick's other Redis work."""
        command = self.set_command(key, answer, datetime.now(UTC))
        if command is not None:
            await self.link.execute([command])

    def set_command(self, key: CacheKey, answer: CachedAnswer, now: datetime) -> Command | None:
        """The SET that stores `answer` until it expires; None if it already has."""
        expires = answer.fetched_at + self.ttl_for(key[1], found=answer.found)
        remaining_ms = int((expires - now).total_seconds() * 1000)
        if remaining_ms <= 0:
            return None  # already stale: writing it would only serve an expired answer
        return ("SET", self.key(key), _encode(answer), "PX", remaining_ms)

    def put_many(self, answers: Mapping[CacheKey, CachedAnswer]) -> None:
        """Write answers, each with what is left of its TTL: KEYS_PER_COMMAND per command.

        One script call sets a batch (`_SET_MANY`): a pipeline of SETs cost the client a command
        object, its packing and its reply each, ~3x the CPU, in a thread that holds the GIL
        the event loop's lookups wait for. A server that refuses scripts (an ACL without
        `@scripting`, say) gets the pipeline of SETs from then on."""
        if not answers or (self.fail_open and self.breaker.open):
            return
        now = datetime.now(UTC)
        entries: list[tuple[str, bytes, int]] = []
        for key, answer in answers.items():
            expires = answer.fetched_at + self.ttl_for(key[1], found=answer.found)
            remaining_ms = int((expires - now).total_seconds() * 1000)
            if remaining_ms <= 0:
                continue  # already stale: writing it would only serve an expired answer
            entries.append((self.key(key), _encode(answer), remaining_ms))
        if not entries:
            return
        try:
            if self._scripted:
                try:
                    self._set_scripted(entries)
                    return
                except redis.ResponseError as error:  # refused by the server, not unreachable
                    log.warning("Redis refused the batch-write script, using SETs: %s", error)
                    self._scripted = False
            pipe = self.client.pipeline(transaction=False)
            for name, value, remaining_ms in entries:
                pipe.set(name, value, px=remaining_ms)
            pipe.execute()
        except redis.RedisError as error:
            if not self.fail_open:
                raise
            self.breaker.trip(error, f"writing {len(entries)} answers")

    def _set_scripted(self, entries: Sequence[tuple[str, bytes, int]]) -> None:
        for start in range(0, len(entries), KEYS_PER_COMMAND):
            batch = entries[start : start + KEYS_PER_COMMAND]
            args: list[bytes | int] = []
            for _key, value, remaining_ms in batch:
                args += (value, remaining_ms)
            self._set_many(keys=[key for key, _value, _ms in batch], args=args)


# Sets KEYS[i] to ARGV[2i - 1], expiring in ARGV[2i] milliseconds: a batch in one command.
_SET_MANY = """
for i = 1, #KEYS do
    redis.call('SET', KEYS[i], ARGV[2 * i - 1], 'PX', ARGV[2 * i])
end
return #KEYS
"""


def _encode(answer: CachedAnswer) -> bytes:
    # fetched_at as integer microseconds since the epoch: exact, and shorter than ISO text.
    micros = (answer.fetched_at - _EPOCH) // _MICROSECOND
    payload: dict[str, Any] = {"f": int(answer.found), "t": micros}
    if answer.values:
        payload["v"] = dict(answer.values)
    if answer.confidence:
        payload["c"] = dict(answer.confidence)
    return jsontext.dumps_bytes(payload)


def _decode(payload: bytes | str) -> CachedAnswer | None:
    try:
        data = jsontext.loads(payload)
        return CachedAnswer(
            found=bool(data["f"]),
            values=data.get("v", {}),
            confidence=data.get("c", {}),
            fetched_at=_EPOCH + int(data["t"]) * _MICROSECOND,
        )
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return None
