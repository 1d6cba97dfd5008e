"""Facts and the daily rollup on the real PostgreSQL: random deliveries against the
reference, each edge case of the brief, and the rollup check."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from libs.common.events import (
    AppointmentCancelledV1,
    AppointmentCreatedV1,
    AppointmentRescheduledV1,
    AppointmentRescheduledV2,
    Envelope,
    MeetingEndedV1,
    SmsSentV1,
    Topic,
    make_event,
)
from services.analytics import reports, rollup
from services.analytics.metrics import MetricsRecorder
from tests.analytics.support import Facts
from tests.analytics.visits import Person, Visit, events, expected, visits
from tests.support.privacy import scan_schema

BASE = datetime(2026, 3, 10, 14, 0, tzinfo=UTC)


@st.composite
def delivered(draw: st.DrawFn, tenant_id: str | None = None) -> tuple[Visit, list[Envelope[Any]]]:
    visit = draw(visits(tenant_id=tenant_id or f"tenant-{uuid.uuid4().hex[:8]}"))
    stream = events(visit)
    # The booking and the end of the meeting always arrive; live roster events may not.
    created, live, final = stream[0], stream[1:-1], stream[-1]
    kept = [created, *(e for e in live if draw(st.booleans())), final]
    # Redelivery of the same event (same event_id), as Kafka does after a crash.
    kept += draw(st.lists(st.sampled_from(kept), max_size=3))
    return visit, draw(st.permutations(kept))


async def _check_visit(facts: Facts, visit: Visit, stream: list[Envelope[Any]]) -> None:
    for event in stream:
        await facts.apply(event)
    await _assert_reference(facts, visit, stream)


async def _assert_reference(facts: Facts, visit: Visit, stream: list[Envelope[Any]]) -> None:
    await _assert_facts(facts, visit, stream)
    want = expected(visit)
    sms = len({e.event_id for e in stream if e.type == "sms-sent"})
    day = want.report_day
    usage = await reports.usage(facts.pool, visit.tenant_id, day, day, "department")
    counted = want.status in ("completed", "no_show")
    assert usage.totals.appointments == (1 if counted else 0)
    assert usage.totals.completed == (1 if want.status == "completed" else 0)
    assert usage.totals.sms_sent == sms
    if counted:
        assert usage.totals.duration.sum_ms == want.duration_ms
        assert usage.totals.lobby_wait.sum_ms == (want.lobby_wait_ms or 0)
    async with facts.pool.acquire() as conn:
        assert await rollup.check(conn, visit.tenant_id) == []


async def _assert_facts(facts: Facts, visit: Visit, stream: list[Envelope[Any]]) -> None:
    want = expected(visit)
    got = await facts.fact(visit.key)
    assert (got["status"], got["started_at"], got["duration_ms"]) == (
        want.status,
        want.started_at,
        want.duration_ms,
    )
    assert (got["lobby_wait_ms"], got["attendees"], got["report_day"]) == (
        want.lobby_wait_ms,
        want.attendees,
        want.report_day,
    )
    sms = len({e.event_id for e in stream if e.type == "sms-sent"})
    assert got["sms_sent"] == sms


def test_random_deliveries_give_the_reference_figures(database_url: str) -> None:
    """Random visits, delivered with missing live events, repeats and any order, end with
    the reference figures in the facts and the rollup, and the rollup check passes."""
    loop = asyncio.new_event_loop()
    facts = loop.run_until_complete(Facts.open(database_url))

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(delivered())
    def run(case: tuple[Visit, list[Envelope[Any]]]) -> None:
        loop.run_until_complete(_check_visit(facts, *case))

    try:
        run()
    finally:
        loop.run_until_complete(facts.close())
        loop.close()


@st.composite
def polls(draw: st.DrawFn) -> tuple[list[tuple[Visit, list[Envelope[Any]]]], list[list[Any]]]:
    """Several visits of one tenant (so they share rollup rows), their deliveries interleaved
    in one stream and cut into polls of any size."""
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    cases = draw(st.lists(delivered(tenant), min_size=1, max_size=4))
    stream = draw(st.permutations([e for _, events in cases for e in events]))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=6)))
    bounds = [0, *cuts, len(stream)]
    return cases, [stream[a:b] for a, b in itertools.pairwise(bounds) if a < b]


def test_polls_of_any_size_give_the_reference_figures(database_url: str) -> None:
    """Visits of one tenant delivered together in polls of any size (repeats and any order
    included), each poll applied in one call as the consumer's batch handler does, end with
    the reference figures in the facts, and the rollup they share equals the facts."""
    loop = asyncio.new_event_loop()
    facts = loop.run_until_complete(Facts.open(database_url))

    async def check(cases: list[tuple[Visit, list[Envelope[Any]]]], cut: list[list[Any]]) -> None:
        for poll in cut:
            await facts.apply_poll(poll)
        for visit, stream in cases:
            await _assert_facts(facts, visit, stream)
        tenant = cases[0][0].tenant_id
        wanted = [expected(v) for v, _ in cases]
        counted = [w for w in wanted if w.status in ("completed", "no_show")]
        days = [w.report_day for w in counted]
        if days:
            usage = await reports.usage(facts.pool, tenant, min(days), max(days), "department")
            assert usage.totals.appointments == len(counted)
            assert usage.totals.duration.sum_ms == sum(w.duration_ms or 0 for w in counted)
        async with facts.pool.acquire() as conn:
            assert await rollup.check(conn, tenant) == []

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(polls())
    def run(case: tuple[list[tuple[Visit, list[Envelope[Any]]]], list[list[Any]]]) -> None:
        loop.run_until_complete(check(*case))

    try:
        run()
    finally:
        loop.run_until_complete(facts.close())
        loop.close()


@pytest.fixture
async def facts(database_url: str) -> AsyncIterator[Facts]:
    opened = await Facts.open(database_url)
    yield opened
    await opened.close()


def _visit(people: list[Person], ended_after_s: int = 0, tenant: str = "tenant-edge") -> Visit:
    last = max((b for p in people for _, b in p.intervals), default=BASE)
    return Visit(
        key=f"apt-{uuid.uuid4().hex}",
        tenant_id=tenant,
        department="Cardiology",
        environment="production",
        people=people,
        ended_at=last + timedelta(seconds=ended_after_s),
    )


def _t(minutes: float) -> datetime:
    return BASE + timedelta(minutes=minutes)


async def _apply_all(facts: Facts, stream: list[Envelope[Any]]) -> None:
    for event in stream:
        await facts.apply(event)


async def test_no_patient_is_a_no_show(facts: Facts) -> None:
    """Staff joined, nobody else did, the meeting ended: No show, duration 0."""
    visit = _visit([Person("dr", "organizer", None, [(_t(0), _t(10))])])
    await _apply_all(facts, events(visit))
    fact = await facts.fact(visit.key)
    assert (fact["status"], fact["duration_ms"], fact["attendees"]) == ("no_show", 0, 1)
    assert fact["report_day"] == BASE.date()


async def test_patient_in_lobby_only_is_a_no_show(facts: Facts) -> None:
    """A patient who waited but was never admitted did not join: No show, wait unmeasured."""
    visit = _visit(
        [
            Person("dr", "organizer", None, [(_t(5), _t(10))]),
            Person("pt", "patient", _t(0), []),
        ]
    )
    await _apply_all(facts, events(visit))
    fact = await facts.fact(visit.key)
    assert (fact["status"], fact["lobby_wait_ms"]) == ("no_show", None)


async def test_no_provider_is_not_a_visit(facts: Facts) -> None:
    """Nobody from staff joined: not counted as a visit, not in the report."""
    visit = _visit([Person("pt", "patient", _t(0), [(_t(1), _t(9))])])
    await _apply_all(facts, events(visit))
    fact = await facts.fact(visit.key)
    assert fact["status"] == "not_a_visit"
    usage = await reports.usage(facts.pool, visit.tenant_id, BASE.date(), BASE.date(), "day")
    assert usage.totals.appointments == 0
    page, _ = await reports.meetings(facts.pool, visit.tenant_id, BASE.date(), BASE.date(), 10)
    assert page == []


async def test_patient_left_and_rejoined_counts_to_the_last_leave(facts: Facts) -> None:
    """Patient in 2-10 and 15-30 with the clinician 1-25: start 2, duration to 30."""
    visit = _visit(
        [
            Person("dr", "organizer", None, [(_t(1), _t(25))]),
            Person("pt", "patient", _t(0), [(_t(2), _t(10)), (_t(15), _t(30))]),
        ]
    )
    await _apply_all(facts, events(visit))
    fact = await facts.fact(visit.key)
    assert fact["status"] == "completed"
    assert fact["started_at"] == _t(2)
    assert fact["duration_ms"] == 28 * 60_000
    assert fact["lobby_wait_ms"] == 2 * 60_000
    assert fact["attendees"] == 2


async def test_meeting_across_midnight_belongs_to_its_start_day(facts: Facts) -> None:
    """Started 23:50 UTC, ended 00:40 the next day: reported on the start day."""
    start = datetime(2026, 3, 10, 23, 50, tzinfo=UTC)
    visit = _visit(
        [
            Person("dr", "organizer", None, [(start, start + timedelta(minutes=50))]),
            Person("pt", "patient", start, [(start, start + timedelta(minutes=45))]),
        ]
    )
    await _apply_all(facts, events(visit))
    fact = await facts.fact(visit.key)
    assert fact["report_day"] == date(2026, 3, 10)
    for day, count in ((date(2026, 3, 10), 1), (date(2026, 3, 11), 0)):
        usage = await reports.usage(facts.pool, visit.tenant_id, day, day, "day")
        assert usage.totals.appointments == count


async def test_meeting_ended_before_patient_joined_still_ends_correctly(facts: Facts) -> None:
    """meeting-ended first, then the live events late: the same final figures."""
    visit = _visit(
        [
            Person("dr", "organizer", None, [(_t(1), _t(20))]),
            Person("pt", "patient", _t(0), [(_t(3), _t(20))]),
        ]
    )
    stream = events(visit)
    await _apply_all(facts, [stream[-1], *reversed(stream[:-1])])
    fact = await facts.fact(visit.key)
    assert (fact["status"], fact["started_at"], fact["lobby_wait_ms"]) == (
        "completed",
        _t(3),
        3 * 60_000,
    )


async def test_same_event_twice_changes_nothing(facts: Facts) -> None:
    """The second delivery of an event is skipped by the inbox and the rollup is unchanged."""
    visit = _visit(
        [
            Person("dr", "organizer", None, [(_t(1), _t(20))]),
            Person("pt", "patient", _t(0), [(_t(3), _t(20))]),
        ]
    )
    stream = events(visit)
    await _apply_all(facts, stream)
    before = await facts.pool.fetch("SELECT * FROM daily_usage ORDER BY day")
    assert [await facts.apply(e) for e in stream] == [False] * len(stream)
    assert await facts.pool.fetch("SELECT * FROM daily_usage ORDER BY day") == before


async def test_late_event_corrects_the_figures_it_touches(facts: Facts) -> None:
    """A patient-joined arriving after the meeting ended adds the lobby wait, and an early
    department-less visit moves into its department when appointment-created arrives."""
    visit = _visit(
        [
            Person("dr", "organizer", None, [(_t(1), _t(20))]),
            Person("pt", "patient", _t(0), [(_t(3), _t(20))]),
        ]
    )
    stream = events(visit)
    created, final = stream[0], stream[-1]
    joined = next(e for e in stream if e.type == "patient-joined")
    # Attendance reports carry no lobby time; only the live patient-joined does.
    ended = final.payload
    assert isinstance(ended, MeetingEndedV1)
    final = make_event(
        Topic.MEETING_ENDED,
        visit.tenant_id,
        visit.key,
        ended.model_copy(
            update={
                "participants": [
                    a.model_copy(update={"lobby_entered_at": None}) for a in ended.participants
                ]
            }
        ),
    )
    await facts.apply(final)
    fact = await facts.fact(visit.key)
    assert (fact["status"], fact["department"]) == ("completed", None)
    assert (
        await reports.usage(facts.pool, visit.tenant_id, BASE.date(), BASE.date(), "day")
    ).totals.appointments == 0
    await facts.apply(created)
    usage = await reports.usage(facts.pool, visit.tenant_id, BASE.date(), BASE.date(), "department")
    assert [(r.group, r.appointments) for r in usage.rows] == [("Cardiology", 1)]
    assert (await facts.fact(visit.key))["lobby_wait_ms"] is None
    await facts.apply(joined)
    assert (await facts.fact(visit.key))["lobby_wait_ms"] == 3 * 60_000
    async with facts.pool.acquire() as conn:
        assert await rollup.check(conn, visit.tenant_id) == []


async def test_check_finds_a_tampered_rollup(facts: Facts) -> None:
    """The rollup check reports rows that no longer match the facts; a rebuild repairs them."""
    visit = _visit(
        [
            Person("dr", "organizer", None, [(_t(1), _t(20))]),
            Person("pt", "patient", _t(0), [(_t(3), _t(20))]),
        ]
    )
    await _apply_all(facts, events(visit))
    await facts.pool.execute("UPDATE daily_usage SET duration_sum_ms = duration_sum_ms + 1")
    await facts.pool.execute("UPDATE daily_histogram_counts SET counts[1] = counts[1] + 1")
    async with facts.pool.acquire() as conn:
        problems = await rollup.check(conn, visit.tenant_id)
    assert any("daily_usage" in p for p in problems)
    assert any("daily_histogram_counts" in p for p in problems)
    async with facts.pool.acquire() as conn, conn.transaction():
        await rollup.rebuild(conn, visit.tenant_id)
    async with facts.pool.acquire() as conn:
        assert await rollup.check(conn, visit.tenant_id) == []


async def test_sms_seen_before_its_booking_is_counted_under_the_booking_department(
    facts: Facts,
) -> None:
    """An sms-sent consumed before appointment-created reaches the metric under the booking's
    department once the booking arrives, never under "unknown"."""
    department = f"Dept {uuid.uuid4().hex[:6]}"
    visit = _visit([Person("dr", "organizer", None, [(_t(0), _t(10))])])
    visit = replace(visit, department=department, sms_sent=2)
    stream = events(visit)
    sms = [e for e in stream if e.type == Topic.SMS_SENT]
    rest = [e for e in stream if e.type != Topic.SMS_SENT]
    assert len(sms) == 2
    await _apply_all(facts, [*sms, *rest])
    facts.projector.metrics.on_batch([(e.type, str(e.event_id), True) for e in [*sms, *rest]])

    def counted(dept: str) -> float:
        value = REGISTRY.get_sample_value(
            "appointment_sms_sent_total", {"environment": "production", "department": dept}
        )
        return value or 0.0

    assert counted(department) == 2
    assert (await facts.fact(visit.key))["sms_sent"] == 2


class CountingSms(MetricsRecorder):
    """Records the SMS counts stashed for the metric, by label, instead of observing them."""

    def __init__(self) -> None:
        super().__init__()
        self.counted: dict[tuple[str, str], int] = {}

    def sms_sent(
        self, event_id: str, environment: str | None, department: str | None, count: int = 1
    ) -> None:
        labels = self.labels(environment, department)
        self.counted[labels] = self.counted.get(labels, 0) + count


def _booked(key: str, department: str) -> Envelope[Any]:
    payload = AppointmentCreatedV1(
        integration_id=uuid.UUID(int=1),
        environment="production",
        department=department,
        starts_at=BASE,
        ends_at=BASE + timedelta(minutes=30),
        time_zone="UTC",
    )
    return make_event(Topic.APPOINTMENT_CREATED, "tenant-labels", key, payload)


def _sent(key: str) -> Envelope[Any]:
    payload = SmsSentV1(
        integration_id=uuid.UUID(int=1), kind="link", outcome="sent", segments=1, at=BASE
    )
    return make_event(Topic.SMS_SENT, "tenant-labels", key, payload)


@pytest.mark.parametrize(
    "script",
    [
        # Booked under X earlier; re-booked under Y, then a message: counted under Y.
        ["book X", "|", "book Y", "sms"],
        # A message between two bookings: counted under the first.
        ["book X", "sms", "book Y"],
        # Messages before the booking wait for its department.
        ["sms", "sms", "book X", "sms"],
        ["sms", "|", "sms", "book Y", "sms"],
    ],
)
async def test_sms_metric_labels_do_not_depend_on_where_polls_are_cut(
    facts: Facts, script: list[str]
) -> None:
    """The SMS metric counts each message under the same department whether the events are
    applied one at a time or in polls ("|" ends a poll)."""
    runs: list[dict[tuple[str, str], int]] = []
    for one_at_a_time in (True, False):
        key = f"apt-{uuid.uuid4().hex}"
        suffix = uuid.uuid4().hex[:6]
        polls: list[list[Envelope[Any]]] = [[]]
        for step in script:
            if step == "|":
                polls.append([])
            elif step == "sms":
                polls[-1].append(_sent(key))
            else:
                polls[-1].append(_booked(key, f"{step.split()[1]}-{suffix}"))
        facts.projector.metrics = CountingSms()
        for poll in polls:
            if one_at_a_time:
                await _apply_all(facts, poll)
            else:
                await facts.apply_poll(poll)
        counted = facts.projector.metrics.counted
        runs.append({(env, dept.split("-")[0]): n for (env, dept), n in counted.items()})
    assert runs[0] == runs[1]
    assert sum(runs[0].values()) == script.count("sms")


async def test_sms_of_a_cancelled_appointment_reach_the_usage_report(facts: Facts) -> None:
    """SMS sent for an appointment cancelled before its visit count on its booked day."""
    key, department = f"apt-{uuid.uuid4().hex}", f"Dept {uuid.uuid4().hex[:6]}"
    booked = BASE + timedelta(days=1)
    created = make_event(
        Topic.APPOINTMENT_CREATED,
        "tenant-cancelled",
        key,
        AppointmentCreatedV1(
            integration_id=uuid.UUID(int=1),
            environment="production",
            department=department,
            starts_at=booked,
            ends_at=booked + timedelta(minutes=30),
            time_zone="UTC",
            sms_enabled=True,
        ),
    )
    sent = [
        make_event(
            Topic.SMS_SENT,
            "tenant-cancelled",
            key,
            SmsSentV1(
                integration_id=uuid.UUID(int=1), kind=kind, outcome="sent", segments=1, at=BASE
            ),
        )
        for kind in ("confirmation", "cancellation")
    ]
    cancelled = make_event(
        Topic.APPOINTMENT_CANCELLED,
        "tenant-cancelled",
        key,
        AppointmentCancelledV1(
            integration_id=uuid.UUID(int=1), reason_code="patient", schedule_version=1
        ),
    )
    stream = [created, *sent, cancelled]
    await _apply_all(facts, stream)
    facts.projector.metrics.on_batch([(e.type, str(e.event_id), True) for e in stream])
    metric = REGISTRY.get_sample_value(
        "appointment_sms_sent_total", {"environment": "production", "department": department}
    )
    usage = await reports.usage(facts.pool, "tenant-cancelled", booked.date(), booked.date(), "day")
    assert (usage.totals.sms_sent, usage.totals.appointments, metric) == (2, 0, 2)
    async with facts.pool.acquire() as conn:
        assert await rollup.check(conn, "tenant-cancelled") == []


CHICAGO_EVENING = datetime(2026, 1, 31, 19, 30, tzinfo=ZoneInfo("America/Chicago"))


def _booking(key: str, zone: str, version: int = 1, phone: str | None = None) -> Envelope[Any]:
    start = CHICAGO_EVENING.astimezone(UTC)
    if version == 1:
        payload: Any = AppointmentCreatedV1(
            integration_id=uuid.UUID(int=1),
            environment="production",
            department="Cardiology",
            starts_at=start,
            ends_at=start + timedelta(minutes=30),
            time_zone=zone,
        )
        return make_event(Topic.APPOINTMENT_CREATED, "tenant-zones", key, payload)
    payload = AppointmentRescheduledV1(
        integration_id=uuid.UUID(int=1),
        starts_at=start,
        ends_at=start + timedelta(minutes=30),
        time_zone=zone,
        schedule_version=version,
    )
    if phone is not None:
        payload = AppointmentRescheduledV2(**payload.model_dump(), patient_phone_encrypted=phone)
    return make_event(Topic.APPOINTMENT_RESCHEDULED, "tenant-zones", key, payload)


def _held_at_chicago_evening(key: str) -> list[Envelope[Any]]:
    start = CHICAGO_EVENING.astimezone(UTC)
    visit = Visit(
        key=key,
        tenant_id="tenant-zones",
        department="Cardiology",
        environment="production",
        people=[
            Person("dr", "organizer", None, [(start, start + timedelta(minutes=20))]),
            Person("pt", "patient", start, [(start, start + timedelta(minutes=20))]),
        ],
        ended_at=start + timedelta(minutes=20),
    )
    return events(visit)[1:]  # all but the booking


async def _filed(facts: Facts, key: str) -> tuple[date, int, int, int]:
    """The visit's report day, its January and February allocation counts, and its count in
    the meeting list of 31 January."""
    january = await reports.allocation(facts.pool, "tenant-zones", date(2026, 1, 15))
    february = await reports.allocation(facts.pool, "tenant-zones", date(2026, 2, 1))
    day = date(2026, 1, 31)
    listed, _ = await reports.meetings(facts.pool, "tenant-zones", day, day, 10)
    async with facts.pool.acquire() as conn:
        assert await rollup.check(conn, "tenant-zones") == []
    fact = await facts.fact(key)
    return fact["report_day"], january.completed, february.completed, len(listed)


async def test_an_evening_visit_in_chicago_counts_on_its_local_day_and_month(
    facts: Facts,
) -> None:
    """A 19:30 visit in Chicago on 31 January (1 February in UTC) is a January visit."""
    key = f"apt-{uuid.uuid4().hex}"
    await _apply_all(facts, [_booking(key, "America/Chicago"), *_held_at_chicago_evening(key)])
    assert await _filed(facts, key) == (date(2026, 1, 31), 1, 0, 1)
    usage = await reports.usage(
        facts.pool, "tenant-zones", date(2026, 1, 31), date(2026, 2, 1), "day"
    )
    assert [(r.group, r.appointments) for r in usage.rows] == [
        ("2026-01-31", 1),
        ("2026-02-01", 0),
    ]


@pytest.mark.parametrize("order", ["rescheduled last", "rescheduled first", "one poll"])
async def test_a_zone_that_arrives_late_refiles_the_visit(facts: Facts, order: str) -> None:
    """A reschedule naming the Chicago zone moves a visit filed in UTC to its local day, in
    any order; the zone of the newest schedule wins and the rollup stays exact."""
    key = f"apt-{uuid.uuid4().hex}"
    held, utc, chicago = (
        _held_at_chicago_evening(key),
        _booking(key, "UTC"),
        _booking(key, "America/Chicago", version=2),
    )
    if order == "rescheduled last":
        await _apply_all(facts, [utc, *held])
        assert await _filed(facts, key) == (date(2026, 2, 1), 0, 1, 0)
        await facts.apply(chicago)
    elif order == "rescheduled first":
        await _apply_all(facts, [chicago, *held, utc])
    else:
        await facts.apply_poll([*held, utc, chicago])
    assert await _filed(facts, key) == (date(2026, 1, 31), 1, 0, 1)


async def test_a_move_carrying_the_number_refiles_the_visit_and_keeps_no_number(
    facts: Facts,
) -> None:
    """A V2 reschedule (a visit moved after its end, carrying the number for notify) moves the
    visit as V1 does; analytics keeps none of its ciphertext."""
    key = f"apt-{uuid.uuid4().hex}"
    ciphertext = "enc:v1:not-kept-by-analytics"
    await _apply_all(facts, [_booking(key, "UTC"), *_held_at_chicago_evening(key)])
    await facts.apply(_booking(key, "America/Chicago", version=2, phone=ciphertext))
    assert await _filed(facts, key) == (date(2026, 1, 31), 1, 0, 1)
    async with facts.pool.acquire() as conn:
        assert await scan_schema(conn, "analytics", [key])  # the search reaches its rows
        assert await scan_schema(conn, "analytics", [ciphertext]) == []


async def test_a_booking_without_a_known_zone_counts_in_the_report_time_zone(
    facts: Facts,
) -> None:
    """A booking whose time zone is no IANA zone is filed on the report time zone's day."""
    key = f"apt-{uuid.uuid4().hex}"
    await _apply_all(facts, [_booking(key, "Central Time"), *_held_at_chicago_evening(key)])
    assert facts.projector.report_zone.key == "America/Chicago"
    assert await _filed(facts, key) == (date(2026, 1, 31), 1, 0, 1)
    assert (await facts.fact(key))["time_zone"] is None
