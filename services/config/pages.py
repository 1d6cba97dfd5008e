"""The server-rendered portal: one page per wizard step, forms that post back and redirect
(so a reload never re-submits), and the same domain functions the API uses."""

from __future__ import annotations

from typing import Any

import aiohttp_jinja2
from aiohttp import web
from multidict import MultiDictProxy
from pydantic import ValidationError

from libs.common.portal_auth import Principal, current_principal, require_principal, verify_csrf
from libs.common.web import read_form, whole_number
from services.config import allocation, audit, integrations, numbers, sms_consent
from services.config.api import validation_refusal
from services.config.context import CONTEXT, ConfigContext, Refused

NOTICES = {
    "integration-added": "FHIR base URL added; its SMART configuration was read.",
    "integration-saved": "Changes saved.",
    "integration-enabled": "FHIR base URL enabled.",
    "integration-disabled": "FHIR base URL disabled; launches from it are refused.",
    "integration-removed": "FHIR base URL removed.",
    "sms-saved": "SMS settings saved.",
    "number-started": "Creating a phone number. This takes up to about two minutes.",
    "number-retried": "Trying again to create the phone number.",
    "links-saved": "Links saved.",
    "allocation-saved": "Monthly allocation saved.",
}
ROLE_LABELS = {
    "global_admin": "Global Administrator",
    "global_reader": "Global Reader",
    "reports_reader": "Reports Reader",
}


def _ctx(request: web.Request) -> ConfigContext:
    return request.app[CONTEXT]


def render(
    request: web.Request,
    template: str,
    principal: Principal | None,
    nav: str,
    status: int = 200,
    **values: Any,
) -> web.Response:
    context: dict[str, Any] = {
        "principal": principal,
        "can_edit": bool(principal and principal.can("edit_config")),
        "role_label": ", ".join(ROLE_LABELS.get(r, r) for r in sorted(principal.roles))
        if principal
        else "",
        "nav": nav,
        "notice": NOTICES.get(request.query.get("done", "")),
        **values,
    }
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    response.headers["Cache-Control"] = "no-store"
    return response


async def _viewer(request: web.Request) -> Principal:
    return await require_principal(request, "view_config")


async def _form(request: web.Request) -> tuple[Principal, MultiDictProxy[Any]]:
    principal = await require_principal(request, "edit_config")
    form = await read_form(request)
    verify_csrf(request, principal, form.get("csrf_token"))
    return principal, form


def _text(form: MultiDictProxy[Any], name: str) -> str:
    value = form.get(name, "")
    return value if isinstance(value, str) else ""


def _done(location: str, notice: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"{location}?done={notice}")


async def home(request: web.Request) -> web.Response:
    principal = await current_principal(request)
    if principal is None or not principal.can("view_config"):
        return render(request, "home.html", principal, "home")
    ctx = _ctx(request)
    items = await integrations.list_for_tenant(ctx, principal.tenant_id)
    found = await numbers.list_for_tenant(ctx, principal.tenant_id)
    return render(
        request, "home.html", principal, "home",
        integrations=items,
        sms=await sms_consent.get(ctx, principal.tenant_id),
        active_numbers=[n for n in found if n["status"] == "active"],
        linked=sum(1 for i in items if i["phone_number_id"]),
    )  # fmt: skip


def _integration_input(form: MultiDictProxy[Any]) -> dict[str, Any]:
    names = (
        "fhir_base_url", "environment", "smart_client_id", "client_auth_method", "client_secret",
        "private_key", "pkce_mode", "teams_organizer_id", "department", "organisation_name",
    )  # fmt: skip
    values: dict[str, Any] = {name: _text(form, name) for name in names}
    values["enabled"] = _text(form, "enabled") == "on"
    return values


def _redisplay(values: dict[str, Any]) -> dict[str, Any]:
    # A refused form comes back filled in, except for secrets, which are never echoed.
    return {k: v for k, v in values.items() if k not in ("client_secret", "private_key")}


async def fhir_urls(request: web.Request) -> web.Response:
    principal = await _viewer(request)
    items = await integrations.list_for_tenant(_ctx(request), principal.tenant_id)
    return render(request, "fhir_urls.html", principal, "fhir", integrations=items, form={})


async def add_fhir_url(request: web.Request) -> web.Response:
    principal, form = await _form(request)
    values = _integration_input(form)
    try:
        data = integrations.IntegrationInput.model_validate(values)
        created = await integrations.create(_ctx(request), principal, data)
    except (Refused, ValidationError) as exc:
        refused = exc if isinstance(exc, Refused) else validation_refusal(exc)
        items = await integrations.list_for_tenant(_ctx(request), principal.tenant_id)
        return render(
            request, "fhir_urls.html", principal, "fhir", status=refused.status,
            integrations=items, form=_redisplay(values), error=refused.message,
        )  # fmt: skip
    raise _done(f"/fhir-urls/{created['id']}", "integration-added")


async def fhir_url(request: web.Request) -> web.Response:
    principal = await _viewer(request)
    integration_id = integrations.parse_id(request.match_info["id"])
    found = await integrations.get(_ctx(request), principal.tenant_id, integration_id)
    return render(request, "integration.html", principal, "fhir", integration=found, form=found)


async def save_fhir_url(request: web.Request) -> web.Response:
    principal, form = await _form(request)
    ctx = _ctx(request)
    integration_id = integrations.parse_id(request.match_info["id"])
    current = await integrations.get(ctx, principal.tenant_id, integration_id)
    values = _integration_input(form)
    try:
        data = integrations.IntegrationInput.model_validate(values)
        await integrations.update(ctx, principal, integration_id, data)
    except (Refused, ValidationError) as exc:
        refused = exc if isinstance(exc, Refused) else validation_refusal(exc)
        shown = {**current, **_redisplay(values)}
        return render(
            request, "integration.html", principal, "fhir", status=refused.status,
            integration=current, form=shown, error=refused.message,
        )  # fmt: skip
    raise _done(f"/fhir-urls/{integration_id}", "integration-saved")


async def toggle_fhir_url(request: web.Request) -> web.Response:
    principal, form = await _form(request)
    integration_id = integrations.parse_id(request.match_info["id"])
    enabled = _text(form, "enabled") == "on"
    await integrations.set_enabled(_ctx(request), principal, integration_id, enabled)
    raise _done(
        f"/fhir-urls/{integration_id}", "integration-enabled" if enabled else "integration-disabled"
    )


async def remove_fhir_url(request: web.Request) -> web.Response:
    principal, _ = await _form(request)
    integration_id = integrations.parse_id(request.match_info["id"])
    await integrations.remove(_ctx(request), principal, integration_id)
    raise _done("/fhir-urls", "integration-removed")


async def sms_page(request: web.Request) -> web.Response:
    principal = await _viewer(request)
    sms = await sms_consent.get(_ctx(request), principal.tenant_id)
    return render(request, "sms.html", principal, "sms", sms=sms)


async def save_sms(request: web.Request) -> web.Response:
    principal, form = await _form(request)
    data = sms_consent.SmsInput(
        enabled=_text(form, "enabled") == "on",
        vendor_may_send_sms=_text(form, "vendor_may_send_sms") == "on",
        organisation_has_patient_consent=_text(form, "organisation_has_patient_consent") == "on",
    )
    try:
        await sms_consent.save(_ctx(request), principal, data)
    except Refused as exc:
        sms = await sms_consent.get(_ctx(request), principal.tenant_id)
        return render(
            request, "sms.html", principal, "sms", status=exc.status, sms=sms, error=exc.message
        )
    raise _done("/sms", "sms-saved")


async def numbers_page(request: web.Request) -> web.Response:
    principal = await _viewer(request)
    ctx = _ctx(request)
    found = await numbers.list_for_tenant(ctx, principal.tenant_id)
    return render(
        request, "numbers.html", principal, "numbers",
        numbers=found,
        busy=any(n["status"] in ("searching", "purchasing") for n in found),
        integrations=await integrations.list_for_tenant(ctx, principal.tenant_id),
    )  # fmt: skip


async def create_number(request: web.Request) -> web.Response:
    principal, _ = await _form(request)
    await numbers.start(_ctx(request), principal)
    raise _done("/phone-numbers", "number-started")


async def retry_number(request: web.Request) -> web.Response:
    principal, _ = await _form(request)
    await numbers.retry(_ctx(request), principal, numbers.parse_id(request.match_info["id"]))
    raise _done("/phone-numbers", "number-retried")


async def save_links(request: web.Request) -> web.Response:
    principal, form = await _form(request)
    try:
        data = numbers.LinksInput.model_validate(
            {
                "integration_ids": [
                    v for v in form.getall("integration_id", []) if isinstance(v, str)
                ]
            }
        )
    except ValidationError as exc:
        raise validation_refusal(exc) from None
    await numbers.set_links(
        _ctx(request), principal, numbers.parse_id(request.match_info["id"]), data
    )
    raise web.HTTPSeeOther("/phone-numbers?done=links-saved#links")


async def records_page(request: web.Request) -> web.Response:
    principal = await _viewer(request)
    ctx = _ctx(request)
    items = await integrations.list_for_tenant(ctx, principal.tenant_id)
    by_id = {
        n["id"]: n["phone_number"] for n in await numbers.list_for_tenant(ctx, principal.tenant_id)
    }
    for item in items:
        item["phone_number"] = by_id.get(item["phone_number_id"] or "")
    return render(request, "records.html", principal, "records", integrations=items)


async def allocation_page(request: web.Request) -> web.Response:
    principal = await _viewer(request)
    found = await allocation.get(_ctx(request), principal.tenant_id)
    return render(request, "allocation.html", principal, "allocation", allocation=found)


async def save_allocation(request: web.Request) -> web.Response:
    principal, form = await _form(request)
    raw = _text(form, "monthly_allocation").strip()
    try:
        count = whole_number(raw, 9)
        if count is None:
            raise Refused(422, "Enter a whole number of appointments (0 or more).")
        data = allocation.AllocationInput(monthly_allocation=count)
    except (Refused, ValidationError) as exc:
        refused = exc if isinstance(exc, Refused) else validation_refusal(exc)
        found = await allocation.get(_ctx(request), principal.tenant_id)
        return render(
            request, "allocation.html", principal, "allocation", status=refused.status,
            allocation=found, error=refused.message,
        )  # fmt: skip
    await allocation.save(_ctx(request), principal, data)
    raise _done("/allocation", "allocation-saved")


async def audit_page(request: web.Request) -> web.Response:
    principal = await _viewer(request)
    raw = request.query.get("before", "")
    before = whole_number(raw, 18)
    async with _ctx(request).pool.acquire() as conn:
        entries = await audit.entries(conn, principal.tenant_id, limit=50, before_id=before)
    next_before = entries[-1]["id"] if len(entries) == 50 else None
    return render(
        request, "audit.html", principal, "audit", entries=entries, next_before=next_before
    )


def add_page_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", home)
    r.add_get("/fhir-urls", fhir_urls)
    r.add_post("/fhir-urls", add_fhir_url)
    r.add_get("/fhir-urls/{id}", fhir_url)
    r.add_post("/fhir-urls/{id}", save_fhir_url)
    r.add_post("/fhir-urls/{id}/enabled", toggle_fhir_url)
    r.add_post("/fhir-urls/{id}/remove", remove_fhir_url)
    r.add_get("/sms", sms_page)
    r.add_post("/sms", save_sms)
    r.add_get("/phone-numbers", numbers_page)
    r.add_post("/phone-numbers", create_number)
    r.add_post("/phone-numbers/{id}/retry", retry_number)
    r.add_post("/phone-numbers/{id}/links", save_links)
    r.add_get("/records", records_page)
    r.add_get("/allocation", allocation_page)
    r.add_post("/allocation", save_allocation)
    r.add_get("/audit", audit_page)
