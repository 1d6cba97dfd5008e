from __future__ import annotations

from typing import Any

from libs.common.events import IntegrationConfigV1, decode_event
from tests.config.conftest import CONTOSO_ADMIN, CONTOSO_ADMIN_OID, ConfigPortal, table_counts
from tests.config.test_numbers_api import wait_for_number
from tests.support.kafka_reader import read_all


def _sms(enabled: bool, vendor: bool, patients: bool) -> dict[str, Any]:
    return {
        "enabled": enabled,
        "vendor_may_send_sms": vendor,
        "organisation_has_patient_consent": patients,
    }


async def test_sms_needs_both_consents(config_portal: ConfigPortal) -> None:
    """Switching SMS on with one consent, or none, is refused and changes nothing."""
    p = config_portal
    for body in (_sms(True, True, False), _sms(True, False, True), _sms(True, False, False)):
        status, answer = await p.call(CONTOSO_ADMIN, "PUT", "/api/sms", body)
        assert status == 422
        assert "both consent" in answer["error"]
    _, state = await p.call(CONTOSO_ADMIN, "GET", "/api/sms")
    assert state["enabled"] is False
    assert (await table_counts(p.settings))["audit_log"] == 0


async def test_consents_need_real_booleans(config_portal: ConfigPortal) -> None:
    """Consents given as "yes", "on" or 1 instead of true are refused and change nothing."""
    p = config_portal
    before = await table_counts(p.settings)
    status, answer = await p.call(
        CONTOSO_ADMIN,
        "PUT",
        "/api/sms",
        {"enabled": "on", "vendor_may_send_sms": "yes", "organisation_has_patient_consent": 1},
    )
    assert status == 422, answer
    assert await table_counts(p.settings) == before
    _, state = await p.call(CONTOSO_ADMIN, "GET", "/api/sms")
    assert state["vendor_consent_by"] is None


async def test_consents_record_who_and_when(config_portal: ConfigPortal) -> None:
    """Each consent keeps the admin's object id and the time it was given."""
    p = config_portal
    status, state = await p.call(CONTOSO_ADMIN, "PUT", "/api/sms", _sms(True, True, True))
    assert status == 200, state
    assert state["enabled"] is True
    assert state["vendor_consent_by"] == CONTOSO_ADMIN_OID
    assert state["patient_consent_by"] == CONTOSO_ADMIN_OID
    assert state["vendor_consent_at"]
    assert state["patient_consent_at"]
    _, audit = await p.call(CONTOSO_ADMIN, "GET", "/api/audit")
    assert audit["entries"][0]["action"] == "sms.updated"
    assert audit["entries"][0]["after"]["enabled"] is True


async def test_consent_withdrawn_switches_sms_off_at_once(config_portal: ConfigPortal) -> None:
    """Unticking one consent turns SMS off, even if the form still asks for SMS on, and the
    integration-config event on Kafka says sms_enabled false."""
    p = config_portal
    _, created = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", p.integration())
    _, job = await p.call(CONTOSO_ADMIN, "POST", "/api/phone-numbers")
    number = await wait_for_number(p, CONTOSO_ADMIN, job["id"], "active")
    await p.call(
        CONTOSO_ADMIN, "PUT", f"/api/phone-numbers/{job['id']}/links",
        {"integration_ids": [created["id"]]},
    )  # fmt: skip
    status, state = await p.call(CONTOSO_ADMIN, "PUT", "/api/sms", _sms(True, True, True))
    assert status == 200
    status, state = await p.call(CONTOSO_ADMIN, "PUT", "/api/sms", _sms(True, True, False))
    assert status == 200, state
    assert state["enabled"] is False
    assert state["organisation_has_patient_consent"] is False
    assert state["patient_consent_by"] is None
    assert state["vendor_may_send_sms"] is True
    raw = await read_all(p.settings.topic("integration-config"), expect=4)
    payloads = [decode_event(r).payload for r in raw]
    assert all(isinstance(x, IntegrationConfigV1) for x in payloads)
    newest = max(payloads, key=lambda x: x.config_version)
    assert isinstance(newest, IntegrationConfigV1)
    by_version = sorted(payloads, key=lambda x: x.config_version)
    # created (no number) -> linked (SMS not yet on) -> SMS on -> consent withdrawn
    assert [x.sms_enabled for x in by_version] == [False, False, True, False]
    assert newest.sms_from_number == number["phone_number"]
    assert newest.sms_enabled is False


async def test_sms_off_keeps_consents(config_portal: ConfigPortal) -> None:
    """Switching SMS off alone keeps both consents on record."""
    p = config_portal
    await p.call(CONTOSO_ADMIN, "PUT", "/api/sms", _sms(True, True, True))
    status, state = await p.call(CONTOSO_ADMIN, "PUT", "/api/sms", _sms(False, True, True))
    assert status == 200
    assert state["enabled"] is False
    assert state["vendor_may_send_sms"]
    assert state["organisation_has_patient_consent"]
