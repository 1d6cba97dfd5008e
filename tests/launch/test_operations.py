from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from libs.common.events import decode_event
from libs.common.web import DB_POOL
from services.launch.app import create_app
from services.launch.meeting_preparation import prepare_meeting
from services.launch.subscriptions import renew_due
from tests.conftest import running_app, wait_for
from tests.launch.test_visit_end_to_end import book_video_visit, launch_from_ehr, meeting_action
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem, integration_config, publish_integration


async def test_admin_change_takes_effect_without_restart(
    launch_system: LaunchSystem, producer: AIOKafkaProducer, topic_prefix: str
) -> None:
    """A newer integration-config version that disables the integration is honoured by the
    running gateway within seconds; an older version replayed afterwards changes nothing."""
    system = launch_system
    applied = asyncio.Event()
    system.consumer.observe(lambda outcomes: applied.set() if outcomes else None)
    disabled = integration_config(
        system.settings, system.integration_id, system.fhir_base, version=2, enabled=False
    )
    started = asyncio.get_running_loop().time()
    await publish_integration(producer, topic_prefix, "contoso", disabled)
    await wait_for(applied, "the gateway to apply version 2")
    params = {"iss": system.fhir_base, "launch": "x"}
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(
                f"{system.url}/launch/provider", params=params, allow_redirects=False
            ) as r:
                if r.status == 403:
                    break
            # Seconds, not the 0.2 s it takes here: a loaded CI machine stalls.
            assert asyncio.get_running_loop().time() - started < 20, "change not live in 20 s"
            await asyncio.sleep(0.2)
        applied.clear()
        stale = integration_config(
            system.settings, system.integration_id, system.fhir_base, version=1
        )
        await publish_integration(producer, topic_prefix, "contoso", stale)
        await wait_for(applied, "the gateway to see the stale version")
        enabled = await system.app[DB_POOL].fetchval(
            "SELECT enabled FROM integrations WHERE integration_id = $1", system.integration_id
        )
        assert enabled is False


async def _sse_events(
    response: aiohttp.ClientResponse, wanted: str, within_s: float = 20
) -> list[Any]:
    async with asyncio.timeout(within_s):
        async for line in response.content:
            if line.startswith(b"data: "):
                entries = orjson.loads(line[6:])
                if wanted in ",".join(f"{e['role']}:{e['state']}" for e in entries):
                    return list(entries)
    raise AssertionError("stream ended")


async def test_roster_reaches_a_page_served_by_another_replica(
    launch_system: LaunchSystem,
    make_settings: Any,
    topic_prefix: str,
    database_url: str,
    microsoft_http: aiohttp.ClientSession,
) -> None:
    """Graph notifies replica A; the clinician's page is held open on replica B; B's roster
    stream still shows the patient, through Postgres LISTEN/NOTIFY."""
    system = launch_system
    replica_b = create_app(system.settings.model_copy(update={"http_port": 0}))
    async with aiohttp.ClientSession() as http, running_app(replica_b) as b_url:
        appointment = await book_video_visit(http, system)
        await read_all(topic_prefix + "appointment-created", expect=1)
        status, _, cookies = await launch_from_ehr(http, system, appointment["id"])
        assert status == 200
        headers = {"Cookie": f"provider_session={cookies['provider_session']}"}
        conn = await asyncpg.connect(database_url)
        try:
            meeting_id = await conn.fetchval("SELECT meeting_id FROM launch.appointments")
        finally:
            await conn.close()
        async with http.get(f"{b_url}/visit/roster", headers=headers) as stream:
            assert stream.status == 200
            await meeting_action(microsoft_http, system, meeting_id, "join", role="organizer")
            await meeting_action(
                microsoft_http, system, meeting_id, "join", role="attendee", display="G"
            )
            entries = await _sse_events(stream, "patient:lobby")
    assert {"label": "Patient", "role": "patient", "state": "lobby"} in entries


async def test_subscriptions_are_renewed_before_they_expire(
    launch_system: LaunchSystem, topic_prefix: str, database_url: str
) -> None:
    """A call-event subscription close to its expiry is renewed at Graph and recorded."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        await book_video_visit(http, system)
        (created,) = await read_all(topic_prefix + "appointment-created", expect=1)
    # A booking only wakes the meeting worker: make sure the subscription exists first.
    assert await prepare_meeting(system.app, decode_event(created).key) in ("prepared", "ready")
    conn = await asyncpg.connect(database_url)
    try:
        assert await renew_due(system.app) == 0  # fresh subscriptions are left alone
        # As if days had passed: the subscription now expires within the renewal window.
        soon = datetime.now(UTC) + timedelta(hours=1)
        await conn.execute("UPDATE launch.appointments SET subscription_expires_at = $1", soon)
        renewed = await renew_due(system.app)
        after = await conn.fetchval("SELECT subscription_expires_at FROM launch.appointments")
    finally:
        await conn.close()
    assert renewed == 1
    assert after > soon + timedelta(days=2)
