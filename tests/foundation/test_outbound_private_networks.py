"""The operator's allow-list of private networks (`outbound_private_networks`): an address
inside an allowed network passes the one outbound address rule, everything else is refused as
before, and a setting that would open anything but an RFC 1918 or unique-local network stops
the service at start with the reason."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from libs.common.addresses import address_refusal, private_networks, refused_address
from services.config.settings import ConfigSettings
from services.launch.settings import LaunchSettings

HOSPITAL = private_networks("10.20.0.0/16, fd12:3456::/48")


@pytest.mark.parametrize("address", ["10.20.30.40", "::ffff:10.20.0.1", "fd12:3456::7"])
def test_an_address_inside_an_allowed_network_is_accepted(address: str) -> None:
    """A private address inside an allowed network, IPv4-mapped spelling included, passes."""
    assert address_refusal(address, False, HOSPITAL) is None


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("10.21.0.1", "a private network address"),
        ("::ffff:10.21.0.1", "a private network address"),
        ("192.168.1.1", "a private network address"),
        ("fd00::1", "a private network address"),
        ("169.254.169.254", "a link-local address"),
        ("127.0.0.1", "a loopback address"),
        ("0.0.0.0", "a reserved address"),  # noqa: S104 - an address refused, not bound
        ("100.64.0.1", "an address that is not public"),
        ("2002:a00:1::1", "a tunnelled IPv4 address"),  # 6to4 of 10.0.0.1
        ("2002:a914:1e28::1", "a tunnelled IPv4 address"),  # 6to4 of a public address too
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "a tunnelled IPv4 address"),  # Teredo
    ],
)
def test_an_address_outside_the_allowed_networks_is_still_refused(address: str, says: str) -> None:
    """Private addresses outside the allowed networks, link-local, loopback (without the
    stand-in allowance), reserved and shared addresses are refused as without the list."""
    assert address_refusal(address, False, HOSPITAL) == says


def test_without_the_setting_private_addresses_are_refused() -> None:
    """The default (no allowed networks) refuses every private address, as before."""
    assert address_refusal("10.20.30.40", False) == "a private network address"
    assert address_refusal("8.8.8.8", False, HOSPITAL) is None


def test_the_rule_never_admits_more_than_private_ranges_whatever_it_is_given() -> None:
    """Handed networks that bypassed the setting's validation (metadata, loopback, everything),
    the rule still refuses link-local, loopback and benchmark addresses."""
    unchecked = tuple(
        ipaddress.ip_network(n) for n in ("169.254.0.0/16", "127.0.0.0/8", "0.0.0.0/0", "::/0")
    )
    for address in ("169.254.169.254", "127.0.0.1", "198.18.0.1", "fe80::1"):
        assert refused_address(ipaddress.ip_address(address), False, unchecked) is not None


@pytest.mark.parametrize("settings", [ConfigSettings, LaunchSettings])
def test_the_setting_reads_comma_separated_cidrs_from_the_environment(
    settings: type[ConfigSettings] | type[LaunchSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """EHR_OUTBOUND_PRIVATE_NETWORKS holds comma-separated CIDRs; unset means none."""
    assert settings().outbound_private_networks == ()
    monkeypatch.setenv("EHR_OUTBOUND_PRIVATE_NETWORKS", " 10.20.30.0/24, 172.16.5.0/24,fd12::/64")
    assert [str(n) for n in settings().outbound_private_networks] == [
        "10.20.30.0/24",
        "172.16.5.0/24",
        "fd12::/64",
    ]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("169.254.0.0/16", "is not a private network that may be allowed"),
        ("169.254.169.254/32", "is not a private network that may be allowed"),
        ("0.0.0.0/0", "is not a private network that may be allowed"),
        ("::/0", "is not a private network that may be allowed"),
        ("8.8.8.0/24", "is not a private network that may be allowed"),
        ("127.0.0.0/8", "is not a private network that may be allowed"),
        ("224.0.0.0/4", "is not a private network that may be allowed"),
        ("fe80::/10", "is not a private network that may be allowed"),
        ("100.64.0.0/10", "is not a private network that may be allowed"),
        ("10.0.0.0/7", "is not a private network that may be allowed"),
        ("::ffff:10.0.0.0/104", "is not a private network that may be allowed"),
        ("10.20.30.40/16", "has host bits set"),
        ("hospital.example", "is not a network in CIDR notation"),
    ],
)
@pytest.mark.parametrize("settings", [ConfigSettings, LaunchSettings])
def test_a_setting_outside_the_private_ranges_stops_startup_with_the_reason(
    settings: type[ConfigSettings] | type[LaunchSettings],
    monkeypatch: pytest.MonkeyPatch,
    value: str,
    says: str,
) -> None:
    """Public, everything, loopback, multicast, link-local (cloud metadata), shared and
    too-wide ranges, host bits and non-CIDRs fail the settings with a message naming the value
    and the setting, even beside a valid entry."""
    monkeypatch.setenv("EHR_OUTBOUND_PRIVATE_NETWORKS", f"10.20.30.0/24,{value}")
    with pytest.raises(ValidationError) as refused:
        settings()
    message = str(refused.value)
    assert "outbound_private_networks" in message
    assert says in message
    assert value.split("/")[0] in message
