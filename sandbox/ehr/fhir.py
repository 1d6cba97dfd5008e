"""FHIR R4 REST under <base> = /r4/<tenant>: metadata, read, search, and Appointment PATCH."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from sandbox.ehr import data as d
from sandbox.ehr.app_keys import DISPATCHER, SANDBOX
from sandbox.ehr.fhir_search import SearchError, search_appointments, search_generic
from sandbox.ehr.oauth import FHIR_TYPES, tenant_or_404
from sandbox.ehr.scheduling import bump_version, notify
from sandbox.ehr.state import Grant, Sandbox, TenantState

FHIR_JSON = "application/fhir+json"
SMART_OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


class FhirError(Exception):
    def __init__(self, status: int, code: str, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics


def fhir_response(
    body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type=FHIR_JSON,
        charset="utf-8",
        headers=headers,
    )


def outcome(status: int, code: str, diagnostics: str, tenant: TenantState | None) -> web.Response:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }
    headers = None
    if status == 401 and tenant is not None:
        headers = {
            "WWW-Authenticate": f'Bearer realm="{tenant.fhir_base}", error="invalid_token", '
            f'error_description="{diagnostics}"'
        }
    return fhir_response(body, status, headers)


def authorize_request(
    request: web.Request, tenant: TenantState, rtype: str, write: bool = False
) -> Grant:
    sandbox: Sandbox = request.app[SANDBOX]
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() != "bearer ":
        raise FhirError(401, "security", "a bearer access token is required")
    grant = tenant.access_tokens.get(auth[7:].strip())
    if grant is None:
        raise FhirError(401, "security", "access token is not valid for this FHIR server")
    if grant.expires_at <= sandbox.clock():
        raise FhirError(401, "security", "access token has expired")
    needed = [f"user/{rtype}.read"] + ([f"user/{rtype}.write"] if write else [])
    missing = [s for s in needed if s not in grant.scopes]
    if missing and not (not write and patient_compartment(grant, rtype)):
        raise FhirError(403, "forbidden", f"access token lacks scope {' '.join(missing)}")
    return grant


def patient_compartment(grant: Grant, rtype: str) -> str | None:
    """The patient a token is confined to for `rtype`: a `patient/<Type>.read` scope without
    the `user/` one reads only the launch patient's own compartment. None: not confined."""
    if f"user/{rtype}.read" in grant.scopes or f"patient/{rtype}.read" not in grant.scopes:
        return None
    return grant.launch.patient


def in_compartment(res: d.Resource, patient: str) -> bool:
    rtype = res.get("resourceType")
    if rtype == "Patient":
        return bool(res.get("id") == patient)
    if rtype == "Appointment":
        return d.participant_id(res, "Patient") == patient
    if rtype == "Encounter":
        return bool(res.get("subject", {}).get("reference") == f"Patient/{patient}")
    return False


def _check_compartment_search(rtype: str, q: Any, patient: str) -> None:
    """Like Cerner, a patient token searching another patient's records is forbidden."""
    named = {
        v.strip().removeprefix("Patient/")
        for name in ("patient", "subject")
        for raw in q.getall(name, [])
        for v in raw.split(",")
        if v.strip()
    }
    if named - {patient}:
        raise FhirError(403, "forbidden", f"{rtype} search outside the patient in context")


def capability_statement(tenant: TenantState) -> dict[str, Any]:
    search_params: dict[str, list[str]] = {
        "Appointment": ["_id", "patient", "practitioner", "location", "date", "status"],
        "Encounter": ["_id", "patient", "subject"],
        "Patient": ["_id", "name", "family"],
        "Practitioner": ["_id", "name"],
        "Location": ["_id", "name"],
    }
    resources = []
    for rtype in FHIR_TYPES:
        interactions = [{"code": "read"}, {"code": "search-type"}]
        if rtype == "Appointment":
            interactions.append({"code": "patch"})
        resources.append(
            {
                "type": rtype,
                "interaction": interactions,
                "searchParam": [{"name": n, "type": "string"} for n in search_params[rtype]],
            }
        )
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-01-01",
        "publisher": "EHR video-visit connector sandbox (Cerner stand-in)",
        "kind": "instance",
        "software": {"name": "sandbox.ehr", "version": "1"},
        "implementation": {"description": tenant.spec.name, "url": tenant.fhir_base},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "extension": [
                        {
                            "url": SMART_OAUTH_URIS,
                            "extension": [
                                {"url": "token", "valueUri": tenant.token_url},
                                {"url": "authorize", "valueUri": tenant.authorize_url},
                            ],
                        }
                    ],
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ],
                            "text": "OAuth2 using SMART-on-FHIR profile",
                        }
                    ],
                },
                "resource": resources,
            }
        ],
    }


async def metadata_handler(request: web.Request) -> web.Response:
    return fhir_response(capability_statement(tenant_or_404(request)))


def _etag(res: d.Resource) -> str:
    return f'W/"{res["meta"]["versionId"]}"'


async def read_handler(request: web.Request) -> web.Response:
    tenant = tenant_or_404(request)
    rtype, rid = request.match_info["rtype"], request.match_info["id"]
    try:
        if rtype not in FHIR_TYPES:
            raise FhirError(404, "not-supported", f"resource type {rtype} is not supported")
        grant = authorize_request(request, tenant, rtype)
        res = tenant.data.get(rtype, rid)
        if res is None:
            raise FhirError(404, "not-found", f"{rtype}/{rid} not found")
        patient = patient_compartment(grant, rtype)
        if patient is not None and not in_compartment(res, patient):
            raise FhirError(403, "forbidden", f"{rtype}/{rid} is not the patient in context")
    except FhirError as err:
        return outcome(err.status, err.code, err.diagnostics, tenant)
    return fhir_response(res, headers={"ETag": _etag(res)})


async def search_handler(request: web.Request) -> web.Response:
    tenant = tenant_or_404(request)
    rtype = request.match_info["rtype"]
    try:
        if rtype not in FHIR_TYPES:
            raise FhirError(404, "not-supported", f"resource type {rtype} is not supported")
        grant = authorize_request(request, tenant, rtype)
        q = request.query
        patient = patient_compartment(grant, rtype)
        if patient is not None:
            _check_compartment_search(rtype, q, patient)
        if rtype == "Appointment":
            found = search_appointments(q, tenant.data)
        else:
            found = search_generic(rtype, q, tenant.data)
        if patient is not None:
            found = [r for r in found if in_compartment(r, patient)]
    except FhirError as err:
        return outcome(err.status, err.code, err.diagnostics, tenant)
    except SearchError as err:
        return outcome(400, "invalid", str(err), tenant)
    count = int(q["_count"]) if q.get("_count", "").isdigit() else None
    page = found[:count] if count else found
    self_url = f"{tenant.fhir_base}/{rtype}"
    if request.query_string:
        self_url += f"?{request.query_string}"
    bundle = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "searchset",
        "total": len(found),
        "link": [{"relation": "self", "url": self_url}],
        "entry": [
            {
                "fullUrl": f"{tenant.fhir_base}/{rtype}/{r['id']}",
                "resource": r,
                "search": {"mode": "match"},
            }
            for r in page
        ],
    }
    return fhir_response(bundle)


# --- PATCH (Cerner video-visit links, status) -------------------------------------------------

_LINK_PATHS = {
    "/contained/0/telecom/0/value",
    "/contained/1/telecom/0/value",
    "/contained/0/telecom/0/period/start",
    "/contained/0/telecom/0/period/end",
}
_LINK_NAMES = ("Provider video visit link", "Patient video visit link")


def _link_container(index: int) -> d.Resource:
    return {
        "resourceType": "Location",
        "id": f"video-visit-{'provider' if index == 0 else 'patient'}",
        "name": _LINK_NAMES[index],
        "mode": "instance",
        "physicalType": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/location-physical-type",
                    "code": "vi",
                    "display": "Virtual",
                }
            ]
        },
        "telecom": [{"system": "url"}],
    }


def apply_patch(appt: d.Resource, ops: list[dict[str, Any]]) -> d.Resource:
    """Apply the subset of JSON Patch Cerner supports on Appointment; raise FhirError."""
    kinds = {op.get("op") for op in ops}
    if not ops or not kinds <= {"add", "replace"}:
        raise FhirError(422, "invalid", "only add and replace operations are supported")
    link_kinds = {op.get("op") for op in ops if op.get("path") in _LINK_PATHS}
    if link_kinds == {"add", "replace"}:
        raise FhirError(422, "invalid", "mixing add and replace on video visit links is refused")
    new = copy.deepcopy(appt)
    has_links = bool(appt.get("contained"))
    for op in ops:
        path, value = op.get("path"), op.get("value")
        if not isinstance(path, str) or "value" not in op:
            raise FhirError(422, "invalid", "each operation needs a path and a value")
        if path == "/status":
            if op["op"] != "replace" or value not in (
                "booked",
                "arrived",
                "checked-in",
                "fulfilled",
                "cancelled",
            ):
                raise FhirError(422, "invalid", f"unsupported status change to {value!r}")
            new["status"] = value
        elif path in _LINK_PATHS:
            if not d.is_video_visit(appt):
                raise FhirError(422, "business-rule", "appointment is not a video visit")
            if op["op"] == "add" and has_links:
                raise FhirError(409, "conflict", "video visit links already exist; use replace")
            if op["op"] == "replace" and not has_links:
                raise FhirError(422, "invalid", "no video visit links to replace; use add")
            if not isinstance(value, str):
                raise FhirError(422, "invalid", f"{path} needs a string value")
            idx = int(path.split("/")[2])
            contained = new.setdefault("contained", [_link_container(0), _link_container(1)])
            telecom = contained[idx]["telecom"][0]
            leaf = path.split("/telecom/0/", 1)[1]
            if leaf == "value":
                telecom["value"] = value
            else:
                telecom.setdefault("period", {})[leaf.split("/")[1]] = value
        else:
            raise FhirError(422, "not-supported", f"patching {path} is not supported")
    return new


async def patch_handler(request: web.Request) -> web.Response:
    tenant = tenant_or_404(request)
    sandbox: Sandbox = request.app[SANDBOX]
    rid = request.match_info["id"]
    try:
        authorize_request(request, tenant, "Appointment", write=True)
        appt = tenant.data.get("Appointment", rid)
        if appt is None:
            raise FhirError(404, "not-found", f"Appointment/{rid} not found")
        if request.content_type != "application/json-patch+json":
            raise FhirError(
                415, "not-supported", "Content-Type must be application/json-patch+json"
            )
        if_match = request.headers.get("If-Match")
        if not if_match:
            raise FhirError(412, "conflict", "If-Match header is required")
        if if_match.strip() != _etag(appt):
            raise FhirError(409, "conflict", f"version mismatch: current is {_etag(appt)}")
        try:
            ops = await request.json()
        except ValueError as exc:
            raise FhirError(400, "structure", "body is not valid JSON") from exc
        if not isinstance(ops, list) or not all(isinstance(o, dict) for o in ops):
            raise FhirError(400, "structure", "body must be a JSON Patch array")
        new = apply_patch(appt, ops)
    except FhirError as err:
        return outcome(err.status, err.code, err.diagnostics, tenant)
    cancelled = appt["status"] != "cancelled" and new["status"] == "cancelled"
    appt.clear()
    appt.update(new)
    now = datetime.fromtimestamp(sandbox.clock(), UTC)
    bump_version(appt, now)
    if cancelled:
        notify(sandbox, request.app[DISPATCHER], tenant, "cancelled", appt)
    headers = {"ETag": _etag(appt)}
    if request.headers.get("Prefer", "") == "return=representation":
        return fhir_response(appt, headers=headers)
    return web.Response(status=200, headers=headers)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/r4/{tenant}/metadata", metadata_handler),
        web.get(r"/r4/{tenant}/{rtype:[A-Z][A-Za-z]+}", search_handler),
        web.get(r"/r4/{tenant}/{rtype:[A-Z][A-Za-z]+}/{id}", read_handler),
        web.patch("/r4/{tenant}/Appointment/{id}", patch_handler),
    ]
