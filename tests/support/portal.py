"""Portal sign-in helpers for tests (the client itself lives in infra/portal_client.py)."""

from __future__ import annotations

import aiohttp

from infra.portal_client import PortalSession, portal_session, sign_in
from sandbox.microsoft.app import RunningSandbox
from sandbox.microsoft.directory import CONNECTOR_CLIENT_ID


async def allow_redirect_uri(http: aiohttp.ClientSession, ms: RunningSandbox, uri: str) -> None:
    """Registers a portal's callback on the connector's Entra app registration."""
    async with http.get(f"{ms.base_url}/_sandbox/entra/apps") as response:
        app = next(a for a in await response.json() if a["clientId"] == CONNECTOR_CLIENT_ID)
    body = {"clientId": CONNECTOR_CLIENT_ID, "redirectUris": [*app["redirectUris"], uri]}
    async with http.post(f"{ms.base_url}/_sandbox/entra/apps", json=body) as response:
        assert response.status in (200, 201), await response.text()


__all__ = ["PortalSession", "allow_redirect_uri", "portal_session", "sign_in"]
