"""Oversized bodies on every route that takes one, enumerated from each service's router so a
new route is covered the day it is added: one byte over the app's limit, sent with a
Content-Length and sent chunked, signed in as a user who may make the change. Each gets 413,
no row of the service's schema changes, and nothing is logged at error level."""

from __future__ import annotations

import gzip
import re
from collections.abc import AsyncIterator

import aiohttp

from libs.common.openapi import served_routes
from libs.common.web import DB_POOL, MAX_BODY, SETTINGS
from tests.hostile.http_support import (
    Target,
    analytics_target,
    config_target,
    launch_target,
    notify_target,
    watching_logs,
)
from tests.support.launch_harness import scheduling_headers

__all__ = ["analytics_target", "config_target", "launch_target", "notify_target"]

BODY_METHODS = frozenset({"post", "put", "patch", "delete"})
# Written by the service's own consumers and relay, whatever requests arrive.
BACKGROUND_TABLES = frozenset({"inbox", "schema_migrations"})
ANY_ID = "5f3c1a9e-2b7d-4e8a-9c41-0a1b2c3d4e01"


def body_routes(target: Target) -> list[tuple[str, str]]:
    """(method, concrete path) of every route of the app that takes a body."""
    return sorted(
        (method.upper(), re.sub(r"\{[^}]+\}", ANY_ID, path))
        for path, method in served_routes(target.app)
        if method in BODY_METHODS
    )


async def row_counts(target: Target) -> dict[str, int]:
    pool = target.app[DB_POOL]
    schema = target.app[SETTINGS].database_schema
    tables = await pool.fetch(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = $1 AND table_type = 'BASE TABLE'",
        schema,
    )
    names = sorted(r["table_name"] for r in tables if r["table_name"] not in BACKGROUND_TABLES)
    return {
        name: int(await pool.fetchval(f'SELECT count(*) FROM "{schema}"."{name}"'))
        for name in names
    }


def oversized(target: Target) -> bytes:
    """A JSON object one byte longer than the app accepts."""
    size = target.app[MAX_BODY] + 1
    return b'{"pad": "' + b"x" * (size - 11) + b'"}'


async def chunks(raw: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(raw), 16 * 1024):
        yield raw[start : start + 16 * 1024]


async def assert_every_body_route_refuses(target: Target) -> None:
    raw = oversized(target)
    assert len(raw) == target.app[MAX_BODY] + 1
    routes = body_routes(target)
    assert routes, "the app has no route that takes a body"
    before = await row_counts(target)
    headers = {**target.headers, "Content-Type": "application/json"}
    if target.name == "launch":
        headers.update(scheduling_headers(raw))  # a valid signature: only the size is wrong
    params = {"code": target.known["code"]} if "code" in target.known else {}
    answers: dict[tuple[str, str, str], int] = {}
    with watching_logs() as logs:
        async with aiohttp.ClientSession(cookies=target.cookies) as http:
            for method, path in routes:
                for framing in ("content-length", "chunked"):
                    data = raw if framing == "content-length" else chunks(raw)
                    async with http.request(
                        method,
                        target.url + path,
                        data=data,
                        headers=headers,
                        params=params,
                        allow_redirects=False,
                    ) as r:
                        await r.read()
                        answers[(method, path, framing)] = r.status
        assert not logs.errors(), logs.errors()
    refused = {route: status for route, status in answers.items() if status != 413}
    assert not refused, f"not refused with 413: {refused}"
    assert await row_counts(target) == before


async def test_config_refuses_oversized_bodies_on_every_route(config_target: Target) -> None:
    """Config: every POST/PUT/DELETE route answers 413 to a body over 64 KiB, with a
    Content-Length or chunked, and changes nothing."""
    assert config_target.app[MAX_BODY] == 64 * 1024
    await assert_every_body_route_refuses(config_target)


async def test_launch_refuses_oversized_bodies_on_every_route(launch_target: Target) -> None:
    """Launch: every POST route answers 413 to a body over 1 MiB, with a Content-Length or
    chunked (the scheduling feed's validly signed), and changes nothing."""
    await assert_every_body_route_refuses(launch_target)


async def test_notify_refuses_oversized_bodies_on_every_route(notify_target: Target) -> None:
    """Notify: the Event Grid webhook answers 413 to a body over 1 MiB, with a
    Content-Length or chunked and the right code, and changes nothing."""
    await assert_every_body_route_refuses(notify_target)


async def test_analytics_refuses_oversized_bodies_on_every_route(
    analytics_target: Target,
) -> None:
    """Analytics: every POST route (sign-out) answers 413 to a body over 1 MiB, with a
    Content-Length or chunked, and changes nothing."""
    await assert_every_body_route_refuses(analytics_target)


async def assert_compressed_bodies_refused(target: Target, method: str, path: str) -> None:
    before = await row_counts(target)
    bomb = gzip.compress(b" " * (target.app[MAX_BODY] * 2))
    assert len(bomb) < 64 * 1024
    params = {"code": target.known["code"]} if "code" in target.known else {}
    with watching_logs() as logs:
        for body, encoding, expected in [
            (bomb, "gzip", 413),
            (b"not gzip", "gzip", 400),
            (b"not deflate", "deflate", 400),
        ]:
            headers = {
                **target.headers,
                "Content-Type": "application/json",
                "Content-Encoding": encoding,
            }
            if target.name == "launch":
                headers.update(scheduling_headers(body))
            async with (
                aiohttp.ClientSession(cookies=target.cookies) as http,
                http.request(
                    method, target.url + path, data=body, headers=headers, params=params
                ) as r,
            ):
                assert r.status == expected, (encoding, await r.text())
                if target.name == "config":
                    # Rendered by the portal for its API, hardening headers included.
                    assert r.content_type == "application/json", (encoding, r.content_type)
                    assert r.headers.get("X-Frame-Options") == "DENY", encoding
        assert not logs.errors(), logs.errors()
    assert await row_counts(target) == before


async def test_config_refuses_compressed_bodies_that_inflate_too_far_or_not_at_all(
    config_target: Target,
) -> None:
    """Config: a gzip body of a few KiB that inflates past 64 KiB is 413, and gzip or
    deflate bytes that do not inflate are 400, both as the API's JSON with the portal's
    headers; nothing changes."""
    await assert_compressed_bodies_refused(config_target, "PUT", "/api/allocation")


async def test_launch_refuses_compressed_bodies_that_inflate_too_far_or_not_at_all(
    launch_target: Target,
) -> None:
    """Launch: a validly signed gzip booking that inflates past 1 MiB is 413, and gzip or
    deflate bytes that do not inflate are 400; nothing changes."""
    await assert_compressed_bodies_refused(launch_target, "POST", "/ehr/scheduling")


async def test_notify_refuses_compressed_bodies_that_inflate_too_far_or_not_at_all(
    notify_target: Target,
) -> None:
    """Notify: a gzip Event Grid delivery that inflates past 1 MiB is 413, and gzip or
    deflate bytes that do not inflate are 400; nothing changes."""
    await assert_compressed_bodies_refused(notify_target, "POST", "/acs/events")
