"""Helpers for tests against the mock LLM: one server per test module, cleared for each test.

A module uses the fixtures by naming them at its top level (pytest finds fixtures by the
module's names): `llm_server = llm_helpers.llm_server`, and `llm = llm_helpers.llm` with it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from glaze_pipeline.testing.mock_llm import MockLlmServer


@pytest.fixture(scope="module")
def llm_server() -> Iterator[MockLlmServer]:
    """The mock LLM on a free loopback port, for the whole module."""
    with MockLlmServer() as server:
        yield server


@pytest.fixture
def llm(llm_server: MockLlmServer) -> MockLlmServer:
    """The module's mock LLM with its counters and queued faults cleared."""
    llm_server.reset()
    return llm_server


class Sleeps:
    """An injected sleep: records the waits, never waits."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
