"""Sample data for `make run`, entered the way people would: the admin walks the config
portal's API, the Cerner admin registers the app in the EHR, and the EHR books visits. Safe to
run again: what exists is kept."""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg

from infra.portal_client import PortalSession, portal_session

EHR = "http://127.0.0.1:9100"
CONFIG = "http://127.0.0.1:8081"
LAUNCH = "http://127.0.0.1:8080"
TENANT_A = "5f3c1a9e-2b7d-4e8a-9c41-0a1b2c3d4e01"
ADMIN = "admin@contosohealth.onmicrosoft.com"
ORGANIZER = "dr.lee@contosohealth.onmicrosoft.com"
SMART_CLIENT_ID = "teams-ehr-connector"
# Local stand-ins only: these never leave the machine.
SMART_CLIENT_SECRET = "local-smart-client-secret"  # noqa: S105
WEBHOOK_SECRET = "dev-only-scheduling-secret"  # noqa: S105


@dataclass(frozen=True)
class Seeded:
    integration_id: str
    provider_launch_url: str
    sending_number: str
    booked: int


async def _json(response: aiohttp.ClientResponse, *expected: int) -> Any:
    body = await response.json(content_type=None)
    if response.status not in expected:
        raise RuntimeError(
            f"{response.method} {response.url.path} answered {response.status}: {body}"
        )
    return body


async def _api(
    http: aiohttp.ClientSession, session: PortalSession, method: str, path: str, body: Any = None
) -> Any:
    async with http.request(method, CONFIG + path, json=body, headers=session.headers()) as r:
        return await _json(r, 200, 201, 202)


async def configure_portal(http: aiohttp.ClientSession) -> tuple[str, dict[str, str], str]:
    session = await portal_session(http, CONFIG, ADMIN)
    fhir_base = f"{EHR}/r4/{TENANT_A}"
    listing = await _api(http, session, "GET", "/api/integrations")
    existing = [i for i in listing["integrations"] if i["fhir_base_url"] == fhir_base]
    if existing:
        integration_id = existing[0]["id"]
    else:
        created = await _api(
            http,
            session,
            "POST",
            "/api/integrations",
            {
                "fhir_base_url": fhir_base,
                "environment": "test",
                "smart_client_id": SMART_CLIENT_ID,
                "client_auth_method": "client_secret_basic",
                "client_secret": SMART_CLIENT_SECRET,
                "pkce_mode": "required",
                "teams_organizer_id": ORGANIZER,
                "department": "General Medicine",
                "organisation_name": "Contoso Health",
            },
        )
        integration_id = created["id"]
    await _api(
        http,
        session,
        "PUT",
        "/api/sms",
        {"enabled": True, "vendor_may_send_sms": True, "organisation_has_patient_consent": True},
    )
    numbers = (await _api(http, session, "GET", "/api/phone-numbers"))["phone_numbers"]
    active = [n for n in numbers if n["status"] == "active"]
    in_progress = [n for n in numbers if n["status"] not in ("active", "failed")]
    if active:
        number = active[0]
    else:
        number = (
            in_progress[0]
            if in_progress
            else await _api(http, session, "POST", "/api/phone-numbers")
        )
        print(
            "run: buying a sending number (a long-running job at the ACS stand-in)...", flush=True
        )
        async with asyncio.timeout(120):
            while number["status"] != "active":
                if number["status"] == "failed":
                    raise RuntimeError(f"number purchase failed: {number['error']}")
                await asyncio.sleep(0.5)  # the portal itself polls this job the same way
                number = await _api(http, session, "GET", f"/api/phone-numbers/{number['id']}")
    if integration_id not in number["linked_integration_ids"]:
        links = [*number["linked_integration_ids"], integration_id]
        await _api(
            http,
            session,
            "PUT",
            f"/api/phone-numbers/{number['id']}/links",
            {"integration_ids": links},
        )
    await _api(http, session, "PUT", "/api/allocation", {"monthly_allocation": 500})
    records = await _api(http, session, "GET", f"/api/integrations/{integration_id}/records")
    urls = {str(r["key"]): str(r["value"]) for r in records["records"]}
    return integration_id, urls, str(number["phone_number"])


async def register_in_ehr(http: aiohttp.ClientSession, records: dict[str, str]) -> None:
    """What the Cerner admin does with the integration records."""
    client = {
        "client_id": SMART_CLIENT_ID,
        "redirect_uris": [f"{LAUNCH}/launch/callback"],
        "auth_method": "client_secret_basic",
        "client_secret": SMART_CLIENT_SECRET,
    }
    async with http.post(f"{EHR}/_sandbox/clients", json=client) as r:
        await _json(r, 200, 201)
    tenant = {
        "launch_url": records["provider_launch_url"],
        "patient_launch_url": records["patient_launch_url"],
        "webhook_url": f"{LAUNCH}/ehr/scheduling",
        "webhook_secret": WEBHOOK_SECRET,
    }
    async with http.patch(f"{EHR}/_sandbox/tenants/{TENANT_A}", json=tenant) as r:
        await _json(r, 200)


async def book_visits(http: aiohttp.ClientSession, count: int = 2) -> int:
    async with http.get(f"{EHR}/_sandbox/tenants/{TENANT_A}/directory") as r:
        directory = await _json(r, 200)
    start = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=30)
    for index in range(count):
        body = {
            "patient": directory["patients"][index % len(directory["patients"])]["id"],
            "practitioner": directory["practitioners"][0]["id"],
            "location": directory["locations"][index % len(directory["locations"])]["id"],
            "start": (start + timedelta(minutes=30 * index)).isoformat(),
            "minutes": 20,
            "video": True,
        }
        async with http.post(f"{EHR}/_sandbox/tenants/{TENANT_A}/appointments", json=body) as r:
            await _json(r, 201)
    return count


async def gateway_sends_sms(database_url: str, integration_id: str, within_s: float = 60) -> None:
    """Waits until the gateway has applied the integration with SMS on. Configuration reaches
    it through Kafka, tens of milliseconds after the portal answers; a visit booked before
    that is booked with SMS off (no number kept, no confirmation), as in production, where an
    admin's switch reaches visits booked from then on. The sample bookings wait for it."""
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + within_s
        while not await conn.fetchval(
            "SELECT sms_enabled FROM launch.integrations WHERE integration_id = $1",
            uuid.UUID(integration_id),
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway did not apply SMS on within {within_s:.0f} s")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def seed(ca_file: str, database_url: str) -> Seeded:
    context = ssl.create_default_context(cafile=ca_file)
    connector = aiohttp.TCPConnector(ssl=context)
    async with aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=30),
    ) as http:
        integration_id, records, number = await configure_portal(http)
        await register_in_ehr(http, records)
        await gateway_sends_sms(database_url, integration_id)
        booked = await book_visits(http)
    return Seeded(integration_id, records["provider_launch_url"], number, booked)
