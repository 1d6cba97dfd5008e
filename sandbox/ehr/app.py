"""Application factory and in-process runner for the EHR ("Cerner") stand-in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from sandbox.ehr import admin, fhir, oauth, powerchart
from sandbox.ehr.app_keys import DISPATCHER, SANDBOX
from sandbox.ehr.clock import Clock, system_clock
from sandbox.ehr.settings import EhrSettings
from sandbox.ehr.state import Sandbox, TenantState
from sandbox.ehr.webhooks import WebhookDispatcher


async def _root(request: web.Request) -> web.Response:
    raise web.HTTPFound("/powerchart")


def create_app(settings: EhrSettings | None = None, clock: Clock = system_clock) -> web.Application:
    """Build the stand-in. ``clock`` lets tests expire codes and tokens without sleeping."""
    settings = settings or EhrSettings()
    app = web.Application()
    sandbox = Sandbox(settings, clock)
    dispatcher = WebhookDispatcher(settings, clock)
    app[SANDBOX] = sandbox
    app[DISPATCHER] = dispatcher

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await dispatcher.start()
        yield
        await dispatcher.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/", _root)
    app.add_routes(oauth.routes())
    app.add_routes(fhir.routes())
    app.add_routes(admin.routes())
    app.add_routes(powerchart.routes())
    return app


@dataclass
class RunningEhr:
    """A stand-in served on a real socket (port 0 picks a free one)."""

    app: web.Application
    runner: web.AppRunner
    url: str

    @property
    def sandbox(self) -> Sandbox:
        return self.app[SANDBOX]

    def tenant(self, guid: str) -> TenantState:
        return self.sandbox.tenants[guid]

    def fhir_base(self, guid: str) -> str:
        return self.tenant(guid).fhir_base

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_ehr(settings: EhrSettings | None = None, clock: Clock = system_clock) -> RunningEhr:
    """Serve the stand-in on ``settings.host:settings.port`` and fix its public URL."""
    settings = settings or EhrSettings(port=0)
    app = create_app(settings, clock)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = runner.addresses[0][1]
    url = settings.public_url or f"http://{settings.host}:{port}"
    app[SANDBOX].set_origin(url)
    return RunningEhr(app=app, runner=runner, url=url)
