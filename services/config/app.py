from __future__ import annotations

from pathlib import Path

from aiohttp import web

from libs.common.settings import ServiceSettings
from libs.common.web import create_service_app

MIGRATIONS = Path(__file__).parent / "migrations"


def create_app(settings: ServiceSettings) -> web.Application:
    # The admin portal and its API arrive with the config-service issue; the skeleton owns
    # its schema, publishes through its outbox and answers the ops routes.
    return create_service_app(settings, migrations_dir=MIGRATIONS)
