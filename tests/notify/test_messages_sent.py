from __future__ import annotations

from datetime import timedelta

from libs.common.events import SmsSentV1, decode_event
from services.notify.messages import encoding
from tests.notify.conftest import PATIENT, SENDER, Kit, kind_of
from tests.support.kafka_reader import read_all


async def test_booking_sends_one_confirmation_and_publishes_sms_sent(kit: Kit) -> None:
    """A booked appointment with SMS on gets one confirmation: organisation, local time and
    join link, at most 2 segments, an sms-sent event without the number, a delivery status."""
    await kit.configure()
    booking = await kit.book("apt_confirm01")
    await kit.until_result("confirmation", "sent")

    [sms] = kit.outbound()
    assert (sms.sender, sms.to) == (SENDER, PATIENT)
    assert "Lakeside Health" in sms.message
    assert "Mon 07 Jan, 10:00 AM CST" in sms.message  # 16:00 UTC in Chicago
    assert str(booking.join_url) in sms.message
    assert encoding(sms.message).segments <= 2
    assert sms.repeatability_request_id

    [event] = [decode_event(raw) for raw in await read_all(kit.settings.topic("sms-sent"), 1)]
    assert isinstance(event.payload, SmsSentV1)
    assert (event.payload.kind, event.payload.outcome) == ("confirmation", "sent")
    assert event.payload.segments == encoding(sms.message).segments
    assert PATIENT.lstrip("+") not in event.model_dump_json()

    [row] = await kit.query("SELECT * FROM sms_messages WHERE kind = 'confirmation'")
    assert (row["status"], row["provider_message_id"]) == ("sent", sms.message_id)
    assert row["repeatability_first_sent"] is not None
    [appointment] = await kit.query("SELECT confirmation FROM appointments")
    assert appointment["confirmation"] == "sent"

    await kit.sandbox.components.sandbox.notifier.drain()
    [report] = await kit.query("SELECT * FROM delivery_reports")
    assert (report["provider_message_id"], report["delivery_status"]) == (
        sms.message_id,
        "Delivered",
    )


async def test_reminders_go_at_their_offsets_by_the_injected_clock(kit: Kit) -> None:
    """Reminders set for 60 and 15 minutes before the start go exactly then, not earlier."""
    await kit.configure(offsets=[60, 15])
    booking = await kit.book("apt_remind01", starts_in=timedelta(hours=2))
    await kit.until_result("confirmation", "sent")

    kit.clock.set(booking.starts_at - timedelta(minutes=61))
    assert await kit.dispatcher.dispatch_due() == 0
    kit.clock.set(booking.starts_at - timedelta(minutes=60))
    kit.dispatcher.wake()
    await kit.until_result("reminder", "sent")
    assert len(kit.outbound()) == 2
    assert "reminder" in kit.outbound()[-1].message

    kit.clock.set(booking.starts_at - timedelta(minutes=16))
    assert await kit.dispatcher.dispatch_due() == 0
    kit.clock.set(booking.starts_at - timedelta(minutes=15))
    kit.dispatcher.wake()
    await kit.until_result("reminder", "sent", count=2)
    assert len(kit.outbound()) == 3
    rows = await kit.query(
        "SELECT discriminator, send_at FROM sms_messages WHERE kind = 'reminder' ORDER BY send_at"
    )
    assert [(r["discriminator"], booking.starts_at - r["send_at"]) for r in rows] == [
        ("60", timedelta(minutes=60)),
        ("15", timedelta(minutes=15)),
    ]


async def test_no_reminder_goes_once_the_visit_has_started(kit: Kit) -> None:
    """A reminder the dispatcher reaches only after the visit started is superseded, not sent."""
    await kit.configure()
    booking = await kit.book("apt_late01", starts_in=timedelta(minutes=30))
    await kit.until_result("confirmation", "sent")

    # The dispatcher stalled past the reminder's moment and the start.
    kit.clock.set(booking.starts_at + timedelta(minutes=5))
    kit.dispatcher.wake()
    await kit.until(lambda: bool(kit.results("reminder")), "the reminder handled")
    assert kit.results("reminder") == ["superseded"]
    assert [kind_of(m) for m in kit.outbound()] == ["confirmation"]
    [row] = await kit.query("SELECT status, reason FROM sms_messages WHERE kind = 'reminder'")
    assert (row["status"], row["reason"]) == ("superseded", "the visit has started")
