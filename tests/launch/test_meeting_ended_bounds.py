"""The `meeting-ended` event is built for any roster and attendance report, and fits in one
Kafka record: over 500 participants, a participant who rejoined hundreds of times, or more
intervals than 1 MiB holds, the launch side trims the event (services/launch/attendance.py)
so that the figures analytics computes from it stay those of the meeting."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
import structlog
from prometheus_client import REGISTRY

from libs.common.events import Envelope, MeetingEndedV1, decode_event
from sandbox.microsoft.clock import graph_time
from sandbox.microsoft.meetings import Meeting
from services.analytics.fold import Appointment, fold
from services.analytics.visit import Observations, PresenceChange, VisitFigures, figures
from services.launch.meeting_preparation import prepare_meeting
from services.launch.notifications import participant_pseudonym
from tests.launch.test_visit_end_to_end import book_video_visit
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem

T0 = datetime(2030, 1, 7, 14, 0, tzinfo=UTC)
KAFKA_RECORD_LIMIT = 1024 * 1024
ORGANIZER = "organizer-oid"
LIVE_TOPICS = ("patient-joined", "participant-admitted", "participant-left")
Span = tuple[datetime, datetime]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def user(identity: str, role: str) -> dict[str, Any]:
    return {
        "Id": f"leg-{identity}",
        "Identity": {"User": {"Id": identity, "DisplayName": "Dr Lee"}},
        "Role": role,
        "IsInLobby": False,
    }


def guest(identity: str, in_lobby: bool) -> dict[str, Any]:
    return {
        "Id": f"leg-{identity}",
        "Identity": {"Guest": {"Id": identity, "DisplayName": "Pat Marker"}},
        "Role": "Attendee",
        "IsInLobby": in_lobby,
    }


def record(identity: str, spans: Iterable[Span]) -> dict[str, Any]:
    return {
        "id": identity,
        "identity": {"id": identity, "displayName": "Pat Marker"},
        "role": "Attendee",
        "attendanceIntervals": [
            {
                "joinDateTime": graph_time(a),
                "leaveDateTime": graph_time(b),
                "durationInSeconds": int((b - a).total_seconds()),
            }
            for a, b in spans
        ],
    }


@dataclass
class Visit:
    """A booked visit with its Teams meeting and call-event subscription, ready for the
    notifications Graph would send."""

    system: LaunchSystem
    graph_http: aiohttp.ClientSession
    database_url: str
    key: str
    subscription: str
    client_state: str
    meeting: Meeting

    def pseudonym(self, identity: str) -> str:
        return participant_pseudonym(self.system.settings, self.key, identity)

    def note(
        self,
        event_type: str,
        at: datetime,
        joined: Sequence[dict[str, Any]] = (),
        exited: Sequence[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        return {
            "subscriptionId": self.subscription,
            "clientState": self.client_state,
            "resourceData": {
                "eventType": f"Microsoft.Communication.{event_type}",
                "eventDateTime": at.isoformat(),
                "activeParticipants@joined": list(joined),
                "activeParticipants@exited": list(exited),
            },
        }

    async def notify(self, notes: Sequence[dict[str, Any]]) -> None:
        """Posts the notifications as Graph does, at most 100 to a request."""
        for first in range(0, len(notes), 100):
            assert await self.post(notes[first : first + 100]) == 202

    async def post(self, notes: Sequence[dict[str, Any]]) -> int:
        async with self.graph_http.post(
            f"{self.system.notification_url}/graph/notifications", json={"value": list(notes)}
        ) as r:
            return r.status

    def attendance_report(self, records: list[dict[str, Any]], start: datetime) -> None:
        """What Graph lists for one session of the meeting once it is over."""
        self.meeting.reports.append(
            {
                "id": f"report-{len(self.meeting.reports)}",
                "totalParticipantCount": len(records),
                "meetingStartDateTime": graph_time(start),
                "meetingEndDateTime": graph_time(start + timedelta(hours=3)),
                "attendanceRecords": records,
            }
        )

    async def outbox(self, *topics: str) -> list[tuple[bytes, bool]]:
        """Each event the gateway wrote for these topics, oldest first: (bytes, parked)."""
        conn = await asyncpg.connect(self.database_url)
        try:
            rows = await conn.fetch(
                "SELECT payload, parked_at IS NOT NULL AS parked FROM launch.outbox"
                " WHERE topic = ANY($1) ORDER BY id",
                list(topics),
            )
        finally:
            await conn.close()
        return [(bytes(r["payload"]), r["parked"]) for r in rows]

    async def ended_at(self) -> datetime | None:
        conn = await asyncpg.connect(self.database_url)
        try:
            value: datetime | None = await conn.fetchval(
                "SELECT meeting_ended_at FROM launch.appointments WHERE appointment_key = $1",
                self.key,
            )
        finally:
            await conn.close()
        return value


async def booked_visit(
    system: LaunchSystem, graph_http: aiohttp.ClientSession, topic_prefix: str, database_url: str
) -> Visit:
    async with aiohttp.ClientSession() as http:
        await book_video_visit(http, system)
    (created,) = await read_all(topic_prefix + "appointment-created", expect=1)
    key = decode_event(created).key
    assert await prepare_meeting(system.app, key) in ("ready", "prepared")
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT meeting_id, subscription_id FROM launch.appointments"
            " WHERE appointment_key = $1",
            key,
        )
    finally:
        await conn.close()
    assert row is not None
    components = system.microsoft.components
    client_state = components.graph.subscriptions[row["subscription_id"]].client_state
    assert client_state is not None
    return Visit(
        system,
        graph_http,
        database_url,
        key,
        row["subscription_id"],
        client_state,
        components.meetings.by_id[row["meeting_id"]],
    )


def analytics_figures(events: Iterable[Envelope[Any]]) -> VisitFigures:
    """The figures analytics computes from these events, with its own fold and figures."""
    appointment = Appointment(before={}, row={"meeting_ended_at": None})
    for event in events:
        fold(appointment, event)
    return figures(
        Observations(
            roles=dict(appointment.roles),
            lobby_entries=frozenset(appointment.lobby),
            admissions=frozenset(appointment.admitted),
            changes=frozenset(PresenceChange(*change) for change in appointment.presence),
            meeting_ended_at=appointment.row["meeting_ended_at"],
        )
    )


def ms(delta: timedelta) -> int:
    return delta // timedelta(milliseconds=1)


async def the_meeting_ended(visit: Visit) -> tuple[Envelope[Any], MeetingEndedV1, int]:
    """The one meeting-ended event the gateway wrote: the event, its payload, its size."""
    rows = await visit.outbox("meeting-ended")
    assert len(rows) == 1
    ((raw, parked),) = rows
    assert not parked
    event = decode_event(raw, "meeting-ended")  # analytics' own validation
    assert isinstance(event.payload, MeetingEndedV1)
    return event, event.payload, len(raw)


async def test_a_meeting_of_522_participants_ends_in_one_event_keeping_staff_first(
    launch_system: LaunchSystem,
    topic_prefix: str,
    database_url: str,
    microsoft_http: aiohttp.ClientSession,
) -> None:
    """A meeting of an organizer, a staff member and 520 patients ends in one valid event of
    500 participants: both staff and the 498 earliest patients, the 22 dropped counted and
    logged by number only. Start, duration, lobby wait and status from it are the meeting's;
    with the live events analytics also has, so are the attendees. Graph's redelivery of
    the CallEnded changes nothing."""
    visit = await booked_visit(launch_system, microsoft_http, topic_prefix, database_url)
    patients = [f"guest-{i:03}" for i in range(520)]
    notes = [
        visit.note("CallStarted", T0, joined=[user(ORGANIZER, "Organizer")]),
        visit.note("CallRosterUpdate", T0 + timedelta(seconds=30), [user("staff", "Presenter")]),
    ]
    notes += [
        visit.note("CallRosterUpdate", T0 + timedelta(minutes=1, seconds=i), [guest(p, True)])
        for i, p in enumerate(patients)
    ]
    notes += [
        visit.note("CallRosterUpdate", T0 + timedelta(minutes=10, seconds=i), [guest(p, False)])
        for i, p in enumerate(patients)
    ]
    left = T0 + timedelta(minutes=40)
    notes += [
        visit.note("CallRosterUpdate", left, exited=[guest(p, False) for p in patients[:500]]),
        visit.note("CallRosterUpdate", left, exited=[guest(p, False) for p in patients[500:]]),
        visit.note("CallRosterUpdate", T0 + timedelta(minutes=45), exited=[user("staff", "x")]),
    ]
    end = T0 + timedelta(minutes=50)
    visit.attendance_report(
        [
            record(ORGANIZER, [(T0, end)]),
            record("staff", [(T0 + timedelta(seconds=30), T0 + timedelta(minutes=45))]),
            *(
                record(p, [(T0 + timedelta(minutes=10, seconds=i), left)])
                for i, p in enumerate(patients)
            ),
        ],
        T0,
    )
    await visit.notify(notes)
    trimmed_before = sample("launch_meeting_ended_trimmed_total", reason="participants")
    ended = visit.note("CallEnded", end, exited=[user(ORGANIZER, "Organizer")])
    with structlog.testing.capture_logs() as logs:
        assert await visit.post([ended]) == 202
    assert await visit.post([ended]) == 202  # Graph's redelivery

    event, payload, size = await the_meeting_ended(visit)
    assert size < KAFKA_RECORD_LIMIT // 4
    assert len(payload.participants) == 500
    kept = {p.participant for p in payload.participants}
    expected = [ORGANIZER, "staff", *patients[:498]]
    assert kept == {visit.pseudonym(i) for i in expected}
    roles = Counter(p.role for p in payload.participants)
    assert roles == {"organizer": 1, "staff": 1, "patient": 498}
    assert sample("launch_meeting_ended_trimmed_total", reason="participants") == (
        trimmed_before + 1
    )
    (trim,) = [e for e in logs if e.get("event") == "meeting-ended trimmed to fit"]
    assert trim["participants"] == 522
    assert trim["participants_dropped"] == 22
    assert trim["dropped_roles"] == {"patient": 22}
    for entry in logs:  # counts only: no identity, no pseudonym
        assert "guest-" not in str(entry), entry
        assert "pp_" not in str(entry), entry

    meeting = VisitFigures(
        status="completed",
        started_at=T0 + timedelta(minutes=10),
        report_at=T0 + timedelta(minutes=10),
        duration_ms=ms(timedelta(minutes=40)),
        lobby_wait_ms=ms(timedelta(minutes=9)),
        attendees=522,
    )
    alone = analytics_figures([event])
    assert alone == VisitFigures(**{**meeting.__dict__, "attendees": 500})
    live = [decode_event(raw) for raw, _ in await visit.outbox(*LIVE_TOPICS)]
    assert analytics_figures([*live, event]) == meeting


@pytest.mark.parametrize("sessions", [1, 7], ids=["one report", "seven sessions' reports"])
async def test_a_patient_who_rejoined_650_times_ends_in_one_event(
    sessions: int,
    launch_system: LaunchSystem,
    topic_prefix: str,
    database_url: str,
    microsoft_http: aiohttp.ClientSession,
) -> None:
    """A patient whose connection dropped 649 times, in one attendance record or across the
    reports of seven sessions, ends in one valid event with its 650 intervals merged to 500
    across the 150 shortest gaps: start, duration, lobby wait, attendees and status are the
    meeting's, and its time present grows by exactly the gaps bridged."""
    visit = await booked_visit(launch_system, microsoft_http, topic_prefix, database_url)
    spans: list[Span] = []
    at = T0 + timedelta(minutes=2)
    for k in range(650):
        spans.append((at, at + timedelta(seconds=8)))
        at += timedelta(seconds=8 + 1 + (k * 5) % 7)  # gaps of 1 to 7 s
    last_leave = spans[-1][1]
    organizer_left = T0 + timedelta(hours=2)
    assert organizer_left < last_leave  # the patient leaves last: it sets the duration
    await visit.notify(
        [
            visit.note("CallStarted", T0, joined=[user(ORGANIZER, "Organizer")]),
            visit.note("CallRosterUpdate", T0 + timedelta(minutes=1), [guest("pat", True)]),
            visit.note("CallRosterUpdate", T0 + timedelta(minutes=2), [guest("pat", False)]),
            visit.note("CallRosterUpdate", organizer_left, exited=[user(ORGANIZER, "x")]),
        ]
    )
    per_session = -(-len(spans) // sessions)
    for first in range(0, len(spans), per_session):
        chunk = spans[first : first + per_session]
        records = [record("pat", chunk)]
        if first == 0:
            records.append(record(ORGANIZER, [(T0, organizer_left)]))
        visit.attendance_report(records, chunk[0][0] if first else T0)
    trimmed_before = sample("launch_meeting_ended_trimmed_total", reason="intervals")
    ended = visit.note("CallEnded", last_leave, exited=[guest("pat", False)])
    assert await visit.post([ended]) == 202

    event, payload, size = await the_meeting_ended(visit)
    assert size < KAFKA_RECORD_LIMIT // 4
    assert sample("launch_meeting_ended_trimmed_total", reason="intervals") == trimmed_before + 1
    patient = next(p for p in payload.participants if p.participant == visit.pseudonym("pat"))
    merged = [(i.joined_at, i.left_at) for i in patient.intervals]
    assert len(merged) == 500
    assert merged[0][0] == spans[0][0]
    assert merged[-1][1] == last_leave
    gaps = sorted(b[0] - a[1] for a, b in itertools.pairwise(spans))
    present = sum((b - a for a, b in spans), timedelta())
    assert sum((b - a for a, b in merged if b), timedelta()) == present + sum(
        gaps[:150], timedelta()
    )
    # Every original moment of presence is still covered by one merged interval.
    assert all(any(a <= x and y <= b for a, b in merged if b) for x, y in spans)

    meeting = VisitFigures(
        status="completed",
        started_at=spans[0][0],
        report_at=spans[0][0],
        duration_ms=ms(last_leave - spans[0][0]),
        lobby_wait_ms=ms(timedelta(minutes=1)),
        attendees=2,
    )
    assert analytics_figures([event]) == meeting
    live = [decode_event(raw) for raw, _ in await visit.outbox(*LIVE_TOPICS)]
    assert analytics_figures([*live, event]) == meeting


async def test_attendance_larger_than_a_kafka_record_is_bounded_and_published(
    launch_system: LaunchSystem,
    topic_prefix: str,
    database_url: str,
    microsoft_http: aiohttp.ClientSession,
) -> None:
    """120 participants of 140 intervals each, over two sessions (16,800 intervals, within the
    model's limits but ~1.4 MB as sent before: the relay parked it and analytics never heard
    the meeting end) end in one event well under 1 MiB that reaches the topic, with the
    figures analytics computes from it those of the meeting."""
    visit = await booked_visit(launch_system, microsoft_http, topic_prefix, database_url)
    patients = [f"guest-{i:03}" for i in range(119)]
    await visit.notify(
        [
            visit.note("CallStarted", T0, joined=[user(ORGANIZER, "Organizer")]),
            visit.note(
                "CallRosterUpdate",
                T0 + timedelta(minutes=1),
                [guest(p, True) for p in patients],
            ),
            visit.note(
                "CallRosterUpdate",
                T0 + timedelta(minutes=2),
                [guest(p, False) for p in patients],
            ),
        ]
    )

    def spans(p: int) -> list[Span]:
        first = T0 + timedelta(minutes=2, milliseconds=p, microseconds=123)
        return [
            (first + timedelta(seconds=50 * k), first + timedelta(seconds=50 * k + 45))
            for k in range(140)
        ]

    half = T0 + timedelta(hours=1)
    end = T0 + timedelta(hours=2)
    for session, (since, until) in enumerate([(T0, half), (half, end)]):
        records = [record(ORGANIZER, [(since, until)])]
        records += [
            record(p, spans(i)[70 * session : 70 * session + 70]) for i, p in enumerate(patients)
        ]
        visit.attendance_report(records, since)
    assert await visit.post([visit.note("CallEnded", end)]) == 202

    event, payload, size = await the_meeting_ended(visit)
    assert size < KAFKA_RECORD_LIMIT // 2
    assert sum(len(p.intervals) for p in payload.participants) <= 4000
    (published,) = await read_all(topic_prefix + "meeting-ended", expect=1, within_s=20)
    assert decode_event(published).event_id == event.event_id
    assert analytics_figures([event]) == VisitFigures(
        status="completed",
        started_at=T0 + timedelta(minutes=2, microseconds=123),
        report_at=T0 + timedelta(minutes=2, microseconds=123),
        duration_ms=ms(end - T0 - timedelta(minutes=2, microseconds=123)),
        lobby_wait_ms=ms(timedelta(minutes=1)),
        attendees=120,
    )
