"""Scheduling feed ingress (docs/ehr-scheduling.md): the EHR tells us an appointment was
booked, moved or cancelled. Signed webhook; the signature is checked over the raw bytes before
anything is parsed, and each event_id is applied once."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
import phonenumbers
import structlog
from aiohttp import web
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from libs.common.events import (
    AppointmentCancelledV1,
    AppointmentRescheduledV1,
    AppointmentRescheduledV2,
    Topic,
    make_event,
)
from libs.common.keys import appointment_key
from libs.common.outbox import enqueue
from libs.common.web import DB_POOL
from services.launch.fhir import Appointment
from services.launch.meeting_pace import MEETING_PACE
from services.launch.meeting_preparation import MEETING_WAKE
from services.launch.meetings import Visit, known_appointment, record_booking
from services.launch.state import INTEGRATIONS, field_cipher, launch_settings

log = structlog.get_logger(__name__)

_SIGNATURE = re.compile(r"^t=(\d{1,12})((?:,v1=[0-9a-f]{64})+)$")
_TENANT = re.compile(r"^[A-Za-z0-9-]{1,64}$")


class PatientContact(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    phone: str | None = Field(default=None, max_length=32)


class SchedulingEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: uuid.UUID
    event: Literal["booked", "rescheduled", "cancelled"]
    tenant: str = Field(pattern=_TENANT.pattern)
    fhir_base: str = Field(max_length=2048)
    occurred_at: AwareDatetime
    appointment: Appointment
    patient_contact: PatientContact | None = None


def _secrets_for(tenant: str, configured: str) -> list[str]:
    table = orjson.loads(configured)
    return [str(s) for s in (table.get(tenant), table.get("*")) if s]


def signature_valid(header: str, body: bytes, secrets: list[str], max_skew_s: int) -> bool:
    match = _SIGNATURE.match(header)
    if match is None:
        return False
    timestamp = int(match.group(1))
    if abs(time.time() - timestamp) > max_skew_s:
        return False
    presented = match.group(2).split(",v1=")[1:]
    for secret in secrets:
        expected = hmac.new(
            secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
        ).hexdigest()
        if any(hmac.compare_digest(expected, candidate) for candidate in presented):
            return True
    return False


def normalised_phone(raw: str | None) -> str | None:
    """E.164, or None when absent or invalid (then no SMS; the number is never logged)."""
    if not raw:
        return None
    try:
        number = phonenumbers.parse(raw, "US")
    except phonenumbers.NumberParseException:
        log.info("patient phone refused", reason="unparseable")
        return None
    if not phonenumbers.is_valid_number(number):
        log.info("patient phone refused", reason="invalid")
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _problem(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def receive_scheduling_event(request: web.Request) -> web.Response:
    settings = launch_settings(request)
    body = await request.read()
    tenant = request.headers.get("X-EHR-Tenant", "")
    secrets = (
        _secrets_for(tenant, settings.scheduling_webhook_secrets.get_secret_value())
        if _TENANT.match(tenant)
        else []
    )
    if not secrets or not signature_valid(
        request.headers.get("X-EHR-Signature", ""), body, secrets, settings.scheduling_max_skew_s
    ):
        log.warning("scheduling event refused", reason="bad or missing signature")
        return _problem(401, "missing, stale or wrong X-EHR-Signature")
    try:
        event = SchedulingEvent.model_validate_json(body)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"][:2]) for e in exc.errors()})
        named = ", ".join(f for f in fields[:5] if f) or "not an event object"
        return _problem(422, f"invalid scheduling event: {named}")
    if event.tenant != tenant:
        return _problem(422, "X-EHR-Tenant does not match the event's tenant")
    if event.fhir_base.rsplit("/", 1)[-1] != tenant:
        # The secret vouches for one tenant, whose GUID ends its FHIR base: without this,
        # a holder of tenant A's secret could book or cancel tenant B's visits.
        log.warning("scheduling event for another tenant's FHIR base", tenant=tenant)
        return _problem(422, "the event's fhir_base does not belong to X-EHR-Tenant")
    integration = await request.app[INTEGRATIONS].by_fhir_base(event.fhir_base)
    if integration is None:
        log.warning("scheduling event for an unconfigured FHIR base", tenant=tenant)
        return _problem(422, "this FHIR base URL is not configured for the Teams connector")
    # Only a signed, valid event for a configured integration makes the feed count as busy.
    request.app[MEETING_PACE].feed.note()
    # No read for a duplicate first: each change below records its delivery in the statement
    # or transaction that applies it and answers "duplicate" itself, so a new event (the
    # usual case) costs one round trip less.
    pool = request.app[DB_POOL]
    appointment = event.appointment
    with structlog.contextvars.bound_contextvars(scheduling_event=str(event.event_id)):
        if not appointment.is_video_visit:
            status = await pool.execute(
                "INSERT INTO scheduling_deliveries (event_id) VALUES ($1) ON CONFLICT DO NOTHING",
                event.event_id,
            )
            if status != "INSERT 0 1":
                return web.json_response({"status": "duplicate"})
            return web.json_response({"status": "ignored: not a video visit"})
        times = appointment.times
        if times is None:
            return _problem(422, "invalid scheduling event: appointment start/end")
        key = appointment_key(
            settings.appointment_key_secret.get_secret_value(),
            integration.integration_id,
            appointment.id,
        )
        visit = Visit(
            appointment_key=key,
            integration=integration,
            department=appointment.department(integration.department),
            starts_at=times[0],
            ends_at=times[1],
            time_zone=settings.default_time_zone,
            schedule_version=appointment.schedule_version,
        )
        if event.event == "cancelled" or appointment.status == "cancelled":
            outcome = await _cancel(request, event, visit)
        elif event.event == "rescheduled" and await known_appointment(pool, key):
            outcome = await _reschedule(request, event, visit)
        else:
            outcome = await _book(request, event, visit)
    log.info("scheduling event applied", change=event.event, outcome=outcome, appointment_key=key)
    return web.json_response({"status": outcome, "appointment_key": key})


async def _book(request: web.Request, event: SchedulingEvent, visit: Visit) -> str:
    settings = launch_settings(request)
    encrypted = _encrypted_phone(request, event, visit)
    # No Graph call here: the confirmation carries our own join link, and the meeting is
    # prepared afterwards (meeting_preparation.py), so the EHR's feed never waits on Graph.
    # An appointment known already (a provider launched it first, or the EHR re-sent the
    # booking) gets no second appointment-created.
    outcome = await record_booking(request.app[DB_POOL], settings, visit, event.event_id, encrypted)
    if outcome == "booked":
        _wake_for_meeting(request, visit.starts_at)
    return outcome


def _encrypted_phone(request: web.Request, event: SchedulingEvent, visit: Visit) -> str | None:
    """The patient's number as ciphertext for notify. It is needed only to text the patient:
    with SMS off it is not even encrypted."""
    if not visit.integration.sms_enabled or event.patient_contact is None:
        return None
    phone = normalised_phone(event.patient_contact.phone)
    if phone is None:
        return None
    return field_cipher(request).encrypt(phone, f"patient-phone:{visit.appointment_key}")


def _wake_for_meeting(request: web.Request, starts_at: datetime) -> None:
    """Wakes the worker for a visit without its meeting that is due one, if it is urgent or
    the worker may start it now: during a burst the rest are found by the worker's paced
    rounds, so the burst does not turn into a worker round per booking."""
    settings = launch_settings(request)
    now = datetime.now(UTC)
    if starts_at < now + timedelta(minutes=settings.meeting_lead_minutes) and (
        starts_at < now + timedelta(minutes=settings.meeting_urgent_minutes)
        or request.app[MEETING_PACE].allowance.has_room()
    ):
        request.app[MEETING_WAKE].set()


async def _reschedule(request: web.Request, event: SchedulingEvent, visit: Visit) -> str:
    async with request.app[DB_POOL].acquire() as conn, conn.transaction():
        if not await _first_delivery(conn, event.event_id):
            return "duplicate"
        # Only a booked visit moves: a cancelled one stays cancelled whatever the version (the
        # EHR books a new appointment to revive one), keeps its times, and publishes nothing.
        # A visit whose Teams meeting is made is marked in the same UPDATE for the meeting
        # worker to move the meeting in Graph (no Graph call here); one without a meeting yet
        # gets it made with the new times.
        # `was_over`: the end recorded before this move has passed, or will have by the time
        # notify applies the move, so notify has erased the number (or will have).
        moved = await conn.fetchrow(
            "UPDATE appointments a SET starts_at = $2, ends_at = $3, schedule_version = $4,"
            " meeting_times_stale = a.meeting_id IS NOT NULL, updated_at = now()"
            " FROM (SELECT appointment_key, ends_at FROM appointments"
            "  WHERE appointment_key = $1 FOR UPDATE) AS before"
            " WHERE a.appointment_key = before.appointment_key AND a.status = 'booked'"
            " AND a.schedule_version < $4"
            " RETURNING a.meeting_times_stale, a.meeting_id IS NULL AS unmade,"
            " before.ends_at < now() + $5::interval AS was_over",
            visit.appointment_key,
            visit.starts_at,
            visit.ends_at,
            visit.schedule_version,
            _PURGE_MARGIN,
        )
        if moved is None:
            return await _unmoved(conn, visit.appointment_key)
        # Only to a visit not over by its new times: correcting a past visit texts nobody.
        wanted = moved["was_over"] and visit.ends_at > datetime.now(UTC)
        payload = _moved(visit, _encrypted_phone(request, event, visit) if wanted else None)
        await enqueue(
            conn,
            make_event(
                Topic.APPOINTMENT_RESCHEDULED,
                visit.integration.tenant_id,
                visit.appointment_key,
                payload,
            ),
        )
    if moved["meeting_times_stale"]:
        request.app[MEETING_WAKE].set()
    elif moved["unmade"]:
        _wake_for_meeting(request, visit.starts_at)
    return "rescheduled"


# How close to its recorded end a move carries the number: notify erases it at that end by
# its own clock, and may apply the move hours late (an outage, a backlog, a rollout); a copy
# it does not need is dropped (it keeps a number only over none).
_PURGE_MARGIN = timedelta(hours=6)


def _moved(visit: Visit, phone_encrypted: str | None) -> AppointmentRescheduledV1:
    """The move's event: V2, with the number, only for a visit notify no longer holds it for
    (consumers of the previous release know V1 only; docs/deploy.md)."""
    move = AppointmentRescheduledV1(
        integration_id=visit.integration.integration_id,
        starts_at=visit.starts_at,
        ends_at=visit.ends_at,
        time_zone=visit.time_zone,
        schedule_version=visit.schedule_version,
    )
    if phone_encrypted is None:
        return move
    return AppointmentRescheduledV2(**move.model_dump(), patient_phone_encrypted=phone_encrypted)


async def _unmoved(conn: Any, key: str) -> str:
    """Why a reschedule changed nothing: the visit is cancelled (said first, whatever the
    versions), or the move is not newer than the times the visit has."""
    status = await conn.fetchval("SELECT status FROM appointments WHERE appointment_key = $1", key)
    return "ignored: cancelled" if status == "cancelled" else "stale"


async def _cancel(request: web.Request, event: SchedulingEvent, visit: Visit) -> str:
    async with request.app[DB_POOL].acquire() as conn, conn.transaction():
        if not await _first_delivery(conn, event.event_id):
            return "duplicate"
        status = await conn.execute(
            "UPDATE appointments SET status = 'cancelled',"
            " schedule_version = GREATEST(schedule_version + 1, $2), updated_at = now()"
            " WHERE appointment_key = $1 AND status <> 'cancelled'",
            visit.appointment_key,
            visit.schedule_version,
        )
        if status != "UPDATE 1":
            return "not known or already cancelled"
        version = await conn.fetchval(
            "SELECT schedule_version FROM appointments WHERE appointment_key = $1",
            visit.appointment_key,
        )
        payload = AppointmentCancelledV1(
            integration_id=visit.integration.integration_id,
            reason_code="cancelled-in-ehr",
            schedule_version=int(version),
        )
        await enqueue(
            conn,
            make_event(
                Topic.APPOINTMENT_CANCELLED,
                visit.integration.tenant_id,
                visit.appointment_key,
                payload,
            ),
        )
    return "cancelled"


async def _first_delivery(conn: Any, event_id: uuid.UUID) -> bool:
    status = await conn.execute(
        "INSERT INTO scheduling_deliveries (event_id) VALUES ($1) ON CONFLICT DO NOTHING", event_id
    )
    return bool(status == "INSERT 0 1")
