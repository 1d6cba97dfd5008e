from __future__ import annotations

from datetime import timedelta

import aiohttp

from libs.common.web import DB_POOL
from services.launch.meeting_pace import MEETING_PACE, Allowance, FeedActivity
from services.launch.meeting_preparation import prepare_due, prepare_meeting
from tests.launch.test_meeting_preparation import _book, _created
from tests.support.launch_harness import LaunchSystem


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_feed_is_busy_for_a_second_after_an_event() -> None:
    """The feed counts as busy from an event until a second has passed without one."""
    clock = Clock()
    feed = FeedActivity(clock)
    assert not feed.busy()
    feed.note()
    clock.now += 0.9
    assert feed.busy()
    clock.now += 0.2
    assert not feed.busy()


def test_the_allowance_grants_a_burst_then_its_rate() -> None:
    """The allowance grants up to its burst at once, then one start per 1/rate seconds."""
    clock = Clock()
    allowance = Allowance(rate=5.0, burst=4, clock=clock)
    assert allowance.has_room()
    assert allowance.take(10) == 4
    assert not allowance.has_room()
    assert allowance.take(1) == 0
    assert allowance.refill_s() == 0.2
    clock.now += 0.2
    assert allowance.take(10) == 1
    clock.now += 60
    assert allowance.take(10) == 4


async def test_a_busy_feed_holds_back_meetings_not_urgent_and_never_urgent_ones(
    launch_system: LaunchSystem, topic_prefix: str
) -> None:
    """While the scheduling feed is busy the worker prepares the urgent visit's meeting and
    only as many others as its allowance grants; once the feed is quiet it prepares the rest."""
    system = launch_system
    clock = Clock()
    busy = FeedActivity(clock)
    busy.note()
    pace = system.app[MEETING_PACE]
    pace.feed, pace.allowance = busy, Allowance(rate=0.001, burst=1, clock=clock)
    async with aiohttp.ClientSession() as http:
        for starts_in in (timedelta(minutes=20), *(timedelta(hours=h) for h in (3, 4, 5))):
            await _book(http, system, starts_in)
    created = sorted(await _created(topic_prefix, 4), key=lambda e: e.payload.starts_at)
    urgent, *later = [event.key for event in created]

    held = await prepare_due(system.app)
    # The background worker may be preparing the urgent visit; this waits for it.
    assert await prepare_meeting(system.app, urgent) == "ready"
    # The background worker may also be making a later visit's meeting with the one start
    # (it holds that row's lock meanwhile): wait for it before counting.
    async with system.app[DB_POOL].acquire() as conn, conn.transaction():
        await conn.execute(
            "SELECT 1 FROM appointments WHERE appointment_key = ANY($1::text[]) FOR UPDATE", later
        )
    made = await _made(system)
    assert urgent in made
    assert len(made & set(later)) == 1
    # 2 if the background round took the one start first, 3 if it was still making that
    # meeting when this round looked.
    assert held.held_back in (1, 2, 3)

    clock.now += 2  # a quiet feed
    assert (await prepare_due(system.app)).held_back == 0
    for key in later:
        assert await prepare_meeting(system.app, key) == "ready"


async def _made(system: LaunchSystem) -> set[str]:
    rows = await system.app[DB_POOL].fetch(
        "SELECT appointment_key FROM appointments WHERE meeting_id IS NOT NULL"
    )
    return {row["appointment_key"] for row in rows}
