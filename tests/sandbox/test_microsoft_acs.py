"""Contract tests: ACS stand-in (HMAC, SMS refusals, repeatability, Event Grid, numbers LRO)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp

from sandbox.microsoft.app import RunningSandbox
from sandbox.microsoft.clock import ManualClock, rfc1123
from sandbox.microsoft.config import DEFAULT_ACS_ACCESS_KEY
from tests.sandbox.ms_helpers import Receiver, acs_headers, dumps

SENDER = "+18005550100"
PATIENT = "+15555550123"
SMS_PATH = "/sms?api-version=2021-03-07"


async def acs(
    ms: RunningSandbox,
    http: aiohttp.ClientSession,
    clock: ManualClock,
    method: str,
    path: str,
    body: Any = None,
    **tamper: Any,
) -> tuple[int, Any, dict[str, str]]:
    raw = b"" if body is None else dumps(body)
    url = f"{ms.base_url}{path}"
    headers = acs_headers(DEFAULT_ACS_ACCESS_KEY, method, url, raw, clock, **tamper)
    async with http.request(method, url, data=raw, headers=headers) as resp:
        data = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, data, dict(resp.headers)


def sms(to: list[str], rid: str | None = None, message: str = "Your visit link") -> dict[str, Any]:
    recipients = [
        {
            "to": t,
            **(
                {"repeatabilityRequestId": rid, "repeatabilityFirstSent": rfc1123_now()}
                if rid
                else {}
            ),
        }
        for t in to
    ]
    return {
        "from": SENDER,
        "smsRecipients": recipients,
        "message": message,
        "smsSendOptions": {"enableDeliveryReport": True, "tag": "appt-1"},
    }


def rfc1123_now() -> str:
    return rfc1123(ManualClock().now())


async def sent(ms: RunningSandbox, http: aiohttp.ClientSession, to: str) -> list[dict[str, Any]]:
    async with http.get(f"{ms.base_url}/_sandbox/sms/messages", params={"to": to}) as resp:
        return list((await resp.json())["value"])


async def test_send_sms_queues_and_reports_delivery(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession, ms_clock: ManualClock, ms_receiver: Receiver
) -> None:
    """A signed send answers 202 per recipient and posts an Event Grid delivery report."""
    ms.components.acs.state.webhook_url = ms_receiver.url + "?code=hook-secret"
    status, body, _ = await acs(ms, ms_http, ms_clock, "POST", SMS_PATH, sms([PATIENT]))
    assert status == 202
    item = body["value"][0]
    assert item["successful"] is True
    assert item["httpStatusCode"] == 202
    assert item["to"] == PATIENT
    await ms_receiver.wait_for(lambda r: len(r) >= 1)
    event = ms_receiver.events()[0]
    assert event["eventType"] == "Microsoft.Communication.SMSDeliveryReportReceived"
    assert event["data"]["MessageId"] == item["messageId"]
    assert event["data"]["DeliveryStatus"] == "Delivered"
    assert event["data"]["Tag"] == "appt-1"
    assert len(await sent(ms, ms_http, PATIENT)) == 1


async def test_bad_signature_is_401(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession, ms_clock: ManualClock
) -> None:
    """A wrong HMAC signature is refused with 401 and nothing is sent."""
    status, body, _ = await acs(
        ms, ms_http, ms_clock, "POST", SMS_PATH, sms([PATIENT]), tamper_signature=True
    )
    assert status == 401
    assert body["error"]["code"] == "Denied"
    assert await sent(ms, ms_http, PATIENT) == []


async def test_bad_content_hash_is_401(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession, ms_clock: ManualClock
) -> None:
    """x-ms-content-sha256 must match the body (even if the signature covers the claim)."""
    status, _, _ = await acs(
        ms, ms_http, ms_clock, "POST", SMS_PATH, sms([PATIENT]), claimed_hash="AAAA"
    )
    assert status == 401


async def test_non_ascii_content_hash_is_401_not_500(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession, ms_clock: ManualClock
) -> None:
    """A content hash with non-ASCII characters is refused like any other wrong hash."""
    status, body, _ = await acs(
        ms, ms_http, ms_clock, "POST", SMS_PATH, sms([PATIENT]), claimed_hash="é" * 44
    )
    assert status == 401
    assert body["error"]["code"] == "Denied"


async def test_stale_date_is_401(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession, ms_clock: ManualClock
) -> None:
    """An x-ms-date more than 15 minutes off is refused."""
    status, _, _ = await acs(
        ms, ms_http, ms_clock, "POST", SMS_PATH, sms([PATIENT]), skew_s=-16 * 60
    )
    assert status == 401


async def test_unowned_sender_is_refused(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession, ms_clock: ManualClock
) -> None:
    """'from' must be a number the resource owns."""
    body = sms([PATIENT]) | {"from": "+18885550000"}
    status, data, _ = await acs(ms, ms_http, ms_clock, "POST", SMS_PATH, body)
    assert status == 400
    assert data["error"]["code"] == "InvalidFromNumber"


async def test_duplicate_repeatability_id_is_not_sent_twice(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession, ms_clock: ManualClock
) -> None:
    """A retried repeatabilityRequestId is 'rejected' with the original messageId, sent once."""
    rid = str(uuid.uuid4())
    _, first, _ = await acs(ms, ms_http, ms_clock, "POST", SMS_PATH, sms([PATIENT], rid))
    _, second, _ = await acs(ms, ms_http, ms_clock, "POST", SMS_PATH, sms([PATIENT], rid))
    assert first["value"][0]["repeatabilityResult"] == "accepted"
    assert second["value"][0]["repeatabilityResult"] == "rejected"
    assert second["value"][0]["messageId"] == first["value"][0]["messageId"]
    assert len(await sent(ms, ms_http, PATIENT)) == 1


async def test_over_rate_is_429_with_retry_after(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession, ms_clock: ManualClock
) -> None:
    """More than 200 messages a minute from one number is 429 + Retry-After; later it passes."""
    batch = [f"+1555556{i:04d}" for i in range(100)]
    for _ in range(2):
        status, _, _ = await acs(ms, ms_http, ms_clock, "POST", SMS_PATH, sms(batch))
        assert status == 202
    status, _, headers = await acs(ms, ms_http, ms_clock, "POST", SMS_PATH, sms([PATIENT]))
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    ms_clock.advance(61)
    status, _, _ = await acs(ms, ms_http, ms_clock, "POST", SMS_PATH, sms([PATIENT]))
    assert status == 202


async def test_stop_reply_blocks_recipient(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession, ms_clock: ManualClock, ms_receiver: Receiver
) -> None:
    """After the handset replies STOP, sends to it fail per recipient; START re-enables."""
    ms.components.acs.state.webhook_url = ms_receiver.url
    reply = {"from": PATIENT, "to": SENDER, "message": "STOP"}
    async with ms_http.post(f"{ms.base_url}/_sandbox/sms/reply", json=reply) as resp:
        assert resp.status == 201
    await ms_receiver.wait_for(lambda r: len(r) >= 1)
    inbound = ms_receiver.events()[0]
    assert inbound["eventType"] == "Microsoft.Communication.SMSReceived"
    assert inbound["data"]["Message"] == "STOP"
    status, body, _ = await acs(ms, ms_http, ms_clock, "POST", SMS_PATH, sms([PATIENT]))
    assert status == 202
    assert body["value"][0]["successful"] is False
    assert body["value"][0]["errorMessage"]
    async with ms_http.post(
        f"{ms.base_url}/_sandbox/sms/reply", json=reply | {"message": "START"}
    ) as resp:
        assert resp.status == 201
    _, body, _ = await acs(ms, ms_http, ms_clock, "POST", SMS_PATH, sms([PATIENT]))
    assert body["value"][0]["successful"] is True


async def test_inbox_page_shows_messages(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession, ms_clock: ManualClock
) -> None:
    """The per-number inbox page lists SMS that arrived."""
    await acs(ms, ms_http, ms_clock, "POST", SMS_PATH, sms([PATIENT], message="Join: https://x"))
    async with ms_http.get(f"{ms.base_url}/_sandbox/sms/inbox/{PATIENT}") as resp:
        assert "Join:" in await resp.text()


async def poll(
    ms: RunningSandbox, http: aiohttp.ClientSession, clock: ManualClock, location: str
) -> dict[str, Any]:
    """Poll an LRO as an ACS client does (the protocol is polling; Retry-After paces it)."""
    path = location.removeprefix(ms.base_url)
    while True:
        status, op, _ = await acs(ms, http, clock, "GET", path)
        assert status == 200
        if op["status"] in ("succeeded", "failed"):
            return dict(op)
        await asyncio.sleep(0.05)


async def _search(
    ms: RunningSandbox, http: aiohttp.ClientSession, clock: ManualClock
) -> tuple[str, dict[str, Any]]:
    body = {
        "phoneNumberType": "tollFree",
        "assignmentType": "application",
        "capabilities": {"sms": "inbound+outbound", "calling": "none"},
        "quantity": 1,
    }
    path = "/availablePhoneNumbers/countries/US/:search?api-version=2022-12-01"
    status, _, headers = await acs(ms, http, clock, "POST", path, body)
    assert status == 202
    assert headers["operation-id"].startswith("search_")
    op = await poll(ms, http, clock, headers["Operation-Location"])
    assert op["status"] == "succeeded"
    return headers["search-id"], op


async def test_number_search_and_purchase_lro(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession, ms_clock: ManualClock
) -> None:
    """Search then purchase via Operation-Location polling; the number then sends SMS."""
    search_id, _ = await _search(ms, ms_http, ms_clock)
    status, result, _ = await acs(
        ms, ms_http, ms_clock, "GET",
        f"/availablePhoneNumbers/searchResults/{search_id}?api-version=2022-12-01",
    )  # fmt: skip
    assert status == 200
    number = result["phoneNumbers"][0]
    status, _, headers = await acs(
        ms, ms_http, ms_clock, "POST",
        "/availablePhoneNumbers/:purchase?api-version=2022-12-01", {"searchId": search_id},
    )  # fmt: skip
    assert status == 202
    op = await poll(ms, ms_http, ms_clock, headers["Operation-Location"])
    assert op["status"] == "succeeded"
    _, owned, _ = await acs(ms, ms_http, ms_clock, "GET", "/phoneNumbers?api-version=2022-12-01")
    assert number in [n["phoneNumber"] for n in owned["value"]]
    status, _, _ = await acs(
        ms, ms_http, ms_clock, "POST", SMS_PATH, sms([PATIENT]) | {"from": number}
    )
    assert status == 202


async def test_purchase_failure_injection(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession, ms_clock: ManualClock
) -> None:
    """The admin API can make the next purchase fail; the operation reports status failed."""
    search_id, _ = await _search(ms, ms_http, ms_clock)
    async with ms_http.post(
        f"{ms.base_url}/_sandbox/acs/numbers/fail-next", json={"operation": "purchase"}
    ) as resp:
        assert resp.status == 200
    _, _, headers = await acs(
        ms, ms_http, ms_clock, "POST",
        "/availablePhoneNumbers/:purchase?api-version=2022-12-01", {"searchId": search_id},
    )  # fmt: skip
    op = await poll(ms, ms_http, ms_clock, headers["Operation-Location"])
    assert op["status"] == "failed"
    assert op["error"]["code"] == "PurchaseFailed"


async def test_unsigned_numbers_call_is_401(
    ms: RunningSandbox, ms_http: aiohttp.ClientSession
) -> None:
    """Phone number APIs need HMAC auth too."""
    async with ms_http.get(f"{ms.base_url}/phoneNumbers?api-version=2022-12-01") as resp:
        assert resp.status == 401
