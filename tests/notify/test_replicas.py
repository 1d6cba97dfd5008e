from __future__ import annotations

import asyncio

import aiohttp

from services.notify.acs import AcsSmsClient
from services.notify.scheduler import Dispatcher
from tests.notify.conftest import Kit, MakeKit, kind_of

APPOINTMENTS = 20


def two_dispatchers(kit: Kit, session: aiohttp.ClientSession) -> list[Dispatcher]:
    """Two replicas' dispatchers on one database, each with its own ACS client."""
    return [
        Dispatcher(
            kit.pool,
            AcsSmsClient(
                kit.settings.acs_endpoint, kit.settings.acs_access_key, session, kit.clock, 10
            ),
            kit.settings,
            kit.clock,
        )
        for _ in range(2)
    ]


async def test_two_dispatcher_replicas_never_send_the_same_message(make_kit: MakeKit) -> None:
    """Two dispatchers claiming the same due messages at once (FOR UPDATE SKIP LOCKED) send
    each message exactly once between them."""
    kit = await make_kit(scheduler_enabled=False, scheduler_batch_size=5)
    await kit.configure()
    for n in range(APPOINTMENTS):
        await kit.book(f"apt_replica_{n}")
    await kit.until_applied(APPOINTMENTS + 1)  # the bookings and the integration config
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=kit.settings.ssl_context())
    ) as session:
        replicas = two_dispatchers(kit, session)
        taken = [0, 0]
        while True:
            rounds = await asyncio.gather(*(replica.dispatch_due() for replica in replicas))
            if not any(rounds):
                break
            taken = [total + now for total, now in zip(taken, rounds, strict=True)]
    sent = [m for m in kit.outbound() if kind_of(m) == "confirmation"]
    assert len(sent) == APPOINTMENTS
    assert len({m.repeatability_request_id for m in sent}) == APPOINTMENTS
    assert sum(taken) == APPOINTMENTS
    assert min(taken) > 0, "both replicas must have claimed work side by side"
    rows = await kit.query("SELECT status, attempts FROM sms_messages WHERE kind = 'confirmation'")
    assert {(r["status"], r["attempts"]) for r in rows} == {("sent", 1)}


async def test_replicas_reserving_at_once_hold_the_numbers_rate_limit(make_kit: MakeKit) -> None:
    """Two dispatchers reserving slots for one number at the same moment send no more than
    its per-minute limit between them and defer the rest."""
    kit = await make_kit(scheduler_enabled=False, sms_rate_per_minute=4, scheduler_batch_size=6)
    await kit.configure()
    for n in range(12):
        await kit.book(f"apt_replica_rate_{n}")
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=kit.settings.ssl_context())
    ) as session:
        replicas = two_dispatchers(kit, session)
        assert await asyncio.gather(*(replica.dispatch_due() for replica in replicas)) == [6, 6]
    assert len(kit.outbound()) == 4
    rows = await kit.query(
        "SELECT status, attempts, reason FROM sms_messages WHERE kind = 'confirmation'"
    )
    assert (
        sorted((r["status"], r["attempts"]) for r in rows)
        == [("pending", 0)] * 8 + [("sent", 1)] * 4
    )
    assert {r["reason"] for r in rows if r["status"] == "pending"} == {
        "sending number at its rate limit"
    }
    [sends] = await kit.query("SELECT count(*) AS n FROM sender_sends")
    assert sends["n"] == 4
