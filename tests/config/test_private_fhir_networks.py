"""A FHIR server on a private hospital network is refused by the config service unless the
operator allowed its network (`outbound_private_networks`); then its base URL and the SMART
endpoints it names pass, and every other private, link-local or plain-http URL is still
refused. Name resolution is the test's: the hospital's host answers 10.20.30.40."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from libs.common.addresses import private_networks
from sandbox.ehr import RunningEhr
from sandbox.microsoft.app import RunningSandbox
from services.config import fhir_urls, integrations
from services.config.fhir_urls import CheckedUrl, InvalidFhirUrl, check_fhir_base_url
from services.config.settings import ConfigSettings
from services.config.smart_probe import SmartConfiguration, probe_smart_configuration
from tests.config.conftest import (
    CONTOSO_ADMIN,
    ConfigPortal,
    Serve,
    config_portal,
    config_settings,
    running_portal,
    table_counts,
)
from tests.config.test_smart_endpoint_addresses import SmartServer, smart_server
from tests.support.portal import allow_redirect_uri

__all__ = ["config_portal", "config_settings", "smart_server"]

HOSPITAL_BASE = "https://fhir.hospital.test/r4/t"
DNS = {
    "fhir.hospital.test": ["10.20.30.40"],
    "split.hospital.test": ["10.20.30.41", "192.168.7.7"],
    "metadata.hospital.test": ["169.254.169.254"],
}
TEN_EIGHT = private_networks("10.0.0.0/8")


@pytest.fixture(autouse=True)
def hospital_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The config service's resolution answers the hospital's names from DNS; IP literals
    and every other name resolve as before."""
    resolve = fhir_urls._resolve

    async def test_resolve(host: str, port: int) -> list[str]:
        return DNS[host] if host in DNS else await resolve(host, port)

    monkeypatch.setattr(fhir_urls, "_resolve", test_resolve)


@pytest.fixture
async def hospital_portal(
    config_settings: ConfigSettings,
    serve: Serve,
    microsoft: RunningSandbox,
    microsoft_http: aiohttp.ClientSession,
    ehr: RunningEhr,
) -> AsyncIterator[ConfigPortal]:
    """The config portal of an operator who set EHR_OUTBOUND_PRIVATE_NETWORKS=10.0.0.0/8."""
    settings = config_settings.model_copy(update={"outbound_private_networks": TEN_EIGHT})
    await allow_redirect_uri(microsoft_http, microsoft, settings.redirect_uri)
    async with running_portal(settings, serve, microsoft_http, ehr, microsoft) as portal:
        yield portal


Probe = Callable[..., Awaitable[SmartConfiguration]]


def hospital_served_from(smart_server: SmartServer) -> Probe:
    """The probe, with the hospital's (unreachable) server's discovery document served by
    `smart_server` on loopback: the checked URL keeps the rule it passed (its allowed
    networks), so the endpoints the document names are checked by the real probe."""

    async def probe(checked: CheckedUrl, **options: Any) -> SmartConfiguration:
        assert checked.addresses == ("10.20.30.40",)
        port = int(smart_server.url.rsplit(":", 1)[1])
        served = dataclasses.replace(
            checked, url=smart_server.fhir_base, host="127.0.0.1", port=port,
            addresses=("127.0.0.1",),
        )  # fmt: skip
        return await probe_smart_configuration(served, **options)

    return probe


async def test_a_private_fhir_base_is_refused_without_the_setting_and_passes_with_it() -> None:
    """A base URL resolving to 10.20.30.40 is refused as a private network address by
    default and passes with 10.0.0.0/8 allowed, the checked URL carrying the allowed networks
    on to the SMART endpoints' check."""
    with pytest.raises(InvalidFhirUrl, match=r"a private network address \(10.20.30.40\)"):
        await check_fhir_base_url(HOSPITAL_BASE, allow_loopback=False)
    checked = await check_fhir_base_url(
        HOSPITAL_BASE, allow_loopback=False, allowed_networks=TEN_EIGHT
    )
    assert checked.addresses == ("10.20.30.40",)
    assert checked.allowed_networks == TEN_EIGHT


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https://split.hospital.test/r4", r"a private network address \(192.168.7.7\)"),
        ("https://metadata.hospital.test/r4", "a link-local address"),
        ("https://172.16.0.9/r4", "a private network address"),
        ("https://[::ffff:192.168.1.1]/r4", "a private network address"),
        ("https://127.0.0.1/r4", "a loopback address"),
        ("http://fhir.hospital.test/r4", "must use https://"),
    ],
)
async def test_with_the_setting_everything_outside_it_is_still_refused(url: str, says: str) -> None:
    """With 10.0.0.0/8 allowed, a host with any address outside it, link-local, other
    private ranges, loopback and plain http to an allowed address are refused as before."""
    with pytest.raises(InvalidFhirUrl, match=says):
        await check_fhir_base_url(url, allow_loopback=False, allowed_networks=TEN_EIGHT)


async def test_saving_a_private_fhir_base_is_422_without_the_setting(
    config_portal: ConfigPortal,
) -> None:
    """Without the setting, saving an integration whose FHIR base resolves to 10.20.30.40 is
    422 naming the address, and nothing is stored."""
    p = config_portal
    status, body = await p.call(
        CONTOSO_ADMIN, "POST", "/api/integrations", p.integration(fhir_base_url=HOSPITAL_BASE)
    )
    assert status == 422, body
    assert "a private network address (10.20.30.40)" in body["error"]
    assert await table_counts(p.settings) == {
        "integrations": 0, "outbox": 0, "audit_log": 0, "phone_numbers": 0,
    }  # fmt: skip


async def test_saving_a_private_fhir_base_with_private_endpoints_passes_with_the_setting(
    hospital_portal: ConfigPortal, smart_server: SmartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 10.0.0.0/8 allowed, an integration whose FHIR base resolves to 10.20.30.40 and
    whose SMART server names its token endpoint there too is saved (201)."""
    p = hospital_portal
    smart_server.name("token_endpoint", "https://10.20.30.40/token")
    monkeypatch.setattr(
        integrations, "probe_smart_configuration", hospital_served_from(smart_server)
    )
    status, body = await p.call(
        CONTOSO_ADMIN, "POST", "/api/integrations", p.integration(fhir_base_url=HOSPITAL_BASE)
    )
    assert status == 201, body
    assert body["fhir_base_url"] == HOSPITAL_BASE
    assert (await table_counts(p.settings))["integrations"] == 1


@pytest.mark.parametrize(
    ("endpoint", "says"),
    [
        ("https://169.254.169.254/latest/api/token", "link-local"),
        ("https://192.168.1.1/token", "private"),
        ("https://[fd00::5]/token", "private"),
        ("http://10.20.30.40/token", "https://"),
    ],
)
async def test_with_the_setting_an_endpoint_outside_it_is_still_refused(
    hospital_portal: ConfigPortal,
    smart_server: SmartServer,
    monkeypatch: pytest.MonkeyPatch,
    endpoint: str,
    says: str,
) -> None:
    """With 10.0.0.0/8 allowed, a SMART configuration naming a token endpoint at the cloud
    metadata address, another private range or plain http is 422, and nothing is stored."""
    p = hospital_portal
    smart_server.name("token_endpoint", endpoint)
    monkeypatch.setattr(
        integrations, "probe_smart_configuration", hospital_served_from(smart_server)
    )
    status, body = await p.call(
        CONTOSO_ADMIN, "POST", "/api/integrations", p.integration(fhir_base_url=HOSPITAL_BASE)
    )
    assert status == 422, body
    assert "token_endpoint is refused" in body["error"]
    assert says in body["error"]
    assert (await table_counts(p.settings))["integrations"] == 0
