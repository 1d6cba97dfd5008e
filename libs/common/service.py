"""Process entry point shared by the four services: logging, then the aiohttp runner.

SIGTERM and SIGINT start a graceful shutdown that runs every cleanup_ctx in reverse order,
so consumers drain and commit before the pool and the producer close.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from aiohttp import web

from libs.common.logging import configure_logging
from libs.common.settings import ServiceSettings

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TlsListener:
    """A second listener serving the same app over TLS (e.g. for Graph's https webhooks)."""

    port: int
    cert_file: str
    key_file: str


async def serve(
    app: web.Application, settings: ServiceSettings, tls: TlsListener | None = None
) -> None:
    # Paths carry join tokens and launch parameters; the request middleware logs the route
    # template instead of an access log.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.shutdown_drain_timeout_s)
    await runner.setup()
    sites = [web.TCPSite(runner, settings.http_host, settings.http_port)]
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert_file, tls.key_file)
        sites.append(web.TCPSite(runner, settings.http_host, tls.port, ssl_context=context))
    for site in sites:
        await site.start()
    # What exists now (modules, classes, templates, pools, caches) lives as long as the
    # process. Frozen, it is left out of every later collection: a full one walked its ~86,000
    # objects in about 60 ms, a pause for every request and message in flight.
    gc.collect()
    gc.freeze()
    # The metrics listener logs its own port when it starts.
    log.info("service started", urls=[site.name for site in sites])
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("service stopping: draining")
    await runner.cleanup()
    log.info("service stopped")


def run_service(
    settings: ServiceSettings,
    create_app: Callable[[ServiceSettings], web.Application],
    tls: TlsListener | None = None,
) -> None:
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        runner.run(serve(create_app(settings), settings, tls))


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop `EHR_EVENT_LOOP` names: uvloop's, or the standard library's."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop
