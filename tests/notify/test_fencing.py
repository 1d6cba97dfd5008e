from __future__ import annotations

from datetime import timedelta

import asyncpg

from services.notify.scheduler import Finish
from tests.notify.conftest import Kit, MakeKit


async def taken_over(kit: Kit, key: str) -> tuple[asyncpg.Record, asyncpg.Record]:
    """The row a first dispatcher claimed and the row a second one claimed after its lease."""
    await kit.book(key)
    [stale] = await kit.dispatcher.claim_due()
    kit.clock.advance(kit.settings.scheduler_lease_s + 1)
    [fresh] = await kit.dispatcher.claim_due()
    assert fresh["claims"] == stale["claims"] + 1
    return stale, fresh


async def written(kit: Kit) -> dict[str, object]:
    [row] = await kit.query(
        "SELECT m.status, m.attempts, a.confirmation,"
        " (SELECT count(*) FROM outbox) AS events,"
        " (SELECT count(*) FROM sender_sends) AS sends,"
        " (SELECT count(*) FROM dead_letters) AS dead"
        " FROM sms_messages m JOIN appointments a USING (appointment_key)"
        " WHERE m.kind = 'confirmation'"
    )
    return dict(row)


async def test_taken_over_claim_records_no_attempt_and_sends_nothing(make_kit: MakeKit) -> None:
    """A dispatcher whose claim was taken over neither records an attempt nor counts a send
    against the number, and calls no one; the new claimant sends once."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    stale, fresh = await taken_over(kit, "apt_fence01")
    assert await kit.dispatcher._dispatch(stale) == "lost"
    assert kit.outbound() == []
    assert await written(kit) == {
        "status": "pending", "attempts": 0, "confirmation": "pending",
        "events": 0, "sends": 0, "dead": 0,
    }  # fmt: skip
    assert await kit.dispatcher._dispatch(fresh) == "sent"
    assert len(kit.outbound()) == 1
    assert await written(kit) == {
        "status": "sent", "attempts": 1, "confirmation": "sent",
        "events": 1, "sends": 1, "dead": 0,
    }  # fmt: skip


async def test_taken_over_claim_records_no_outcome_event_or_dead_letter(
    make_kit: MakeKit,
) -> None:
    """An outcome from a dispatcher whose claim was taken over writes nothing: no status, no
    confirmation state, no sms-sent event, no dead letter; the new claimant's writes all."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    stale, fresh = await taken_over(kit, "apt_fence02")
    gave_up = Finish("failed", "failed", "gave up", dead_letter=True, attempts=4)
    assert await kit.dispatcher._finish(stale, gave_up) == "lost"
    assert await kit.dispatcher._finish(stale, Finish("refused", "no_consent")) == "lost"
    assert await written(kit) == {
        "status": "pending", "attempts": 0, "confirmation": "pending",
        "events": 0, "sends": 0, "dead": 0,
    }  # fmt: skip
    assert await kit.dispatcher._finish(fresh, gave_up) == "failed"
    assert await written(kit) == {
        "status": "failed", "attempts": 0, "confirmation": "failed",
        "events": 1, "sends": 0, "dead": 1,
    }  # fmt: skip
    [dead] = await kit.query("SELECT kind, attempts, reason, appointment_key FROM dead_letters")
    assert tuple(dead) == ("confirmation", 4, "gave up", "apt_fence02")


async def test_cancelled_message_is_finished_without_an_event(make_kit: MakeKit) -> None:
    """A message finished with no outcome (cancelled) records its state and announces
    nothing."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    await kit.book("apt_fence03")
    [row] = await kit.dispatcher.claim_due()
    assert await kit.dispatcher._finish(row, Finish("cancelled", None, "cancelled")) == "cancelled"
    assert await written(kit) == {
        "status": "cancelled", "attempts": 0, "confirmation": "skipped",
        "events": 0, "sends": 0, "dead": 0,
    }  # fmt: skip
    kit.clock.advance(timedelta(minutes=5).total_seconds())
    assert await kit.dispatcher.claim_due() == []
