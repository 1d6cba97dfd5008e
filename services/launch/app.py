from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

from aiohttp import web

from libs.common.events import Topic
from libs.common.housekeeping import Expiry
from libs.common.settings import ServiceSettings
from libs.common.web import DB_POOL, EXPIRIES, SETTINGS, consumer_ctx, create_service_app
from services.launch import patient, patient_launch, provider, scheduling
from services.launch.graph import GraphClient
from services.launch.integrations import IntegrationDirectory, on_integration_config
from services.launch.lobby_batches import lobby_batches_ctx
from services.launch.meeting_preparation import meeting_preparation_ctx
from services.launch.notifications import receive_notifications
from services.launch.openapi import openapi_json
from services.launch.outbound import HTTP, outbound_http_ctx
from services.launch.roster import roster_feed_ctx, stream_roster
from services.launch.sessions import current_session
from services.launch.settings import LaunchSettings
from services.launch.smart import SmartClient
from services.launch.state import CIPHER, GRAPH, INTEGRATIONS, SMART, field_cipher
from services.launch.subscriptions import subscription_renewal_ctx

MIGRATIONS = Path(__file__).parent / "migrations"
CONSUMER_GROUP = "launch"


async def clients_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    assert isinstance(settings, LaunchSettings)
    app[INTEGRATIONS] = IntegrationDirectory(app[DB_POOL])
    app[SMART] = SmartClient(app[HTTP], settings)
    app[GRAPH] = GraphClient(app[HTTP], settings)
    app[CIPHER] = settings.field_cipher()
    yield


async def visit_roster(request: web.Request) -> web.StreamResponse:
    session = await current_session(request, request.app[DB_POOL], field_cipher(request))
    if session is None or session.appointment_key is None:
        raise web.HTTPUnauthorized(text="Your session has ended; launch the visit again.")
    return await stream_roster(request, session.appointment_key, session.token_hash)


def launch_expiries(settings: ServiceSettings) -> list[Expiry]:
    """What launch's housekeeper deletes besides the inbox (libs/common/housekeeping.py)."""
    kept = timedelta(days=settings.dedupe_retention_days)
    return [
        # Nothing reads them once expired (an expired one is refused like an unknown one),
        # and they hold encrypted EHR tokens and PKCE verifiers.
        Expiry("launch_states", "expires_at < now()"),
        Expiry("provider_sessions", "expires_at < now()"),
        # Redeliveries come within seconds (the EHR) or hours (Graph). Unindexed: 30 days of
        # rows read once an hour.
        Expiry("scheduling_deliveries", "received_at < now() - $2::interval", (kept,)),
        Expiry("graph_notifications", "received_at < now() - $2::interval", (kept,)),
    ]


def create_app(settings: ServiceSettings) -> web.Application:
    app = create_service_app(settings, migrations_dir=MIGRATIONS)
    app[EXPIRIES].extend(launch_expiries(settings))
    app.cleanup_ctx.append(outbound_http_ctx)
    app.cleanup_ctx.append(clients_ctx)
    app.cleanup_ctx.append(roster_feed_ctx)
    app.cleanup_ctx.append(
        consumer_ctx(CONSUMER_GROUP, {Topic.INTEGRATION_CONFIG: on_integration_config})
    )
    app.cleanup_ctx.append(subscription_renewal_ctx)
    app.cleanup_ctx.append(meeting_preparation_ctx)
    app.cleanup_ctx.append(lobby_batches_ctx)
    router = app.router
    router.add_get("/launch/provider", provider.launch_provider)
    router.add_get("/launch/provider/{integration_id}", provider.launch_provider)
    router.add_get("/launch/patient/{integration_id}", patient_launch.launch_patient)
    router.add_get("/launch/callback", provider.launch_callback)
    router.add_get("/visit", provider.provider_page)
    router.add_get("/visit/choose", provider.choose_page)
    router.add_post("/visit/choose", provider.choose_submit)
    router.add_post("/visit/send-link", provider.send_link)
    router.add_get("/visit/roster", visit_roster)
    router.add_get("/join/{token}", patient.join_page)
    router.add_get("/join/{token}/enter", patient.join_enter)
    router.add_post("/ehr/scheduling", scheduling.receive_scheduling_event)
    router.add_post("/graph/notifications", receive_notifications)
    router.add_get("/openapi.json", openapi_json)
    return app
