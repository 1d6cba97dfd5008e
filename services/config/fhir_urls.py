"""Checks an admin-typed FHIR base URL before the service makes any request to it.

The portal fetches `<url>/.well-known/smart-configuration`, and the launch gateway later
sends tokens there, so a URL pointing inside our network would be an SSRF. Every address the
host resolves to is checked; the probe then connects only to those addresses (no rebinding).
The endpoints that document names are checked by the same rule (`check_endpoint_url`), and
the launch gateway applies the same rule (`libs.common.addresses`) to every address it
connects to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from libs.common.addresses import IpNetwork, refused_address

MAX_URL_LENGTH = 2048
_ALLOWED_PATH_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~/%!$&'()*+,;=:@"
)


class InvalidFhirUrl(ValueError):
    """The URL is refused; the message is safe to show the admin."""


@dataclass(frozen=True)
class CheckedUrl:
    url: str
    host: str
    port: int
    addresses: tuple[str, ...]
    # The rule the addresses passed, for the endpoints the server names later.
    allow_loopback: bool = False
    allowed_networks: tuple[IpNetwork, ...] = ()


def normalise(raw: str) -> str:
    """The canonical spelling we store and compare: no surrounding space, no trailing slash,
    lower-case scheme and host. The path keeps its case (Cerner tenant ids are in it)."""
    text = raw.strip()
    if not text:
        raise InvalidFhirUrl("Enter the FHIR base URL.")
    if len(text) > MAX_URL_LENGTH:
        raise InvalidFhirUrl(f"The URL is longer than {MAX_URL_LENGTH} characters.")
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in text):
        raise InvalidFhirUrl("The URL contains spaces or characters that are not allowed.")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise InvalidFhirUrl("The URL is not well-formed.") from None
    if parts.scheme.lower() not in ("https", "http"):
        raise InvalidFhirUrl("The URL must start with https://.")
    if not parts.hostname:
        raise InvalidFhirUrl("The URL has no host name.")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidFhirUrl("The URL must not contain a user name or password.")
    if parts.fragment or "#" in text:
        raise InvalidFhirUrl("The URL must not contain a fragment (#...).")
    if parts.query or "?" in text:
        raise InvalidFhirUrl("A FHIR base URL has no query string (?...).")
    if not set(parts.path) <= _ALLOWED_PATH_CHARS:
        raise InvalidFhirUrl("The URL path contains characters that are not allowed.")
    if "/../" in f"{parts.path}/" or "/./" in f"{parts.path}/":
        raise InvalidFhirUrl("The URL path must not contain . or .. segments.")
    host = parts.hostname.lower()
    netloc = host if ":" not in host else f"[{host}]"
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))


async def _resolve(host: str, port: int) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(5):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError):
        raise InvalidFhirUrl(f"The host name {host} cannot be resolved.") from None
    except UnicodeError:  # the IDNA codec refuses an empty or over-long label ("a..b")
        raise InvalidFhirUrl(f"The host name {host} is not a valid host name.") from None
    return sorted({str(info[4][0]).split("%", 1)[0] for info in infos})


async def _checked(
    url: str, *, allow_loopback: bool, allowed_networks: tuple[IpNetwork, ...]
) -> CheckedUrl:
    """Every address of the URL's host is public (loopback only with the allowance, private
    only inside a network the operator allowed), and plain http only when the allowance is on
    and every address is loopback."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = await _resolve(host, port)
    if not addresses:
        raise InvalidFhirUrl(f"The host name {host} has no addresses.")
    for text in addresses:
        reason = refused_address(ipaddress.ip_address(text), allow_loopback, allowed_networks)
        if reason is not None:
            raise InvalidFhirUrl(f"The host {host} points at {reason} ({text}), which is refused.")
    if parts.scheme == "http":
        loopback_only = all(ipaddress.ip_address(a).is_loopback for a in addresses)
        if not (allow_loopback and loopback_only):
            raise InvalidFhirUrl("The URL must use https:// (http is only for local stand-ins).")
    return CheckedUrl(
        url=url,
        host=host,
        port=port,
        addresses=tuple(addresses),
        allow_loopback=allow_loopback,
        allowed_networks=allowed_networks,
    )


async def check_fhir_base_url(
    raw: str, *, allow_loopback: bool, allowed_networks: tuple[IpNetwork, ...] = ()
) -> CheckedUrl:
    return await _checked(
        normalise(raw), allow_loopback=allow_loopback, allowed_networks=allowed_networks
    )


async def check_endpoint_url(
    url: str, *, allow_loopback: bool, allowed_networks: tuple[IpNetwork, ...] = ()
) -> CheckedUrl:
    """An endpoint a SMART server names (authorize, token, JWKS), by the FHIR base's rule.
    Unlike a base URL it may carry a query; it may not carry credentials."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for an impossible port
    except ValueError:
        raise InvalidFhirUrl("The URL is not well-formed.") from None
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in url):
        raise InvalidFhirUrl("The URL contains spaces or characters that are not allowed.")
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidFhirUrl("The URL is not an absolute https:// URL.")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidFhirUrl("The URL must not contain a user name or password.")
    return await _checked(url, allow_loopback=allow_loopback, allowed_networks=allowed_networks)
