from __future__ import annotations

from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from libs.common.events import AppointmentCancelledV1, Topic
from tests.notify.conftest import INTEGRATION, PATIENT, SENDER, WEBHOOK_SECRET, Kit


async def _every_stored_value(kit: Kit) -> str:
    """Every text, json and bytea value in notify's schema, as one searchable string."""
    columns = await kit.query(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = 'notify' AND data_type IN ('text', 'jsonb', 'bytea', 'ARRAY')"
    )
    parts: list[str] = []
    for c in columns:
        rows = await kit.query(f'SELECT "{c["column_name"]}"::text AS v FROM "{c["table_name"]}"')
        parts += [str(r["v"]) for r in rows]
    return "\n".join(parts)


async def test_purge_leaves_no_number_behind(kit: Kit) -> None:
    """Once the appointment has ended (or was cancelled and its notice went), no table in
    notify's schema holds the number, in clear or encrypted."""
    await kit.configure()
    booking = await kit.book("apt_purge01", starts_in=timedelta(hours=1))
    await kit.book("apt_purge02", starts_in=timedelta(hours=5))
    await kit.until_result("confirmation", "sent", count=2)
    await kit.publish(
        Topic.APPOINTMENT_CANCELLED,
        "apt_purge02",
        AppointmentCancelledV1(
            integration_id=INTEGRATION, reason_code="clinic", schedule_version=1
        ),
    )
    await kit.until_result("cancellation", "sent")

    assert await kit.purge() == 1  # the cancelled one; the other visit is still to come
    kit.clock.set(booking.ends_at + timedelta(seconds=1))
    assert await kit.purge() == 1
    kit.sandbox.components.acs.receive(PATIENT, SENDER, "STOP")  # an opt-out keeps a hash
    await kit.sandbox.components.sandbox.notifier.drain()

    stored = await _every_stored_value(kit)
    digits = PATIENT.lstrip("+")
    for needle in (digits, digits[1:], digits[-10:-7] + "555", "enc:v1"):
        assert needle not in stored
    rows = await kit.query(
        "SELECT phone_encrypted, recipient_hash, phone_purged_at FROM appointments"
    )
    assert all(
        r["phone_encrypted"] is None and r["recipient_hash"] is None and r["phone_purged_at"]
        for r in rows
    )


def _delivery_report(message_id: str = "Outgoing_1") -> list[dict[str, Any]]:
    return [
        {
            "id": "c5f4a1e2-0000-4000-8000-000000000001",
            "topic": "/subscriptions/x/resourceGroups/y",
            "subject": "/phonenumber/18005550100",
            "eventType": "Microsoft.Communication.SMSDeliveryReportReceived",
            "eventTime": "2030-01-07T14:00:01.1234567Z",
            "dataVersion": "1.0",
            "metadataVersion": "1",
            "data": {
                "MessageId": message_id,
                "From": "18005550100",
                "To": PATIENT,
                "DeliveryStatus": "Delivered",
                "DeliveryStatusDetails": "No error.",
                "DeliveryAttempts": [
                    {
                        "Timestamp": "2030-01-07T14:00:01Z",
                        "SegmentsSucceeded": 1,
                        "SegmentsFailed": 0,
                    }
                ],
                "ReceivedTimestamp": "2030-01-07T14:00:01Z",
                "Tag": "notify:confirmation",
            },
        }
    ]


@pytest.mark.parametrize(
    ("query", "body", "status", "field"),
    [
        ("", _delivery_report(), 401, None),
        ("?code=wrong", _delivery_report(), 401, None),
        (f"?code={WEBHOOK_SECRET}", {"not": "an array"}, 400, None),
        (
            f"?code={WEBHOOK_SECRET}",
            [{**_delivery_report()[0], "eventTime": "soon"}],
            400,
            "0.eventTime",
        ),
        (
            f"?code={WEBHOOK_SECRET}",
            [{**_delivery_report()[0], "data": {**_delivery_report()[0]["data"], "To": "call me"}}],
            400,
            "0.data.To",
        ),
        (
            f"?code={WEBHOOK_SECRET}",
            [{**_delivery_report()[0], "data": {**_delivery_report()[0]["data"], "Extra": 1}}],
            400,
            "0.data.Extra",
        ),
    ],
)
async def test_bad_webhook_deliveries_are_refused_and_change_nothing(
    kit: Kit, query: str, body: Any, status: int, field: str | None
) -> None:
    """Unauthenticated or malformed Event Grid deliveries get a clear 4xx naming the field
    (never echoing its value) and leave every table as it was."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{kit.url}/acs/events{query}", json=body) as response,
    ):
        assert response.status == status
        answer = await response.json()
    if field:
        assert field in [p["field"] for p in answer["problems"]]
        assert "call me" not in str(answer)
    assert await kit.query("SELECT * FROM delivery_reports") == []
    assert await kit.query("SELECT * FROM opt_outs") == []


async def test_webhook_answers_the_event_grid_validation_handshake(kit: Kit) -> None:
    """The SubscriptionValidation event is answered with its validationCode."""
    handshake = [
        {
            "id": "2d1781af-3a4c-4d7c-bd0c-e34b19da4e66",
            "topic": "/subscriptions/x",
            "subject": "",
            "data": {"validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"},
            "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
            "eventTime": "2030-01-07T14:00:00Z",
            "dataVersion": "2",
        }
    ]
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{kit.url}/acs/events?code={WEBHOOK_SECRET}",
            json=handshake,
            headers={"aeg-event-type": "SubscriptionValidation"},
        ) as response,
    ):
        assert response.status == 200
        assert await response.json() == {
            "validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"
        }


async def test_delivery_report_is_recorded_per_message_and_only_newer_wins(kit: Kit) -> None:
    """A delivery report is stored per provider message id; an older report never overwrites."""
    newer = _delivery_report("Outgoing_42")
    older = _delivery_report("Outgoing_42")
    older[0]["data"] = {
        **older[0]["data"],
        "DeliveryStatus": "Failed",
        "ReceivedTimestamp": "2030-01-07T13:59:00Z",
    }
    async with aiohttp.ClientSession() as http:
        for body in (newer, older):
            async with http.post(f"{kit.url}/acs/events?code={WEBHOOK_SECRET}", json=body) as r:
                assert r.status == 200
    [row] = await kit.query("SELECT * FROM delivery_reports")
    assert (row["provider_message_id"], row["delivery_status"]) == ("Outgoing_42", "Delivered")


async def test_a_redelivered_or_stale_delivery_report_is_counted_once(kit: Kit) -> None:
    """The delivery-report metric counts a report once, not its redeliveries nor a stale one."""

    def counted(status: str) -> float:
        return REGISTRY.get_sample_value("sms_delivery_reports_total", {"status": status}) or 0.0

    delivered, failed = counted("Delivered"), counted("Failed")
    report = _delivery_report("Outgoing_dup")
    older = _delivery_report("Outgoing_dup")
    older[0]["id"] = "c5f4a1e2-0000-4000-8000-000000000002"
    older[0]["data"] = {
        **older[0]["data"],
        "DeliveryStatus": "Failed",
        "ReceivedTimestamp": "2030-01-07T13:59:00Z",
    }
    # Event Grid redelivers the report alone, then with the stale one in one batch.
    async with aiohttp.ClientSession() as http:
        for body in (report, report, report + older):
            async with http.post(f"{kit.url}/acs/events?code={WEBHOOK_SECRET}", json=body) as r:
                assert r.status == 200
    [row] = await kit.query("SELECT delivery_status FROM delivery_reports")
    assert row["delivery_status"] == "Delivered"
    assert (counted("Delivered") - delivered, counted("Failed") - failed) == (1.0, 0.0)
