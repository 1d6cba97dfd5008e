from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import aiohttp
from aiohttp import web

from libs.common.housekeeping import Expiry
from libs.common.settings import ServiceSettings
from libs.common.web import DB_POOL, EXPIRIES, SETTINGS, consumer_ctx, create_service_app
from services.notify.acs import AcsSmsClient
from services.notify.bookings import batch_handler
from services.notify.clock import Clock, SystemClock
from services.notify.consumers import handlers
from services.notify.openapi import openapi_json
from services.notify.phones import RecipientHasher
from services.notify.purge import Purger
from services.notify.scheduler import Dispatcher
from services.notify.settings import NotifySettings
from services.notify.webhooks import AcsEventsWebhook

MIGRATIONS = Path(__file__).parent / "migrations"
CONSUMER_GROUP = "notify"
PARALLEL_PARTITIONS = 4

DISPATCHER = web.AppKey("notify_dispatcher", Dispatcher)
PURGER = web.AppKey("notify_purger", Purger)
WEBHOOK = web.AppKey("notify_acs_webhook", AcsEventsWebhook)


def sms_ctx(
    clock: Clock, hasher: RecipientHasher
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        assert isinstance(settings, NotifySettings)
        pool = app[DB_POOL]
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                ssl=settings.ssl_context(), limit=settings.sms_send_concurrency
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        acs = AcsSmsClient(
            settings.acs_endpoint,
            settings.acs_access_key,
            session,
            clock,
            settings.external_call_timeout_s,
        )
        dispatcher = Dispatcher(pool, acs, settings, clock)
        purger = Purger(pool, clock, settings.purge_interval_s, hasher)
        app[DISPATCHER], app[PURGER] = dispatcher, purger
        app[WEBHOOK] = AcsEventsWebhook(
            pool,
            settings.acs_webhook_secret.get_secret_value(),
            settings.recipient_hash_secret.get_secret_value(),
            settings.sms_default_region,
            hasher,
        )
        tasks = [asyncio.create_task(purger.run(), name="phone-purge")]
        if settings.scheduler_enabled:
            tasks.append(asyncio.create_task(dispatcher.run(), name="sms-dispatcher"))
        yield
        await dispatcher.stop()
        await purger.stop()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*tasks), timeout=settings.shutdown_drain_timeout_s
            )
        await session.close()

    return ctx


async def acs_events(request: web.Request) -> web.Response:
    return await request.app[WEBHOOK].handle(request)


def create_app(settings: ServiceSettings, clock: Clock | None = None) -> web.Application:
    assert isinstance(settings, NotifySettings)
    clock = clock or SystemClock()
    app = create_service_app(settings, migrations_dir=MIGRATIONS)
    # A delivery report matters while its message may still be finished (lost_sends: hours)
    # and dedupes Event Grid's redeliveries (a day); after that it is one row per SMS kept.
    app[EXPIRIES].append(
        Expiry(
            "delivery_reports",
            "received_at < now() - $2::interval",
            (timedelta(days=settings.dedupe_retention_days),),
        )
    )
    # Every notify handler writes only its own appointment's rows (and integration-config
    # only its integration's), so partitions can be applied side by side. A poll goes through
    # the batch handler (new bookings set-based), the per-event handlers being its fallback.
    hasher = RecipientHasher(
        settings.field_cipher(),
        settings.recipient_hash_secret.get_secret_value(),
        settings.sms_default_region,
    )
    per_event = handlers(clock, hasher)
    app.cleanup_ctx.append(
        consumer_ctx(
            CONSUMER_GROUP,
            per_event,
            parallel_partitions=PARALLEL_PARTITIONS,
            batch_handler=batch_handler(clock, per_event, hasher),
        )
    )
    app.cleanup_ctx.append(sms_ctx(clock, hasher))
    app.router.add_post("/acs/events", acs_events)
    app.router.add_get("/openapi.json", openapi_json)
    return app
