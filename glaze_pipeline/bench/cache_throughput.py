"""The answer cache's batches: CPU and wall of each tier's `put_many` and `get_many`.

A job's chunk writes the answers it bought to Redis and the SQL tier in one batch each, and
reads a batch of keys before its lookups, in threads beside the event loop: whatever Python
work they do holds the GIL the lookups wait for. This times the tiers' own methods on batches
of a person-vendor answer's shape, against a throwaway Postgres database and a Redis database
it empties before and after. Prints each path's CPU and wall for all the batches.

    .venv/bin/python -m glaze_pipeline.bench.cache_throughput --batches 30 --batch-size 1000
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import redis

from glaze_pipeline.bench.stack import fresh_postgres
from glaze_pipeline.core.cache import CachedAnswer, CacheKey
from glaze_pipeline.core.cache_redis import RedisAnswerCache
from glaze_pipeline.core.cache_sql import SqlAnswerCache
from glaze_pipeline.core.store import Store

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/12"

Batch = Mapping[CacheKey, CachedAnswer]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def batches(count: int, size: int) -> list[dict[CacheKey, CachedAnswer]]:
    """`count` batches of `size` distinct answers, found, with four values and two confidences."""
    now = datetime.now(UTC)
    return [
        {
            (f"person:email:p{b}_{i}@example{i % 97}.com", "people_vendor"): CachedAnswer(
                found=True,
                values={
                    "title": f"VP Sales {i}",
                    "seniority": "vp",
                    "department": "sales",
                    "linkedin": f"https://www.linkedin.com/in/person-{b}-{i}",
                },
                confidence={"title": 0.9, "seniority": 0.8},
                fetched_at=now,
            )
            for i in range(size)
        }
        for b in range(count)
    ]


def _time(
    run: Callable[[Batch], object], work: list[dict[CacheKey, CachedAnswer]]
) -> dict[str, float]:
    cpu, started = _cpu(), time.perf_counter()
    for batch in work:
        run(batch)
    return {"cpu_s": round(_cpu() - cpu, 3), "wall_s": round(time.perf_counter() - started, 3)}


def measure(
    count: int, size: int, *, postgres_url: str = POSTGRES_URL, redis_url: str = REDIS_URL
) -> dict[str, dict[str, float]]:
    """Each tier's writes, then its reads of the same keys; raises if a read differs."""
    work = batches(count, size)
    results: dict[str, dict[str, float]] = {}
    with fresh_postgres(postgres_url) as url:
        store = Store(url)
        try:
            sql = SqlAnswerCache(store)
            results["sql put_many"] = _time(sql.put_many, work)
            results["sql get_many"] = _time(lambda batch: _check(sql.get_many(batch), batch), work)
        finally:
            store.dispose()
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
        cache = RedisAnswerCache(client, fail_open=False)
        results["redis put_many"] = _time(cache.put_many, work)
        results["redis get_many"] = _time(lambda batch: _check(cache.get_many(batch), batch), work)
        client.flushdb()
    finally:
        client.close()
    return results


def _check(got: Batch, wanted: Batch) -> None:
    if got != wanted:
        raise RuntimeError(f"read {len(got)} answers back of {len(wanted)}, or different ones")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--postgres-url", default=POSTGRES_URL)
    parser.add_argument("--redis-url", default=REDIS_URL, help="a database it may empty")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    results = measure(
        args.batches, args.batch_size, postgres_url=args.postgres_url, redis_url=args.redis_url
    )
    if args.json:
        json.dump(results, sys.stdout)
        print()
        return
    print(f"{args.batches} batches of {args.batch_size:,} answers")
    for path, figures in results.items():
        print(f"{path:15} CPU {figures['cpu_s']:.2f} s, wall {figures['wall_s']:.2f} s")


if __name__ == "__main__":
    main()
