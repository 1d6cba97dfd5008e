"""`make demo`: one complete visit through the real services and the stand-ins, step by step.
Exits 0 only if every step happened."""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aiohttp
import orjson
from yarl import URL

from infra.portal_client import portal_session
from infra.run import TLS, RunningSystem, StartFailed, running_system
from infra.sample_data import EHR, TENANT_A
from libs.common.keys import appointment_key
from libs.common.settings import ServiceSettings

MICROSOFT = "https://127.0.0.1:9443"
ANALYTICS = "http://127.0.0.1:8083"
# Metrics have a listener of their own, never on the service's port (infra/run.py).
ANALYTICS_METRICS = "http://127.0.0.1:9083/metrics"
REPORTS_READER = "reports@contosohealth.onmicrosoft.com"
JOIN_LINK = re.compile(r"http\S+/join/\S+")
# `make run` starts the services with the development key secret (infra/run.py sets none).
KEY_SECRET = ServiceSettings.model_fields["appointment_key_secret"].default.get_secret_value()
T = TypeVar("T")


class StepFailed(Exception):
    pass


def step(number: int, text: str) -> None:
    print(f"\n[{number}/9] {text}", flush=True)


def done(detail: str) -> None:
    print(f"      ok: {detail}", flush=True)


async def eventually(
    what: str, probe: Callable[[], Awaitable[T | None]], within_s: float = 30
) -> T:
    """Polls another process's state (there is no event to wait on across processes)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        found = await probe()
        if found is not None:
            return found
        await asyncio.sleep(0.5)
    raise StepFailed(f"timed out after {within_s:.0f} s waiting for {what}")


async def follow(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """Follows redirects like a browser, carrying cookies by hand (they are Secure)."""
    cookies: dict[str, str] = {}
    for _ in range(10):
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}
        async with http.get(url, allow_redirects=False, headers=headers) as r:
            body = await r.text()
            cookies.update({name: morsel.value for name, morsel in r.cookies.items()})
            if r.status not in (301, 302, 303, 307):
                return r.status, body
            url = str(r.url.join(URL(r.headers["Location"])))
    raise StepFailed("too many redirects")


def _key_of(join_link: str) -> str:
    """The appointment key a join link names (its token is base64 JSON with `a`)."""
    token = join_link.rsplit("/", 1)[1].split(".")[0]
    return str(orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))["a"])


async def visit(http: aiohttp.ClientSession, system: RunningSystem) -> None:
    step(1, "Admin configuration, entered through the config API as the wizard does it")
    done(
        f"integration {system.seeded.integration_id}, SMS consents given,"
        f" sending number {system.seeded.sending_number} linked, allocation 500"
    )

    step(2, "An appointment is booked in the EHR (Cerner stand-in)")
    async with http.get(f"{EHR}/_sandbox/tenants/{TENANT_A}/directory") as r:
        directory = await r.json()
    async with http.get(f"{MICROSOFT}/_sandbox/sms/messages") as r:
        earlier = {m["messageId"] for m in (await r.json())["value"]}
    body = {
        "patient": directory["patients"][0]["id"],
        "practitioner": directory["practitioners"][0]["id"],
        "location": directory["locations"][0]["id"],
        "start": (datetime.now(UTC) + timedelta(minutes=5)).isoformat(),
        "minutes": 20,
        "video": True,
    }
    async with http.post(f"{EHR}/_sandbox/tenants/{TENANT_A}/appointments", json=body) as r:
        appointment = await r.json()
        if r.status != 201:
            raise StepFailed(f"booking answered {r.status}: {appointment}")
    done(f"FHIR Appointment {appointment['id']} at {appointment['start']}, a video visit")

    step(3, "The confirmation SMS arrives in the ACS stand-in's inbox")

    # This booking's confirmation, by the appointment its link names: the sample bookings'
    # confirmations may still be arriving (their visits' waiting rooms are not open yet).
    expected = appointment_key(
        KEY_SECRET, uuid.UUID(system.seeded.integration_id), str(appointment["id"])
    )

    async def confirmation() -> dict[str, Any] | None:
        async with http.get(f"{MICROSOFT}/_sandbox/sms/messages") as r:
            messages = (await r.json())["value"]
        for message in messages:
            link = JOIN_LINK.search(message["message"])
            if message["messageId"] not in earlier and link and _key_of(link[0]) == expected:
                return dict(message)
        return None

    sms = await eventually("the confirmation SMS", confirmation)
    join_link = JOIN_LINK.search(sms["message"])
    if join_link is None:
        raise StepFailed("the SMS carries no join link")
    done(f'{sms["segments"]} segment(s): "{sms["message"][:60]}..."')

    step(4, "The clinician launches the visit from PowerChart (SMART on FHIR EHR launch)")
    async with http.post(
        f"{EHR}/_sandbox/tenants/{TENANT_A}/launches", json={"appointment": appointment["id"]}
    ) as r:
        launch_url = (await r.json())["launch_url"]
    status, page = await follow(http, launch_url)
    if status != 200 or "Join the meeting" not in page:
        raise StepFailed(f"the provider page answered {status}")
    done("SSO through the EHR's authorize and token endpoints; provider page with Join and roster")

    step(5, "The patient opens the SMS link and waits in the lobby")
    status, page = await follow(http, join_link.group(0))
    if status != 200 or "Join the visit" not in page:
        raise StepFailed(f"the pre-join page answered {status}")
    key = _key_of(join_link.group(0))
    async with http.get(f"{MICROSOFT}/_sandbox/meetings") as r:
        meeting = next(m for m in await r.json() if m["externalId"] == key)
    meeting_url = f"{MICROSOFT}/_sandbox/meetings/{meeting['id']}"
    async with http.post(f"{meeting_url}/join", json={"role": "organizer"}) as r:
        r.raise_for_status()
    async with http.post(
        f"{meeting_url}/join", json={"role": "attendee", "display": "Patient"}
    ) as r:
        r.raise_for_status()
    done("pre-join page with the device check; in the Teams lobby of the meeting")
    await asyncio.sleep(3)  # a few seconds in the lobby, so the report shows a real wait

    step(6, "The clinician admits the patient")
    async with http.post(f"{meeting_url}/admit", json={}) as r:
        admitted = (await r.json())["admitted"]
    done(f"{len(admitted)} admitted")
    await asyncio.sleep(2)  # a short visit

    step(7, "The meeting ends")
    async with http.post(f"{meeting_url}/end", json={}) as r:
        r.raise_for_status()
    done("CallEnded notified; attendance report fetched; meeting-ended published")

    step(8, "The usage report shows this visit's lobby wait and duration")
    session = await portal_session(http, ANALYTICS, REPORTS_READER)

    async def completed() -> dict[str, Any] | None:
        # The report names a meeting by its appointment key, which the join link carries.
        async with http.get(f"{ANALYTICS}/reports/meetings?days=7", headers=session.headers()) as r:
            rows = (await r.json()).get("meetings", [])
        for row in rows:
            if row["meeting_id"] == key and row["status"] == "Completed":
                return dict(row)
        return None

    row = await eventually("the visit in the report", completed, within_s=20)
    done(
        f"status {row['status']}, lobby wait {row['lobby_wait_s']:.1f} s,"
        f" duration {row['duration_s']:.1f} s, {row['attendees']} attendees,"
        f" {row['sms_sent']} SMS, department {row['department']}"
    )

    step(9, "/metrics shows the histograms")

    async def histograms() -> list[str] | None:
        async with http.get(ANALYTICS_METRICS) as r:
            lines = (await r.text()).splitlines()
        counts = [
            line
            for line in lines
            if line.startswith(("lobby_wait_seconds_count", "appointment_duration_seconds_count"))
        ]
        return counts if len(counts) >= 2 else None

    for line in await eventually("the histograms in /metrics", histograms, within_s=10):
        done(line)


async def main() -> int:
    trusted = ssl.create_default_context(cafile=str(TLS / "ca.pem"))
    try:
        async with (
            running_system() as system,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=trusted),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=30),
            ) as http,
        ):
            await visit(http, system)
    except (StartFailed, StepFailed) as exc:
        print(f"\ndemo: FAILED: {exc}", file=sys.stderr)
        return 1
    print("\ndemo: every step happened.")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
