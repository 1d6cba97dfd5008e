from __future__ import annotations

from pathlib import Path

from aiohttp import web

from libs.common.events import Topic
from libs.common.settings import ServiceSettings
from libs.common.web import consumer_ctx, create_service_app
from services.analytics.facts import on_appointment_created

MIGRATIONS = Path(__file__).parent / "migrations"
CONSUMER_GROUP = "analytics"


def create_app(settings: ServiceSettings) -> web.Application:
    app = create_service_app(settings, migrations_dir=MIGRATIONS)
    app.cleanup_ctx.append(
        consumer_ctx(CONSUMER_GROUP, {Topic.APPOINTMENT_CREATED: on_appointment_created})
    )
    return app
