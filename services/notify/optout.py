"""STOP / START replies. Only a keyed hash of the recipient is kept, per sending number; a STOP
purges the patient's numbers held for that sending number, which no longer needs them (after a
later START, messages to those appointments are refused: no number on file)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Literal

from services.notify.phones import recipient, recipient_hash

if TYPE_CHECKING:
    from libs.common.crypto import FieldCipher
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


async def held_for(
    conn: Connection, cipher: FieldCipher, region: str, sender: str, patient: str
) -> list[str]:
    """The appointments holding `patient`'s number (E.164) whose messages go from `sender`.
    Only ciphertext is stored, so the numbers held for that sender are decrypted to compare."""
    rows = await conn.fetch(
        "SELECT a.appointment_key, a.phone_encrypted FROM appointments a"
        " JOIN integrations i ON i.integration_id = a.integration_id"
        " WHERE i.sms_from_number = $1 AND a.phone_encrypted IS NOT NULL",
        sender,
    )
    return [
        row["appointment_key"]
        for row in rows
        if recipient(cipher, row["phone_encrypted"], row["appointment_key"], region) == patient
    ]
