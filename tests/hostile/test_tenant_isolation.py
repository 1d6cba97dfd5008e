"""Tenant isolation sweep: an admin of one Microsoft 365 tenant (Contoso, "A") tries every
route of the config service (the JSON API and the portal pages) with the other tenant's
(Fabrikam, "B") integration and phone-number ids, in every spelling a UUID parser accepts,
and every analytics report with B's ids, cursors and tenant id in the query. Every attempt
gets 403 or 404 (or, for A's own lists and reports, none of B's data), and B's data is
unchanged afterwards. The routes are read from the apps' routers, so a new route that is not
swept here fails the sweep instead of going untested. /metrics, on each service's metrics
port, is read too: nobody signs in there, so it must carry none of B's data.

The gateway's side: two tenants may configure the same FHIR base (config keys integrations
by tenant and URL), so a base shared by two tenants must never be resolved to one of them.

tests/config/test_access_api.py has the first cross-tenant cases (three reads, four changes
through the API); this is the exhaustive version."""

from __future__ import annotations

import base64
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import orjson

from libs.common.events import TenantSettingsV1, Topic, make_event
from sandbox.ehr import TENANT_A, TENANT_B, sign_webhook
from sandbox.microsoft.directory import CONTOSO_TENANT, FABRIKAM_TENANT
from services.config.app import create_app as create_config_app
from tests.analytics.conftest import Analytics, analytics, analytics_settings
from tests.analytics.visits import Person, Visit, events
from tests.config.conftest import (
    CONTOSO_ADMIN,
    FABRIKAM_ADMIN,
    ConfigPortal,
    config_portal,
    config_settings,
)
from tests.config.test_numbers_api import wait_for_number
from tests.conftest import metrics_url
from tests.hostile.attack_support import SECRET_A, Gateway, gateway, module_infra
from tests.support.launch_harness import integration_config

__all__ = [
    "analytics",
    "analytics_settings",
    "config_portal",
    "config_settings",
    "gateway",
    "module_infra",
]

A, B = CONTOSO_ADMIN, FABRIKAM_ADMIN
B_DEPARTMENT = "Fabrikam Secret Oncology"
# Long and odd enough not to turn up inside a number of /metrics by chance (987654 once did).
B_ALLOCATION = 918_273_645
B_ORGANISATION = "Fabrikam Clinics Private"

# Which kind of id a path parameter names, by the path segment before it.
ID_KINDS = {"integrations": "integration", "fhir-urls": "integration", "phone-numbers": "number"}
# Routes without ids that are not called with A's session, and why.
NOT_CALLED = {
    ("GET", "/auth/login"): "starts a sign-in; no tenant data",
    ("GET", "/auth/callback"): "finishes a sign-in; no tenant data",
    ("POST", "/auth/logout"): "would end the attacker's session; no tenant data",
}


def spellings(value: str) -> list[str]:
    """Every way uuid.UUID reads the same id."""
    parsed = uuid.UUID(value)
    return [str(parsed), str(parsed).upper(), parsed.hex, f"{{{parsed}}}", f"urn:uuid:{parsed}"]


def config_routes(portal: ConfigPortal) -> list[tuple[str, str]]:
    """(method, path template) of every route the config service serves, from its router."""
    app = create_config_app(portal.settings)
    found = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        if route.method == "HEAD" or "directory" in info or "prefix" in info:
            continue  # HEAD mirrors GET; static files hold no tenant data
        assert route.resource is not None
        found.add((route.method, route.resource.canonical))
    return sorted(found)


def id_kind(template: str) -> str:
    segments = template.strip("/").split("/")
    params = [i for i, s in enumerate(segments) if s.startswith("{")]
    assert len(params) == 1, f"{template}: sweep it by hand, it has {len(params)} parameters"
    before = segments[params[0] - 1]
    assert before in ID_KINDS, f"{template}: which tenant's id does it take? add it to ID_KINDS"
    return ID_KINDS[before]


def form_for(portal: ConfigPortal, template: str, ids: dict[str, str]) -> dict[str, str]:
    """A form a page route would accept from B's own admin, so only the tenant differs."""
    if template == "/fhir-urls/{id}" or template == "/fhir-urls":
        values = portal.integration(TENANT_A, department="Attacker")
        return {k: str(v) for k, v in values.items()} | {"enabled": "on"}
    if template.endswith("/links"):
        return {"integration_id": ids["integration"]}
    if template.endswith("/enabled"):
        return {}
    if template == "/sms":
        return {
            "enabled": "on",
            "vendor_may_send_sms": "on",
            "organisation_has_patient_consent": "on",
        }
    if template == "/allocation":
        return {"monthly_allocation": "7"}
    return {}


def json_for(portal: ConfigPortal, template: str, ids: dict[str, str]) -> Any:
    """A body an API route would accept from B's own admin."""
    if template in ("/api/integrations", "/api/integrations/{id}"):
        return portal.integration(TENANT_A, department="Attacker")
    if template.endswith("/enabled"):
        return {"enabled": False}
    if template.endswith("/links"):
        return {"integration_ids": [ids["integration"]]}
    if template == "/api/sms":
        return {"enabled": False, "vendor_may_send_sms": False,
                "organisation_has_patient_consent": False}  # fmt: skip
    if template == "/api/allocation":
        return {"monthly_allocation": 7}
    return None


async def request_as(
    portal: ConfigPortal, upn: str, method: str, path: str, template: str, ids: dict[str, str]
) -> tuple[int, str]:
    session = await portal.session(upn)
    headers = {"Cookie": f"portal_session={session.cookie}"}
    kwargs: dict[str, Any] = {}
    if path.startswith("/api/"):
        headers["X-CSRF-Token"] = session.csrf_token
        body = json_for(portal, template, ids)
        if method != "GET" and body is not None:
            kwargs["json"] = body
    elif method == "GET":
        headers["Accept"] = "text/html"
    else:
        kwargs["data"] = {"csrf_token": session.csrf_token, **form_for(portal, template, ids)}
    async with portal.http.request(
        method, portal.url + path, headers=headers, allow_redirects=False, **kwargs
    ) as r:
        return r.status, await r.text()


async def config_snapshot(portal: ConfigPortal, tenant_id: str) -> dict[str, Any]:
    """Everything the config service holds for one tenant, straight from its tables."""
    conn = await asyncpg.connect(
        portal.settings.database_url.get_secret_value(), server_settings={"search_path": "config"}
    )
    try:
        snapshot: dict[str, Any] = {}
        for table in ("integrations", "phone_numbers", "tenant_settings", "audit_log"):
            rows = await conn.fetch(
                f"SELECT * FROM {table} WHERE tenant_id = $1 ORDER BY 1", tenant_id
            )
            snapshot[table] = [dict(r) for r in rows]
        return snapshot
    finally:
        await conn.close()


async def seed_tenant(portal: ConfigPortal, upn: str, tenant: str) -> dict[str, str]:
    """An integration, an active phone number linked to it, SMS consent and an allocation."""
    extra = {"department": B_DEPARTMENT, "organisation_name": B_ORGANISATION} if upn == B else {}
    status, created = await portal.call(
        upn, "POST", "/api/integrations", portal.integration(tenant, **extra)
    )
    assert status == 201, created
    status, number = await portal.call(upn, "POST", "/api/phone-numbers")
    assert status == 202, number
    active = await wait_for_number(portal, upn, number["id"], "active")
    status, linked = await portal.call(
        upn, "PUT", f"/api/phone-numbers/{number['id']}/links",
        {"integration_ids": [created["id"]]},
    )  # fmt: skip
    assert status == 200, linked
    consent = {
        "enabled": True,
        "vendor_may_send_sms": True,
        "organisation_has_patient_consent": True,
    }
    assert (await portal.call(upn, "PUT", "/api/sms", consent))[0] == 200
    assert (await portal.call(upn, "PUT", "/api/allocation", {"monthly_allocation": 42}))[0] == 200
    return {"integration": created["id"], "number": number["id"], "e164": active["phone_number"]}


async def test_config_admin_cannot_reach_another_tenants_data_on_any_route(
    config_portal: ConfigPortal,
) -> None:
    """Contoso's Global Administrator calls every config route (API and pages) with each of
    Fabrikam's integration and phone-number ids in five UUID spellings: always 403 or 404.
    Every other route, called with a valid body, shows or changes only Contoso's data, and the
    metrics port shows none of Fabrikam's. Every route with an id is swept, and Fabrikam's
    rows are the same afterwards."""
    portal = config_portal
    ids_b = await seed_tenant(portal, B, TENANT_B)
    ids_a = await seed_tenant(portal, A, TENANT_A)
    before = await config_snapshot(portal, FABRIKAM_TENANT)
    markers = [ids_b["integration"], ids_b["number"], ids_b["e164"], TENANT_B, B_DEPARTMENT,
               B_ORGANISATION, FABRIKAM_TENANT]  # fmt: skip
    routes = config_routes(portal)
    with_ids = [(m, t) for m, t in routes if "{" in t]
    assert len(with_ids) >= 12, with_ids
    exercised: set[tuple[str, str]] = set()
    own_outcomes: dict[tuple[str, str], int] = {}
    failures = []
    for method, template in with_ids:
        kind = id_kind(template)
        for spelling in spellings(ids_b[kind]):
            path = template.split("{", 1)[0] + spelling + template.split("}", 1)[1]
            status, body = await request_as(portal, A, method, path, template, ids_b)
            # A is a Global Administrator sending the CSRF token: a 403 would mean the request
            # never reached the tenant check, so nothing but 404 proves isolation here.
            if status != 404 or any(m in body for m in markers):
                failures.append((method, path, status, body[:200]))
        exercised.add((method, template))
    # The same routes with A's own ids, carrying B's ids in the body, touch nothing of B's.
    for method, template in with_ids:
        path = template.replace("{id}", ids_a[id_kind(template)])
        if template.endswith("/links"):
            status, body = await request_as(portal, A, method, path, template, ids_b)
            assert status == 422, (method, path, status, body[:200])
    for method, template in routes:
        if "{" in template or (method, template) in NOT_CALLED:
            continue
        status, body = await request_as(portal, A, method, template, template, ids_a)
        if status >= 500 or any(m in body for m in markers):
            failures.append((method, template, status, body[:200]))
        own_outcomes[(method, template)] = status
        exercised.add((method, template))
    async with portal.http.get(metrics_url(portal.app)) as r:
        text = await r.text()
    if r.status != 200 or any(m in text for m in markers):
        failures.append(("GET", "metrics port /metrics", r.status, text[:200]))
    assert failures == []
    assert set(routes) - exercised == set(NOT_CALLED)
    # The control: A's own changes through the same requests go through.
    assert own_outcomes[("PUT", "/api/allocation")] == 200
    assert own_outcomes[("POST", "/allocation")] == 303
    assert own_outcomes[("GET", "/api/integrations")] == 200
    assert await config_snapshot(portal, FABRIKAM_TENANT) == before
    status, mine = await portal.call(B, "GET", f"/api/integrations/{ids_b['integration']}")
    assert status == 200
    assert mine["department"] == B_DEPARTMENT
    assert mine["phone_number_id"] == ids_b["number"]


# --- analytics --------------------------------------------------------------------------------

REPORT_DAY = datetime.now(UTC).replace(hour=9, minute=0, second=0, microsecond=0) - timedelta(
    days=1
)


def visit_of(tenant: str, department: str) -> Visit:
    start = REPORT_DAY
    admitted = start + timedelta(minutes=1)
    return Visit(
        key=f"apt-{uuid.uuid4().hex}",
        tenant_id=tenant,
        department=department,
        environment="production",
        people=[
            Person("dr", "organizer", None, [(start, start + timedelta(minutes=20))]),
            Person("pt", "patient", start, [(admitted, start + timedelta(minutes=20))]),
        ],
        ended_at=start + timedelta(minutes=20),
        sms_sent=1,
    )


def analytics_routes(service: Analytics) -> list[tuple[str, str]]:
    found = set()
    for route in service.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        if route.method == "HEAD" or "directory" in info or "prefix" in info:
            continue
        assert route.resource is not None
        found.add((route.method, route.resource.canonical))
    return sorted(found)


def cursor(at: str, meeting_id: str) -> str:
    return base64.urlsafe_b64encode(f"{at}|{meeting_id}".encode()).decode().rstrip("=")


async def test_reports_never_show_another_tenants_visits(analytics: Analytics) -> None:
    """Contoso's admin reads every analytics route, with Fabrikam's tenant id, integration,
    meeting cursor and every grouping and format in the query: only Contoso's figures come
    back (or a 400), never a Fabrikam department, meeting or count, nor on the metrics port;
    Fabrikam's own reports are unchanged. The analytics routes take no ids in their paths (a
    new one fails here)."""
    for v in (
        visit_of(CONTOSO_TENANT, "Contoso Cardiology"),
        visit_of(FABRIKAM_TENANT, B_DEPARTMENT),
    ):
        for event in events(v):
            await analytics.facts.apply(event)
    allocation = make_event(
        Topic.TENANT_SETTINGS, FABRIKAM_TENANT, FABRIKAM_TENANT,
        TenantSettingsV1(monthly_allocation=B_ALLOCATION, config_version=1),
    )  # fmt: skip
    await analytics.facts.apply(allocation)
    day = REPORT_DAY.date().isoformat()
    status, theirs, _ = await analytics.get(B, f"/reports/meetings?from={day}&to={day}")
    assert status == 200
    [b_meeting] = theirs["meetings"]
    b_snapshot = [
        (await analytics.get(B, f"/reports/{r}?from={day}&to={day}"))[1]
        for r in ("usage", "meetings", "allocation")
    ]
    markers = [B_DEPARTMENT, b_meeting["meeting_id"], str(B_ALLOCATION)]
    b_cursor = cursor(str(b_meeting["start_time"]), str(b_meeting["meeting_id"]))
    later_cursor = cursor((REPORT_DAY + timedelta(days=2)).isoformat(), "~")
    queries = [
        "",
        f"from={day}&to={day}",
        f"from={day}&to={day}&tenant_id={FABRIKAM_TENANT}",
        f"from={day}&to={day}&tenant={FABRIKAM_TENANT}",
        f"from={day}&to={day}&integration_id={b_meeting['meeting_id']}",
        f"from={day}&to={day}&group_by=integration",
        f"from={day}&to={day}&group_by=department",
        f"from={day}&to={day}&group_by=environment",
        f"from={day}&to={day}&format=csv",
        f"from={day}&to={day}&cursor={b_cursor}",
        f"from={day}&to={day}&cursor={later_cursor}",
        f"cursor={later_cursor}&days=7",
        f"month={day[:7]}",
        f"month={day[:7]}&tenant_id={FABRIKAM_TENANT}",
    ]
    routes = analytics_routes(analytics)
    assert [t for _, t in routes if "{" in t] == [], "sweep the new id route for other tenants"
    failures = []
    seen_own = False
    for method, template in routes:
        if (method, template) in NOT_CALLED or method != "GET":
            continue
        for query in queries:
            status, body, _ = await analytics.get(
                A,
                f"{template}?{query}",
                {"Accept": "text/html"} if template == "/dashboard" else None,
            )
            text = body if isinstance(body, str) else orjson.dumps(body).decode()
            if status not in (200, 302, 400) or any(m in text for m in markers):
                failures.append((template, query, status, text[:200]))
            seen_own = seen_own or "Contoso Cardiology" in text
    # The metrics listener ignores the query: one read covers every tenant's series.
    async with analytics.http.get(metrics_url(analytics.app)) as r:
        text = await r.text()
    if r.status != 200 or any(m in text for m in markers):
        failures.append(("metrics port /metrics", "", r.status, text[:200]))
    assert failures == []
    assert seen_own, "the control: Contoso's own visit shows in its reports"
    assert [
        (await analytics.get(B, f"/reports/{r}?from={day}&to={day}"))[1]
        for r in ("usage", "meetings", "allocation")
    ] == b_snapshot


# --- the gateway: one FHIR base configured by two tenants ---------------------------------


async def test_fhir_base_configured_by_two_tenants_is_resolved_to_neither(
    gateway: Gateway,
) -> None:
    """When another tenant's integration claims a FHIR base that is already configured (config
    allows it: bases are unique per tenant), a signed booking for that base and a launch at
    the generic launch URL are refused rather than given to either tenant; each tenant's own
    launch URL, which names its integration, still works."""
    gw = gateway
    base = gw.fhir_base(TENANT_A)
    squatter = uuid.uuid4()
    await gw.add_integration(
        "fabrikam", integration_config(gw.system.settings, squatter, base, version=1)
    )
    before = await gw.counts()
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{gw.url}/launch/provider", params={"iss": base, "launch": "x"}, allow_redirects=False
        ) as r:
            assert r.status == 403, await r.text()
        for integration_id in (gw.integrations[TENANT_A], squatter):
            async with http.get(
                f"{gw.url}/launch/provider/{integration_id}",
                params={"iss": base, "launch": "x"},
                allow_redirects=False,
            ) as r:
                assert r.status == 302, await r.text()
        event = orjson.dumps(
            {
                "event_id": str(uuid.uuid4()),
                "event": "booked",
                "tenant": TENANT_A,
                "fhir_base": base,
                "occurred_at": datetime.now(UTC).isoformat(),
                "appointment": {
                    "resourceType": "Appointment",
                    "id": "990001",
                    "status": "booked",
                    "start": (datetime.now(UTC) + timedelta(hours=2)).isoformat(),
                    "end": (datetime.now(UTC) + timedelta(hours=2, minutes=30)).isoformat(),
                    "serviceType": [{"coding": [{"code": "VIDEO_VISIT"}]}],
                },
            }
        )
        headers = {
            "Content-Type": "application/json",
            "X-EHR-Tenant": TENANT_A,
            "X-EHR-Signature": sign_webhook(SECRET_A, event, int(time.time())),
        }
        async with http.post(f"{gw.url}/ehr/scheduling", data=event, headers=headers) as r:
            assert r.status == 422, await r.text()
    after = await gw.counts()
    assert after["appointments"] == before["appointments"]
    assert after["outbox"] == before["outbox"]
    assert after["scheduling_deliveries"] == before["scheduling_deliveries"]
