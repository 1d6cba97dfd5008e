"""Attacks on the SMART EHR launch and on every redirect we answer with.

tests/launch/test_launch_refusals.py has the first cases (four foreign `iss` shapes, one
replay, one forged state, a wrong-key and an alg-none token checked on the validator); this
file sweeps each class systematically through the real gateway: every `iss` trick on every
launch route with a log of every outbound request, odd `launch` encodings, state reuse and
mix-up between two integrations, forged id_tokens through the real callback, and open
redirects through any parameter, in the launch gateway and in the portal sign-in."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import pytest
from yarl import URL

from sandbox.ehr import TENANT_A, TENANT_B
from tests.config.conftest import CONTOSO_ADMIN, ConfigPortal, config_portal, config_settings
from tests.hostile.attack_support import (
    FORGE_PATH,
    ForgingEhr,
    Gateway,
    Trap,
    forging_ehr,
    gateway,
    launch_through,
    mint_launch,
    module_infra,
    off_site,
    origin,
    trap,
    trap_url,
)
from tests.support.launch_harness import integration_config

__all__ = [
    "config_portal",
    "config_settings",
    "forging_ehr",
    "gateway",
    "module_infra",
    "trap",
    "trap_url",
]

NOT_SET_UP = "This EHR is not set up"
SIGN_IN_REFUSED = "The sign-in could not be completed"


def launch_routes(gw: Gateway) -> list[str]:
    """Every route that starts a SMART launch (a new one must be added here)."""
    a = gw.integrations[TENANT_A]
    return ["/launch/provider", f"/launch/provider/{a}", f"/launch/patient/{a}"]


async def test_every_launch_route_is_swept(gateway: Gateway) -> None:
    """Each route of the gateway that reads `iss` is in the sweep below."""
    starting = {
        r.resource.canonical
        for r in gateway.system.app.router.routes()
        if r.resource is not None and r.resource.canonical.startswith("/launch/")
    } - {"/launch/callback"}
    swept = {"/launch/provider", "/launch/provider/{integration_id}"} | {
        "/launch/patient/{integration_id}"
    }
    assert starting == swept
    assert len(launch_routes(gateway)) == len(swept)


def hostile_issuers(gw: Gateway, trap: str) -> Iterator[tuple[str, str]]:
    """(what, iss) pairs that look like, or point past, the configured FHIR base."""
    base = gw.fhir_base(TENANT_A)
    ours = URL(base)
    port, path = ours.port, ours.path
    trap_host = URL(trap).authority
    yield "unconfigured host, same path", f"{trap}{path}"
    yield "unconfigured host", trap
    yield "loopback without port", f"http://127.0.0.1{path}"
    yield "private 10.x", f"http://10.0.0.8{path}"
    yield "private 192.168.x", f"https://192.168.1.10{path}"
    yield "cloud metadata", "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    yield "cloud metadata https", f"https://169.254.169.254{path}"
    yield "IPv6 loopback", f"http://[::1]:{port}{path}"
    yield "IPv4-mapped IPv6", f"http://[::ffff:127.0.0.1]:{port}{path}"
    yield "localhost spelling", f"http://localhost:{port}{path}"
    yield "decimal address", f"http://2130706433:{port}{path}"
    yield "short address", f"http://127.1:{port}{path}"
    yield "userinfo", f"http://user:pass@127.0.0.1:{port}{path}"
    yield "userinfo hiding the host", f"http://127.0.0.1:{port}@{trap_host}{path}"
    yield "backslash hiding the host", f"http://{trap_host}\\@127.0.0.1:{port}{path}"
    yield "fragment", base + "#frag"
    yield "fragment hiding the host", f"{trap}#@127.0.0.1:{port}{path}"
    yield "query", base + "?_format=json"
    yield "trailing /..", base + "/.."
    yield "/.. into the other tenant", f"{base}/../{TENANT_B}"
    yield "%2e%2e", f"http://127.0.0.1:{port}/r4/%2e%2e/r4/{TENANT_A}"
    yield "percent-encoded tenant", base[:-1] + quote(base[-1], safe="").replace(base[-1], "%31")
    yield "double slash", f"http://127.0.0.1:{port}//r4/{TENANT_A}"
    yield "trailing slash", base + "/"
    yield "trailing dot host", f"http://localhost.:{port}{path}"
    yield "uppercase host", f"http://LOCALHOST:{port}{path}"
    yield "uppercase scheme", base.replace("http://", "HTTP://")
    yield "uppercase tenant", base.upper().replace("HTTP://", "http://")
    yield "default port", f"http://127.0.0.1:80{path}"
    yield "leading-zero port", f"http://127.0.0.1:0{port}{path}"
    yield "https instead of http", base.replace("http://", "https://")
    yield "leading space", " " + base
    yield "trailing space", base + " "
    yield "trailing tab", base + "\t"
    yield "trailing NUL", base + "\x00"
    yield "scheme-relative", f"//127.0.0.1:{port}{path}"
    yield "javascript:", "javascript:alert(1)"
    yield "file:", "file:///etc/passwd"
    yield "fullwidth path", base.replace("/r4/", "/\uff52\uff14/")


async def test_hostile_iss_is_refused_on_every_route_without_outbound_requests(
    gateway: Gateway, trap: Trap
) -> None:
    """Every `iss` that is not byte for byte a configured FHIR base gets a 4xx page on every
    launch route, no redirect, no stored state, and the gateway starts no request at all."""
    before = await gateway.counts()
    gateway.outbound.clear()
    failures = []
    async with aiohttp.ClientSession() as http:
        for what, iss in hostile_issuers(gateway, trap.url):
            for route in launch_routes(gateway):
                async with http.get(
                    gateway.url + route,
                    params={"iss": iss, "launch": "launch-123"},
                    allow_redirects=False,
                ) as r:
                    body = await r.text()
                    if not (400 <= r.status < 500) or "Location" in r.headers:
                        failures.append((what, route, r.status, body[:200]))
                    elif r.status == 403:
                        assert NOT_SET_UP in body
    assert failures == []
    assert gateway.outbound.urls == []
    assert trap.hits == []
    assert await gateway.counts() == before


async def test_another_integrations_iss_is_refused_on_this_integrations_routes(
    gateway: Gateway,
) -> None:
    """Tenant B's FHIR base, though configured, is refused on integration A's launch URLs."""
    b_base = gateway.fhir_base(TENANT_B)
    async with aiohttp.ClientSession() as http:
        for route in launch_routes(gateway)[1:]:
            async with http.get(
                gateway.url + route, params={"iss": b_base, "launch": "x"}, allow_redirects=False
            ) as r:
                assert r.status == 403, route
    assert gateway.outbound.urls == []


@pytest.mark.parametrize(
    "query",
    [
        "iss={base}&launch=" + "x" * 1025,
        "iss={base}" + "x" * 2049 + "&launch=abc",
        "iss={base}&iss={base}&launch=abc",
        "iss={base}&launch=abc&launch=def",
        "iss={base}",
        "launch=abc",
        "iss=&launch=",
    ],
    ids=["long launch", "long iss", "two iss", "two launch", "no launch", "no iss", "empty"],
)
async def test_malformed_launch_parameters_get_400(gateway: Gateway, query: str) -> None:
    """Missing, repeated or overlong launch parameters get a 400 page and no outbound call."""
    url = URL(
        gateway.url
        + launch_routes(gateway)[1]
        + "?"
        + query.format(base=gateway.fhir_base(TENANT_A)),
        encoded=False,
    )
    async with aiohttp.ClientSession() as http, http.get(url, allow_redirects=False) as r:
        assert r.status == 400
    assert gateway.outbound.urls == []


ODD_LAUNCH_VALUES = [
    "\x00",
    "abc\x00def",
    "\r\nLocation: https://evil.example/",
    "line\nbreak",
    "tab\there",
    "\u00fcn\u00efc\u00f8d\u00e9-\u2713-\U0001f600",
    "\u202eevil",
    "%00",
    "%2e%2e%2f",
    "%ZZ%",
    "a+b c",
    "../../../etc/passwd",
    "<script>alert(1)</script>",
    "x" * 1024,
]


async def test_odd_launch_values_are_refused_or_sent_on_exactly_once(gateway: Gateway) -> None:
    """A `launch` with control characters gets 400 at once; any other odd value goes to the
    EHR's authorize unchanged (decoded once, encoded once), the EHR refuses it, and the
    callback answers 4xx: no session, no header injection, no off-site redirect."""
    base = gateway.fhir_base(TENANT_A)
    ehr = origin(gateway.ehr.url)
    sessions = await _sessions(gateway)
    async with aiohttp.ClientSession() as http:
        for value in ODD_LAUNCH_VALUES:
            async with http.get(
                gateway.url + launch_routes(gateway)[1],
                params={"iss": base, "launch": value},
                allow_redirects=False,
            ) as r:
                if any(ord(c) < 32 for c in value):
                    assert r.status == 400, value
                    continue
                assert r.status == 302, (value, await r.text())
                authorize = r.headers["Location"]
            assert origin(authorize) == ehr
            assert parse_qs(urlsplit(authorize).query)["launch"] == [value]
            async with http.get(authorize, allow_redirects=False) as r:
                assert r.status == 302
                callback = r.headers["Location"]
            assert origin(callback) == origin(gateway.url)
            async with http.get(callback, allow_redirects=False) as r:
                assert r.status == 400, value
                assert "Location" not in r.headers
    assert await _sessions(gateway) == sessions


@pytest.mark.parametrize(
    "launch", ["%C0%AF", "%FF%FE", "%", "%Z", "%E2%82", "%u0041"], ids=lambda v: v
)
async def test_undecodable_launch_bytes_get_a_clear_answer(gateway: Gateway, launch: str) -> None:
    """Percent-escapes that are not UTF-8 (or not escapes) get a 4xx page or go to the EHR as
    read, never a 500."""
    iss = quote(gateway.fhir_base(TENANT_A), safe="")
    url = URL(f"{gateway.url}{launch_routes(gateway)[1]}?iss={iss}&launch={launch}", encoded=True)
    async with aiohttp.ClientSession() as http, http.get(url, allow_redirects=False) as r:
        assert r.status in (302, 400), await r.text()
        if r.status == 302:
            assert origin(r.headers["Location"]) == origin(gateway.ehr.url)


async def _authorized(http: aiohttp.ClientSession, gw: Gateway, tenant: str) -> tuple[str, str]:
    """(state, code) for a launch at `tenant`'s integration, stopped before our callback."""
    minted = await mint_launch(http, gw, tenant)
    async with http.get(minted["launch_url"], allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        authorize = r.headers["Location"]
    async with http.get(authorize, allow_redirects=False) as r:
        assert r.status == 302
        query = parse_qs(urlsplit(r.headers["Location"]).query)
    assert "code" in query, query
    return query["state"][0], query["code"][0]


async def _state_stored(gw: Gateway, state: str) -> bool:
    digest = hashlib.sha256(state.encode()).digest()
    return bool(
        await gw.fetchval("SELECT count(*) FROM launch_states WHERE state_hash = $1", digest)
    )


async def _sessions(gw: Gateway) -> int:
    return int(await gw.fetchval("SELECT count(*) FROM provider_sessions"))


async def _callback(
    http: aiohttp.ClientSession, gw: Gateway, state: str, code: str
) -> tuple[int, str]:
    async with http.get(
        f"{gw.url}/launch/callback", params={"state": state, "code": code}, allow_redirects=False
    ) as r:
        assert "provider_session" not in r.cookies or r.status == 302
        return r.status, await r.text()


async def test_state_burnt_by_a_failed_callback_cannot_be_used_again(gateway: Gateway) -> None:
    """A state presented with a wrong code is consumed: the right code later gets 400."""
    sessions = await _sessions(gateway)
    async with aiohttp.ClientSession() as http:
        state, code = await _authorized(http, gateway, TENANT_A)
        status, body = await _callback(http, gateway, state, "not-the-code")
        assert status == 400
        assert SIGN_IN_REFUSED in body
        status, body = await _callback(http, gateway, state, code)
        assert status == 400
        assert "expired or was already used" in body
    assert await _sessions(gateway) == sessions
    assert not await _state_stored(gateway, state)


async def test_expired_state_is_refused_and_removed(gateway: Gateway) -> None:
    """A state past its TTL gets 400 and no token exchange, even with the EHR's real code."""
    async with aiohttp.ClientSession() as http:
        state, code = await _authorized(http, gateway, TENANT_A)
        expired = await gateway.fetchval(
            "WITH u AS (UPDATE launch_states SET expires_at = now() - interval '1 second'"
            " WHERE state_hash = $1 RETURNING 1) SELECT count(*) FROM u",
            hashlib.sha256(state.encode()).digest(),
        )
        assert expired == 1
        gateway.outbound.clear()
        status, body = await _callback(http, gateway, state, code)
    assert status == 400
    assert "expired or was already used" in body
    assert gateway.outbound.urls == []
    assert not await _state_stored(gateway, state)


async def test_code_and_state_of_two_integrations_cannot_be_mixed(gateway: Gateway) -> None:
    """A's state with B's code (and B's state with A's code) is refused: the code goes only
    to the state's own EHR, which refuses a code it did not issue; no session starts."""
    sessions = await _sessions(gateway)
    async with aiohttp.ClientSession() as http:
        state_a, code_a = await _authorized(http, gateway, TENANT_A)
        state_b, code_b = await _authorized(http, gateway, TENANT_B)
        gateway.outbound.clear()
        for state, code, owner in ((state_a, code_b, TENANT_A), (state_b, code_a, TENANT_B)):
            status, body = await _callback(http, gateway, state, code)
            assert status == 400
            assert SIGN_IN_REFUSED in body
            assert "invalid_grant" in body
            token_calls = [u for u in gateway.outbound.urls if u.path.endswith("/token")]
            assert token_calls
            assert f"/tenants/{owner}/" in token_calls[-1].path
        for state, code in ((state_a, code_a), (state_b, code_b)):
            status, body = await _callback(http, gateway, state, code)
            assert status == 400
            assert "expired or was already used" in body
    assert await _sessions(gateway) == sessions


async def test_forged_id_tokens_are_refused_through_the_real_callback(
    gateway: Gateway, forging_ehr: ForgingEhr, trap: Trap
) -> None:
    """Through a configured SMART server that forges them, an id_token with alg none or HS256,
    the wrong key or kid, a jku header, the wrong aud or iss, expired or not yet valid, no exp,
    the wrong or no nonce, or altered claims gets a 400 page and no session; the control token
    gets through to the appointment search. Nothing is fetched from anywhere else."""
    integration_id = uuid.uuid4()
    config = integration_config(gateway.system.settings, integration_id, forging_ehr.fhir_base)
    await gateway.add_integration("contoso", config)
    gateway.outbound.clear()
    sessions = await _sessions(gateway)
    outcomes = {}
    async with aiohttp.ClientSession() as http:
        for mode in ForgingEhr.MODES:
            forging_ehr.mode = mode
            r = await launch_through(http, gateway, forging_ehr, integration_id)
            outcomes[mode] = (r.status, SIGN_IN_REFUSED in await r.text(), "Location" in r.headers)
    assert outcomes.pop("valid") == (404, False, False)
    assert outcomes == {mode: (400, True, False) for mode in ForgingEhr.MODES[1:]}
    assert gateway.outbound.origins() == {origin(forging_ehr.url)}
    assert {u.path for u in gateway.outbound.urls} <= {
        f"{FORGE_PATH}/.well-known/smart-configuration",
        "/token",
        "/jwks",
        f"{FORGE_PATH}/Appointment",
    }
    assert trap.hits == []
    assert await _sessions(gateway) == sessions


EVIL = "evil.example"
REDIRECT_PAYLOADS = [
    f"https://{EVIL}/",
    f"//{EVIL}/",
    f"/\\{EVIL}/",
    f"\\\\{EVIL}/",
    f"/\t/{EVIL}/",
    f"/\n/{EVIL}/",
    f"/\r\n/{EVIL}/",
    f" //{EVIL}/",
    f"/%09/{EVIL}/",
    f"http:{EVIL}",
    "javascript:alert(document.domain)",
]
REDIRECT_PARAMS = ["redirect_uri", "return_to", "returnTo", "next", "return", "url", "aud"]


async def test_no_launch_redirect_leaves_the_site_whatever_the_parameters(
    gateway: Gateway,
) -> None:
    """Open-redirect parameters on the launch, the callback and the visit pages never reach
    a Location: the launch still sends the browser only to the configured EHR, with our own
    redirect_uri and aud, and every later hop stays on the gateway or the EHR."""
    allowed = {origin(gateway.url), origin(gateway.ehr.url)}
    base = gateway.fhir_base(TENANT_A)
    callback = f"{gateway.url}/launch/callback"
    async with aiohttp.ClientSession() as http:
        for payload in REDIRECT_PAYLOADS:
            extra = {name: payload for name in REDIRECT_PARAMS}
            minted = await mint_launch(http, gateway, TENANT_A)
            url: str | None = minted["launch_url"]
            hops = 0
            while url is not None and hops < 10:
                hops += 1
                async with http.get(
                    url, params=extra if hops == 1 else None, allow_redirects=False
                ) as r:
                    location = r.headers.get("Location")
                    if location is None:
                        break
                    assert not off_site(location, allowed), (payload, location)
                    if hops == 1:
                        query = parse_qs(urlsplit(location).query)
                        assert query["redirect_uri"] == [callback]
                        assert query["aud"] == [base]
                    url = str(r.url.join(URL(location)))
            assert hops >= 3, "the launch went to the EHR and came back to our callback"
            for path in (
                "/launch/callback?error=access_denied&error_description=x",
                "/launch/callback",
                "/visit",
                "/visit/choose",
                "/join/not-a-token",
            ):
                async with http.get(gateway.url + path, params=extra, allow_redirects=False) as r:
                    location = r.headers.get("Location")
                    assert location is None or not off_site(location, allowed), (path, location)


async def test_portal_sign_in_never_returns_off_site(config_portal: ConfigPortal) -> None:
    """Whatever `return_to` the sign-in starts with (absolute, scheme-relative, backslashes,
    tabs or newlines a browser drops), the portal sends the signed-in admin to a local page."""
    portal = config_portal
    allowed = {origin(portal.url)}
    http = portal.http
    for payload in [*REDIRECT_PAYLOADS, "/fhir-urls"]:
        login = f"{portal.url}/auth/login?login_hint={quote(CONTOSO_ADMIN)}"
        login += f"&return_to={quote(payload, safe='')}"
        async with http.get(login, allow_redirects=False) as r:
            assert r.status == 302, (payload, await r.text())
            binding = r.cookies["portal_sign_in"].value
            authorize = r.headers["Location"]
        async with http.get(authorize, allow_redirects=False) as r:
            assert r.status == 302
            back = r.headers["Location"]
        async with http.get(
            back, allow_redirects=False, headers={"Cookie": f"portal_sign_in={binding}"}
        ) as r:
            assert r.status == 302, (payload, await r.text())
            location = r.headers["Location"]
        assert not off_site(location, allowed), (payload, location)
        if payload == "/fhir-urls":
            assert location == "/fhir-urls"
    # A signed-out page visit whose path carries the payload is sent to sign in, on site.
    for payload in REDIRECT_PAYLOADS:
        path = "/fhir-urls/" + quote(payload, safe="")
        async with http.get(
            portal.url + path, headers={"Accept": "text/html"}, allow_redirects=False
        ) as r:
            assert r.status == 302
            assert not off_site(r.headers["Location"], allowed), (payload, r.headers)
