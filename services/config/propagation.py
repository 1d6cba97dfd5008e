"""Tells the launch and notify services about every change, in the change's transaction.

Each change enqueues (outbox) the full, current state of what it touched: an
`integration-config` event per integration (keyed by integration id) and a `tenant-settings`
event for the allocation (keyed by tenant id). Both topics are compacted, so a consumer that
starts late still learns the latest state; `config_version` comes from one sequence, so
"keep the highest version" is right for every key, across restarts.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from libs.common.events import IntegrationConfigV1, TenantSettingsV1, Topic, make_event
from libs.common.outbox import enqueue

if TYPE_CHECKING:
    import asyncpg

    from libs.common.db import Connection


def secret_purpose(integration_id: uuid.UUID) -> str:
    return f"integration-secret:{integration_id}"


async def lock_tenant(conn: Connection, tenant_id: str) -> asyncpg.Record:
    """Serialises a tenant's configuration changes: SMS consent applies to every integration
    of the tenant, so two changes must never interleave their reads and writes."""
    await conn.execute(
        "INSERT INTO tenant_settings (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING", tenant_id
    )
    row = await conn.fetchrow(
        "SELECT * FROM tenant_settings WHERE tenant_id = $1 FOR UPDATE", tenant_id
    )
    assert row is not None
    return row


def sms_allowed(tenant: asyncpg.Record) -> bool:
    return bool(
        tenant["sms_enabled"]
        and tenant["sms_vendor_consent_at"] is not None
        and tenant["sms_patient_consent_at"] is not None
    )


def integration_payload(
    row: asyncpg.Record | dict[str, Any],
    tenant: asyncpg.Record,
    from_number: str | None,
    version: int,
    *,
    deleted: bool = False,
) -> IntegrationConfigV1:
    basic = row["client_auth_method"] == "client_secret_basic"
    return IntegrationConfigV1(
        integration_id=row["id"],
        config_version=version,
        deleted=deleted,
        fhir_base_url=row["fhir_base_url"],
        environment=row["environment"],
        enabled=row["enabled"] and not deleted,
        department=row["department"],
        organisation_name=row["organisation_name"],
        ms_tenant_id=row["tenant_id"],
        smart_client_id=row["smart_client_id"],
        client_auth_method=row["client_auth_method"],
        client_secret_encrypted=None if deleted or not basic else row["client_secret_encrypted"],
        private_key_encrypted=None if deleted or basic else row["private_key_encrypted"],
        pkce_mode=row["pkce_mode"],
        teams_organizer_id=row["teams_organizer_id"],
        sms_enabled=sms_allowed(tenant) and from_number is not None and not deleted,
        sms_from_number=from_number,
    )


async def publish_integration(
    conn: Connection, tenant: asyncpg.Record, integration_id: Any
) -> None:
    row = await conn.fetchrow(
        "SELECT i.*, p.e164 AS from_number FROM integrations i"
        " LEFT JOIN phone_numbers p ON p.id = i.phone_number_id AND p.status = 'active'"
        " WHERE i.id = $1 AND i.tenant_id = $2",
        integration_id,
        tenant["tenant_id"],
    )
    assert row is not None
    version = int(await conn.fetchval("SELECT nextval('config_version_seq')"))
    await conn.execute(
        "UPDATE integrations SET config_version = $2 WHERE id = $1", row["id"], version
    )
    payload = integration_payload(row, tenant, row["from_number"], version)
    await enqueue(
        conn, make_event(Topic.INTEGRATION_CONFIG, row["tenant_id"], str(row["id"]), payload)
    )


async def publish_integration_removed(
    conn: Connection, tenant: asyncpg.Record, row: asyncpg.Record
) -> None:
    version = int(await conn.fetchval("SELECT nextval('config_version_seq')"))
    payload = integration_payload(row, tenant, None, version, deleted=True)
    await enqueue(
        conn, make_event(Topic.INTEGRATION_CONFIG, row["tenant_id"], str(row["id"]), payload)
    )


async def publish_tenant_integrations(conn: Connection, tenant: asyncpg.Record) -> int:
    ids = await conn.fetch(
        "SELECT id FROM integrations WHERE tenant_id = $1 ORDER BY created_at FOR UPDATE",
        tenant["tenant_id"],
    )
    for item in ids:
        await publish_integration(conn, tenant, item["id"])
    return len(ids)


async def publish_tenant_settings(conn: Connection, tenant_id: str, allocation: int) -> int:
    version = int(await conn.fetchval("SELECT nextval('config_version_seq')"))
    await conn.execute(
        "UPDATE tenant_settings SET allocation_config_version = $2 WHERE tenant_id = $1",
        tenant_id,
        version,
    )
    payload = TenantSettingsV1(monthly_allocation=allocation, config_version=version)
    await enqueue(conn, make_event(Topic.TENANT_SETTINGS, tenant_id, tenant_id, payload))
    return version
