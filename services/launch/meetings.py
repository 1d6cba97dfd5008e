"""Find or create the Teams meeting of an appointment, subscribe to its call events, and
record the appointment with its `appointment-created` event the first time only, with or
without its meeting."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

import asyncpg

from libs.common.events import AppointmentCreatedV1, Topic, encode_event, make_event
from services.launch import join_tokens
from services.launch.graph import GraphClient
from services.launch.integrations import Integration
from services.launch.sessions import NewSession, insert_session_sql
from services.launch.settings import LaunchSettings

if TYPE_CHECKING:
    from libs.common.db import Connection


@dataclass(frozen=True)
class Visit:
    """What the gateway knows of one video-visit appointment."""

    appointment_key: str
    integration: Integration
    department: str
    starts_at: datetime
    ends_at: datetime
    time_zone: str
    schedule_version: int = 1

    @classmethod
    def of_row(cls, key: str, integration: Integration, row: asyncpg.Record) -> Visit:
        """The visit as stored in `appointments` (department, times, zone and version)."""
        return cls(
            appointment_key=key,
            integration=integration,
            department=row["department"],
            starts_at=row["starts_at"],
            ends_at=row["ends_at"],
            time_zone=row["time_zone"],
            schedule_version=row["schedule_version"],
        )


@dataclass(frozen=True)
class Meeting:
    meeting_id: str
    organizer_id: str
    join_web_url: str
    patient_join_url: str
    subscription_id: str
    subscription_expires_at: datetime
    client_state_hash: bytes


def client_state_digest(client_state: str) -> bytes:
    return hashlib.sha256(client_state.encode()).digest()


def join_link(settings: LaunchSettings, visit: Visit) -> str:
    expires = visit.ends_at + timedelta(minutes=settings.join_grace_minutes)
    token = join_tokens.mint(
        settings.join_token_secret.get_secret_value(), visit.appointment_key, expires
    )
    return f"{settings.public_base_url.rstrip('/')}/join/{token}"


async def known_appointment(pool: asyncpg.Pool, appointment_key: str) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT 1 FROM appointments WHERE appointment_key = $1", appointment_key
        )
    )


async def create_meeting(graph: GraphClient, settings: LaunchSettings, visit: Visit) -> Meeting:
    """Graph calls only; safe to repeat (createOrGet is idempotent by externalId, and an
    existing meeting found with other times is moved to the visit's)."""
    integration = visit.integration
    meeting, created = await graph.create_or_get_meeting(
        integration.ms_tenant_id,
        integration.teams_organizer_id,
        # The appointment key is already a keyed hash: stable, and not reversible to the
        # FHIR id, so Microsoft never learns the EHR's identifiers.
        external_id=visit.appointment_key,
        starts_at=visit.starts_at,
        ends_at=visit.ends_at,
        # Visible to everyone in the meeting: department only, never patient data.
        subject=f"Video visit ({visit.department})",
    )
    if not created and (
        meeting.startDateTime != visit.starts_at or meeting.endDateTime != visit.ends_at
    ):
        # createOrGet returns an existing meeting as it is: one made before a crash (or by a
        # launch racing the feed's booking) still has the times of then, and the visit may
        # have been rescheduled since. Nothing marked it to be moved: no meeting was recorded.
        meeting = await graph.update_meeting_times(
            integration.ms_tenant_id,
            integration.teams_organizer_id,
            meeting.id,
            starts_at=visit.starts_at,
            ends_at=visit.ends_at,
        )
    patient_url = await graph.patient_join_url(
        integration.ms_tenant_id, integration.teams_organizer_id, meeting.id
    )
    client_state = secrets.token_urlsafe(32)
    subscription = await graph.subscribe_call_events(
        integration.ms_tenant_id,
        meeting.joinWebUrl,
        notification_url=f"{settings.notification_base_url.rstrip('/')}/graph/notifications",
        client_state=client_state,
        expires_at=datetime.now(UTC) + timedelta(minutes=settings.subscription_lifetime_minutes),
    )
    return Meeting(
        meeting_id=meeting.id,
        organizer_id=integration.teams_organizer_id,
        join_web_url=meeting.joinWebUrl,
        patient_join_url=patient_url,
        subscription_id=subscription.id,
        subscription_expires_at=subscription.expirationDateTime,
        client_state_hash=client_state_digest(client_state),
    )


_APPOINTMENT_COLUMNS = (
    "appointment_key, tenant_id, integration_id, environment, department, starts_at, ends_at,"
    " time_zone, schedule_version, ehr_user_id, organizer_id, meeting_id, join_web_url,"
    " patient_join_url, subscription_id, subscription_expires_at, client_state_hash"
)
# The appointment and its `appointment-created` outbox row in one statement: the outbox row
# exists if and only if the appointment row was new (as in outbox.enqueue's transaction), in
# one round trip instead of four; the outbox trigger wakes the relay as usual.
_NEW_VISIT = (
    f"visit AS (INSERT INTO appointments ({_APPOINTMENT_COLUMNS})"  # noqa: S608
    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17)"
    " ON CONFLICT (appointment_key) DO NOTHING RETURNING appointment_key)"
)
_ITS_EVENT = (
    "INSERT INTO outbox (event_id, topic, key, payload) SELECT $18, $19, appointment_key, $20"
    " FROM visit"
)
_RECORD_VISIT = f"WITH {_NEW_VISIT} {_ITS_EVENT}"
# A launch that made the visit's meeting also starts the clinician's session ($21.., after
# the visit's and its event's), whether or not the visit was new: one round trip where there
# were two. A data-modifying WITH runs to completion whether or not anything reads it.
_RECORD_VISIT_STARTING_SESSION = (
    f"WITH {_NEW_VISIT}, created AS ({_ITS_EVENT}),"  # noqa: S608
    f" started AS ({insert_session_sql('$1::text', 21)})"
    " SELECT EXISTS (SELECT 1 FROM visit)"
)
# A booking from the scheduling feed: its delivery, the appointment and the event, each only
# if the one before was new, in one statement (one round trip where a transaction took six).
_RECORD_BOOKING = (
    "WITH delivery AS (INSERT INTO scheduling_deliveries (event_id) VALUES ($21)"  # noqa: S608
    " ON CONFLICT DO NOTHING RETURNING event_id),"
    f" visit AS (INSERT INTO appointments ({_APPOINTMENT_COLUMNS})"
    " SELECT $1::text, $2::text, $3::uuid, $4::text, $5::text, $6::timestamptz,"
    " $7::timestamptz, $8::text, $9::int, $10::text, $11::text, $12::text, $13::text,"
    " $14::text, $15::text, $16::timestamptz, $17::bytea FROM delivery"
    " ON CONFLICT (appointment_key) DO NOTHING RETURNING appointment_key),"
    " created AS (INSERT INTO outbox (event_id, topic, key, payload)"
    " SELECT $18, $19, appointment_key, $20 FROM visit RETURNING 1)"
    " SELECT EXISTS (SELECT 1 FROM delivery) AS first_delivery,"
    " EXISTS (SELECT 1 FROM created) AS created"
)
Recorded = Literal["booked", "already known", "duplicate"]


def _visit_row(
    settings: LaunchSettings,
    visit: Visit,
    meeting: Meeting | None,
    ehr_user_id: str | None,
    patient_phone_encrypted: str | None,
) -> list[object]:
    """The appointment's columns, then its `appointment-created` event's id, type and bytes.
    A patient's phone comes only from a booking while the integration's SMS is on (`_book`)."""
    integration = visit.integration
    payload = AppointmentCreatedV1(
        integration_id=integration.integration_id,
        environment="production" if integration.environment == "production" else "test",
        department=visit.department,
        starts_at=visit.starts_at,
        ends_at=visit.ends_at,
        time_zone=visit.time_zone,
        join_url=join_link(settings, visit),
        patient_phone_encrypted=patient_phone_encrypted,
        sms_enabled=integration.sms_enabled and patient_phone_encrypted is not None,
        schedule_version=visit.schedule_version,
    )
    event = make_event(
        Topic.APPOINTMENT_CREATED, integration.tenant_id, visit.appointment_key, payload
    )
    return [
        visit.appointment_key,
        integration.tenant_id,
        integration.integration_id,
        integration.environment,
        visit.department,
        visit.starts_at,
        visit.ends_at,
        visit.time_zone,
        visit.schedule_version,
        ehr_user_id,
        meeting.organizer_id if meeting else None,
        meeting.meeting_id if meeting else None,
        meeting.join_web_url if meeting else None,
        meeting.patient_join_url if meeting else None,
        meeting.subscription_id if meeting else None,
        meeting.subscription_expires_at if meeting else None,
        meeting.client_state_hash if meeting else None,
        event.event_id,
        event.type,
        encode_event(event),
    ]


async def record_visit(
    conn: Connection | asyncpg.Pool,
    settings: LaunchSettings,
    visit: Visit,
    meeting: Meeting | None,
    *,
    ehr_user_id: str | None = None,
    patient_phone_encrypted: str | None = None,
    session: NewSession | None = None,
) -> bool:
    """Insert the appointment and its `appointment-created` event atomically; False (and no
    event) when the appointment was already known. Without a meeting, the meeting is
    prepared later (meeting_preparation.py). `session`, a clinician's new session, is
    started for this visit in the same statement, also when the visit was already known."""
    row = _visit_row(settings, visit, meeting, ehr_user_id, patient_phone_encrypted)
    if session is None:
        return bool(await conn.execute(_RECORD_VISIT, *row) == "INSERT 0 1")
    if session.ehr_user_id != ehr_user_id:
        raise ValueError("a session is for the clinician recorded on the visit")
    return bool(await conn.fetchval(_RECORD_VISIT_STARTING_SESSION, *row, *session.values()))


async def record_booking(
    pool: asyncpg.Pool,
    settings: LaunchSettings,
    visit: Visit,
    delivery: uuid.UUID,
    patient_phone_encrypted: str | None,
) -> Recorded:
    """A scheduling-feed booking, without its meeting: the delivery, the appointment and
    `appointment-created`, atomically and each at most once."""
    row = _visit_row(settings, visit, None, None, patient_phone_encrypted)
    outcome = await pool.fetchrow(_RECORD_BOOKING, *row, delivery)
    assert outcome is not None
    if not outcome["first_delivery"]:
        return "duplicate"
    return "booked" if outcome["created"] else "already known"
