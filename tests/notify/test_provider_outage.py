from __future__ import annotations

from datetime import timedelta

from libs.common.events import SmsSentV1, decode_event
from tests.notify.conftest import Kit, MakeKit
from tests.support.kafka_reader import read_all


async def attempts_made(kit: Kit, total: int) -> None:
    """Moves the clock past each backoff and waits for the dispatcher's next attempt."""
    for attempt in range(2, total + 1):
        await kit.advance(timedelta(minutes=10))
        await kit.until(
            lambda attempt=attempt: len(kit.results("confirmation")) >= attempt,  # type: ignore[misc]
            f"attempt {attempt}",
        )


async def test_provider_5xx_is_retried_with_backoff_then_sent_once(make_kit: MakeKit) -> None:
    """Two 503 answers from ACS are retried later (backoff), and the message goes once."""
    kit = await make_kit()
    await kit.configure()
    kit.sandbox.components.acs.state.send_failures.extend([503, 503])
    await kit.book("apt_outage")
    await kit.until_result("confirmation", "retry", count=1)
    [row] = await kit.query(
        "SELECT status, attempts, due_at, reason FROM sms_messages WHERE kind = 'confirmation'"
    )
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert "503" in row["reason"]
    assert row["due_at"] > kit.clock.now()
    assert kit.outbound() == []

    await attempts_made(kit, 3)
    await kit.until_result("confirmation", "sent")
    assert len(kit.outbound()) == 1
    [row] = await kit.query("SELECT status, attempts FROM sms_messages WHERE kind = 'confirmation'")
    assert (row["status"], row["attempts"]) == ("sent", 3)


async def test_message_is_dead_lettered_after_the_last_attempt(make_kit: MakeKit) -> None:
    """After the configured attempts the message is parked in dead_letters with its reason,
    counted by a metric, and announced as a failed sms-sent; nothing reached the patient."""
    kit = await make_kit(sms_max_attempts=3)
    await kit.configure()
    kit.sandbox.components.acs.state.send_failures.extend([500] * 10)
    await kit.book("apt_dead")
    await kit.until_result("confirmation", "retry", count=1)
    await attempts_made(kit, 3)
    [dead] = await kit.query("SELECT kind, attempts, reason FROM dead_letters")
    assert (dead["kind"], dead["attempts"]) == ("confirmation", 3)
    assert "500" in dead["reason"]
    assert kit.outbound() == []
    events = [decode_event(raw) for raw in await read_all(kit.settings.topic("sms-sent"), 1)]
    assert len(events) == 1
    assert isinstance(events[0].payload, SmsSentV1)
    assert events[0].payload.outcome == "failed"
