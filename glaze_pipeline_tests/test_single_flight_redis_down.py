"""Spend is never lost when Redis goes down: single-flight falls back to Postgres advisory locks.

Two enrichment runs (each in its own thread, with its own cache, flight and HTTP provider, as
separate processes would have) race over the same 50 companies through `engine.enrich_chunk`,
against the bundled mock vendor. Redis is configured but dies: before the runs, or in the middle
of them. A private `redis-server` is started (and killed) here, so the Redis other tests share
is never disturbed. Every company must be bought exactly once, counted at the mock vendor.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import pytest
import redis

from glaze_pipeline.bench.stack import free_port
from glaze_pipeline.core import engine
from glaze_pipeline.core.answers import AnswerSharing, SharingSettings, open_answer_sharing
from glaze_pipeline.core.engine import JobSettings
from glaze_pipeline.core.models import CellStatus, EntityRequest, EntityType, Selection
from glaze_pipeline.core.providers.fake import fake_value
from glaze_pipeline.core.providers.json_api import JsonApiProvider
from glaze_pipeline.core.seed import seed_generated
from glaze_pipeline.core.store import Store
from glaze_pipeline.testing.mock_server import Latency, MockConfig, MockProviderServer, VendorConfig
from glaze_pipeline_tests.provider_helpers import company_vendor, wait_until

COMPANIES = 50
VENDOR = "vendor"
PROVIDER = "vendor_company"
LATENCY_MS = 150.0
# A few entities at a time per run, so the runs go in waves and Redis can die between them.
CONCURRENCY = 10
# Long enough that a waiter never outwaits a live holder (which would buy a second time).
MAX_WAIT = timedelta(seconds=20)


@dataclass
class PrivateRedis:
    """A throwaway redis-server of this test's own, to kill when the test says so."""

    process: subprocess.Popen[bytes]
    url: str

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: a crash, no goodbye to its clients
        self.process.wait(10)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    try:
        process = subprocess.Popen(
            [
                server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError as error:  # the service is required: fail, never skip
        pytest.fail(f"redis-server is required for these tests ({server}): {error}")
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        if not wait_until(lambda: _answers_ping(client), timeout_s=10):
            pytest.fail(f"redis-server did not start on port {port}")
        yield PrivateRedis(process, url)
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
            process.wait(10)


def _answers_ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def mock() -> Iterator[MockProviderServer]:
    vendor = VendorConfig(
        entity_type=EntityType.COMPANY, fields=["industry"], latency=Latency(mean_ms=LATENCY_MS)
    )
    with MockProviderServer(MockConfig(vendors={VENDOR: vendor})) as server:
        yield server


def vendor_provider(mock: MockProviderServer) -> JsonApiProvider:
    # No retries: a retried request would count as a second call at the vendor.
    http = {"retries": 0, "read_timeout_s": 10.0, "attempt_timeout_s": 20.0, "max_concurrency": 50}
    return JsonApiProvider(
        company_vendor(mock.vendor_url(VENDOR), name=PROVIDER, fields=["industry"], http=http)
    )


def vendor_calls(mock: MockProviderServer) -> int:
    return int(mock.stats()["vendors"].get(VENDOR, {}).get("requests", 0))


def purchases_in_flight(mock: MockProviderServer, *, done_at_least: int) -> bool:
    """Some calls are answered and others are still at the vendor: Redis dies mid-purchase."""
    counters = mock.stats()["vendors"].get(VENDOR, {})
    return counters.get("requests", 0) >= done_at_least and counters.get("in_flight", 0) > 0


def company_entities(store: Store) -> tuple[engine.JobTarget, Selection, list[EntityRequest]]:
    table = seed_generated(store, rows=COMPANIES, unique_companies=COMPANIES)
    selection = Selection(column_ids=[table.column_by_key("industry").id])
    target = engine.resolve_target(store, table.id, selection)
    entities = engine.detect_entities(store, target).entities
    assert len(entities) == COMPANIES
    return target, selection, entities


@pytest.mark.parametrize("redis_dies", ["before the runs", "mid-run"])
def test_two_runs_buy_each_company_once_when_redis_dies(
    redis_dies: str,
    pg_store: Store,
    private_redis: PrivateRedis,
    mock: MockProviderServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="glaze_pipeline.core.singleflight")
    target, selection, entities = company_entities(pg_store)
    settings = JobSettings(concurrency=CONCURRENCY)
    # Waiting out purchases under Redis locks (150 ms each, flushed to SQL every second) when
    # Redis dies: a few seconds, not the 30 s of the default lock TTL.
    sharing_settings = SharingSettings(max_wait=MAX_WAIT, outage_grace=timedelta(seconds=3))
    runs = []
    for _ in range(2):
        sharing = open_answer_sharing(pg_store, private_redis.url, settings=sharing_settings)
        request_id = engine.start_job(pg_store, target, selection, settings)
        runs.append((request_id, sharing, vendor_provider(mock)))
    if redis_dies == "before the runs":
        private_redis.kill()

    def run(
        request_id: str, sharing: AnswerSharing, provider: JsonApiProvider
    ) -> engine.ChunkResult:
        return engine.enrich_chunk(
            pg_store,
            request_id,
            entities,
            [provider],
            settings,
            cache=sharing.cache,
            flight=sharing.flight,
        )

    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(run, *job) for job in runs]
        calls_when_redis_died = None
        if redis_dies == "mid-run":
            assert wait_until(lambda: purchases_in_flight(mock, done_at_least=15), timeout_s=30)
            private_redis.kill()
            calls_when_redis_died = vendor_calls(mock)
        results = [future.result(timeout=120) for future in futures]
    for _, sharing, _ in runs:
        sharing.close()

    stats = mock.stats()["vendors"][VENDOR]
    assert stats["statuses"] == {"200": COMPANIES}
    assert stats["requests"] == COMPANIES  # exactly one vendor call per company
    assert sum(result.stats.calls[PROVIDER] for result in results) == COMPANIES
    for result in results:  # each run has every answer: bought, or read from the other run
        assert result.stats.calls[PROVIDER] + result.stats.cache_hits == COMPANIES
        assert len(result.outcomes) == COMPANIES
        for request in entities:
            industry = result.outcomes[request.key.id]["industry"]
            assert industry.status is CellStatus.DONE
            assert industry.value is not None
            assert industry.value.value == fake_value(request.key, "industry")
    assert sum(result.stats.shared_hits for result in results) > 0  # the runs did contend
    if calls_when_redis_died is not None:  # Redis really died with purchases still to make
        assert calls_when_redis_died < COMPANIES
    fallbacks = [r for r in caplog.records if "falling back to postgres locks" in r.getMessage()]
    assert 1 <= len(fallbacks) <= len(runs)  # the runs did fall back; each said so once
