"""Contract tests: SMART EHR launch, authorize and token endpoint refusals of the EHR stand-in."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from sandbox.ehr import TENANT_A, EhrSettings, start_ehr
from sandbox.ehr.clock import FakeClock
from tests.sandbox.ehr_helpers import REDIRECT_URI, SCOPE, Smart, pkce_pair


async def test_full_ehr_launch_happy_path(smart: Smart) -> None:
    """Launch -> authorize with PKCE -> redirect -> token -> verified id_token -> FHIR reads."""
    await smart.register("app-happy")
    appt = next(a for a in await smart.appointments() if a["video"])
    launch = await smart.launch(appt["id"])
    assert launch["iss"] == smart.base
    cfg = await smart.config()
    verifier, challenge = pkce_pair()
    status, query, location = await smart.authorize(
        "app-happy", launch["launch"], challenge, nonce="n-1"
    )
    assert status == 302
    assert location.startswith(REDIRECT_URI + "?")
    assert query["state"] == "st-123"
    status, body = await smart.exchange("app-happy", query["code"], verifier)
    assert status == 200, body
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 570
    assert body["patient"] == appt["patient"]
    assert body["encounter"] == appt["encounter"]
    assert body["tenant"] == TENANT_A
    assert body["need_patient_banner"] is True
    assert set(body["scope"].split()) == set(SCOPE.split())
    assert "refresh_token" in body

    kid = jwt.get_unverified_header(body["id_token"])["kid"]
    key = (await smart.jwks())[kid]
    claims = jwt.decode(
        body["id_token"],
        key.key,
        algorithms=["RS256"],
        audience="app-happy",
        issuer=cfg["issuer"],
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["fhirUser"] == f"{smart.base}/Practitioner/{appt['practitioner']}"
    assert claims["nonce"] == "n-1"
    assert claims["sub"] == appt["practitioner"]

    token = body["access_token"]
    st, got, _ = await smart.fhir(f"Encounter/{body['encounter']}", token)
    assert st == 200
    assert got["appointment"][0]["reference"] == f"Appointment/{appt['id']}"
    st, got, _ = await smart.fhir(f"Appointment/{appt['id']}", token)
    assert st == 200
    assert got["resourceType"] == "Appointment"
    st, got, _ = await smart.fhir(f"Patient/{body['patient']}", token)
    assert st == 200
    assert got["telecom"][0]["value"].startswith("+1312555")


async def test_authorize_without_aud_is_refused(smart: Smart) -> None:
    """A request without aud is refused with invalid_request (Cerner requires aud)."""
    await smart.register("app-aud")
    launch = await smart.launch()
    _, challenge = pkce_pair()
    status, query, _ = await smart.authorize("app-aud", launch["launch"], challenge, aud=None)
    assert status == 302
    assert query["error"] == "invalid_request"
    assert query["state"] == "st-123"
    assert "code" not in query


@pytest.mark.parametrize(
    "aud",
    [
        "http://localhost:{port}/r4/{tenant}",
        "{base}/",
        "https://fhir-ehr.cerner.com/r4/{tenant}",
    ],
)
async def test_authorize_with_different_aud_is_refused(smart: Smart, aud: str) -> None:
    """aud must equal the tenant's FHIR base byte for byte (localhost, trailing slash refused)."""
    await smart.register("app-aud2")
    launch = await smart.launch()
    _, challenge = pkce_pair()
    port = smart.ehr.url.rsplit(":", 1)[1]
    value = aud.format(port=port, tenant=TENANT_A, base=smart.base)
    status, query, _ = await smart.authorize("app-aud2", launch["launch"], challenge, aud=value)
    assert status == 302
    assert query["error"] == "invalid_request"


async def test_authorize_with_other_tenants_aud_is_refused(smart: Smart) -> None:
    """A tenant's authorize endpoint refuses aud naming another tenant's FHIR base."""
    await smart.register("app-aud3")
    launch = await smart.launch()
    _, challenge = pkce_pair()
    other = smart.ehr.fhir_base(next(t for t in smart.ehr.sandbox.tenants if t != TENANT_A))
    status, query, _ = await smart.authorize("app-aud3", launch["launch"], challenge, aud=other)
    assert status == 302
    assert query["error"] == "invalid_request"


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ({"code_challenge": None}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"launch": None}, "invalid_request"),
        ({"launch": "not-a-launch"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "launch user/*.read"}, "invalid_scope"),
        ({"scope": "openid user/Appointment.read"}, "invalid_scope"),
    ],
)
async def test_authorize_refusals_redirect_with_error(
    smart: Smart, override: dict[str, Any], error: str
) -> None:
    """Bad authorize parameters redirect back with error, error_description and state."""
    await smart.register("app-refuse")
    launch = await smart.launch()
    _, challenge = pkce_pair()
    status, query, _ = await smart.authorize("app-refuse", launch["launch"], challenge, **override)
    assert status == 302
    assert query["error"] == error
    assert query["error_description"]
    assert query["state"] == "st-123"


async def test_authorize_with_unregistered_redirect_uri_is_400_page(smart: Smart) -> None:
    """An unregistered redirect_uri is never redirected to: a 400 page instead."""
    await smart.register("app-redir")
    launch = await smart.launch()
    _, challenge = pkce_pair()
    status, _, location = await smart.authorize(
        "app-redir", launch["launch"], challenge, redirect_uri="http://127.0.0.1:9/evil"
    )
    assert status == 400
    assert location == ""


async def test_authorize_with_unknown_client_is_400_page(smart: Smart) -> None:
    """An unknown client_id gets a 400 page, not a redirect."""
    launch = await smart.launch()
    _, challenge = pkce_pair()
    status, _, location = await smart.authorize("nobody", launch["launch"], challenge)
    assert status == 400
    assert location == ""


async def test_launch_of_another_tenant_is_refused(smart: Smart) -> None:
    """A launch id minted in one tenant is unknown to another tenant's authorize endpoint."""
    other_tenant = next(t for t in smart.ehr.sandbox.tenants if t != TENANT_A)
    other = Smart(smart.ehr, smart.http, other_tenant)
    await smart.register("app-cross")
    launch = await other.launch()
    _, challenge = pkce_pair()
    status, query, _ = await smart.authorize("app-cross", launch["launch"], challenge)
    assert status == 302
    assert query["error"] == "invalid_request"


async def test_bad_pkce_verifier_is_invalid_grant(smart: Smart) -> None:
    """A code_verifier whose S256 does not equal the challenge is refused with invalid_grant."""
    await smart.register("app-pkce")
    code, _ = await smart.code_for("app-pkce")
    wrong, _ = pkce_pair()
    status, body = await smart.exchange("app-pkce", code, wrong)
    assert status == 400
    assert body["error"] == "invalid_grant"


async def test_missing_pkce_verifier_is_invalid_grant(smart: Smart) -> None:
    """Omitting code_verifier is refused with invalid_grant."""
    await smart.register("app-pkce2")
    code, _ = await smart.code_for("app-pkce2")
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}
    status, body = await smart.token(form, ("app-pkce2", "app-pkce2-secret"))
    assert status == 400
    assert body["error"] == "invalid_grant"


async def test_reused_code_is_invalid_grant_and_revokes_tokens(smart: Smart) -> None:
    """A code works once; reuse is invalid_grant and revokes the tokens it produced."""
    await smart.register("app-reuse")
    code, verifier = await smart.code_for("app-reuse")
    status, first = await smart.exchange("app-reuse", code, verifier)
    assert status == 200
    status, body = await smart.exchange("app-reuse", code, verifier)
    assert status == 400
    assert body["error"] == "invalid_grant"
    st, _, _ = await smart.fhir("Patient/" + first["patient"], first["access_token"])
    assert st == 401


async def test_expired_code_is_invalid_grant(smart: Smart, ehr_clock: FakeClock) -> None:
    """A code older than 60 s is refused with invalid_grant."""
    await smart.register("app-exp")
    code, verifier = await smart.code_for("app-exp")
    ehr_clock.advance(61)
    status, body = await smart.exchange("app-exp", code, verifier)
    assert status == 400
    assert body["error"] == "invalid_grant"


async def test_mismatched_redirect_uri_is_invalid_grant(smart: Smart) -> None:
    """The token request's redirect_uri must equal the authorize request's."""
    await smart.register("app-ru", redirect_uris=[REDIRECT_URI, "http://127.0.0.1:9/other"])
    code, verifier = await smart.code_for("app-ru")
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": "http://127.0.0.1:9/other",
        "code_verifier": verifier,
    }
    status, body = await smart.token(form, ("app-ru", "app-ru-secret"))
    assert status == 400
    assert body["error"] == "invalid_grant"


async def test_bad_client_secret_is_401_invalid_client(smart: Smart) -> None:
    """client_secret_basic with a wrong secret is 401 invalid_client with a Basic challenge."""
    await smart.register("app-sec")
    code, verifier = await smart.code_for("app-sec")
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
    }
    url = (await smart.config())["token_endpoint"]
    auth = {"Authorization": aiohttp.encode_basic_auth("app-sec", "wrong")}
    async with smart.http.post(url, data=form, headers=auth) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Basic")
        assert (await resp.json())["error"] == "invalid_client"


async def test_confidential_client_without_authentication_is_401(smart: Smart) -> None:
    """A confidential client that sends only client_id is refused with invalid_client."""
    await smart.register("app-noauth")
    code, verifier = await smart.code_for("app-noauth")
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
        "client_id": "app-noauth",
    }
    status, body = await smart.token(form)
    assert status == 401
    assert body["error"] == "invalid_client"


async def test_unsupported_grant_type(smart: Smart) -> None:
    """An unknown grant_type is refused with unsupported_grant_type."""
    await smart.register("app-gt")
    form = {"grant_type": "password", "username": "x", "password": "y"}
    status, body = await smart.token(form, ("app-gt", "app-gt-secret"))
    assert status == 400
    assert body["error"] == "unsupported_grant_type"


# --- private_key_jwt ----------------------------------------------------------------------


def _jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        text = RSAAlgorithm.to_jwk(key.public_key())
    else:
        text = ECAlgorithm.to_jwk(key.public_key())
    jwk: dict[str, Any] = json.loads(text)
    jwk["kid"] = kid
    return jwk


def _assertion(
    key: Any,
    alg: str,
    kid: str,
    client_id: str,
    aud: str,
    now: float,
    jti: str | None = None,
    exp: Any = None,
) -> str:
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": aud,
        "exp": int(now) + 240 if exp is None else exp,
        "jti": jti or str(uuid.uuid4()),
    }
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


async def _jwt_exchange(
    smart: Smart, client_id: str, assertion: str, code: str, verifier: str
) -> tuple[int, dict[str, Any]]:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
    }
    return await smart.token(form)


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
async def test_private_key_jwt_is_accepted(smart: Smart, ehr_clock: FakeClock, alg: str) -> None:
    """private_key_jwt with an RS384/ES384 assertion signed by the registered key succeeds."""
    key: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if alg == "RS384"
        else ec.generate_private_key(ec.SECP384R1())
    )
    client_id = f"app-pkj-{alg}"
    await smart.register(client_id, auth_method="private_key_jwt", jwks={"keys": [_jwk(key, "k1")]})
    code, verifier = await smart.code_for(client_id)
    aud = (await smart.config())["token_endpoint"]
    assertion = _assertion(key, alg, "k1", client_id, aud, ehr_clock())
    status, body = await _jwt_exchange(smart, client_id, assertion, code, verifier)
    assert status == 200, body
    assert body["access_token"]


async def test_private_key_jwt_with_bad_signature_is_401(
    smart: Smart, ehr_clock: FakeClock
) -> None:
    """An assertion signed by a key other than the registered one is 401 invalid_client."""
    registered = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await smart.register(
        "app-pkj-bad", auth_method="private_key_jwt", jwks={"keys": [_jwk(registered, "k1")]}
    )
    code, verifier = await smart.code_for("app-pkj-bad")
    aud = (await smart.config())["token_endpoint"]
    assertion = _assertion(attacker, "RS384", "k1", "app-pkj-bad", aud, ehr_clock())
    status, body = await _jwt_exchange(smart, "app-pkj-bad", assertion, code, verifier)
    assert status == 401
    assert body["error"] == "invalid_client"


async def test_private_key_jwt_refusals(smart: Smart, ehr_clock: FakeClock) -> None:
    """Assertions with a wrong aud, RS256, an expired exp or a reused jti are refused."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await smart.register(
        "app-pkj-r", auth_method="private_key_jwt", jwks={"keys": [_jwk(key, "k1")]}
    )
    aud = (await smart.config())["token_endpoint"]
    now = ehr_clock()
    bad = [
        _assertion(key, "RS384", "k1", "app-pkj-r", smart.base, now),
        _assertion(key, "RS256", "k1", "app-pkj-r", aud, now),
        _assertion(key, "RS384", "k1", "app-pkj-r", aud, now - 600),
    ]
    for assertion in bad:
        code, verifier = await smart.code_for("app-pkj-r")
        status, body = await _jwt_exchange(smart, "app-pkj-r", assertion, code, verifier)
        assert status == 401, assertion
        assert body["error"] == "invalid_client"
    reused = _assertion(key, "RS384", "k1", "app-pkj-r", aud, now, jti="same")
    code, verifier = await smart.code_for("app-pkj-r")
    assert (await _jwt_exchange(smart, "app-pkj-r", reused, code, verifier))[0] == 200
    code, verifier = await smart.code_for("app-pkj-r")
    status, body = await _jwt_exchange(smart, "app-pkj-r", reused, code, verifier)
    assert status == 401
    assert body["error"] == "invalid_client"


def _public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.mark.parametrize("registered_as", ["jwks", "public_key_pem"])
@pytest.mark.parametrize(
    ("kind", "alg"), [("ec", "RS384"), ("rsa", "ES384")], ids=["ec-key-RS384", "rsa-key-ES384"]
)
async def test_private_key_jwt_with_alg_not_fitting_the_registered_key_is_401(
    smart: Smart, ehr_clock: FakeClock, registered_as: str, kind: str, alg: str
) -> None:
    """An assertion whose header alg names another kind of key than the registered one (RS384
    for an EC key) is 401 invalid_client, not a 500; anyone can send one, unsigned."""
    key: Any = (
        ec.generate_private_key(ec.SECP384R1())
        if kind == "ec"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    client_id = f"app-pkj-{kind}-{registered_as}"
    registered = (
        {"jwks": {"keys": [_jwk(key, "k1")]}}
        if registered_as == "jwks"
        else {"public_key_pem": _public_pem(key)}
    )
    await smart.register(client_id, auth_method="private_key_jwt", **registered)
    code, verifier = await smart.code_for(client_id)
    aud = (await smart.config())["token_endpoint"]
    claims = {"iss": client_id, "sub": client_id, "aud": aud, "exp": int(ehr_clock()) + 240}
    forged = ".".join(
        jwt.utils.base64url_encode(json.dumps(part).encode()).decode()
        for part in ({"alg": alg, "kid": "k1"}, claims)
    )
    status, body = await _jwt_exchange(smart, client_id, f"{forged}.c2ln", code, verifier)
    assert status == 401, body
    assert body["error"] == "invalid_client"


@pytest.mark.parametrize(
    "exp",
    ["soon", "in-240s", [1], True, float("nan")],
    ids=["word", "numeric-string", "list", "bool", "NaN"],
)
async def test_private_key_jwt_with_exp_not_a_number_is_401(
    smart: Smart, ehr_clock: FakeClock, exp: Any
) -> None:
    """A signed assertion whose exp is not a JSON number (a string, a list, true, NaN) is 401
    invalid_client: not a 500, and a NaN exp no longer passes every clock check."""
    key = ec.generate_private_key(ec.SECP384R1())
    await smart.register(
        "app-pkj-exp", auth_method="private_key_jwt", jwks={"keys": [_jwk(key, "k1")]}
    )
    code, verifier = await smart.code_for("app-pkj-exp")
    aud = (await smart.config())["token_endpoint"]
    now = ehr_clock()
    sent = str(int(now) + 240) if exp == "in-240s" else exp
    assertion = _assertion(key, "ES384", "k1", "app-pkj-exp", aud, now, exp=sent)
    status, body = await _jwt_exchange(smart, "app-pkj-exp", assertion, code, verifier)
    assert status == 401, body
    assert body["error"] == "invalid_client"
    assert "NumericDate" in body["error_description"]


# --- refresh tokens -------------------------------------------------------------------------


async def test_no_refresh_token_without_online_access(smart: Smart) -> None:
    """Without online_access/offline_access in scope, no refresh_token is issued."""
    await smart.register("app-norefresh")
    scope = SCOPE.replace(" online_access", "")
    body = await smart.access_token("app-norefresh", scope)
    assert "refresh_token" not in body
    assert "online_access" not in body["scope"].split()


async def test_refresh_token_grant(smart: Smart, ehr_clock: FakeClock) -> None:
    """online_access refresh_token yields a new access token; the response omits refresh_token."""
    await smart.register("app-refresh")
    body = await smart.access_token("app-refresh")
    ehr_clock.advance(600)
    st, _, _ = await smart.fhir(f"Patient/{body['patient']}", body["access_token"])
    assert st == 401
    form = {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}
    status, fresh = await smart.token(form, ("app-refresh", "app-refresh-secret"))
    assert status == 200, fresh
    assert fresh["access_token"] != body["access_token"]
    assert "refresh_token" not in fresh
    assert fresh["patient"] == body["patient"]
    st, _, _ = await smart.fhir(f"Patient/{body['patient']}", fresh["access_token"])
    assert st == 200


async def test_refresh_token_of_other_client_is_invalid_grant(smart: Smart) -> None:
    """A refresh_token presented by a different client is refused with invalid_grant."""
    await smart.register("app-r1")
    await smart.register("app-r2")
    body = await smart.access_token("app-r1")
    form = {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}
    status, err = await smart.token(form, ("app-r2", "app-r2-secret"))
    assert status == 400
    assert err["error"] == "invalid_grant"


async def test_token_lifetime_is_configurable(ehr_http: aiohttp.ClientSession) -> None:
    """access_token_ttl in settings changes expires_in."""
    running = await start_ehr(EhrSettings(port=0, access_token_ttl=5), FakeClock(time.time()))
    try:
        smart = Smart(running, ehr_http, TENANT_A)
        await smart.register("app-ttl")
        body = await smart.access_token("app-ttl")
        assert body["expires_in"] == 5
    finally:
        await running.close()


async def test_public_client_with_pkce(smart: Smart) -> None:
    """A public client (auth_method none) authenticates with client_id plus PKCE only."""
    await smart.register("app-public", auth_method="none", client_secret=None)
    code, verifier = await smart.code_for("app-public")
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
        "client_id": "app-public",
    }
    status, body = await smart.token(form)
    assert status == 200, body
    assert body["access_token"]


async def test_base64_launch_ids_survive_exact_encoding(ehr_http: aiohttp.ClientSession) -> None:
    """With launch_id_style=base64 the launch URL carries '+' encoded; it works decoded once."""
    settings = EhrSettings(port=0, launch_id_style="base64")
    running = await start_ehr(settings, FakeClock(time.time()))
    try:
        smart = Smart(running, ehr_http, TENANT_A)
        await smart.admin("PATCH", f"/_sandbox/tenants/{TENANT_A}", {"launch_url": REDIRECT_URI})
        await smart.register("app-b64")
        minted = await smart.launch()
        assert "+" in minted["launch"]
        assert "%2B" in minted["launch_url"]
        launch = parse_qs(urlsplit(minted["launch_url"]).query)["launch"][0]
        assert launch == minted["launch"]
        _, challenge = pkce_pair()
        status, query, _ = await smart.authorize("app-b64", launch, challenge)
        assert status == 302
        assert "code" in query, query
        mangled = launch.replace("+", " ")
        status, query, _ = await smart.authorize("app-b64", mangled, challenge)
        assert status == 302
        assert query["error"] == "invalid_request"
    finally:
        await running.close()
