"""One outbound HTTP client for the gateway: timeouts, the trusted CA, no redirects, and a
cap on how much of a hostile server's answer we read."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import web

from libs.common.web import SETTINGS

HTTP = web.AppKey("outbound_http", aiohttp.ClientSession)
MAX_RESPONSE_BYTES = 2 * 1024 * 1024


class OutboundError(Exception):
    """A call to the outside world failed; the message is safe to log and to show."""


async def outbound_http_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=settings.external_call_timeout_s),
        connector=aiohttp.TCPConnector(ssl=settings.ssl_context(), limit=100),
        # Cookies from outside servers must never follow us to another request.
        cookie_jar=aiohttp.DummyCookieJar(),
        json_serialize=lambda obj: orjson.dumps(obj).decode(),
    )
    app[HTTP] = session
    yield
    await session.close()


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


def check_endpoint(url: str, allow_loopback_http: bool) -> str:
    """An endpoint a configured server told us about: https, or http only on loopback when
    the stand-ins are allowed; never userinfo (credentials in URLs leak)."""
    parts = urlsplit(url)
    if parts.username or parts.password or not parts.hostname:
        raise OutboundError("endpoint URL is not acceptable")
    if parts.scheme == "https":
        return url
    if parts.scheme == "http" and allow_loopback_http and is_loopback_host(parts.hostname):
        return url
    raise OutboundError("endpoint URL must use https")
