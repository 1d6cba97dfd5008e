"""A visit's lobby records at most MAX_DEVICES_PER_VISIT devices. Found by a review: a link
opened without the device cookie is a new device each time, and 2,000 opens made 2,000
arrivals and patient-joined events, which analytics then re-read at every poll."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import aiohttp

from libs.common.events import AppointmentCreatedV1, decode_event
from libs.common.web import DB_POOL
from services.launch.lobby_batches import MAX_DEVICES_PER_VISIT
from tests.launch.test_visit_end_to_end import book_video_visit
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem


async def test_a_link_opened_from_ever_new_devices_records_at_most_the_cap(
    launch_system: LaunchSystem, topic_prefix: str
) -> None:
    """Opened from cap + 10 new devices, the link's page opens every time, and the lobby
    records (and publishes) only the first cap arrivals."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        await book_video_visit(http, system, timedelta(minutes=5))
    (raw,) = await read_all(topic_prefix + "appointment-created", expect=1)
    created = decode_event(raw).payload
    assert isinstance(created, AppointmentCreatedV1)
    link = created.join_url
    assert link is not None

    async def open_from_a_new_device() -> int:
        async with aiohttp.ClientSession() as fresh, fresh.get(link) as r:
            await r.read()
            return r.status

    # In waves, as patients' phones would: each wave's arrivals are written before the next.
    for _ in range(MAX_DEVICES_PER_VISIT // 10 + 1):
        statuses = await asyncio.gather(*(open_from_a_new_device() for _ in range(10)))
        assert statuses == [200] * 10
    arrivals = await system.app[DB_POOL].fetchval("SELECT count(*) FROM lobby_arrivals")
    assert arrivals == MAX_DEVICES_PER_VISIT
    joined = await read_all(topic_prefix + "patient-joined", expect=MAX_DEVICES_PER_VISIT)
    assert len(joined) == MAX_DEVICES_PER_VISIT
