from __future__ import annotations

import asyncio
import time
import uuid

from libs.common.events import IntegrationConfigV1, TenantSettingsV1, decode_event
from sandbox.microsoft.directory import CONTOSO_TENANT
from services.config.propagation import secret_purpose
from tests.config.conftest import CONTOSO_ADMIN, ConfigPortal
from tests.support.kafka_reader import read_all, read_all_records

SECRET = "s3cret-from-code-console"


async def test_integration_config_event_carries_no_secret_in_clear(
    config_portal: ConfigPortal,
) -> None:
    """The event is keyed by integration id, tenant-stamped, and holds the secret only as
    ciphertext that decrypts for this integration's purpose."""
    p = config_portal
    started = time.monotonic()
    _, created = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", p.integration())
    records = await read_all_records(p.settings.topic("integration-config"), expect=1)
    # Well under a second here; the bound leaves room for a loaded CI machine.
    assert time.monotonic() - started < 20, "propagation took over 20 s"
    assert len(records) == 1
    record = records[0]
    assert SECRET.encode() not in record.value
    assert record.key == created["id"].encode()
    event = decode_event(record.value)
    assert event.tenant_id == CONTOSO_TENANT
    assert event.key == created["id"]
    payload = event.payload
    assert isinstance(payload, IntegrationConfigV1)
    assert payload.integration_id == uuid.UUID(created["id"])
    assert payload.fhir_base_url == p.fhir_base()
    assert payload.ms_tenant_id == CONTOSO_TENANT
    assert payload.enabled is True
    assert payload.sms_enabled is False
    assert payload.client_secret_encrypted is not None
    cipher = p.settings.field_cipher()
    purpose = secret_purpose(payload.integration_id)
    assert cipher.decrypt(payload.client_secret_encrypted, purpose) == SECRET
    assert payload.config_version == created["config_version"]


async def test_every_change_publishes_a_newer_version(config_portal: ConfigPortal) -> None:
    """Edit, disable and remove each publish; versions rise; removal says deleted."""
    p = config_portal
    _, created = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", p.integration())
    path = f"/api/integrations/{created['id']}"
    await p.call(CONTOSO_ADMIN, "PUT", path, p.integration(department="Oncology"))
    await p.call(CONTOSO_ADMIN, "PUT", path, p.integration(enabled=False))
    await p.call(CONTOSO_ADMIN, "DELETE", path)
    events = [
        decode_event(raw) for raw in await read_all(p.settings.topic("integration-config"), 4)
    ]
    payloads = [e.payload for e in events]
    assert all(isinstance(x, IntegrationConfigV1) for x in payloads)
    versions = [x.config_version for x in payloads]
    assert versions == sorted(versions)
    assert len(set(versions)) == 4
    assert [x.department for x in payloads] == [
        "Cardiology",
        "Oncology",
        "Cardiology",
        "Cardiology",
    ]
    assert [x.enabled for x in payloads] == [True, True, False, False]
    assert [x.deleted for x in payloads] == [False, False, False, True]
    assert payloads[-1].client_secret_encrypted is None


async def test_allocation_publishes_tenant_settings(config_portal: ConfigPortal) -> None:
    """Setting the monthly allocation publishes tenant-settings keyed by the tenant id."""
    p = config_portal
    status, saved = await p.call(
        CONTOSO_ADMIN, "PUT", "/api/allocation", {"monthly_allocation": 1200}
    )
    assert status == 200
    assert saved["monthly_allocation"] == 1200
    status, body = await p.call(CONTOSO_ADMIN, "GET", "/api/allocation")
    assert body == saved
    await p.call(CONTOSO_ADMIN, "PUT", "/api/allocation", {"monthly_allocation": 1500})
    records = await read_all_records(p.settings.topic("tenant-settings"), expect=2)
    events = [decode_event(r.value) for r in records]
    assert [r.key for r in records] == [CONTOSO_TENANT.encode()] * 2
    assert all(isinstance(e.payload, TenantSettingsV1) for e in events)
    assert [e.payload.monthly_allocation for e in events] == [1200, 1500]
    assert events[0].payload.config_version < events[1].payload.config_version
    _, audit = await p.call(CONTOSO_ADMIN, "GET", "/api/audit")
    assert audit["entries"][0]["before"] == {"monthly_allocation": 1200}
    assert audit["entries"][0]["after"] == {"monthly_allocation": 1500}


async def test_bad_allocation_is_refused(config_portal: ConfigPortal) -> None:
    """Negative, fractional, textual and huge allocations get 422 and publish nothing."""
    p = config_portal
    for bad in (-1, 1.5, "100", 10**12, None):
        status, _ = await p.call(
            CONTOSO_ADMIN, "PUT", "/api/allocation", {"monthly_allocation": bad}
        )
        assert status == 422, bad
    status, body = await p.call(CONTOSO_ADMIN, "GET", "/api/allocation")
    assert body["monthly_allocation"] is None


async def test_concurrent_edits_keep_versions_unique(config_portal: ConfigPortal) -> None:
    """Parallel saves of one integration each get their own, increasing config_version."""
    p = config_portal
    _, created = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", p.integration())
    path = f"/api/integrations/{created['id']}"
    answers = await asyncio.gather(
        *(p.call(CONTOSO_ADMIN, "PUT", path, p.integration(department=f"D{i}")) for i in range(5))
    )
    assert all(status == 200 for status, _ in answers)
    events = [
        decode_event(raw) for raw in await read_all(p.settings.topic("integration-config"), 6)
    ]
    versions = [e.payload.config_version for e in events]
    assert len(set(versions)) == 6
    _, final = await p.call(CONTOSO_ADMIN, "GET", path)
    newest = max(events, key=lambda e: e.payload.config_version).payload
    assert isinstance(newest, IntegrationConfigV1)
    assert newest.department == final["department"]
