from __future__ import annotations

import structlog

from libs.common.events import SmsRequestedV1, SmsSentV1, Topic, decode_event
from tests.notify.conftest import INTEGRATION, PATIENT, SENDER, Kit
from tests.support.kafka_reader import read_all


async def test_no_sms_without_both_consents(kit: Kit) -> None:
    """With the organisation's SMS consent off nothing is sent; the outcome is no_consent."""
    await kit.configure(sms_enabled=False)
    await kit.book("apt_noconsent")
    await kit.until_result("confirmation", "no_consent")
    assert kit.outbound() == []
    [event] = [decode_event(r) for r in await read_all(kit.settings.topic("sms-sent"), 1)]
    assert isinstance(event.payload, SmsSentV1)
    assert event.payload.outcome == "no_consent"
    [row] = await kit.query("SELECT confirmation FROM appointments")
    assert row["confirmation"] == "skipped"


async def test_booking_with_sms_off_plans_nothing_and_keeps_no_number(kit: Kit) -> None:
    """An appointment booked with SMS off gets no messages and its number is not stored."""
    await kit.configure()
    await kit.book("apt_smsoff", sms_enabled=False)
    assert await kit.query("SELECT * FROM sms_messages") == []
    [row] = await kit.query("SELECT phone_encrypted, confirmation FROM appointments")
    assert (row["phone_encrypted"], row["confirmation"]) == (None, "skipped")


async def test_invalid_number_is_refused_with_a_reason_and_never_logged(kit: Kit) -> None:
    """A number that is not a valid E.164 mobile number is refused, the reason recorded, and
    the number appears in no log entry."""
    await kit.configure()
    bad = "+1555555012"
    with structlog.testing.capture_logs() as logs:
        await kit.book("apt_badnumber", phone=bad)
        await kit.until_result("confirmation", "invalid_number")
    assert kit.outbound() == []
    [row] = await kit.query("SELECT status, reason FROM sms_messages WHERE kind = 'confirmation'")
    assert row["status"] == "refused"
    assert "number" in row["reason"]
    assert bad.lstrip("+") not in row["reason"]
    assert bad.lstrip("+") not in repr(logs)


async def test_stop_reply_is_honoured_and_only_a_hash_is_kept(kit: Kit) -> None:
    """After the patient replies STOP, nothing more goes to them from that number (their
    numbers held for it are purged); START lifts it for later bookings. Notify stores a keyed
    hash, never the number."""
    await kit.configure()
    await kit.book("apt_stop01")
    await kit.until_result("confirmation", "sent")
    kit.sandbox.components.acs.receive(PATIENT, SENDER, "Stop ")
    await kit.sandbox.components.sandbox.notifier.drain()
    [opt_out] = await kit.query("SELECT * FROM opt_outs")
    assert opt_out["sender"] == SENDER
    assert opt_out["opted_out"] is True
    assert PATIENT.lstrip("+") not in opt_out["recipient_hash"]

    await kit.publish(
        Topic.SMS_REQUESTED,
        "apt_stop01",
        SmsRequestedV1(integration_id=INTEGRATION, requested_at=kit.clock.now()),
    )
    await kit.until_result("link", "invalid_number")  # no number on file any more
    assert len(kit.outbound()) == 1

    kit.clock.advance(5)
    kit.sandbox.components.acs.receive(PATIENT, SENDER, "START")
    await kit.sandbox.components.sandbox.notifier.drain()
    await kit.book("apt_stop02")
    await kit.until_result("confirmation", "sent", count=2)
    assert len(kit.outbound()) == 2
