"""A provider session's roster streams are capped, and each ends with its session. Found by
a review: one session opened 2,000 streams (a snapshot query each per change and heartbeat),
and after the session was gone they still showed the patient entering the lobby."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg

from services.launch.roster import MAX_STREAMS_PER_SESSION
from tests.launch.test_visit_end_to_end import book_video_visit, launch_from_ehr
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem


async def _next_event(stream: aiohttp.ClientResponse) -> bytes:
    """The next SSE event line ("event: ..."), skipping its data and blank lines."""
    while True:
        line = await stream.content.readline()
        assert line, "the stream closed"
        if line.startswith(b"event: "):
            return line.strip()


async def test_a_sessions_roster_streams_are_capped_and_end_with_the_session(
    launch_system: LaunchSystem, topic_prefix: str, database_url: str
) -> None:
    """A session opens at most MAX_STREAMS_PER_SESSION roster streams (the next gets 429);
    when the session is gone, each open stream says "ended" at the next change and closes
    without showing it."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        appointment = await book_video_visit(http, system)
        await read_all(topic_prefix + "appointment-created", expect=1)
        status, _, cookies = await launch_from_ehr(http, system, appointment["id"])
        assert status == 200
    headers = {"Cookie": f"provider_session={cookies['provider_session']}"}
    url = f"{system.url}/visit/roster"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        streams = await asyncio.gather(
            *(http.get(url, headers=headers) for _ in range(MAX_STREAMS_PER_SESSION))
        )
        try:
            assert [s.status for s in streams] == [200] * MAX_STREAMS_PER_SESSION
            for stream in streams:
                assert await _next_event(stream) == b"event: roster"
            async with http.get(url, headers=headers) as extra:
                assert extra.status == 429
            conn = await asyncpg.connect(database_url)
            try:
                key = await conn.fetchval("SELECT appointment_key FROM launch.appointments")
                await conn.execute("DELETE FROM launch.provider_sessions")
                await conn.execute(
                    "INSERT INTO launch.roster"
                    " (appointment_key, participant, role, state, lobby_entered_at)"
                    " VALUES ($1, 'pt', 'patient', 'lobby', now())",
                    key,
                )
            finally:
                await conn.close()
            for stream in streams:
                assert await _next_event(stream) == b"event: ended"
                assert await stream.content.read() == b"data: {}\n\n"
        finally:
            for stream in streams:
                stream.close()
        # The session is gone: a new stream is refused outright.
        async with http.get(url, headers=headers) as after:
            assert after.status == 401
