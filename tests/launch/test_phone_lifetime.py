from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from libs.common.events import (
    AppointmentCreatedV1,
    AppointmentRescheduledV1,
    AppointmentRescheduledV2,
    decode_event,
    encode_event,
)
from libs.common.web import OUTBOX_RELAY
from sandbox.ehr import TENANT_A
from services.launch.state import INTEGRATIONS
from tests.conftest import wait_for
from tests.launch.test_visit_end_to_end import book_video_visit
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem, integration_config, publish_integration
from tests.support.privacy import scan_schema


async def age_outbox_rows(database_url: str, key: str, minutes: int) -> int:
    """Moves the publication of a visit's outbox rows `minutes` into the past; a row the relay
    is still marking is updated once its mark commits (the UPDATE waits on its row lock)."""
    conn = await asyncpg.connect(database_url)
    try:
        status = await conn.execute(
            "UPDATE launch.outbox SET published_at = published_at - make_interval(mins => $2)"
            " WHERE key = $1",
            key,
            minutes,
        )
    finally:
        await conn.close()
    return int(status.split()[-1])


async def test_phone_ciphertext_leaves_the_outbox_after_the_retention(
    launch_system: LaunchSystem, topic_prefix: str, database_url: str
) -> None:
    """The encrypted phone in a published appointment-created is kept in launch's outbox for
    the retention only; after it, the sweep deletes the row and no launch table holds it."""
    system = launch_system
    retention = system.settings.outbox_retention_minutes
    async with aiohttp.ClientSession() as http:
        await book_video_visit(http, system)
    [value] = await read_all(topic_prefix + "appointment-created", expect=1)
    created = decode_event(value)
    assert isinstance(created.payload, AppointmentCreatedV1)
    ciphertext = created.payload.patient_phone_encrypted
    assert ciphertext is not None
    phone = system.settings.field_cipher().decrypt(ciphertext, f"patient-phone:{created.key}")
    assert phone.startswith("+1")
    relay = system.app[OUTBOX_RELAY]

    # Published a minute short of the retention: kept, for operators.
    assert await age_outbox_rows(database_url, created.key, retention - 1) == 1
    await relay.sweep_published()
    conn = await asyncpg.connect(database_url)
    try:
        assert await scan_schema(conn, "launch", [ciphertext]) == ["outbox.payload: " + ciphertext]
        # A minute past it: gone.
        assert await age_outbox_rows(database_url, created.key, 2) == 1
        assert await relay.sweep_published() == 1
        assert await scan_schema(conn, "launch", [ciphertext]) == []
    finally:
        await conn.close()


async def test_booking_with_sms_off_carries_no_phone(
    launch_system: LaunchSystem,
    producer: AIOKafkaProducer,
    topic_prefix: str,
    database_url: str,
) -> None:
    """With SMS off for the integration, a booking whose patient has a mobile number carries
    no phone, not even encrypted: neither in launch's outbox nor on Kafka."""
    system = launch_system
    applied = asyncio.Event()
    system.consumer.observe(lambda outcomes: applied.set() if outcomes else None)
    config = integration_config(
        system.settings, system.integration_id, system.fhir_base, version=2, sms_enabled=False
    )
    await publish_integration(producer, topic_prefix, "contoso", config)
    await wait_for(applied, "the gateway to learn that SMS is off")
    system.app[INTEGRATIONS].invalidate()

    async with aiohttp.ClientSession() as http:
        await book_video_visit(http, system)
    [value] = await read_all(topic_prefix + "appointment-created", expect=1)
    created = decode_event(value)
    assert isinstance(created.payload, AppointmentCreatedV1)
    assert created.payload.sms_enabled is False
    assert created.payload.patient_phone_encrypted is None
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT payload FROM launch.outbox WHERE key = $1", created.key)
    finally:
        await conn.close()
    assert len(rows) == 1
    stored = orjson.loads(bytes(rows[0]["payload"]))["payload"]
    assert stored["sms_enabled"] is False
    assert stored["patient_phone_encrypted"] is None


async def _reschedule(
    http: aiohttp.ClientSession, system: LaunchSystem, appointment_id: str, start: datetime
) -> None:
    async with http.post(
        f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}/appointments/{appointment_id}/reschedule",
        json={"start": start.replace(microsecond=0).isoformat(), "minutes": 30},
    ) as r:
        assert r.status == 200, await r.text()


async def _age(database_url: str, key: str) -> None:
    """The visit's time passes: its recorded end is an hour ago."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE launch.appointments SET starts_at = now() - interval '90 minutes',"
            " ends_at = now() - interval '1 hour' WHERE appointment_key = $1",
            key,
        )
    finally:
        await conn.close()


async def test_a_move_carries_the_number_only_for_a_visit_over_and_moved_ahead(
    launch_system: LaunchSystem, topic_prefix: str, database_url: str
) -> None:
    """A visit moved long before its end is rescheduled as V1, with no number; one moved after
    its recorded end to a time ahead (a no-show booked again for next week: notify erased the
    number at the end) is V2, carrying the patient's number as ciphertext for the same
    appointment; one over and corrected to times also past is V1 again (nobody to text)."""
    system = launch_system
    moved = topic_prefix + "appointment-rescheduled"
    now = datetime.now(UTC)
    async with aiohttp.ClientSession() as http:
        appointment = await book_video_visit(http, system, starts_in=timedelta(days=2))
        [value] = await read_all(topic_prefix + "appointment-created", expect=1)
        key = decode_event(value).key
        await _reschedule(http, system, appointment["id"], now + timedelta(days=3))
        # The stand-in answers before its feed delivers the move: wait until launch applied it.
        await read_all(moved, expect=1)
        await _age(database_url, key)
        await _reschedule(http, system, appointment["id"], now + timedelta(days=7))
        await read_all(moved, expect=2)
        await _age(database_url, key)
        await _reschedule(http, system, appointment["id"], now - timedelta(hours=3))
        ahead, next_week, corrected = [decode_event(v) for v in await read_all(moved, expect=3)]
    for v1 in (ahead, corrected):
        assert type(v1.payload) is AppointmentRescheduledV1
        assert v1.version == 1
        assert "patient_phone_encrypted" not in orjson.loads(encode_event(v1))["payload"]
    assert isinstance(next_week.payload, AppointmentRescheduledV2)
    assert next_week.version == 2
    ciphertext = next_week.payload.patient_phone_encrypted
    assert ciphertext is not None
    phone = system.settings.field_cipher().decrypt(ciphertext, f"patient-phone:{key}")
    assert phone.startswith("+1")
    assert ahead.payload.schedule_version < next_week.payload.schedule_version
