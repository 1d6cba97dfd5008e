from __future__ import annotations

from pathlib import Path

from aiohttp import web

from libs.common.settings import ServiceSettings
from libs.common.web import create_service_app
from services.launch.appointments import post_appointment

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: ServiceSettings) -> web.Application:
    app = create_service_app(settings, migrations_dir=MIGRATIONS)
    app.router.add_post("/internal/appointments", post_appointment)
    return app
