"""The endpoints a SMART configuration names (authorize, token, JWKS) pass the FHIR base's own
address rule before an integration is saved: the launch gateway later POSTs the client secret
to token_endpoint and GETs jwks_uri, so a SMART server naming an internal address would make
the gateway an SSRF (the reviewer's proof: /tmp/review_tests/test_smart_endpoints_ssrf.py)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from services.config.fhir_urls import CheckedUrl
from services.config.smart_probe import SmartProbeFailed, probe_smart_configuration
from tests.config.conftest import (
    CONTOSO_ADMIN,
    ConfigPortal,
    Serve,
    config_portal,
    config_settings,
    table_counts,
)

__all__ = ["config_portal", "config_settings"]

FIELDS = ("authorization_endpoint", "token_endpoint", "jwks_uri")
SMART_PATH = "/r4/t"


class SmartServer:
    """A SMART server on loopback (as the stand-ins are) whose discovery document names
    whatever endpoints the test sets."""

    def __init__(self) -> None:
        self.url = ""
        self.endpoints: dict[str, str] = {}
        self.app = web.Application()
        self.app.router.add_get(f"{SMART_PATH}/.well-known/smart-configuration", self._smart)

    @property
    def fhir_base(self) -> str:
        return self.url + SMART_PATH

    def name(self, field: str, url: str, others: str = "") -> None:
        """Every endpoint at `others` (this server itself by default), except `field`, which
        is `url`."""
        self.endpoints = {f: f"{others or self.url}/{f}" for f in FIELDS}
        self.endpoints[field] = url

    async def _smart(self, _: web.Request) -> web.Response:
        document: dict[str, Any] = {
            **self.endpoints,
            "code_challenge_methods_supported": ["S256"],
            "capabilities": ["launch-ehr"],
        }
        return web.json_response(document)


@pytest.fixture
async def smart_server(serve: Serve) -> AsyncIterator[SmartServer]:
    server = SmartServer()
    async with serve(server.app) as url:
        server.url = url
        yield server


INTERNAL = [
    ("https://169.254.169.254/latest/api/token", "link-local"),
    ("https://10.0.0.5/authorize", "private"),
    ("https://192.168.1.1:8443/internal/admin", "private"),
    ("https://[fd00::5]/token", "private"),
    ("https://[::ffff:172.16.0.9]/jwks", "private"),
    ("https://0.0.0.0/token", "reserved"),
    ("http://93.184.216.34/token", "https://"),
    # Not parsed by urlsplit (an unclosed IPv6 bracket; a 500 before), or relative.
    ("https://[not-an-ipv6/token", "not well-formed"),
    ("https://[::1/token", "not well-formed"),
    ("/token", "not an absolute https:// URL"),
]


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize(("endpoint", "says"), INTERNAL)
async def test_internal_endpoint_is_refused_and_nothing_is_stored(
    config_portal: ConfigPortal, smart_server: SmartServer, field: str, endpoint: str, says: str
) -> None:
    """A SMART configuration naming a link-local, private, reserved, plain-http, malformed or
    relative endpoint gets 422 on fhir_base_url naming the field, and no integration, event
    or audit entry is written."""
    p = config_portal
    smart_server.name(field, endpoint)
    status, body = await p.call(
        CONTOSO_ADMIN,
        "POST",
        "/api/integrations",
        p.integration(fhir_base_url=smart_server.fhir_base),
    )
    assert status == 422, body
    assert body["field"] == "fhir_base_url"
    assert f"SMART configuration's {field} is refused" in body["error"]
    assert says in body["error"]
    assert await table_counts(p.settings) == {
        "integrations": 0, "outbox": 0, "audit_log": 0, "phone_numbers": 0,
    }  # fmt: skip


async def test_update_to_a_server_naming_an_internal_token_endpoint_changes_nothing(
    config_portal: ConfigPortal, smart_server: SmartServer
) -> None:
    """Moving a saved integration to a FHIR base whose token_endpoint is link-local is 422,
    and the saved integration, its events and its audit trail stay as they were."""
    p = config_portal
    status, saved = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", p.integration())
    assert status == 201, saved
    before = await table_counts(p.settings)
    smart_server.name("token_endpoint", "https://169.254.169.254/latest/api/token")
    status, body = await p.call(
        CONTOSO_ADMIN,
        "PUT",
        f"/api/integrations/{saved['id']}",
        p.integration(fhir_base_url=smart_server.fhir_base),
    )
    assert status == 422, body
    assert "token_endpoint is refused" in body["error"]
    assert await table_counts(p.settings) == before
    status, now = await p.call(CONTOSO_ADMIN, "GET", f"/api/integrations/{saved['id']}")
    assert status == 200
    assert now == saved


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize(
    "endpoint", ["https://127.0.0.1/{field}", "https://localhost:8443/{field}", "https://[::1]/x"]
)
async def test_loopback_endpoint_is_refused_without_the_stand_in_allowance(
    smart_server: SmartServer, field: str, endpoint: str
) -> None:
    """With allow_loopback_http off (production), an endpoint on a loopback address or a
    name resolving to one is refused, as a loopback FHIR base is."""
    # The other endpoints on a public address, so only `field` can be the one refused.
    smart_server.name(field, endpoint.format(field=field), others="https://93.184.216.34")
    # Pinned to the loopback server, as check_fhir_base_url pins a base URL it checked.
    port = int(smart_server.url.rsplit(":", 1)[1])
    checked = CheckedUrl(smart_server.fhir_base, "127.0.0.1", port, ("127.0.0.1",), False)
    with pytest.raises(SmartProbeFailed, match=f"{field} is refused.*loopback"):
        await probe_smart_configuration(
            checked, ssl_context=ssl.create_default_context(), timeout_s=5, max_bytes=65536
        )


async def test_loopback_endpoints_pass_with_the_stand_in_allowance(
    smart_server: SmartServer,
) -> None:
    """The same allowance that admits the local stand-ins' FHIR base admits their http
    endpoints on loopback (how `make run` and the tests work)."""
    smart_server.name("token_endpoint", f"{smart_server.url}/token")
    port = int(smart_server.url.rsplit(":", 1)[1])
    checked = CheckedUrl(smart_server.fhir_base, "127.0.0.1", port, ("127.0.0.1",), True)
    found = await probe_smart_configuration(
        checked, ssl_context=ssl.create_default_context(), timeout_s=5, max_bytes=65536
    )
    assert found.token_endpoint == f"{smart_server.url}/token"
