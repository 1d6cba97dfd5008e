"""The analytics service: folds visit events into facts and a daily rollup, and serves the
usage report, the per-meeting report, the allocation and the dashboard to portal users."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from libs.common.portal_auth import PORTAL_MIGRATIONS, add_portal_auth
from libs.common.settings import ServiceSettings
from libs.common.web import CONSUMERS, Handler, consumer_ctx, create_service_app
from services.analytics.api import add_api_routes
from services.analytics.dashboard import add_dashboard_routes
from services.analytics.facts import FactsProjector
from services.analytics.metrics import MetricsRecorder
from services.analytics.openapi import openapi_json
from services.analytics.settings import AnalyticsSettings

MIGRATIONS = Path(__file__).parent / "migrations"
CONSUMER_GROUP = "analytics"
PROJECTOR = web.AppKey("facts_projector", FactsProjector)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'none'; style-src 'self';"
    " img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response


async def metrics_observer_ctx(app: web.Application) -> AsyncIterator[None]:
    # Metric observations wait for the batch that produced them to commit.
    for runner in app[CONSUMERS]:
        runner.observe(app[PROJECTOR].metrics.on_batch)
    yield


def create_app(settings: ServiceSettings) -> web.Application:
    assert isinstance(settings, AnalyticsSettings)
    app = create_service_app(
        settings, migrations_dir=MIGRATIONS, shared_migrations=[PORTAL_MIGRATIONS]
    )
    app.middlewares.append(security_headers)
    projector = FactsProjector(
        MetricsRecorder(settings.metrics_department_limit), settings.report_zone
    )
    app[PROJECTOR] = projector
    app.cleanup_ctx.append(
        consumer_ctx(CONSUMER_GROUP, projector.handlers(), batch_handler=projector.apply)
    )
    app.cleanup_ctx.append(metrics_observer_ctx)
    add_portal_auth(app)
    add_api_routes(app)
    add_dashboard_routes(app)
    app.router.add_get("/openapi.json", openapi_json)
    return app
