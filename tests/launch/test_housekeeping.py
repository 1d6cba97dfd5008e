"""Launch deletes what it no longer needs: sign-in state past its expiry (it holds the
clinician's encrypted EHR tokens) and delivery ids older than any redelivery."""

from __future__ import annotations

from datetime import timedelta

import aiohttp
import asyncpg

from libs.common.web import HOUSEKEEPER
from tests.conftest import wait_for
from tests.launch.test_visit_end_to_end import book_video_visit, launch_from_ehr
from tests.support.launch_harness import LaunchSystem


async def _counts(conn: asyncpg.Connection) -> dict[str, int]:
    tables = ("provider_sessions", "launch_states", "scheduling_deliveries", "graph_notifications")
    return {t: int(await conn.fetchval(f"SELECT count(*) FROM launch.{t}")) for t in tables}


async def _only_session(database_url: str) -> bytes:
    conn = await asyncpg.connect(database_url)
    try:
        (row,) = await conn.fetch("SELECT token_hash FROM launch.provider_sessions")
        return bytes(row["token_hash"])
    finally:
        await conn.close()


async def test_expired_sessions_and_old_delivery_ids_are_deleted(
    launch_system: LaunchSystem, database_url: str
) -> None:
    """After two launches, the housekeeper deletes the expired session, an abandoned sign-in
    and the delivery ids older than the retention, and keeps the live session, whose page
    still opens."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        first = await book_video_visit(http, system)
        status, _, _ = await launch_from_ehr(http, system, first["id"])
        assert status == 200
    first_session = await _only_session(database_url)
    async with aiohttp.ClientSession() as http:
        second = await book_video_visit(http, system)
        status, _, cookies = await launch_from_ehr(http, system, second["id"])
        assert status == 200
        # The service's own first round (at start) is over: the sweep below is the only one.
        await wait_for(system.app[HOUSEKEEPER].round_done, "the first housekeeping round")
        conn = await asyncpg.connect(database_url)
        try:
            before = await _counts(conn)
            assert before["provider_sessions"] == 2
            assert before["scheduling_deliveries"] >= 2
            # The first session ran out, a sign-in was abandoned, and the first booking's
            # delivery id is older than the retention.
            await conn.execute(
                "UPDATE launch.provider_sessions SET expires_at = now() - interval '1 second'"
                " WHERE token_hash = $1",
                first_session,
            )
            await conn.execute(
                "INSERT INTO launch.launch_states (state_hash, integration_id, secrets, expires_at)"
                " VALUES ('\\x00', $1, 'sealed', now() - interval '1 minute')",
                system.integration_id,
            )
            await conn.execute(
                "UPDATE launch.scheduling_deliveries SET received_at = received_at - $1::interval"
                " WHERE received_at = (SELECT min(received_at) FROM launch.scheduling_deliveries)",
                timedelta(days=system.settings.dedupe_retention_days, hours=1),
            )
            swept = await system.app[HOUSEKEEPER].sweep()
            assert swept["provider_sessions"] == 1
            assert swept["launch_states"] == 1
            assert swept["scheduling_deliveries"] == 1
            after = await _counts(conn)
            assert after["provider_sessions"] == 1
            assert after["scheduling_deliveries"] == before["scheduling_deliveries"] - 1
        finally:
            await conn.close()
        # The live session (the second launch's cookie) still opens its page.
        live = {"provider_session": cookies["provider_session"]}
        async with http.get(f"{system.url}/visit", cookies=live) as r:
            assert r.status == 200, await r.text()
