"""Forged webhooks, all three in one place: the EHR scheduling feed (POST /ehr/scheduling),
Graph change notifications (POST /graph/notifications on the gateway's TLS listener) and the
ACS Event Grid webhook (POST /acs/events on notify). Each forgery is refused and changes
nothing: no appointment, delivery, roster row or outbox event, no Teams meeting, no delivery
report or opt-out; a genuine request right after is accepted, so the refusals are about the
forgery alone.

Earlier cases live beside their services and are not repeated here:
tests/launch/test_launch_refusals.py (unsigned, wrong-secret, stale and altered scheduling
events; one wrong clientState) and tests/notify/test_privacy_and_webhooks.py (missing or
wrong Event Grid code, malformed events)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson

from sandbox.ehr import TENANT_A, TENANT_B, sign_webhook
from services.launch.meeting_preparation import prepare_meeting
from tests.hostile.attack_support import (
    SECRET_A,
    SECRET_B,
    Gateway,
    gateway,
    module_infra,
)
from tests.notify.conftest import (
    PATIENT,
    SENDER,
    WEBHOOK_SECRET,
    Kit,
    kit,
    make_kit,
    notify_tls,
)

__all__ = ["gateway", "kit", "make_kit", "module_infra", "notify_tls"]


async def book_in_ehr(http: aiohttp.ClientSession, gw: Gateway, tenant: str) -> dict[str, Any]:
    """A video visit booked in the EHR and delivered to us, signed with the tenant's own
    secret. The EHR's own feed is switched off so that the delivery is this one request."""
    base = f"{gw.ehr.url}/_sandbox/tenants/{tenant}"
    async with http.patch(base, json={"webhook_url": None}) as r:
        assert r.status == 200, await r.text()
    async with http.get(f"{base}/directory") as r:
        directory = await r.json()
    body = {
        "patient": directory["patients"][0]["id"],
        "practitioner": directory["practitioners"][0]["id"],
        "location": directory["locations"][0]["id"],
        "start": (datetime.now(UTC) + timedelta(hours=3)).isoformat(),
        "minutes": 30,
        "video": True,
    }
    async with http.post(f"{base}/appointments", json=body) as r:
        assert r.status == 201, await r.text()
        appointment: dict[str, Any] = await r.json()
    event = scheduling_event(appointment, "booked", tenant, gw.fhir_base(tenant), bump=False)
    secret = SECRET_A if tenant == TENANT_A else SECRET_B
    signature = sign_webhook(secret, event, int(time.time()))
    status, answer = await post_scheduling(http, gw, event, tenant, signature)
    assert status == 200, answer
    assert orjson.loads(answer)["status"] == "booked", answer
    appointment["key"] = orjson.loads(answer)["appointment_key"]
    return appointment


def scheduling_event(
    appointment: dict[str, Any], event: str, tenant: str, fhir_base: str, bump: bool = True
) -> bytes:
    """A feed event for `appointment` (a new schedule version unless `bump` is False)."""
    changed = dict(appointment)
    changed.pop("key", None)
    if event == "cancelled":
        changed["status"] = "cancelled"
    if bump:
        changed["meta"] = {"versionId": str(int(appointment["meta"]["versionId"]) + 1)}
    return orjson.dumps(
        {
            "event_id": str(uuid.uuid4()),
            "event": event,
            "tenant": tenant,
            "fhir_base": fhir_base,
            "occurred_at": datetime.now(UTC).isoformat(),
            "appointment": changed,
            "patient_contact": {"phone": "+13125550110"},
        }
    )


async def post_scheduling(
    http: aiohttp.ClientSession, gw: Gateway, body: bytes, tenant: str, signature: str
) -> tuple[int, str]:
    headers = {
        "Content-Type": "application/json",
        "X-EHR-Tenant": tenant,
        "X-EHR-Signature": signature,
    }
    async with http.post(f"{gw.url}/ehr/scheduling", data=body, headers=headers) as r:
        return r.status, await r.text()


def meetings(gw: Gateway) -> int:
    return len(gw.system.microsoft.components.meetings.by_id)


async def test_forged_scheduling_events_are_refused_and_change_nothing(gateway: Gateway) -> None:
    """Malformed signature headers, a future timestamp, the other tenant's secret, an unknown
    tenant, a header tenant that is not the body's, and an event signed with tenant A's secret
    that names tenant B's FHIR base (to cancel B's visit or book into B) are refused; B's visit
    stays booked, and the genuine cancel signed with B's secret then goes through."""
    gw = gateway
    now = int(time.time())
    async with aiohttp.ClientSession() as http:
        visit_b = await book_in_ehr(http, gw, TENANT_B)
        base_b = gw.fhir_base(TENANT_B)
        cancel_b = scheduling_event(visit_b, "cancelled", TENANT_B, base_b)
        good = sign_webhook(SECRET_B, cancel_b, now)
        digest = good.split("v1=")[1]
        cross_cancel = scheduling_event(visit_b, "cancelled", TENANT_A, base_b)
        cross_book = scheduling_event(
            {**visit_b, "id": visit_b["id"] + "9"}, "booked", TENANT_A, base_b
        )
        sign_a = sign_webhook(SECRET_A, cancel_b, now)
        sign_b_ms = sign_webhook(SECRET_B, cancel_b, now * 1000)
        sign_b_later = sign_webhook(SECRET_B, cancel_b, now + 3600)
        sign_cross_cancel = sign_webhook(SECRET_A, cross_cancel, now)
        sign_cross_book = sign_webhook(SECRET_A, cross_book, now)
        forgeries: list[tuple[str, bytes, str, str, int]] = [
            ("empty signature", cancel_b, TENANT_B, "", 401),
            ("no timestamp", cancel_b, TENANT_B, f"v1={digest}", 401),
            ("empty parts", cancel_b, TENANT_B, "t=,v1=", 401),
            ("uppercase digest", cancel_b, TENANT_B, f"t={now},v1={digest.upper()}", 401),
            ("other scheme", cancel_b, TENANT_B, f"t={now},v0={digest}", 401),
            ("spaces", cancel_b, TENANT_B, f"t={now}, v1={digest}", 401),
            ("milliseconds", cancel_b, TENANT_B, sign_b_ms, 401),
            ("an hour ahead", cancel_b, TENANT_B, sign_b_later, 401),
            ("tenant A's secret", cancel_b, TENANT_B, sign_a, 401),
            ("unknown tenant", cancel_b, "unknown", good, 401),
            ("tenant header A", cancel_b, TENANT_A, sign_a, 422),
            ("A signs B's cancel", cross_cancel, TENANT_A, sign_cross_cancel, 422),
            ("A books into B", cross_book, TENANT_A, sign_cross_book, 422),
        ]  # fmt: skip
        before, graph_meetings = await gw.counts(), meetings(gw)
        for what, body, tenant, signature, expected in forgeries:
            status, answer = await post_scheduling(http, gw, body, tenant, signature)
            assert status == expected, (what, status, answer)
        assert await gw.counts() == before
        assert meetings(gw) == graph_meetings
        status = await gw.fetchval(
            "SELECT status FROM appointments WHERE appointment_key = $1", visit_b["key"]
        )
        assert status == "booked"
        # The genuine cancel, signed with B's own secret, is accepted once; a replay of its
        # exact bytes and signature is absorbed.
        for expected_status in ("cancelled", "duplicate"):
            status_code, answer = await post_scheduling(http, gw, cancel_b, TENANT_B, good)
            assert status_code == 200, answer
            assert orjson.loads(answer)["status"] == expected_status
    cancelled = await gw.fetchval(
        "SELECT count(*) FROM outbox WHERE topic = 'appointment-cancelled'"
    )
    assert cancelled == 1


def notification(subscription: str, client_state: str | None, leg: str) -> dict[str, Any]:
    note: dict[str, Any] = {
        "subscriptionId": subscription,
        "resourceData": {
            "eventType": "Microsoft.Communication.CallRosterUpdate",
            "eventDateTime": datetime.now(UTC).isoformat(),
            "activeParticipants@joined": [
                {"Id": leg, "Identity": {"Guest": {"Id": leg}}, "IsInLobby": True}
            ],
        },
    }
    if client_state is not None:
        note["clientState"] = client_state
    return note


async def test_forged_graph_notifications_are_refused_and_change_nothing(
    gateway: Gateway, microsoft_http: aiohttp.ClientSession
) -> None:
    """An unknown subscription, a missing clientState, another subscription's clientState,
    and a batch hiding one forged notification among genuine ones each get 403 and apply
    nothing (not even the genuine part); bodies that are not notifications get 400. The
    genuine notification alone is then accepted."""
    gw = gateway
    async with aiohttp.ClientSession() as http:
        visits = [await book_in_ehr(http, gw, TENANT_A) for _ in range(2)]
    # The worker prepares the meetings after the bookings; wait for (or make) each one.
    for visit in visits:
        assert await prepare_meeting(gw.system.app, visit["key"]) in ("ready", "prepared")
    subscriptions = [
        str(
            await gw.fetchval(
                "SELECT subscription_id FROM appointments WHERE appointment_key = $1", v["key"]
            )
        )
        for v in visits
    ]
    graph = gw.system.microsoft.components.graph
    states = [graph.subscriptions[s].client_state for s in subscriptions]
    assert all(states)
    assert states[0] != states[1]
    first, second = subscriptions
    genuine = notification(first, states[0], "leg-genuine")
    forged_batches: list[tuple[str, Any, int]] = [
        ("unknown subscription", [notification(str(uuid.uuid4()), states[0], "x")], 403),
        ("no clientState", [notification(first, None, "x")], 403),
        ("empty clientState", [notification(first, "", "x")], 403),
        ("other subscription's clientState", [notification(first, states[1], "x")], 403),
        ("case-changed clientState", [notification(first, str(states[0]).upper(), "x")], 403),
        ("genuine plus forged", [genuine, notification(second, states[0], "y")], 403),
        ("not a list", {"value": notification(first, states[0], "x")}, 400),
        ("not JSON", "value=1", 400),
    ]
    url = f"{gw.system.notification_url}/graph/notifications"
    before = await gw.counts()
    for what, batch, expected in forged_batches:
        body = batch.encode() if isinstance(batch, str) else orjson.dumps({"value": batch})
        if isinstance(batch, dict):
            body = orjson.dumps(batch)
        async with microsoft_http.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == expected, (what, r.status, await r.text())
    assert await gw.counts() == before
    async with microsoft_http.post(url, json={"value": [genuine]}) as r:
        assert r.status == 202, await r.text()
    assert await gw.fetchval("SELECT count(*) FROM roster") == before["roster"] + 1


def delivery_report(message_id: str) -> list[dict[str, Any]]:
    return [
        {
            "id": str(uuid.uuid4()),
            "topic": "/subscriptions/x/resourceGroups/y",
            "subject": "/phonenumber/18005550100",
            "eventType": "Microsoft.Communication.SMSDeliveryReportReceived",
            "eventTime": "2030-01-07T14:00:01Z",
            "dataVersion": "1.0",
            "data": {
                "MessageId": message_id,
                "From": SENDER,
                "To": PATIENT,
                "DeliveryStatus": "Failed",
                "DeliveryStatusDetails": "forged",
                "ReceivedTimestamp": "2030-01-07T14:00:01Z",
            },
        }
    ]


def stop_reply() -> list[dict[str, Any]]:
    return [
        {
            "id": str(uuid.uuid4()),
            "topic": "/subscriptions/x",
            "subject": "/phonenumber/18005550100",
            "eventType": "Microsoft.Communication.SMSReceived",
            "eventTime": "2030-01-07T14:00:01Z",
            "dataVersion": "1.0",
            "data": {
                "MessageId": "Incoming_1",
                "From": PATIENT,
                "To": SENDER,
                "Message": "STOP",
                "ReceivedTimestamp": "2030-01-07T14:00:01Z",
            },
        }
    ]


def handshake() -> list[dict[str, Any]]:
    return [
        {
            "id": str(uuid.uuid4()),
            "topic": "/subscriptions/x",
            "subject": "",
            "data": {"validationCode": "attacker-chosen-code"},
            "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
            "eventTime": "2030-01-07T14:00:00Z",
            "dataVersion": "2",
        }
    ]


async def test_forged_acs_events_are_refused_and_change_nothing(kit: Kit) -> None:
    """Event Grid deliveries authenticate by the secret `code` in the URL. A forged delivery
    report, STOP reply or subscription handshake without it (in the header instead, a prefix
    or extension of it, another case, only as a second `code`) gets 401 and records nothing,
    and the handshake is not answered; the genuine report is then recorded."""
    tables = ("delivery_reports", "opt_outs", "sms_messages", "outbox")

    async def counts() -> dict[str, int]:
        return {t: int(await kit.pool.fetchval(f"SELECT count(*) FROM {t}")) for t in tables}

    codes: list[tuple[str, dict[str, str]]] = [
        ("", {}),
        ("", {"aeg-sas-key": WEBHOOK_SECRET}),
        ("", {"Authorization": f"Bearer {WEBHOOK_SECRET}"}),
        (f"?code={WEBHOOK_SECRET[:-1]}", {}),
        (f"?code={WEBHOOK_SECRET}x", {}),
        (f"?code={WEBHOOK_SECRET.upper()}", {}),
        (f"?code=wrong&code={WEBHOOK_SECRET}", {}),
        (f"?Code={WEBHOOK_SECRET}", {}),
        (f"?code=%00{WEBHOOK_SECRET}", {}),
    ]
    before = await counts()
    async with aiohttp.ClientSession() as http:
        for body in (delivery_report("Outgoing_forged"), stop_reply(), handshake()):
            for query, headers in codes:
                async with http.post(
                    f"{kit.url}/acs/events{query}", json=body, headers=headers
                ) as r:
                    answer = await r.text()
                    assert r.status == 401, (query, headers, answer)
                    assert "attacker-chosen-code" not in answer
        assert await counts() == before
        async with http.post(
            f"{kit.url}/acs/events?code={WEBHOOK_SECRET}", json=delivery_report("Outgoing_real")
        ) as r:
            assert r.status == 200, await r.text()
    rows = await kit.query("SELECT provider_message_id FROM delivery_reports")
    assert [r["provider_message_id"] for r in rows] == ["Outgoing_real"]
