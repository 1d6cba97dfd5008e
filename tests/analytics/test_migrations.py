"""The analytics migrations that refile existing facts, run on a schema left as the code
before them left it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from libs.common.db import migrate
from libs.common.events import (
    AppointmentCancelledV1,
    AppointmentCreatedV1,
    Envelope,
    SmsSentV1,
    Topic,
    make_event,
)
from libs.common.portal_auth import PORTAL_MIGRATIONS
from services.analytics import reports, rollup
from services.analytics.app import MIGRATIONS
from services.analytics.rebuild_rollup import rebuild_all
from services.analytics.settings import AnalyticsSettings
from tests.analytics.support import Facts
from tests.analytics.visits import Person, Visit, events

TENANT = "tenant-migrated"
BOOKED = datetime(2026, 3, 11, 15, 0, tzinfo=UTC)


def _cancelled_with_sms(key: str, booked: datetime) -> list[Envelope[Any]]:
    integration = uuid.UUID(int=1)
    created = AppointmentCreatedV1(
        integration_id=integration,
        environment="production",
        department="Cardiology",
        starts_at=booked,
        ends_at=booked + timedelta(minutes=30),
        time_zone="UTC",
    )
    sms = SmsSentV1(integration_id=integration, kind="link", outcome="sent", segments=1, at=booked)
    cancelled = AppointmentCancelledV1(
        integration_id=integration, reason_code="patient", schedule_version=1
    )
    return [
        make_event(Topic.APPOINTMENT_CREATED, TENANT, key, created),
        make_event(Topic.SMS_SENT, TENANT, key, sms),
        make_event(Topic.SMS_SENT, TENANT, key, sms.model_copy(update={"kind": "cancellation"})),
        make_event(Topic.APPOINTMENT_CANCELLED, TENANT, key, cancelled),
    ]


async def _seed(facts: Facts, start: datetime, booked: datetime) -> None:
    visit = Visit(
        key="apt-visit",
        tenant_id=TENANT,
        department="Cardiology",
        environment="production",
        people=[
            Person("dr", "organizer", None, [(start, start + timedelta(minutes=20))]),
            Person("pt", "patient", start, [(start, start + timedelta(minutes=20))]),
        ],
        ended_at=start + timedelta(minutes=20),
        sms_sent=1,
    )
    for event in [*events(visit), *_cancelled_with_sms("apt-cancelled", booked)]:
        await facts.apply(event)


async def _rerun(facts: Facts, version: str, zone: str | None = None) -> None:
    await facts.pool.execute("DELETE FROM schema_migrations WHERE version = $1", version)
    parameters = AnalyticsSettings(report_time_zone=zone).migration_parameters() if zone else {}
    await migrate(facts.pool, "analytics", MIGRATIONS, [PORTAL_MIGRATIONS], parameters)


async def test_sms_of_appointments_that_were_no_visit_are_added_to_the_rollup(
    database_url: str,
) -> None:
    """0006 files the facts that never became a visit and adds their SMS to daily_usage."""
    facts = await Facts.open(database_url)
    try:
        await _seed(facts, datetime(2026, 3, 10, 14, 0, tzinfo=UTC), BOOKED)
        # As before 0006: such facts had no report day and the rollup held visits only.
        await facts.pool.execute(
            "UPDATE appointment_facts SET report_day = NULL WHERE report_at IS NULL"
        )
        async with facts.pool.acquire() as conn, conn.transaction():
            await rollup.rebuild(conn, TENANT)
        await _rerun(facts, "analytics:0006_sms_of_every_appointment")
        usage = await reports.usage(
            facts.pool, TENANT, BOOKED.date() - timedelta(days=1), BOOKED.date(), "day"
        )
        assert [(r.group, r.appointments, r.sms_sent) for r in usage.rows] == [
            ("2026-03-10", 1, 1),
            ("2026-03-11", 0, 2),
        ]
        async with facts.pool.acquire() as conn:
            assert await rollup.check(conn, TENANT) == []
    finally:
        await facts.close()


@pytest.mark.parametrize(
    ("zone", "local"),
    [
        # 01:30 UTC on 1 February.
        (None, datetime(2026, 1, 31, 19, 30, tzinfo=ZoneInfo("America/Chicago"))),
        # 23:30 UTC on 31 January.
        ("Europe/Berlin", datetime(2026, 2, 1, 0, 30, tzinfo=ZoneInfo("Europe/Berlin"))),
    ],
)
async def test_facts_filed_under_utc_days_move_to_their_local_days(
    database_url: str, zone: str | None, local: datetime
) -> None:
    """0007 refiles past facts (zone unknown) on their day in the service's report time zone
    (Chicago when none is given) and rebuilds the rollup."""
    facts = await Facts.open(database_url)
    evening = local.astimezone(UTC)
    try:
        await _seed(facts, evening, evening)
        # As before 0007: no zone kept, facts and the rollup on UTC days.
        await facts.pool.execute(
            "ALTER TABLE appointment_facts DROP COLUMN time_zone;"
            " UPDATE appointment_facts"
            " SET report_day = (coalesce(report_at, scheduled_start) AT TIME ZONE 'UTC')::date"
        )
        async with facts.pool.acquire() as conn, conn.transaction():
            await rollup.rebuild(conn, TENANT)
        day = local.date()
        month = day.replace(day=1)
        assert (await reports.allocation(facts.pool, TENANT, month)).completed == 0
        await _rerun(facts, "analytics:0007_local_report_days", zone)
        rows = await facts.pool.fetch(
            "SELECT DISTINCT report_day, time_zone FROM appointment_facts"
        )
        assert [tuple(r) for r in rows] == [(day, None)]
        usage = await reports.usage(facts.pool, TENANT, day, day + timedelta(days=1), "day")
        assert [(r.group, r.appointments, r.sms_sent) for r in usage.rows] == [
            (day.isoformat(), 1, 3),
            ((day + timedelta(days=1)).isoformat(), 0, 0),
        ]
        assert usage.totals.duration.median_bucket is not None
        assert (await reports.allocation(facts.pool, TENANT, month)).completed == 1
        async with facts.pool.acquire() as conn:
            assert await rollup.check(conn, TENANT) == []
    finally:
        await facts.close()


async def test_the_rebuild_command_repairs_every_tenants_rollup(database_url: str) -> None:
    """rebuild_all replaces a drifted rollup (as an old pod after a migration leaves it) with
    the facts' own and reports no difference left."""
    facts = await Facts.open(database_url)
    try:
        await _seed(facts, datetime(2026, 3, 10, 14, 0, tzinfo=UTC), BOOKED)
        await facts.pool.execute("UPDATE daily_usage SET sms_sent = sms_sent + 1")
        async with facts.pool.acquire() as conn:
            assert await rollup.check(conn, TENANT) != []
        assert await rebuild_all(facts.pool) == {TENANT: []}
    finally:
        await facts.close()
