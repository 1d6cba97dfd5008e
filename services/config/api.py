"""The JSON API under the portal (/api/...). Every handler is tenant-scoped by the signed-in
principal; reads need "view_config", changes need "edit_config" and the CSRF header."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from libs.common.portal_auth import Principal, require_principal, verify_csrf
from libs.common.web import whole_number
from services.config import allocation, audit, integrations, numbers, sms_consent
from services.config.context import CONTEXT, ConfigContext, Refused

M = TypeVar("M", bound=BaseModel)


def _ctx(request: web.Request) -> ConfigContext:
    return request.app[CONTEXT]


def reply(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def refusal(exc: Refused) -> web.Response:
    body: dict[str, Any] = {"error": exc.message}
    if exc.field:
        body["field"] = exc.field
    return reply(body, exc.status)


def validation_refusal(exc: ValidationError) -> Refused:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    return Refused(422, f"{field or 'body'}: {first['msg']}", field)


async def _viewer(request: web.Request) -> Principal:
    return await require_principal(request, "view_config")


async def _editor(request: web.Request) -> Principal:
    principal = await require_principal(request, "edit_config")
    verify_csrf(request, principal)
    return principal


async def _body(request: web.Request, model: type[M]) -> M:
    if request.content_type != "application/json":
        raise Refused(415, "Send the body as application/json.")
    raw = await request.read()
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Refused(400, "The body is not valid JSON.") from None
    if not isinstance(document, dict):
        raise Refused(422, "The body must be a JSON object.")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise validation_refusal(exc) from None


async def list_integrations(request: web.Request) -> web.Response:
    principal = await _viewer(request)
    items = await integrations.list_for_tenant(_ctx(request), principal.tenant_id)
    return reply({"integrations": items})


async def create_integration(request: web.Request) -> web.Response:
    principal = await _editor(request)
    data = await _body(request, integrations.IntegrationInput)
    return reply(await integrations.create(_ctx(request), principal, data), 201)


async def get_integration(request: web.Request) -> web.Response:
    principal = await _viewer(request)
    integration_id = integrations.parse_id(request.match_info["id"])
    return reply(await integrations.get(_ctx(request), principal.tenant_id, integration_id))


async def update_integration(request: web.Request) -> web.Response:
    principal = await _editor(request)
    integration_id = integrations.parse_id(request.match_info["id"])
    data = await _body(request, integrations.IntegrationInput)
    return reply(await integrations.update(_ctx(request), principal, integration_id, data))


async def delete_integration(request: web.Request) -> web.Response:
    principal = await _editor(request)
    integration_id = integrations.parse_id(request.match_info["id"])
    await integrations.remove(_ctx(request), principal, integration_id)
    return web.Response(status=204)


class EnabledInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(strict=True)


async def set_integration_enabled(request: web.Request) -> web.Response:
    principal = await _editor(request)
    integration_id = integrations.parse_id(request.match_info["id"])
    data = await _body(request, EnabledInput)
    return reply(
        await integrations.set_enabled(_ctx(request), principal, integration_id, data.enabled)
    )


async def integration_records(request: web.Request) -> web.Response:
    principal = await _viewer(request)
    integration_id = integrations.parse_id(request.match_info["id"])
    found = await integrations.get(_ctx(request), principal.tenant_id, integration_id)
    return reply({"integration_id": found["id"], "records": found["records"]})


async def get_sms(request: web.Request) -> web.Response:
    principal = await _viewer(request)
    return reply(await sms_consent.get(_ctx(request), principal.tenant_id))


async def put_sms(request: web.Request) -> web.Response:
    principal = await _editor(request)
    data = await _body(request, sms_consent.SmsInput)
    return reply(await sms_consent.save(_ctx(request), principal, data))


async def list_numbers(request: web.Request) -> web.Response:
    principal = await _viewer(request)
    return reply(
        {"phone_numbers": await numbers.list_for_tenant(_ctx(request), principal.tenant_id)}
    )


async def create_number(request: web.Request) -> web.Response:
    principal = await _editor(request)
    return reply(await numbers.start(_ctx(request), principal), 202)


async def get_number(request: web.Request) -> web.Response:
    principal = await _viewer(request)
    number_id = numbers.parse_id(request.match_info["id"])
    return reply(await numbers.get(_ctx(request), principal.tenant_id, number_id))


async def retry_number(request: web.Request) -> web.Response:
    principal = await _editor(request)
    number_id = numbers.parse_id(request.match_info["id"])
    return reply(await numbers.retry(_ctx(request), principal, number_id), 202)


async def put_number_links(request: web.Request) -> web.Response:
    principal = await _editor(request)
    number_id = numbers.parse_id(request.match_info["id"])
    data = await _body(request, numbers.LinksInput)
    return reply(await numbers.set_links(_ctx(request), principal, number_id, data))


async def get_allocation(request: web.Request) -> web.Response:
    principal = await _viewer(request)
    return reply(await allocation.get(_ctx(request), principal.tenant_id))


async def put_allocation(request: web.Request) -> web.Response:
    principal = await _editor(request)
    data = await _body(request, allocation.AllocationInput)
    return reply(await allocation.save(_ctx(request), principal, data))


def _int_query(
    request: web.Request, name: str, default: int | None, low: int, high: int
) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    value = whole_number(raw, 19)
    if value is None or not low <= value <= high:
        raise Refused(400, f"{name} must be a whole number from {low} to {high}.", name)
    return value


async def get_audit(request: web.Request) -> web.Response:
    principal = await _viewer(request)
    limit = _int_query(request, "limit", 50, 1, 500) or 50
    before = _int_query(request, "before", None, 1, 2**62)
    async with _ctx(request).pool.acquire() as conn:
        items = await audit.entries(conn, principal.tenant_id, limit=limit, before_id=before)
    return reply({"entries": items})


def add_api_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/integrations", list_integrations)
    r.add_post("/api/integrations", create_integration)
    r.add_get("/api/integrations/{id}", get_integration)
    r.add_put("/api/integrations/{id}", update_integration)
    r.add_delete("/api/integrations/{id}", delete_integration)
    r.add_put("/api/integrations/{id}/enabled", set_integration_enabled)
    r.add_get("/api/integrations/{id}/records", integration_records)
    r.add_get("/api/sms", get_sms)
    r.add_put("/api/sms", put_sms)
    r.add_get("/api/phone-numbers", list_numbers)
    r.add_post("/api/phone-numbers", create_number)
    r.add_get("/api/phone-numbers/{id}", get_number)
    r.add_post("/api/phone-numbers/{id}/retry", retry_number)
    r.add_put("/api/phone-numbers/{id}/links", put_number_links)
    r.add_get("/api/allocation", get_allocation)
    r.add_put("/api/allocation", put_allocation)
    r.add_get("/api/audit", get_audit)
