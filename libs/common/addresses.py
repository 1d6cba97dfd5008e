"""Which IP addresses the services may connect to on an admin's or an EHR's say-so.

The config service checks the addresses a FHIR base URL and its SMART endpoints resolve to
when they are saved; the launch gateway checks every address it connects to (so a name that
resolves inside our network later, DNS rebinding, reaches nothing). One rule for both.
"""

from __future__ import annotations

import ipaddress

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def refused_address(address: IpAddress, allow_loopback: bool) -> str | None:
    """Why `address` is refused ("a private network address"), or None when it is public (or
    loopback while the local stand-ins are allowed)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return refused_address(address.ipv4_mapped, allow_loopback)
    if address.is_loopback:
        return None if allow_loopback else "a loopback address"
    if address.is_multicast or address.is_reserved or address.is_unspecified:
        return "a reserved address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private:
        return "a private network address"
    if not address.is_global:
        return "an address that is not public"
    return None


def address_refusal(address: str, allow_loopback: bool) -> str | None:
    """`refused_address` of a textual address (an IPv6 zone id ignored); "not an IP address"
    for anything else."""
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    return refused_address(parsed, allow_loopback)
