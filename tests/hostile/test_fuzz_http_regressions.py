"""The hostile inputs the fuzzer turned up, or that reading its findings turned up next to
them, pinned as plain requests so they stay fixed whatever the fuzzer's budget draws. Each got
a 5xx and an unhandled exception before; now a clear 4xx, no error log, and nothing stored."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import orjson

from libs.common.web import DB_POOL
from sandbox.ehr import TENANT_A
from tests.hostile.http_support import (
    LogWatch,
    Target,
    analytics_target,
    config_target,
    launch_target,
    notify_target,
    watching_logs,
)
from tests.support.launch_harness import scheduling_headers

__all__ = ["analytics_target", "config_target", "launch_target", "notify_target"]


@contextmanager
def no_error_logs() -> Iterator[LogWatch]:
    with watching_logs() as logs:
        yield logs
        assert not logs.errors(), logs.errors()


async def call(method: str, url: str, **kwargs: Any) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, allow_redirects=False, **kwargs) as r,
    ):
        return r.status, await r.text()


async def raw_get(url: str, path: str, headers: bytes) -> int:
    """A GET with header bytes no client library sends (invalid UTF-8); its status."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n")
        writer.write(headers + b"\r\n")
        await writer.drain()
        return int((await reader.readline()).split()[1])
    finally:
        writer.close()


async def count(target: Target, table: str) -> int:
    return int(await target.app[DB_POOL].fetchval(f"SELECT count(*) FROM {table}"))


# Bodies that say they are forms but are not: aiohttp's request.post() raised ValueError,
# UnicodeDecodeError or LookupError on each, a 500 from every form handler.
NOT_FORMS: list[tuple[bytes, str]] = [
    (
        b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n",
        "multipart/form-data; boundary=b",
    ),
    (b"garbage", "multipart/form-data; boundary=b"),
    (b"garbage", "multipart/form-data"),
    (b"\xff\xfe=1", "application/x-www-form-urlencoded"),
    (b"a=1", "application/x-www-form-urlencoded; charset=no-such-charset"),
]


async def post_not_forms(target: Target, path: str) -> None:
    for body, content_type in NOT_FORMS:
        status, text = await call(
            "POST",
            target.url + path,
            data=body,
            headers={**target.headers, "Content-Type": content_type},
            cookies=target.cookies,
        )
        assert status == 400, (content_type, body, text)


# -- launch -------------------------------------------------------------------------------------


def _notification(target: Target, **resource: Any) -> dict[str, Any]:
    note = {
        "subscriptionId": target.known["subscription_id"],
        "clientState": target.known["client_state"],
        "resourceData": {
            "eventType": "#microsoft.graph.callStarted",
            "eventDateTime": "2030-01-01T10:00:00Z",
            **resource,
        },
    }
    return {"value": [note]}


async def test_launch_refuses_hostile_tokens_cookies_and_notifications(
    launch_target: Target,
) -> None:
    """Launch answers 4xx and stores nothing for: a non-ASCII join token (404), a
    provider_session cookie that is not UTF-8 (401), a non-ASCII form token (403), a body
    that is not a form (400), and Graph notifications with a NUL subscriptionId, an integer
    beyond 64 bits or a year-0 time (400)."""
    outbox_before = await count(launch_target, "outbox")
    with no_error_logs():
        for path in ("/join/%C3%93Z.%C2%A7Q", "/join/%C3%93Z.%C2%A7Q/enter"):
            assert (await call("GET", launch_target.url + path))[0] == 404
        cookie = b"Cookie: provider_session=\xe9\xff\r\n"
        assert await raw_get(launch_target.url, "/visit", cookie) == 401
        status, _ = await call(
            "POST",
            f"{launch_target.url}/visit/send-link",
            data={"csrf_token": "é" + launch_target.known["csrf_token"][1:]},
            cookies=launch_target.cookies,
        )
        assert status == 403
        await post_not_forms(launch_target, "/visit/send-link")
    nul = _notification(launch_target)
    nul["value"][0]["subscriptionId"] = "a\u0000b"
    huge = _notification(
        launch_target,
        **{"activeParticipants@joined": [{"Id": "x", "Identity": {"user": {"n": 2**70}}}]},
    )
    year_zero = _notification(launch_target, eventDateTime="0001-01-01T00:00:00+01:00")
    with no_error_logs():
        for body in (nul, huge, year_zero):
            status, text = await call(
                "POST", f"{launch_target.url}/graph/notifications", data=json.dumps(body)
            )
            assert status == 400, text
    assert await count(launch_target, "graph_notifications") == 0
    assert await count(launch_target, "outbox") == outbox_before


def _booking(target: Target, **appointment: Any) -> bytes:
    body = {
        "event_id": str(uuid.uuid4()),
        "event": "booked",
        "tenant": TENANT_A,
        "fhir_base": target.known["fhir_base"],
        "occurred_at": "2030-01-01T09:00:00Z",
        "appointment": {
            "resourceType": "Appointment",
            "id": "hostile-1",
            "status": "booked",
            "start": "2030-01-01T10:00:00Z",
            "end": "2030-01-01T10:30:00Z",
            "serviceType": [{"coding": [{"code": "VIDEO_VISIT"}]}],
            **appointment,
        },
    }
    return orjson.dumps(body)


async def _book(target: Target, appointment: dict[str, Any]) -> tuple[int, str]:
    raw = _booking(target, **appointment)
    headers = {**scheduling_headers(raw), "Content-Type": "application/json"}
    return await call("POST", f"{target.url}/ehr/scheduling", data=raw, headers=headers)


async def test_scheduling_feed_refuses_bookings_outside_the_calendar(
    launch_target: Target,
) -> None:
    """A signed booking in year 9999, or in year 0 once in UTC, is refused with 422 (the EHR
    does not retry) and records nothing."""
    before = await count(launch_target, "appointments"), await count(launch_target, "outbox")
    with no_error_logs():
        for start, end in [
            ("9999-12-31T23:00:00Z", "9999-12-31T23:59:00Z"),
            ("0001-01-01T00:00:00+01:00", "0001-01-01T01:00:00+01:00"),
        ]:
            status, text = await _book(launch_target, {"start": start, "end": end})
            assert status == 422, (start, text)
    after = await count(launch_target, "appointments"), await count(launch_target, "outbox")
    assert after == before


async def test_scheduling_feed_books_despite_odd_versions_and_departments(
    launch_target: Target,
) -> None:
    """A version of Unicode or 30 digits counts as version 1, and a department with a NUL
    gives way to the integration's department: the visits are booked, not a 500."""
    odd: list[dict[str, Any]] = [
        {"id": "hostile-v1", "meta": {"versionId": "²"}},
        {"id": "hostile-v2", "meta": {"versionId": "9" * 30}},
        {
            "id": "hostile-d1",
            "participant": [{"actor": {"reference": "Location/1", "display": "Ward\u0000A"}}],
        },
    ]
    with no_error_logs():
        for appointment in odd:
            status, text = await _book(launch_target, appointment)
            assert status == 200, (appointment, text)
            key = orjson.loads(text)["appointment_key"]
            row = await launch_target.app[DB_POOL].fetchrow(
                "SELECT schedule_version, department FROM appointments WHERE appointment_key = $1",
                key,
            )
            assert row is not None
            assert row["schedule_version"] == 1
            assert "\x00" not in row["department"]


# -- portals (config, analytics) ----------------------------------------------------------------


async def test_portal_refuses_undecodable_cookies_and_non_ascii_csrf(
    config_target: Target,
) -> None:
    """A portal_session cookie that is not UTF-8 is 'not signed in' (401), a NUL in
    return_to still starts the sign-in (302), and a non-ASCII CSRF token, in the header or
    the form, is refused (403) and changes nothing."""
    audit_before = await count(config_target, "audit_log")
    with no_error_logs():
        cookie = b"Cookie: portal_session=\xe9\xff\r\n"
        assert await raw_get(config_target.url, "/auth/session", cookie) == 401
        status, _ = await call("GET", f"{config_target.url}/auth/login?return_to=/a%00b")
        assert status == 302
        status, text = await call(
            "PUT",
            f"{config_target.url}/api/allocation",
            json={"monthly_allocation": 5},
            cookies=config_target.cookies,
            headers={"X-CSRF-Token": "é" + config_target.headers["X-CSRF-Token"][1:]},
        )
        assert status == 403, text
        status, text = await call(
            "POST",
            f"{config_target.url}/auth/logout",
            data={"csrf_token": "é"},
            cookies=config_target.cookies,
        )
        assert status == 403, text
    assert await count(config_target, "audit_log") == audit_before


async def test_form_handlers_refuse_bodies_that_are_not_forms(
    config_target: Target, analytics_target: Target
) -> None:
    """A portal form post (config's SMS page, analytics' sign-out) whose multipart body has
    no boundary or a nameless part, whose bytes are not UTF-8 or whose charset is unknown
    is 400; nothing is audited and the session survives."""
    audit_before = await count(config_target, "audit_log")
    with no_error_logs():
        await post_not_forms(config_target, "/sms")
        await post_not_forms(analytics_target, "/auth/logout")
        status, _ = await call(
            "GET", f"{analytics_target.url}/auth/session", cookies=analytics_target.cookies
        )
        assert status == 200
    assert await count(config_target, "audit_log") == audit_before


async def test_config_refuses_unicode_digits(config_target: Target) -> None:
    """Numbers typed as Unicode digits ("²" passes str.isdigit) or 5000 digits are refused
    with 400 or 422 in the API and the pages, and the allocation is unchanged."""
    audit_before = await count(config_target, "audit_log")
    signed_in = {"cookies": config_target.cookies, "headers": config_target.headers}
    with no_error_logs():
        for query in ("limit=%C2%B2", "before=%C2%B2", "limit=" + "9" * 5000):
            status, text = await call("GET", f"{config_target.url}/api/audit?{query}", **signed_in)
            assert status == 400, (query, text)
        status, _ = await call("GET", f"{config_target.url}/audit?before=%C2%B2", **signed_in)
        assert status == 200
        for value in ("²", "9" * 5000):
            status, text = await call(
                "POST",
                f"{config_target.url}/allocation",
                data={
                    "monthly_allocation": value,
                    "csrf_token": config_target.headers["X-CSRF-Token"],
                },
                cookies=config_target.cookies,
            )
            assert status == 422, (value, text)
    assert await count(config_target, "audit_log") == audit_before


# -- analytics ------------------------------------------------------------------------------------


OUT_OF_RANGE = [
    "/reports/usage?days=%C2%B2",
    "/reports/usage?days=" + "9" * 30,
    "/reports/meetings?limit=%C2%B2",
    "/dashboard?days=%C2%B2",
    "/reports/usage?from=9999-12-31",
    "/reports/usage?to=0001-01-01",
    "/reports/meetings?from=9999-12-31&to=9999-12-31",
    "/reports/allocation?month=9999-12",
    "/reports/meetings?cursor=" + quote("MjAzMC0wMS0wMVQwMDowMDowMCswMDowMHxhAGI"),
]


async def test_analytics_refuses_out_of_range_parameters(analytics_target: Target) -> None:
    """Unicode digits, numbers beyond any range, dates whose window leaves the calendar
    and a cursor holding a NUL are 400, as is a sign-in cookie that is not UTF-8."""
    with no_error_logs():
        for query in OUT_OF_RANGE:
            status, text = await call(
                "GET", analytics_target.url + query, cookies=analytics_target.cookies
            )
            assert status == 400, (query, text)
        cookie = b"Cookie: portal_session=\xe9\xff\r\n"
        assert await raw_get(analytics_target.url, "/auth/session", cookie) == 401


# -- notify ---------------------------------------------------------------------------------------


def _delivery_report(**data: Any) -> list[dict[str, Any]]:
    report = {
        "MessageId": "m-1",
        "From": "+18005550100",
        "To": "+13125550142",
        "DeliveryStatus": "Delivered",
        "DeliveryStatusDetails": "ok",
        "ReceivedTimestamp": "2030-01-01T10:00:00Z",
        **data,
    }
    return [
        {
            "id": "e-1",
            "subject": "s",
            "eventType": "Microsoft.Communication.SMSDeliveryReportReceived",
            "eventTime": "2030-01-01T10:00:00Z",
            "data": report,
        }
    ]


UNSTORABLE_REPORTS: list[dict[str, Any]] = [
    {"MessageId": "m\u0000"},
    {"DeliveryStatusDetails": "a\u0000b"},
    {"ReceivedTimestamp": "0001-01-01T00:00:00+01:00"},
]


async def test_notify_refuses_unstorable_delivery_reports(notify_target: Target) -> None:
    """A delivery report with a NUL or a year-0 timestamp is 400 and nothing is stored."""
    with no_error_logs():
        for data in UNSTORABLE_REPORTS:
            status, text = await call(
                "POST",
                f"{notify_target.url}/acs/events?code={notify_target.known['code']}",
                json=_delivery_report(**data),
            )
            assert status == 400, (data, text)
    assert await count(notify_target, "delivery_reports") == 0
