"""Typed aiohttp application keys shared by the route modules."""

from __future__ import annotations

from aiohttp import web

from sandbox.ehr.state import Sandbox
from sandbox.ehr.webhooks import WebhookDispatcher

SANDBOX = web.AppKey("ehr_sandbox", Sandbox)
DISPATCHER = web.AppKey("ehr_dispatcher", WebhookDispatcher)
