"""STOP / START replies. Only a keyed hash of the recipient is kept, per sending number; a STOP
purges the patient's numbers held for that sending number, which no longer needs them (after a
later START, messages to those appointments are refused: no number on file). They are found
by the same keyed hash, kept beside each number held (appointments.recipient_hash)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Literal

from services.notify.phones import RecipientHasher, recipient_hash

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
) -> bool:
    """Records the latest word per (sender, recipient); an older reply never overrides.
    Whether it was recorded."""
    status = await conn.execute(
        "INSERT INTO opt_outs (sender, recipient_hash, opted_out, changed_at)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (sender, recipient_hash) DO UPDATE SET"
        " opted_out = excluded.opted_out, changed_at = excluded.changed_at"
        " WHERE opt_outs.changed_at < excluded.changed_at",
        sender,
        recipient_hash(hash_secret, patient),
        action == "stop",
        at,
    )
    return bool(status != "INSERT 0 0")


# The appointments holding a number, by its hash ($2), whose messages go from a sending number
# ($1): an index lookup (appointments_recipient_hash), then the integrations of that number.
# Plus, with their ciphertext, the numbers held for that sender without a hash: stored before
# migration 0005 or by a replica of the previous release during the rollout. Only decrypting a
# number gives its hash, and the database has neither the key nor the hash secret, so no SQL
# could backfill them: they are decrypted here, as every number held was before (by index too,
# appointments_phone_unhashed), until the purger's rounds give them their hash
# (Purger.hash_held).
HELD_FOR = (
    "SELECT a.appointment_key, NULL::text AS unhashed FROM appointments a"
    " JOIN integrations i ON i.integration_id = a.integration_id"
    " WHERE a.recipient_hash = $2 AND a.phone_encrypted IS NOT NULL"
    " AND i.sms_from_number = $1"
    " UNION ALL SELECT a.appointment_key, a.phone_encrypted FROM appointments a"
    " JOIN integrations i ON i.integration_id = a.integration_id"
    " WHERE a.recipient_hash IS NULL AND a.phone_encrypted IS NOT NULL"
    " AND i.sms_from_number = $1"
)


async def held_for(
    conn: Connection, hasher: RecipientHasher, sender: str, patient: str
) -> list[str]:
    """The appointments holding `patient`'s number (E.164) whose messages go from `sender`;
    only the numbers held for `sender` without a hash are decrypted (HELD_FOR)."""
    who = hasher.of(patient)
    rows = await conn.fetch(HELD_FOR, sender, who)
    return [
        row["appointment_key"]
        for row in rows
        if row["unhashed"] is None or hasher.held(row["unhashed"], row["appointment_key"]) == who
    ]
