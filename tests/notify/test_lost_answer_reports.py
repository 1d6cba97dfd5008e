"""A send whose answer was lost (the dispatcher killed once ACS took it, before recording it) is
recorded from its delivery report, once, when the visit was cancelled before a retry could learn
the answer; the report's tag names the message, and nothing else in a report can make a send."""

from __future__ import annotations

import asyncio
import copy
import uuid
from typing import Any

import aiohttp
import pytest

from libs.common.events import (
    AppointmentCancelledV1,
    SmsSentV1,
    Topic,
    decode_event,
)
from sandbox.microsoft.acs import SmsMessage
from services.notify.acs import AcsSmsClient, SendResult, send_tag
from tests.conftest import wait_for
from tests.notify.conftest import (
    INTEGRATION,
    OTHER_SENDER,
    SENDER,
    WEBHOOK_SECRET,
    Kit,
    MakeKit,
    kind_of,
)
from tests.support.kafka_reader import read_all

KEY = "apt_lost_answer"
Report = list[dict[str, Any]]


def webhook(kit: Kit, code: str = WEBHOOK_SECRET) -> str:
    return f"{kit.url}/acs/events?code={code}"


async def deliver(kit: Kit, report: Report) -> int:
    """Event Grid delivers `report` to notify's webhook; the status it answered."""
    async with aiohttp.ClientSession() as http, http.post(webhook(kit), json=report) as answer:
        return answer.status


async def sms_sent(kit: Kit) -> list[SmsSentV1]:
    """The sms-sent events written to the outbox (published rows stay for its retention)."""
    rows = await kit.query("SELECT payload FROM outbox WHERE topic = 'sms-sent' ORDER BY id")
    payloads = [decode_event(row["payload"]).payload for row in rows]
    assert all(isinstance(p, SmsSentV1) for p in payloads)
    return [p for p in payloads if isinstance(p, SmsSentV1)]


async def confirmation(kit: Kit, key: str = KEY) -> Any:
    [row] = await kit.query(
        "SELECT * FROM sms_messages WHERE appointment_key = $1 AND kind = 'confirmation'", key
    )
    return row


async def recorded_sent(kit: Kit, sms: SmsMessage) -> Any:
    """The confirmation is recorded as its dispatcher records an accepted send: sent, with
    ACS's message id and segments, at the time it went to ACS, and the visit confirmed; its
    row."""
    row = await confirmation(kit)
    assert (row["status"], row["outcome"], row["reason"]) == ("sent", "sent", None)
    assert (row["provider_message_id"], row["segments"]) == (sms.message_id, sms.segments)
    assert row["finished_at"] == row["in_flight_since"]
    [appointment] = await kit.query("SELECT confirmation FROM appointments")
    assert appointment["confirmation"] == "sent"
    return row


async def cancel(kit: Kit, key: str = KEY) -> None:
    before = kit.applied
    await kit.publish(
        Topic.APPOINTMENT_CANCELLED,
        key,
        AppointmentCancelledV1(
            integration_id=INTEGRATION, reason_code="cancelled-in-ehr", schedule_version=2
        ),
    )
    await kit.until_applied(before + 1)


async def crash_after_send(kit: Kit) -> tuple[SmsMessage, Report]:
    """Books KEY and runs a dispatcher killed once ACS took its confirmation, before recording
    it; Event Grid cannot deliver meanwhile (the subscription's secret is wrong), so the
    stand-in's delivery report for it is returned, to deliver when the test chooses."""
    acs = kit.sandbox.components.acs.state
    acs.webhook_url = webhook(kit, "not-yet")
    await kit.configure()
    await kit.book(KEY)
    await kit.crash_dispatcher()
    notifier = kit.sandbox.components.sandbox.notifier
    await notifier.drain()
    [sms] = kit.outbound()
    [delivery] = [d for d in notifier.log if d.url == acs.webhook_url]
    assert delivery.gave_up
    acs.webhook_url = webhook(kit)
    row = await confirmation(kit)
    assert (row["status"], row["outcome"], row["provider_message_id"]) == ("pending", None, None)
    assert row["in_flight_since"] is not None
    return sms, copy.deepcopy(delivery.payload)


def forged(report: Report, n: int, **data: Any) -> Report:
    """`report` with another event id and message id, and the data fields given."""
    event = copy.deepcopy(report[0])
    event["id"] = str(uuid.uuid4())
    event["data"] = {**event["data"], "MessageId": f"Outgoing_forged_{n}", **data}
    return [event]


async def test_a_lost_send_cancelled_before_its_retry_is_recorded_once_from_its_report(
    make_kit: MakeKit,
) -> None:
    """A confirmation ACS took whose answer was lost, cancelled before the retry, is recorded
    sent when its delivery report arrives: one sms-sent, the message id, the segments."""
    kit = await make_kit(scheduler_enabled=False)
    sms, report = await crash_after_send(kit)
    rid = (await confirmation(kit))["repeatability_request_id"]
    assert (kind_of(sms), sms.tag) == ("confirmation", send_tag("confirmation", rid))
    await cancel(kit)
    cancelled = await confirmation(kit)
    assert (cancelled["status"], cancelled["outcome"]) == ("cancelled", None)
    assert await sms_sent(kit) == []

    assert await deliver(kit, report) == 200

    row = await recorded_sent(kit, sms)
    [report_row] = await kit.query("SELECT * FROM delivery_reports")
    assert (report_row["provider_message_id"], report_row["delivery_status"]) == (
        sms.message_id,
        "Delivered",
    )
    [event] = [decode_event(raw) for raw in await read_all(kit.settings.topic("sms-sent"), 1)]
    assert event.key == KEY
    assert isinstance(event.payload, SmsSentV1)
    assert (event.payload.kind, event.payload.outcome) == ("confirmation", "sent")
    assert (event.payload.integration_id, event.payload.segments) == (INTEGRATION, sms.segments)
    assert event.payload.at == row["in_flight_since"]
    # Nothing else changed: the cancellation notice is still owed, and ACS has one message.
    notices = await kit.query("SELECT status FROM sms_messages WHERE kind = 'cancellation'")
    assert [n["status"] for n in notices] == ["pending"]
    assert len(kit.outbound()) == 1


async def test_the_same_report_delivered_again_records_the_send_once(make_kit: MakeKit) -> None:
    """Event Grid's redeliveries of the report after it recorded the send, one after another
    or several at once, leave one sms-sent (test_lost_send_races: side by side before)."""
    kit = await make_kit(scheduler_enabled=False)
    sms, report = await crash_after_send(kit)
    await cancel(kit)

    assert await deliver(kit, report) == 200
    assert await deliver(kit, report) == 200
    assert await asyncio.gather(*(deliver(kit, report) for _ in range(4))) == [200] * 4

    assert [(p.kind, p.outcome) for p in await sms_sent(kit)] == [("confirmation", "sent")]
    assert len(await read_all(kit.settings.topic("sms-sent"), 1)) == 1
    row = await confirmation(kit)
    assert (row["status"], row["provider_message_id"]) == ("sent", sms.message_id)


async def test_a_report_before_the_cancel_is_stored_and_the_cancel_records_the_send(
    make_kit: MakeKit,
) -> None:
    """A report arriving while the message is still pending (its dispatcher gone) is stored with
    its tag and answered 200; the cancel after it records the send from it, once."""
    kit = await make_kit(scheduler_enabled=False)
    sms, report = await crash_after_send(kit)
    rid = (await confirmation(kit))["repeatability_request_id"]

    assert await deliver(kit, report) == 200
    row = await confirmation(kit)
    assert (row["status"], row["outcome"], row["provider_message_id"]) == ("pending", None, None)
    [stored] = await kit.query("SELECT * FROM delivery_reports")
    assert (stored["provider_message_id"], stored["repeatability_request_id"]) == (
        sms.message_id,
        rid,
    )
    assert (stored["kind"], stored["sender"], stored["segments"]) == (
        "confirmation",
        SENDER,
        sms.segments,
    )
    assert await sms_sent(kit) == []

    await cancel(kit)
    await recorded_sent(kit, sms)
    [event] = await sms_sent(kit)
    assert (event.kind, event.outcome, event.segments) == ("confirmation", "sent", sms.segments)
    assert event.at == row["in_flight_since"]

    assert await deliver(kit, report) == 200
    assert [(p.kind, p.outcome) for p in await sms_sent(kit)] == [("confirmation", "sent")]
    assert len(kit.outbound()) == 1


async def test_forged_or_old_format_tags_change_nothing_but_the_report(make_kit: MakeKit) -> None:
    """Reports whose tag has the old shape, is malformed, names another message, one never sent
    or another kind, or comes from another number, store their report and record no send; the
    genuine report still records it after them."""
    kit = await make_kit(scheduler_enabled=False)
    sms, report = await crash_after_send(kit)
    rid: uuid.UUID = (await confirmation(kit))["repeatability_request_id"]
    # Another visit's confirmation ACS refused (503: not taken, so no longer in flight), then
    # the visit cancelled: finished unsent from our number, but never at ACS.
    await kit.book("apt_never_sent")
    kit.sandbox.components.acs.state.send_failures.append(503)
    assert await kit.dispatcher.dispatch_due() == 1
    assert kit.results("confirmation") == ["retry"]
    await cancel(kit)
    await cancel(kit, "apt_never_sent")
    never = await confirmation(kit, "apt_never_sent")
    assert (never["status"], never["sender"], never["in_flight_since"]) == (
        "cancelled",
        SENDER,
        None,
    )

    tags: list[str | None] = [
        None,
        "notify:confirmation",  # the format before the tag named the message
        f"notify:reminder:{rid}",
        f"notify:confirmation:{str(rid).upper()}",
        f"notify:confirmation:{{{rid}}}",
        f"notify:confirmation:{rid.hex}",
        f"notify:confirmation:{rid} ",
        f"notify:confirmation:{rid}:1",
        f" notify:confirmation:{rid}",
        f"notify:confirmation:{uuid.uuid4()}",
        send_tag("confirmation", never["repeatability_request_id"]),
    ]
    reports = [forged(report, n, Tag=tag) for n, tag in enumerate(tags)]
    reports.append(forged(report, len(tags), From=OTHER_SENDER))
    for forgery in reports:
        assert await deliver(kit, forgery) == 200

    assert await sms_sent(kit) == []
    row = await confirmation(kit)
    assert (row["status"], row["outcome"], row["provider_message_id"]) == (
        "cancelled",
        None,
        None,
    )
    assert (await confirmation(kit, "apt_never_sent"))["status"] == "cancelled"
    stored = await kit.query("SELECT provider_message_id FROM delivery_reports")
    assert len(stored) == len(reports)

    assert await deliver(kit, report) == 200
    assert (await confirmation(kit))["provider_message_id"] == sms.message_id
    assert [(p.kind, p.outcome) for p in await sms_sent(kit)] == [("confirmation", "sent")]


async def test_a_send_recorded_by_its_dispatcher_is_left_as_it_is_by_its_report(
    kit: Kit,
) -> None:
    """The usual path: the dispatcher records the send, its report is stored beside it, and the
    report delivered again changes nothing: one sms-sent."""
    await kit.configure()
    await kit.book(KEY)
    await kit.until_result("confirmation", "sent")
    notifier = kit.sandbox.components.sandbox.notifier
    await notifier.drain()
    [sms] = kit.outbound()
    recorded = await confirmation(kit)
    [delivery] = [d for d in notifier.log if d.key == "eventgrid:sms"]

    assert await deliver(kit, delivery.payload) == 200
    assert await confirmation(kit) == recorded
    assert (recorded["status"], recorded["provider_message_id"]) == ("sent", sms.message_id)
    [report_row] = await kit.query("SELECT * FROM delivery_reports")
    assert report_row["provider_message_id"] == sms.message_id
    assert [(p.kind, p.outcome) for p in await sms_sent(kit)] == [("confirmation", "sent")]
    assert len(await read_all(kit.settings.topic("sms-sent"), 1)) == 1


async def test_the_dispatchers_late_answer_after_the_report_recorded_the_send_adds_nothing(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dispatcher whose answer comes after the cancel and after the report recorded the send
    reports it sent and writes nothing more: one sms-sent."""
    kit = await make_kit(scheduler_enabled=False)
    kit.sandbox.components.acs.state.webhook_url = None  # the report is delivered by hand
    await kit.configure()
    await kit.book(KEY)
    at_acs, answer = asyncio.Event(), asyncio.Event()
    results: list[SendResult] = []
    real = AcsSmsClient.send

    async def slow_answer(client: AcsSmsClient, **kwargs: Any) -> SendResult:
        results.append(await real(client, **kwargs))
        at_acs.set()
        await answer.wait()
        return results[-1]

    monkeypatch.setattr(AcsSmsClient, "send", slow_answer)
    dispatching = asyncio.create_task(kit.dispatcher.dispatch_due())
    await wait_for(at_acs, "the confirmation at ACS")
    [sms] = kit.outbound()
    await cancel(kit)
    in_flight = await confirmation(kit)
    assert (in_flight["status"], in_flight["outcome"]) == ("cancelled", None)

    assert await deliver(kit, [_report_of(sms)]) == 200
    assert (await confirmation(kit))["status"] == "sent"
    kit.clock.advance(5)  # the answer is recorded at another time than the send went
    answer.set()
    assert await dispatching == 1

    assert kit.results("confirmation") == ["sent"]
    row = await confirmation(kit)
    assert (row["status"], row["provider_message_id"]) == ("sent", sms.message_id)
    assert row["finished_at"] == in_flight["in_flight_since"]
    assert [(p.kind, p.outcome) for p in await sms_sent(kit)] == [("confirmation", "sent")]


def _report_of(sms: SmsMessage) -> dict[str, Any]:
    """A delivery report for `sms` as the stand-in publishes it."""
    when = sms.sent_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "id": str(uuid.uuid4()),
        "topic": "/subscriptions/x/resourceGroups/y",
        "subject": f"/phonenumber/{sms.sender.lstrip('+')}",
        "eventType": "Microsoft.Communication.SMSDeliveryReportReceived",
        "eventTime": when,
        "dataVersion": "1.0",
        "metadataVersion": "1",
        "data": {
            "MessageId": sms.message_id,
            "From": sms.sender,
            "To": sms.to,
            "DeliveryStatus": "Delivered",
            "DeliveryStatusDetails": "No error.",
            "DeliveryAttempts": [
                {"Timestamp": when, "SegmentsSucceeded": sms.segments, "SegmentsFailed": 0}
            ],
            "ReceivedTimestamp": when,
            "Tag": sms.tag,
        },
    }
