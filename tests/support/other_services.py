"""Config, notify and analytics served in-process beside the launch_system fixture, for
tests that need all four services. Registered for every test through tests/conftest.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from libs.common.web import CONSUMERS
from services.analytics.app import create_app as analytics_app
from services.analytics.settings import AnalyticsSettings
from services.config.app import create_app as config_app
from services.config.settings import ConfigSettings
from services.notify.app import create_app as notify_app
from services.notify.settings import NotifySettings

Serve = Callable[[web.Application], AbstractAsyncContextManager[str]]


class Applied:
    """Set once a service's consumers applied an appointment-created event."""

    def __init__(self, apps: dict[str, web.Application]) -> None:
        self.events: dict[str, asyncio.Event] = {}
        for name, app in apps.items():
            event = self.events[name] = asyncio.Event()
            for runner in app[CONSUMERS]:
                runner.observe(self._observer(event))

    @staticmethod
    def _observer(event: asyncio.Event) -> Callable[[list[tuple[str, str, bool]]], None]:
        def seen(outcomes: list[tuple[str, str, bool]]) -> None:
            if any(topic == "appointment-created" and applied for topic, _, applied in outcomes):
                event.set()

        return seen


@dataclass
class Others:
    urls: dict[str, str]
    apps: dict[str, web.Application]
    applied: Applied


@pytest.fixture
async def others(
    make_settings: Callable[..., Any], serve: Serve, ca_bundle: str
) -> AsyncIterator[Others]:
    apps = {
        "config": config_app(make_settings(ConfigSettings)),
        "notify": notify_app(make_settings(NotifySettings, tls_ca_bundle=ca_bundle)),
        "analytics": analytics_app(make_settings(AnalyticsSettings)),
    }
    async with AsyncExitStack() as stack:
        urls = {name: await stack.enter_async_context(serve(app)) for name, app in apps.items()}
        yield Others(urls, apps, Applied({k: apps[k] for k in ("notify", "analytics")}))
