"""Erases patients' numbers once they can no longer be needed, and old rate-limit rows.

A number stays (encrypted) until the appointment ends, because the clinician may press
"Send link to patient" during the visit; a cancelled appointment's number goes as soon as
its cancellation notice is finished, and any number goes once its integration's SMS is off
(switched off, disabled or deleted: the consumer purges them then, this is the safety net,
for a booking published with SMS still on after the change, say). A STOP reply purges the
patient's numbers held for the number it was sent to (webhooks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import asyncpg
import structlog

from services.notify import metrics
from services.notify.clock import Clock
from services.notify.phones import RecipientHasher

log = structlog.get_logger(__name__)


_PURGING = (
    "WITH purged AS (UPDATE appointments a SET phone_encrypted = NULL,"
    " recipient_hash = NULL, phone_purged_at = $1"
    " WHERE a.appointment_key = any(ARRAY(SELECT a.appointment_key FROM appointments a"
    " WHERE a.phone_encrypted IS NOT NULL AND ({which})"
    " ORDER BY a.appointment_key FOR UPDATE)) AND a.phone_encrypted IS NOT NULL"
    " RETURNING 1) SELECT count(*) FROM purged"
)


def purging(which: str) -> str:
    """The statement that clears the numbers held, and their hashes, of the appointments that
    `which` (a condition on `a`) chooses; $1 is the time purged, `which` has $2 on. It answers
    how many it cleared.

    The rows are locked first (the ARRAY subquery, before anything is updated), in
    appointment_key order: the order of the other statements that lock several appointments
    (the batch booking insert, the dispatcher's outcome write), so a purge and one of those
    wait for each other instead of deadlocking; a bare UPDATE locks in the order of its plan
    (ends_at, or the heap's). Rows cleared meanwhile by another transaction are skipped, not
    counted twice. Across tables there is no one order (a consumer locks an appointment, then
    its messages; the outcome write messages, then their appointments): a deadlock there fails
    one transaction, which is retried (a poll per event, outcomes one at a time, the webhook
    by Event Grid)."""
    return _PURGING.format(which=which)


# Visits over; cancelled ones whose notice is finished; integrations whose SMS is off.
_PURGE_DUE = purging(
    "a.ends_at < $1 OR (a.cancelled AND NOT EXISTS (SELECT 1 FROM sms_messages m"
    " WHERE m.appointment_key = a.appointment_key AND m.status = 'pending'))"
    " OR EXISTS (SELECT 1 FROM integrations i"
    " WHERE i.integration_id = a.integration_id AND NOT i.sms_enabled)"
)


# Numbers held without their hash (stored before migration 0005, or by a replica of the
# previous release during the rollout), a batch at a time, locked in key order; rows another
# transaction holds are left to a later round.
_UNHASHED = (
    "SELECT appointment_key, phone_encrypted FROM appointments"
    " WHERE phone_encrypted IS NOT NULL AND recipient_hash IS NULL"
    " ORDER BY appointment_key LIMIT $1 FOR UPDATE SKIP LOCKED"
)
_HASHED = (
    "UPDATE appointments a SET recipient_hash = u.recipient_hash"
    " FROM unnest($1::text[], $2::text[]) AS u(appointment_key, recipient_hash)"
    " WHERE a.appointment_key = u.appointment_key AND a.phone_encrypted IS NOT NULL"
    " AND a.recipient_hash IS NULL"
)
HASH_BATCH = 500


class Purger:
    def __init__(
        self, pool: asyncpg.Pool, clock: Clock, interval_s: float, hasher: RecipientHasher
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._interval_s = interval_s
        self._hasher = hasher
        self._stopping = asyncio.Event()

    async def hash_held(self, limit: int = HASH_BATCH) -> int:
        """Gives up to `limit` numbers held without their keyed hash the hash a STOP finds
        them by; how many. Without it a STOP decrypts each of them (optout.held_for) until
        their visits end: every number held at the upgrade, for weeks. Each costs a
        decryption here (~46 us), once."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_UNHASHED, limit)
            if not rows:
                return 0
            keys = [row["appointment_key"] for row in rows]
            hashes = [
                self._hasher.held(row["phone_encrypted"], key)
                for row, key in zip(rows, keys, strict=True)
            ]
            await conn.execute(_HASHED, keys, hashes)
        log.info("held numbers given their keyed hash", count=len(rows))
        return len(rows)

    async def purge_once(self) -> int:
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            purged: int = await conn.fetchval(_PURGE_DUE, now)
            await conn.execute(
                "DELETE FROM sender_sends WHERE sent_at < $1", now - timedelta(minutes=2)
            )
            held: int = await conn.fetchval(
                "SELECT count(*) FROM appointments WHERE phone_encrypted IS NOT NULL"
            )
        metrics.PHONES_PURGED.inc(purged)
        metrics.PHONES_HELD.set(held)
        if purged:
            log.info("phone numbers purged", count=purged)
        return purged

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.purge_once()
                await self.hash_held()
            except Exception as exc:
                log.warning("purge failed, will retry", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._stopping.wait()

    async def stop(self) -> None:
        self._stopping.set()
