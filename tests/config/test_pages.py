from __future__ import annotations

import re

from tests.config.conftest import (
    CONTOSO_ADMIN,
    CONTOSO_READER,
    FABRIKAM_ADMIN,
    ConfigPortal,
    table_counts,
)
from tests.config.test_integrations_api import unsupported_curve_key


async def _page(p: ConfigPortal, upn: str | None, path: str) -> tuple[int, str]:
    headers = {"Accept": "text/html"}
    if upn is not None:
        headers["Cookie"] = f"portal_session={(await p.session(upn)).cookie}"
    async with p.http.get(f"{p.url}{path}", headers=headers, allow_redirects=False) as r:
        return r.status, await r.text()


async def _post_form(
    p: ConfigPortal, upn: str, path: str, fields: dict[str, str], *, csrf: bool = True
) -> tuple[int, str, str]:
    session = await p.session(upn)
    data = dict(fields)
    if csrf:
        data["csrf_token"] = session.csrf_token
    async with p.http.post(
        f"{p.url}{path}",
        data=data,
        headers={"Cookie": f"portal_session={session.cookie}", "Accept": "text/html"},
        allow_redirects=False,
    ) as r:
        return r.status, r.headers.get("Location", ""), await r.text()


def _form(p: ConfigPortal) -> dict[str, str]:
    return {k: str(v) for k, v in p.integration().items()} | {"enabled": "on"}


async def test_admin_adds_a_url_through_the_form(config_portal: ConfigPortal) -> None:
    """The HTML form saves, redirects to the URL's page, which shows SMART and the records."""
    p = config_portal
    status, location, _ = await _post_form(p, CONTOSO_ADMIN, "/fhir-urls", _form(p))
    assert status == 303
    assert re.fullmatch(r"/fhir-urls/[0-9a-f-]{36}\?done=integration-added", location)
    status, html = await _page(p, CONTOSO_ADMIN, location)
    assert status == 200
    assert "S256 supported" in html
    assert "/launch/provider/" in html
    assert "s3cret" not in html
    assert 'data-copy="provider_launch_url-' in html


async def test_bad_url_form_is_shown_again_with_the_error(config_portal: ConfigPortal) -> None:
    """A refused form comes back as 422 with the message, the values, and no secret."""
    p = config_portal
    fields = _form(p) | {"fhir_base_url": "https://10.0.0.7/r4/x"}
    status, _, html = await _post_form(p, CONTOSO_ADMIN, "/fhir-urls", fields)
    assert status == 422
    assert "private network address" in html
    assert "https://10.0.0.7/r4/x" in html
    assert "s3cret" not in html


async def test_unusable_private_key_form_is_shown_again_with_the_error(
    config_portal: ConfigPortal,
) -> None:
    """A private key the library cannot load comes back as a 422 page, not a 500."""
    p = config_portal
    pem = unsupported_curve_key()
    fields = _form(p) | {
        "client_auth_method": "private_key_jwt",
        "client_secret": "",
        "private_key": pem,
    }
    status, _, html = await _post_form(p, CONTOSO_ADMIN, "/fhir-urls", fields)
    assert status == 422, html[:300]
    assert "not an unencrypted PEM private key" in html
    assert pem.splitlines()[1] not in html
    assert (await table_counts(p.settings))["integrations"] == 0


async def test_form_checkboxes_become_booleans(config_portal: ConfigPortal) -> None:
    """The forms' checkboxes ("on" or absent) still save, though the API takes only booleans."""
    p = config_portal
    fields = {k: v for k, v in _form(p).items() if k != "enabled"}
    status, location, _ = await _post_form(p, CONTOSO_ADMIN, "/fhir-urls", fields)
    assert status == 303
    integration_id = location.split("?")[0].rsplit("/", 1)[1]
    _, created = await p.call(CONTOSO_ADMIN, "GET", f"/api/integrations/{integration_id}")
    assert created["enabled"] is False
    consents = {
        "enabled": "on",
        "vendor_may_send_sms": "on",
        "organisation_has_patient_consent": "on",
    }
    status, _, _ = await _post_form(p, CONTOSO_ADMIN, "/sms", consents)
    assert status == 303
    _, sms = await p.call(CONTOSO_ADMIN, "GET", "/api/sms")
    assert sms["enabled"] is True
    assert sms["vendor_may_send_sms"] is True
    assert sms["organisation_has_patient_consent"] is True


async def test_form_without_csrf_token_is_refused(config_portal: ConfigPortal) -> None:
    """Every state-changing form needs the CSRF token: 403 page, nothing changed."""
    p = config_portal
    before = await table_counts(p.settings)
    for path, fields in (
        ("/fhir-urls", _form(p)),
        ("/sms", {"enabled": "on", "vendor_may_send_sms": "on"}),
        ("/phone-numbers", {}),
        ("/allocation", {"monthly_allocation": "10"}),
    ):
        status, _, html = await _post_form(p, CONTOSO_ADMIN, path, fields, csrf=False)
        assert status == 403, path
        assert "security token" in html
    assert await table_counts(p.settings) == before


async def test_reader_sees_read_only_pages(config_portal: ConfigPortal) -> None:
    """A Global Reader sees the pages without forms, and a form post gets the 403 page."""
    p = config_portal
    await _post_form(p, CONTOSO_ADMIN, "/fhir-urls", _form(p))
    status, html = await _page(p, CONTOSO_READER, "/fhir-urls")
    assert status == 200
    assert "only a Global Administrator can change it" in html
    assert 'id="integration-form"' not in html
    status, _, html = await _post_form(
        p, CONTOSO_READER, "/allocation", {"monthly_allocation": "1"}
    )
    assert status == 403
    assert "Global Administrator" in html


async def test_other_tenant_gets_404_pages(config_portal: ConfigPortal) -> None:
    """A Fabrikam admin cannot open or change a Contoso URL's page, and lists none of them."""
    p = config_portal
    _, location, _ = await _post_form(p, CONTOSO_ADMIN, "/fhir-urls", _form(p))
    page = location.split("?", 1)[0]
    status, _ = await _page(p, FABRIKAM_ADMIN, page)
    assert status == 404
    status, _, _ = await _post_form(p, FABRIKAM_ADMIN, f"{page}/remove", {})
    assert status == 404
    status, _, _ = await _post_form(p, FABRIKAM_ADMIN, f"{page}/enabled", {"enabled": "off"})
    assert status == 404
    for listing in ("/fhir-urls", "/records", "/audit"):
        status, html = await _page(p, FABRIKAM_ADMIN, listing)
        assert status == 200
        assert p.fhir_base() not in html, listing
    status, html = await _page(p, CONTOSO_ADMIN, page)
    assert status == 200


async def test_signed_out_browser_is_sent_to_sign_in(config_portal: ConfigPortal) -> None:
    """Pages redirect a signed-out browser to Microsoft sign-in, keeping the way back."""
    p = config_portal
    status, html = await _page(p, None, "/")
    assert status == 200
    assert "Sign in with Microsoft" in html
    async with p.http.get(
        f"{p.url}/records", headers={"Accept": "text/html"}, allow_redirects=False
    ) as r:
        assert r.status == 302
        assert r.headers["Location"] == "/auth/login?return_to=/records"


async def test_pages_send_hardening_headers(config_portal: ConfigPortal) -> None:
    """Pages forbid framing and inline scripts (the portal's JS is a same-origin file)."""
    p = config_portal
    async with p.http.get(f"{p.url}/", headers={"Accept": "text/html"}) as r:
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        html = await r.text()
    assert "<script>" not in html
    async with p.http.get(f"{p.url}/static/portal.js") as r:
        assert r.status == 200


async def test_audit_page_shows_changes_with_secrets_masked(config_portal: ConfigPortal) -> None:
    """The audit page lists who changed what, and never a secret."""
    p = config_portal
    await _post_form(p, CONTOSO_ADMIN, "/fhir-urls", _form(p))
    await _post_form(p, CONTOSO_ADMIN, "/allocation", {"monthly_allocation": "250"})
    status, html = await _page(p, CONTOSO_ADMIN, "/audit")
    assert status == 200
    assert "integration.created" in html
    assert "allocation.updated" in html
    assert CONTOSO_ADMIN in html
    assert "s3cret" not in html
