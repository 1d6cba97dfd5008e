"""Event handlers. Each runs in the consumer's transaction with its inbox row, so a message
is planned exactly once however often an event is delivered.

Appointment topics are not ordered with each other, so a reschedule or cancel may arrive
before the booking; it leaves an unbooked row that the booking completes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from libs.common.events import (
    AppointmentCancelledV1,
    AppointmentCreatedV1,
    AppointmentRescheduledV1,
    AppointmentRescheduledV2,
    Envelope,
    IntegrationConfigV1,
    SmsKind,
    SmsOutcome,
    SmsRequestedV1,
    SmsSentV1,
    Topic,
    encode_event,
    make_event,
)
from libs.common.kafka import EventHandler
from services.notify import metrics
from services.notify.clock import Clock
from services.notify.lost_sends import record_reported
from services.notify.phones import RecipientHasher
from services.notify.purge import purging

if TYPE_CHECKING:
    from libs.common.db import Connection

# Fixed forever: changing it would change every repeatabilityRequestId and allow re-sends.
REPEATABILITY_NAMESPACE = uuid.UUID("6f2b8f0e-4c1d-5a7e-9b3f-2d8e1c0a7b54")
DEFAULT_REMINDER_OFFSETS = (15,)


def repeatability_request_id(
    appointment_key: str, kind: SmsKind, schedule_version: int, discriminator: str
) -> uuid.UUID:
    """Stable per message, so a retry after a crash is recognised by ACS as the same send."""
    return uuid.uuid5(
        REPEATABILITY_NAMESPACE, f"{appointment_key}|{kind}|{schedule_version}|{discriminator}"
    )


async def plan(
    conn: Connection,
    appointment_key: str,
    kind: SmsKind,
    schedule_version: int,
    send_at: datetime,
    discriminator: str = "",
) -> None:
    await conn.execute(
        "INSERT INTO sms_messages (appointment_key, kind, schedule_version, discriminator,"
        " send_at, due_at, repeatability_request_id) VALUES ($1,$2,$3,$4,$5,$5,$6)"
        " ON CONFLICT (appointment_key, kind, schedule_version, discriminator) DO NOTHING",
        appointment_key,
        kind,
        schedule_version,
        discriminator,
        send_at,
        repeatability_request_id(appointment_key, kind, schedule_version, discriminator),
    )


def chosen_offsets(stored: Iterable[int] | None) -> Iterable[int]:
    """An integration's reminder offsets as stored (None: no such integration) to plan by."""
    return sorted(set(stored)) if stored else DEFAULT_REMINDER_OFFSETS


async def reminder_offsets(conn: Connection, integration_id: uuid.UUID) -> Iterable[int]:
    offsets = await conn.fetchval(
        "SELECT reminder_offsets_minutes FROM integrations WHERE integration_id = $1",
        integration_id,
    )
    return chosen_offsets(offsets)


def due_reminders(
    starts_at: datetime, offsets: Iterable[int], now: datetime
) -> list[tuple[str, datetime]]:
    """(discriminator, send_at) of the reminders still ahead. A reminder whose moment has
    passed would arrive late and out of place; the confirmation or reschedule notice already
    carries the time."""
    return [
        (str(offset), starts_at - timedelta(minutes=offset))
        for offset in offsets
        if starts_at - timedelta(minutes=offset) > now
    ]


_PLAN_MANY = (
    "INSERT INTO sms_messages (appointment_key, kind, schedule_version, discriminator,"
    " send_at, due_at, repeatability_request_id)"
    " SELECT $1::text, $2::text, $3::int, d, t, t, r"
    " FROM unnest($4::text[], $5::timestamptz[], $6::uuid[]) AS m(d, t, r)"
    " ON CONFLICT (appointment_key, kind, schedule_version, discriminator) DO NOTHING"
)


async def plan_reminders(
    conn: Connection,
    appointment_key: str,
    integration_id: uuid.UUID,
    starts_at: datetime,
    schedule_version: int,
    now: datetime,
    offsets: Iterable[int] | None = None,
) -> None:
    """Plans the integration's reminders (one statement for all of them); `offsets` when the
    caller has read them already."""
    chosen = await reminder_offsets(conn, integration_id) if offsets is None else offsets
    due = due_reminders(starts_at, chosen, now)
    if not due:
        return
    await conn.execute(
        _PLAN_MANY,
        appointment_key,
        "reminder",
        schedule_version,
        [d for d, _ in due],
        [t for _, t in due],
        [
            repeatability_request_id(appointment_key, "reminder", schedule_version, d)
            for d, _ in due
        ],
    )


async def drop_pending(
    conn: Connection,
    appointment_key: str,
    kinds: tuple[SmsKind, ...],
    status: str,
    sparing_in_flight: bool = False,
) -> bool:
    """Whether any was dropped. With `sparing_in_flight`, a message sent to ACS without an
    answer yet (or without any: a timeout, a crash) is left: it may be at ACS already. One
    put off (the rate limit, a retry after ACS refused it, waiting) is not. One dropped in
    flight whose delivery report came first is recorded sent from it (lost_sends): its answer
    was lost, and no retry will learn it now."""
    dropped = await conn.fetch(
        "UPDATE sms_messages SET status = $3, finished_at = now()"
        " WHERE appointment_key = $1 AND status = 'pending' AND kind = any($2::text[])"
        " AND NOT ($4 AND in_flight_since IS NOT NULL)"
        " RETURNING id, in_flight_since IS NOT NULL AS in_flight",
        appointment_key,
        list(kinds),
        status,
        sparing_in_flight,
    )
    # A new statement, so a report committed while this one waited on a row is seen.
    for kind in await record_reported(conn, [row["id"] for row in dropped if row["in_flight"]]):
        metrics.SMS_SENT_FROM_REPORTS.labels(kind).inc()
    return bool(dropped)


# Messages that can no longer go out, finished as the dispatcher finishes a refusal: status,
# outcome and reason, the appointment's confirmation state, an sms-sent event each (written by
# the caller). {which} chooses the appointments, from $1. One a dispatcher may have at ACS
# already is left to it: an accepted send is recorded whatever the row says, and one that
# comes back unsent is refused then (SMS off, no number), or recorded sent if its delivery
# report came first (scheduler.Dispatcher: a send whose answer was lost). So none refused here
# was ever at ACS, and no report can name it. The messages are locked first in id
# order, the order of the dispatcher's outcome write, so the two wait instead of deadlocking.
_REFUSE_PENDING = (
    "WITH refused AS (UPDATE sms_messages m SET status = 'refused', outcome = $2,"
    " reason = $3, finished_at = $4 FROM appointments a"
    " WHERE m.id = any(ARRAY(SELECT m.id FROM sms_messages m JOIN appointments a"
    " ON a.appointment_key = m.appointment_key WHERE {which} AND m.status = 'pending'"
    " AND m.in_flight_since IS NULL ORDER BY m.id FOR UPDATE OF m))"
    " AND a.appointment_key = m.appointment_key AND m.status = 'pending'"
    " AND m.in_flight_since IS NULL"
    " RETURNING m.appointment_key, m.kind, a.tenant_id, a.integration_id),"
    " confirmed AS (UPDATE appointments a SET confirmation = $5 FROM refused r"
    " WHERE a.appointment_key = r.appointment_key AND r.kind = 'confirmation')"
    " SELECT * FROM refused ORDER BY appointment_key"
)
_OF_INTEGRATION = _REFUSE_PENDING.format(which="a.integration_id = $1::uuid")
_OF_APPOINTMENTS = _REFUSE_PENDING.format(which="a.appointment_key = any($1::text[])")
_PURGE_INTEGRATION = purging("a.integration_id = $2::uuid")
_ANNOUNCE = (
    "INSERT INTO outbox (event_id, topic, key, payload)"
    " SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[])"
)


async def refuse_pending(
    conn: Connection,
    which: uuid.UUID | list[str],
    outcome: SmsOutcome,
    reason: str,
    at: datetime,
) -> int:
    """Refuses the pending messages of an integration's appointments (an id) or of the
    given appointment keys, with the events a dispatcher's refusal writes, in the caller's
    transaction. How many were refused."""
    statement = _OF_INTEGRATION if isinstance(which, uuid.UUID) else _OF_APPOINTMENTS
    # The dispatcher's rule (scheduler.Dispatcher._finish): SMS off skips the confirmation.
    confirmation = "skipped" if outcome == "no_consent" else "failed"
    refused = await conn.fetch(statement, which, outcome, reason, at, confirmation)
    events = [
        make_event(
            Topic.SMS_SENT,
            row["tenant_id"],
            row["appointment_key"],
            SmsSentV1(
                integration_id=row["integration_id"],
                kind=row["kind"],
                outcome=outcome,
                segments=0,
                at=at,
            ),
        )
        for row in refused
    ]
    if events:
        await conn.execute(
            _ANNOUNCE,
            [e.event_id for e in events],
            [e.type for e in events],
            [e.key for e in events],
            [encode_event(e) for e in events],
        )
    return len(events)


async def _locked(conn: Connection, key: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM appointments WHERE appointment_key = $1 FOR UPDATE", key
    )


# The usual booking: the appointment is new. Its row, its confirmation and the integration's
# reminder offsets in one statement (a concurrent or earlier row makes the INSERT do nothing,
# and the caller takes the general path under the row's lock); the reminders in a second.
_FIRST_BOOKING = (
    "WITH booked AS (INSERT INTO appointments (appointment_key, tenant_id, integration_id,"
    " starts_at, ends_at, time_zone, sms_enabled, schedule_version, confirmation, join_url,"
    " phone_encrypted, recipient_hash) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,"
    " CASE WHEN $7 THEN 'pending' ELSE 'skipped' END, $9, $10, $13)"
    " ON CONFLICT (appointment_key) DO NOTHING RETURNING appointment_key),"
    " confirmation AS (INSERT INTO sms_messages (appointment_key, kind, schedule_version,"
    " discriminator, send_at, due_at, repeatability_request_id)"
    " SELECT appointment_key, 'confirmation', $8, '', $11::timestamptz, $11::timestamptz,"
    " $12::uuid FROM booked WHERE $7"
    " ON CONFLICT (appointment_key, kind, schedule_version, discriminator) DO NOTHING)"
    " SELECT EXISTS (SELECT 1 FROM booked) AS booked,"
    " (SELECT reminder_offsets_minutes FROM integrations WHERE integration_id = $3) AS offsets"
)


async def _first_booking(
    conn: Connection,
    event: Envelope[Any],
    phone: str | None,
    phone_hash: str | None,
    now: datetime,
) -> bool:
    """True when this booking created the appointment (and planned its messages)."""
    p = event.payload
    assert isinstance(p, AppointmentCreatedV1)
    row = await conn.fetchrow(
        _FIRST_BOOKING,
        event.key,
        event.tenant_id,
        p.integration_id,
        p.starts_at,
        p.ends_at,
        p.time_zone,
        p.sms_enabled,
        p.schedule_version,
        p.join_url,
        phone,
        now,
        repeatability_request_id(event.key, "confirmation", p.schedule_version, ""),
        phone_hash,
    )
    if row is None or not row["booked"]:
        return False
    if p.sms_enabled:
        await plan_reminders(
            conn,
            event.key,
            p.integration_id,
            p.starts_at,
            p.schedule_version,
            now,
            chosen_offsets(row["offsets"]),
        )
    return True


# A visit moved after its end (V2) brings back the number the purger erased then, for the
# notice and the new reminders, kept as a booking keeps one (booked with SMS, not cancelled,
# its integration's SMS not off) and only while the visit is not over by its new times ($4,
# now: a correction of a past visit's times texts nobody); never over one still held, nor for
# a patient whose STOP to the integration's sending number stands (the dispatcher would refuse
# every message, and a STOP purges the numbers held for that sender).
_KEEP_MOVED_NUMBER = (
    "UPDATE appointments a SET phone_encrypted = $2, recipient_hash = $3"
    " WHERE appointment_key = $1 AND phone_encrypted IS NULL AND booked AND sms_enabled"
    " AND NOT cancelled AND ends_at > $4 AND NOT EXISTS (SELECT 1 FROM integrations i"
    " WHERE i.integration_id = a.integration_id AND (NOT i.sms_enabled OR EXISTS ("
    " SELECT 1 FROM opt_outs o WHERE o.sender = i.sms_from_number"
    " AND o.recipient_hash = $3 AND o.opted_out)))"
)


def handlers(clock: Clock, hasher: RecipientHasher) -> dict[str, EventHandler]:
    """`hasher` gives the recipient_hash stored beside each number kept."""

    async def appointment_created(conn: Connection, event: Envelope[Any]) -> None:
        p = event.payload
        assert isinstance(p, AppointmentCreatedV1)
        # The number is worth keeping only if SMS may go to it.
        phone = p.patient_phone_encrypted if p.sms_enabled else None
        phone_hash = hasher.held(phone, event.key)
        if await _first_booking(conn, event, phone, phone_hash, clock.now()):
            return
        row = await _locked(conn, event.key)
        # None only if the row went between the two statements: nothing to complete then.
        if row is None or row["booked"]:
            return  # the same booking published again under a new event id
        # An unbooked row: a reschedule or cancel arrived before the booking.
        newer = p.schedule_version > row["schedule_version"]
        starts_at = p.starts_at if newer else row["starts_at"]
        version = max(p.schedule_version, row["schedule_version"])
        cancelled = row["cancelled"]
        await conn.execute(
            "UPDATE appointments SET booked = true, sms_enabled = $2, join_url = $3,"
            " phone_encrypted = CASE WHEN cancelled THEN NULL ELSE $4 END,"
            " recipient_hash = CASE WHEN cancelled THEN NULL ELSE $10 END,"
            " confirmation = CASE WHEN $2 AND NOT cancelled THEN 'pending' ELSE 'skipped' END,"
            " starts_at = CASE WHEN $5 THEN $6 ELSE starts_at END,"
            " ends_at = CASE WHEN $5 THEN $7 ELSE ends_at END,"
            " time_zone = CASE WHEN $5 THEN $8 ELSE time_zone END,"
            " schedule_version = $9 WHERE appointment_key = $1",
            event.key,
            p.sms_enabled,
            p.join_url,
            phone,
            newer,
            p.starts_at,
            p.ends_at,
            p.time_zone,
            version,
            phone_hash,
        )
        if not p.sms_enabled or cancelled:
            return
        now = clock.now()
        await plan(conn, event.key, "confirmation", version, now)
        await plan_reminders(conn, event.key, p.integration_id, starts_at, version, now)

    async def appointment_rescheduled(conn: Connection, event: Envelope[Any]) -> None:
        p = event.payload
        assert isinstance(p, AppointmentRescheduledV1)
        row = await _locked(conn, event.key)
        if row is None:
            await conn.execute(
                "INSERT INTO appointments (appointment_key, tenant_id, integration_id, starts_at,"
                " ends_at, time_zone, sms_enabled, schedule_version, confirmation, booked)"
                " VALUES ($1,$2,$3,$4,$5,$6,false,$7,'skipped',false)",
                event.key,
                event.tenant_id,
                p.integration_id,
                p.starts_at,
                p.ends_at,
                p.time_zone,
                p.schedule_version,
            )
            return
        if p.schedule_version <= row["schedule_version"]:
            return  # an older move than the one already applied
        await conn.execute(
            "UPDATE appointments SET starts_at = $2, ends_at = $3, time_zone = $4,"
            " schedule_version = $5 WHERE appointment_key = $1",
            event.key,
            p.starts_at,
            p.ends_at,
            p.time_zone,
            p.schedule_version,
        )
        if isinstance(p, AppointmentRescheduledV2) and p.patient_phone_encrypted is not None:
            await conn.execute(
                _KEEP_MOVED_NUMBER,
                event.key,
                p.patient_phone_encrypted,
                hasher.held(p.patient_phone_encrypted, event.key),
                clock.now(),
            )
        if not (row["booked"] and row["sms_enabled"]) or row["cancelled"]:
            return
        # Reminders move: the old ones are superseded, new ones planned for the new start.
        # A confirmation not sent yet is replanned rather than followed by a notice of the
        # move: the patient gets one message, with the new time (it renders the current start).
        # One sent to ACS and not answered yet (or never: a timeout, a crash) may be there
        # already, rendered with the old time: it is left to go, and the move is announced
        # after it. One put off (rate limit, retry, waiting) has not gone: it is replanned.
        now = clock.now()
        await drop_pending(conn, event.key, ("reminder", "reschedule"), "superseded")
        replanned = await drop_pending(conn, event.key, ("confirmation",), "superseded", True)
        notice: SmsKind = "confirmation" if replanned else "reschedule"
        await plan(conn, event.key, notice, p.schedule_version, now)
        await plan_reminders(
            conn, event.key, row["integration_id"], p.starts_at, p.schedule_version, now
        )

    async def appointment_cancelled(conn: Connection, event: Envelope[Any]) -> None:
        p = event.payload
        assert isinstance(p, AppointmentCancelledV1)
        row = await _locked(conn, event.key)
        if row is None:
            await conn.execute(
                "INSERT INTO appointments (appointment_key, tenant_id, integration_id, starts_at,"
                " ends_at, time_zone, sms_enabled, schedule_version, confirmation, booked,"
                " cancelled) VALUES ($1,$2,$3,$4,$4,'UTC',false,$5,'skipped',false,true)",
                event.key,
                event.tenant_id,
                p.integration_id,
                event.occurred_at,
                p.schedule_version,
            )
            return
        if row["cancelled"]:
            return
        await conn.execute(
            "UPDATE appointments SET cancelled = true WHERE appointment_key = $1", event.key
        )
        await drop_pending(
            conn, event.key, ("confirmation", "reschedule", "reminder", "link"), "cancelled"
        )
        now = clock.now()
        # An EHR tidying up after the visit cancels it once over: the patient is not told a
        # visit that took place "has been cancelled".
        if row["booked"] and row["sms_enabled"] and now < row["ends_at"]:
            await plan(
                conn,
                event.key,
                "cancellation",
                max(p.schedule_version, row["schedule_version"]),
                now,
            )

    async def sms_requested(conn: Connection, event: Envelope[Any]) -> None:
        p = event.payload
        assert isinstance(p, SmsRequestedV1)
        row = await conn.fetchrow(
            "SELECT schedule_version, cancelled FROM appointments WHERE appointment_key = $1",
            event.key,
        )
        if row is not None and row["cancelled"]:
            return
        # Each press is its own message; a redelivered press is absorbed by the inbox.
        await plan(
            conn,
            event.key,
            "link",
            row["schedule_version"] if row else 1,
            clock.now(),
            str(event.event_id),
        )

    async def integration_config(conn: Connection, event: Envelope[Any]) -> None:
        p = event.payload
        assert isinstance(p, IntegrationConfigV1)
        sms_enabled = await conn.fetchval(
            "INSERT INTO integrations (integration_id, config_version, deleted,"
            " organisation_name, sms_enabled, sms_from_number, reminder_offsets_minutes,"
            " sms_templates) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)"
            " ON CONFLICT (integration_id) DO UPDATE SET config_version = excluded.config_version,"
            " deleted = excluded.deleted, organisation_name = excluded.organisation_name,"
            " sms_enabled = excluded.sms_enabled, sms_from_number = excluded.sms_from_number,"
            " reminder_offsets_minutes = excluded.reminder_offsets_minutes,"
            " sms_templates = excluded.sms_templates, updated_at = now()"
            " WHERE integrations.config_version < excluded.config_version"
            " RETURNING sms_enabled",
            p.integration_id,
            p.config_version,
            p.deleted,
            p.organisation_name,
            p.sms_enabled and p.enabled and not p.deleted,
            p.sms_from_number,
            list(p.reminder_offsets_minutes),
            orjson.dumps(p.sms_templates).decode(),
        )
        if sms_enabled is not False:
            return  # SMS is on, or an older version than the one stored (a replay)
        # SMS off (switched off, the integration disabled or deleted): nothing more may go to
        # its patients, so their numbers are not needed any more, and the messages owed are
        # refused now as the dispatcher would refuse them.
        now = clock.now()
        await conn.execute(_PURGE_INTEGRATION, now, p.integration_id)
        await refuse_pending(
            conn, p.integration_id, "no_consent", "SMS off or consents not given", now
        )

    return {
        Topic.APPOINTMENT_CREATED: appointment_created,
        Topic.APPOINTMENT_RESCHEDULED: appointment_rescheduled,
        Topic.APPOINTMENT_CANCELLED: appointment_cancelled,
        Topic.SMS_REQUESTED: sms_requested,
        Topic.INTEGRATION_CONFIG: integration_config,
    }
