"""Which IP addresses the services may connect to on an admin's or an EHR's say-so.

The config service checks the addresses a FHIR base URL and its SMART endpoints resolve to
when they are saved; the launch gateway checks every address it connects to (so a name that
resolves inside our network later, DNS rebinding, reaches nothing). One rule for both.

An operator (never an admin) may allow private networks where a hospital's FHIR server or
proxy sits (`outbound_private_networks`): only RFC 1918 and IPv6 unique-local ranges can be
allowed, so loopback, link-local (the cloud metadata endpoint) and public ranges cannot.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_settings import NoDecode

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The only ranges an operator's allow-list may open: RFC 1918 and IPv6 unique-local.
ALLOWABLE_PRIVATE_RANGES: tuple[IpNetwork, ...] = (
    ipaddress.IPv4Network("10.0.0.0/8"),
    ipaddress.IPv4Network("172.16.0.0/12"),
    ipaddress.IPv4Network("192.168.0.0/16"),
    ipaddress.IPv6Network("fc00::/7"),
)


def _within(address: IpAddress, networks: Iterable[IpNetwork]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


def refused_address(
    address: IpAddress, allow_loopback: bool, allowed_networks: Iterable[IpNetwork] = ()
) -> str | None:
    """Why `address` is refused ("a private network address"), or None when it is public,
    loopback while the local stand-ins are allowed, or private inside a network the operator
    allowed (only ever an RFC 1918 or unique-local one, whatever `allowed_networks` holds)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return refused_address(address.ipv4_mapped, allow_loopback, allowed_networks)
    if isinstance(address, ipaddress.IPv6Address) and (
        address.sixtofour is not None or address.teredo is not None
    ):
        # Tunnelled IPv4 (6to4 2002::/16, Teredo 2001::/32) can carry an inside address, e.g.
        # 2002:a00:1:: is 10.0.0.1; no FHIR server needs a tunnel, so none is connected to.
        return "a tunnelled IPv4 address"
    if address.is_loopback:
        return None if allow_loopback else "a loopback address"
    if address.is_multicast or address.is_reserved or address.is_unspecified:
        return "a reserved address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private:
        allowed = _within(address, ALLOWABLE_PRIVATE_RANGES) and _within(address, allowed_networks)
        return None if allowed else "a private network address"
    if not address.is_global:
        return "an address that is not public"
    return None


def address_refusal(
    address: str, allow_loopback: bool, allowed_networks: Iterable[IpNetwork] = ()
) -> str | None:
    """`refused_address` of a textual address (an IPv6 zone id ignored); "not an IP address"
    for anything else."""
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    return refused_address(parsed, allow_loopback, allowed_networks)


def allowable_private_network(text: str) -> IpNetwork:
    """One entry of the operator's allow-list: a CIDR with no host bits set, inside an RFC 1918
    or unique-local range. Raises ValueError saying what is wrong and what is accepted."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a network in CIDR notation ({exc})") from None
    if not any(
        network.version == r.version and network.subnet_of(r)  # type: ignore[arg-type]
        for r in ALLOWABLE_PRIVATE_RANGES
    ):
        ranges = ", ".join(str(r) for r in ALLOWABLE_PRIVATE_RANGES)
        raise ValueError(
            f"{network} is not a private network that may be allowed: only networks inside"
            f" {ranges} can be (never public, loopback, link-local or metadata ranges)"
        )
    return network


def private_networks(value: Any) -> tuple[IpNetwork, ...]:
    """The allow-list from a setting: a comma-separated string (as environment variables
    give it), a JSON list, or a list; every entry must pass `allowable_private_network`."""
    if value is None:
        return ()
    if isinstance(value, str):
        text = value.strip()
        entries: list[Any] = (
            json.loads(text) if text.startswith("[") else [p for p in text.split(",") if p.strip()]
        )
    elif isinstance(value, list | tuple):
        entries = list(value)
    else:
        raise ValueError("expected CIDRs, comma-separated")
    networks: list[IpNetwork] = []
    for entry in entries:
        if isinstance(entry, ipaddress.IPv4Network | ipaddress.IPv6Network):
            entry = str(entry)
        if not isinstance(entry, str):
            raise ValueError(f"{entry!r} is not a network in CIDR notation")
        networks.append(allowable_private_network(entry))
    return tuple(networks)


# The type of an `outbound_private_networks` setting (parsed by `private_networks`).
PrivateNetworks = Annotated[tuple[IpNetwork, ...], NoDecode, BeforeValidator(private_networks)]
