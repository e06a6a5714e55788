"""Prototypes of two proposed core changes to the provider HTTP client (`--http proposed`).

1. `sniffio` installed. httpcore 1.0.9 runs `import sniffio` each time it sets up a lock or a
   cancellation shield (several times per request); anyio 4.16 no longer requires sniffio, so in our
   environment that import fails every time and searches sys.path (~20% of the enrich loop's
   CPU measured with py-spy). The fix is one line in pyproject's dependencies; here
   `ensure_sniffio` stands in for it with a module answering what sniffio would ("asyncio").

2. Many small HTTP connection pools per provider, below.

Measured here (see bench_results/results.md): httpcore 1.0.9's `AsyncConnectionPool` walks
every connection it holds on each request and each release (`_assign_requests_to_connections`
calls `has_expired()` / `is_idle()` on all of them, and `has_expired()` polls the socket), so
the client's cost per request grows with the pool. A provider with `max_concurrency: 200`
gets ONE pool of 200 connections from `ProviderClient`, and the whole job then does ~50
calls/s; the same 200 connections as 100 pools of 2 do ~800 calls/s on this machine.

`ShardedTransport` is that: an httpx transport holding `ceil(connections / per_shard)` small
`AsyncHTTPTransport`s per event loop, sending each request to the least busy one.
`ShardedPoolProviders` is `EnrichmentProviders` with every JSON API provider's client built on
it, so the unchanged `enrich_table` job can be measured with the change (`--http proposed`).
In core, the same belongs in `ProviderClient._resources` (see the report).
"""

import asyncio
import math
import ssl
import sys
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import yaml

from glaze_pipeline.core.providers.base import Provider
from glaze_pipeline.core.providers.http import ProviderClient
from glaze_pipeline.core.providers.json_api import JsonApiConfig, JsonApiProvider
from glaze_pipeline.core.providers.registry import build_provider, parse_providers
from glaze_pipeline.defs.resources import EnrichmentProviders

DEFAULT_PER_SHARD = 2


def ensure_sniffio() -> None:
    """Make `import sniffio` succeed (the stand-in for adding the dependency)."""
    try:
        import sniffio  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("sniffio")
        stand_in.current_async_library = lambda: "asyncio"  # type: ignore[attr-defined]
        sys.modules["sniffio"] = stand_in


@dataclass
class _Shards:
    transports: list[httpx.AsyncHTTPTransport]
    busy: list[int]


class _ReleasingStream(httpx.AsyncByteStream):
    """The response body; closing it marks its shard one request less busy."""

    def __init__(self, stream: httpx.AsyncByteStream, shards: _Shards, index: int) -> None:
        self._stream = stream
        self._shards = shards
        self._index = index
        self._open = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self._shards.busy[self._index] -= 1
        await self._stream.aclose()


class ShardedTransport(httpx.AsyncBaseTransport):
    """`connections` connections as many pools of `per_shard`, one set per event loop."""

    def __init__(self, connections: int, *, per_shard: int = DEFAULT_PER_SHARD) -> None:
        self.per_shard = max(1, per_shard)
        self.count = max(1, math.ceil(connections / self.per_shard))
        self._loops: dict[asyncio.AbstractEventLoop, _Shards] = {}
        self._tls: ssl.SSLContext | None = None

    def _shards(self) -> _Shards:
        loop = asyncio.get_running_loop()
        shards = self._loops.get(loop)
        if shards is None:
            for stale in [other for other in self._loops if other.is_closed()]:
                del self._loops[stale]
            limits = httpx.Limits(
                max_connections=self.per_shard, max_keepalive_connections=self.per_shard
            )
            # One TLS context for all: httpx builds one per transport otherwise (~20 ms each).
            verify = self._tls = self._tls or httpx.create_ssl_context()
            shards = _Shards(
                [httpx.AsyncHTTPTransport(limits=limits, verify=verify) for _ in range(self.count)],
                [0] * self.count,
            )
            self._loops[loop] = shards
        return shards

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        shards = self._shards()
        index = min(range(self.count), key=shards.busy.__getitem__)
        shards.busy[index] += 1
        try:
            response = await shards.transports[index].handle_async_request(request)
        except BaseException:
            shards.busy[index] -= 1
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _ReleasingStream(response.stream, shards, index)
        return response

    async def aclose(self) -> None:
        """Close this loop's pools (a ProviderClient closes its client at the end of a loop)."""
        shards = self._loops.pop(asyncio.get_running_loop(), None)
        if shards is not None:
            for transport in shards.transports:
                await transport.aclose()


def sharded_json_api(config: JsonApiConfig, per_shard: int = DEFAULT_PER_SHARD) -> Provider:
    """One JSON API provider whose client spreads its connections over small pools."""
    transport = ShardedTransport(config.http.max_concurrency, per_shard=per_shard)
    client = ProviderClient(config.name, config.http, base_url=config.base_url, transport=transport)
    return JsonApiProvider(config, http=client)


def sharded_providers(config_file: str, per_shard: int = DEFAULT_PER_SHARD) -> list[Provider]:
    """The providers of `config_file`, JSON API ones on sharded pools."""
    with open(config_file, encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    built: list[Provider] = []
    for entry in parse_providers(document, source=config_file).providers:
        if not entry.enabled:
            continue
        if isinstance(entry, JsonApiConfig):
            built.append(sharded_json_api(entry, per_shard))
        else:
            built.append(build_provider(entry))
    return built


class ShardedPoolProviders(EnrichmentProviders):
    """EnrichmentProviders whose JSON API clients use `ShardedTransport` (bench only)."""

    per_shard: int = DEFAULT_PER_SHARD

    def providers(self) -> list[Provider]:
        if self._providers is None:
            assert self.config_file is not None
            self._providers = sharded_providers(self.config_file, self.per_shard)
        return self._providers
