"""STOP / START replies. Only a keyed hash of the recipient is kept, per sending number."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Literal

from services.notify.phones import recipient_hash

if TYPE_CHECKING:
    from libs.common.db import Connection

# The carrier-standard keywords, matched on the whole reply like ACS does.
STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT"})
START_WORDS = frozenset({"START", "UNSTOP", "YES", "OPTIN"})

Action = Literal["stop", "start"]


def keyword(message: str) -> Action | None:
    word = message.strip().upper()
    if word in STOP_WORDS:
        return "stop"
    if word in START_WORDS:
        return "start"
    return None


async def apply(
    conn: Connection,
    hash_secret: str,
    sender: str,
    patient: str,
    action: Action,
    at: datetime,
) -> None:
    """Records the latest word per (sender, recipient); an older reply never overrides."""
    await conn.execute(
        "INSERT INTO opt_outs (sender, recipient_hash, opted_out, changed_at)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (sender, recipient_hash) DO UPDATE SET"
        " opted_out = excluded.opted_out, changed_at = excluded.changed_at"
        " WHERE opt_outs.changed_at < excluded.changed_at",
        sender,
        recipient_hash(hash_secret, patient),
        action == "stop",
        at,
    )
