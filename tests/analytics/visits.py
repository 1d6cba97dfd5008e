"""Generated visits (the truth), the events the launch service would publish for them, and an
independent reference computation of the report figures, written from the brief's
definitions by brute force over instants rather than by a sweep."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from libs.common.events import (
    AppointmentCreatedV1,
    AttendanceInterval,
    Envelope,
    MeetingEndedV1,
    ParticipantAdmittedV1,
    ParticipantAttendance,
    ParticipantLeftV1,
    PatientJoinedV1,
    SmsSentV1,
    Topic,
    make_event,
)

STAFF = ("organizer", "staff")
INTEGRATION = uuid.UUID("0b9a4c1e-2f3d-4e5a-8b6c-7d8e9f0a1b2c")


@dataclass
class Person:
    participant: str
    role: str
    lobby_entered_at: datetime | None
    intervals: list[tuple[datetime, datetime]]


@dataclass
class Visit:
    key: str
    tenant_id: str
    department: str
    environment: str
    people: list[Person]
    ended_at: datetime
    sms_sent: int = 0
    open_at_end: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Expected:
    status: str
    started_at: datetime | None
    duration_ms: int | None
    lobby_wait_ms: int | None
    attendees: int
    report_day: Any


def at(base: datetime, seconds: int) -> datetime:
    return base + timedelta(seconds=seconds)


@st.composite
def people(draw: st.DrawFn, base: datetime) -> list[Person]:
    result = []
    roles = draw(st.lists(st.sampled_from(["organizer", "staff", "patient", "guest"]), max_size=5))
    for i, role in enumerate(roles):
        # Strictly increasing instants, paired into disjoint intervals with gaps between.
        marks = sorted(draw(st.sets(st.integers(0, 4000), max_size=6)))
        marks = marks[: len(marks) // 2 * 2]
        spans = [(at(base, marks[j]), at(base, marks[j + 1])) for j in range(0, len(marks), 2)]
        lobby: datetime | None = None
        if draw(st.booleans()):
            latest = marks[0] if marks else 4000
            lobby = at(base, draw(st.integers(0, latest)))
        result.append(Person(f"p{i}-{role}", role, lobby, spans))
    return result


@st.composite
def visits(draw: st.DrawFn, tenant_id: str = "tenant-prop") -> Visit:
    # Some bases sit just before midnight UTC, so visits cross it.
    base = datetime(2026, 3, draw(st.integers(1, 28)), 23, 0, tzinfo=UTC) - timedelta(
        seconds=draw(st.integers(0, 7200))
    )
    crowd = draw(people(base))
    leaves = [b for p in crowd for _, b in p.intervals]
    ended = max(leaves, default=base) + timedelta(seconds=draw(st.integers(0, 60)))
    visit = Visit(
        key=f"apt-{uuid.uuid4().hex}",
        tenant_id=tenant_id,
        department=draw(st.sampled_from(["Cardiology", "Family medicine", "Dermatology"])),
        environment=draw(st.sampled_from(["test", "production"])),
        people=crowd,
        ended_at=ended,
        sms_sent=draw(st.integers(0, 2)),
    )
    # Someone still present when the meeting ends has no leave time in the report.
    visit.open_at_end = {
        p.participant for p in crowd if p.intervals and p.intervals[-1][1] == ended
    }
    return visit


def scheduled_start(visit: Visit) -> datetime:
    """What the booking says the visit starts at: its first join (or its end, if nobody came)."""
    return min((a for p in visit.people for a, _ in p.intervals), default=visit.ended_at)


def events(visit: Visit) -> list[Envelope[Any]]:
    """Everything launch and notify publish for the visit, each once, in causal order."""
    t, k = visit.tenant_id, visit.key
    first = scheduled_start(visit)
    out: list[Envelope[Any]] = [
        make_event(
            Topic.APPOINTMENT_CREATED,
            t,
            k,
            AppointmentCreatedV1(
                integration_id=INTEGRATION,
                environment=visit.environment,
                department=visit.department,
                starts_at=first,
                ends_at=first + timedelta(minutes=30),
                time_zone="UTC",
            ),
        )
    ]
    for p in visit.people:
        if p.lobby_entered_at and p.role not in STAFF:
            out.append(
                make_event(
                    Topic.PATIENT_JOINED,
                    t,
                    k,
                    PatientJoinedV1(participant=p.participant, lobby_entered_at=p.lobby_entered_at),
                )
            )
        for joined, left in p.intervals:
            role: Any = p.role
            out.append(
                make_event(
                    Topic.PARTICIPANT_ADMITTED,
                    t,
                    k,
                    ParticipantAdmittedV1(participant=p.participant, role=role, admitted_at=joined),
                )
            )
            if p.participant not in visit.open_at_end or left != p.intervals[-1][1]:
                out.append(
                    make_event(
                        Topic.PARTICIPANT_LEFT,
                        t,
                        k,
                        ParticipantLeftV1(participant=p.participant, role=role, left_at=left),
                    )
                )
    for _ in range(visit.sms_sent):
        out.append(
            make_event(
                Topic.SMS_SENT,
                t,
                k,
                SmsSentV1(
                    integration_id=INTEGRATION,
                    kind="link",
                    outcome="sent",
                    segments=1,
                    at=visit.ended_at,
                ),
            )
        )
    out.append(make_event(Topic.MEETING_ENDED, t, k, meeting_ended(visit)))
    return out


def meeting_ended(visit: Visit) -> MeetingEndedV1:
    attendance = []
    for p in visit.people:
        intervals = [
            AttendanceInterval(
                joined_at=a,
                left_at=None if p.participant in visit.open_at_end and b == visit.ended_at else b,
            )
            for a, b in p.intervals
        ]
        attendance.append(
            ParticipantAttendance(
                participant=p.participant,
                role=p.role,
                lobby_entered_at=p.lobby_entered_at,
                admitted_at=p.intervals[0][0] if p.intervals and p.role not in STAFF else None,
                intervals=intervals,
            )
        )
    starts = [a for p in visit.people for a, _ in p.intervals]
    return MeetingEndedV1(
        meeting_started_at=min(starts) if starts else None,
        meeting_ended_at=visit.ended_at,
        participants=attendance,
    )


def _present(visit: Visit, instant: datetime) -> list[Person]:
    return [p for p in visit.people if any(a <= instant < b for a, b in p.intervals)]


def expected(visit: Visit) -> Expected:
    """The brief's definitions, checked at every instant someone joins."""
    joins = sorted({a for p in visit.people for a, _ in p.intervals})
    start = next(
        (
            t
            for t in joins
            if any(p.role in STAFF for p in _present(visit, t))
            and any(p.role not in STAFF for p in _present(visit, t))
        ),
        None,
    )
    attendees = max((len(_present(visit, t)) for t in joins), default=0)
    staff_joined = any(p.intervals for p in visit.people if p.role in STAFF)
    other_joined = any(p.intervals for p in visit.people if p.role not in STAFF)
    status = "not_a_visit" if not staff_joined else "completed" if other_joined else "no_show"
    last_leave = max((b for p in visit.people for _, b in p.intervals), default=None)
    duration = (last_leave - start) // timedelta(milliseconds=1) if start and last_leave else 0
    entries = [
        p.lobby_entered_at for p in visit.people if p.role not in STAFF and p.lobby_entered_at
    ]
    wait = None
    if entries:
        first = min(entries)
        admitted = [a for p in visit.people if p.role not in STAFF for a, _ in p.intervals]
        later = [a for a in admitted if a >= first]
        wait = (min(later) - first) // timedelta(milliseconds=1) if later else None
    staff_joins = [a for p in visit.people if p.role in STAFF for a, _ in p.intervals]
    staff_first = min(staff_joins, default=None)
    # Filed under when it happened, or, never a visit, under when it was booked for.
    reported = start or staff_first or scheduled_start(visit)
    return Expected(
        status=status,
        started_at=start,
        duration_ms=duration,
        lobby_wait_ms=wait,
        attendees=attendees,
        report_day=reported.astimezone(UTC).date(),
    )
