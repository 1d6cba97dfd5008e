"""Contract tests: the EHR stand-in's signed scheduling feed (docs/ehr-scheduling.md)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sandbox.ehr import TENANT_A, RunningEhr, sign_webhook
from sandbox.ehr.app_keys import DISPATCHER
from sandbox.ehr.clock import FakeClock
from sandbox.ehr.state import Delivery, TenantState
from tests.sandbox.ehr_helpers import Receiver, Smart, verify_signature

SECRET = "whsec-test"


async def _subscribe(smart: Smart, url: str, secret: str = SECRET) -> None:
    body = {"webhook_url": url, "webhook_secret": secret}
    await smart.admin("PATCH", f"/_sandbox/tenants/{smart.tenant}", body)


async def _book(smart: Smart, clock: FakeClock, hour: int = 21) -> dict[str, Any]:
    directory = await smart.admin("GET", f"/_sandbox/tenants/{smart.tenant}/directory")
    day = datetime.fromtimestamp(clock(), UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    body = {
        "patient": directory["patients"][0]["id"],
        "practitioner": directory["practitioners"][0]["id"],
        "location": directory["locations"][0]["id"],
        "start": (day + timedelta(hours=hour)).isoformat(),
        "minutes": 20,
    }
    return dict(await smart.admin("POST", f"/_sandbox/tenants/{smart.tenant}/appointments", body))


def test_sign_webhook_is_hmac_sha256_over_timestamp_dot_body() -> None:
    """sign_webhook returns t=<ts>,v1=<hex HMAC-SHA256(secret, "<ts>.<body>")>."""
    body = b'{"a":1}'
    expected = hmac.new(b"s3cret", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert sign_webhook("s3cret", body, 1700000000) == f"t=1700000000,v1={expected}"


async def test_booking_delivers_signed_booked_event(
    smart: Smart, ehr_clock: FakeClock, ehr_receiver: Receiver
) -> None:
    """Booking POSTs a signed "booked" event with the full Appointment and the patient phone."""
    await _subscribe(smart, ehr_receiver.url)
    appt = await _book(smart, ehr_clock)
    (got,) = await ehr_receiver.wait_for(1)
    header = got.headers["X-EHR-Signature"]
    assert verify_signature(SECRET, header, got.body, ehr_clock())
    event = json.loads(got.body)
    assert event["event"] == "booked"
    assert event["tenant"] == TENANT_A
    assert event["fhir_base"] == smart.base
    assert event["appointment"] == appt
    assert event["patient_contact"]["phone"].startswith("+1312555")
    assert got.headers["X-EHR-Event-Id"] == event["event_id"]


async def test_test_local_verifier_rejects_bad_signatures(
    smart: Smart, ehr_clock: FakeClock, ehr_receiver: Receiver
) -> None:
    """A tampered body, a wrong secret or a stale (>5 min) timestamp fail verification."""
    await _subscribe(smart, ehr_receiver.url)
    await _book(smart, ehr_clock)
    (got,) = await ehr_receiver.wait_for(1)
    header = got.headers["X-EHR-Signature"]
    assert not verify_signature(SECRET, header, got.body.replace(b"booked", b"cancel"), ehr_clock())
    assert not verify_signature("other-secret", header, got.body, ehr_clock())
    assert not verify_signature(SECRET, header, got.body, ehr_clock() + 301)
    assert not verify_signature(SECRET, "v1=deadbeef", got.body, ehr_clock())


async def test_reschedule_and_cancel_events_arrive_in_order(
    smart: Smart, ehr_clock: FakeClock, ehr_receiver: Receiver
) -> None:
    """booked, rescheduled (with previous start/end) and cancelled arrive in that order."""
    await _subscribe(smart, ehr_receiver.url)
    appt = await _book(smart, ehr_clock)
    base = f"/_sandbox/tenants/{smart.tenant}/appointments/{appt['id']}"
    new_start = datetime.fromisoformat(appt["start"].replace("Z", "+00:00")) + timedelta(hours=1)
    await smart.admin("POST", f"{base}/reschedule", {"start": new_start.isoformat()})
    await smart.admin("POST", f"{base}/cancel", {"reason": "pat"})
    events = [json.loads(r.body) for r in await ehr_receiver.wait_for(3)]
    assert [e["event"] for e in events] == ["booked", "rescheduled", "cancelled"]
    assert events[1]["previous"]["start"] == appt["start"]
    assert events[1]["appointment"]["start"] != appt["start"]
    assert events[1]["appointment"]["meta"]["versionId"] == "2"
    assert events[2]["appointment"]["status"] == "cancelled"


async def test_5xx_is_retried_and_logged(
    smart: Smart, ehr_clock: FakeClock, ehr_receiver: Receiver
) -> None:
    """5xx answers are retried with backoff; every attempt shows in the delivery log."""
    await _subscribe(smart, ehr_receiver.url)
    ehr_receiver.statuses = [503, 500]
    appt = await _book(smart, ehr_clock)
    await ehr_receiver.wait_for(1)
    assert len(ehr_receiver.requests) == 3
    log = await smart.admin("GET", f"/_sandbox/tenants/{smart.tenant}/webhooks/deliveries")
    attempts = [d for d in log["deliveries"] if d["appointment_id"] == appt["id"]]
    assert [(d["attempt"], d["status"], d["delivered"]) for d in attempts] == [
        (1, 503, False),
        (2, 500, False),
        (3, 204, True),
    ]


async def test_4xx_is_not_retried(
    smart: Smart, ehr_clock: FakeClock, ehr_receiver: Receiver
) -> None:
    """A 4xx answer is final: logged once, and the next event is still delivered."""
    await _subscribe(smart, ehr_receiver.url)
    ehr_receiver.statuses = [401]
    first = await _book(smart, ehr_clock, hour=21)
    second = await _book(smart, ehr_clock, hour=22)
    (got,) = await ehr_receiver.wait_for(1)
    assert json.loads(got.body)["appointment"]["id"] == second["id"]
    log = smart.ehr.tenant(TENANT_A).deliveries
    assert [(d.attempt, d.status) for d in log if d.appointment_id == first["id"]] == [(1, 401)]


async def test_receiver_down_is_retried_until_it_answers(
    smart: Smart, ehr: RunningEhr, ehr_clock: FakeClock, ehr_receiver: Receiver
) -> None:
    """When the subscriber is unreachable the event is retried and delivered once it is back."""
    down = Receiver()
    await down.start()
    dead_url = down.url
    await down.close()
    await _subscribe(smart, dead_url)
    failed = asyncio.Event()

    def on_attempt(tenant: TenantState, record: Delivery) -> None:
        if record.status is None and record.url == dead_url:
            tenant.spec.webhook_url = ehr_receiver.url  # the receiver "comes back"
            failed.set()

    ehr.app[DISPATCHER].listeners.append(on_attempt)
    await _book(smart, ehr_clock)
    await asyncio.wait_for(failed.wait(), 10)
    await ehr_receiver.wait_for(1)
    log = ehr.tenant(TENANT_A).deliveries
    assert log[0].error is not None
    assert log[-1].delivered
    assert log[-1].attempt == 2


async def test_no_subscriber_logs_dropped_event(smart: Smart, ehr_clock: FakeClock) -> None:
    """Without a subscriber URL the event is not sent, and the log says so."""
    await smart.admin("PATCH", f"/_sandbox/tenants/{smart.tenant}", {"webhook_url": None})
    appt = await _book(smart, ehr_clock)
    log = await smart.admin("GET", f"/_sandbox/tenants/{smart.tenant}/webhooks/deliveries")
    (entry,) = [d for d in log["deliveries"] if d["appointment_id"] == appt["id"]]
    assert entry["delivered"] is False
    assert "no subscriber" in entry["error"]


async def test_fhir_patch_cancel_fires_cancelled_event(
    smart: Smart, ehr_clock: FakeClock, ehr_receiver: Receiver
) -> None:
    """Cancelling through FHIR PATCH /status also fires the cancelled event."""
    await _subscribe(smart, ehr_receiver.url)
    await smart.register("feed-writer")
    scope = "launch openid user/Appointment.read user/Appointment.write"
    tok = await smart.access_token("feed-writer", scope)
    appt = next(a for a in await smart.appointments() if a["video"])
    headers = {
        "Authorization": f"Bearer {tok['access_token']}",
        "Content-Type": "application/json-patch+json",
        "If-Match": 'W/"1"',
    }
    ops = [{"op": "replace", "path": "/status", "value": "cancelled"}]
    url = f"{smart.base}/Appointment/{appt['id']}"
    async with smart.http.patch(url, data=json.dumps(ops), headers=headers) as resp:
        assert resp.status == 200
    (got,) = await ehr_receiver.wait_for(1)
    assert json.loads(got.body)["event"] == "cancelled"
