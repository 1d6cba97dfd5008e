"""Assembles Entra, Graph, meetings and ACS into one aiohttp application on one HTTPS port."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from sandbox.microsoft.acs import Acs, AcsState
from sandbox.microsoft.clock import graph_time
from sandbox.microsoft.config import SandboxConfig
from sandbox.microsoft.core import SANDBOX_KEY, Sandbox
from sandbox.microsoft.entra import Entra
from sandbox.microsoft.graph import Graph
from sandbox.microsoft.meeting_page import MeetingPages
from sandbox.microsoft.meetings import MeetingStore
from sandbox.microsoft.numbers import Numbers


@dataclass
class Components:
    """Direct handles for in-process tests."""

    sandbox: Sandbox
    entra: Entra
    graph: Graph
    meetings: MeetingStore
    acs: Acs
    numbers: Numbers


COMPONENTS_KEY: web.AppKey[Components] = web.AppKey("ms_components", Components)


def create_app(config: SandboxConfig | None = None) -> web.Application:
    """Build the stand-in. ``app[COMPONENTS_KEY]`` exposes its state to tests."""
    config = config or SandboxConfig()
    sb = Sandbox(config)
    app = web.Application()
    app[SANDBOX_KEY] = sb
    meetings = MeetingStore(sb.clock, lambda: sb.base_url)
    entra = Entra(sb)
    graph = Graph(sb, meetings)
    pages = MeetingPages(sb, meetings)
    acs_state = AcsState(webhook_url=config.sms_webhook_url)
    acs = Acs(sb, acs_state)
    numbers = Numbers(sb, acs, acs_state)
    app[COMPONENTS_KEY] = Components(sb, entra, graph, meetings, acs, numbers)

    router = app.router
    router.add_get("/_sandbox/health", _health)
    router.add_get("/_sandbox/clock", _clock)
    router.add_post("/_sandbox/clock/advance", _advance)
    router.add_get("/_sandbox/notifications", _notifications)
    # specific prefixes first; Entra's /{tenant}/... patterns last
    graph.register(router)
    pages.register(router)
    acs.register(router)
    numbers.register(router)
    entra.register(router)

    async def close(_: web.Application) -> None:
        await sb.notifier.close()

    app.on_cleanup.append(close)
    return app


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _clock(request: web.Request) -> web.Response:
    sb = request.app[SANDBOX_KEY]
    return web.json_response(
        {"now": graph_time(sb.clock.now()), "manual": sb.manual_clock() is not None}
    )


async def _advance(request: web.Request) -> web.Response:
    sb = request.app[SANDBOX_KEY]
    clock = sb.manual_clock()
    if clock is None:
        return web.json_response(
            {"error": {"code": "BadRequest", "message": "the clock is not manual"}}, status=400
        )
    body = await request.json()
    clock.advance(float(body.get("seconds", 0)))
    return web.json_response({"now": graph_time(clock.now())})


async def _notifications(request: web.Request) -> web.Response:
    sb = request.app[SANDBOX_KEY]
    return web.json_response({"value": [d.public() for d in sb.notifier.log]})


@dataclass
class RunningSandbox:
    """A started stand-in: its runner, base URL and components."""

    runner: web.AppRunner
    base_url: str
    app: web.Application

    @property
    def components(self) -> Components:
        return self.app[COMPONENTS_KEY]

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_sandbox(config: SandboxConfig | None = None) -> RunningSandbox:
    """Serve HTTPS on ``config.host:config.port`` (port 0 picks a free port)."""
    config = config or SandboxConfig()
    app = create_app(config)
    sb = app[SANDBOX_KEY]
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=sb.tls.server_context())
    await site.start()
    port = config.port
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            port = int(addr[1])
            break
    sb.base_url = f"https://{config.host}:{port}"
    return RunningSandbox(runner, sb.base_url, app)
