"""The bound on what `meeting-ended` says about each participant (services/launch/attendance.py):
the largest input the model allows fits in a Kafka record, a meeting within the bounds is
sent byte for byte as before, and trimming keeps the figures analytics computes where the
design says it is exact."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from libs.common.events import (
    AttendanceInterval,
    MeetingEndedV1,
    ParticipantAttendance,
    Topic,
    decode_event,
    encode_event,
    make_event,
)
from services.analytics.visit import VisitFigures
from services.launch.attendance import INTERVAL_BUDGET, Attendee, bounded_attendance
from tests.launch.test_meeting_ended_bounds import KAFKA_RECORD_LIMIT, analytics_figures

T0 = datetime(2030, 1, 7, 14, 0, 0, 123456, tzinfo=UTC)
END = T0 + timedelta(hours=3)
EVENT_ID = uuid.UUID("6f1c2b9e-0d4a-4f53-9a51-3e2b7c8d9e0f")


def t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def spans(*pairs: tuple[float, float | None]) -> list[AttendanceInterval]:
    return [
        AttendanceInterval(joined_at=t(a), left_at=None if b is None else t(b)) for a, b in pairs
    ]


def encoded(participants: Sequence[ParticipantAttendance], key: str = "apt_k") -> bytes:
    """The event on the wire, with a fixed id and time so that two encodings compare."""
    payload = MeetingEndedV1(meeting_started_at=T0, meeting_ended_at=END, participants=participants)
    event = make_event(Topic.MEETING_ENDED, "tenant", key, payload)
    return encode_event(event.model_copy(update={"event_id": EVENT_ID, "occurred_at": END}))


def unbounded(attendees: Sequence[Attendee]) -> MeetingEndedV1:
    """The event as it would be without the bound, unvalidated (the model refuses it)."""
    return MeetingEndedV1.model_construct(
        meeting_started_at=T0,
        meeting_ended_at=END,
        participants=[
            ParticipantAttendance.model_construct(
                participant=a.participant,
                role=a.role,
                lobby_entered_at=a.lobby_entered_at,
                admitted_at=a.admitted_at,
                intervals=list(a.intervals),
            )
            for a in attendees
        ],
    )


def figures_without_and_with_the_bound(
    attendees: Sequence[Attendee],
) -> tuple[VisitFigures, VisitFigures]:
    """What analytics computes from the event without the bound, and with it."""
    bounded = decode_event(encoded(bounded_attendance(attendees)))
    unbound = make_event(
        Topic.MEETING_ENDED, "tenant", "apt_k", MeetingEndedV1(meeting_ended_at=END)
    ).model_copy(update={"payload": unbounded(attendees)})
    return analytics_figures([unbound]), analytics_figures([bounded])


def test_the_largest_meeting_the_model_allows_fits_well_within_a_kafka_record() -> None:
    """500 participants of 500 intervals each (~21 MB as the model allows it) become one valid
    event of at most INTERVAL_BUDGET intervals: under 0.45 MB with our pseudonyms, and under
    0.8 MiB even with the longest, most escaped participant strings the model allows."""
    intervals = [
        AttendanceInterval(joined_at=t(10 * k + 0.000001), left_at=t(10 * k + 5.000001))
        for k in range(500)
    ]
    longest = int(0.8 * KAFKA_RECORD_LIMIT)
    names: list[tuple[Callable[[int], str], int]] = [
        (lambda n: f"pp_{n:020x}", 450_000),  # our pseudonyms
        (lambda n: "\x01" * 128, longest),  # 128 characters of 6 bytes each on the wire
    ]
    for name, limit in names:
        attendees = [
            Attendee(
                participant=name(n),
                role="organizer",
                lobby_entered_at=t(-1),
                admitted_at=t(0),
                intervals=intervals,
            )
            for n in range(500)
        ]
        raw = encoded(bounded_attendance(attendees), key="k" * 200)
        assert len(raw) < limit
        payload = decode_event(raw, "meeting-ended").payload
        assert isinstance(payload, MeetingEndedV1)
        assert len(payload.participants) == 500
        assert sum(len(p.intervals) for p in payload.participants) <= INTERVAL_BUDGET


def test_a_meeting_within_the_bounds_is_sent_byte_for_byte_as_before() -> None:
    """Within the bounds nothing is touched, not even overlapping or open intervals: the event
    is the one built from the roster and report directly, as before the bound."""
    people = [
        Attendee("pp_organizer", "organizer", None, t(0), spans((0, 600), (700, None))),
        Attendee("pp_patient", "patient", t(30), t(60), spans((60, 300), (200, 400), (400, 500))),
        Attendee("pp_lobby_only", "patient", t(40), None, []),
        # Alone at the model's interval limit, within the event's budget.
        Attendee("pp_flaky", "patient", t(50), t(70), spans(*((k, k + 0.5) for k in range(500)))),
    ]
    before = [
        ParticipantAttendance(
            participant=a.participant,
            role=a.role,
            lobby_entered_at=a.lobby_entered_at,
            admitted_at=a.admitted_at,
            intervals=list(a.intervals),
        )
        for a in people
    ]
    assert bounded_attendance(people) == before
    assert encoded(bounded_attendance(people)) == encoded(before)


def test_repeated_and_overlapping_intervals_are_merged_exactly() -> None:
    """A patient whose 300 intervals are each reported three times (900, over the model's 500)
    keeps its 300, bridging no gap, and analytics' figures are those of the unbounded event."""
    distinct = spans(*((20 * k, 20 * k + 15) for k in range(300)))
    people = [
        Attendee("pp_organizer", "organizer", None, t(0), spans((0, 7000))),
        Attendee("pp_patient", "patient", t(-60), t(0), [*distinct, *distinct, *distinct]),
    ]
    (_, patient) = bounded_attendance(people)
    assert patient.intervals == distinct
    unbound, bounded = figures_without_and_with_the_bound(people)
    assert bounded == unbound


def test_gaps_before_the_visit_start_are_bridged_last() -> None:
    """A patient's 6-second gap during which a clinician came and went, before the visit
    started, stays open although it is the shortest: the 10-second gaps after the start are
    bridged instead, so start, duration, lobby wait, attendees and status are unchanged."""
    rejoins = ((1005 + 15 * k, 1010 + 15 * k) for k in range(600))
    people = [
        Attendee("pp_clinician", "staff", None, t(101), spans((101, 105), (1000, 10_000))),
        Attendee("pp_patient", "patient", t(-30), t(0), spans((0, 100), (106, 200), *rejoins)),
    ]
    (_, patient) = bounded_attendance(people)
    assert len(patient.intervals) == 500
    assert patient.intervals[:2] == spans((0, 100), (106, 200))
    assert patient.intervals[2].joined_at == t(1005)
    unbound, bounded = figures_without_and_with_the_bound(people)
    assert bounded == unbound
    assert bounded.started_at == t(1005)
