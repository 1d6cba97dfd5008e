"""A configured EHR answering with well-formed JSON of the wrong shape, or impossible times,
gets a clear page from the gateway, never a 500, and nothing is made for the visit."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import running_app
from tests.hostile.attack_support import (
    ForgingEhr,
    Gateway,
    gateway,
    launch_through,
    module_infra,
    trap,
    trap_url,
)
from tests.support.launch_harness import integration_config

__all__ = ["gateway", "module_infra", "trap", "trap_url"]


class OddEhr(ForgingEhr):
    """The forging EHR, with its JWKS, FHIR answers or discovery document replaceable."""

    def __init__(self, trap_url: str) -> None:
        super().__init__(trap_url)
        self.jwks_body: object = None
        self.bundle: object = None
        self.authorization_endpoint: str | None = None

    async def _jwks(self, request: web.Request) -> web.Response:
        if self.jwks_body is not None:
            return web.json_response(self.jwks_body)
        return await super()._jwks(request)

    async def _fhir(self, request: web.Request) -> web.Response:
        if self.bundle is not None:
            return web.json_response(self.bundle)
        return await super()._fhir(request)

    async def _discovery(self, request: web.Request) -> web.Response:
        if self.authorization_endpoint is None:
            return await super()._discovery(request)
        return web.json_response(
            {
                "issuer": self.fhir_base,
                "authorization_endpoint": self.authorization_endpoint,
                "token_endpoint": f"{self.url}/token",
                "jwks_uri": f"{self.url}/jwks",
            }
        )


@pytest.fixture
async def odd_ehr(trap_url: str) -> AsyncIterator[OddEhr]:
    server = OddEhr(trap_url)
    async with running_app(server.app) as url:
        server.url = url
        yield server


async def _configured(gateway: Gateway, ehr: OddEhr) -> uuid.UUID:
    integration_id = uuid.uuid4()
    config = integration_config(gateway.system.settings, integration_id, ehr.fhir_base)
    await gateway.add_integration("contoso", config)
    return integration_id


async def _launch(gateway: Gateway, ehr: OddEhr, integration_id: uuid.UUID) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        r = await launch_through(http, gateway, ehr, integration_id)
        return r.status, await r.text()


def _video_visit(start: datetime, end: str) -> dict[str, Any]:
    return {
        "resourceType": "Appointment",
        "id": "77",
        "status": "booked",
        "start": start.isoformat(),
        "end": end,
        "serviceType": [{"coding": [{"code": "VIDEO_VISIT"}]}],
        "participant": [{"actor": {"reference": "Patient/4242"}}],
    }


ODD_ANSWERS = {
    "jwks is a list": ("jwks_body", [{"kty": "RSA"}], 400, "keys are not a valid"),
    "jwks keys hold a string": ("jwks_body", {"keys": ["not-a-jwk"]}, 400, "unknown key"),
    "bundle entry is a number": (
        "bundle",
        {"resourceType": "Bundle", "entry": 5},
        502,
        "not a valid FHIR Bundle",
    ),
    "bundle entry is an object": (
        "bundle",
        {"resourceType": "Bundle", "entry": {"a": 1}},
        502,
        "not a valid FHIR Bundle",
    ),
}


@pytest.mark.parametrize("case", list(ODD_ANSWERS))
async def test_json_of_the_wrong_shape_gets_a_clear_page(
    gateway: Gateway, odd_ehr: OddEhr, case: str
) -> None:
    """A JWKS or search Bundle of the wrong shape is refused with a page that says so."""
    integration_id = await _configured(gateway, odd_ehr)
    attribute, body, status, says = ODD_ANSWERS[case]
    setattr(odd_ehr, attribute, body)
    answer, page = await _launch(gateway, odd_ehr, integration_id)
    assert answer == status
    assert says in page


async def test_a_visit_ending_near_year_9999_makes_no_meeting(
    gateway: Gateway, odd_ehr: OddEhr
) -> None:
    """Times no later step can compute with are refused before a Teams meeting is made."""
    integration_id = await _configured(gateway, odd_ehr)
    soon = datetime.now(UTC) + timedelta(minutes=5)
    odd_ehr.bundle = {
        "resourceType": "Bundle",
        "entry": [{"resource": _video_visit(soon, "9999-12-31T23:59:00+00:00")}],
    }
    meetings = gateway.system.microsoft.components.meetings
    before = len(meetings.by_id)
    status, page = await _launch(gateway, odd_ehr, integration_id)
    assert status == 503
    assert "start or end time in the EHR is not valid" in page
    assert len(meetings.by_id) == before


async def test_an_unparseable_endpoint_in_discovery_gets_a_clear_page(
    gateway: Gateway, odd_ehr: OddEhr
) -> None:
    """A discovery document naming a URL that does not parse is refused, not a 500."""
    integration_id = await _configured(gateway, odd_ehr)
    odd_ehr.authorization_endpoint = "https://[not-an-ipv6/authorize"
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{gateway.url}/launch/provider/{integration_id}",
            params={"iss": odd_ehr.fhir_base, "launch": "l-1"},
            allow_redirects=False,
        ) as r,
    ):
        assert r.status == 502
        assert "not a valid URL" in await r.text()
