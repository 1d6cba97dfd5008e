"""Contract tests: Entra ID stand-in (discovery, msal client credentials, auth code + PKCE)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jwt
import msal
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sandbox.microsoft.app import RunningSandbox
from sandbox.microsoft.clock import ManualClock
from sandbox.microsoft.directory import (
    CONNECTOR_CLIENT_ID,
    CONNECTOR_CLIENT_SECRET,
    CONTOSO_TENANT,
    FABRIKAM_TENANT,
    GLOBAL_ADMINISTRATOR,
)
from sandbox.tls import TlsFiles

REDIRECT = "https://127.0.0.1:8443/auth/callback"
GRAPH_DEFAULT = ["https://graph.microsoft.com/.default"]


def _msal_app(ms: RunningSandbox, tls: TlsFiles, tenant: str, secret: str) -> Any:
    # requests lets REQUESTS_CA_BUNDLE override msal's verify=, so hand msal a session that
    # ignores the environment and trusts the local CA.
    session = requests.Session()
    session.trust_env = False
    session.verify = str(tls.ca)
    return msal.ConfidentialClientApplication(
        CONNECTOR_CLIENT_ID,
        authority=f"{ms.base_url}/{tenant}",
        client_credential=secret,
        instance_discovery=False,
        http_client=session,
    )


def _pkce() -> tuple[str, str]:
    verifier = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def _authorize(
    ms: RunningSandbox,
    http: aiohttp.ClientSession,
    challenge: str,
    login_hint: str,
    tenant: str = CONTOSO_TENANT,
    method: str = "S256",
) -> dict[str, list[str]]:
    params = {
        "client_id": CONNECTOR_CLIENT_ID,
        "response_type": "code",
        "redirect_uri": REDIRECT,
        "scope": "openid profile offline_access",
        "state": "st-1",
        "nonce": "n-1",
        "code_challenge": challenge,
        "code_challenge_method": method,
        "login_hint": login_hint,
    }
    url = f"{ms.base_url}/{tenant}/oauth2/v2.0/authorize"
    async with http.get(url, params=params, allow_redirects=False) as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
    assert location.startswith(REDIRECT)
    return parse_qs(urlsplit(location).query)


async def _redeem(
    ms: RunningSandbox, http: aiohttp.ClientSession, code: str, verifier: str
) -> tuple[int, dict[str, Any]]:
    form = {
        "grant_type": "authorization_code",
        "client_id": CONNECTOR_CLIENT_ID,
        "client_secret": CONNECTOR_CLIENT_SECRET,
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
    }
    async with http.post(f"{ms.base_url}/{CONTOSO_TENANT}/oauth2/v2.0/token", data=form) as resp:
        return resp.status, await resp.json()


async def test_discovery_document_points_at_stand_in(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession
) -> None:
    """OIDC discovery names the stand-in's issuer, token endpoint and JWKS."""
    url = f"{ms.base_url}/{CONTOSO_TENANT}/v2.0/.well-known/openid-configuration"
    async with ms_http.get(url) as resp:
        doc = await resp.json()
    assert doc["issuer"] == f"{ms.base_url}/{CONTOSO_TENANT}/v2.0"
    assert doc["token_endpoint"] == f"{ms.base_url}/{CONTOSO_TENANT}/oauth2/v2.0/token"
    async with ms_http.get(doc["jwks_uri"]) as resp:
        assert (await resp.json())["keys"][0]["kid"]


async def test_real_msal_gets_app_only_graph_token(
    ms: RunningSandbox, ms_tls: TlsFiles, ms_clock: ManualClock
) -> None:
    """The real msal acquire_token_for_client obtains an RS256 Graph token with roles and tid."""
    # msal is synchronous and its constructor already fetches discovery: run it off the loop.
    app = await asyncio.to_thread(_msal_app, ms, ms_tls, CONTOSO_TENANT, CONNECTOR_CLIENT_SECRET)
    result = await asyncio.to_thread(app.acquire_token_for_client, GRAPH_DEFAULT)
    assert "access_token" in result, result
    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert claims["aud"] == "https://graph.microsoft.com"
    assert claims["tid"] == CONTOSO_TENANT
    assert "OnlineMeetings.ReadWrite.All" in claims["roles"]
    assert claims["exp"] > ms_clock.now().timestamp()
    assert jwt.get_unverified_header(result["access_token"])["kid"]


async def test_msal_with_wrong_client_secret_is_refused(
    ms: RunningSandbox, ms_tls: TlsFiles
) -> None:
    """A wrong client secret yields invalid_client (AADSTS7000215)."""
    app = await asyncio.to_thread(_msal_app, ms, ms_tls, CONTOSO_TENANT, "not-the-secret")
    result = await asyncio.to_thread(app.acquire_token_for_client, GRAPH_DEFAULT)
    assert result["error"] == "invalid_client"
    assert 7000215 in result["error_codes"]


async def test_msal_with_unknown_tenant_is_refused(ms: RunningSandbox, ms_tls: TlsFiles) -> None:
    """An unknown tenant fails discovery, so msal refuses to build the app."""
    with pytest.raises(ValueError, match="tenant"):
        await asyncio.to_thread(
            _msal_app, ms, ms_tls, "00000000-0000-0000-0000-00000000dead", CONNECTOR_CLIENT_SECRET
        )


@pytest.mark.parametrize("sent_in", ["form", "basic"])
async def test_client_secret_with_non_ascii_characters_is_invalid_client(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession, sent_in: str
) -> None:
    """A client secret with non-ASCII characters, in the form or in Basic, is 401
    invalid_client (AADSTS7000215) like any wrong secret, not a 500."""
    form = {"grant_type": "client_credentials", "scope": GRAPH_DEFAULT[0]}
    headers: dict[str, str] = {}
    if sent_in == "form":
        form |= {"client_id": CONNECTOR_CLIENT_ID, "client_secret": "s\u00e9cret"}
    else:
        basic = base64.b64encode(f"{CONNECTOR_CLIENT_ID}:s\u00e9cret".encode()).decode()
        headers["Authorization"] = f"Basic {basic}"
    url = f"{ms.base_url}/{CONTOSO_TENANT}/oauth2/v2.0/token"
    async with ms_http.post(url, data=form, headers=headers) as r:
        assert r.status == 401, await r.text()
        body = await r.json()
    assert body["error"] == "invalid_client"
    assert body["error_codes"] == [7000215]


async def test_client_credentials_with_wrong_scope_is_refused(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession
) -> None:
    """Client credentials need a resource/.default scope."""
    form = {
        "grant_type": "client_credentials",
        "client_id": CONNECTOR_CLIENT_ID,
        "client_secret": CONNECTOR_CLIENT_SECRET,
        "scope": "User.Read",
    }
    async with ms_http.post(f"{ms.base_url}/{CONTOSO_TENANT}/oauth2/v2.0/token", data=form) as r:
        assert r.status == 400
        assert (await r.json())["error"] == "invalid_scope"


async def test_auth_code_pkce_sign_in_yields_verifiable_id_token(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession
) -> None:
    """login_hint auto-approves; the id_token verifies against JWKS and carries wids and nonce."""
    verifier, challenge = _pkce()
    query = await _authorize(ms, ms_http, challenge, "admin@contosohealth.onmicrosoft.com")
    assert query["state"] == ["st-1"]
    status, tokens = await _redeem(ms, ms_http, query["code"][0], verifier)
    assert status == 200, tokens
    assert tokens["refresh_token"]
    async with ms_http.get(f"{ms.base_url}/{CONTOSO_TENANT}/discovery/v2.0/keys") as resp:
        jwks = await resp.json()
    kid = jwt.get_unverified_header(tokens["id_token"])["kid"]
    key = next(jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == kid)
    claims = jwt.decode(
        tokens["id_token"],
        key.key,
        algorithms=["RS256"],
        audience=CONNECTOR_CLIENT_ID,
        issuer=f"{ms.base_url}/{CONTOSO_TENANT}/v2.0",
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert claims["tid"] == CONTOSO_TENANT
    assert claims["nonce"] == "n-1"
    assert claims["preferred_username"] == "admin@contosohealth.onmicrosoft.com"
    assert GLOBAL_ADMINISTRATOR in claims["wids"]
    assert claims["oid"]
    assert claims["name"]


async def test_pick_account_page_lists_tenant_users(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession
) -> None:
    """Without login_hint the authorize endpoint shows a pick-account page."""
    _, challenge = _pkce()
    params = {
        "client_id": CONNECTOR_CLIENT_ID,
        "response_type": "code",
        "redirect_uri": REDIRECT,
        "scope": "openid",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    url = f"{ms.base_url}/{FABRIKAM_TENANT}/oauth2/v2.0/authorize"
    async with ms_http.get(url, params=params) as resp:
        page = await resp.text()
    assert "admin@fabrikamclinics.onmicrosoft.com" in page
    assert "contosohealth" not in page


async def test_bad_pkce_verifier_is_refused(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession
) -> None:
    """A code_verifier that does not hash to the challenge is invalid_grant (AADSTS501481)."""
    _, challenge = _pkce()
    query = await _authorize(ms, ms_http, challenge, "user@contosohealth.onmicrosoft.com")
    other_verifier, _ = _pkce()
    status, body = await _redeem(ms, ms_http, query["code"][0], other_verifier)
    assert status == 400
    assert body["error"] == "invalid_grant"
    assert body["error_codes"] == [501481]


async def test_plain_pkce_verifier_with_non_ascii_characters_is_refused(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession
) -> None:
    """With the plain method, a code_verifier with non-ASCII characters is invalid_grant
    (AADSTS501481) like any other mismatch, not a 500."""
    challenge = "plain-challenge-" + "x" * 32
    query = await _authorize(
        ms, ms_http, challenge, "user@contosohealth.onmicrosoft.com", method="plain"
    )
    status, body = await _redeem(ms, ms_http, query["code"][0], challenge + "\u00e9")
    assert status == 400, body
    assert body["error"] == "invalid_grant"
    assert body["error_codes"] == [501481]


async def test_reused_code_is_refused(ms: RunningSandbox, ms_http: aiohttp.ClientSession) -> None:
    """An authorization code is single use (AADSTS54005 on the second redemption)."""
    verifier, challenge = _pkce()
    query = await _authorize(ms, ms_http, challenge, "reader@contosohealth.onmicrosoft.com")
    first, _ = await _redeem(ms, ms_http, query["code"][0], verifier)
    second, body = await _redeem(ms, ms_http, query["code"][0], verifier)
    assert (first, second) == (200, 400)
    assert body["error_codes"] == [54005]


async def test_user_from_other_tenant_is_refused(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession
) -> None:
    """Signing in at tenant A with a tenant-B account redirects back with an error."""
    _, challenge = _pkce()
    query = await _authorize(ms, ms_http, challenge, "admin@fabrikamclinics.onmicrosoft.com")
    assert "code" not in query
    assert query["error"] == ["invalid_request"]
    assert "AADSTS50020" in query["error_description"][0]


async def test_unregistered_redirect_uri_is_not_redirected_to(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession
) -> None:
    """An unregistered redirect_uri gets an error page, never a redirect."""
    params = {
        "client_id": CONNECTOR_CLIENT_ID,
        "response_type": "code",
        "redirect_uri": "https://evil.example/cb",
        "scope": "openid",
        "login_hint": "admin@contosohealth.onmicrosoft.com",
    }
    url = f"{ms.base_url}/{CONTOSO_TENANT}/oauth2/v2.0/authorize"
    async with ms_http.get(url, params=params, allow_redirects=False) as resp:
        assert resp.status == 400
        assert "AADSTS50011" in await resp.text()


@pytest.mark.parametrize("exp", ["in-an-hour", "4102444800", True, float("nan"), None])
async def test_client_assertion_whose_exp_is_not_a_number_is_invalid_client(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession, ms_clock: ManualClock, exp: Any
) -> None:
    """A signed client assertion must carry exp as a JSON number: anything else is 401
    invalid_client (a string crashed the stand-in; NaN passed every clock check)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    client_id = str(uuid.uuid4())
    async with ms_http.post(
        f"{ms.base_url}/_sandbox/entra/apps",
        json={"clientId": client_id, "displayName": "assertion", "certificatePems": [pem.decode()]},
    ) as r:
        assert r.status == 201, await r.text()
    url = f"{ms.base_url}/{CONTOSO_TENANT}/oauth2/v2.0/token"

    async def token_status(exp: Any) -> tuple[int, dict[str, Any]]:
        claims: dict[str, Any] = {"iss": client_id, "sub": client_id, "aud": url}
        if exp is not None:
            claims["exp"] = exp
        form = {
            "grant_type": "client_credentials",
            "scope": GRAPH_DEFAULT[0],
            "client_id": client_id,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": jwt.encode(claims, key, algorithm="RS256"),
        }
        async with ms_http.post(url, data=form) as r:
            return r.status, await r.json()

    control, _ = await token_status(int(ms_clock.now().timestamp()) + 3600)
    status, body = await token_status(exp)
    assert (control, status, body["error"], body["error_codes"]) == (
        200,
        401,
        "invalid_client",
        [700024],
    )
