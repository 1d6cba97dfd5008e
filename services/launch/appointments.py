"""Scheduling ingress: a booked video visit becomes an appointment row and an
`appointment-created` event, in one transaction."""

from __future__ import annotations

import hmac
import uuid
from typing import TYPE_CHECKING
from zoneinfo import available_timezones

from aiohttp import web
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from libs.common.events import AppointmentCreatedV1, Environment, Topic, make_event
from libs.common.keys import appointment_key
from libs.common.outbox import enqueue
from libs.common.web import DB_POOL, SETTINGS
from services.launch.settings import LaunchSettings

if TYPE_CHECKING:
    from libs.common.db import Connection

_TIME_ZONES = frozenset(available_timezones())


class BookedAppointment(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    tenant_id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")
    integration_id: uuid.UUID
    fhir_appointment_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9.-]+$")
    environment: Environment
    department: str = Field(min_length=1, max_length=200)
    starts_at: AwareDatetime
    ends_at: AwareDatetime
    time_zone: str = Field(max_length=64)

    @model_validator(mode="after")
    def _coherent(self) -> BookedAppointment:
        if self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        if self.time_zone not in _TIME_ZONES:
            raise ValueError("time_zone must be an IANA time zone name")
        return self


async def record_booking(conn: Connection, booking: BookedAppointment, key: str) -> bool:
    """Insert the appointment and its event; False when it was already known."""
    async with conn.transaction():
        status = await conn.execute(
            "INSERT INTO appointments (appointment_key, tenant_id, integration_id, environment,"
            " department, starts_at, ends_at, time_zone) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)"
            " ON CONFLICT (appointment_key) DO NOTHING",
            key,
            booking.tenant_id,
            booking.integration_id,
            booking.environment,
            booking.department,
            booking.starts_at,
            booking.ends_at,
            booking.time_zone,
        )
        if status != "INSERT 0 1":
            return False
        payload = AppointmentCreatedV1(
            integration_id=booking.integration_id,
            environment=booking.environment,
            department=booking.department,
            starts_at=booking.starts_at,
            ends_at=booking.ends_at,
            time_zone=booking.time_zone,
        )
        await enqueue(conn, make_event(Topic.APPOINTMENT_CREATED, booking.tenant_id, key, payload))
        return True


def _authorised(request: web.Request, settings: LaunchSettings) -> bool:
    expected = f"Bearer {settings.scheduling_api_token.get_secret_value()}"
    presented = request.headers.get("Authorization", "")
    return hmac.compare_digest(presented.encode(), expected.encode())


async def post_appointment(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    assert isinstance(settings, LaunchSettings)
    if not _authorised(request, settings):
        raise web.HTTPUnauthorized(
            text="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    try:
        booking = BookedAppointment.model_validate_json(await request.read())
    except ValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]), "problem": e["msg"]} for e in exc.errors()
        ]
        return web.json_response({"error": "invalid appointment", "problems": problems}, status=422)
    key = appointment_key(
        settings.appointment_key_secret.get_secret_value(),
        booking.integration_id,
        booking.fhir_appointment_id,
    )
    async with request.app[DB_POOL].acquire() as conn:
        created = await record_booking(conn, booking, key)
    return web.json_response(
        {"appointment_key": key, "created": created}, status=201 if created else 200
    )
