"""Inbox: the dedupe key of a consumer, written in the transaction of its effect."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from libs.common.db import Connection


async def first_delivery(conn: Connection, consumer: str, event_id: uuid.UUID, topic: str) -> bool:
    """Record the event for this consumer; False when it was already applied.

    Must run inside the transaction that applies the effect, so that the record and the
    effect commit or roll back together.
    """
    if not conn.is_in_transaction():
        raise RuntimeError("inbox.first_delivery must run inside the effect's transaction")
    status = await conn.execute(
        "INSERT INTO inbox (consumer, event_id, topic) VALUES ($1, $2, $3)"
        " ON CONFLICT (consumer, event_id) DO NOTHING",
        consumer,
        event_id,
        topic,
    )
    return bool(status == "INSERT 0 1")


async def first_deliveries(
    conn: Connection, consumer: str, events: Sequence[tuple[uuid.UUID, str]]
) -> list[bool]:
    """Record a poll's events for this consumer in one statement; for each, in order, whether
    this is its first delivery (an id already applied, or met earlier in `events`, is not).

    Same transaction rule as `first_delivery`.
    """
    if not conn.is_in_transaction():
        raise RuntimeError("inbox.first_deliveries must run inside the effects' transaction")
    rows = await conn.fetch(
        "INSERT INTO inbox (consumer, event_id, topic)"
        " SELECT $1, e, t FROM unnest($2::uuid[], $3::text[]) AS u(e, t)"
        " ON CONFLICT (consumer, event_id) DO NOTHING RETURNING event_id",
        consumer,
        [event_id for event_id, _ in events],
        [topic for _, topic in events],
    )
    fresh = {row["event_id"] for row in rows}
    first = []
    for event_id, _ in events:
        first.append(event_id in fresh)
        fresh.discard(event_id)
    return first
