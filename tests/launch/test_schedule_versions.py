"""The EHR's `meta.versionId` is a string of any size; launch keeps it in a Postgres integer
and a cancel adds one to it. Found by a review: a booking at 2**31 - 1 made every later cancel
of that visit a 500, so the visit could never be cancelled and its reminders went on."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest

from libs.common.events import MAX_SCHEDULE_VERSION, AppointmentCancelledV1, decode_event
from sandbox.ehr import TENANT_A, sign_webhook
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import WEBHOOK_SECRET, LaunchSystem


def _appointment(appointment_id: str, version: str, status: str) -> dict[str, Any]:
    start = (datetime.now(UTC) + timedelta(hours=3)).replace(microsecond=0)
    return {
        "resourceType": "Appointment",
        "id": appointment_id,
        "status": status,
        "start": start.isoformat(),
        "end": (start + timedelta(minutes=30)).isoformat(),
        "meta": {"versionId": version},
        "serviceType": [{"coding": [{"code": "VIDEO_VISIT"}]}],
    }


async def _deliver(
    http: aiohttp.ClientSession, system: LaunchSystem, kind: str, appointment: dict[str, Any]
) -> int:
    raw = orjson.dumps(
        {
            "event_id": str(uuid.uuid4()),
            "event": kind,
            "tenant": TENANT_A,
            "fhir_base": system.fhir_base,
            "occurred_at": datetime.now(UTC).isoformat(),
            "appointment": appointment,
        }
    )
    headers = {
        "X-EHR-Signature": sign_webhook(WEBHOOK_SECRET, raw, int(time.time())),
        "X-EHR-Tenant": TENANT_A,
        "Content-Type": "application/json",
    }
    async with http.post(f"{system.url}/ehr/scheduling", data=raw, headers=headers) as r:
        return r.status


@pytest.mark.parametrize(
    ("version", "cancelled_at_version"),
    [
        # The largest version kept: the cancel's increment reaches Postgres' maximum.
        (str(MAX_SCHEDULE_VERSION - 1), MAX_SCHEDULE_VERSION),
        # Larger ones are not kept (the visit starts at 1), so nothing can overflow.
        (str(MAX_SCHEDULE_VERSION), 2),
        ("9" * 30, 2),
    ],
)
async def test_a_visit_booked_at_the_largest_versions_can_be_cancelled(
    launch_system: LaunchSystem, topic_prefix: str, version: str, cancelled_at_version: int
) -> None:
    """A visit booked with a huge EHR version is cancelled, and its cancel is published."""
    async with aiohttp.ClientSession() as http:
        booked = _appointment("huge-version", version, "booked")
        assert await _deliver(http, launch_system, "booked", booked) == 200
        cancelled = {**booked, "status": "cancelled"}
        assert await _deliver(http, launch_system, "cancelled", cancelled) == 200
    (raw,) = await read_all(topic_prefix + "appointment-cancelled", expect=1)
    cancel = decode_event(raw)
    assert isinstance(cancel.payload, AppointmentCancelledV1)
    assert cancel.payload.schedule_version == cancelled_at_version
