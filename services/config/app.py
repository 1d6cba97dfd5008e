from __future__ import annotations

import html
from pathlib import Path

from aiohttp import web

from libs.common.portal_auth import PORTAL_MIGRATIONS, add_portal_auth, current_principal
from libs.common.settings import ServiceSettings
from libs.common.web import create_service_app

MIGRATIONS = Path(__file__).parent / "migrations"


async def home(request: web.Request) -> web.Response:
    principal = await current_principal(request)
    if principal is None:
        body = "<p><a href='/auth/login'>Sign in with Microsoft</a> to configure the connector.</p>"
    else:
        body = (
            f"<p>Signed in as {html.escape(principal.upn)}"
            f" ({html.escape(', '.join(sorted(principal.roles)))}) for tenant"
            f" {html.escape(principal.tenant_id)}.</p>"
        )
    return web.Response(
        text="<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<title>Teams EHR connector: configuration</title></head><body>"
        f"<h1>Teams EHR connector</h1>{body}</body></html>",
        content_type="text/html",
    )


def create_app(settings: ServiceSettings) -> web.Application:
    app = create_service_app(
        settings, migrations_dir=MIGRATIONS, shared_migrations=[PORTAL_MIGRATIONS]
    )
    add_portal_auth(app)
    app.router.add_get("/", home)
    return app
