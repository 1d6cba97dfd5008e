"""The OpenAPI documents the fuzzer runs from: each names exactly the routes its service's
router serves (so a new route cannot escape fuzzing), is served at /openapi.json, resolves
every $ref, and is a schema schemathesis can load."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from libs.common.openapi import documented_routes, served_routes
from libs.common.settings import ServiceSettings
from services.analytics import app as analytics_app
from services.analytics import openapi as analytics_openapi
from services.analytics.settings import AnalyticsSettings
from services.config import app as config_app
from services.config.settings import ConfigSettings
from services.launch import app as launch_app
from services.launch import openapi as launch_openapi
from services.launch.settings import LaunchSettings
from services.notify import app as notify_app
from services.notify import openapi as notify_openapi
from services.notify.settings import NotifySettings
from tests.hostile.http_support import config_document

Documented = tuple[
    Callable[[ServiceSettings], web.Application], type[ServiceSettings], Callable[[], Any]
]
SERVICES: dict[str, Documented] = {
    "launch": (launch_app.create_app, LaunchSettings, launch_openapi.document),
    "notify": (notify_app.create_app, NotifySettings, notify_openapi.document),
    "analytics": (analytics_app.create_app, AnalyticsSettings, analytics_openapi.document),
}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


@pytest.mark.parametrize("service", sorted(SERVICES))
async def test_document_names_every_route_and_is_served(service: str) -> None:
    """The document lists exactly the router's routes, /openapi.json serves it, every
    $ref resolves, and schemathesis loads every operation."""
    create_app, settings_class, document = SERVICES[service]
    app = create_app(settings_class())
    doc = document()
    assert served_routes(app) == documented_routes(doc)
    assert doc["openapi"].startswith("3.1")
    match = await app.router.resolve(make_mocked_request("GET", "/openapi.json", app=app))
    served = await match.handler(make_mocked_request("GET", "/openapi.json", app=app))
    assert isinstance(served, web.Response)
    assert served.body is not None
    assert served.text is not None
    assert web.json_response(doc).text == served.text
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas, ref
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            assert operation["responses"], (path, method)
    loaded = schemathesis.openapi.from_dict(doc)
    labels = {result.ok().label for result in loaded.get_all_operations()}  # type: ignore[union-attr]
    assert len(labels) == len(documented_routes(doc))


def test_config_fuzz_document_covers_every_route() -> None:
    """What the fuzzer runs against config (its /api document, sign-in, operations and the
    pages' forms) names every route of its router."""
    routes = served_routes(config_app.create_app(ConfigSettings()))
    assert documented_routes(config_document()) == routes
