from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from libs.common.events import AppointmentCancelledV1, AppointmentRescheduledV1, Topic
from services.notify.acs import AcsSmsClient, SendResult
from tests.conftest import wait_for
from tests.notify.conftest import INTEGRATION, Kit, MakeKit, kind_of


async def test_reschedule_moves_the_pending_reminder(kit: Kit) -> None:
    """A reschedule sends a notice, supersedes the old reminder and plans one at the new start."""
    await kit.configure()
    booking = await kit.book("apt_move01", starts_in=timedelta(hours=2))
    await kit.until_result("confirmation", "sent")
    new_start = booking.starts_at + timedelta(hours=1)
    await kit.publish(
        Topic.APPOINTMENT_RESCHEDULED,
        "apt_move01",
        AppointmentRescheduledV1(
            integration_id=INTEGRATION,
            starts_at=new_start,
            ends_at=new_start + timedelta(minutes=30),
            time_zone="America/Chicago",
            schedule_version=2,
        ),
    )
    await kit.until_result("reschedule", "sent")
    assert "11:00 AM CST" in kit.outbound()[-1].message

    kit.clock.set(booking.starts_at - timedelta(minutes=15))
    assert await kit.dispatcher.dispatch_due() == 0
    kit.clock.set(new_start - timedelta(minutes=15))
    kit.dispatcher.wake()
    await kit.until_result("reminder", "sent")
    assert "11:00 AM CST" in kit.outbound()[-1].message
    rows = await kit.query(
        "SELECT schedule_version, status FROM sms_messages WHERE kind = 'reminder'"
        " ORDER BY schedule_version"
    )
    assert [(r["schedule_version"], r["status"]) for r in rows] == [(1, "superseded"), (2, "sent")]
    assert len(kit.outbound()) == 3


async def test_cancel_drops_the_reminder_and_sends_a_cancellation(kit: Kit) -> None:
    """A cancel sends one cancellation notice; the reminder never goes."""
    await kit.configure(offsets=[15, 60])
    booking = await kit.book("apt_cancel01", starts_in=timedelta(hours=2))
    await kit.until_result("confirmation", "sent")
    await kit.publish(
        Topic.APPOINTMENT_CANCELLED,
        "apt_cancel01",
        AppointmentCancelledV1(
            integration_id=INTEGRATION, reason_code="patient_request", schedule_version=1
        ),
    )
    await kit.until_result("cancellation", "sent")
    assert "cancelled" in kit.outbound()[-1].message

    kit.clock.set(booking.starts_at)
    assert await kit.dispatcher.dispatch_due() == 0
    assert [kind_of(m) for m in kit.outbound()] == ["confirmation", "cancellation"]
    statuses = await kit.query("SELECT status FROM sms_messages WHERE kind = 'reminder'")
    assert {r["status"] for r in statuses} == {"cancelled"}


def _cancel(reason: str = "cancelled-in-ehr") -> AppointmentCancelledV1:
    return AppointmentCancelledV1(
        integration_id=INTEGRATION, reason_code=reason, schedule_version=1
    )


async def test_a_cancel_after_the_visit_ended_plans_no_cancellation_notice(kit: Kit) -> None:
    """The EHR cancelling a visit that is over (tidying up) plans no cancellation notice."""
    await kit.configure()
    booking = await kit.book("apt_past01", starts_in=timedelta(hours=1))
    await kit.until_result("confirmation", "sent")

    kit.clock.set(booking.ends_at + timedelta(minutes=10))
    before = kit.applied
    await kit.publish(Topic.APPOINTMENT_CANCELLED, "apt_past01", _cancel())
    await kit.until_applied(before + 1)
    assert await kit.dispatcher.dispatch_due() == 0
    assert [kind_of(m) for m in kit.outbound()] == ["confirmation"]
    assert await kit.query("SELECT * FROM sms_messages WHERE kind = 'cancellation'") == []
    [appointment] = await kit.query("SELECT cancelled FROM appointments")
    assert appointment["cancelled"]


async def test_a_cancellation_notice_reached_after_the_visit_ended_is_not_sent(
    make_kit: MakeKit,
) -> None:
    """A cancellation notice planned in time but reached by the dispatcher only after the
    visit's end is superseded, not sent."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    booking = await kit.book("apt_past02", starts_in=timedelta(hours=1))
    assert await kit.dispatcher.dispatch_due() == 1
    before = kit.applied
    await kit.publish(Topic.APPOINTMENT_CANCELLED, "apt_past02", _cancel())
    await kit.until_applied(before + 1)

    kit.clock.set(booking.ends_at)
    assert await kit.dispatcher.dispatch_due() == 1
    assert kit.results("cancellation") == ["superseded"]
    assert [kind_of(m) for m in kit.outbound()] == ["confirmation"]
    [row] = await kit.query("SELECT status, reason FROM sms_messages WHERE kind = 'cancellation'")
    assert (row["status"], row["reason"]) == ("superseded", "the visit has ended")


async def test_a_move_before_the_confirmation_went_out_sends_one_confirmation_at_the_new_time(
    make_kit: MakeKit,
) -> None:
    """A visit moved before its confirmation went out gets one confirmation, at the new time,
    and no notice of the move."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    booking = await kit.book("apt_early_move", starts_in=timedelta(hours=2))
    new_start = booking.starts_at + timedelta(hours=1)
    before = kit.applied
    await kit.publish(
        Topic.APPOINTMENT_RESCHEDULED,
        "apt_early_move",
        AppointmentRescheduledV1(
            integration_id=INTEGRATION,
            starts_at=new_start,
            ends_at=new_start + timedelta(minutes=30),
            time_zone="America/Chicago",
            schedule_version=2,
        ),
    )
    await kit.until_applied(before + 1)

    assert await kit.dispatcher.dispatch_due() == 1
    [sms] = kit.outbound()
    assert kind_of(sms) == "confirmation"
    assert "11:00 AM CST" in sms.message
    rows = await kit.query(
        "SELECT kind, schedule_version, status FROM sms_messages ORDER BY kind, schedule_version"
    )
    assert [(r["kind"], r["schedule_version"], r["status"]) for r in rows] == [
        ("confirmation", 1, "superseded"),
        ("confirmation", 2, "sent"),
        ("reminder", 1, "superseded"),
        ("reminder", 2, "pending"),
    ]


async def test_a_move_while_the_confirmation_is_being_sent_is_announced_as_a_move(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A visit moved while its confirmation is with ACS gets that confirmation and then a
    notice of the move, not a second confirmation at another time."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    booking = await kit.book("apt_move_in_flight", starts_in=timedelta(hours=2))
    sending, answer = asyncio.Event(), asyncio.Event()
    real = AcsSmsClient.send

    async def held(client: AcsSmsClient, **kwargs: Any) -> SendResult:
        sending.set()
        await answer.wait()
        return await real(client, **kwargs)

    monkeypatch.setattr(AcsSmsClient, "send", held)
    first = asyncio.create_task(kit.dispatcher.dispatch_due())
    await wait_for(sending, "the confirmation at ACS")
    new_start = booking.starts_at + timedelta(hours=1)
    before = kit.applied
    await kit.publish(
        Topic.APPOINTMENT_RESCHEDULED,
        "apt_move_in_flight",
        AppointmentRescheduledV1(
            integration_id=INTEGRATION,
            starts_at=new_start,
            ends_at=new_start + timedelta(minutes=30),
            time_zone="America/Chicago",
            schedule_version=2,
        ),
    )
    await kit.until_applied(before + 1)
    answer.set()
    assert await first == 1
    assert await kit.dispatcher.dispatch_due() == 1
    assert [kind_of(sms) for sms in kit.outbound()] == ["confirmation", "reschedule"]
    assert "11:00 AM CST" in kit.outbound()[1].message


def _move(booking_start: Any, version: int = 2) -> AppointmentRescheduledV1:
    new_start = booking_start + timedelta(hours=3)
    return AppointmentRescheduledV1(
        integration_id=INTEGRATION,
        starts_at=new_start,
        ends_at=new_start + timedelta(minutes=30),
        time_zone="America/Chicago",
        schedule_version=version,
    )


async def _move_and_send_all(kit: Kit, key: str, move: AppointmentRescheduledV1) -> None:
    before = kit.applied
    await kit.publish(Topic.APPOINTMENT_RESCHEDULED, key, move)
    await kit.until_applied(before + 1)
    for _ in range(4):  # past every rate window and backoff
        await kit.advance(timedelta(minutes=6))
        while await kit.dispatcher.dispatch_due():
            pass


async def test_a_rate_limited_confirmation_is_replanned_not_followed_by_a_notice(
    make_kit: MakeKit,
) -> None:
    """A confirmation put off by the rate limit when the visit moves is replanned at the new
    time: one message, no notice of a move from a time the patient was never told."""
    kit = await make_kit(scheduler_enabled=False, sms_rate_per_minute=1)
    await kit.configure()
    await kit.book("apt_rl_a")
    assert await kit.dispatcher.dispatch_due() == 1
    booking = await kit.book("apt_rl_b", starts_in=timedelta(days=2))
    assert await kit.dispatcher.dispatch_due() == 1
    assert kit.results("confirmation") == ["sent", "retry"]

    await _move_and_send_all(kit, "apt_rl_b", _move(booking.starts_at))
    rows = await kit.query(
        "SELECT kind, schedule_version, status FROM sms_messages"
        " WHERE appointment_key = 'apt_rl_b' AND kind <> 'reminder' ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        ("confirmation", 1, "superseded"),
        ("confirmation", 2, "sent"),
    ]
    [to_b] = [m for m in kit.outbound() if "apt_rl_b"[-8:] in m.message]
    assert kind_of(to_b) == "confirmation"


async def test_a_confirmation_acs_refused_for_now_is_replanned_not_followed_by_a_notice(
    make_kit: MakeKit,
) -> None:
    """A confirmation ACS answered 429 (to be retried) when the visit moves did not go: it is
    replanned at the new time, with no notice of the move."""
    kit = await make_kit(scheduler_enabled=False, sandbox_rate=1)
    await kit.configure()
    await kit.book("apt_429_a")
    assert await kit.dispatcher.dispatch_due() == 1
    booking = await kit.book("apt_429_b", starts_in=timedelta(days=2))
    assert await kit.dispatcher.dispatch_due() == 1
    assert kit.results("confirmation") == ["sent", "retry"]

    await _move_and_send_all(kit, "apt_429_b", _move(booking.starts_at))
    rows = await kit.query(
        "SELECT kind, schedule_version, status FROM sms_messages"
        " WHERE appointment_key = 'apt_429_b' AND kind <> 'reminder' ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        ("confirmation", 1, "superseded"),
        ("confirmation", 2, "sent"),
    ]


async def test_a_confirmation_sent_without_an_answer_is_left_to_go_when_the_visit_moves(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A confirmation whose send got no answer may be at ACS: when the visit moves it is left
    to go (its retry is recognised by ACS) and the move is announced after it."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    booking = await kit.book("apt_noanswer", starts_in=timedelta(days=2))
    real = AcsSmsClient.send

    async def unanswered(client: AcsSmsClient, **kwargs: Any) -> SendResult:
        await real(client, **kwargs)  # it went, but the answer is lost
        monkeypatch.setattr(AcsSmsClient, "send", real)
        return SendResult(status=0, error_code="no-response")

    monkeypatch.setattr(AcsSmsClient, "send", unanswered)
    assert await kit.dispatcher.dispatch_due() == 1
    assert kit.results("confirmation") == ["retry"]

    await _move_and_send_all(kit, "apt_noanswer", _move(booking.starts_at))
    assert [kind_of(sms) for sms in kit.outbound()] == ["confirmation", "reschedule"]
    rows = await kit.query(
        "SELECT kind, status FROM sms_messages WHERE kind <> 'reminder' ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [("confirmation", "sent"), ("reschedule", "sent")]


async def test_a_confirmation_refused_for_now_after_a_lost_answer_is_still_left_to_go(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A confirmation whose first send got no answer and whose retry ACS answered 429 may still
    be at ACS from the first: when the visit moves it is left to go, then the move announced."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    booking = await kit.book("apt_lost_429", starts_in=timedelta(days=2))
    real = AcsSmsClient.send

    async def unanswered(client: AcsSmsClient, **kwargs: Any) -> SendResult:
        await real(client, **kwargs)  # it went, but the answer is lost
        monkeypatch.setattr(AcsSmsClient, "send", throttled)
        return SendResult(status=0, error_code="no-response")

    async def throttled(client: AcsSmsClient, **kwargs: Any) -> SendResult:
        monkeypatch.setattr(AcsSmsClient, "send", real)
        return SendResult(status=429, error_code="TooManyRequests", retry_after_s=1)

    monkeypatch.setattr(AcsSmsClient, "send", unanswered)
    assert await kit.dispatcher.dispatch_due() == 1
    # The first send's delivery report locks the message (pending, in flight) while it is
    # stored: a claim meanwhile skips it (test_lost_send_races). Stored first, so the retry's
    # claim below takes it.
    await kit.sandbox.components.sandbox.notifier.drain()
    await kit.advance(timedelta(minutes=6))
    assert await kit.dispatcher.dispatch_due() == 1
    assert kit.results("confirmation") == ["retry", "retry"]

    await _move_and_send_all(kit, "apt_lost_429", _move(booking.starts_at))
    assert [kind_of(sms) for sms in kit.outbound()] == ["confirmation", "reschedule"]
    rows = await kit.query(
        "SELECT kind, status FROM sms_messages WHERE kind <> 'reminder' ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [("confirmation", "sent"), ("reschedule", "sent")]
