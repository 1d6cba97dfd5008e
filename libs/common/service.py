"""Process entry point shared by the four services: logging, then aiohttp's runner.

aiohttp turns SIGTERM and SIGINT into a graceful shutdown that runs every cleanup_ctx in
reverse order, so consumers drain and commit before the pool and the producer close.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from libs.common.logging import configure_logging
from libs.common.settings import ServiceSettings


def run_service(
    settings: ServiceSettings, create_app: Callable[[ServiceSettings], web.Application]
) -> None:
    configure_logging(settings.service_name, settings.log_level, settings.log_json)
    web.run_app(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        # Paths carry join tokens and launch parameters; the request middleware logs the
        # route template instead.
        access_log=None,
        shutdown_timeout=settings.shutdown_drain_timeout_s,
        print=None,
    )
