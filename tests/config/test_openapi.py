from __future__ import annotations

from typing import Any

import aiohttp

from services.config.app import create_app
from services.config.openapi import document
from services.config.settings import ConfigSettings
from tests.config.conftest import ConfigPortal

METHODS = {"get", "put", "post", "delete", "patch"}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


async def test_openapi_is_served_and_covers_every_api_route(config_portal: ConfigPortal) -> None:
    """/openapi.json is OpenAPI 3.1, every /api route is in it, and every $ref resolves."""
    p = config_portal
    async with aiohttp.ClientSession() as http, http.get(f"{p.url}/openapi.json") as r:
        assert r.status == 200
        served = await r.json()
    assert served == document()
    assert served["openapi"].startswith("3.1")
    assert served["info"]["title"]
    assert served["info"]["version"]
    app = create_app(ConfigSettings())
    routes = {
        (resource.canonical, route.method.lower())
        for resource in app.router.resources()
        if resource.canonical.startswith("/api/")
        for route in resource
        if route.method.lower() in METHODS
    }
    documented = {
        (path, method)
        for path, item in served["paths"].items()
        for method in item
        if method in METHODS
    }
    assert routes == documented
    for path, item in served["paths"].items():
        for method, operation in item.items():
            assert operation["responses"], (path, method)
            if "{id}" in path:
                assert any(p["name"] == "id" for p in operation["parameters"])
    schemas = served["components"]["schemas"]
    for ref in _refs(served):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas, ref
    assert "IntegrationInput" in schemas
    assert "client_secret" in schemas["IntegrationInput"]["properties"]
