"""A vendor's rate limit held across processes and machines, through Redis.

A vendor's limit is per vendor (per API key), not per process: when the chunks of one job run in
several processes, or on several Celery workers, each process must draw from one schedule. That
schedule is a GCRA in Redis (one key per provider: the theoretical arrival time of its next
request, in Redis's own clock, so the machines' clocks never need to agree). A process does not
ask Redis per request: it reserves a *lease*, a block of consecutive slots (up to `lease_s` of
the rate, sized to its demand), in one Lua call, and hands those slots out locally, one
`interval` apart; slots that pass unused (the process went idle) are skipped, never sent late
in a bunch. Redis is then asked once per block, not once per call (measured: 1-2 us of CPU per
call when busy, against ~75 us for a round trip per call). The round trip is a blocking call
under the limiter's lock (short timeouts; the event loop waits for it once per lease).

A `Retry-After` from one process (`hold`) reaches the others through a second key: no slot
leased afterwards starts before it.

Concurrency is not shared through Redis: each process takes an equal share of the vendor's
`max_concurrency` (see `ProviderClient.share_limits`). A Redis semaphore would cost a round trip
to take and one to give back per call, with leases that must expire when a worker dies; a static
split costs nothing, and the rate limit, which is what a vendor bills and enforces, is exact.

Redis down: fail open to a per-process limiter at the vendor's rate divided by the number of
processes (so the vendor's limit still holds if every process falls back), logged once per
outage by a `RedisBreaker`, and Redis is tried again after its cooldown.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

import redis

from glaze_pipeline.core.cache_redis import RedisBreaker
from glaze_pipeline.core.providers.http.resilience import RateLimiter

KEY_PREFIX = "glaze:ratelimit:"
DEFAULT_LEASE_S = 0.25  # how much of the rate one Redis call reserves
MAX_LEASE = 500  # slots in one lease, however fast the vendor

# KEYS: the schedule (next free slot, Redis time in s) and the hold (no slot before it).
# ARGV: interval, tolerance (burst), slots wanted, hold seconds (0: just lease).
# Returns how long from Redis's now the first slot of the lease starts (a string: Redis would
# round a Lua number to an integer).
LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local slots = tonumber(ARGV[3])
local hold = tonumber(ARGV[4])
local hold_until = tonumber(redis.call('GET', KEYS[2]) or '0')
if hold > 0 then
  if now + hold > hold_until then
    hold_until = now + hold
    redis.call('SET', KEYS[2], tostring(hold_until), 'PX', math.ceil(hold * 1000) + 1000)
  end
  if slots == 0 then return '0' end
end
local start = math.max(now, hold_until)
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), start)
start = math.max(start, tat - tolerance)
local next_tat = tat + slots * interval
redis.call('SET', KEYS[1], tostring(next_tat), 'PX', math.ceil((next_tat - now) * 1000) + 1000)
return tostring(start - now)
"""


class SharedRateLimiter(RateLimiter):
    """A provider's rate limit shared through Redis by every process that uses the vendor.

    Same surface as `RateLimiter` (`reserve`, `acquire`, `hold`), so the client cannot tell.
    The slots of the current lease are handed out under a thread lock; when they run out, one
    Lua call reserves the next block. `clock` and `sleep` go together, as in `RateLimiter`.
    """

    def __init__(
        self,
        provider: str,
        rate_per_s: float,
        burst: int,
        client: redis.Redis,
        *,
        processes: int = 1,
        lease_s: float = DEFAULT_LEASE_S,
        breaker: RedisBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(rate_per_s, burst, clock=clock, sleep=sleep)
        self.provider = provider
        self._redis = client
        self._keys = [f"{KEY_PREFIX}{provider}", f"{KEY_PREFIX}{provider}:hold"]
        self._script = client.register_script(LEASE_SCRIPT)
        # The largest lease; the next one's size follows demand (see `_lease`).
        self.lease_size = max(1, min(MAX_LEASE, math.ceil(rate_per_s * lease_s)))
        self._size = 1
        # How late a leased slot may still be used: within the burst, or one interval (at
        # worst two requests close together, one of them ours, late).
        self._lateness = max(self._tolerance, self._interval)
        self.breaker = breaker or RedisBreaker()
        # While Redis is away: this process's share of the rate, so all of them together
        # still keep to the vendor's limit.
        self.fallback = RateLimiter(rate_per_s / max(1, processes), burst, clock=clock, sleep=sleep)
        self._next_slot = 0.0  # local clock: when the next slot of the lease starts
        self._left = 0  # slots left in the lease
        self._skipped = 0  # slots of the current lease that passed unused
        self.leases = 0  # Redis calls made (tests and the benchmark)

    def reserve(self) -> float:
        """Take the next slot of this process's lease (leasing a block when it is spent)."""
        with self._lock:
            now = self._clock()
            late = now - self._lateness - self._next_slot
            if self._left and late > 0:
                # Slots that passed unused are skipped, never sent late in a bunch: other
                # processes hold the slots after them.
                skipped = min(self._left, math.ceil(late / self._interval))
                self._left -= skipped
                self._next_slot += skipped * self._interval
                self._skipped += skipped
            if not self._left:
                if self.breaker.open or not self._lease():
                    return self.fallback.reserve()
                now = self._clock()  # after the round trip
            slot = max(self._next_slot, self._hold_until)
            self._next_slot = slot + self._interval
            self._left -= 1
            return max(0.0, slot - now)

    def _lease(self) -> bool:
        """Reserve the next block of slots in Redis (lock held); False when Redis failed.

        Its size follows demand: twice the last one when that was used up, half when most of
        it passed unused (a lease holds back the other processes for as long as it lasts).
        """
        if self.leases and not self._skipped:
            self._size = min(self.lease_size, self._size * 2)
        elif self._skipped * 2 > self._size:
            self._size = max(1, self._size // 2)
        self._skipped = 0
        try:
            wait = float(
                self._script(
                    keys=self._keys,
                    args=[repr(self._interval), repr(self._tolerance), self._size, 0],
                )
            )
        except (redis.RedisError, OSError, ValueError) as error:
            self.breaker.trip(error, f"rate limit of {self.provider}")
            return False
        self.leases += 1
        self._next_slot = self._clock() + wait
        self._left = self._size
        return True

    def hold(self, seconds: float) -> None:
        """No request leaves, from any process, before `seconds` from now."""
        super().hold(seconds)
        self.fallback.hold(seconds)
        if seconds <= 0 or self.breaker.open:
            return
        try:
            self._script(keys=self._keys, args=[repr(self._interval), "0", 0, repr(seconds)])
        except (redis.RedisError, OSError) as error:
            self.breaker.trip(error, f"rate limit of {self.provider}")


def redis_for_limits(url: str) -> redis.Redis:
    """A Redis client for the shared limits: short timeouts, so a dead Redis costs one short
    wait before the breaker opens, never a stuck lookup."""
    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


def concurrency_share(max_concurrency: int, processes: int) -> int:
    """One process's share of a vendor's concurrency when `processes` use it at once."""
    return max(1, max_concurrency // max(1, processes))
