"""Erases patients' numbers once they can no longer be needed, and old rate-limit rows.

A number stays (encrypted) until the appointment ends, because the clinician may press
"Send link to patient" during the visit; a cancelled appointment's number goes as soon as
its cancellation notice is finished, and any number goes once its integration's SMS is off
(switched off, disabled or deleted: the consumer purges them then, this is the safety net,
for a booking published with SMS still on after the change, say).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import asyncpg
import structlog

from services.notify import metrics
from services.notify.clock import Clock

log = structlog.get_logger(__name__)


class Purger:
    def __init__(self, pool: asyncpg.Pool, clock: Clock, interval_s: float) -> None:
        self._pool = pool
        self._clock = clock
        self._interval_s = interval_s
        self._stopping = asyncio.Event()

    async def purge_once(self) -> int:
        now = self._clock.now()
        async with self._pool.acquire() as conn, conn.transaction():
            purged: int = await conn.fetchval(
                "WITH purged AS (UPDATE appointments a SET phone_encrypted = NULL,"
                " phone_purged_at = $1 WHERE phone_encrypted IS NOT NULL AND (ends_at < $1"
                " OR (cancelled AND NOT EXISTS (SELECT 1 FROM sms_messages m"
                "  WHERE m.appointment_key = a.appointment_key AND m.status = 'pending'))"
                " OR EXISTS (SELECT 1 FROM integrations i"
                "  WHERE i.integration_id = a.integration_id AND NOT i.sms_enabled))"
                " RETURNING 1) SELECT count(*) FROM purged",
                now,
            )
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
            except Exception as exc:
                log.warning("purge failed, will retry", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._stopping.wait()

    async def stop(self) -> None:
        self._stopping.set()
