"""A send whose answer was lost is recorded once from its delivery report by whichever comes
second, the report or what finishes the message (a cancel, the retry refusing it), whatever
order their transactions meet the message's row lock in; and a delivery of STOPs and reports is
answered 200, applied once, retried whole on a deadlock."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from services.notify import lost_sends, metrics, optout, webhooks
from services.notify.acs import AcsSmsClient, SendResult
from tests.conftest import wait_for
from tests.notify.conftest import PATIENT, SENDER, Kit, MakeKit
from tests.notify.test_lost_answer_reports import (
    KEY,
    Report,
    _report_of,
    cancel,
    confirmation,
    crash_after_send,
    deliver,
    recorded_sent,
    sms_sent,
)


def _stop(message_id: str = "Incoming_stop_1") -> dict[str, Any]:
    """The patient's STOP to our number, as Event Grid delivers it."""
    return {
        "id": str(uuid.uuid4()),
        "topic": "/subscriptions/x/resourceGroups/y",
        "subject": f"/phonenumber/{SENDER.lstrip('+')}",
        "eventType": "Microsoft.Communication.SMSReceived",
        "eventTime": "2030-01-07T14:00:05Z",
        "dataVersion": "1.0",
        "data": {
            "MessageId": message_id,
            "From": PATIENT,
            "To": SENDER,
            "Message": "STOP",
            "ReceivedTimestamp": "2030-01-07T14:00:05Z",
        },
    }


def _stops() -> float:
    value: float = metrics.OPT_OUT_CHANGES.labels("stop")._value.get()
    return value


async def _waiting(kit: Kit) -> int:
    """How many of the database's sessions wait on a lock."""
    count: int = await kit.pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock'"
    )
    return count


async def _until_waiting(kit: Kit, count: int) -> None:
    async with asyncio.timeout(20):
        while await _waiting(kit) < count:
            pass


@asynccontextmanager
async def _row_held(kit: Kit, message_id: int) -> AsyncIterator[None]:
    """The message's row locked by a bystander until the block ends, so that contenders queue
    on it in the order the block starts them."""
    conn = await asyncpg.connect(kit.database_url)
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL search_path TO {kit.settings.database_schema}")
            await conn.execute("SELECT 1 FROM sms_messages WHERE id = $1 FOR UPDATE", message_id)
            yield
    finally:
        await conn.close()


async def _stop_replied(kit: Kit) -> None:
    kit.sandbox.components.acs.receive(PATIENT, SENDER, "STOP")
    await kit.sandbox.components.sandbox.notifier.drain()


async def _sms_off(kit: Kit) -> None:
    await kit.configure(sms_enabled=False, version=2)


@pytest.mark.parametrize(
    "between", [_stop_replied, _sms_off], ids=["patient-STOP", "integration-SMS-off"]
)
async def test_a_lost_send_its_retry_refuses_after_its_report_is_recorded_sent(
    make_kit: MakeKit, between: Callable[[Kit], Awaitable[None]]
) -> None:
    """A lost send reported, then refused by its retry (STOP, SMS off), is recorded sent."""
    kit = await make_kit(scheduler_enabled=False)
    sms, report = await crash_after_send(kit)
    assert await deliver(kit, report) == 200
    await between(kit)
    row = await confirmation(kit)
    assert (row["status"], row["outcome"]) == ("pending", None)  # in flight: left to the retry

    await kit.advance(timedelta(seconds=kit.settings.scheduler_lease_s + 1))
    assert await kit.dispatcher.dispatch_due() == 1
    assert kit.results("confirmation") == ["sent"]

    await recorded_sent(kit, sms)
    assert [(p.kind, p.outcome) for p in await sms_sent(kit) if p.kind == "confirmation"] == [
        ("confirmation", "sent")
    ]
    assert await kit.query("SELECT * FROM dead_letters") == []
    assert len(kit.outbound()) == 1  # the retry asked ACS nothing

    assert await deliver(kit, report) == 200
    assert len([p for p in await sms_sent(kit) if p.kind == "confirmation"]) == 1


async def test_a_lost_send_refused_by_its_retry_before_any_report_stays_refused(
    make_kit: MakeKit,
) -> None:
    """A lost send its retry refused before any report stays refused; the report adds nothing."""
    kit = await make_kit(scheduler_enabled=False)
    _, report = await crash_after_send(kit)
    await _sms_off(kit)
    await kit.advance(timedelta(seconds=kit.settings.scheduler_lease_s + 1))
    assert await kit.dispatcher.dispatch_due() == 1
    assert kit.results("confirmation") == ["no_consent"]

    assert await deliver(kit, report) == 200
    row = await confirmation(kit)
    assert (row["status"], row["outcome"]) == ("refused", "no_consent")
    assert [(p.kind, p.outcome) for p in await sms_sent(kit) if p.kind == "confirmation"] == [
        ("confirmation", "no_consent")
    ]


async def test_side_by_side_first_deliveries_of_a_report_record_the_send_once(
    make_kit: MakeKit,
) -> None:
    """Three deliveries of a report queued on the cancelled message's row record its send once."""
    kit = await make_kit(scheduler_enabled=False)
    sms, report = await crash_after_send(kit)
    await cancel(kit)
    row = await confirmation(kit)
    async with _row_held(kit, row["id"]):
        racing = [asyncio.create_task(deliver(kit, report)) for _ in range(3)]
        await _until_waiting(kit, 3)
    assert await asyncio.gather(*racing) == [200] * 3
    assert [(p.kind, p.outcome) for p in await sms_sent(kit)] == [("confirmation", "sent")]
    assert (await confirmation(kit))["provider_message_id"] == sms.message_id


@pytest.mark.parametrize("first", ["cancel", "report"])
async def test_a_report_and_a_cancel_queued_on_the_row_record_the_send_once(
    make_kit: MakeKit, first: str
) -> None:
    """A report and a cancel queued on the message's row, in either order, record one send."""
    kit = await make_kit(scheduler_enabled=False)
    sms, report = await crash_after_send(kit)
    row = await confirmation(kit)
    before = kit.applied
    async with _row_held(kit, row["id"]):
        reporting: asyncio.Task[int] | None = None
        if first == "report":
            reporting = asyncio.create_task(deliver(kit, report))
            await _until_waiting(kit, 1)
        cancelling = asyncio.create_task(cancel(kit))
        await _until_waiting(kit, 1 if reporting is None else 2)
        if reporting is None:
            reporting = asyncio.create_task(deliver(kit, report))
            await _until_waiting(kit, 2)
    assert await reporting == 200
    await cancelling
    assert kit.applied == before + 1
    row = await confirmation(kit)
    assert (row["status"], row["provider_message_id"]) == ("sent", sms.message_id)
    assert [(p.kind, p.outcome) for p in await sms_sent(kit)] == [("confirmation", "sent")]


async def _answer_held(
    kit: Kit, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, asyncio.Task[int]]:
    """Books KEY and dispatches its confirmation, whose answer waits for the event returned;
    returns once ACS has it."""
    kit.sandbox.components.acs.state.webhook_url = None  # the report is delivered by hand
    await kit.configure()
    await kit.book(KEY)
    at_acs, answer = asyncio.Event(), asyncio.Event()
    real = AcsSmsClient.send

    async def slow_answer(client: AcsSmsClient, **kwargs: Any) -> SendResult:
        result = await real(client, **kwargs)
        at_acs.set()
        await answer.wait()
        return result

    monkeypatch.setattr(AcsSmsClient, "send", slow_answer)
    dispatching = asyncio.create_task(kit.dispatcher.dispatch_due())
    await wait_for(at_acs, "the confirmation at ACS")
    return answer, dispatching


@pytest.mark.parametrize("first", ["dispatcher", "report"])
async def test_the_late_answer_and_the_report_queued_on_the_row_record_the_send_once(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """The late answer and the report queued on the row, in either order, record one send."""
    kit = await make_kit(scheduler_enabled=False)
    answer, dispatching = await _answer_held(kit, monkeypatch)
    [sms] = kit.outbound()
    await cancel(kit)
    row = await confirmation(kit)
    assert (row["status"], row["outcome"]) == ("cancelled", None)
    kit.clock.advance(5)
    async with _row_held(kit, row["id"]):
        if first == "dispatcher":
            answer.set()
            await _until_waiting(kit, 1)
            reporting = asyncio.create_task(deliver(kit, [_report_of(sms)]))
        else:
            reporting = asyncio.create_task(deliver(kit, [_report_of(sms)]))
            await _until_waiting(kit, 1)
            answer.set()
        await _until_waiting(kit, 2)
    assert await reporting == 200
    assert await dispatching == 1
    assert kit.results("confirmation") == ["sent"]
    row = await confirmation(kit)
    assert (row["status"], row["provider_message_id"]) == ("sent", sms.message_id)
    assert [(p.kind, p.outcome) for p in await sms_sent(kit)] == [("confirmation", "sent")]


async def test_a_batch_of_a_stop_and_a_pending_report_is_answered_200_and_counted_once(
    make_kit: MakeKit,
) -> None:
    """A STOP and a pending send's report: 200, and redeliveries change and count nothing."""
    kit = await make_kit(scheduler_enabled=False)
    sms, report = await crash_after_send(kit)
    batch: Report = [_stop(), report[0]]
    before = _stops()

    assert await deliver(kit, batch) == 200
    [opt] = await kit.query("SELECT opted_out FROM opt_outs")
    assert opt["opted_out"] is True
    after_first = [(p.kind, p.outcome) for p in await sms_sent(kit)]
    assert ("reminder", "opted_out") in after_first
    assert ("confirmation", "sent") not in after_first  # pending: left to what finishes it
    for _ in range(3):
        assert await deliver(kit, batch) == 200
    assert [(p.kind, p.outcome) for p in await sms_sent(kit)] == after_first
    assert _stops() - before == 1

    await cancel(kit)
    row = await confirmation(kit)
    assert (row["status"], row["provider_message_id"]) == ("sent", sms.message_id)
    assert [(p.kind, p.outcome) for p in await sms_sent(kit)] == [
        *after_first,
        ("confirmation", "sent"),
    ]


@pytest.mark.parametrize("failures", [1, 2])
async def test_a_delivery_that_meets_a_deadlock_is_applied_again_whole(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch, failures: int
) -> None:
    """A delivery a deadlock rolled back is applied again whole: 200, its STOP counted once."""
    kit = await make_kit(scheduler_enabled=False)
    sms, report = await crash_after_send(kit)
    await cancel(kit)
    real = optout.apply
    calls = 0

    async def deadlocked(*args: Any) -> bool:
        nonlocal calls
        calls += 1
        applied = await real(*args)
        if calls <= failures:
            raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
        return applied

    monkeypatch.setattr(optout, "apply", deadlocked)
    before = _stops()
    assert await deliver(kit, [_stop(), report[0]]) == 200
    assert calls == failures + 1
    assert _stops() - before == 1
    [opt] = await kit.query("SELECT opted_out FROM opt_outs")
    assert opt["opted_out"] is True
    assert [(p.kind, p.outcome) for p in await sms_sent(kit) if p.kind == "confirmation"] == [
        ("confirmation", "sent")
    ]
    assert (await confirmation(kit))["provider_message_id"] == sms.message_id


async def test_a_delivery_deadlocked_on_every_attempt_is_answered_500_and_changes_nothing(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery deadlocked on each of its attempts is answered 500 and leaves nothing behind."""
    kit = await make_kit(scheduler_enabled=False)
    _, report = await crash_after_send(kit)
    await cancel(kit)
    real = optout.apply

    async def deadlocked(*args: Any) -> bool:
        await real(*args)
        raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")

    monkeypatch.setattr(optout, "apply", deadlocked)
    before = _stops()
    assert await deliver(kit, [_stop(), report[0]]) == 500
    assert _stops() == before
    assert await kit.query("SELECT * FROM opt_outs") == []
    assert await kit.query("SELECT * FROM delivery_reports") == []
    assert await sms_sent(kit) == []


async def test_a_stop_and_report_batch_meeting_the_late_answer_is_answered_200(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A STOP and report queued behind the late answer on the row: 200, one send recorded."""
    kit = await make_kit(scheduler_enabled=False)
    answer, dispatching = await _answer_held(kit, monkeypatch)
    [sms] = kit.outbound()
    await cancel(kit)
    row = await confirmation(kit)
    kit.clock.advance(5)
    async with _row_held(kit, row["id"]):
        answer.set()
        await _until_waiting(kit, 1)  # the dispatcher's outcome write waits on the message
        batch = asyncio.create_task(deliver(kit, [_stop(), _report_of(sms)]))
        await _until_waiting(kit, 2)
    assert await batch == 200
    assert await dispatching == 1
    row = await confirmation(kit)
    assert (row["status"], row["provider_message_id"]) == ("sent", sms.message_id)
    assert [(p.kind, p.outcome) for p in await sms_sent(kit) if p.kind == "confirmation"] == [
        ("confirmation", "sent")
    ]


async def test_a_retry_claimed_while_its_report_is_stored_is_taken_by_the_next_claim(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report of a send whose answer was lost locks its message, pending, while it is
    stored: a claim meanwhile skips it (SKIP LOCKED, as a replica's would; the dispatcher's
    loop claims again within its poll), and the next claim once it is stored takes it. Tests
    that retry by hand after a lost answer therefore drain the reports first."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    await kit.book(KEY, starts_in=timedelta(days=2))
    locked, release = asyncio.Event(), asyncio.Event()
    record_reported = lost_sends.record_reported

    async def held(conn: Any, ids: Any) -> Any:
        locked.set()  # the message found by the report's tag, and locked
        await release.wait()
        return await record_reported(conn, ids)

    real = AcsSmsClient.send

    async def unanswered(client: AcsSmsClient, **kwargs: Any) -> SendResult:
        await real(client, **kwargs)  # it went, but the answer is lost
        monkeypatch.setattr(AcsSmsClient, "send", real)
        return SendResult(status=0, error_code="no-response")

    monkeypatch.setattr(webhooks, "record_reported", held)
    monkeypatch.setattr(AcsSmsClient, "send", unanswered)
    assert await kit.dispatcher.dispatch_due() == 1
    await wait_for(locked, "the report holding the message")
    await kit.advance(timedelta(minutes=6))
    assert await kit.dispatcher.dispatch_due() == 0
    row = await confirmation(kit)
    assert (row["status"], row["claims"]) == ("pending", 1)  # due, but not taken

    release.set()
    await kit.sandbox.components.sandbox.notifier.drain()
    assert await kit.dispatcher.dispatch_due() == 1
    assert kit.results("confirmation") == ["retry", "sent"]
    assert len(kit.outbound()) == 1  # ACS knew the retry
