from __future__ import annotations

from datetime import timedelta

from libs.common.events import Topic
from tests.notify.conftest import OTHER_INTEGRATION, OTHER_SENDER, PATIENT, SENDER, Kit, MakeKit
from tests.support.kafka_reader import read_all


async def test_redelivered_and_republished_bookings_send_nothing_twice(kit: Kit) -> None:
    """The same event delivered twice, and the same booking under a new event id, give one
    confirmation and one sms-sent event; a sent message is never taken again."""
    await kit.configure()
    payload = kit.booking("apt_dupe01")
    event = await kit.publish(Topic.APPOINTMENT_CREATED, "apt_dupe01", payload)
    await kit.send_raw(event)
    await kit.publish(Topic.APPOINTMENT_CREATED, "apt_dupe01", payload)
    await kit.until_result("confirmation", "sent")
    await kit.until(lambda: kit.applied >= 3, "the republished booking applied")
    assert await kit.dispatcher.dispatch_due() == 0
    assert len(kit.outbound()) == 1
    assert len(await read_all(kit.settings.topic("sms-sent"), 1)) == 1
    rows = await kit.query("SELECT count(*) AS n FROM sms_messages WHERE kind = 'confirmation'")
    assert rows[0]["n"] == 1


async def test_crash_between_send_and_commit_does_not_send_twice(make_kit: MakeKit) -> None:
    """A dispatcher killed after ACS accepted a message, before recording it, leaves the
    message to be retried with the same repeatabilityRequestId; the stand-in sends it once."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    await kit.book("apt_crash01")
    await kit.crash_dispatcher()
    # Its delivery report locks the message while it is stored, and a claim meanwhile skips
    # it (test_lost_send_races): stored first.
    await kit.sandbox.components.sandbox.notifier.drain()
    [sms] = kit.outbound()
    [row] = await kit.query(
        "SELECT status, attempts, repeatability_first_sent, provider_message_id"
        " FROM sms_messages WHERE kind = 'confirmation'"
    )
    assert (row["status"], row["attempts"], row["provider_message_id"]) == ("pending", 1, None)
    first_sent = row["repeatability_first_sent"]
    assert first_sent is not None

    # The crashed claim's lease runs out; another dispatcher takes the message again.
    kit.clock.advance(kit.settings.scheduler_lease_s + 1)
    assert await kit.dispatcher.dispatch_due() >= 1
    assert kit.results("confirmation") == ["sent"]
    assert [m.to for m in kit.outbound()] == [PATIENT]
    [row] = await kit.query(
        "SELECT status, attempts, repeatability_first_sent, provider_message_id"
        " FROM sms_messages WHERE kind = 'confirmation'"
    )
    assert (row["status"], row["attempts"]) == ("sent", 2)
    assert row["repeatability_first_sent"] == first_sent
    assert row["provider_message_id"] == sms.message_id
    assert len(await read_all(kit.settings.topic("sms-sent"), 1)) == 1


async def test_throttled_send_is_retried_after_retry_after(make_kit: MakeKit) -> None:
    """When ACS answers 429 the message waits at least Retry-After, then goes once."""
    # The stand-in allows 2 a minute; notify's own limit is set above it to provoke 429.
    kit = await make_kit(sandbox_rate=2, sms_rate_per_minute=50)
    await kit.configure()
    for n in range(3):
        await kit.book(f"apt_429_{n}")
    await kit.until(
        lambda: (
            kit.results("confirmation").count("sent") == 2
            and "retry" in kit.results("confirmation")
        ),
        "two sent and one throttled",
    )
    [throttled] = await kit.query(
        "SELECT due_at, attempts, reason FROM sms_messages WHERE kind = 'confirmation'"
        " AND status = 'pending'"
    )
    assert "429" in throttled["reason"]
    assert throttled["due_at"] >= kit.clock.now() + timedelta(seconds=59)
    assert await kit.dispatcher.dispatch_due() == 0

    await kit.advance(timedelta(seconds=61))
    await kit.until_result("confirmation", "sent", count=3)
    assert len(kit.outbound()) == 3
    rows = await kit.query(
        "SELECT attempts FROM sms_messages WHERE kind = 'confirmation' ORDER BY attempts"
    )
    assert [r["attempts"] for r in rows] == [1, 1, 2]


async def test_rate_limit_per_sending_number_is_held_without_provider_429(
    make_kit: MakeKit,
) -> None:
    """Notify sends at most its per-minute limit from one number and defers the rest until a
    slot frees; another number is not held back; ACS never has to answer 429."""
    kit = await make_kit(sandbox_rate=4, sms_rate_per_minute=3)
    await kit.configure()
    await kit.configure(integration=OTHER_INTEGRATION, sender=OTHER_SENDER)
    for n in range(5):
        await kit.book(f"apt_rate_{n}")
    await kit.book("apt_rate_other", integration=OTHER_INTEGRATION)
    await kit.until(
        lambda: (
            kit.results("confirmation").count("sent") == 4
            and kit.results("confirmation").count("retry") >= 2
        ),
        "three sent from the first number, one from the other, two deferred",
    )
    senders = [m.sender for m in kit.outbound()]
    assert (senders.count(SENDER), senders.count(OTHER_SENDER)) == (3, 1)
    deferred = await kit.query(
        "SELECT attempts, reason FROM sms_messages WHERE status = 'pending'"
        " AND kind = 'confirmation'"
    )
    assert [(r["attempts"], r["reason"]) for r in deferred] == [
        (0, "sending number at its rate limit")
    ] * 2

    await kit.advance(timedelta(seconds=60))
    await kit.until_result("confirmation", "sent", count=6)
    assert len(kit.outbound()) == 6
