"""Shared pieces of the services' OpenAPI 3.1 documents: schema helpers, the operations
routes every service has (/healthz, /readyz; /metrics has a port of its own), the portal
sign-in routes of the portals, and the list of routes an app serves, so a test can hold a
document to its router."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel

REF_TEMPLATE = "#/components/schemas/{model}"
METHODS = frozenset({"get", "put", "post", "delete", "patch"})
STR: dict[str, Any] = {"type": "string"}
BOOL: dict[str, Any] = {"type": "boolean"}
HTML = "text/html"
TEXT = "text/plain"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """An object schema; every property required unless `required` says otherwise."""
    return {
        "type": "object",
        "properties": properties,
        "required": sorted(properties) if required is None else required,
    }


def content(media_type: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"content": {media_type: {"schema": schema if schema is not None else STR}}}


def json_body(schema_name: str) -> dict[str, Any]:
    return content("application/json", ref(schema_name))


def response(description: str, media_type: str | None = None, schema: Any = None) -> dict[str, Any]:
    if media_type is None:
        return {"description": description}
    return {"description": description, **content(media_type, schema)}


def redirect(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"Location": {"required": True, "schema": STR}},
    }


def query(name: str, schema: dict[str, Any], *, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


def path_param(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or STR}


def header(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "schema": schema or STR}


def model_schemas(models: tuple[type[BaseModel], ...]) -> dict[str, Any]:
    """Component schemas generated from the pydantic models the handlers validate with."""
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF_TEMPLATE)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": STR, "field": STR},
    "required": ["error"],
}

COMMON_SCHEMAS: dict[str, Any] = {
    "Error": ERROR_SCHEMA,
    "Health": obj({"status": {"const": "ok"}}),
    "Readiness": obj(
        {
            "status": {"enum": ["ready", "not ready"]},
            "checks": {"type": "object", "additionalProperties": STR},
        }
    ),
    "PortalSession": obj(
        {
            "tenant_id": STR,
            "upn": STR,
            "roles": {"type": "array", "items": STR},
            "csrf_token": STR,
        }
    ),
}

TOO_LARGE = response("The body is larger than the service accepts; nothing was read", TEXT)


def ops_paths() -> dict[str, Any]:
    """/healthz and /readyz, which every service serves without sign-in. /metrics is not
    here: it is served only on the metrics port (libs/common/web.py:metrics_app)."""
    no_auth: list[dict[str, list[str]]] = []
    return {
        "/healthz": {
            "get": {
                "summary": "Liveness: the process answers",
                "security": no_auth,
                "responses": {"200": response("Alive", "application/json", ref("Health"))},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: Postgres, Kafka and every consumer are working",
                "security": no_auth,
                "responses": {
                    "200": response("Ready", "application/json", ref("Readiness")),
                    "503": response("Not ready", "application/json", ref("Readiness")),
                },
            }
        },
    }


def portal_auth_paths() -> dict[str, Any]:
    """Sign-in with Microsoft Entra ID (libs/common/portal_auth.py)."""
    no_auth: list[dict[str, list[str]]] = []
    html_refusal = response("Refused; nothing changed", HTML)
    return {
        "/auth/login": {
            "get": {
                "summary": "Starts the Entra ID sign-in and redirects to Microsoft",
                "security": no_auth,
                "parameters": [
                    query("login_hint", {"type": "string", "maxLength": 256}),
                    query("return_to", STR),
                ],
                "responses": {
                    "302": redirect("To the Entra ID authorize endpoint"),
                    "400": response("login_hint is not a valid account name", TEXT),
                },
            }
        },
        "/auth/callback": {
            "get": {
                "summary": "Completes the sign-in; sets the session cookie",
                "security": no_auth,
                "parameters": [
                    query(name, STR)
                    for name in (
                        "code",
                        "state",
                        "error",
                        "error_description",
                        "session_state",
                        "client_info",
                    )
                ],
                "responses": {
                    "302": redirect("Signed in: to the page the sign-in started from"),
                    "400": html_refusal,
                    "403": response("Signed in, but without an admin role", HTML),
                },
            }
        },
        "/auth/logout": {
            "post": {
                "summary": "Ends the session (CSRF token in the form or X-CSRF-Token)",
                "security": [{"session": [], "csrf": []}],
                "requestBody": {
                    "required": False,
                    **content(
                        "application/x-www-form-urlencoded",
                        {"type": "object", "properties": {"csrf_token": STR}},
                    ),
                },
                "responses": {
                    "302": redirect("Signed out: to the start page"),
                    "401": response("Not signed in", "application/json", ref("Error")),
                    "403": response(
                        "CSRF token missing or wrong", "application/json", ref("Error")
                    ),
                    "413": TOO_LARGE,
                },
            }
        },
        "/auth/session": {
            "get": {
                "summary": "Who is signed in, and the CSRF token scripts send in X-CSRF-Token",
                "responses": {
                    "200": response("Signed in", "application/json", ref("PortalSession")),
                    "401": response("Not signed in", "application/json", ref("Error")),
                },
            }
        },
    }


PORTAL_SECURITY_SCHEMES = {
    "session": {"type": "apiKey", "in": "cookie", "name": "portal_session"},
    "csrf": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token"},
}


def openapi_document(
    *,
    title: str,
    description: str,
    paths: dict[str, Any],
    schemas: dict[str, Any],
    security_schemes: dict[str, Any] | None = None,
    security: list[dict[str, list[str]]] | None = None,
) -> dict[str, Any]:
    components: dict[str, Any] = {"schemas": {**COMMON_SCHEMAS, **schemas}}
    if security_schemes:
        components["securitySchemes"] = security_schemes
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1.0.0", "description": description},
        "paths": paths,
        "components": components,
    }
    if security is not None:
        doc["security"] = security
    return doc


def served_routes(app: web.Application) -> set[tuple[str, str]]:
    """(path template, method) of every route the app's router serves, static files aside."""
    return {
        (resource.canonical, route.method.lower())
        for resource in app.router.resources()
        if not isinstance(resource, web.StaticResource)
        for route in resource
        if route.method.lower() in METHODS
    }


def documented_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in doc["paths"].items()
        for method in item
        if method in METHODS
    }


OPENAPI_PATH = {
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "security": [],
            "responses": {"200": response("OpenAPI 3.1", "application/json", {"type": "object"})},
        }
    }
}
