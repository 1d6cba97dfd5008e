"""Contract tests: the sandbox PowerChart page and the admin API around it."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from sandbox.ehr import TENANT_A
from tests.sandbox.ehr_helpers import Receiver, Smart, pkce_pair

LAUNCH_URL = "http://127.0.0.1:9/launch/provider"


async def test_page_lists_todays_video_visits_with_teams_buttons(smart: Smart) -> None:
    """PowerChart lists today's video visits (not office visits), each with a Teams button."""
    async with smart.http.get(f"{smart.ehr.url}/powerchart/{TENANT_A}") as resp:
        assert resp.status == 200
        page = await resp.text()
    appts = await smart.appointments()
    for appt in appts:
        marker = f"data-appointment='{appt['id']}'"
        assert (marker in page) == appt["video"]
    assert "<script" not in page  # no external CDN or scripts
    assert "<link" not in page


async def test_teams_button_performs_ehr_launch(smart: Smart) -> None:
    """The Teams button mints a launch and navigates to <launch url>?iss=<base>&launch=<id>."""
    await smart.admin("PATCH", f"/_sandbox/tenants/{TENANT_A}", {"launch_url": LAUNCH_URL})
    appt = next(a for a in await smart.appointments() if a["video"])
    url = f"{smart.ehr.url}/powerchart/{TENANT_A}/launch"
    async with smart.http.post(url, data={"appointment": appt["id"]}, allow_redirects=False) as r:
        assert r.status == 303
        location = r.headers["Location"]
    assert location.startswith(LAUNCH_URL + "?")
    query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    assert query["iss"] == smart.base
    await smart.register("pc-app")
    _, challenge = pkce_pair()
    status, redirect, _ = await smart.authorize("pc-app", query["launch"], challenge)
    assert status == 302
    assert "code" in redirect


async def test_teams_button_without_launch_url_explains(smart: Smart) -> None:
    """Without a configured launch URL the page comes back with an explanation."""
    appt = next(a for a in await smart.appointments() if a["video"])
    url = f"{smart.ehr.url}/powerchart/{TENANT_A}/launch"
    async with smart.http.post(url, data={"appointment": appt["id"]}) as resp:
        assert resp.status == 200
        assert "no provider launch URL" in await resp.text()


async def test_book_form_books_and_fires_webhook(smart: Smart, ehr_receiver: Receiver) -> None:
    """The book form creates a video visit, shown on the page, and fires the booked event."""
    body = {"webhook_url": ehr_receiver.url, "webhook_secret": "s"}
    await smart.admin("PATCH", f"/_sandbox/tenants/{TENANT_A}", body)
    directory = await smart.admin("GET", f"/_sandbox/tenants/{TENANT_A}/directory")
    form = {
        "patient": directory["patients"][1]["id"],
        "practitioner": directory["practitioners"][1]["id"],
        "location": directory["locations"][1]["id"],
        "time": "23:10",
        "minutes": "15",
    }
    before = {a["id"] for a in await smart.appointments()}
    async with smart.http.post(f"{smart.ehr.url}/powerchart/{TENANT_A}/book", data=form) as resp:
        assert resp.status == 200
        assert "Booked Appointment/" in await resp.text()
    (new,) = [a for a in await smart.appointments() if a["id"] not in before]
    assert new["start"].endswith("T23:10:00.000Z")
    assert new["video"] is True
    await ehr_receiver.wait_for(1)


async def test_admin_lists_tenants_with_urls(smart: Smart) -> None:
    """GET /_sandbox/tenants shows both tenants with their FHIR base and SMART endpoints."""
    tenants = (await smart.admin("GET", "/_sandbox/tenants"))["tenants"]
    assert len(tenants) >= 2
    first = next(t for t in tenants if t["guid"] == TENANT_A)
    assert first["fhir_base"] == smart.base
    assert first["token_endpoint"] == (await smart.config())["token_endpoint"]


async def test_admin_launch_with_unknown_patient_is_404(smart: Smart) -> None:
    """Minting a launch for an unknown patient is refused."""
    directory = await smart.admin("GET", f"/_sandbox/tenants/{TENANT_A}/directory")
    body = {"practitioner": directory["practitioners"][0]["id"], "patient": "nope"}
    url = f"{smart.ehr.url}/_sandbox/tenants/{TENANT_A}/launches"
    async with smart.http.post(url, json=body) as resp:
        assert resp.status == 404
