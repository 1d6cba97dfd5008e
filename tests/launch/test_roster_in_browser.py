from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg

from sandbox.ehr import TENANT_A
from tests.launch.test_visit_end_to_end import book_video_visit, meeting_action
from tests.support.browser import chromium
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem


async def test_provider_roster_follows_the_visit_live_in_chromium(
    launch_system: LaunchSystem,
    topic_prefix: str,
    database_url: str,
    microsoft_http: aiohttp.ClientSession,
) -> None:
    """In real Chromium the provider page's roster goes from waiting, to the patient in the
    lobby, to admitted, pushed by the server as the visit happens."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        appointment = await book_video_visit(http, system)
        await read_all(topic_prefix + "appointment-created", expect=1)
        async with http.post(
            f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}/launches",
            json={"appointment": appointment["id"]},
        ) as r:
            launch_url = (await r.json())["launch_url"]

    async def act(action: str, **body: Any) -> None:
        await meeting_action(microsoft_http, system, meeting_id, action, **body)

    async with chromium() as page:
        await page.goto(launch_url)
        # Read once the launch has shown the page: a booking only wakes the meeting worker,
        # and the launch makes the meeting if the worker has not yet.
        conn = await asyncpg.connect(database_url)
        try:
            meeting_id = await conn.fetchval("SELECT meeting_id FROM launch.appointments")
        finally:
            await conn.close()
        assert meeting_id is not None
        await page.wait_until("document.getElementById('roster-empty')?.hidden === false")
        assert "Join the meeting" in await page.text()
        await page.screenshot("launch/provider-waiting")

        await act("join", role="organizer")
        await act("join", role="attendee", display="Guest")
        await page.wait_until("(document.body.dataset.roster || '').includes('patient:lobby')")
        assert "Patient: in the lobby" in await page.text()
        await page.screenshot("launch/provider-patient-in-lobby")

        await act("admit")
        await page.wait_until("(document.body.dataset.roster || '').includes('patient:admitted')")
        assert "Patient: admitted" in await page.text()
        await page.screenshot("launch/provider-patient-admitted")
