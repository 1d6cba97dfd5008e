from __future__ import annotations

from datetime import timedelta

import pytest

from libs.common.events import SmsSentV1, Topic, decode_event
from tests.notify.conftest import (
    INTEGRATION,
    OTHER_INTEGRATION,
    OTHER_SENDER,
    PATIENT,
    SENDER,
    Kit,
    MakeKit,
    integration_config,
)
from tests.support.kafka_reader import read_all


async def _held(kit: Kit, key: str) -> str | None:
    """The number held for the appointment; its keyed hash is there exactly when it is."""
    [row] = await kit.query(
        "SELECT phone_encrypted, recipient_hash FROM appointments WHERE appointment_key = $1",
        key,
    )
    held: str | None = row["phone_encrypted"]
    assert (row["recipient_hash"] is None) == (held is None), "hash kept without its number"
    return held


async def test_sms_switched_off_for_the_integration_purges_the_numbers(kit: Kit) -> None:
    """Switching the integration's SMS off purges its patients' numbers."""
    await kit.configure()
    await kit.book("apt_off01", starts_in=timedelta(days=3))
    await kit.until_result("confirmation", "sent")
    await kit.configure(sms_enabled=False, version=2)
    assert await _held(kit, "apt_off01") is None, "number kept after SMS was switched off"


@pytest.mark.parametrize(
    ("change", "key"), [({"enabled": False}, "apt_dis01"), ({"deleted": True}, "apt_del01")]
)
async def test_integration_disabled_or_deleted_purges_the_numbers(
    kit: Kit, change: dict[str, bool], key: str
) -> None:
    """Disabling or deleting the integration purges its patients' numbers."""
    await kit.configure()
    await kit.book(key, starts_in=timedelta(days=3))
    await kit.until_result("confirmation", "sent")
    before = kit.applied
    await kit.publish(
        Topic.INTEGRATION_CONFIG,
        str(INTEGRATION),
        integration_config(version=2).model_copy(update=change),
    )
    await kit.until_applied(before + 1)
    assert await _held(kit, key) is None, f"number kept after {change}"


async def test_sms_switched_off_refuses_the_messages_owed_as_no_consent(make_kit: MakeKit) -> None:
    """Messages owed when SMS is switched off are refused then (no_consent, an sms-sent each)."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    await kit.book("apt_off02", starts_in=timedelta(days=3))
    await kit.configure(sms_enabled=False, version=2)
    rows = await kit.query("SELECT kind, status, outcome FROM sms_messages ORDER BY kind")
    assert [tuple(r) for r in rows] == [
        ("confirmation", "refused", "no_consent"),
        ("reminder", "refused", "no_consent"),
    ]
    [appointment] = await kit.query("SELECT confirmation, phone_purged_at FROM appointments")
    assert appointment["confirmation"] == "skipped"
    assert appointment["phone_purged_at"] is not None
    events = [decode_event(r) for r in await read_all(kit.settings.topic("sms-sent"), 2)]
    assert sorted(
        (e.payload.kind, e.payload.outcome) for e in events if isinstance(e.payload, SmsSentV1)
    ) == [("confirmation", "no_consent"), ("reminder", "no_consent")]
    assert kit.outbound() == []


async def test_a_replayed_config_with_sms_off_changes_nothing(kit: Kit) -> None:
    """An older config version with SMS off (a replay) leaves the numbers of the newer one."""
    await kit.configure(version=2)
    await kit.book("apt_off03", starts_in=timedelta(days=3))
    await kit.until_result("confirmation", "sent")
    await kit.configure(sms_enabled=False, version=1)
    assert await _held(kit, "apt_off03") is not None


async def test_the_purger_drops_numbers_booked_after_sms_was_switched_off(kit: Kit) -> None:
    """A booking still published with SMS on after the integration's SMS went off keeps its
    number only until the next purge."""
    await kit.configure(sms_enabled=False)
    await kit.book("apt_off04", starts_in=timedelta(days=3))
    assert await _held(kit, "apt_off04") is not None
    assert await kit.purge() == 1
    assert await _held(kit, "apt_off04") is None


async def test_stop_reply_purges_the_number(kit: Kit) -> None:
    """A STOP reply purges the patient's number: nothing more may go to it from that sender."""
    await kit.configure()
    await kit.book("apt_stopp1", starts_in=timedelta(days=3))
    await kit.until_result("confirmation", "sent")
    kit.sandbox.components.acs.receive(PATIENT, SENDER, "STOP")
    await kit.sandbox.components.sandbox.notifier.drain()
    [opt] = await kit.query("SELECT opted_out FROM opt_outs")
    assert opt["opted_out"] is True
    assert await _held(kit, "apt_stopp1") is None, "number kept after the patient replied STOP"


async def test_stop_reply_purges_only_that_patients_numbers_for_that_sender(kit: Kit) -> None:
    """A STOP purges the patient's numbers held for the sender it was sent to and refuses
    their owed messages as opted_out; another patient's, or another sender's, stay."""
    await kit.configure()
    await kit.configure(OTHER_INTEGRATION, sender=OTHER_SENDER)
    await kit.book("apt_stopp2", starts_in=timedelta(days=3))
    await kit.book("apt_stopp3", phone="+13125550143", starts_in=timedelta(days=3))
    await kit.book("apt_stopp4", starts_in=timedelta(days=3), integration=OTHER_INTEGRATION)
    await kit.until_result("confirmation", "sent", count=3)
    kit.sandbox.components.acs.receive(PATIENT, SENDER, "STOP")
    await kit.sandbox.components.sandbox.notifier.drain()
    assert await _held(kit, "apt_stopp2") is None
    assert await _held(kit, "apt_stopp3") is not None
    assert await _held(kit, "apt_stopp4") is not None
    rows = await kit.query(
        "SELECT appointment_key, status, outcome FROM sms_messages WHERE kind = 'reminder'"
        " ORDER BY appointment_key"
    )
    assert [tuple(r) for r in rows] == [
        ("apt_stopp2", "refused", "opted_out"),
        ("apt_stopp3", "pending", None),
        ("apt_stopp4", "pending", None),
    ]
