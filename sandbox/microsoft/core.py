"""The shared state of one stand-in instance."""

from __future__ import annotations

import ssl
from typing import Any

from aiohttp import web

from sandbox.microsoft.clock import Clock, ManualClock
from sandbox.microsoft.config import SandboxConfig
from sandbox.microsoft.directory import Directory
from sandbox.microsoft.keys import KeySet
from sandbox.microsoft.notifier import Notifier
from sandbox.tls import TlsFiles, ensure_tls


class Sandbox:
    """Config, clock, keys, directory and the outbound webhook client."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.clock: Clock = config.clock
        self.tls: TlsFiles = ensure_tls(config.tls_dir)
        self.keys = KeySet()
        self.directory = Directory(config.extra_redirect_uris)
        client_ctx = ssl.create_default_context()
        client_ctx.load_verify_locations(cafile=str(self.tls.ca))
        self.client_ssl = client_ctx
        self.notifier = Notifier(client_ctx, config.notification_retry_delays)
        self.base_url = f"https://{config.host}:{config.port}"

    def manual_clock(self) -> ManualClock | None:
        return self.clock if isinstance(self.clock, ManualClock) else None


SANDBOX_KEY: web.AppKey[Sandbox] = web.AppKey("ms_sandbox", Sandbox)


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response with the given status."""
    return web.json_response(data, status=status, headers=headers)


def graph_error(status: int, code: str, message: str, request_id: str = "") -> web.Response:
    """Graph's error envelope ``{"error": {"code", "message", "innerError"}}``."""
    body = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {"request-id": request_id, "client-request-id": request_id},
        }
    }
    return web.json_response(body, status=status)
