"""A STOP reply finds the appointments holding the patient's number by the keyed hash stored
beside each number (migration 0005), decrypting only numbers held from before it; and every
statement that purges numbers locks the appointments in key order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

import orjson
import prometheus_client
import pytest
import structlog

from libs.common.crypto import FieldCipher
from libs.common.events import (
    AppointmentCancelledV1,
    AppointmentRescheduledV1,
    Topic,
)
from services.notify import optout
from services.notify.app import PURGER
from services.notify.phones import RecipientHasher, recipient_hash
from tests.conftest import wait_for
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

OTHER_PATIENT = "+13125550143"


class CountingCipher(FieldCipher):
    """The service's cipher, counting what it decrypts."""

    decrypted = 0

    def decrypt(self, token: str, purpose: str) -> str:
        self.decrypted += 1
        return super().decrypt(token, purpose)


def _hasher(kit: Kit) -> tuple[RecipientHasher, CountingCipher]:
    cipher = CountingCipher(
        kit.settings.field_encryption_keys, kit.settings.field_encryption_active_key
    )
    secret = kit.settings.recipient_hash_secret.get_secret_value()
    return RecipientHasher(cipher, secret, kit.settings.sms_default_region), cipher


def _hash(kit: Kit, e164: str) -> str:
    return recipient_hash(kit.settings.recipient_hash_secret.get_secret_value(), e164)


async def _stored(kit: Kit, key: str) -> tuple[str | None, str | None]:
    [row] = await kit.query(
        "SELECT phone_encrypted, recipient_hash FROM appointments WHERE appointment_key = $1",
        key,
    )
    return row["phone_encrypted"], row["recipient_hash"]


async def _held_before_0005(
    kit: Kit, key: str, phone: str, integration: uuid.UUID = INTEGRATION
) -> None:
    """A row as a release before migration 0005 stored it: the number, no hash."""
    starts_at = kit.clock.now() + timedelta(days=3)
    await kit.pool.execute(
        "INSERT INTO appointments (appointment_key, tenant_id, integration_id, starts_at,"
        " ends_at, time_zone, sms_enabled, schedule_version, confirmation, phone_encrypted)"
        " VALUES ($1, 'tenant-a', $2, $3, $4, 'UTC', true, 1, 'sent', $5)",
        key,
        integration,
        starts_at,
        starts_at + timedelta(minutes=30),
        kit.cipher.encrypt(phone, f"patient-phone:{key}"),
    )


async def _stop(kit: Kit, patient: str = PATIENT, sender: str = SENDER) -> None:
    kit.sandbox.components.acs.receive(patient, sender, "STOP")
    await kit.sandbox.components.sandbox.notifier.drain()


async def test_a_number_is_stored_with_the_keyed_hash_of_its_e164_form(make_kit: MakeKit) -> None:
    """Each number kept, by the batch or the per-event path, has the opt-outs' keyed hash of
    its E.164 form beside it; none without a number; "" for one no SMS can go to."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    await kit.book("apt_hash_national", phone="(312) 555-0142")
    await kit.book("apt_hash_invalid", phone="+1555555012")  # too short: no SMS can go to it
    await kit.book("apt_hash_sms_off", sms_enabled=False)
    await kit.book("apt_hash_none", phone=None)
    # A move before the booking leaves an unbooked row, which the booking completes.
    before = kit.applied
    starts_at = kit.clock.now() + timedelta(days=2)
    await kit.publish(
        Topic.APPOINTMENT_RESCHEDULED,
        "apt_hash_late",
        AppointmentRescheduledV1(
            integration_id=INTEGRATION,
            starts_at=starts_at,
            ends_at=starts_at + timedelta(minutes=30),
            time_zone="UTC",
            schedule_version=2,
        ),
    )
    await kit.until_applied(before + 1)
    assert await _stored(kit, "apt_hash_late") == (None, None)
    await kit.book("apt_hash_late", phone=OTHER_PATIENT)

    phone, hashed = await _stored(kit, "apt_hash_national")
    assert phone is not None
    assert hashed == _hash(kit, PATIENT)
    assert (await _stored(kit, "apt_hash_late"))[1] == _hash(kit, OTHER_PATIENT)
    assert (await _stored(kit, "apt_hash_invalid"))[1] == ""
    assert await _stored(kit, "apt_hash_sms_off") == (None, None)
    assert await _stored(kit, "apt_hash_none") == (None, None)


async def test_stop_finds_numbers_by_hash_and_decrypts_only_those_held_before_it(
    make_kit: MakeKit,
) -> None:
    """held_for finds the patient's numbers held for the sender by their hash, and those held
    since before migration 0005 (no hash) by decrypting those alone: not the numbers of other
    patients, nor any held for another sender."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    await kit.configure(OTHER_INTEGRATION, sender=OTHER_SENDER)
    for n in range(5):
        await kit.book(f"apt_found_{n}", phone=OTHER_PATIENT if n % 2 else PATIENT)
    await kit.book("apt_found_other_sender", integration=OTHER_INTEGRATION)
    await _held_before_0005(kit, "apt_legacy_patient", PATIENT)
    await _held_before_0005(kit, "apt_legacy_other_patient", OTHER_PATIENT)
    await _held_before_0005(kit, "apt_legacy_other_sender", PATIENT, OTHER_INTEGRATION)

    hasher, cipher = _hasher(kit)
    async with kit.pool.acquire() as conn:
        found = await optout.held_for(conn, hasher, SENDER, PATIENT)
    assert sorted(found) == [
        "apt_found_0",
        "apt_found_2",
        "apt_found_4",
        "apt_legacy_patient",
    ]
    assert cipher.decrypted == 2, "decrypted more than the sender's numbers without a hash"


async def test_stop_purges_that_patients_numbers_for_that_sender_hashed_or_not(
    make_kit: MakeKit,
) -> None:
    """A STOP purges the patient's numbers held for that sender, with their hashes, those held
    from before migration 0005 too, and refuses their owed messages; another patient's and
    another sender's stay, with theirs."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    await kit.configure(OTHER_INTEGRATION, sender=OTHER_SENDER)
    await kit.book("apt_stopped")
    await kit.book("apt_kept_patient", phone=OTHER_PATIENT)
    await kit.book("apt_kept_sender", integration=OTHER_INTEGRATION)
    await _held_before_0005(kit, "apt_stopped_legacy", PATIENT)
    await _held_before_0005(kit, "apt_kept_legacy", OTHER_PATIENT)

    await _stop(kit)
    for key in ("apt_stopped", "apt_stopped_legacy"):
        assert await _stored(kit, key) == (None, None), key
    for key in ("apt_kept_patient", "apt_kept_sender", "apt_kept_legacy"):
        phone, _ = await _stored(kit, key)
        assert phone is not None, key
    assert (await _stored(kit, "apt_kept_patient"))[1] == _hash(kit, OTHER_PATIENT)
    assert (await _stored(kit, "apt_kept_sender"))[1] == _hash(kit, PATIENT)
    rows = await kit.query(
        "SELECT appointment_key, status, outcome FROM sms_messages WHERE kind = 'confirmation'"
        " ORDER BY appointment_key"
    )
    assert [tuple(r) for r in rows] == [
        ("apt_kept_patient", "pending", None),
        ("apt_kept_sender", "pending", None),
        ("apt_stopped", "refused", "opted_out"),
    ]


async def test_the_stop_lookup_uses_the_indexes(kit: Kit) -> None:
    """With thousands of numbers held, the STOP lookup reads the hash index and the index of
    numbers without a hash, never the whole appointments table."""
    await kit.configure()
    await kit.pool.execute(
        "INSERT INTO integrations (integration_id, config_version, deleted, organisation_name,"
        " sms_enabled, sms_from_number, reminder_offsets_minutes, sms_templates)"
        " SELECT gen_random_uuid(), 1, false, 'Clinic', true, '+1800555' || lpad(g::text, 4, '0'),"
        " '{15}', '{}' FROM generate_series(1000, 1040) g"
    )
    await kit.pool.execute(
        "INSERT INTO appointments (appointment_key, tenant_id, integration_id, starts_at,"
        " ends_at, time_zone, sms_enabled, schedule_version, phone_encrypted, recipient_hash)"
        " SELECT 'apt_many_' || g, 't', (SELECT integration_id FROM integrations"
        "  ORDER BY integration_id OFFSET g % 40 LIMIT 1),"
        " now() + g * interval '1 minute', now() + g * interval '1 minute 30 seconds', 'UTC',"
        " true, 1, 'enc:v1:dev1:x' || g, CASE WHEN g % 500 <> 0 THEN md5(g::text) END"
        " FROM generate_series(1, 20000) g"
    )
    await kit.pool.execute("ANALYZE appointments")
    await kit.pool.execute("ANALYZE integrations")
    [plan] = await kit.query(
        "EXPLAIN (FORMAT JSON) " + optout.HELD_FOR, SENDER, _hash(kit, PATIENT)
    )
    nodes: list[dict[str, Any]] = []

    def walk(node: dict[str, Any]) -> None:
        nodes.append(node)
        for child in node.get("Plans", []):
            walk(child)

    walk(orjson.loads(plan[0])[0]["Plan"])
    scanned = {n.get("Relation Name") for n in nodes if n["Node Type"] == "Seq Scan"}
    assert "appointments" not in scanned, plan[0]
    indexes = {n.get("Index Name") for n in nodes}
    assert {"appointments_recipient_hash", "appointments_phone_unhashed"} <= indexes, plan[0]


async def test_every_purge_clears_the_hash_with_the_number(make_kit: MakeKit) -> None:
    """The hash goes with the number whoever purges it: the purger (ended, cancelled), a
    booking completing a cancelled row, and an UPDATE that clears the number alone (a
    replica of the previous release)."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    booking = await kit.book("apt_clear_ended", starts_in=timedelta(hours=1))
    await kit.book("apt_clear_cancelled", starts_in=timedelta(days=3))
    await kit.book("apt_clear_old_release", starts_in=timedelta(days=3))
    before = kit.applied
    for key in ("apt_clear_cancelled", "apt_clear_cancel_first"):
        await kit.publish(
            Topic.APPOINTMENT_CANCELLED,
            key,
            AppointmentCancelledV1(
                integration_id=INTEGRATION, reason_code="clinic", schedule_version=1
            ),
        )
    await kit.until_applied(before + 2)
    await kit.book("apt_clear_cancel_first", starts_in=timedelta(days=3))
    assert await _stored(kit, "apt_clear_cancel_first") == (None, None)
    # The cancellation notice is owed; finished (as the dispatcher would), the purge may go.
    await kit.pool.execute(
        "UPDATE sms_messages SET status = 'cancelled' WHERE appointment_key = $1",
        "apt_clear_cancelled",
    )
    kit.clock.set(booking.ends_at + timedelta(seconds=1))
    assert await kit.purge() == 2
    assert await _stored(kit, "apt_clear_ended") == (None, None)
    assert await _stored(kit, "apt_clear_cancelled") == (None, None)

    await kit.pool.execute(
        "UPDATE appointments SET phone_encrypted = NULL WHERE appointment_key = $1",
        "apt_clear_old_release",
    )
    assert await _stored(kit, "apt_clear_old_release") == (None, None)


async def test_neither_logs_metrics_nor_tables_hold_the_number_in_clear(kit: Kit) -> None:
    """Storing a number with its hash, sending to it and a STOP leave the number in no log
    entry, no metric and no column of notify's schema."""
    await kit.configure()
    with structlog.testing.capture_logs() as logs:
        await kit.book("apt_clear_text", phone="(312) 555-0142")
        await kit.until_result("confirmation", "sent")
        await _stop(kit)
    columns = await kit.query(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = 'notify' AND data_type IN ('text', 'jsonb', 'bytea', 'ARRAY')"
    )
    stored: list[str] = []
    for c in columns:
        rows = await kit.query(f'SELECT "{c["column_name"]}"::text AS v FROM "{c["table_name"]}"')
        stored += [str(r["v"]) for r in rows]
    exposed = {
        "logs": repr(logs),
        "metrics": prometheus_client.generate_latest().decode(),
        "tables": "\n".join(stored),
    }
    for where, text in exposed.items():
        for needle in ("3125550142", "555-0142", "5550142"):
            assert needle not in text, f"the number in {where}"


Start = Callable[[Kit], Coroutine[Any, Any, None]]


async def _purger(kit: Kit) -> None:
    await kit.purge()


async def _sms_off(kit: Kit) -> None:
    before = kit.applied
    await kit.publish(
        Topic.INTEGRATION_CONFIG,
        str(INTEGRATION),
        integration_config(sms_enabled=False, version=2),
    )
    await kit.until_applied(before + 1)


@pytest.mark.parametrize("purge", [_purger, _sms_off, _stop], ids=["purger", "sms_off", "stop"])
async def test_a_purge_locks_the_appointments_in_key_order(make_kit: MakeKit, purge: Start) -> None:
    """A purge waiting for the first appointment (in key order) of a transaction that locks
    them in that order has taken none after it, so that transaction goes on instead of the
    two deadlocking (the later key's row is first in the heap and ends first)."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    await kit.book("apt_order_2", starts_in=timedelta(hours=1))
    await kit.book("apt_order_1", starts_in=timedelta(hours=2))
    kit.clock.advance(timedelta(hours=3).total_seconds())
    async with kit.pool.acquire() as holder:
        holder_pid = await holder.fetchval("SELECT pg_backend_pid()")
        async with holder.transaction():
            await holder.execute(
                "SELECT 1 FROM appointments WHERE appointment_key = 'apt_order_1' FOR UPDATE"
            )
            purging = asyncio.create_task(purge(kit))
            blocked = asyncio.Event()

            async def until_blocked() -> None:
                while not await kit.pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = any(pg_blocking_pids(pid))",
                    holder_pid,
                ):
                    pass
                blocked.set()

            watching = asyncio.create_task(until_blocked())
            try:
                await wait_for(blocked, "the purge waiting for apt_order_1")
            finally:
                watching.cancel()
            # What a transaction locking in key order (the dispatcher's outcome write, say)
            # locks next: free, or the purge has it and the two deadlock.
            await holder.execute(
                "SELECT 1 FROM appointments WHERE appointment_key = 'apt_order_2' FOR UPDATE NOWAIT"
            )
        await purging
    for key in ("apt_order_1", "apt_order_2"):
        assert await _stored(kit, key) == (None, None), key


async def test_the_purger_gives_numbers_held_before_the_hash_their_hash(
    make_kit: MakeKit,
) -> None:
    """The purger gives numbers held since before migration 0005 their keyed hash, a batch a
    round, so a STOP soon finds them without decrypting; a number that SMS cannot go to gets
    '' (never a recipient), and numbers already hashed are left as they are."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    await kit.book("apt_backfill_booked")
    booked = await _stored(kit, "apt_backfill_booked")
    for n in range(3):
        await _held_before_0005(kit, f"apt_backfill_{n}", PATIENT if n != 1 else OTHER_PATIENT)
    await _held_before_0005(kit, "apt_backfill_invalid", "+1555555012")  # too short

    purger = kit.app[PURGER]
    assert await purger.hash_held(limit=3) == 3
    assert await purger.hash_held(limit=3) == 1
    assert await purger.hash_held(limit=3) == 0
    for n in range(3):
        held, hashed = await _stored(kit, f"apt_backfill_{n}")
        assert held is not None
        assert hashed == _hash(kit, PATIENT if n != 1 else OTHER_PATIENT)
    assert (await _stored(kit, "apt_backfill_invalid"))[1] == ""
    assert await _stored(kit, "apt_backfill_booked") == booked

    hasher, cipher = _hasher(kit)
    async with kit.pool.acquire() as conn:
        found = await optout.held_for(conn, hasher, SENDER, PATIENT)
    assert sorted(found) == ["apt_backfill_0", "apt_backfill_2", "apt_backfill_booked"]
    assert cipher.decrypted == 0, "a STOP still decrypted numbers after the backfill"
