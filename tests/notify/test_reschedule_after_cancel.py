"""Notify never texts about a cancelled visit's reschedule: launch no longer publishes one after
a cancel, and a reschedule that reaches notify after the cancel (the topics are not ordered
with each other) plans nothing."""

from __future__ import annotations

from datetime import timedelta

from libs.common.events import AppointmentCancelledV1, AppointmentRescheduledV1, Topic
from tests.notify.conftest import INTEGRATION, Kit, kind_of


async def test_a_reschedule_after_the_cancel_sends_no_sms(kit: Kit) -> None:
    """After the cancellation notice, a newer reschedule of the visit plans no reschedule
    notice and no reminder: nothing is due at once or at the new reminder time."""
    await kit.configure(offsets=[15, 60])
    booking = await kit.book("apt_cancelmove1", starts_in=timedelta(hours=2))
    await kit.until_result("confirmation", "sent")
    await kit.publish(
        Topic.APPOINTMENT_CANCELLED,
        "apt_cancelmove1",
        AppointmentCancelledV1(
            integration_id=INTEGRATION, reason_code="cancelled-in-ehr", schedule_version=2
        ),
    )
    await kit.until_result("cancellation", "sent")

    new_start = booking.starts_at + timedelta(days=1)
    before = kit.applied
    await kit.publish(
        Topic.APPOINTMENT_RESCHEDULED,
        "apt_cancelmove1",
        AppointmentRescheduledV1(
            integration_id=INTEGRATION,
            starts_at=new_start,
            ends_at=new_start + timedelta(minutes=30),
            time_zone="America/Chicago",
            schedule_version=3,
        ),
    )
    await kit.until_applied(before + 1)
    assert await kit.dispatcher.dispatch_due() == 0
    for offset in (60, 15):
        kit.clock.set(new_start - timedelta(minutes=offset))
        assert await kit.dispatcher.dispatch_due() == 0

    assert [kind_of(m) for m in kit.outbound()] == ["confirmation", "cancellation"]
    rows = await kit.query("SELECT kind, status FROM sms_messages ORDER BY id")
    assert {(r["kind"], r["status"]) for r in rows} == {
        ("confirmation", "sent"),
        ("cancellation", "sent"),
        ("reminder", "cancelled"),
    }
