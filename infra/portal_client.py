"""Signs a seeded Entra user in to a portal service the way a browser does, without one:
login redirect, the identity provider's authorize (auto-approved by `login_hint`), callback.
Used by `make run`'s sample data and by the tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

SESSION_COOKIE = "portal_session"
SIGN_IN_COOKIE = "portal_sign_in"


@dataclass(frozen=True)
class PortalSession:
    cookie: str
    csrf_token: str

    def headers(self) -> dict[str, str]:
        return {"X-CSRF-Token": self.csrf_token, "Cookie": f"{SESSION_COOKIE}={self.cookie}"}


async def sign_in(http: aiohttp.ClientSession, portal_url: str, upn: str) -> aiohttp.ClientResponse:
    """Runs the login redirect chain and returns the portal's answer to the callback."""
    login = f"{portal_url}/auth/login?login_hint={quote(upn)}"
    async with http.get(login, allow_redirects=False) as r:
        if r.status != 302:
            raise RuntimeError(f"portal login answered {r.status}: {await r.text()}")
        binding = r.cookies[SIGN_IN_COOKIE].value
        authorize = r.headers["Location"]
    async with http.get(authorize, allow_redirects=False) as r:
        if r.status != 302:
            raise RuntimeError(f"sign-in at the identity provider answered {r.status}")
        callback = r.headers["Location"]
    response = await http.get(
        callback, allow_redirects=False, headers={"Cookie": f"{SIGN_IN_COOKIE}={binding}"}
    )
    await response.read()
    return response


async def portal_session(http: aiohttp.ClientSession, portal_url: str, upn: str) -> PortalSession:
    response = await sign_in(http, portal_url, upn)
    if response.status != 302:
        raise RuntimeError(f"portal sign-in for {upn} answered {response.status}")
    cookie = response.cookies[SESSION_COOKIE].value
    async with http.get(
        f"{portal_url}/auth/session", headers={"Cookie": f"{SESSION_COOKIE}={cookie}"}
    ) as r:
        info: dict[str, Any] = await r.json()
    return PortalSession(cookie, str(info["csrf_token"]))
