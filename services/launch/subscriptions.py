"""Keeps Graph call-event subscriptions alive: they last at most three days, and a visit
booked days ahead outlives them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import structlog
from aiohttp import web

from libs.common.web import DB_POOL, SETTINGS
from services.launch.graph import GraphError
from services.launch.settings import LaunchSettings
from services.launch.state import GRAPH

log = structlog.get_logger(__name__)
RENEW_EVERY_S = 300.0


async def renew_due(app: web.Application, now: datetime | None = None) -> int:
    """Renews subscriptions that expire within the renewal window; returns how many."""
    settings = app[SETTINGS]
    assert isinstance(settings, LaunchSettings)
    now = now or datetime.now(UTC)
    renewed = 0
    async with app[DB_POOL].acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "SELECT a.appointment_key, a.subscription_id, i.ms_tenant_id FROM appointments a"
            " JOIN integrations i USING (integration_id)"
            " WHERE a.subscription_id IS NOT NULL AND a.meeting_ended_at IS NULL"
            "  AND a.status = 'booked' AND a.ends_at > $1::timestamptz - interval '1 day'"
            "  AND a.subscription_expires_at < $2"
            " ORDER BY a.subscription_expires_at LIMIT 100 FOR UPDATE OF a SKIP LOCKED",
            now,
            now + timedelta(minutes=settings.subscription_renew_before_minutes),
        )
        for row in rows:
            expires = now + timedelta(minutes=settings.subscription_lifetime_minutes)
            try:
                subscription = await app[GRAPH].renew_subscription(
                    row["ms_tenant_id"], row["subscription_id"], expires
                )
            except GraphError as exc:
                log.warning(
                    "subscription renewal failed",
                    appointment_key=row["appointment_key"],
                    error=str(exc),
                )
                continue
            await conn.execute(
                "UPDATE appointments SET subscription_expires_at = $2 WHERE appointment_key = $1",
                row["appointment_key"],
                subscription.expirationDateTime,
            )
            renewed += 1
    return renewed


async def subscription_renewal_ctx(app: web.Application) -> AsyncIterator[None]:
    async def loop() -> None:
        while True:
            try:
                await renew_due(app)
            except Exception:
                log.exception("subscription renewal round failed")
            await asyncio.sleep(RENEW_EVERY_S)

    task = asyncio.create_task(loop(), name="subscription-renewal")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
