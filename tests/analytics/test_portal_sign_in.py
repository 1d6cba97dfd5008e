"""The analytics portal's sign-in callback refuses answers it cannot use with a clear 400."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from tests.analytics.conftest import CONTOSO_ADMIN, Analytics


async def test_callback_without_code_or_error_is_400(analytics: Analytics) -> None:
    """A callback with a valid state but neither code nor error gets a 400 page, not a 500."""
    async with analytics.http.get(
        f"{analytics.url}/auth/login?login_hint={CONTOSO_ADMIN}", allow_redirects=False
    ) as r:
        binding = r.cookies["portal_sign_in"].value
        state = parse_qs(urlsplit(r.headers["Location"]).query)["state"][0]
    async with analytics.http.get(
        f"{analytics.url}/auth/callback",
        params={"state": state},
        headers={"Cookie": f"portal_sign_in={binding}"},
        allow_redirects=False,
    ) as r:
        assert r.status == 400, await r.text()
        assert "Sign in again" in await r.text()
