"""A vendor's rate limit shared through a real Redis by limiters in several processes.

Each limiter has a Redis client of its own, as a process would; one test runs two real
subprocesses. Waits are read from `reserve()` where possible (nothing sleeps), so the tests
assert the schedule, not wall-clock luck; the subprocess test uses real time with wide bounds.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
import redis

from glaze_pipeline.bench.stack import free_port
from glaze_pipeline.core.cache_redis import RedisBreaker
from glaze_pipeline.core.providers.http import HttpBackedProvider, RateLimiter
from glaze_pipeline.core.providers.http.shared_limits import (
    KEY_PREFIX,
    LEASE_SCRIPT,
    SharedRateLimiter,
    concurrency_share,
    redis_for_limits,
)
from glaze_pipeline.core.providers.registry import load_providers


@pytest.fixture
def vendor() -> str:
    """A provider name no other test (or earlier run) has drawn from."""
    return f"vendor-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def clients(redis_url: str) -> Iterator[list[redis.Redis]]:
    """Two independent Redis clients: two processes' worth."""
    made = [redis_for_limits(redis_url) for _ in range(2)]
    yield made
    for client in made:
        client.close()


def test_two_limiters_with_their_own_clients_draw_from_one_schedule(
    vendor: str, clients: list[redis.Redis]
) -> None:
    rate = 20.0  # a slot every 50 ms, 5 slots a lease
    limiters = [SharedRateLimiter(vendor, rate, 1, client) for client in clients]
    assert limiters[0].lease_size == 5
    for client in clients:  # connected, the script loaded: a lease is one short round trip
        client.script_load(LEASE_SCRIPT)
    slots: list[float] = []
    for i in range(40):  # alternate, as two busy processes would
        slots.append(time.monotonic() + limiters[i % 2].reserve())
    slots.sort()
    # 40 slots at 20/s span 39 intervals, whoever took them ...
    assert slots[-1] - slots[0] >= 39 / rate * 0.95
    # ... and no two of them, from either limiter, are much closer than an interval (a lease's
    # slots are placed on the local clock after its round trip: that much may blur them).
    gaps = [b - a for a, b in pairwise(slots)]
    assert min(gaps) >= 0.6 / rate
    # One Redis call per lease, not per slot: leases of 1, 2, 4, then 5 (the largest) each.
    assert sum(limiter.leases for limiter in limiters) == 12


def test_slots_left_unused_while_idle_are_skipped_not_sent_in_a_bunch(
    vendor: str, clients: list[redis.Redis]
) -> None:
    limiter = SharedRateLimiter(vendor, 100.0, 1, clients[0], lease_s=1.0)
    for _ in range(15):  # busy: leases of 1, 2, 4 and 8 slots, 10 ms apart
        limiter.reserve()
    assert limiter.leases == 4
    time.sleep(0.3)  # idle: the rest of the last lease has passed
    waits = [limiter.reserve() for _ in range(5)]
    # Spaced as the rate says from now on; the stale slots would all have said "go now".
    assert waits[0] < 0.02 and waits[-1] >= 0.03
    assert all(b - a >= 0.009 for a, b in pairwise(waits))


def test_per_process_limiters_would_have_let_both_go_at_once() -> None:
    """The control for the test above: what two processes did before (each its own bucket)."""
    limiters = [RateLimiter(20.0, 1) for _ in range(2)]
    now = time.monotonic()
    slots = sorted(now + limiters[i % 2].reserve() for i in range(40))
    assert slots[-1] - slots[0] < 20 / 20.0  # twice the vendor's rate


def test_a_retry_after_in_one_process_holds_the_others(
    vendor: str, clients: list[redis.Redis]
) -> None:
    first, second = (SharedRateLimiter(vendor, 100.0, 1, client) for client in clients)
    first.hold(0.5)  # a 429 with Retry-After: 0.5 seen by the first process
    assert second.reserve() >= 0.4  # the second's next lease starts after it
    assert first.reserve() >= 0.4


def test_redis_down_falls_back_to_this_process_share_and_says_so_once(
    vendor: str, caplog: pytest.LogCaptureFixture
) -> None:
    dead = redis_for_limits(f"redis://127.0.0.1:{free_port()}/0")  # nobody listens there
    limiter = SharedRateLimiter(
        vendor,
        10.0,
        1,
        dead,
        processes=2,
        breaker=RedisBreaker(cooldown_s=60),
        clock=lambda: 100.0,
    )
    with caplog.at_level(logging.WARNING):
        waits = [round(limiter.reserve(), 6) for _ in range(4)]
        limiter.hold(1.0)  # Redis is skipped, the local hold still applies
        assert round(limiter.reserve(), 6) == pytest.approx(1.0)
    # 10/s shared by 2 processes: this one keeps to 5/s on its own.
    assert waits == [0.0, 0.2, 0.4, 0.6]
    assert limiter.leases == 0
    warnings = [r for r in caplog.records if "redis unavailable" in r.getMessage()]
    assert len(warnings) == 1 and vendor in warnings[0].getMessage()


def test_redis_back_after_the_cooldown_is_used_again(
    vendor: str, redis_url: str, clients: list[redis.Redis]
) -> None:
    breaker = RedisBreaker(cooldown_s=60)
    breaker.trip(ConnectionError("down a moment ago"), "test")
    limiter = SharedRateLimiter(vendor, 50.0, 1, clients[0], breaker=breaker)
    limiter.reserve()
    assert limiter.leases == 0  # breaker open: the local share
    breaker.cooldown_s = 0
    breaker._open_until = 0.0  # the cooldown has passed
    limiter.reserve()
    assert limiter.leases == 1
    assert clients[1].exists(f"{KEY_PREFIX}{vendor}")


def test_acquire_sleeps_until_the_leased_slot(vendor: str, clients: list[redis.Redis]) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    limiter = SharedRateLimiter(vendor, 10.0, 1, clients[0], sleep=sleep)

    async def three() -> None:
        for _ in range(3):
            await limiter.acquire()

    asyncio.run(three())
    assert len(slept) == 2 and slept[0] == pytest.approx(0.1, abs=0.03)
    assert slept[1] == pytest.approx(0.2, abs=0.03)


_CHILD = """
import asyncio, sys, time
from pathlib import Path
from glaze_pipeline.core.providers.http.shared_limits import SharedRateLimiter, redis_for_limits

url, vendor, calls, ready, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
limiter = SharedRateLimiter(vendor, 40.0, 1, redis_for_limits(url), processes=2)
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.01)

async def main() -> list[float]:
    times = []
    for _ in range(calls):
        await limiter.acquire()
        times.append(time.time())
    return times

print(" ".join(repr(t) for t in asyncio.run(main())))
"""


def test_the_rate_holds_across_two_processes(vendor: str, redis_url: str, tmp_path: Path) -> None:
    calls, rate = 30, 40.0  # 60 calls at 40/s: at least ~1.5 s together; alone, half that
    go = tmp_path / "go"
    children = []
    for i in range(2):
        ready = tmp_path / f"ready{i}"
        args = [sys.executable, "-c", _CHILD, redis_url, vendor, str(calls), str(ready), str(go)]
        children.append(
            (ready, subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        )
    deadline = time.monotonic() + 60
    while not all(ready.exists() for ready, _ in children):
        assert time.monotonic() < deadline, "the children never got ready"
        assert all(child.poll() is None for _, child in children), "a child died"
        time.sleep(0.05)
    go.touch()
    runs = []
    for _, child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err.decode()
        runs.append([float(t) for t in out.split()])
    everything = sorted(t for run in runs for t in run)
    assert len(everything) == 2 * calls
    # Together they kept to the vendor's rate (less a little for clock and sleep slack) ...
    assert everything[-1] - everything[0] >= (2 * calls - 1) / rate * 0.85
    # ... while both ran at once: each process's calls span most of the whole run.
    for run in runs:
        assert run[-1] - run[0] >= (everything[-1] - everything[0]) * 0.5
    # In no second did more than the rate (and a lease of slack) go out.
    for start in everything:
        assert sum(1 for t in everything if start <= t < start + 1.0) <= rate + 2


def test_the_registry_shares_limits_and_splits_concurrency(tmp_path: Path, redis_url: str) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(
        "providers:\n"
        "  - {kind: json_api, name: limited, entity_type: company, base_url: 'http://x',\n"
        "     lookups: {domain: {path: '/c'}}, fields: {name: name},\n"
        "     http: {rate_limit_per_s: 5, max_concurrency: 10}}\n"
        "  - {kind: json_api, name: unlimited, entity_type: company, base_url: 'http://y',\n"
        "     lookups: {domain: {path: '/c'}}, fields: {name: name},\n"
        "     http: {max_concurrency: 10}}\n",
        encoding="utf-8",
    )
    limited, unlimited = load_providers(path, redis_url=redis_url, processes=4)
    assert isinstance(limited, HttpBackedProvider) and isinstance(unlimited, HttpBackedProvider)
    assert isinstance(limited.http.limiter, SharedRateLimiter)
    assert not isinstance(unlimited.http.limiter, SharedRateLimiter)  # nothing to share
    assert limited.max_concurrency == unlimited.max_concurrency == 2
    # Without Redis (the embedded default) the rate stays per process, as with one process.
    alone, _ = load_providers(path)
    assert isinstance(alone, HttpBackedProvider)
    assert not isinstance(alone.http.limiter, SharedRateLimiter)
    assert alone.max_concurrency == 10


def test_concurrency_share_never_drops_to_zero() -> None:
    assert concurrency_share(200, 2) == 100
    assert concurrency_share(10, 3) == 3
    assert concurrency_share(2, 8) == 1
