"""Signs a seeded Entra user in to a portal service, as a browser would, without one."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import aiohttp

from libs.common.portal_auth import SESSION_COOKIE, SIGN_IN_COOKIE
from sandbox.microsoft.app import RunningSandbox
from sandbox.microsoft.directory import CONNECTOR_CLIENT_ID


@dataclass(frozen=True)
class PortalSession:
    cookie: str
    csrf_token: str

    @property
    def cookies(self) -> dict[str, str]:
        return {SESSION_COOKIE: self.cookie}

    def headers(self) -> dict[str, str]:
        return {"X-CSRF-Token": self.csrf_token, "Cookie": f"{SESSION_COOKIE}={self.cookie}"}


async def allow_redirect_uri(http: aiohttp.ClientSession, ms: RunningSandbox, uri: str) -> None:
    """Registers a portal's callback on the connector's Entra app registration."""
    async with http.get(f"{ms.base_url}/_sandbox/entra/apps") as response:
        app = next(a for a in await response.json() if a["clientId"] == CONNECTOR_CLIENT_ID)
    body = {"clientId": CONNECTOR_CLIENT_ID, "redirectUris": [*app["redirectUris"], uri]}
    async with http.post(f"{ms.base_url}/_sandbox/entra/apps", json=body) as response:
        assert response.status in (200, 201), await response.text()


async def sign_in(http: aiohttp.ClientSession, portal_url: str, upn: str) -> aiohttp.ClientResponse:
    """Runs the login redirect chain and returns the portal's answer to the callback."""
    async with http.get(
        f"{portal_url}/auth/login?login_hint={quote(upn)}", allow_redirects=False
    ) as r:
        assert r.status == 302, await r.text()
        binding = r.cookies[SIGN_IN_COOKIE].value
        authorize = r.headers["Location"]
    async with http.get(authorize, allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        callback = r.headers["Location"]
    response = await http.get(
        callback, allow_redirects=False, headers={"Cookie": f"{SIGN_IN_COOKIE}={binding}"}
    )
    await response.read()
    return response


async def portal_session(http: aiohttp.ClientSession, portal_url: str, upn: str) -> PortalSession:
    response = await sign_in(http, portal_url, upn)
    assert response.status == 302, await response.text()
    cookie = response.cookies[SESSION_COOKIE].value
    async with http.get(
        f"{portal_url}/auth/session", headers={"Cookie": f"{SESSION_COOKIE}={cookie}"}
    ) as r:
        assert r.status == 200
        csrf = (await r.json())["csrf_token"]
    return PortalSession(cookie, csrf)
