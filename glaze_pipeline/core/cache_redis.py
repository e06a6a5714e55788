"""The shared cache tier: provider answers in Redis, seen by every process at once.

One key per (provider, entity): `glaze:answer:<provider>:<entity id>`, holding compact JSON.
Provider first, so one provider's answers can be dropped with a single `SCAN MATCH`. A batch is
one round trip each way (MGETs or SETs in one pipeline). An answer lives until its
`fetched_at` plus its TTL, whichever tier writes it: a back-fill from the SQL tier never makes an
old answer live longer. Redis being down costs cache hits, never the job: reads miss and writes
are dropped, with a warning, and a `RedisBreaker` keeps the tier (and the Redis single-flight)
off Redis for a few seconds after an error rather than paying a timeout on every call.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from glaze_pipeline.core.cache import CachedAnswer, CacheKey

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

    def put_many(self, answers: Mapping[CacheKey, CachedAnswer]) -> None:
        if not answers or (self.fail_open and self.breaker.open):
            return
        now = datetime.now(UTC)
        pipe = self.client.pipeline(transaction=False)
        queued = 0
        for key, answer in answers.items():
            expires = answer.fetched_at + self.ttl_for(key[1], found=answer.found)
            remaining_ms = int((expires - now).total_seconds() * 1000)
            if remaining_ms <= 0:
                continue  # already stale: writing it would only serve an expired answer
            pipe.set(self.key(key), _encode(answer), px=remaining_ms)
            queued += 1
        if not queued:
            return
        try:
            pipe.execute()
        except redis.RedisError as error:
            if not self.fail_open:
                raise
            self.breaker.trip(error, f"writing {queued} answers")


def _encode(answer: CachedAnswer) -> bytes:
    # fetched_at as integer microseconds since the epoch: exact, and shorter than ISO text.
    micros = (answer.fetched_at - _EPOCH) // _MICROSECOND
    payload: dict[str, Any] = {"f": int(answer.found), "t": micros}
    if answer.values:
        payload["v"] = dict(answer.values)
    if answer.confidence:
        payload["c"] = dict(answer.confidence)
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def _decode(payload: bytes | str) -> CachedAnswer | None:
    try:
        data = json.loads(payload)
        return CachedAnswer(
            found=bool(data["f"]),
            values=data.get("v", {}),
            confidence=data.get("c", {}),
            fetched_at=_EPOCH + int(data["t"]) * _MICROSECOND,
        )
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return None
