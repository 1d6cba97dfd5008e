"""The OpenAPI 3.1 document of the config API, served at /openapi.json. Request bodies come
from the pydantic models the handlers validate with, so the document cannot drift from them."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel

from services.config.allocation import AllocationInput
from services.config.api import EnabledInput
from services.config.integrations import IntegrationInput
from services.config.numbers import LinksInput
from services.config.sms_consent import SmsInput

REF = "#/components/schemas/{model}"
_STR = {"type": "string"}
_NULL_STR = {"type": ["string", "null"]}
_BOOL = {"type": "boolean"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": sorted(properties)}


RESPONSE_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "properties": {"error": _STR, "field": _STR},
        "required": ["error"],
    },
    "IntegrationRecord": _object({"key": _STR, "label": _STR, "value": _STR, "where": _STR}),
    "Integration": _object(
        {
            "id": {"type": "string", "format": "uuid"},
            "fhir_base_url": _STR,
            "environment": {"enum": ["test", "production"]},
            "enabled": _BOOL,
            "smart_client_id": _STR,
            "client_auth_method": {"enum": ["client_secret_basic", "private_key_jwt"]},
            "client_secret_set": _BOOL,
            "private_key_set": _BOOL,
            "pkce_mode": {"enum": ["required", "if_supported", "off"]},
            "teams_organizer_id": _STR,
            "department": _STR,
            "organisation_name": _STR,
            "phone_number_id": _NULL_STR,
            "config_version": {"type": "integer"},
            "smart_configuration": {"type": ["object", "null"]},
            "smart_checked_at": _NULL_STR,
            "records": {"type": "array", "items": _ref("IntegrationRecord")},
        }
    ),
    "IntegrationList": _object({"integrations": {"type": "array", "items": _ref("Integration")}}),
    "IntegrationRecords": _object(
        {"integration_id": _STR, "records": {"type": "array", "items": _ref("IntegrationRecord")}}
    ),
    "Sms": _object(
        {
            "enabled": _BOOL,
            "vendor_may_send_sms": _BOOL,
            "vendor_consent_by": _NULL_STR,
            "vendor_consent_at": _NULL_STR,
            "organisation_has_patient_consent": _BOOL,
            "patient_consent_by": _NULL_STR,
            "patient_consent_at": _NULL_STR,
        }
    ),
    "PhoneNumber": _object(
        {
            "id": _STR,
            "phone_number": _NULL_STR,
            "status": {"enum": ["searching", "purchasing", "active", "failed"]},
            "step": _STR,
            "progress_percent": {"type": "integer", "minimum": 0, "maximum": 100},
            "progress_text": _STR,
            "error": _NULL_STR,
            "linked_integration_ids": {"type": "array", "items": _STR},
            "created_at": _STR,
        }
    ),
    "PhoneNumberList": _object({"phone_numbers": {"type": "array", "items": _ref("PhoneNumber")}}),
    "Allocation": _object(
        {"monthly_allocation": {"type": ["integer", "null"]}, "config_version": {"type": "integer"}}
    ),
    "AuditEntry": _object(
        {
            "id": {"type": "integer"},
            "at": _STR,
            "actor_oid": _STR,
            "actor_upn": _STR,
            "action": _STR,
            "entity_type": _STR,
            "entity_id": _STR,
            "before": {"type": ["object", "null"]},
            "after": {"type": ["object", "null"]},
        }
    ),
    "AuditLog": _object({"entries": {"type": "array", "items": _ref("AuditEntry")}}),
}

REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    IntegrationInput,
    EnabledInput,
    SmsInput,
    LinksInput,
    AllocationInput,
)


def _json(schema: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ref(schema)}}}


def _op(
    summary: str,
    ok: tuple[int, str | None],
    *,
    body: str | None = None,
    changes: bool = False,
    id_param: bool = False,
    extra_errors: tuple[int, ...] = (),
) -> dict[str, Any]:
    status, schema = ok
    responses: dict[str, Any] = {
        str(status): {"description": "OK", **(_json(schema) if schema else {})},
        "401": {"description": "Not signed in", **_json("Error")},
        "403": {
            "description": "Role lacks the permission, or the CSRF token is missing",
            **_json("Error"),
        },
    }
    codes = set(extra_errors)
    if id_param:
        codes.add(404)
    if body:
        codes |= {400, 413, 415, 422}
    for code in sorted(codes):
        responses[str(code)] = {"description": "Refused; nothing changed", **_json("Error")}
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if changes:
        operation["security"] = [{"session": [], "csrf": []}]
    if body:
        operation["requestBody"] = {"required": True, **_json(body)}
    if id_param:
        operation["parameters"] = [
            {
                "name": "id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "format": "uuid"},
            }
        ]
    return operation


PATHS: dict[str, Any] = {
    "/api/integrations": {
        "get": _op("List the tenant's FHIR base URLs", (200, "IntegrationList")),
        "post": _op(
            "Add a FHIR base URL (checked, and its SMART configuration read)",
            (201, "Integration"),
            body="IntegrationInput",
            changes=True,
            extra_errors=(409,),
        ),
    },
    "/api/integrations/{id}": {
        "get": _op("One FHIR base URL", (200, "Integration"), id_param=True),
        "put": _op(
            "Replace a FHIR base URL's settings; omitted secrets are kept",
            (200, "Integration"),
            body="IntegrationInput",
            changes=True,
            id_param=True,
            extra_errors=(409,),
        ),
        "delete": _op("Remove a FHIR base URL", (204, None), changes=True, id_param=True),
    },
    "/api/integrations/{id}/enabled": {
        "put": _op(
            "Enable or disable a FHIR base URL (no SMART check, so it works when the EHR is down)",
            (200, "Integration"),
            body="EnabledInput",
            changes=True,
            id_param=True,
        ),
    },
    "/api/integrations/{id}/records": {
        "get": _op(
            "The integration records to paste into Cerner",
            (200, "IntegrationRecords"),
            id_param=True,
        ),
    },
    "/api/sms": {
        "get": _op("SMS state and consents", (200, "Sms")),
        "put": _op("Set SMS and the two consents", (200, "Sms"), body="SmsInput", changes=True),
    },
    "/api/phone-numbers": {
        "get": _op("The tenant's phone numbers and provisioning jobs", (200, "PhoneNumberList")),
        "post": _op(
            "Start creating a phone number (long-running)",
            (202, "PhoneNumber"),
            changes=True,
            extra_errors=(409,),
        ),
    },
    "/api/phone-numbers/{id}": {
        "get": _op("A phone number, or its job's progress", (200, "PhoneNumber"), id_param=True),
    },
    "/api/phone-numbers/{id}/retry": {
        "post": _op(
            "Retry a failed phone-number job",
            (202, "PhoneNumber"),
            changes=True,
            id_param=True,
            extra_errors=(409,),
        ),
    },
    "/api/phone-numbers/{id}/links": {
        "put": _op(
            "Set exactly which FHIR base URLs send from this number",
            (200, "PhoneNumber"),
            body="LinksInput",
            changes=True,
            id_param=True,
            extra_errors=(409,),
        ),
    },
    "/api/allocation": {
        "get": _op("The monthly allocation of completed appointments", (200, "Allocation")),
        "put": _op(
            "Set the monthly allocation", (200, "Allocation"), body="AllocationInput", changes=True
        ),
    },
    "/api/audit": {
        "get": {
            **_op("The audit log, newest first", (200, "AuditLog"), extra_errors=(400,)),
            "parameters": [
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                },
                {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 1}},
            ],
        },
    },
}


def document() -> dict[str, Any]:
    schemas: dict[str, Any] = dict(RESPONSE_SCHEMAS)
    for model in REQUEST_MODELS:
        schema = model.model_json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Teams EHR connector: configuration API",
            "version": "1.0.0",
            "description": "Tenant-scoped by the signed-in Microsoft 365 account. Reads need a"
            " Global Administrator or Global Reader session; changes need a Global"
            " Administrator session and the session's CSRF token (from /auth/session) in"
            " the X-CSRF-Token header.",
        },
        "paths": PATHS,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "cookie", "name": "portal_session"},
                "csrf": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token"},
            },
        },
        "security": [{"session": []}],
    }


async def openapi_json(_request: web.Request) -> web.Response:
    return web.json_response(document())
