"""The live roster on the provider page: rows in Postgres, pushed with SSE.

A roster change may be received by any replica (Graph notifies one of them), while the
clinician's page is held open by another. A trigger on the roster table NOTIFYs every replica;
each keeps one LISTEN connection and fans out to its open pages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from libs.common.web import DB_POOL, SETTINGS

HEARTBEAT_S = 15.0
# Open roster streams per provider session (a few tabs): each costs a query per change and
# per heartbeat, and one session could otherwise open thousands.
MAX_STREAMS_PER_SESSION = 4
_SESSION_LIVE = (
    "SELECT EXISTS (SELECT 1 FROM provider_sessions WHERE token_hash = $1 AND expires_at > now())"
)


class RosterFeed:
    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self._pool = pool
        self._channel = f"roster_{schema}"
        self._listeners: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._streams: dict[bytes, int] = defaultdict(int)
        self._conn: Any = None

    async def start(self) -> None:
        self._conn = await self._pool.acquire()
        await self._conn.add_listener(self._channel, self._notified)

    async def stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.remove_listener(self._channel, self._notified)
            await self._pool.release(self._conn)
            self._conn = None

    def _notified(self, _conn: object, _pid: int, _channel: str, appointment_key: str) -> None:
        for event in self._listeners.get(appointment_key, ()):
            event.set()

    def watch(self, appointment_key: str) -> asyncio.Event:
        event = asyncio.Event()
        self._listeners[appointment_key].add(event)
        return event

    def unwatch(self, appointment_key: str, event: asyncio.Event) -> None:
        self._listeners[appointment_key].discard(event)
        if not self._listeners[appointment_key]:
            del self._listeners[appointment_key]

    def open_stream(self, session: bytes) -> bool:
        """Counts a stream of the session in; False (nothing counted) past the cap."""
        if self._streams[session] >= MAX_STREAMS_PER_SESSION:
            return False
        self._streams[session] += 1
        return True

    def close_stream(self, session: bytes) -> None:
        self._streams[session] -= 1
        if self._streams[session] <= 0:
            del self._streams[session]


ROSTER_FEED = web.AppKey("roster_feed", RosterFeed)


async def roster_feed_ctx(app: web.Application) -> AsyncIterator[None]:
    feed = RosterFeed(app[DB_POOL], app[SETTINGS].database_schema)
    await feed.start()
    app[ROSTER_FEED] = feed
    yield
    await feed.stop()


async def roster_snapshot(pool: asyncpg.Pool, appointment_key: str) -> list[dict[str, str]]:
    rows = await pool.fetch(
        "SELECT role, state, lobby_entered_at FROM roster WHERE appointment_key = $1"
        " ORDER BY COALESCE(lobby_entered_at, joined_at, updated_at)",
        appointment_key,
    )
    patients = 0
    entries = []
    for row in rows:
        if row["role"] in ("patient", "guest"):
            patients += 1
            label = "Patient" if patients == 1 else f"Patient {patients}"
        else:
            label = "Clinician"
        entries.append({"label": label, "role": row["role"], "state": row["state"]})
    return entries


async def stream_roster(
    request: web.Request, appointment_key: str, session: bytes
) -> web.StreamResponse:
    """The visit's roster, again at each change and heartbeat, for as long as the session
    lasts: it is checked each time, so a stream ends with its session (expired or swept)
    instead of showing the lobby to a page that no longer has the right to see it."""
    feed, pool = request.app[ROSTER_FEED], request.app[DB_POOL]
    if not feed.open_stream(session):
        raise web.HTTPTooManyRequests(
            text="This visit is open in too many tabs; close one and reload the page."
        )
    try:
        return await _stream(request, feed, pool, appointment_key, session)
    finally:
        feed.close_stream(session)


async def _stream(
    request: web.Request,
    feed: RosterFeed,
    pool: asyncpg.Pool,
    appointment_key: str,
    session: bytes,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    changed = feed.watch(appointment_key)
    try:
        while True:
            changed.clear()
            if not await pool.fetchval(_SESSION_LIVE, session):
                await response.write(b"event: ended\ndata: {}\n\n")
                break
            snapshot = await roster_snapshot(pool, appointment_key)
            await response.write(b"event: roster\ndata: " + orjson.dumps(snapshot) + b"\n\n")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT_S):
                    await changed.wait()
    except ConnectionResetError:
        pass  # the clinician closed the page
    finally:
        feed.unwatch(appointment_key, changed)
    return response
