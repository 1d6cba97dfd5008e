"""A visit moved after its end (a no-show booked again): the move brings the number back."""

from __future__ import annotations

from datetime import timedelta

from libs.common.events import AppointmentRescheduledV1, AppointmentRescheduledV2, Topic
from tests.notify.conftest import INTEGRATION, PATIENT, Kit
from tests.notify.test_purge_paths import _held
from tests.notify.test_stop_lookup import _stop


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


async def _move_with_number(kit: Kit, key: str, move: AppointmentRescheduledV1) -> str:
    """Publishes `move` as launch does for a visit over: V2, with the number; its ciphertext."""
    ciphertext = kit.cipher.encrypt(PATIENT, f"patient-phone:{key}")
    await kit.publish(
        Topic.APPOINTMENT_RESCHEDULED,
        key,
        AppointmentRescheduledV2(**move.model_dump(), patient_phone_encrypted=ciphertext),
    )
    return ciphertext


async def test_a_move_after_the_end_carrying_the_number_is_announced_and_reminded(
    kit: Kit,
) -> None:
    """A V2 move of a visit whose number was purged at its end keeps the number again: the
    patient gets the notice of the new time and its reminder, and the number goes at the new
    end."""
    key = "apt_noshow01"
    move = await _over_and_purged(kit, key)
    ciphertext = await _move_with_number(kit, key, move)
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


async def test_a_move_of_a_past_visit_to_past_times_texts_nobody(kit: Kit) -> None:
    """A V2 correcting an ended visit's times to times also past keeps no number and sends no
    notice: the visit is over by its new times too."""
    key = "apt_noshow03"
    move = await _over_and_purged(kit, key)
    past = kit.clock.now() - timedelta(hours=2)
    corrected = move.model_copy(update={"starts_at": past, "ends_at": past + timedelta(minutes=30)})
    await _move_with_number(kit, key, corrected)
    await kit.until(lambda: bool(kit.results("reschedule")), "the notice to be finished")
    [notice] = await kit.query("SELECT status, reason FROM sms_messages WHERE kind = 'reschedule'")
    assert (notice["status"], notice["reason"]) == ("superseded", "the visit has ended")
    assert await _held(kit, key) is None
    assert len(kit.outbound()) == 1


async def test_a_move_after_a_stop_does_not_bring_the_number_back(kit: Kit) -> None:
    """A V2 of a visit whose patient replied STOP to the sending number keeps no number: the
    STOP stands."""
    key = "apt_noshow04"
    move = await _over_and_purged(kit, key)
    await _stop(kit)
    await _move_with_number(kit, key, move)
    await kit.until(lambda: bool(kit.results("reschedule")), "the notice to be finished")
    assert await _held(kit, key) is None
    assert len(kit.outbound()) == 1
