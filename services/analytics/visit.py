"""A visit's report figures, computed from everything observed about its meeting.

Pure and order-free: the observations are a set, so the same facts in any order, or with
repeats, give the same figures. Definitions (product brief, section 2):

- start time: the first moment a staff member and a patient/participant are both present;
- duration: from start time until the last person leaves; 0 when never both present;
- lobby wait: from the first lobby entry until that participant or another is admitted;
- status: completed (staff and participant both joined, meeting ended), no show (staff
  joined, nobody else did, meeting ended); without staff it is not a visit;
- attendees: the most people present at the same moment.

Presence intervals are half-open, [joined, left): someone who leaves at the instant another
joins was never in the meeting together with them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

STAFF_ROLES = frozenset({"organizer", "staff"})

Status = Literal["pending", "completed", "no_show", "not_a_visit"]
VISIT_STATUSES: frozenset[Status] = frozenset({"completed", "no_show"})


@dataclass(frozen=True, order=True)
class PresenceChange:
    """A participant joined (True) or left (False) the meeting proper (not the lobby)."""

    participant: str
    at: datetime
    joined: bool


@dataclass(frozen=True)
class Observations:
    roles: dict[str, str]
    lobby_entries: frozenset[tuple[str, datetime]]
    admissions: frozenset[tuple[str, datetime]]
    changes: frozenset[PresenceChange]
    meeting_ended_at: datetime | None


@dataclass(frozen=True)
class Interval:
    participant: str
    joined_at: datetime
    left_at: datetime | None  # None while the meeting goes on


@dataclass(frozen=True)
class VisitFigures:
    status: Status
    started_at: datetime | None
    # The moment the visit is reported under: its start, or for a no-show, when staff came.
    report_at: datetime | None
    duration_ms: int | None
    lobby_wait_ms: int | None
    attendees: int


def is_staff(role: str | None) -> bool:
    return role in STAFF_ROLES


def intervals(
    changes: Iterable[PresenceChange], meeting_ended_at: datetime | None
) -> list[Interval]:
    """Joins and leaves, from live roster events and the end-of-meeting attendance alike,
    folded into each participant's presence. A join while present and a leave while absent
    are the same moment seen twice by two sources, so they change nothing."""
    by_participant: dict[str, dict[datetime, set[bool]]] = defaultdict(lambda: defaultdict(set))
    for change in changes:
        by_participant[change.participant][change.at].add(change.joined)
    result: list[Interval] = []
    for participant, moments in sorted(by_participant.items()):
        opened: datetime | None = None
        for at in sorted(moments):
            kinds = moments[at]
            if opened is not None and False in kinds:
                result.append(Interval(participant, opened, at))
                # Left and came back in the same instant: a new interval starts right away.
                opened = at if True in kinds else None
            elif opened is None and kinds == {True}:
                opened = at
        if opened is not None:
            closed = max(opened, meeting_ended_at) if meeting_ended_at is not None else None
            result.append(Interval(participant, opened, closed))
    return result


def _sweep(spans: list[Interval], roles: dict[str, str]) -> tuple[datetime | None, int]:
    """First moment staff and a participant are both present, and the most present at once."""
    deltas: dict[datetime, list[tuple[int, bool]]] = defaultdict(list)
    for span in spans:
        staff = is_staff(roles.get(span.participant))
        deltas[span.joined_at].append((1, staff))
        if span.left_at is not None:
            deltas[span.left_at].append((-1, staff))
    staff_present = others_present = most = 0
    started: datetime | None = None
    for at in sorted(deltas):
        # Everything at one instant applies together: half-open intervals.
        for step, staff in deltas[at]:
            if staff:
                staff_present += step
            else:
                others_present += step
        most = max(most, staff_present + others_present)
        if started is None and staff_present > 0 and others_present > 0:
            started = at
    return started, most


def _lobby_wait_ms(observed: Observations, spans: list[Interval]) -> int | None:
    entries = [at for who, at in observed.lobby_entries if not is_staff(observed.roles.get(who))]
    if not entries:
        return None
    first_entry = min(entries)
    # Only the organizer bypasses the lobby, so every join of a non-staff participant is an
    # admission by staff, whether or not the admission itself was reported.
    admitted = [at for who, at in observed.admissions if not is_staff(observed.roles.get(who))]
    admitted += [s.joined_at for s in spans if not is_staff(observed.roles.get(s.participant))]
    after = [at for at in admitted if at >= first_entry]
    return _ms(min(after) - first_entry) if after else None


def _ms(delta: timedelta) -> int:
    return delta // timedelta(milliseconds=1)


def figures(observed: Observations) -> VisitFigures:
    # A join and a leave at the same instant is no presence at all.
    every = intervals(observed.changes, observed.meeting_ended_at)
    spans = [s for s in every if s.left_at != s.joined_at]
    started, attendees = _sweep(spans, observed.roles)
    staff_joins = [s.joined_at for s in spans if is_staff(observed.roles.get(s.participant))]
    others_joined = any(not is_staff(observed.roles.get(s.participant)) for s in spans)
    status: Status
    if observed.meeting_ended_at is None:
        status = "pending"
    elif not staff_joins:
        status = "not_a_visit"
    else:
        status = "completed" if others_joined else "no_show"
    duration_ms: int | None = None
    if status != "pending":
        duration_ms = 0
        leaves = [s.left_at for s in spans if s.left_at is not None]
        if started is not None and leaves:
            duration_ms = _ms(max(leaves) - started)
    report_at = started if started is not None else (min(staff_joins) if staff_joins else None)
    return VisitFigures(
        status=status,
        started_at=started,
        report_at=report_at,
        duration_ms=duration_ms,
        lobby_wait_ms=_lobby_wait_ms(observed, spans),
        attendees=attendees,
    )
