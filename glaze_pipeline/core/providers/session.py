"""A provider's lifetime in one event loop: what the engine opens around each chunk.

Providers live for the whole job, while each chunk runs in an event loop of its own; whatever
a provider binds to a loop (an HTTP client, its connections) is released when the chunk's
session ends. Nothing here knows about HTTP, so the engine need not import it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Protocol, runtime_checkable


@runtime_checkable
class SessionedProvider(Protocol):
    """A provider whose connections live for one session (HTTP providers: see `http.client`)."""

    def open_session(self) -> AbstractAsyncContextManager[None]: ...


@runtime_checkable
class ClosableProvider(Protocol):
    """A provider that holds something bound to the current loop, released by `aclose`."""

    async def aclose(self) -> None: ...


async def aclose_providers(providers: Iterable[object]) -> None:
    """Release what every provider that holds any has bound to the current loop."""
    for provider in providers:
        if isinstance(provider, ClosableProvider):
            with suppress(Exception):
                await provider.aclose()


@asynccontextmanager
async def provider_session(providers: Iterable[object]) -> AsyncIterator[None]:
    """Use providers inside one event loop: open their sessions, and close them (or, for
    providers without sessions, `aclose` them) at the end, quietly: a provider that fails to
    close must not hide what the chunk did.

    The engine wraps each chunk's waterfall in it:
    `async with provider_session(providers): await waterfall.enrich_many(...)`.
    """
    providers = list(providers)
    sessioned = [p for p in providers if isinstance(p, SessionedProvider)]
    others = [p for p in providers if not isinstance(p, SessionedProvider)]
    opened: list[AbstractAsyncContextManager[None]] = []
    try:
        for provider in sessioned:
            session = provider.open_session()
            await session.__aenter__()
            opened.append(session)
        yield
    finally:
        for session in reversed(opened):  # last opened first: each restores the one before
            with suppress(Exception):
                await session.__aexit__(None, None, None)
        await aclose_providers(others)
