"""One outbound HTTP client for the gateway: timeouts, the trusted CA, no redirects, a cap
on how much of a hostile server's answer we read, and connections only to public addresses
(loopback too while the local stand-ins are allowed, private ones only inside the networks an
operator allowed in `outbound_private_networks`), checked on the address connected to."""

from __future__ import annotations

import errno
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import structlog
from aiohttp import AddrInfoType, SocketFactoryType, web
from aiohttp.abc import AbstractResolver, ResolveResult

from libs.common.addresses import IpNetwork, address_refusal
from libs.common.web import SETTINGS
from services.launch.settings import LaunchSettings

HTTP = web.AppKey("outbound_http", aiohttp.ClientSession)
MAX_RESPONSE_BYTES = 2 * 1024 * 1024

log = structlog.get_logger(__name__)


class OutboundError(Exception):
    """A call to the outside world failed; the message is safe to log and to show."""


class RefusedAddress(OSError):
    """A host resolved to, or named, an address the gateway must not connect to (private,
    link-local, reserved, loopback without the stand-in allowance, or private outside the
    operator's allowed networks)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)


class PublicAddressResolver(AbstractResolver):
    """Wraps a resolver and keeps only the addresses `address_refusal` accepts, so what DNS
    says at connect time is what is checked: a name that passed the config service's check
    and now resolves inside our network (DNS rebinding) reaches nothing. aiohttp asks no
    resolver for a host that is an IP address; `guarded_socket_factory` covers those."""

    def __init__(
        self,
        allow_loopback: bool,
        resolver: AbstractResolver | None = None,
        *,
        allowed_networks: tuple[IpNetwork, ...] = (),
    ) -> None:
        self._allow_loopback = allow_loopback
        self._allowed_networks = allowed_networks
        self._resolver = resolver if resolver is not None else aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            found = await self._resolver.resolve(host, port, family)
        except UnicodeError:
            # The IDNA codec refuses an empty or over-long label ("a..b"); aiohttp turns only
            # an OSError into a client error, anything else would be a 500.
            raise RefusedAddress(f"{host} is not a valid host name") from None
        kept: list[ResolveResult] = []
        refused = ""
        for result in found:
            reason = address_refusal(result["host"], self._allow_loopback, self._allowed_networks)
            if reason is None:
                kept.append(result)
            else:
                refused = f"{host} resolves to {reason} ({result['host']}), which is refused"
        if refused:
            log.warning("outbound address refused", host=host, reason=refused, kept=len(kept))
        if not kept:
            raise RefusedAddress(refused or f"{host} has no addresses")
        return kept

    async def close(self) -> None:
        await self._resolver.close()


def guarded_socket_factory(
    allow_loopback: bool, allowed_networks: tuple[IpNetwork, ...] = ()
) -> SocketFactoryType:
    """The last check, on the very address a socket is about to connect to."""

    def create(addr_info: AddrInfoType) -> socket.socket:
        family, type_, proto, _, address = addr_info
        reason = address_refusal(str(address[0]), allow_loopback, allowed_networks)
        if reason is not None:
            log.warning("outbound connection refused", address=str(address[0]), reason=reason)
            raise RefusedAddress(f"{address[0]} is {reason}, which is refused")
        return socket.socket(family=family, type=type_, proto=proto)

    return create


def outbound_connector(
    ssl_context: ssl.SSLContext,
    allow_loopback: bool,
    resolver: AbstractResolver,
    allowed_networks: tuple[IpNetwork, ...] = (),
) -> aiohttp.TCPConnector:
    """The connector of every outbound request of the gateway (SMART discovery, token and
    JWKS, FHIR reads, Graph): `resolver` is a PublicAddressResolver, the caller closes it."""
    return aiohttp.TCPConnector(
        ssl=ssl_context,
        limit=100,
        resolver=resolver,
        socket_factory=guarded_socket_factory(allow_loopback, allowed_networks),
    )


def refusal(exc: BaseException) -> str:
    """How an outbound failure is named in a message: the refused address when that was it,
    else the exception's type."""
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(cause, RefusedAddress):
        return f"refused: {cause.strerror}"
    return type(exc).__name__


async def outbound_http_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    assert isinstance(settings, LaunchSettings)
    allowed = settings.outbound_private_networks
    resolver = PublicAddressResolver(settings.allow_loopback_http, allowed_networks=allowed)
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=settings.external_call_timeout_s),
        connector=outbound_connector(
            settings.ssl_context(), settings.allow_loopback_http, resolver, allowed
        ),
        # Cookies from outside servers must never follow us to another request.
        cookie_jar=aiohttp.DummyCookieJar(),
        json_serialize=lambda obj: orjson.dumps(obj).decode(),
    )
    app[HTTP] = session
    yield
    await session.close()
    await resolver.close()


async def read_json(response: aiohttp.ClientResponse) -> Any:
    """The whole body as JSON, refused past MAX_RESPONSE_BYTES. `content.read(n)` returns
    what has arrived so far, not n bytes: a body in several TCP segments is read on to its
    end (a single read cut a large search Bundle short, which then failed as not JSON)."""
    # A declared length over the limit is refused unread.
    size = declared if (declared := response.content_length or 0) > MAX_RESPONSE_BYTES else 0
    chunks: list[bytes] = []
    while size <= MAX_RESPONSE_BYTES and (
        chunk := await response.content.read(MAX_RESPONSE_BYTES + 1 - size)
    ):
        chunks.append(chunk)
        size += len(chunk)
    if size > MAX_RESPONSE_BYTES:
        raise OutboundError(f"answer from {response.url.host} is larger than allowed")
    body = b"".join(chunks)  # one chunk is returned as it is, not copied
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise OutboundError(f"answer from {response.url.host} is not JSON") from None


def is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_endpoint(
    url: str, allow_loopback_http: bool, allowed_networks: tuple[IpNetwork, ...] = ()
) -> str:
    """An endpoint a configured server told us about: https, or http only on loopback when
    the stand-ins are allowed; never userinfo (credentials in URLs leak); an IP address only
    when public (or private inside an allowed network). A host name's addresses are checked
    when connecting (outbound_connector)."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # parsed lazily: a port out of range raises here, not in a later use
    except ValueError:  # also "https://[not-an-ipv6/x"
        raise OutboundError("endpoint URL is not a valid URL") from None
    if parts.username or parts.password or not parts.hostname:
        raise OutboundError("endpoint URL is not acceptable")
    try:
        literal = str(ipaddress.ip_address(parts.hostname))
    except ValueError:
        pass
    else:
        reason = address_refusal(literal, allow_loopback_http, allowed_networks)
        if reason is not None:
            raise OutboundError(f"endpoint {parts.hostname} is {reason}, which is refused")
    if parts.scheme == "https":
        return url
    if parts.scheme == "http" and allow_loopback_http and is_loopback_host(parts.hostname):
        return url
    raise OutboundError("endpoint URL must use https")
