"""Metrics are for the cluster's Prometheus only: each service's own port, the one an Ingress
routes to, answers 404 for /metrics, and the metrics port serves /metrics and nothing else."""

from __future__ import annotations

import re
import uuid

import aiohttp
from aiohttp import web

from tests.conftest import metrics_url
from tests.support.launch_harness import LaunchSystem
from tests.support.other_services import Others

PARAMETER = re.compile(r"\{[^}]*\}")


def served(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, an id in place of each path parameter."""
    found = set()
    for route in app.router.routes():
        if route.resource is None or route.method == "HEAD":
            continue  # HEAD mirrors GET
        method = "GET" if route.method == "*" else route.method
        found.add((method, PARAMETER.sub(str(uuid.uuid4()), route.resource.canonical)))
    return found


async def test_metrics_are_served_only_on_the_metrics_port(
    launch_system: LaunchSystem, others: Others
) -> None:
    """Each service's own port answers 404 to /metrics; its metrics port serves the series at
    GET /metrics, refuses other methods there, and answers 404 at every route of the service."""
    apps = {"launch": launch_system.app, **others.apps}
    urls = {"launch": launch_system.url, **others.urls}
    problems = []
    async with aiohttp.ClientSession() as http:
        for name, app in apps.items():
            for method in ("GET", "HEAD"):
                async with http.request(method, f"{urls[name]}/metrics") as r:
                    if r.status != 404:
                        problems.append((name, "own port", method, "/metrics", r.status))
            metrics = metrics_url(app)
            async with http.get(metrics) as r:
                assert r.status == 200, name
                assert "http_requests_total" in await r.text()
            async with http.post(metrics) as r:
                assert r.status == 405, name
            routes = served(app)
            assert ("GET", "/healthz") in routes, name
            base = metrics.removesuffix("/metrics")
            for method, path in sorted(routes | {("GET", "/")}):
                async with http.request(method, base + path, allow_redirects=False) as r:
                    if r.status != 404:
                        problems.append((name, "metrics port", method, path, r.status))
    assert problems == []


async def test_an_unserved_http_method_mints_no_metric_label(others: Others) -> None:
    """A request with a method no service serves (WebDAV's PROPFIND) is counted under
    method="other": hostile input cannot grow the metrics' label values."""
    name, app = next(iter(others.apps.items()))
    invented = "PROPFIND"
    async with aiohttp.ClientSession() as http:
        async with http.request(invented, f"{others.urls[name]}/healthz") as r:
            assert r.status in (404, 405), r.status
        async with http.get(metrics_url(app)) as r:
            text = await r.text()
    assert invented not in text
    assert 'method="other"' in text
