from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.config.conftest import (
    CONTOSO_ADMIN,
    CONTOSO_READER,
    CONTOSO_REPORTS,
    FABRIKAM_ADMIN,
    ConfigPortal,
    table_counts,
)

SOME_ID = str(uuid.uuid4())


def _changes(p: ConfigPortal, integration_id: str, number_id: str) -> list[tuple[str, str, Any]]:
    return [
        ("POST", "/api/integrations", p.integration()),
        ("PUT", f"/api/integrations/{integration_id}", p.integration(department="X")),
        ("PUT", f"/api/integrations/{integration_id}/enabled", {"enabled": False}),
        ("DELETE", f"/api/integrations/{integration_id}", None),
        ("PUT", "/api/sms", {"enabled": False, "vendor_may_send_sms": True,
                             "organisation_has_patient_consent": False}),
        ("POST", "/api/phone-numbers", None),
        ("POST", f"/api/phone-numbers/{number_id}/retry", None),
        ("PUT", f"/api/phone-numbers/{number_id}/links", {"integration_ids": [integration_id]}),
        ("PUT", "/api/allocation", {"monthly_allocation": 5}),
    ]  # fmt: skip


READS = [
    "/api/integrations",
    "/api/sms",
    "/api/phone-numbers",
    "/api/allocation",
    "/api/audit",
]


async def _seed(p: ConfigPortal) -> tuple[str, str]:
    """One Contoso integration and one (failed-or-running) Contoso phone number job."""
    status, created = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", p.integration())
    assert status == 201, created
    status, number = await p.call(CONTOSO_ADMIN, "POST", "/api/phone-numbers")
    assert status == 202, number
    return created["id"], number["id"]


async def test_reader_may_view_but_not_change(config_portal: ConfigPortal) -> None:
    """A Global Reader reads every endpoint and gets 403 on every change, which changes nothing."""
    p = config_portal
    integration_id, number_id = await _seed(p)
    before = await table_counts(p.settings)
    for path in [*READS, f"/api/integrations/{integration_id}", f"/api/phone-numbers/{number_id}",
                 f"/api/integrations/{integration_id}/records"]:  # fmt: skip
        status, _ = await p.call(CONTOSO_READER, "GET", path)
        assert status == 200, path
    for method, path, body in _changes(p, integration_id, number_id):
        status, answer = await p.call(CONTOSO_READER, method, path, body)
        assert status == 403, (method, path)
        assert "Global Administrator" in answer["error"]
    assert await table_counts(p.settings) == before


async def test_reports_reader_cannot_view_configuration(config_portal: ConfigPortal) -> None:
    """A Reports Reader has no configuration access at all."""
    p = config_portal
    for path in READS:
        status, _ = await p.call(CONTOSO_REPORTS, "GET", path)
        assert status == 403, path


async def test_signed_out_caller_gets_401(config_portal: ConfigPortal) -> None:
    """Without a session every API endpoint answers 401, reads and changes alike."""
    p = config_portal
    for path in READS:
        assert (await p.call(None, "GET", path))[0] == 401
    for method, path, body in _changes(p, SOME_ID, SOME_ID):
        assert (await p.call(None, method, path, body))[0] == 401, (method, path)


async def test_missing_csrf_token_is_refused(config_portal: ConfigPortal) -> None:
    """An admin's change without the X-CSRF-Token header is refused with 403 and changes nothing."""
    p = config_portal
    integration_id, number_id = await _seed(p)
    before = await table_counts(p.settings)
    for method, path, body in _changes(p, integration_id, number_id):
        status, answer = await p.call(CONTOSO_ADMIN, method, path, body, csrf=False)
        assert status == 403, (method, path)
        assert "security token" in answer["error"]
    wrong = {"X-CSRF-Token": "forged"}
    status, _ = await p.call(
        CONTOSO_ADMIN, "PUT", "/api/allocation", {"monthly_allocation": 1}, csrf=False,
        headers={**wrong, "Cookie": f"portal_session={(await p.session(CONTOSO_ADMIN)).cookie}"},
    )  # fmt: skip
    assert status == 403
    assert await table_counts(p.settings) == before


async def test_other_tenant_cannot_see_or_change_records(config_portal: ConfigPortal) -> None:
    """A Fabrikam admin gets 404 for Contoso's ids and sees none of Contoso's records."""
    p = config_portal
    integration_id, number_id = await _seed(p)
    before = await table_counts(p.settings)
    for path in (
        f"/api/integrations/{integration_id}",
        f"/api/integrations/{integration_id}/records",
        f"/api/phone-numbers/{number_id}",
    ):
        status, _ = await p.call(FABRIKAM_ADMIN, "GET", path)
        assert status == 404, path
    for method, path, body in _changes(p, integration_id, number_id)[1:]:
        if path.endswith(("/api/sms", "/api/allocation", "/api/phone-numbers")):
            continue
        status, _ = await p.call(FABRIKAM_ADMIN, method, path, body)
        assert status == 404, (method, path)
    for path, key in (("/api/integrations", "integrations"), ("/api/phone-numbers",
                      "phone_numbers"), ("/api/audit", "entries")):  # fmt: skip
        status, body = await p.call(FABRIKAM_ADMIN, "GET", path)
        assert status == 200
        assert body[key] == [], path
    assert await table_counts(p.settings) == before
    _, mine = await p.call(CONTOSO_ADMIN, "GET", f"/api/integrations/{integration_id}")
    assert mine["department"] == "Cardiology"


async def test_other_tenant_cannot_link_its_number_to_foreign_urls(
    config_portal: ConfigPortal,
) -> None:
    """Linking one's own number to another tenant's integration id is refused (422)."""
    p = config_portal
    contoso_id, _ = await _seed(p)
    status, number = await p.call(FABRIKAM_ADMIN, "POST", "/api/phone-numbers")
    assert status == 202
    from tests.config.test_numbers_api import wait_for_number

    await wait_for_number(p, FABRIKAM_ADMIN, number["id"], "active")
    status, body = await p.call(
        FABRIKAM_ADMIN, "PUT", f"/api/phone-numbers/{number['id']}/links",
        {"integration_ids": [contoso_id]},
    )  # fmt: skip
    assert status == 422, body
    _, contoso = await p.call(CONTOSO_ADMIN, "GET", f"/api/integrations/{contoso_id}")
    assert contoso["phone_number_id"] is None


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "1 OR 1=1", "%00"])
async def test_malformed_ids_are_404(config_portal: ConfigPortal, bad_id: str) -> None:
    """Ids that are not UUIDs are simply not found."""
    p = config_portal
    assert (await p.call(CONTOSO_ADMIN, "GET", f"/api/integrations/{bad_id}"))[0] == 404
    assert (await p.call(CONTOSO_ADMIN, "GET", f"/api/phone-numbers/{bad_id}"))[0] == 404
