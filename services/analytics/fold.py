"""What a poll's events say about each appointment, folded in poll order before anything is
written: the fact row's new descriptive columns and the observations to store.

Pure, so the projector can apply a poll of any size in a fixed number of statements, and a
single event is simply a poll of one.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from libs.common.events import (
    AppointmentCancelledV1,
    AppointmentCreatedV1,
    AppointmentRescheduledV1,
    Envelope,
    MeetingEndedV1,
    ParticipantAdmittedV1,
    ParticipantLeftV1,
    PatientJoinedV1,
    SmsSentV1,
)
from services.analytics.settings import known_zone
from services.analytics.visit import STAFF_ROLES


@dataclass
class SmsRow:
    event_id: uuid.UUID
    appointment_key: str
    kind: str
    outcome: str
    segments: int
    at: datetime
    # The appointment's labels when the message was folded: its metric is counted under them.
    environment: str | None
    department: str | None


@dataclass
class Appointment:
    """One appointment's fact row as the poll leaves it (before its figures are recomputed),
    and what the poll observed of it."""

    before: dict[str, Any]
    row: dict[str, Any]
    events: list[Envelope[Any]] = field(default_factory=list)
    # participant -> role: the first role seen, unless a staff role is seen later.
    roles: dict[str, str] = field(default_factory=dict)
    lobby: list[tuple[str, datetime]] = field(default_factory=list)
    admitted: list[tuple[str, datetime]] = field(default_factory=list)
    presence: list[tuple[str, datetime, bool]] = field(default_factory=list)
    sms: list[SmsRow] = field(default_factory=list)
    # The booking that first gave the appointment a department in this poll: (how many of the
    # poll's messages came before it, environment, department). Messages sent before the
    # department was known are counted under it.
    labelled: tuple[int, str, str] | None = None

    def role(self, participant: str, role: str) -> None:
        # Staffness must not depend on order: a staff role, once seen, wins.
        known = self.roles.get(participant)
        if known is None or (role in STAFF_ROLES and known not in STAFF_ROLES):
            self.roles[participant] = role


def fold(appointment: Appointment, event: Envelope[Any]) -> None:
    """Applies one event to the appointment's row and observations."""
    appointment.events.append(event)
    row, p = appointment.row, event.payload
    if isinstance(p, AppointmentCreatedV1):
        if row["department"] is None and appointment.labelled is None:
            appointment.labelled = (len(appointment.sms), p.environment, p.department)
        row.update(integration_id=p.integration_id, environment=p.environment)
        row["department"] = p.department
        if p.schedule_version >= row["schedule_version"]:
            _schedule(row, p)
        row["schedule_version"] = max(row["schedule_version"], p.schedule_version)
    elif isinstance(p, AppointmentRescheduledV1):
        row["integration_id"] = row["integration_id"] or p.integration_id
        # The report files a visit under when it happened, not when it was booked for, so a
        # new schedule changes no figure (though a new zone may change its day).
        if row["schedule_version"] < p.schedule_version:
            _schedule(row, p)
            row["schedule_version"] = p.schedule_version
    elif isinstance(p, AppointmentCancelledV1):
        row["integration_id"] = row["integration_id"] or p.integration_id
        row["cancelled_at"] = row["cancelled_at"] or event.occurred_at
        row["cancel_reason"] = p.reason_code
        row["schedule_version"] = max(row["schedule_version"], p.schedule_version)
    elif isinstance(p, PatientJoinedV1):
        appointment.role(p.participant, "patient")
        appointment.lobby.append((p.participant, p.lobby_entered_at))
    elif isinstance(p, ParticipantAdmittedV1):
        appointment.role(p.participant, p.role)
        appointment.admitted.append((p.participant, p.admitted_at))
        appointment.presence.append((p.participant, p.admitted_at, True))
    elif isinstance(p, ParticipantLeftV1):
        appointment.role(p.participant, p.role)
        appointment.presence.append((p.participant, p.left_at, False))
    elif isinstance(p, MeetingEndedV1):
        _fold_meeting_ended(appointment, p)
    elif isinstance(p, SmsSentV1):
        row["integration_id"] = row["integration_id"] or p.integration_id
        appointment.sms.append(
            SmsRow(
                event.event_id,
                event.key,
                p.kind,
                p.outcome,
                p.segments,
                p.at,
                row["environment"],
                row["department"],
            )
        )
    else:
        raise TypeError(f"no fact is kept for {type(p).__name__}")


def _schedule(row: dict[str, Any], p: AppointmentCreatedV1 | AppointmentRescheduledV1) -> None:
    # The zone travels with the schedule (the newest version wins, in any order). One that is
    # no IANA zone is kept as unknown: the report time zone stands in (facts.py).
    zone = known_zone(p.time_zone)
    row.update(
        scheduled_start=p.starts_at,
        scheduled_end=p.ends_at,
        time_zone=None if zone is None else zone.key,
    )


def _fold_meeting_ended(appointment: Appointment, p: MeetingEndedV1) -> None:
    for person in p.participants:
        appointment.role(person.participant, person.role)
        if person.lobby_entered_at:
            appointment.lobby.append((person.participant, person.lobby_entered_at))
        if person.admitted_at:
            appointment.admitted.append((person.participant, person.admitted_at))
        for interval in person.intervals:
            for at, joined in ((interval.joined_at, True), (interval.left_at, False)):
                if at is not None:
                    appointment.presence.append((person.participant, at, joined))
    # Several reports of the end (a retried publish) agree on the latest one.
    ended = appointment.row["meeting_ended_at"]
    appointment.row["meeting_ended_at"] = (
        p.meeting_ended_at if ended is None else max(ended, p.meeting_ended_at)
    )
