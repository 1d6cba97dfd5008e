"""What the fifth pass on the launch's CPU (docs/performance.md, "Provider launch") does in
place of the library calls it replaced, checked against those calls: the authorize redirect,
the session cookie, the control-character check of `launch`, the client-assertion key kept
loaded, and reading a JSON answer that arrives in pieces."""

from __future__ import annotations

import asyncio
import sys
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, cast
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from libs.common.crypto import DEV_KEYRING, FieldCipher
from services.launch import smart
from services.launch.integrations import Integration
from services.launch.launch_flow import _CONTROL_CHARACTER
from services.launch.outbound import MAX_RESPONSE_BYTES, OutboundError, read_json
from services.launch.pages import redirect
from services.launch.sessions import set_session_cookie
from services.launch.settings import LaunchSettings
from services.launch.smart import SmartClient, SmartConfiguration, _redirect_base
from tests.support.rsa_keys import mersenne_rsa_key

QUERY = (
    "response_type=code&client_id=bench-client"
    "&redirect_uri=https%3A%2F%2Fgw.example%2Flaunch%2Fcallback&scope=openid%20fhirUser"
    "&state=s-_1&nonce=n_2&launch=l%20%26%3D%23&aud=https%3A%2F%2Fehr.example%2Fr4%2Fa%3Fb"
)


def _old_location(endpoint: str, query: str) -> str:
    """What `raise web.HTTPFound(endpoint + separator + query)` sent as Location."""
    separator = "&" if "?" in endpoint else "?"
    return str(web.HTTPFound(endpoint + separator + query).headers["Location"])


def _new_location(endpoint: str, query: str) -> str:
    base = _redirect_base(endpoint)
    return base + ("&" if "?" in base else "?") + query


_PATH_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="#"), max_size=30
)


@settings(max_examples=400, deadline=None)
@given(
    host=st.sampled_from(["ehr.example", "EHR.Example:443", "127.0.0.1:8080", "bücher.example"]),
    path=_PATH_TEXT,
    query=st.one_of(st.none(), _PATH_TEXT),
)
def test_authorize_location_reaches_the_same_endpoint_with_the_same_parameters(
    host: str, path: str, query: str | None
) -> None:
    """Against what HTTPFound sent: the same origin and path, the same decoded query
    parameters in the same order, and a value that is ASCII and printable (a valid header)."""
    endpoint = f"https://{host}/{path}" + ("" if query is None else f"?{query}")
    old, new = URL(_old_location(endpoint, QUERY)), _new_location(endpoint, QUERY)
    assert new.isascii()
    assert new.isprintable()
    parsed = URL(new)
    assert (parsed.scheme, parsed.host, parsed.port, parsed.raw_path) == (
        old.scheme,
        old.host,
        old.port,
        old.raw_path,
    )
    assert list(parsed.query.items()) == list(old.query.items())
    assert parsed.fragment == old.fragment == ""


def test_authorize_location_drops_a_fragment_and_control_characters() -> None:
    location = _new_location("https://ehr.example/auth\r\nSet-Cookie: x=1#frag", QUERY)
    parsed = URL(location)
    assert "\r" not in location
    assert "\n" not in location
    assert parsed.fragment == ""
    assert parsed.query["client_id"] == "bench-client"
    assert parsed.query["launch"] == "l &=#"


def test_redirect_is_a_302_with_its_location() -> None:
    response = redirect("/visit")
    assert response.status == 302
    assert response.headers["Location"] == "/visit"


def test_session_cookie_header_is_the_one_set_cookie_writes() -> None:
    token = "Ab_-9" * 8
    ours, theirs = web.Response(), web.Response()
    set_session_cookie(ours, token, 3600)
    theirs.set_cookie(
        "provider_session", token, max_age=3600, httponly=True, secure=True, samesite="Lax"
    )
    expected = [morsel.output(header="")[1:] for morsel in theirs.cookies.values()]
    assert ours.headers.getall("Set-Cookie") == expected
    with pytest.raises(ValueError, match="URL-safe"):
        set_session_cookie(ours, "a;b", 3600)


def test_control_character_pattern_is_unicode_cc() -> None:
    for code in range(sys.maxunicode + 1):
        character = chr(code)
        is_cc = unicodedata.category(character) == "Cc"
        assert bool(_CONTROL_CHARACTER.search(character)) is is_cc, hex(code)


def _integration(pem: str, cipher: FieldCipher) -> Integration:
    integration_id = uuid.uuid4()
    return Integration(
        integration_id=integration_id,
        tenant_id="t",
        fhir_base_url="https://ehr.example/r4/t",
        environment="production",
        department="General Medicine",
        organisation_name="Lakeside Health",
        ms_tenant_id="m",
        smart_client_id="client",
        client_auth_method="private_key_jwt",
        client_secret_encrypted=None,
        private_key_encrypted=cipher.encrypt(pem, f"integration-secret:{integration_id}"),
        pkce_mode="required",
        teams_organizer_id="o",
        sms_enabled=False,
    )


def _pem() -> str:
    key = ec.generate_private_key(ec.SECP384R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


async def test_client_assertion_key_is_loaded_once_per_configured_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cipher = FieldCipher(DEV_KEYRING, "dev1")
    loads: list[bytes] = []
    load = serialization.load_pem_private_key

    def counted(data: bytes, password: bytes | None, **options: Any) -> Any:
        loads.append(data)
        return load(data, password, **options)

    monkeypatch.setattr(smart, "load_pem_private_key", counted)
    config = SmartConfiguration(
        authorization_endpoint="https://ehr.example/authorize",
        token_endpoint="https://ehr.example/token",
    )
    integration = _integration(_pem(), cipher)
    settings = LaunchSettings()
    async with aiohttp.ClientSession() as http:
        client = SmartClient(http, settings)
        first = client._client_auth(integration, config, cipher)[1]["client_assertion"]
        second = client._client_auth(integration, config, cipher)[1]["client_assertion"]
        assert len(loads) == 1
        assert first != second  # a fresh jti and signature each time
        rekeyed = replace(
            integration,
            private_key_encrypted=cipher.encrypt(_pem(), integration.secret_purpose),
        )
        client._client_auth(rekeyed, config, cipher)
        assert len(loads) == 2


def test_an_rsa_key_over_4096_bits_is_refused_without_being_checked() -> None:
    """A large RSA key saved before config capped them is refused at once, not checked on the
    event loop (this one takes about 9 s to check) nor signed with on every launch."""
    cipher = FieldCipher(DEV_KEYRING, "dev1")
    integration = _integration(mersenne_rsa_key(4423, 4253), cipher)
    client = SmartClient(cast(aiohttp.ClientSession, None), LaunchSettings())
    started = time.perf_counter()
    with pytest.raises(smart.SmartError, match="over 4096 bits"):
        client._private_key(integration, cipher)
    assert time.perf_counter() - started < 1.0


@pytest.fixture
async def piecemeal_server() -> AsyncIterator[TestServer]:
    """Answers JSON in pieces, flushed apart (chunked), or declares a body over the limit."""
    document = {"resourceType": "Bundle", "entry": [{"n": i, "pad": "x" * 200} for i in range(400)]}

    async def pieces(request: web.Request) -> web.StreamResponse:
        body = orjson.dumps(document)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for start in range(0, len(body), 16384):
            await response.write(body[start : start + 16384])
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        chunk = b" " * 65536
        for _ in range(MAX_RESPONSE_BYTES // len(chunk) + 2):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def declared(_: web.Request) -> web.Response:
        return web.Response(body=b" " * (MAX_RESPONSE_BYTES + 1))

    app = web.Application()
    app.router.add_get("/pieces", pieces)
    app.router.add_get("/endless", endless)
    app.router.add_get("/declared", declared)
    server = TestServer(app)
    await server.start_server()
    yield server
    await server.close()


async def test_json_answer_in_pieces_is_read_whole_and_a_large_one_refused(
    piecemeal_server: TestServer,
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(piecemeal_server.make_url("/pieces")) as response:
            body = await read_json(response)
        assert len(body["entry"]) == 400
        for path in ("/endless", "/declared"):
            async with http.get(piecemeal_server.make_url(path)) as response:
                with pytest.raises(OutboundError, match="larger than allowed"):
                    await read_json(response)


def test_query_quoting_used_above_matches_the_gateway() -> None:
    assert quote("l &=#", safe="") == "l%20%26%3D%23"
