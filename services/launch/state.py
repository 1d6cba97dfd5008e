"""Typed application state of the launch gateway."""

from __future__ import annotations

from aiohttp import web

from libs.common.crypto import FieldCipher
from libs.common.web import SETTINGS
from services.launch.graph import GraphClient
from services.launch.integrations import IntegrationDirectory
from services.launch.settings import LaunchSettings
from services.launch.smart import SmartClient

INTEGRATIONS = web.AppKey("integrations", IntegrationDirectory)
GRAPH = web.AppKey("graph", GraphClient)
SMART = web.AppKey("smart", SmartClient)
# Built once from the settings: the key ring does not change while the service runs.
CIPHER = web.AppKey("field_cipher", FieldCipher)


def launch_settings(request: web.Request) -> LaunchSettings:
    settings = request.app[SETTINGS]
    assert isinstance(settings, LaunchSettings)
    return settings


def field_cipher(request: web.Request) -> FieldCipher:
    return request.app[CIPHER]
