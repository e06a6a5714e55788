"""The SSRF guard: a provider that fetches URLs built from user data reaches public hosts only.

A user's cell decides which host the website provider fetches, so without a guard a domain
that resolves to 127.0.0.1 (or a homepage that redirects to `http://localhost/admin`, or to
the cloud metadata service at 169.254.169.254) turns our server into the user's proxy into
our own network, and the page lands in a cell they can read.

How: the guard is an httpcore *network backend*, the layer that opens every TCP connection.
For each new connection it resolves the host itself, refuses the connection unless every
address is public, and then connects to the very address it checked. So:

- every redirect hop is checked: a hop to another host needs a new connection, and a hop to
  the same host reuses a connection that was checked when it opened;
- there is no DNS-rebinding window: the name is resolved once, and the socket goes to that
  address (TLS still verifies the certificate against the host name: httpcore passes the
  host, not the address, as the server name);
- IP literals in any notation (`2130706433`, `0x7f.1`, `127.1`, `[::1]`, `[::ffff:7f00:1]`,
  `0`) are covered, since what is judged is the address they resolve to, not how they are
  spelled (a dotted octal `0177.0.0.1` httpx refuses to parse at all);
- nothing from a refused host is ever sent or read: the refusal happens before connecting.

Environment proxies are not used by a guarded client (a proxy would resolve the name where we
cannot check it). `allow_private` (the development setting, `GLAZE_ALLOW_PRIVATE_NETWORKS=1`
or `allow_private_networks: true` on the provider) lets loopback and private addresses
through, for the mock server and tests; the cloud metadata addresses stay refused even then.

Operator-configured vendor base URLs (JSON API providers) are trusted and not guarded: user
data reaches only their path (percent-encoded, `/` included), query and body, never the host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import httpcore

from glaze_pipeline.core.providers.base import AddressRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the addresses it resolves to (as text, as getaddrinfo gives them)
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
# an address -> why it is refused ("loopback", ...), or None when it is public
Classifier = Callable[[IPAddress], str | None]

# Never a development target: the cloud instance metadata services (AWS, GCP, Azure, ECS, ...).
METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("169.254.170.2"),
        ipaddress.ip_address("fd00:ec2::254"),
    }
)
_NAMED_NETWORKS = (
    (ipaddress.ip_network("10.0.0.0/8"), "private"),
    (ipaddress.ip_network("172.16.0.0/12"), "private"),
    (ipaddress.ip_network("192.168.0.0/16"), "private"),
    (ipaddress.ip_network("100.64.0.0/10"), "shared address space (CGNAT)"),
    (ipaddress.ip_network("fc00::/7"), "unique local"),
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_refusal(address: IPAddress) -> str | None:
    """Why `address` is not a public one ("loopback", "private", ...), or None when it is.

    Python's `is_global` alone is not enough: it calls multicast global, and it does not look
    inside IPv6 forms that carry an IPv4 address (mapped, 6to4, NAT64, Teredo).
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = address_refusal(embedded)
            if reason is not None:
                return f"{reason}, inside an IPv6 address"
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified:
        return "unspecified"
    if address in METADATA_ADDRESSES:
        return "cloud metadata service"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    for network, label in _NAMED_NETWORKS:
        if address.version == network.version and address in network:
            return label
    if address.is_reserved:
        return "reserved"
    if address.is_private or not address.is_global:
        return "special-purpose"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


async def system_resolve(host: str, port: int) -> list[str]:
    """The addresses of `host` from the system resolver (getaddrinfo, in a worker thread)."""
    # `socket.getaddrinfo` itself, not the loop's: uvloop's resolves in libuv, past the
    # process's own resolver (and the tests' stand-in for it).
    infos = await asyncio.to_thread(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class EgressGuard:
    """Decides which addresses a host may be reached at: public ones only, unless allowed.

    `resolve` and `classify` are seams for tests (like an injected clock): a test can resolve
    a made-up name to a loopback server of its own, and call exactly that one address public,
    while every other address is judged by the real `address_refusal`.
    """

    def __init__(
        self,
        *,
        allow_private: bool = False,
        resolve: Resolver = system_resolve,
        classify: Classifier = address_refusal,
    ) -> None:
        self.allow_private = allow_private
        self._resolve = resolve
        self._classify = classify

    def __repr__(self) -> str:
        return f"EgressGuard(allow_private={self.allow_private})"

    def refusal(self, address: IPAddress) -> str | None:
        """Why this guard refuses `address`, or None."""
        if address in METADATA_ADDRESSES:
            return "cloud metadata service"
        return None if self.allow_private else self._classify(address)

    async def addresses(self, host: str, port: int) -> list[str]:
        """Where `host` may be reached: every address it resolves to, all of them allowed.

        Raises AddressRefused when any address is refused (a name with one public and one
        private address is a rebinding trick, not a public host), and OSError when the name
        does not resolve.
        """
        literal = _ip_literal(host)
        found = [str(literal)] if literal is not None else list(await self._resolve(host, port))
        if not found:
            raise OSError(f"{host} resolves to no address")
        for text in found:
            try:
                address = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                raise AddressRefused(
                    f"refused: {host} resolves to {text!r}, not an IP address"
                ) from None
            reason = self.refusal(address)
            if reason is not None:
                if literal is not None:
                    raise AddressRefused(f"refused: {host} ({reason}) is not a public address")
                raise AddressRefused(
                    f"refused: {host} resolves to {address} ({reason}), not a public address"
                )
        return found


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network layer with the guard in front: connects only to checked addresses."""

    def __init__(
        self, guard: EgressGuard, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self.guard = guard
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                addresses = await self.guard.addresses(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as error:  # as httpcore reports a name that does not resolve
            raise httpcore.ConnectError(str(error)) from None
        last: Exception | None = None
        for address in addresses:  # the checked addresses, and only those
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=left,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last = error
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused(f"refused: a unix socket ({path}) is not a public address")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
