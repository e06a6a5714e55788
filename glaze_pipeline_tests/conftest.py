"""Shared fixtures: real Postgres, real SQLite files, real Redis. A missing service fails loudly.

`GLAZE_TEST_POSTGRES_URL` (default: the `test` database on 127.0.0.1) is where a throwaway
database is created for the session; `GLAZE_TEST_REDIS_URL` (default db 15 on 127.0.0.1).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from glaze_pipeline.core.singleflight import forget_outages
from glaze_pipeline.core.store import Store, normalize_url
from glaze_pipeline.testing.mock_server import MockProviderServer
from glaze_pipeline_tests.provider_helpers import quiet_mock

PG_BASE_URL = os.environ.get(
    "GLAZE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_TEST_URL = os.environ.get("GLAZE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
APP_TABLES = (
    "enrichment_requests",
    "entity_cache",
    "rows",
    "columns",
    "tables",
    "provider_observations",
    "llm_calls",
    "step_outputs",  # what a multiprocess or Celery run handed between its steps
)

# The tiers: these modules drive real processes (`glaze serve`, the CLI as a subprocess, Dagster's
# webserver and daemon, a browser, the benchmark), so `pytest -m "not e2e"` is the inner loop and
# plain `pytest` (CI) runs everything. A test elsewhere that starts a process says so itself
# with `@pytest.mark.e2e`.
E2E_MODULES = frozenset(
    {
        "test_api",
        "test_api_ai",
        "test_api_schema",
        "test_bench_estimate",
        "test_bench_smoke",
        "test_browser",
        "test_celery",
        "test_cli",
        "test_cli_ai",
        "test_cli_errors",
        "test_end_to_end",
        "test_graphql",
        "test_launcher",
        "test_realtime",
        "test_single_flight_redis_down",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__.rpartition(".")[2] in E2E_MODULES:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _no_redis_outage_carried_over() -> Iterator[None]:
    """A Redis outage one test caused (a tripped breaker) is not the next one's to outwait."""
    forget_outages()
    yield
    forget_outages()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated Postgres database for this test session, dropped at the end."""
    base = make_url(normalize_url(PG_BASE_URL))
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    name = f"glaze_test_{secrets.token_hex(4)}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:  # the service is required: fail, never skip
        pytest.fail(f"PostgreSQL is required for these tests ({base}): {error}")
    url = base.set(database=name).render_as_string(hide_password=False)
    store = Store(url)
    store.upgrade()
    store.dispose()
    yield url
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[Store]:
    store = Store(postgres_url)
    with store.engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(APP_TABLES)} CASCADE"))
    yield store
    store.dispose()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'glaze.db'}")
    store.upgrade()
    yield store
    store.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest) -> Store:
    """The same test on the SQLite default and on Postgres."""
    fixture = "sqlite_store" if request.param == "sqlite" else "pg_store"
    return request.getfixturevalue(fixture)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis test database, emptied before and after each test."""
    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        client.ping()
    except redis.RedisError as error:
        pytest.fail(f"Redis is required for these tests ({REDIS_TEST_URL}): {error}")
    client.flushdb()
    yield REDIS_TEST_URL
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def mock_server() -> Iterator[MockProviderServer]:
    """The mock vendors over real HTTP, quiet (no request log), one server per test module;
    a module that needs other vendors defines its own `mock_server`."""
    with quiet_mock() as server:
        yield server


@pytest.fixture
def mock(mock_server: MockProviderServer) -> MockProviderServer:
    """The module's mock vendors, reset to their configuration for each test."""
    mock_server.reset(config=True)
    return mock_server
