"""Admin/control API for tests and demos, under /_sandbox (JSON, no auth: bind to 127.0.0.1)."""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from sandbox.ehr import scheduling
from sandbox.ehr.app_keys import DISPATCHER, SANDBOX
from sandbox.ehr.data import is_video_visit, participant_id
from sandbox.ehr.oauth import add_query, tenant_or_404
from sandbox.ehr.settings import ClientSpec
from sandbox.ehr.state import Sandbox, TenantState

M = TypeVar("M", bound=BaseModel)


class TenantSettingsUpdate(BaseModel):
    launch_url: str | None = None
    patient_launch_url: str | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None


class LaunchRequest(BaseModel):
    practitioner: str | None = None
    patient: str | None = None
    encounter: str | None = None
    appointment: str | None = None  # shortcut: take all three from this appointment
    # "patient": a patient-portal launch for the patient themself (patient context only).
    persona: Literal["provider", "patient"] = "provider"


_ERRORS: dict[int, type[web.HTTPClientError]] = {
    400: web.HTTPBadRequest,
    404: web.HTTPNotFound,
    409: web.HTTPConflict,
    422: web.HTTPUnprocessableEntity,
}


def _json_error(message: str, status: int) -> web.HTTPClientError:
    body = json.dumps({"error": message})
    return _ERRORS.get(status, web.HTTPBadRequest)(text=body, content_type="application/json")


async def parse(request: web.Request, model: type[M]) -> M:
    try:
        raw = await request.json()
    except ValueError:
        raise _json_error("body must be JSON", 400) from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _json_error(json.dumps(exc.errors(include_url=False), default=str), 422) from None


def tenant_summary(tenant: TenantState) -> dict[str, Any]:
    spec = tenant.spec
    return {
        "guid": tenant.guid,
        "name": spec.name,
        "fhir_base": tenant.fhir_base,
        "smart_configuration": f"{tenant.fhir_base}/.well-known/smart-configuration",
        "authorize_endpoint": tenant.authorize_url,
        "patient_authorize_endpoint": tenant.patient_authorize_url,
        "token_endpoint": tenant.token_url,
        "jwks_uri": tenant.jwks_url,
        "launch_url": spec.launch_url,
        "patient_launch_url": spec.patient_launch_url,
        "webhook_url": spec.webhook_url,
        "webhook_secret_set": bool(spec.webhook_secret),
        "clients": sorted(tenant.clients),
    }


async def list_tenants(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    return web.json_response({"tenants": [tenant_summary(t) for t in sandbox.tenants.values()]})


async def update_tenant(request: web.Request) -> web.Response:
    tenant = tenant_or_404(request)
    update = await parse(request, TenantSettingsUpdate)
    for name in update.model_fields_set:
        setattr(tenant.spec, name, getattr(update, name))
    return web.json_response(tenant_summary(tenant))


async def register_client(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    client = await parse(request, ClientSpec)
    if client.auth_method == "client_secret_basic" and not client.client_secret:
        raise _json_error("client_secret_basic needs client_secret", 422)
    if client.auth_method == "private_key_jwt" and not (client.jwks or client.public_key_pem):
        raise _json_error("private_key_jwt needs jwks or public_key_pem", 422)
    try:
        tenants = sandbox.register_client(client)
    except KeyError as exc:
        raise _json_error(str(exc), 404) from None
    return web.json_response({"client_id": client.client_id, "tenants": tenants}, status=201)


def directory(tenant: TenantState) -> dict[str, Any]:
    res = tenant.data.resources

    def names(rtype: str) -> list[dict[str, str]]:
        out = []
        for r in res[rtype].values():
            name = r["name"] if rtype == "Location" else r["name"][0]["text"]
            out.append({"id": r["id"], "name": name})
        return out

    return {
        "practitioners": names("Practitioner"),
        "patients": names("Patient"),
        "locations": names("Location"),
    }


async def get_directory(request: web.Request) -> web.Response:
    return web.json_response(directory(tenant_or_404(request)))


def appointment_row(tenant: TenantState, appt: dict[str, Any]) -> dict[str, Any]:
    enc = tenant.data.encounter_for(appt["id"])
    return {
        "id": appt["id"],
        "status": appt["status"],
        "start": appt["start"],
        "end": appt["end"],
        "video": is_video_visit(appt),
        "patient": participant_id(appt, "Patient"),
        "practitioner": participant_id(appt, "Practitioner"),
        "location": participant_id(appt, "Location"),
        "encounter": enc["id"] if enc else None,
        "version": appt["meta"]["versionId"],
    }


async def list_appointments(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX]
    tenant = tenant_or_404(request)
    appts = scheduling.todays_appointments(sandbox, tenant)
    return web.json_response({"appointments": [appointment_row(tenant, a) for a in appts]})


def mint_launch_for(sandbox: Sandbox, tenant: TenantState, req: LaunchRequest) -> dict[str, Any]:
    if req.persona == "patient":
        return _patient_launch(sandbox, tenant, req)
    practitioner, patient, encounter = req.practitioner, req.patient, req.encounter
    if req.appointment:
        appt = tenant.data.get("Appointment", req.appointment)
        if appt is None:
            raise _json_error(f"Appointment/{req.appointment} not found", 404)
        enc = tenant.data.encounter_for(appt["id"])
        practitioner = practitioner or participant_id(appt, "Practitioner")
        patient = patient or participant_id(appt, "Patient")
        encounter = encounter or (enc["id"] if enc else None)
    if not practitioner or tenant.data.get("Practitioner", practitioner) is None:
        raise _json_error("a known practitioner is required", 422)
    if patient and tenant.data.get("Patient", patient) is None:
        raise _json_error(f"Patient/{patient} not found", 404)
    if encounter and tenant.data.get("Encounter", encounter) is None:
        raise _json_error(f"Encounter/{encounter} not found", 404)
    settings = sandbox.settings
    launch = tenant.mint_launch(
        practitioner,
        patient,
        encounter,
        sandbox.clock(),
        settings.launch_ttl,
        settings.launch_id_style,
    )
    body: dict[str, Any] = {
        "launch": launch.launch_id,
        "iss": tenant.fhir_base,
        "persona": "provider",
        "practitioner": practitioner,
        "patient": patient,
        "encounter": encounter,
        "expires_at": launch.expires_at,
        "launch_url": None,
    }
    if tenant.spec.launch_url:
        body["launch_url"] = add_query(
            tenant.spec.launch_url, {"iss": tenant.fhir_base, "launch": launch.launch_id}
        )
    return body


def _patient_launch(sandbox: Sandbox, tenant: TenantState, req: LaunchRequest) -> dict[str, Any]:
    """A patient-portal launch: the patient in context is the user; no practitioner and no
    encounter (the portal knows neither)."""
    patient = req.patient
    if req.appointment:
        appt = tenant.data.get("Appointment", req.appointment)
        if appt is None:
            raise _json_error(f"Appointment/{req.appointment} not found", 404)
        patient = patient or participant_id(appt, "Patient")
    if not patient or tenant.data.get("Patient", patient) is None:
        raise _json_error("a known patient is required for a patient launch", 422)
    settings = sandbox.settings
    launch = tenant.mint_launch(
        None,
        patient,
        None,
        sandbox.clock(),
        settings.launch_ttl,
        settings.launch_id_style,
        persona="patient",
    )
    body: dict[str, Any] = {
        "launch": launch.launch_id,
        "iss": tenant.fhir_base,
        "persona": "patient",
        "patient": patient,
        "expires_at": launch.expires_at,
        "launch_url": None,
    }
    if tenant.spec.patient_launch_url:
        body["launch_url"] = add_query(
            tenant.spec.patient_launch_url, {"iss": tenant.fhir_base, "launch": launch.launch_id}
        )
    return body


async def mint_launch(request: web.Request) -> web.Response:
    tenant = tenant_or_404(request)
    req = await parse(request, LaunchRequest)
    return web.json_response(mint_launch_for(request.app[SANDBOX], tenant, req), status=201)


async def book(request: web.Request) -> web.Response:
    tenant = tenant_or_404(request)
    req = await parse(request, scheduling.BookRequest)
    try:
        appt = scheduling.book(request.app[SANDBOX], request.app[DISPATCHER], tenant, req)
    except scheduling.SchedulingError as err:
        raise _json_error(err.message, err.status) from None
    return web.json_response(appt, status=201)


async def reschedule(request: web.Request) -> web.Response:
    tenant = tenant_or_404(request)
    req = await parse(request, scheduling.RescheduleRequest)
    try:
        appt = scheduling.reschedule(
            request.app[SANDBOX], request.app[DISPATCHER], tenant, request.match_info["id"], req
        )
    except scheduling.SchedulingError as err:
        raise _json_error(err.message, err.status) from None
    return web.json_response(appt)


async def cancel(request: web.Request) -> web.Response:
    tenant = tenant_or_404(request)
    req = (
        await parse(request, scheduling.CancelRequest)
        if request.can_read_body
        else scheduling.CancelRequest()
    )
    try:
        appt = scheduling.cancel(
            request.app[SANDBOX], request.app[DISPATCHER], tenant, request.match_info["id"], req
        )
    except scheduling.SchedulingError as err:
        raise _json_error(err.message, err.status) from None
    return web.json_response(appt)


async def deliveries(request: web.Request) -> web.Response:
    tenant = tenant_or_404(request)
    return web.json_response({"deliveries": [x.as_json() for x in tenant.deliveries]})


def routes() -> list[web.RouteDef]:
    t = "/_sandbox/tenants/{tenant}"
    return [
        web.get("/_sandbox/tenants", list_tenants),
        web.patch(t, update_tenant),
        web.post("/_sandbox/clients", register_client),
        web.get(f"{t}/directory", get_directory),
        web.get(f"{t}/appointments", list_appointments),
        web.post(f"{t}/appointments", book),
        web.post(f"{t}/appointments/{{id}}/reschedule", reschedule),
        web.post(f"{t}/appointments/{{id}}/cancel", cancel),
        web.post(f"{t}/launches", mint_launch),
        web.get(f"{t}/webhooks/deliveries", deliveries),
    ]
