"""Folds events into per-appointment facts, idempotently."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from libs.common.events import AppointmentCreatedV1, Envelope

if TYPE_CHECKING:
    from libs.common.db import Connection

APPOINTMENTS_BOOKED = Counter(
    "appointments_booked_total", "Video-visit appointments seen", ["environment"]
)


async def on_appointment_created(conn: Connection, event: Envelope[Any]) -> None:
    payload = event.payload
    assert isinstance(payload, AppointmentCreatedV1)
    status = await conn.execute(
        "INSERT INTO appointment_facts (appointment_key, tenant_id, integration_id, environment,"
        " department, scheduled_start, scheduled_end) VALUES ($1,$2,$3,$4,$5,$6,$7)"
        " ON CONFLICT (appointment_key) DO UPDATE SET department = excluded.department,"
        "  scheduled_start = excluded.scheduled_start, scheduled_end = excluded.scheduled_end,"
        "  updated_at = now()",
        event.key,
        event.tenant_id,
        payload.integration_id,
        payload.environment,
        payload.department,
        payload.starts_at,
        payload.ends_at,
    )
    if status == "INSERT 0 1":
        APPOINTMENTS_BOOKED.labels(payload.environment).inc()
