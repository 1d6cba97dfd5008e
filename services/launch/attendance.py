"""Who was in the meeting, as `meeting-ended` tells analytics: bounded so that the event always
validates and always fits in one Kafka record.

MeetingEndedV1 allows 500 participants of 500 intervals each, and the outbox relay's producer
refuses a record over 1 MiB (the row is parked and analytics never hears the meeting end). The
model's limits alone are not enough (500 x 500 intervals is ~21 MB), so the event is bounded
here. A meeting within the bounds is sent exactly as the roster and attendance reports give
it; past them it is trimmed, counted (`launch_meeting_ended_trimmed_total`) and logged with
counts only.

- Participants: at most the model's 500. Past that, the organizer, then staff, then patients,
  then guests are kept, and within a role the earliest arrivals (lobby entry, admission or
  first join); the latest arrivals of the last roles are dropped.
- Intervals: at most INTERVAL_BUDGET in the event, shared out as an allowance per participant
  (the largest, up to the model's 500, under which everyone's intervals fit the budget). A
  participant within the allowance keeps its intervals untouched. One over it has them
  replaced by its presence, their union (repeated, overlapping and touching intervals as
  one), and then, while still over, the gap between two of them is bridged, shortest first,
  those opening at or after the visit's start before any earlier one.

The bound, for the figures analytics computes from this event (the brief's definitions,
services/analytics/visit.py). The union keeps exactly the moments the participant was
present (an interval that ends before it starts is read as no presence). Overlapping
intervals (two devices) it reads as presence throughout, where analytics reads the first
leave inside the overlap as the participant leaving (visit.intervals() takes two sources'
views of one moment for one). Bridging a gap reports the participant present inside it.
For a participant whose intervals neither overlap nor end before they start (one device, as
Graph reports it), neither removes presence, and its first join and last leave stay. So, for
those participants:

- status is exact, and so is the last leave that ends the duration;
- start time, and so duration, are exact while the bridged gaps open at or after the start
  (they are bridged first); a gap before the start is bridged only when the allowance needs
  it, and can then move the start earlier, to an instant inside it;
- attendees can rise by at most one per participant with bridged gaps, and only if the
  busiest moment fell inside one of them;
- lobby wait is exact unless a non-staff participant was in the meeting before anyone
  entered the lobby (someone admitted from the lobby cannot be);
- a participant's time present grows by exactly the gaps bridged, the least any choice of
  gaps could add (logged as bridged_s, and how many opened before the start).

A trimmed participant with overlapping intervals (two devices) or one ending before it starts
has figures that differ from analytics' reading of the untrimmed intervals, in either
direction: the union makes it present through the overlap (analytics' reading ends at the
first leave inside it, so the last leave and duration can grow), and drops an inverted
interval whose join analytics would read as presence (review proofs: a duration of 3,097 s
read as 4,900 s, and 10,700 s as 8,900 s).

A dropped participant is missing from this event: attendees can fall by at most the number
dropped, and a last leave or first lobby entry only it had is lost. Analytics also folds the
live patient-joined, participant-admitted and participant-left events, which carry every
join, leave and rejoin Graph reported live, dropped participants' included: with them the
figures come back to the meeting's.

Size: an interval encodes to at most 84 bytes and a participant with our 23-character
pseudonyms to about 170 without its intervals, so an event is at most ~0.42 MB
(500 x 170 + 4,000 x 84 bytes and the envelope), and ~0.79 MB if every participant string
were the longest, most escaped one the model allows (tests/launch/test_attendance.py).
"""

from __future__ import annotations

import itertools
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from prometheus_client import Counter

from libs.common.events import (
    ATTENDANCE_MAX_INTERVALS,
    MEETING_ENDED_MAX_PARTICIPANTS,
    AttendanceInterval,
    ParticipantAttendance,
    ParticipantRole,
)

log = structlog.get_logger(__name__)

MAX_PARTICIPANTS = MEETING_ENDED_MAX_PARTICIPANTS
MAX_INTERVALS = ATTENDANCE_MAX_INTERVALS
# Intervals in one event, all participants together: with MAX_PARTICIPANTS, the size bound
# above. At least one per participant, so everyone present keeps a first join and last leave.
INTERVAL_BUDGET = 4000
assert MAX_PARTICIPANTS <= INTERVAL_BUDGET

STAFF_ROLES = frozenset({"organizer", "staff"})
_PRECEDENCE = {"organizer": 0, "staff": 1, "patient": 2, "guest": 3}
_NEVER = datetime.max.replace(tzinfo=UTC)

MEETING_ENDED_TRIMMED = Counter(
    "launch_meeting_ended_trimmed_total",
    "meeting-ended events trimmed to fit their bounds, by what was over (participants: the "
    "latest arrivals dropped; intervals: a participant's intervals merged)",
    ["reason"],
)

# (joined, left): left is None for someone still present when the report was made.
Span = tuple[datetime, datetime | None]


@dataclass(frozen=True)
class Attendee:
    """One participant of the roster with its intervals, before the bound."""

    participant: str
    role: ParticipantRole
    lobby_entered_at: datetime | None
    admitted_at: datetime | None
    intervals: Sequence[AttendanceInterval]

    def first_seen(self) -> datetime:
        moments = [self.lobby_entered_at, self.admitted_at, *(i.joined_at for i in self.intervals)]
        return min((m for m in moments if m is not None), default=_NEVER)


def bounded_attendance(attendees: Sequence[Attendee]) -> list[ParticipantAttendance]:
    """The participants of a meeting-ended event: exactly as given within the bounds, else
    trimmed as the module says, counted and logged."""
    kept = _keep(attendees)
    allowance = _allowance([len(a.intervals) for a in kept])
    over = [len(a.intervals) > allowance for a in kept]
    start = _visit_start(kept) if any(over) else None
    participants, bridged = [], []
    for attendee, trim in zip(kept, over, strict=True):
        intervals = list(attendee.intervals)
        if trim:
            spans, gaps = _fit(_union(intervals), allowance, start)
            intervals = [AttendanceInterval(joined_at=a, left_at=b) for a, b in spans]
            bridged += gaps
        participants.append(
            ParticipantAttendance(
                participant=attendee.participant,
                role=attendee.role,
                lobby_entered_at=attendee.lobby_entered_at,
                admitted_at=attendee.admitted_at,
                intervals=intervals,
            )
        )
    if len(kept) < len(attendees) or any(over):
        _trimmed(attendees, kept, over, allowance, participants, bridged, start)
    return participants


def _keep(attendees: Sequence[Attendee]) -> Sequence[Attendee]:
    """At most MAX_PARTICIPANTS, in their given order: staff first, then the earliest."""
    if len(attendees) <= MAX_PARTICIPANTS:
        return attendees
    ranked = sorted(
        range(len(attendees)),
        key=lambda k: (
            _PRECEDENCE.get(attendees[k].role, len(_PRECEDENCE)),
            attendees[k].first_seen(),
            attendees[k].participant,
        ),
    )
    chosen = set(ranked[:MAX_PARTICIPANTS])
    return [a for k, a in enumerate(attendees) if k in chosen]


def _allowance(counts: list[int]) -> int:
    """The largest per-participant allowance, up to MAX_INTERVALS, under which the intervals
    of all participants (each cut to it) fit INTERVAL_BUDGET."""
    low, high = 1, MAX_INTERVALS
    while low < high:
        middle = (low + high + 1) // 2
        if sum(min(n, middle) for n in counts) <= INTERVAL_BUDGET:
            low = middle
        else:
            high = middle - 1
    return low


def _union(intervals: Sequence[AttendanceInterval]) -> list[Span]:
    """When the participant was present: its intervals' union, in order, no two touching."""
    spans: list[Span] = []
    for interval in sorted(intervals, key=lambda i: i.joined_at):
        joined, left = interval.joined_at, interval.left_at
        if left is not None and left <= joined:
            continue  # no presence: analytics reads a join and leave at one instant as none
        if spans and (spans[-1][1] is None or joined <= spans[-1][1]):
            # Half-open: leaving at the instant of a join is no gap.
            first, last = spans[-1]
            spans[-1] = (first, None if last is None or left is None else max(last, left))
        else:
            spans.append((joined, left))
    return spans


def _fit(
    spans: list[Span], allowance: int, start: datetime | None
) -> tuple[list[Span], list[tuple[datetime, datetime]]]:
    """The spans with gaps bridged until `allowance` remain, and the gaps bridged: those
    opening at or after the visit's start first (they cannot move it), shortest first."""
    excess = len(spans) - allowance
    if excess <= 0:
        return spans, []
    gaps = []
    for (_, left), (rejoined, _) in itertools.pairwise(spans):
        assert left is not None  # only the last span can be open
        gaps.append((left, rejoined))
    order = sorted(
        range(len(gaps)),
        key=lambda k: (start is None or gaps[k][0] < start, gaps[k][1] - gaps[k][0], k),
    )
    chosen = set(order[:excess])
    fitted = [spans[0]]
    for k, span in enumerate(spans[1:]):
        if k in chosen:
            fitted[-1] = (fitted[-1][0], span[1])
        else:
            fitted.append(span)
    return fitted, [gaps[k] for k in sorted(chosen)]


def _visit_start(attendees: Sequence[Attendee]) -> datetime | None:
    """The brief's start time: the first instant a staff member and someone else are both
    present, everything at one instant applied together (half-open, as analytics reads it)."""
    steps: dict[datetime, list[tuple[int, bool]]] = defaultdict(list)
    for attendee in attendees:
        staff = attendee.role in STAFF_ROLES
        for joined, left in _union(attendee.intervals):
            steps[joined].append((1, staff))
            if left is not None:
                steps[left].append((-1, staff))
    present = {True: 0, False: 0}
    for at in sorted(steps):
        for step, staff in steps[at]:
            present[staff] += step
        if present[True] > 0 and present[False] > 0:
            return at
    return None


def _trimmed(
    attendees: Sequence[Attendee],
    kept: Sequence[Attendee],
    over: list[bool],
    allowance: int,
    participants: list[ParticipantAttendance],
    bridged: list[tuple[datetime, datetime]],
    start: datetime | None,
) -> None:
    """Counts and logs a trimmed event: numbers only, no pseudonym."""
    dropped = len(attendees) - len(kept)
    if dropped:
        MEETING_ENDED_TRIMMED.labels("participants").inc()
    if any(over):
        MEETING_ENDED_TRIMMED.labels("intervals").inc()
    kept_ids = {id(a) for a in kept}
    lengths = [b - a for a, b in bridged]
    log.warning(
        "meeting-ended trimmed to fit",
        participants=len(attendees),
        participants_dropped=dropped,
        dropped_roles=dict(Tally(a.role for a in attendees if id(a) not in kept_ids)),
        participants_merged=sum(over),
        interval_allowance=allowance,
        intervals=sum(len(a.intervals) for a in kept),
        intervals_sent=sum(len(p.intervals) for p in participants),
        gaps_bridged=len(bridged),
        gaps_bridged_before_start=sum(start is None or a < start for a, _ in bridged),
        bridged_s=sum(lengths, timedelta()).total_seconds(),
        longest_bridged_s=max(lengths, default=timedelta()).total_seconds(),
    )
