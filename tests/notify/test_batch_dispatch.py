"""The dispatcher handles a claim as a set: one statement reserves its messages' slots, one
statement records the outcomes that finish together, and the loop sleeps until the next
message is due."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, cast

import aiohttp
import asyncpg

from libs.common.events import Topic
from services.notify.acs import AcsSmsClient, SendResult
from services.notify.phones import recipient_hash
from services.notify.scheduler import Dispatcher, Finish, _Outcome
from tests.conftest import wait_for
from tests.notify.conftest import (
    OTHER_INTEGRATION,
    OTHER_SENDER,
    SENDER,
    START,
    Kit,
    MakeKit,
)

OPTED_OUT = "+13125550177"


class CountingPool:
    """The pool, with every statement the dispatcher sends through it written down."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.statements: list[str] = []

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        self.statements.append(query)
        return list(await self._pool.fetch(query, *args))

    async def execute(self, query: str, *args: Any) -> str:
        self.statements.append(query)
        return str(await self._pool.execute(query, *args))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


class HeldOutcomes(Dispatcher):
    """Starts recording outcomes only once `release` is set, and counts the messages of
    each write."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.writes: list[int] = []

    async def _record_outcomes(self) -> None:
        self.holding.set()
        await self.release.wait()
        await super()._record_outcomes()

    async def _write_outcomes(self, batch: list[_Outcome]) -> None:
        self.writes.append(len(batch))
        await super()._write_outcomes(batch)


class CountedAnswers(AcsSmsClient):
    """Tells when ACS has answered `expected` sends."""

    def __init__(self, *args: Any, expected: int) -> None:
        super().__init__(*args)
        self.answered = 0
        self.expected = expected
        self.all_answered = asyncio.Event()

    async def send(self, **kwargs: Any) -> SendResult:
        result = await super().send(**kwargs)
        self.answered += 1
        if self.answered == self.expected:
            self.all_answered.set()
        return result


class FollowsWallClock:
    """The kit's start time, moving on with the wall clock."""

    def __init__(self) -> None:
        self._started = time.monotonic()

    def now(self) -> datetime:
        return START + timedelta(seconds=time.monotonic() - self._started)


@asynccontextmanager
async def acs_client(kit: Kit, expected: int = 0) -> AsyncIterator[CountedAnswers]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=kit.settings.ssl_context())
    ) as session:
        yield CountedAnswers(
            kit.settings.acs_endpoint,
            kit.settings.acs_access_key,
            session,
            kit.clock,
            10,
            expected=expected,
        )


async def test_a_claim_is_reserved_in_one_statement_holding_limits_and_opt_outs(
    make_kit: MakeKit,
) -> None:
    """One claim over two numbers costs one claim and one reservation statement: each number
    sends up to its limit and puts the rest off a window, an opted-out recipient is refused,
    and only the sends are counted against the numbers."""
    kit = await make_kit(scheduler_enabled=False, sms_rate_per_minute=2)
    await kit.configure()
    await kit.configure(integration=OTHER_INTEGRATION, sender=OTHER_SENDER)
    secret = kit.settings.recipient_hash_secret.get_secret_value()
    await kit.pool.execute(
        "INSERT INTO opt_outs (sender, recipient_hash, opted_out, changed_at)"
        " VALUES ($1, $2, true, $3)",
        SENDER,
        recipient_hash(secret, OPTED_OUT),
        kit.clock.now(),
    )
    for n in range(3):
        await kit.book(f"apt_batch_limit_{n}")
    await kit.book("apt_batch_opted_out", phone=OPTED_OUT)
    await kit.book("apt_batch_other", integration=OTHER_INTEGRATION)
    pool = CountingPool(kit.pool)
    async with acs_client(kit) as acs:
        dispatcher = Dispatcher(cast(asyncpg.Pool, pool), acs, kit.settings, kit.clock)
        assert await dispatcher.dispatch_due() == 5
    before_outcomes = [s for s in pool.statements if "WITH given" not in s]
    assert len(before_outcomes) == 2
    assert "reserve_sms_slots" in before_outcomes[1]
    rows = await kit.query(
        "SELECT appointment_key, status, outcome, attempts, due_at, reason FROM sms_messages"
        " WHERE kind = 'confirmation'"
    )
    by_status: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        by_status.setdefault(row["status"], []).append(row)
    assert len(by_status["sent"]) == 3
    [deferred] = by_status["pending"]
    assert deferred["appointment_key"].startswith("apt_batch_limit_")
    assert deferred["attempts"] == 0
    assert deferred["reason"] == "sending number at its rate limit"
    assert deferred["due_at"] == kit.clock.now() + timedelta(minutes=1)
    [refused] = by_status["refused"]
    assert (refused["appointment_key"], refused["outcome"]) == ("apt_batch_opted_out", "opted_out")
    senders = [m.sender for m in kit.outbound()]
    assert (senders.count(SENDER), senders.count(OTHER_SENDER)) == (2, 1)
    sends = await kit.query("SELECT sender, count(*) AS n FROM sender_sends GROUP BY sender")
    assert {r["sender"]: r["n"] for r in sends} == {SENDER: 2, OTHER_SENDER: 1}


async def test_outcomes_finishing_together_are_one_write_and_a_stale_claim_writes_nothing(
    make_kit: MakeKit,
) -> None:
    """Outcomes that finish together are recorded in one statement, each with exactly one
    status, confirmation state, dead letter if parked and sms-sent event; the outcome of a
    claim that was taken over writes none of them, and the new claimant's still can."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    await kit.book("apt_together_a")
    [stale] = await kit.dispatcher.claim_due()
    kit.clock.advance(kit.settings.scheduler_lease_s + 1)
    await kit.book("apt_together_b")
    await kit.book("apt_together_c")
    claimed = {row["appointment_key"]: row for row in await kit.dispatcher.claim_due()}
    assert set(claimed) == {"apt_together_a", "apt_together_b", "apt_together_c"}
    async with acs_client(kit) as acs:
        dispatcher = HeldOutcomes(kit.pool, acs, kit.settings, kit.clock)
        finishing = asyncio.gather(
            dispatcher._finish(stale, Finish("sent", "sent", None, 1, "msg-stale")),
            dispatcher._finish(claimed["apt_together_b"], Finish("sent", "sent", None, 1, "msg-b")),
            dispatcher._finish(
                claimed["apt_together_c"],
                Finish("failed", "failed", "gave up", dead_letter=True, attempts=3),
            ),
        )
        await wait_for(dispatcher.holding, "the outcomes waiting to be recorded")
        assert len(dispatcher._outcomes) == 3
        dispatcher.release.set()
        assert list(await finishing) == ["lost", "sent", "failed"]
        assert dispatcher.writes == [3]
        rows = await kit.query(
            "SELECT m.appointment_key, m.status, m.provider_message_id, a.confirmation"
            " FROM sms_messages m JOIN appointments a USING (appointment_key)"
            " WHERE m.kind = 'confirmation'"
        )
        assert {tuple(r) for r in rows} == {
            ("apt_together_a", "pending", None, "pending"),
            ("apt_together_b", "sent", "msg-b", "sent"),
            ("apt_together_c", "failed", None, "failed"),
        }
        dead = await kit.query("SELECT appointment_key, attempts, reason FROM dead_letters")
        assert [tuple(r) for r in dead] == [("apt_together_c", 3, "gave up")]
        events = await kit.query("SELECT topic, key FROM outbox ORDER BY key")
        assert [tuple(r) for r in events] == [
            (Topic.SMS_SENT.value, "apt_together_b"),
            (Topic.SMS_SENT.value, "apt_together_c"),
        ]

        fresh = claimed["apt_together_a"]
        assert await dispatcher._finish(fresh, Finish("sent", "sent", None, 1, "msg-a")) == "sent"
    [row] = await kit.query(
        "SELECT status, provider_message_id FROM sms_messages"
        " WHERE appointment_key = $1 AND kind = 'confirmation'",
        "apt_together_a",
    )
    assert tuple(row) == ("sent", "msg-a")
    [count] = await kit.query("SELECT count(*) AS n FROM outbox WHERE key = 'apt_together_a'")
    assert count["n"] == 1


async def test_reservation_counts_the_sends_committed_while_it_waited_for_the_lock(
    make_kit: MakeKit,
) -> None:
    """A reservation blocked on its number's lock counts the sends committed by the holder
    before the lock was granted, so the number's limit holds across replicas."""
    kit = await make_kit(scheduler_enabled=False, sms_rate_per_minute=2)
    await kit.configure()
    await kit.book("apt_lock_wait")
    [row] = await kit.dispatcher.claim_due()
    async with kit.pool.acquire() as holder, acs_client(kit) as acs:
        dispatcher = Dispatcher(kit.pool, acs, kit.settings, kit.clock)
        holding = holder.transaction()
        await holding.start()
        await holder.execute("SELECT pg_advisory_xact_lock(hashtext('sms-rate:' || $1))", SENDER)
        reserving = asyncio.create_task(dispatcher._dispatch(row))
        blocked = asyncio.Event()

        async def until_blocked() -> None:
            while not await kit.pool.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ):
                pass
            blocked.set()

        watching = asyncio.create_task(until_blocked())
        try:
            await wait_for(blocked, "the reservation waiting for the number's lock")
        finally:
            watching.cancel()
        await holder.execute(
            "INSERT INTO sender_sends (sender, sent_at) VALUES ($1, $2), ($1, $2)",
            SENDER,
            kit.clock.now(),
        )
        await holding.commit()
        assert await reserving == "retry"
    assert kit.outbound() == []
    [message] = await kit.query(
        "SELECT status, attempts, reason FROM sms_messages WHERE kind = 'confirmation'"
    )
    assert tuple(message) == ("pending", 0, "sending number at its rate limit")
    [sends] = await kit.query("SELECT count(*) AS n FROM sender_sends")
    assert sends["n"] == 2


async def test_a_slot_is_free_once_acs_has_answered(make_kit: MakeKit) -> None:
    """With one slot, the next message is sent as soon as ACS has answered the first, while
    the first's outcome is still being recorded; both are then recorded once."""
    kit = await make_kit(scheduler_enabled=False, sms_send_concurrency=1)
    await kit.configure()
    for n in range(2):
        await kit.book(f"apt_slot_{n}")
    async with acs_client(kit, expected=2) as acs:
        dispatcher = HeldOutcomes(kit.pool, acs, kit.settings, kit.clock)
        results: list[str] = []
        both_recorded = asyncio.Event()

        def handled(round_: list[tuple[str, str]]) -> None:
            results.extend(result for _, result in round_)
            if len(results) == 2:
                both_recorded.set()

        dispatcher.observe(handled)
        running = asyncio.create_task(dispatcher.run())
        try:
            await wait_for(acs.all_answered, "both messages answered by ACS")
            assert results == []
            dispatcher.release.set()
            await wait_for(both_recorded, "both outcomes recorded")
        finally:
            dispatcher.release.set()
            await dispatcher.stop()
            await running
    assert results == ["sent", "sent"]
    assert len(kit.outbound()) == 2
    rows = await kit.query("SELECT status, claims FROM sms_messages WHERE kind = 'confirmation'")
    assert {(r["status"], r["claims"]) for r in rows} == {("sent", 1)}


async def test_dispatcher_wakes_when_the_next_message_becomes_due(make_kit: MakeKit) -> None:
    """With nothing to wake it and a long poll interval, the dispatcher sleeps only until the
    next message is due (the claim tells it when) and sends it then."""
    kit = await make_kit(scheduler_enabled=False, scheduler_poll_interval_s=60)
    await kit.configure(offsets=[15])
    # The reminder is due a second after the confirmation.
    await kit.book("apt_due_soon", starts_in=timedelta(minutes=15, seconds=1))
    async with acs_client(kit) as acs:
        dispatcher = Dispatcher(kit.pool, acs, kit.settings, FollowsWallClock())
        reminded = asyncio.Event()
        kinds: list[tuple[str, str]] = []

        def handled(round_: list[tuple[str, str]]) -> None:
            kinds.extend(round_)
            if ("reminder", "sent") in kinds:
                reminded.set()

        dispatcher.observe(handled)
        running = asyncio.create_task(dispatcher.run())
        try:
            await wait_for(reminded, "the reminder sent when due", within_s=15)
        finally:
            await dispatcher.stop()
            await running
    assert kinds == [("confirmation", "sent"), ("reminder", "sent")]


class StarvedWhileHeld(HeldOutcomes):
    """HeldOutcomes that tells when the loop goes to sleep with every slot free, yet none it
    may use: what waits is the recorder."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.starved = asyncio.Event()

    async def _sleep(self, seconds: float) -> None:
        if self._starved and self._busy == 0 and not self.release.is_set():
            self.starved.set()
        await super()._sleep(seconds)


async def test_a_stalled_recorder_stops_the_sending_after_one_round_of_slots(
    make_kit: MakeKit,
) -> None:
    """With outcomes not being recorded (a row locked elsewhere), the dispatcher stops
    claiming once as many answered outcomes wait as it has slots, instead of sending on; when
    recording resumes every message is sent and recorded once."""
    kit = await make_kit(scheduler_enabled=False, sms_send_concurrency=1)
    await kit.configure()
    for n in range(4):
        await kit.book(f"apt_stalled_{n}")
    async with acs_client(kit, expected=2) as acs:
        dispatcher = StarvedWhileHeld(kit.pool, acs, kit.settings, kit.clock)
        results: list[str] = []
        all_recorded = asyncio.Event()

        def handled(round_: list[tuple[str, str]]) -> None:
            results.extend(result for _, result in round_)
            if len(results) == 4:
                all_recorded.set()

        dispatcher.observe(handled)
        running = asyncio.create_task(dispatcher.run())
        try:
            await wait_for(acs.all_answered, "two messages answered by ACS")
            await wait_for(dispatcher.starved, "the loop waiting for the recorder")
            # One in the slot's answer, one waiting beside it: no third send.
            assert len(kit.outbound()) == 2
            dispatcher.release.set()
            await wait_for(all_recorded, "every outcome recorded")
        finally:
            dispatcher.release.set()
            await dispatcher.stop()
            await running
    assert results == ["sent"] * 4
    assert len(kit.outbound()) == 4
