"""Consumes `appointment-created` into notify's own table, once per appointment."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from libs.common.events import AppointmentCreatedV1, Envelope

if TYPE_CHECKING:
    from libs.common.db import Connection


async def on_appointment_created(conn: Connection, event: Envelope[Any]) -> None:
    payload = event.payload
    assert isinstance(payload, AppointmentCreatedV1)
    # A confirmation is only owed when the organisation enabled SMS and gave both consents.
    await conn.execute(
        "INSERT INTO appointments (appointment_key, tenant_id, integration_id, starts_at,"
        " ends_at, time_zone, sms_enabled, schedule_version, confirmation)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7,$8, CASE WHEN $7 THEN 'pending' ELSE 'skipped' END)"
        " ON CONFLICT (appointment_key) DO UPDATE SET"
        "  starts_at = excluded.starts_at, ends_at = excluded.ends_at,"
        "  schedule_version = excluded.schedule_version"
        " WHERE appointments.schedule_version < excluded.schedule_version",
        event.key,
        event.tenant_id,
        payload.integration_id,
        payload.starts_at,
        payload.ends_at,
        payload.time_zone,
        payload.sms_enabled,
        payload.schedule_version,
    )
