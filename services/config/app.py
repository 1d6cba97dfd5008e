"""The config service: the admin portal (server-rendered pages), its JSON API, and the
worker that provisions phone numbers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from libs.common.portal_auth import PORTAL_MIGRATIONS, add_portal_auth, error_page
from libs.common.settings import ServiceSettings
from libs.common.web import BODY_REFUSAL, DB_POOL, Handler, create_service_app
from services.config.acs_numbers import AcsPhoneNumbers
from services.config.api import add_api_routes, refusal
from services.config.context import CONTEXT, ConfigContext, Refused
from services.config.numbers import PhoneNumberJobs
from services.config.openapi import openapi_json
from services.config.pages import add_page_routes
from services.config.settings import ConfigSettings

HERE = Path(__file__).parent
MIGRATIONS = HERE / "migrations"
# The largest legitimate body is an integration with a 16 KiB private key.
MAX_REQUEST_BYTES = 64 * 1024
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self';"
    " img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def body_refused(request: web.Request, status: int, message: str) -> web.StreamResponse:
    """A refusal of libs/common/web.py:body_limit (413 too large, 400 undecodable), rendered
    for its audience with the portal's security headers."""
    if status == 413:
        message = f"The request is larger than {request.client_max_size // 1024} KiB."
    response = (
        refusal(Refused(status, message)) if _is_api(request) else error_page(status, message)
    )
    response.headers.update(SECURITY_HEADERS)
    return response


@web.middleware
async def portal_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refusals rendered for their audience, and browser hardening headers."""
    try:
        response = await handler(request)
    except Refused as exc:
        response = refusal(exc) if _is_api(request) else error_page(exc.status, exc.message)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response


async def portal_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[CONFIG_SETTINGS]
    ctx = ConfigContext(settings=settings, pool=app[DB_POOL], cipher=settings.field_cipher())
    app[CONTEXT] = ctx
    acs = AcsPhoneNumbers(
        settings.acs_endpoint,
        settings.acs_access_key,
        api_version=settings.acs_phone_numbers_api_version,
        ssl_context=settings.ssl_context(),
        timeout_s=settings.external_call_timeout_s,
    )
    jobs = PhoneNumberJobs(ctx, acs)
    # Jobs left running by a previous process are due already; the worker picks them up.
    task = asyncio.create_task(jobs.run(), name="phone-number-jobs")
    yield
    jobs.stop()
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout=settings.external_call_timeout_s)
    except TimeoutError:
        # A step cut short rolls back and is repeated by the next process; see numbers.py.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


CONFIG_SETTINGS = web.AppKey("config_settings", ConfigSettings)


def create_app(settings: ServiceSettings) -> web.Application:
    assert isinstance(settings, ConfigSettings)
    app = create_service_app(
        settings,
        migrations_dir=MIGRATIONS,
        shared_migrations=[PORTAL_MIGRATIONS],
        max_body_bytes=MAX_REQUEST_BYTES,
    )
    app[BODY_REFUSAL] = body_refused
    app.middlewares.append(portal_guard)
    app[CONFIG_SETTINGS] = settings
    app.cleanup_ctx.append(portal_ctx)
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(["html"], default=True),
    )
    add_portal_auth(app)
    add_page_routes(app)
    add_api_routes(app)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_static("/static", HERE / "static", append_version=False)
    return app
