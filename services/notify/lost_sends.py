"""Sends whose answer was lost, recorded from their delivery report.

A crash or a timeout after ACS took a message leaves it pending and in flight; its retry (same
repeatabilityRequestId) learns the answer. But a cancel or a move may finish it unsent first, or
its retry refuse it before asking ACS (a STOP, SMS off, the number purged): no retry learns the
answer, though the patient may have the SMS. The send's tag names the message (acs.send_tag),
and its delivery report, stored with the tag (webhooks.py), records it sent, once, with its
sms-sent event, as the dispatcher records an accepted send, by whichever comes second: the
report, finding the message finished unsent, or what finishes the message, finding the report.

Both hold the message's row lock before they look for the other, in a statement after the one
that took it (a new snapshot under READ COMMITTED): the report is stored before the webhook
locks the message, and the message is finished (or locked) before its report is looked for, so
whichever waits on the lock sees what the other committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg

from libs.common.events import SmsKind, SmsSentV1, Topic, encode_event, make_event

if TYPE_CHECKING:
    from libs.common.db import Connection

# The stored report of each of the messages given ($1) that is in flight without an outcome
# (pending, or finished unsent: 'cancelled', 'superseded'): one whose tag names the message,
# from the number it went from, whose message id no message has. The caller holds the messages'
# row locks. The earliest report if there are several.
_REPORTED = (
    "SELECT DISTINCT ON (m.id) m.id, m.appointment_key, m.kind, m.in_flight_since,"
    " a.tenant_id, a.integration_id, r.provider_message_id, r.segments"
    " FROM sms_messages m JOIN appointments a ON a.appointment_key = m.appointment_key"
    " JOIN delivery_reports r ON r.repeatability_request_id = m.repeatability_request_id"
    " AND r.kind = m.kind AND r.sender = m.sender"
    " WHERE m.id = any($1::bigint[]) AND m.in_flight_since IS NOT NULL AND m.outcome IS NULL"
    " AND m.status IN ('pending', 'cancelled', 'superseded')"
    " AND NOT EXISTS (SELECT 1 FROM sms_messages k"
    " WHERE k.provider_message_id = r.provider_message_id)"
    " ORDER BY m.id, r.received_at, r.provider_message_id"
)
# Sends finished unsent recorded as the dispatcher records an accepted send (status and outcome
# 'sent', ACS's message id, the segments, a confirmation's state), at the time they went to ACS,
# with their sms-sent events, unless recorded meanwhile.
_RECORD = (
    "WITH given AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::integer[], $4::uuid[],"
    " $5::text[], $6::text[], $7::bytea[]) AS g(id, provider_message_id, segments, event_id,"
    " topic, key, payload)),"
    " recorded AS (UPDATE sms_messages m SET status = 'sent', outcome = 'sent', reason = NULL,"
    " provider_message_id = g.provider_message_id, segments = g.segments,"
    " finished_at = m.in_flight_since FROM given g"
    " WHERE m.id = g.id AND m.in_flight_since IS NOT NULL AND m.outcome IS NULL"
    " AND m.status IN ('cancelled', 'superseded') RETURNING m.id, m.appointment_key, m.kind),"
    " confirmed AS (UPDATE appointments a SET confirmation = 'sent' FROM recorded r"
    " WHERE a.appointment_key = r.appointment_key AND r.kind = 'confirmation'),"
    " announced AS (INSERT INTO outbox (event_id, topic, key, payload)"
    " SELECT g.event_id, g.topic, g.key, g.payload FROM recorded r JOIN given g ON g.id = r.id)"
    " SELECT kind FROM recorded ORDER BY id"
)


async def reported(conn: Connection, ids: Sequence[int]) -> list[asyncpg.Record]:
    """The stored reports proving sends of the messages `ids` (locked by the caller) that are
    in flight without an outcome: per message at most one."""
    if not ids:
        return []
    return list(await conn.fetch(_REPORTED, list(ids)))


def sent_event(found: asyncpg.Record) -> tuple[object, ...]:
    """The sms-sent event of a send `reported` found: (event id, topic, key, payload)."""
    kind: SmsKind = found["kind"]
    event = make_event(
        Topic.SMS_SENT,
        found["tenant_id"],
        found["appointment_key"],
        SmsSentV1(
            integration_id=found["integration_id"],
            kind=kind,
            outcome="sent",
            segments=found["segments"] or 0,
            at=found["in_flight_since"],
        ),
    )
    return (event.event_id, event.type, event.key, encode_event(event))


async def record_reported(conn: Connection, ids: Sequence[int]) -> list[SmsKind]:
    """Records sent, from their stored reports, the messages `ids` (locked by the caller) that
    were in flight and are finished unsent without an outcome, in the caller's transaction; the
    kinds of those recorded."""
    found = await reported(conn, ids)
    if not found:
        return []
    events = [sent_event(row) for row in found]
    rows = await conn.fetch(
        _RECORD,
        [row["id"] for row in found],
        [row["provider_message_id"] for row in found],
        [row["segments"] for row in found],
        *([event[i] for event in events] for i in range(4)),
    )
    return [row["kind"] for row in rows]
