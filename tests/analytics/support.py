"""Applying events to the analytics schema exactly as the consumer runner does (inbox row
and handler in one transaction), on the real PostgreSQL, for tests that need no broker."""

from __future__ import annotations

from typing import Any

import asyncpg

from libs.common.db import create_pool, migrate
from libs.common.events import Envelope
from libs.common.inbox import first_deliveries, first_delivery
from libs.common.portal_auth import PORTAL_MIGRATIONS
from services.analytics.app import CONSUMER_GROUP, MIGRATIONS
from services.analytics.facts import FactsProjector
from services.analytics.metrics import MetricsRecorder


class Facts:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.projector = FactsProjector(MetricsRecorder())
        self._handlers = self.projector.handlers()

    @classmethod
    async def open(cls, database_url: str) -> Facts:
        pool = await create_pool(database_url, "analytics", max_size=4)
        await migrate(pool, "analytics", MIGRATIONS, [PORTAL_MIGRATIONS])
        return cls(pool)

    async def apply(self, event: Envelope[Any]) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            if not await first_delivery(conn, CONSUMER_GROUP, event.event_id, event.type):
                return False
            await self._handlers[event.type](conn, event)
            return True

    async def apply_poll(self, events: list[Envelope[Any]]) -> None:
        """A poll as the runner applies it with the batch handler: one inbox statement, then
        the first deliveries in one call, in one transaction."""
        async with self.pool.acquire() as conn, conn.transaction():
            applied = await first_deliveries(
                conn, CONSUMER_GROUP, [(e.event_id, e.type) for e in events]
            )
            first = [e for e, ok in zip(events, applied, strict=True) if ok]
            if first:
                await self.projector.apply(conn, first)

    async def fact(self, key: str) -> asyncpg.Record:
        row = await self.pool.fetchrow(
            "SELECT * FROM appointment_facts WHERE appointment_key = $1", key
        )
        assert row is not None
        return row

    async def close(self) -> None:
        await self.pool.close()
