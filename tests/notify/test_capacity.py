from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from services.notify.acs import AcsSmsClient, SendResult
from services.notify.scheduler import Dispatcher
from tests.conftest import wait_for
from tests.notify.conftest import MakeKit


class HeldAcs(AcsSmsClient):
    """Holds every send until released, so the dispatcher's slots stay busy."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.release = asyncio.Event()
        self.held = 0
        self.both_held = asyncio.Event()

    async def send(self, **kwargs: Any) -> SendResult:
        self.held += 1
        if self.held == 2:
            self.both_held.set()
        await self.release.wait()
        return await super().send(**kwargs)


class CountedSleeps(Dispatcher):
    """Tells each time the loop goes back to sleep."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.slept = asyncio.Condition()
        self.sleeps = 0

    async def _sleep(self, seconds: float) -> None:
        async with self.slept:
            self.sleeps += 1
            self.slept.notify_all()
        await super()._sleep(seconds)

    async def woken_and_asleep_again(self) -> None:
        async with self.slept:
            asleep = self.sleeps
            self.wake()
            await asyncio.wait_for(self.slept.wait_for(lambda: self.sleeps > asleep), 10)


async def test_dispatcher_woken_with_every_slot_busy_claims_nothing(make_kit: MakeKit) -> None:
    """With every send slot busy, wake-ups (polls, new messages) claim nothing more: no
    message is leased that no slot can send, and no round fails."""
    kit = await make_kit(scheduler_enabled=False, sms_send_concurrency=2)
    await kit.configure()
    for n in range(4):
        await kit.book(f"apt_capacity_{n}")
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=kit.settings.ssl_context())
    ) as session:
        acs = HeldAcs(
            kit.settings.acs_endpoint, kit.settings.acs_access_key, session, kit.clock, 10
        )
        dispatcher = CountedSleeps(kit.pool, acs, kit.settings, kit.clock)
        results: list[str] = []
        all_sent = asyncio.Event()

        def handled(round_: list[tuple[str, str]]) -> None:
            results.extend(result for _, result in round_)
            if results.count("sent") == 4:
                all_sent.set()

        dispatcher.observe(handled)
        running = asyncio.create_task(dispatcher.run())
        try:
            await wait_for(acs.both_held, "two sends in flight")
            for _ in range(3):
                await dispatcher.woken_and_asleep_again()
            [claimed] = await kit.query("SELECT count(*) AS n FROM sms_messages WHERE claims > 0")
            assert claimed["n"] == 2
            acs.release.set()
            await wait_for(all_sent, "all four sent")
        finally:
            acs.release.set()
            await dispatcher.stop()
            await running
    assert results == ["sent"] * 4
    rows = await kit.query("SELECT status, claims FROM sms_messages WHERE kind = 'confirmation'")
    assert {(r["status"], r["claims"]) for r in rows} == {("sent", 1)}
