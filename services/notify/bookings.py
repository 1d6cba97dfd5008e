"""Notify's batch handler: a poll's new bookings in a fixed number of statements.

Most of a poll is usually bookings of appointments notify has not seen. Those that come first
for their appointment in the poll are inserted together: one statement reads the reminder
offsets of their integrations, one inserts the appointments and, for the rows it actually
created, their confirmations and reminders. Every other event (other topics, later events of
the same appointment, bookings whose row already existed) then goes through the per-event
handler, on the same connection and in poll order. The effect is that of the per-event
handlers applied one by one, which is what the consumer runner falls back to if this raises.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from libs.common.events import AppointmentCreatedV1, Envelope, IntegrationConfigV1, SmsKind
from libs.common.kafka import BatchHandler, EventHandler
from services.notify.clock import Clock
from services.notify.consumers import chosen_offsets, due_reminders, repeatability_request_id
from services.notify.phones import RecipientHasher

if TYPE_CHECKING:
    from libs.common.db import Connection

# The same rows as consumers._FIRST_BOOKING, for many bookings: appointments that already
# exist are left alone (DO NOTHING), and only the rows inserted get their messages.
_FIRST_BOOKINGS = (
    "WITH booked AS (INSERT INTO appointments (appointment_key, tenant_id, integration_id,"
    " starts_at, ends_at, time_zone, sms_enabled, schedule_version, confirmation, join_url,"
    " phone_encrypted, recipient_hash)"
    " SELECT k, t, i, s, e, z, sms, v, CASE WHEN sms THEN 'pending' ELSE 'skipped' END, j, ph,"
    " h FROM unnest($1::text[], $2::text[], $3::uuid[], $4::timestamptz[], $5::timestamptz[],"
    " $6::text[], $7::boolean[], $8::int[], $9::text[], $10::text[], $17::text[])"
    " AS b(k, t, i, s, e, z, sms, v, j, ph, h) ORDER BY k"
    " ON CONFLICT (appointment_key) DO NOTHING RETURNING appointment_key),"
    " planned AS (INSERT INTO sms_messages (appointment_key, kind, schedule_version,"
    " discriminator, send_at, due_at, repeatability_request_id)"
    " SELECT m.k, m.kind, m.v, m.d, m.t, m.t, m.r"
    " FROM unnest($11::text[], $12::text[], $13::int[], $14::text[], $15::timestamptz[],"
    " $16::uuid[]) AS m(k, kind, v, d, t, r)"
    " JOIN booked ON booked.appointment_key = m.k ORDER BY m.k, m.kind, m.d"
    " ON CONFLICT (appointment_key, kind, schedule_version, discriminator) DO NOTHING)"
    " SELECT appointment_key FROM booked"
)


def first_bookings(events: Sequence[Envelope[Any]]) -> list[Envelope[Any]]:
    """The bookings that may be inserted before the rest of the poll is applied: each is the
    first event of its appointment in the poll, and no integration-config event before it
    changes its integration's reminder offsets."""
    seen: set[str] = set()
    reconfigured: set[uuid.UUID] = set()
    chosen: list[Envelope[Any]] = []
    for event in events:
        p = event.payload
        if isinstance(p, IntegrationConfigV1):
            reconfigured.add(p.integration_id)
            continue
        if (
            isinstance(p, AppointmentCreatedV1)
            and event.key not in seen
            and p.integration_id not in reconfigured
        ):
            chosen.append(event)
        seen.add(event.key)
    return chosen


async def _offsets(conn: Connection, integration_ids: set[uuid.UUID]) -> dict[uuid.UUID, list[int]]:
    rows = await conn.fetch(
        "SELECT integration_id, reminder_offsets_minutes FROM integrations"
        " WHERE integration_id = any($1::uuid[])",
        sorted(integration_ids),
    )
    return {row["integration_id"]: row["reminder_offsets_minutes"] for row in rows}


async def insert_bookings(
    conn: Connection,
    bookings: Sequence[Envelope[Any]],
    now: datetime,
    hasher: RecipientHasher,
) -> set[str]:
    """Inserts the appointments of bookings whose appointment is new, with their messages
    (and each number kept with its recipient_hash, from `hasher`); returns the keys inserted
    (the others are left to the per-event handler)."""
    ordered = sorted(bookings, key=lambda event: event.key)
    payloads: list[AppointmentCreatedV1] = []
    for event in ordered:
        assert isinstance(event.payload, AppointmentCreatedV1)
        payloads.append(event.payload)
    with_sms = {p.integration_id for p in payloads if p.sms_enabled}
    stored = await _offsets(conn, with_sms) if with_sms else {}
    messages: list[tuple[str, SmsKind, int, str, datetime]] = []
    for event, p in zip(ordered, payloads, strict=True):
        if not p.sms_enabled:
            continue
        messages.append((event.key, "confirmation", p.schedule_version, "", now))
        offsets = chosen_offsets(stored.get(p.integration_id))
        for discriminator, send_at in due_reminders(p.starts_at, offsets, now):
            messages.append((event.key, "reminder", p.schedule_version, discriminator, send_at))
    # The number is worth keeping only if SMS may go to it.
    phones = [p.patient_phone_encrypted if p.sms_enabled else None for p in payloads]
    rows = await conn.fetch(
        _FIRST_BOOKINGS,
        [event.key for event in ordered],
        [event.tenant_id for event in ordered],
        [p.integration_id for p in payloads],
        [p.starts_at for p in payloads],
        [p.ends_at for p in payloads],
        [p.time_zone for p in payloads],
        [p.sms_enabled for p in payloads],
        [p.schedule_version for p in payloads],
        [p.join_url for p in payloads],
        phones,
        [m[0] for m in messages],
        [m[1] for m in messages],
        [m[2] for m in messages],
        [m[3] for m in messages],
        [m[4] for m in messages],
        [repeatability_request_id(k, kind, v, d) for k, kind, v, d, _ in messages],
        [hasher.held(phone, event.key) for phone, event in zip(phones, ordered, strict=True)],
    )
    return {row["appointment_key"] for row in rows}


def batch_handler(
    clock: Clock, handlers: Mapping[str, EventHandler], hasher: RecipientHasher
) -> BatchHandler:
    """The batch form of `handlers` (consumers.handlers(clock, hasher)), with the same effect."""

    async def apply(conn: Connection, events: list[Envelope[Any]]) -> None:
        bookings = first_bookings(events)
        inserted = await insert_bookings(conn, bookings, clock.now(), hasher) if bookings else set()
        done = {event.event_id for event in bookings if event.key in inserted}
        for event in events:
            if event.event_id not in done:
                await handlers[event.type](conn, event)

    return apply
