"""`AiohttpTransport`: the vendors' JSON APIs over aiohttp, keeping what httpcore gave the client.

Real HTTP on loopback throughout: the mock vendors, a site of the test's own, a port nobody
listens on and one whose accept queue is full. Each test checks what `ProviderClient` raises
or returns and what the server saw.
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import Iterator

import httpx
import pytest

from glaze_pipeline.bench.stack import free_port
from glaze_pipeline.core.providers.base import (
    AddressRefused,
    BadResponse,
    TransientProviderError,
    Unreachable,
)
from glaze_pipeline.core.providers.egress import EgressGuard
from glaze_pipeline.core.providers.http import ProviderClient, provider_session
from glaze_pipeline.core.providers.http.client import HttpResponse
from glaze_pipeline.core.providers.http.transport import AiohttpTransport, ShardedTransport
from glaze_pipeline.core.providers.website import WebsiteConfig, WebsiteProvider
from glaze_pipeline.testing.mock_server import MockProviderServer
from glaze_pipeline_tests.provider_helpers import LoopbackSite, Page, fast_http, wait_until


def _timeouts(*, connect: float = 1.0, read: float = 1.0) -> dict[str, dict[str, float]]:
    return {"timeout": {"connect": connect, "read": read, "write": 1.0, "pool": 1.0}}


@pytest.fixture
def full_port() -> Iterator[int]:
    """A port that is listened on but whose accept queue is full: a connect there hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    waiting = []
    for _ in range(3):  # more than the queue holds; their SYNs are dropped from then on
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        waiting.append(client)
    yield port
    for client in waiting:
        client.close()
    server.close()


def test_an_unguarded_client_sends_through_aiohttp_and_gets_status_headers_and_body() -> None:
    pages = {
        "/v1/thing*": Page(200, '{"ok": true}', {"Content-Type": "application/json", "X-Ver": "7"})
    }
    with LoopbackSite(pages=pages) as site:
        client = ProviderClient("vendor", fast_http(), base_url=site.url)

        async def call() -> tuple[HttpResponse, httpx.AsyncBaseTransport | None]:
            async with provider_session([client]):
                answer = await client.fetch(
                    "GET", "v1/thing", params={"q": "a b"}, headers={"X-Api-Key": "k1"}
                )
                session = client._current_session()
                return answer, session.transport if session else None

        answer, transport = asyncio.run(call())

    assert isinstance(transport, AiohttpTransport)
    assert answer.status_code == 200
    assert answer.headers["x-ver"] == "7"
    assert answer.json() == {"ok": True}
    ((path, headers),) = site.requests
    assert path == "/v1/thing?q=a+b"
    assert headers["X-Api-Key"] == "k1"
    assert headers["User-Agent"] == client.settings.user_agent
    assert not any(name.lower() == "cookie" for name in headers)


def test_a_json_post_reaches_the_vendor_with_its_body(mock: MockProviderServer) -> None:
    client = ProviderClient("cheap", fast_http(), base_url=mock.vendor_url("cheap"))
    answer = asyncio.run(
        client.fetch("POST", "v1/companies/batch", json_body={"domains": ["a.com", "b.com"]})
    )
    assert answer.status_code == 200
    assert len(answer.json()["results"]) == 2
    assert mock.stats()["vendors"]["cheap"]["batch_entities"] == 2


def test_a_read_timeout_is_httpx_read_timeout_and_is_retried(mock: MockProviderServer) -> None:
    async def raw() -> None:
        transport = AiohttpTransport(2, verify=httpx.create_ssl_context())
        url = f"{mock.vendor_url('cheap')}/v1/companies?domain=a.com&_mode=hang"
        try:
            await transport.handle_async_request(
                httpx.Request("GET", url, extensions=_timeouts(read=0.2))
            )
        finally:
            await transport.aclose()

    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(raw())

    client = ProviderClient(
        "cheap", fast_http(retries=2, read_timeout_s=0.2), base_url=mock.vendor_url("cheap")
    )
    with pytest.raises(TransientProviderError, match="ReadTimeout") as failed:
        asyncio.run(
            client.fetch("GET", "v1/companies", params={"domain": "a.com", "_mode": "hang"})
        )
    assert not isinstance(failed.value, Unreachable)  # it was sent
    assert client.stats.retries == 2
    assert client.health().attempts == 3


def test_a_connect_timeout_is_httpx_connect_timeout_and_nothing_was_sent(full_port: int) -> None:
    async def raw() -> None:
        transport = AiohttpTransport(2, verify=httpx.create_ssl_context())
        request = httpx.Request(
            "GET", f"http://127.0.0.1:{full_port}/", extensions=_timeouts(connect=0.2)
        )
        try:
            await transport.handle_async_request(request)
        finally:
            await transport.aclose()

    with pytest.raises(httpx.ConnectTimeout):
        asyncio.run(raw())

    client = ProviderClient(
        "vendor",
        fast_http(retries=1, connect_timeout_s=0.2),
        base_url=f"http://127.0.0.1:{full_port}",
    )
    with pytest.raises(Unreachable, match=r"timed out \(ConnectTimeout\) after 2 attempts"):
        asyncio.run(client.fetch("GET", "v1/x"))
    assert client.stats.retries == 1


def test_a_refused_connection_is_httpx_connect_error() -> None:
    port = free_port()  # nothing listens there

    async def raw() -> None:
        transport = AiohttpTransport(2, verify=httpx.create_ssl_context())
        try:
            await transport.handle_async_request(
                httpx.Request("GET", f"http://127.0.0.1:{port}/", extensions=_timeouts())
            )
        finally:
            await transport.aclose()

    with pytest.raises(httpx.ConnectError):
        asyncio.run(raw())

    client = ProviderClient("vendor", fast_http(retries=1), base_url=f"http://127.0.0.1:{port}")
    with pytest.raises(
        Unreachable, match=r"connection failed \(ConnectError: .*\) after 2 attempts"
    ):
        asyncio.run(client.fetch("GET", "v1/x"))


@pytest.mark.parametrize("mode", ["huge", "huge_declared"])
def test_a_body_over_the_limit_is_cut_off(mock: MockProviderServer, mode: str) -> None:
    client = ProviderClient(
        "cheap", fast_http(max_body_bytes=100_000), base_url=mock.vendor_url("cheap")
    )
    with pytest.raises(BadResponse, match="100000-byte limit"):
        asyncio.run(client.fetch("GET", "v1/companies", params={"domain": "a.com", "_mode": mode}))
    assert client.stats.retries == 0  # a body too large is the vendor's answer, not a glitch
    # The connection that carried it is closed, not handed back half read.
    assert wait_until(lambda: mock.open_connections() == 0)


def test_the_transport_lives_and_closes_with_its_event_loop(mock: MockProviderServer) -> None:
    client = ProviderClient("cheap", fast_http(), base_url=mock.vendor_url("cheap"))
    transports: list[object] = []

    async def chunk() -> None:
        async with provider_session([client]):
            await asyncio.gather(
                *(
                    client.fetch("GET", "v1/companies", params={"domain": f"{i}.com"})
                    for i in range(5)
                )
            )
            session = client._current_session()
            assert session is not None
            transports.append(session.transport)
            assert mock.open_connections() > 0
            assert client.open_clients == 1

    asyncio.run(chunk())
    asyncio.run(chunk())  # a second loop: new connections, the first loop's are gone

    first, second = transports
    assert isinstance(first, AiohttpTransport) and isinstance(second, AiohttpTransport)
    assert first is not second
    assert client.open_clients == 0
    assert wait_until(lambda: mock.open_connections() == 0)
    gc.collect()  # an unclosed aiohttp session would warn here, and warnings are errors


def test_trust_env_keeps_httpx_own_transport_and_the_guard_keeps_httpcore() -> None:
    trusting = ProviderClient("vendor", fast_http(trust_env=True), base_url="http://x.test")
    assert trusting._default_transport() is None

    with LoopbackSite(default=Page(200, "<title>Internal</title>")) as internal:
        website = WebsiteProvider(
            WebsiteConfig(
                url_template=f"http://{{domain}}:{internal.port}/",
                http={**fast_http(retries=0).model_dump()},
            ),
            egress=EgressGuard(),
        )

        async def refused() -> tuple[object, BaseException]:
            async with provider_session([website]):
                with pytest.raises(AddressRefused) as refusal:
                    await website.http.fetch("GET", f"http://127.0.0.1:{internal.port}/")
                session = website.http._current_session()
                return (session.transport if session else None), refusal.value

        transport, refusal = asyncio.run(refused())
    assert isinstance(transport, ShardedTransport | httpx.AsyncHTTPTransport)
    assert not isinstance(transport, AiohttpTransport)
    assert "loopback" in str(refusal)
    assert internal.requests == []  # the guard refused before connecting
