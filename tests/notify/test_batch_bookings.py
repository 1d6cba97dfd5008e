"""notify's batch handler (services/notify/bookings.py) against its per-event handlers, on the
real PostgreSQL: the same events leave the same rows, in a fixed number of statements a poll.

Events are applied as the consumer runner applies them (the inbox in the same transaction);
one schema takes them one event per transaction, the other as one poll.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import asyncpg
import pytest

from libs.common.crypto import DEV_KEYRING, FieldCipher
from libs.common.db import create_pool, migrate
from libs.common.events import (
    AppointmentCancelledV1,
    AppointmentCreatedV1,
    AppointmentRescheduledV1,
    Envelope,
    SmsRequestedV1,
    Topic,
    encode_event,
    make_event,
)
from libs.common.inbox import first_deliveries, first_delivery
from sandbox.microsoft.clock import ManualClock
from services.notify.app import CONSUMER_GROUP, MIGRATIONS
from services.notify.bookings import batch_handler
from services.notify.consumers import handlers
from services.notify.phones import RecipientHasher
from tests.notify.conftest import (
    INTEGRATION,
    OTHER_INTEGRATION,
    START,
    MakeKit,
    integration_config,
)

if TYPE_CHECKING:
    from libs.common.db import Connection

THIRD_INTEGRATION = uuid.UUID("0c3d9a4e-7f21-4b8e-a5d6-3e2f1a0b9c87")
UNCONFIGURED = uuid.UUID("5e8a2b1c-9d7f-4e3a-b6c5-4d3c2b1a0f9e")
# Set by the database (now()) at different moments in each schema, so left out of the rows.
STAMPED = {"received_at", "id", "created_at", "finished_at"}


class Counting:
    """A connection that counts the statements sent through it."""

    QUERIES = frozenset({"execute", "executemany", "fetch", "fetchrow", "fetchval"})

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.statements = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._conn, name)
        if name not in self.QUERIES:
            return attr

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.statements += 1
            return await attr(*args, **kwargs)

        return counted


class Notify:
    """One notify schema, fed as the consumer runner feeds it."""

    def __init__(self, pool: asyncpg.Pool, clock: ManualClock) -> None:
        self.pool = pool
        hasher = RecipientHasher(FieldCipher(DEV_KEYRING, "dev1"), "hash-secret", "US")
        self.handlers = handlers(clock, hasher)
        self.batch = batch_handler(clock, self.handlers, hasher)

    async def one_by_one(self, events: list[Envelope[Any]]) -> int:
        """Each event in its own transaction (the runner's fallback); the handlers'
        statements, the inbox's left out."""
        counting: list[Counting] = []
        for event in events:
            async with self.pool.acquire() as conn, conn.transaction():
                if await first_delivery(conn, CONSUMER_GROUP, event.event_id, event.type):
                    counting.append(Counting(conn))
                    await self.handlers[event.type](cast("Connection", counting[-1]), event)
        return sum(c.statements for c in counting)

    async def as_poll(self, events: list[Envelope[Any]]) -> int:
        """The events as one poll: one transaction, one inbox statement, one batch-handler
        call with the first deliveries in poll order; the batch handler's statements."""
        async with self.pool.acquire() as conn, conn.transaction():
            applied = await first_deliveries(
                conn, CONSUMER_GROUP, [(event.event_id, event.type) for event in events]
            )
            first = [event for event, ok in zip(events, applied, strict=True) if ok]
            counting = Counting(conn)
            await self.batch(cast("Connection", counting), first)
        return counting.statements

    async def rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        def kept(row: asyncpg.Record) -> dict[str, Any]:
            values = {k: v for k, v in row.items() if k not in STAMPED}
            values["finished"] = row["finished_at"] is not None
            return values

        appointments = await self.pool.fetch("SELECT * FROM appointments ORDER BY appointment_key")
        messages = await self.pool.fetch(
            "SELECT * FROM sms_messages"
            " ORDER BY appointment_key, kind, schedule_version, discriminator"
        )
        return (
            [{k: v for k, v in r.items() if k not in STAMPED} for r in appointments],
            [kept(r) for r in messages],
        )


@pytest.fixture
async def pair(database_url: str) -> AsyncIterator[tuple[Notify, Notify]]:
    """Two notify schemas in one database on one hand-driven clock: one by one, batched."""
    clock = ManualClock(START)
    pools: list[asyncpg.Pool] = []
    try:
        for schema in ("notify_one", "notify_batch"):
            pools.append(await create_pool(database_url, schema, max_size=2))
            await migrate(pools[-1], schema, MIGRATIONS)
        yield Notify(pools[0], clock), Notify(pools[1], clock)
    finally:
        for pool in pools:
            await pool.close()


def booking(
    key: str,
    starts_in: timedelta = timedelta(hours=2),
    integration: uuid.UUID = INTEGRATION,
    sms_enabled: bool = True,
    phone: str | None = "ciphertext-of-a-number",
) -> Envelope[Any]:
    starts_at = START + starts_in
    payload = AppointmentCreatedV1(
        integration_id=integration,
        environment="production",
        department="Cardiology",
        starts_at=starts_at,
        ends_at=starts_at + timedelta(minutes=30),
        time_zone="America/Chicago",
        join_url=f"https://visit.example.org/j/{key}",
        patient_phone_encrypted=phone,
        sms_enabled=sms_enabled,
    )
    return make_event(Topic.APPOINTMENT_CREATED, "tenant-a", key, payload)


def again(event: Envelope[Any]) -> Envelope[Any]:
    """The same event published again under a new event id."""
    return event.model_copy(update={"event_id": uuid.uuid4()})


def moved(key: str, starts_in: timedelta, version: int) -> Envelope[Any]:
    starts_at = START + starts_in
    payload = AppointmentRescheduledV1(
        integration_id=INTEGRATION,
        starts_at=starts_at,
        ends_at=starts_at + timedelta(minutes=45),
        time_zone="Europe/Berlin",
        schedule_version=version,
    )
    return make_event(Topic.APPOINTMENT_RESCHEDULED, "tenant-a", key, payload)


def cancelled(key: str, version: int = 1) -> Envelope[Any]:
    payload = AppointmentCancelledV1(
        integration_id=INTEGRATION, reason_code="patient_request", schedule_version=version
    )
    return make_event(Topic.APPOINTMENT_CANCELLED, "tenant-a", key, payload)


def link_pressed(key: str) -> Envelope[Any]:
    payload = SmsRequestedV1(integration_id=INTEGRATION, requested_at=START)
    return make_event(Topic.SMS_REQUESTED, "tenant-a", key, payload)


def configured(integration: uuid.UUID, offsets: list[int], version: int = 1) -> Envelope[Any]:
    payload = integration_config(integration, offsets=offsets, version=version)
    return make_event(Topic.INTEGRATION_CONFIG, "tenant-a", str(integration), payload)


async def test_a_poll_of_mixed_events_leaves_the_rows_of_the_events_applied_one_by_one(
    pair: tuple[Notify, Notify],
) -> None:
    """A poll through the batch handler leaves exactly the appointments and sms_messages
    rows that the same events leave applied one per transaction by the per-event handlers."""
    one, batched = pair
    booked_before = booking("apt_booked_before")
    earlier = [
        configured(INTEGRATION, [15]),
        configured(OTHER_INTEGRATION, [1440, 60, 60, 30]),
        booked_before,
        moved("apt_moved_before", timedelta(hours=5), 2),
        cancelled("apt_cancelled_before"),
    ]
    first_of_twice = booking("apt_twice")
    new = booking("apt_new")
    poll = [
        new,
        booking("apt_sms_off", sms_enabled=False),
        booking("apt_no_phone", phone=None),
        cancelled("apt_cancel_first"),
        booking("apt_cancel_first"),
        moved("apt_move_first", timedelta(hours=3), 2),
        booking("apt_move_first"),
        booking("apt_move_after"),
        moved("apt_move_after", timedelta(hours=3), 2),
        booking("apt_all_at_once"),
        moved("apt_all_at_once", timedelta(hours=4), 2),
        cancelled("apt_all_at_once", 2),
        first_of_twice,
        again(first_of_twice),
        booking("apt_custom", integration=OTHER_INTEGRATION),
        booking("apt_soon", starts_in=timedelta(minutes=10)),
        booking("apt_custom_soon", starts_in=timedelta(minutes=45), integration=OTHER_INTEGRATION),
        again(booked_before),
        booking("apt_moved_before"),
        booking("apt_cancelled_before"),
        link_pressed("apt_new"),
        configured(THIRD_INTEGRATION, [30]),
        booking("apt_third", integration=THIRD_INTEGRATION),
        booking("apt_unconfigured", integration=UNCONFIGURED),
        configured(OTHER_INTEGRATION, [60], version=2),
        booking("apt_custom_after", integration=OTHER_INTEGRATION),
        new,  # delivered twice in one poll
    ]
    for notify in pair:
        await notify.one_by_one(earlier)
    await one.one_by_one(poll)
    await batched.as_poll(poll)

    appointments, messages = await batched.rows()
    assert (appointments, messages) == await one.rows()
    # The poll covered what it claims to: each case left its mark.
    by_key = {a["appointment_key"]: a for a in appointments}
    assert by_key["apt_sms_off"]["phone_encrypted"] is None
    assert by_key["apt_sms_off"]["confirmation"] == "skipped"
    assert by_key["apt_all_at_once"]["cancelled"]
    assert by_key["apt_cancel_first"]["cancelled"]
    assert by_key["apt_move_first"]["booked"]
    assert by_key["apt_move_first"]["schedule_version"] == 2
    reminders: dict[str, list[str]] = {}
    for m in messages:
        if m["kind"] == "reminder":
            reminders.setdefault(m["appointment_key"], []).append(m["discriminator"])
    assert sorted(reminders["apt_custom"]) == ["30", "60"]
    assert reminders["apt_custom_soon"] == ["30"]
    assert "apt_soon" not in reminders
    assert reminders["apt_third"] == ["30"]
    assert reminders["apt_unconfigured"] == ["15"]
    assert reminders["apt_custom_after"] == ["60"]
    # Moved before its confirmation went out: the confirmation carries the new time, no notice.
    assert [
        (m["kind"], m["schedule_version"], m["status"])
        for m in messages
        if m["appointment_key"] == "apt_move_after"
    ] == [
        ("confirmation", 1, "superseded"),
        ("confirmation", 2, "pending"),
        ("reminder", 1, "superseded"),
        ("reminder", 2, "pending"),
    ]
    assert [m["kind"] for m in messages if m["appointment_key"] == "apt_twice"] == [
        "confirmation",
        "reminder",
    ]


async def test_new_bookings_cost_the_same_statements_whatever_their_number(
    pair: tuple[Notify, Notify],
) -> None:
    """A poll of N new bookings costs the batch handler two statements (the integrations'
    reminder offsets, then every row) for any N, where the per-event handlers cost one per
    booking and one more per booking with SMS."""
    one, batched = pair
    for notify in pair:
        await notify.one_by_one(
            [configured(INTEGRATION, [60, 15]), configured(OTHER_INTEGRATION, [30])]
        )
    statements: dict[int, tuple[int, int]] = {}
    for n in (2, 10, 60):
        poll = [
            booking(
                f"apt_{n}_{i}",
                integration=(INTEGRATION, OTHER_INTEGRATION, UNCONFIGURED)[i % 3],
                sms_enabled=i % 4 != 0,
            )
            for i in range(n)
        ]
        statements[n] = (await one.one_by_one(poll), await batched.as_poll(poll))
    assert statements == {n: (n + sum(i % 4 != 0 for i in range(n)), 2) for n in (2, 10, 60)}
    assert await batched.rows() == await one.rows()
    # Without SMS there are no offsets to read: one statement.
    off = [booking(f"apt_off_{i}", sms_enabled=False) for i in range(3)]
    assert await batched.as_poll(off) == 1


async def test_a_burst_of_bookings_through_kafka_ends_with_one_confirmation_each(
    make_kit: MakeKit,
) -> None:
    """Bookings published together reach the running service's consumer in shared polls and
    each gets its confirmation sent and its reminder planned, once."""
    kit = await make_kit()
    await kit.configure()
    keys = [f"apt_burst_{n:02}" for n in range(30)]
    before = kit.applied
    for key in keys:
        event = make_event(Topic.APPOINTMENT_CREATED, "tenant-a", key, kit.booking(key))
        await kit.producer.send(
            kit.settings.topic(event.type), encode_event(event), key=key.encode()
        )
    await kit.producer.flush()
    await kit.until_applied(before + len(keys))
    await kit.until_result("confirmation", "sent", len(keys))
    rows = await kit.query(
        "SELECT kind, count(*) AS n FROM sms_messages WHERE appointment_key = any($1::text[])"
        " GROUP BY kind ORDER BY kind",
        keys,
    )
    assert [(r["kind"], r["n"]) for r in rows] == [("confirmation", 30), ("reminder", 30)]
