"""A visit moved after its end (a no-show booked again): the move brings the number back."""

from __future__ import annotations

from datetime import timedelta

from libs.common.events import AppointmentRescheduledV1, AppointmentRescheduledV2, Topic
from tests.notify.conftest import INTEGRATION, PATIENT, Kit
from tests.notify.test_purge_paths import _held


async def _over_and_purged(kit: Kit, key: str) -> AppointmentRescheduledV1:
    """Books `key`, sends its confirmation, lets the visit end and the purger erase the
    number; the move a week on, without the number (V1)."""
    await kit.configure()
    booking = await kit.book(key, starts_in=timedelta(hours=2))
    await kit.until_result("confirmation", "sent")
    kit.clock.set(booking.ends_at + timedelta(minutes=1))
    assert await kit.purge() == 1
    assert await _held(kit, key) is None
    new_start = booking.starts_at + timedelta(days=7)
    return AppointmentRescheduledV1(
        integration_id=INTEGRATION,
        starts_at=new_start,
        ends_at=new_start + timedelta(minutes=30),
        time_zone="America/Chicago",
        schedule_version=2,
    )


async def test_a_move_after_the_end_carrying_the_number_is_announced_and_reminded(
    kit: Kit,
) -> None:
    """A V2 move of a visit whose number was purged at its end keeps the number again: the
    patient gets the notice of the new time and its reminder, and the number goes at the new
    end."""
    key = "apt_noshow01"
    move = await _over_and_purged(kit, key)
    ciphertext = kit.cipher.encrypt(PATIENT, f"patient-phone:{key}")
    await kit.publish(
        Topic.APPOINTMENT_RESCHEDULED,
        key,
        AppointmentRescheduledV2(**move.model_dump(), patient_phone_encrypted=ciphertext),
    )
    await kit.until_result("reschedule", "sent")
    assert kit.outbound()[-1].to == PATIENT
    assert await _held(kit, key) == ciphertext
    kit.clock.set(move.starts_at - timedelta(minutes=15))
    kit.dispatcher.wake()
    await kit.until_result("reminder", "sent")
    assert len(kit.outbound()) == 3
    kit.clock.set(move.ends_at + timedelta(minutes=1))
    assert await kit.purge() == 1
    assert await _held(kit, key) is None


async def test_a_move_after_the_end_without_the_number_sends_nothing(kit: Kit) -> None:
    """A V1 move of a visit whose number was purged sends nothing: no number is held."""
    key = "apt_noshow02"
    move = await _over_and_purged(kit, key)
    await kit.publish(Topic.APPOINTMENT_RESCHEDULED, key, move)
    await kit.until(lambda: bool(kit.results("reschedule")), "the notice to be finished")
    # No number on file: the dispatcher's refusal for a message with nowhere to go.
    assert kit.results("reschedule") == ["invalid_number"]
    assert len(kit.outbound()) == 1
