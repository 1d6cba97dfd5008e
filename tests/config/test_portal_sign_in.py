from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from libs.common.portal_auth import SESSION_COOKIE, EntraSignIn, SignInError
from sandbox.microsoft.app import RunningSandbox
from sandbox.microsoft.directory import CONNECTOR_CLIENT_ID, CONTOSO_TENANT
from services.config.app import create_app
from services.config.settings import ConfigSettings
from tests.conftest import free_port
from tests.support.portal import allow_redirect_uri, portal_session, sign_in

ADMIN = "admin@contosohealth.onmicrosoft.com"
READER = "reader@contosohealth.onmicrosoft.com"
PLAIN_USER = "user@contosohealth.onmicrosoft.com"


@pytest.fixture
async def portal(
    make_settings: Callable[..., Any],
    serve: Callable[[web.Application], AbstractAsyncContextManager[str]],
    microsoft: RunningSandbox,
    microsoft_http: aiohttp.ClientSession,
    ca_bundle: str,
) -> AsyncIterator[tuple[str, ConfigSettings]]:
    port = free_port()
    settings: ConfigSettings = make_settings(
        ConfigSettings,
        http_port=port,
        public_base_url=f"http://127.0.0.1:{port}",
        entra_authority_host=microsoft.base_url,
        tls_ca_bundle=ca_bundle,
    )
    await allow_redirect_uri(microsoft_http, microsoft, settings.redirect_uri)
    async with serve(create_app(settings)) as url:
        yield url, settings


async def test_global_admin_signs_in_and_gets_a_session(
    portal: tuple[str, ConfigSettings], microsoft_http: aiohttp.ClientSession
) -> None:
    """msal's auth-code + PKCE flow ends in a server-side session with the admin role."""
    url, _ = portal
    session = await portal_session(microsoft_http, url, ADMIN)
    async with microsoft_http.get(f"{url}/auth/session", headers=session.headers()) as r:
        info = await r.json()
    assert info["tenant_id"] == CONTOSO_TENANT
    assert info["roles"] == ["global_admin"]


async def test_session_cookie_is_httponly_secure_and_samesite(
    portal: tuple[str, ConfigSettings], microsoft_http: aiohttp.ClientSession
) -> None:
    """The session cookie cannot be read by scripts, sent over plain text, or cross-site."""
    url, _ = portal
    response = await sign_in(microsoft_http, url, ADMIN)
    morsel = response.cookies[SESSION_COOKIE]
    assert morsel["httponly"]
    assert morsel["secure"]
    assert morsel["samesite"] == "Lax"


async def test_user_without_an_admin_role_gets_a_clear_403(
    portal: tuple[str, ConfigSettings], microsoft_http: aiohttp.ClientSession
) -> None:
    """A tenant member who is no administrator or reader is refused with a 403 page."""
    url, _ = portal
    response = await sign_in(microsoft_http, url, PLAIN_USER)
    assert response.status == 403
    assert "Global Administrator" in await response.text()
    assert SESSION_COOKIE not in response.cookies


async def test_reader_gets_a_read_only_session(
    portal: tuple[str, ConfigSettings], microsoft_http: aiohttp.ClientSession
) -> None:
    """A Global Reader signs in with the reader role only."""
    url, _ = portal
    session = await portal_session(microsoft_http, url, READER)
    async with microsoft_http.get(f"{url}/auth/session", headers=session.headers()) as r:
        assert (await r.json())["roles"] == ["global_reader"]


async def test_callback_cannot_be_replayed(
    portal: tuple[str, ConfigSettings], microsoft_http: aiohttp.ClientSession
) -> None:
    """A sign-in state is single-use: replaying the callback is refused."""
    url, _ = portal
    async with microsoft_http.get(
        f"{url}/auth/login?login_hint={ADMIN}", allow_redirects=False
    ) as r:
        binding = r.cookies["portal_sign_in"].value
        authorize = r.headers["Location"]
    async with microsoft_http.get(authorize, allow_redirects=False) as r:
        callback = r.headers["Location"]
    headers = {"Cookie": f"portal_sign_in={binding}"}
    async with microsoft_http.get(callback, allow_redirects=False, headers=headers) as r:
        assert r.status == 302
    async with microsoft_http.get(callback, allow_redirects=False, headers=headers) as r:
        assert r.status == 400
        assert "expired or was already used" in await r.text()


async def _started_sign_in(http: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    """Start a sign-in: its state and the browser-binding cookie."""
    async with http.get(f"{url}/auth/login?login_hint={ADMIN}", allow_redirects=False) as r:
        assert r.status == 302
        binding = r.cookies["portal_sign_in"].value
        state = parse_qs(urlsplit(r.headers["Location"]).query)["state"][0]
    return state, binding


async def test_callback_without_code_or_error_is_refused(
    portal: tuple[str, ConfigSettings], microsoft_http: aiohttp.ClientSession
) -> None:
    """A callback with a valid state but neither code nor error gets a 400 page, not a 500."""
    url, _ = portal
    state, binding = await _started_sign_in(microsoft_http, url)
    async with microsoft_http.get(
        f"{url}/auth/callback",
        params={"state": state},
        headers={"Cookie": f"portal_sign_in={binding}"},
        allow_redirects=False,
    ) as r:
        assert r.status == 400, await r.text()
        assert "Sign in again" in await r.text()
        assert SESSION_COOKIE not in r.cookies


async def test_callback_with_a_repeated_parameter_is_refused(
    portal: tuple[str, ConfigSettings],
    microsoft_http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A repeated state (or any repeated parameter) gets a 400 page, and the state is not logged."""
    url, _ = portal
    state, binding = await _started_sign_in(microsoft_http, url)
    async with microsoft_http.get(
        f"{url}/auth/callback?state={state}&state=other&code=abc",
        headers={"Cookie": f"portal_sign_in={binding}"},
        allow_redirects=False,
    ) as r:
        assert r.status == 400, await r.text()
        assert "Sign in again" in await r.text()
    captured = capsys.readouterr()
    assert state not in captured.out + captured.err


async def test_answer_msal_refuses_is_a_sign_in_error(portal: tuple[str, ConfigSettings]) -> None:
    """An answer msal refuses with ValueError (here a state mismatch) becomes a SignInError."""
    _, settings = portal
    entra = EntraSignIn(settings)
    flow = await entra.begin(ADMIN)
    with pytest.raises(SignInError, match="Sign in again"):
        await entra.complete(flow, {"state": "other", "code": "abc"})


async def test_callback_from_another_browser_is_refused(
    portal: tuple[str, ConfigSettings], microsoft_http: aiohttp.ClientSession
) -> None:
    """Without the browser-binding cookie set at login, the callback is refused (login CSRF)."""
    url, _ = portal
    async with microsoft_http.get(
        f"{url}/auth/login?login_hint={ADMIN}", allow_redirects=False
    ) as r:
        authorize = r.headers["Location"]
    async with microsoft_http.get(authorize, allow_redirects=False) as r:
        callback = r.headers["Location"]
    async with microsoft_http.get(callback, allow_redirects=False) as r:
        assert r.status == 400
        assert SESSION_COOKIE not in r.cookies


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/", "/\\evil.example"])
async def test_return_to_cannot_leave_the_portal(
    portal: tuple[str, ConfigSettings], microsoft_http: aiohttp.ClientSession, target: str
) -> None:
    """An off-site return_to is replaced by the portal's start page (no open redirect)."""
    url, _ = portal
    async with microsoft_http.get(
        f"{url}/auth/login",
        params={"login_hint": ADMIN, "return_to": target},
        allow_redirects=False,
    ) as r:
        binding = r.cookies["portal_sign_in"].value
        authorize = r.headers["Location"]
    async with microsoft_http.get(authorize, allow_redirects=False) as r:
        callback = r.headers["Location"]
    headers = {"Cookie": f"portal_sign_in={binding}"}
    async with microsoft_http.get(callback, allow_redirects=False, headers=headers) as r:
        assert r.headers["Location"] == "/"


async def test_api_without_session_answers_401(portal: tuple[str, ConfigSettings]) -> None:
    """A signed-out API caller gets 401, not a redirect."""
    url, _ = portal
    async with aiohttp.ClientSession() as http, http.get(f"{url}/auth/session") as r:
        assert r.status == 401


async def test_id_token_signed_by_another_key_is_refused(
    portal: tuple[str, ConfigSettings], microsoft: RunningSandbox
) -> None:
    """An id_token with the right claims but a foreign signature fails JWKS validation."""
    _, settings = portal
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    forged = jwt.encode(
        {
            "iss": f"{microsoft.base_url}/{CONTOSO_TENANT}/v2.0",
            "aud": CONNECTOR_CLIENT_ID,
            "tid": CONTOSO_TENANT,
            "oid": "x",
            "iat": now,
            "exp": now + 600,
            "nonce": hashlib.sha256(b"n").hexdigest(),
        },
        key,
        algorithm="RS256",
        headers={"kid": "attacker"},
    )
    with pytest.raises(SignInError, match="unknown key"):
        await EntraSignIn(settings).validate_id_token(forged, "n")


async def test_unsigned_id_token_is_refused(
    portal: tuple[str, ConfigSettings], microsoft: RunningSandbox
) -> None:
    """alg=none is never accepted."""
    _, settings = portal
    token = jwt.encode(
        {"tid": CONTOSO_TENANT, "aud": CONNECTOR_CLIENT_ID, "nonce": "n"}, "", algorithm="none"
    )
    with pytest.raises(SignInError):
        await EntraSignIn(settings).validate_id_token(token, "n")


async def _portal_rows(settings: ConfigSettings, sql: str) -> Any:
    conn = await asyncpg.connect(
        settings.database_url.get_secret_value(), server_settings={"search_path": "config"}
    )
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def test_expired_sign_ins_and_sessions_are_removed_by_later_ones(
    portal: tuple[str, ConfigSettings], microsoft_http: aiohttp.ClientSession
) -> None:
    """Abandoned sign-ins and expired sessions do not pile up: new ones remove them."""
    url, settings = portal
    for _ in range(20):
        async with microsoft_http.get(f"{url}/auth/login", allow_redirects=False) as r:
            assert r.status == 302
    await portal_session(microsoft_http, url, ADMIN)
    assert await _portal_rows(settings, "SELECT count(*) FROM portal_sessions") == 1
    # Time passes: every abandoned sign-in and the session expire.
    await _portal_rows(settings, "UPDATE portal_sign_ins SET expires_at = now() - interval '1 s'")
    await _portal_rows(settings, "UPDATE portal_sessions SET expires_at = now() - interval '1 s'")
    async with microsoft_http.get(f"{url}/auth/login", allow_redirects=False) as r:
        assert r.status == 302
    assert await _portal_rows(settings, "SELECT count(*) FROM portal_sign_ins") == 1
    assert (
        await _portal_rows(
            settings, "SELECT count(*) FROM portal_sign_ins WHERE expires_at > now()"
        )
        == 1
    )
    await portal_session(microsoft_http, url, READER)
    assert await _portal_rows(settings, "SELECT count(*) FROM portal_sessions") == 1
    assert await _portal_rows(settings, "SELECT roles FROM portal_sessions") == ["global_reader"]
