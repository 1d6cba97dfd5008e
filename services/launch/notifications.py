"""Graph change notifications for meeting call events: the validation handshake, clientState,
dedupe, the live roster, and `meeting-ended` with the attendance report once the call ends."""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import structlog
from aiohttp import web
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
)

from libs.common.events import (
    AttendanceInterval,
    MeetingEndedV1,
    ParticipantAdmittedV1,
    ParticipantLeftV1,
    PatientJoinedV1,
    Timestamp,
    Topic,
    UtcDateTime,
    make_event,
)
from libs.common.outbox import enqueue
from libs.common.web import DB_POOL
from services.launch.attendance import Attendee, bounded_attendance
from services.launch.graph import GraphError
from services.launch.settings import LaunchSettings
from services.launch.state import GRAPH, launch_settings

if TYPE_CHECKING:
    from libs.common.db import Connection

log = structlog.get_logger(__name__)
# A report's meetingStartDateTime: ISO 8601 with an offset, in UTC, or not used.
_REPORT_TIME: TypeAdapter[datetime] = TypeAdapter(Timestamp)


class RosterEntry(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    Id: str = Field(max_length=256)
    Identity: dict[str, Any] = Field(default_factory=dict)
    Role: str | None = Field(default=None, max_length=32)
    IsInLobby: bool = False

    @property
    def identity_id(self) -> str:
        for kind in ("User", "Guest", "user", "guest"):
            value = self.Identity.get(kind)
            if isinstance(value, dict) and value.get("Id"):
                return str(value["Id"])
        return self.Id

    @property
    def role(self) -> str:
        if any(k in self.Identity for k in ("User", "user")):
            return "organizer" if (self.Role or "").lower() == "organizer" else "staff"
        return "patient"


class CallEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    eventType: str = Field(max_length=128)  # noqa: N815 - Graph's names
    eventDateTime: UtcDateTime  # noqa: N815
    joined: list[RosterEntry] = Field(
        default_factory=list,
        max_length=500,
        validation_alias=AliasChoices("activeParticipants@joined"),
    )
    exited: list[RosterEntry] = Field(
        default_factory=list,
        max_length=500,
        validation_alias=AliasChoices("activeParticipants@exited"),
    )


class ChangeNotification(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    # Graph's subscription ids are GUIDs; printable ASCII keeps NUL out of the SQL lookup.
    subscriptionId: str = Field(max_length=256, pattern=r"^[\x20-\x7e]*$")  # noqa: N815
    clientState: str | None = Field(default=None, max_length=256)  # noqa: N815
    resourceData: CallEvent  # noqa: N815


class Notifications(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    value: list[ChangeNotification] = Field(max_length=100)


def participant_pseudonym(settings: LaunchSettings, appointment_key: str, identity_id: str) -> str:
    digest = hmac.new(
        settings.join_token_secret.get_secret_value().encode(),
        f"leg\x1f{appointment_key}\x1f{identity_id}".encode(),
        hashlib.sha256,
    ).hexdigest()
    return f"pp_{digest[:20]}"


async def receive_notifications(request: web.Request) -> web.Response:
    token = request.query.get("validationToken")
    if token is not None:
        # Graph's subscription handshake: echo the token as plain text within 10 s.
        if len(token) > 1024:
            return web.Response(status=400, text="validationToken too long")
        return web.Response(text=token, content_type="text/plain")
    try:
        batch = Notifications.model_validate_json(await request.read())
        digests = [notification_digest(note) for note in batch.value]
    except (ValidationError, TypeError):
        # TypeError: orjson refuses an integer beyond 64 bits (say, inside Identity).
        return web.json_response({"error": "not a change notification"}, status=400)
    pool = request.app[DB_POOL]
    matched = []
    for note in batch.value:
        row = await pool.fetchrow(
            "SELECT a.appointment_key, a.tenant_id, a.client_state_hash, a.organizer_id,"
            " a.meeting_id, i.ms_tenant_id FROM appointments a"
            " LEFT JOIN integrations i USING (integration_id) WHERE a.subscription_id = $1",
            note.subscriptionId,
        )
        presented = hashlib.sha256((note.clientState or "").encode()).digest()
        if (
            row is None
            or row["client_state_hash"] is None
            or not hmac.compare_digest(presented, bytes(row["client_state_hash"]))
        ):
            # Anyone can POST here; only Graph knows the clientState we gave it.
            log.warning("graph notification refused: unknown subscription or wrong clientState")
            return web.json_response(
                {"error": "unknown subscription or wrong clientState"}, status=403
            )
        matched.append((note, row))
    for (note, row), digest in zip(matched, digests, strict=True):
        await _apply(request, note, row, digest)
    return web.Response(status=202)


def notification_digest(note: ChangeNotification) -> bytes:
    """What dedupes Graph's redeliveries of one notification."""
    return hashlib.sha256(
        orjson.dumps(note.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    ).digest()


async def _apply(
    request: web.Request, note: ChangeNotification, row: asyncpg.Record, digest: bytes
) -> None:
    settings = launch_settings(request)
    event = note.resourceData
    reports: list[dict[str, Any]] = []
    if event.eventType.endswith("CallEnded"):
        try:
            reports = await request.app[GRAPH].attendance_reports(
                row["ms_tenant_id"], row["organizer_id"], row["meeting_id"]
            )
        except GraphError as exc:
            # The roster still has every join and leave; the report only refines it.
            log.warning("attendance report unavailable", error=str(exc))
    key, tenant = row["appointment_key"], row["tenant_id"]
    with structlog.contextvars.bound_contextvars(appointment_key=key, call_event=event.eventType):
        async with request.app[DB_POOL].acquire() as conn, conn.transaction():
            status = await conn.execute(
                "INSERT INTO graph_notifications (digest) VALUES ($1) ON CONFLICT DO NOTHING",
                digest,
            )
            if status != "INSERT 0 1":
                return
            at = event.eventDateTime
            for entry in event.joined:
                await _joined(conn, settings, key, tenant, entry, at)
            for entry in event.exited:
                await _left(conn, settings, key, tenant, entry, at)
            if event.eventType.endswith("CallEnded"):
                await _ended(conn, settings, key, tenant, at, reports)


async def _joined(
    conn: Connection,
    settings: LaunchSettings,
    key: str,
    tenant: str,
    entry: RosterEntry,
    at: datetime,
) -> None:
    participant = participant_pseudonym(settings, key, entry.identity_id)
    if entry.IsInLobby:
        inserted = await conn.fetchval(
            "INSERT INTO roster (appointment_key, participant, role, state, lobby_entered_at)"
            " VALUES ($1, $2, $3, 'lobby', $4) ON CONFLICT (appointment_key, participant) DO UPDATE"
            " SET state = 'lobby', updated_at = now() RETURNING xmax = 0",
            key,
            participant,
            entry.role,
            at,
        )
        if inserted and entry.role == "patient":
            payload = PatientJoinedV1(participant=participant, lobby_entered_at=at)
            await enqueue(conn, make_event(Topic.PATIENT_JOINED, tenant, key, payload))
        return
    await conn.execute(
        "INSERT INTO roster (appointment_key, participant, role, state, admitted_at, joined_at)"
        " VALUES ($1, $2, $3, 'admitted', $4, $4)"
        " ON CONFLICT (appointment_key, participant) DO UPDATE"
        " SET state = 'admitted', admitted_at = COALESCE(roster.admitted_at, $4),"
        "  joined_at = COALESCE(roster.joined_at, $4), updated_at = now()",
        key,
        participant,
        entry.role,
        at,
    )
    admitted = ParticipantAdmittedV1(participant=participant, role=entry.role, admitted_at=at)
    await enqueue(conn, make_event(Topic.PARTICIPANT_ADMITTED, tenant, key, admitted))


async def _left(
    conn: Connection,
    settings: LaunchSettings,
    key: str,
    tenant: str,
    entry: RosterEntry,
    at: datetime,
) -> None:
    participant = participant_pseudonym(settings, key, entry.identity_id)
    await conn.execute(
        "INSERT INTO roster (appointment_key, participant, role, state, left_at)"
        " VALUES ($1, $2, $3, 'left', $4) ON CONFLICT (appointment_key, participant) DO UPDATE"
        " SET state = 'left', left_at = $4, updated_at = now()",
        key,
        participant,
        entry.role,
        at,
    )
    left = ParticipantLeftV1(participant=participant, role=entry.role, left_at=at)
    await enqueue(conn, make_event(Topic.PARTICIPANT_LEFT, tenant, key, left))


def _intervals_from_reports(
    settings: LaunchSettings, key: str, reports: list[dict[str, Any]]
) -> tuple[dict[str, list[AttendanceInterval]], datetime | None]:
    """Each participant's intervals in Graph's attendance reports, and the meeting's start.
    Every interval of a record is read (cutting them would lose the last leave); their
    number is bounded when the event is built (attendance.py). Anything not shaped like a
    report is skipped, so that an odd report cannot stop the meeting's end."""
    intervals: dict[str, list[AttendanceInterval]] = {}
    started: datetime | None = None
    for report in reports:
        try:
            start = _REPORT_TIME.validate_python(report.get("meetingStartDateTime"))
            started = start if started is None else min(started, start)
        except ValidationError:
            pass
        records = report.get("attendanceRecords")
        for record in records[:500] if isinstance(records, list) else []:
            if not isinstance(record, dict):
                continue
            identity = record.get("identity")
            identity = identity if isinstance(identity, dict) else {}
            identity_id = str(identity.get("id") or record.get("id") or "")
            if not identity_id:
                continue
            participant = participant_pseudonym(settings, key, identity_id)
            attended = record.get("attendanceIntervals")
            for interval in attended if isinstance(attended, list) else []:
                if not isinstance(interval, dict):
                    continue
                try:
                    joined = _REPORT_TIME.validate_python(interval["joinDateTime"])
                except (KeyError, ValidationError):
                    continue
                try:
                    # An unusable leave (a .NET MaxValue, say) is an unknown one: present
                    # until the end, as a leave not yet reported is.
                    left = _REPORT_TIME.validate_python(interval.get("leaveDateTime"))
                except ValidationError:
                    left = None
                try:
                    found = AttendanceInterval(joined_at=joined, left_at=left)
                except ValidationError:
                    continue
                # Only once an interval is usable: an empty list would hide the participant's
                # roster times (the fallback in _ended) behind no attendance at all.
                intervals.setdefault(participant, []).append(found)
    return intervals, started


async def _ended(
    conn: Connection,
    settings: LaunchSettings,
    key: str,
    tenant: str,
    at: datetime,
    reports: list[dict[str, Any]],
) -> None:
    status = await conn.execute(
        "UPDATE appointments SET meeting_ended_at = $2, updated_at = now()"
        " WHERE appointment_key = $1 AND meeting_ended_at IS NULL",
        key,
        at,
    )
    if status != "UPDATE 1":
        return
    from_reports, started = _intervals_from_reports(settings, key, reports)
    rows = await conn.fetch(
        "SELECT participant, role, lobby_entered_at, admitted_at, joined_at, left_at FROM roster"
        " WHERE appointment_key = $1",
        key,
    )
    attendees = []
    for row in rows:
        intervals = from_reports.get(row["participant"])
        if intervals is None:
            intervals = (
                [AttendanceInterval(joined_at=row["joined_at"], left_at=row["left_at"] or at)]
                if row["joined_at"]
                else []
            )
        attendees.append(
            Attendee(
                participant=row["participant"],
                role=row["role"],
                lobby_entered_at=row["lobby_entered_at"],
                admitted_at=row["admitted_at"],
                intervals=intervals,
            )
        )
    if started is None:
        joins = [i.joined_at for p in attendees for i in p.intervals]
        started = min(joins) if joins else None
    # Past 500 participants, 500 intervals for one, or what fits well within a Kafka record,
    # trimmed so that the end is always published (the bound: attendance.py).
    participants = bounded_attendance(attendees)
    payload = MeetingEndedV1(
        meeting_started_at=started, meeting_ended_at=at, participants=participants
    )
    await enqueue(conn, make_event(Topic.MEETING_ENDED, tenant, key, payload))
    log.info("meeting ended", participants=len(participants))
