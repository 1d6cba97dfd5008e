"""The OpenAPI 3.1 document of the launch gateway's HTTP surface, served at /openapi.json:
the SMART launch pages, the clinician's visit pages, the patient's join link, the signed
scheduling feed and Graph's change notifications. Webhook bodies come from the pydantic
models the handlers validate with, so the document cannot drift from them."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from libs.common.openapi import (
    HTML,
    OPENAPI_PATH,
    STR,
    TEXT,
    TOO_LARGE,
    content,
    header,
    json_body,
    model_schemas,
    obj,
    openapi_document,
    ops_paths,
    path_param,
    query,
    redirect,
    ref,
    response,
)
from services.launch.notifications import Notifications
from services.launch.scheduling import SchedulingEvent

FORM = "application/x-www-form-urlencoded"
NO_AUTH: list[dict[str, list[str]]] = []
SESSION: list[dict[str, list[str]]] = [{"provider_session": []}]


def _page(description: str) -> dict[str, Any]:
    return response(description, HTML)


def _json(description: str, schema: str = "Error") -> dict[str, Any]:
    return response(description, "application/json", ref(schema))


LAUNCH_PARAMETERS = [
    query("iss", {"type": "string", "minLength": 1, "maxLength": 2048}, required=True),
    query("launch", {"type": "string", "minLength": 1, "maxLength": 1024}, required=True),
]
LAUNCH_RESPONSES = {
    "302": redirect("To the EHR's authorize endpoint"),
    "400": {
        "description": "iss or launch missing, repeated or too long (a request line over 8 KiB"
        " is refused by the HTTP parser, in plain text)",
        "content": {HTML: {"schema": STR}, TEXT: {"schema": STR}},
    },
    "403": _page("iss is not a configured FHIR base URL; nothing was requested from it"),
    "502": _page("The EHR's SMART configuration could not be read"),
}
INTEGRATION = path_param("integration_id", {"type": "string", "format": "uuid"})


def _launch(summary: str, *, integration: bool) -> dict[str, Any]:
    responses = dict(LAUNCH_RESPONSES)
    if integration:
        responses["404"] = _page("Not an integration id")
    return {
        "get": {
            "summary": summary,
            "security": NO_AUTH,
            "parameters": [*([INTEGRATION] if integration else []), *LAUNCH_PARAMETERS],
            "responses": responses,
        }
    }


def _form(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "required": True,
        **content(FORM, {"type": "object", "properties": properties}),
    }


SIGNED_OUT = _page("No provider session, or it has ended")
JOIN_TOKEN = path_param("token", {"type": "string", "maxLength": 512})

PATHS: dict[str, Any] = {
    "/launch/provider": _launch(
        "Provider EHR launch (PowerChart); iss is checked before any outbound request",
        integration=False,
    ),
    "/launch/provider/{integration_id}": _launch(
        "Provider EHR launch for one integration; iss must be that integration's FHIR base",
        integration=True,
    ),
    "/launch/patient/{integration_id}": _launch(
        "Patient launch from the patient portal (Cerner patient persona)", integration=True
    ),
    "/launch/callback": {
        "get": {
            "summary": "The SMART redirect: single-use state, code exchange, id_token check",
            "security": NO_AUTH,
            "parameters": [
                query("state", {"type": "string", "maxLength": 256}),
                query("code", {"type": "string", "maxLength": 4096}),
                query("error", STR),
                query("error_description", STR),
            ],
            "responses": {
                "302": redirect("Provider: to the visit page or the visit chooser"),
                "303": redirect("Patient: to the visit's join link"),
                "400": {
                    "description": "Unknown, reused or expired state, or the EHR refused the"
                    " sign-in (a request line over 8 KiB is refused by the HTTP parser)",
                    "content": {HTML: {"schema": STR}, TEXT: {"schema": STR}},
                },
                "403": _page("The integration is no longer configured"),
                "404": _page("No video visit found"),
                "410": _page("The visit was cancelled"),
                "502": _page("The EHR could not be read"),
                "503": _page("The meeting could not be prepared; try again"),
            },
        }
    },
    "/visit": {
        "get": {
            "summary": "The clinician's visit page",
            "security": SESSION,
            "parameters": [query("sent", STR)],
            "responses": {
                "200": _page("The visit"),
                "401": SIGNED_OUT,
                "404": _page("The visit is gone"),
            },
        }
    },
    "/visit/choose": {
        "get": {
            "summary": "Choose among several video visits of the launched patient",
            "security": SESSION,
            "responses": {
                "200": _page("The choices"),
                "302": redirect("Already chosen: to the visit page"),
                "401": SIGNED_OUT,
            },
        },
        "post": {
            "summary": "Choose one of the listed visits",
            "security": SESSION,
            "requestBody": _form({"csrf_token": STR, "appointment": STR}),
            "responses": {
                "303": redirect("To the visit page"),
                "400": _page("Not one of the listed visits"),
                "401": SIGNED_OUT,
                "403": _page("The form's CSRF token is missing or wrong"),
                "404": _page("The appointment is gone"),
                "413": TOO_LARGE,
                "502": _page("The EHR could not be read"),
                "503": _page("The meeting could not be prepared; try again"),
            },
        },
    },
    "/visit/send-link": {
        "post": {
            "summary": "Ask notify (through sms-requested) to text the join link to the patient",
            "security": SESSION,
            "requestBody": _form({"csrf_token": STR}),
            "responses": {
                "303": redirect("Back to the visit page"),
                "401": SIGNED_OUT,
                "403": _page("The form's CSRF token is missing or wrong"),
                "413": TOO_LARGE,
            },
        }
    },
    "/visit/roster": {
        "get": {
            "summary": "The live roster (server-sent events)",
            "security": SESSION,
            "responses": {
                "200": response("Roster snapshots as they change", "text/event-stream"),
                "401": response("No provider session", TEXT),
            },
        }
    },
    "/join/{token}": {
        "get": {
            "summary": "The patient's pre-join page (from the SMS link); records lobby arrival",
            "security": NO_AUTH,
            "parameters": [JOIN_TOKEN],
            "responses": {
                "200": _page("The pre-join page"),
                "404": _page("Not a valid link"),
                "410": _page("The visit is over or was cancelled"),
            },
        }
    },
    "/join/{token}/enter": {
        "get": {
            "summary": "Join: to the meeting's browser-join URL",
            "security": NO_AUTH,
            "parameters": [JOIN_TOKEN],
            "responses": {
                "303": redirect("To the meeting"),
                "404": _page("Not a valid link"),
                "410": _page("The visit is over or was cancelled"),
                "503": _page("The meeting is not ready yet"),
            },
        }
    },
    "/ehr/scheduling": {
        "post": {
            "summary": "The EHR's signed scheduling feed (docs/ehr-scheduling.md)",
            "security": [{"scheduling_signature": []}],
            "parameters": [
                header("X-EHR-Tenant", {"type": "string", "maxLength": 64}),
                header("X-EHR-Event-Id"),
            ],
            "requestBody": {"required": True, **json_body("SchedulingEvent")},
            "responses": {
                "200": _json("Applied, ignored or a duplicate", "SchedulingOutcome"),
                "401": _json("Missing, stale or wrong X-EHR-Signature"),
                "413": TOO_LARGE,
                "422": _json("Not a valid event, or for an unconfigured FHIR base"),
            },
        }
    },
    "/graph/notifications": {
        "post": {
            "summary": "Graph change notifications for meeting call events",
            "description": "With ?validationToken= this is Graph's subscription handshake.",
            "security": NO_AUTH,
            "parameters": [query("validationToken", {"type": "string", "maxLength": 1024})],
            "requestBody": {"required": False, **json_body("Notifications")},
            "responses": {
                "200": response("The validation token, echoed", TEXT),
                "202": response("Accepted"),
                "400": {
                    "description": "Not a change notification, or the token is too long",
                    "content": {
                        "application/json": {"schema": ref("Error")},
                        TEXT: {"schema": STR},
                    },
                },
                "403": _json("Unknown subscription or wrong clientState"),
                "413": TOO_LARGE,
            },
        }
    },
    **ops_paths(),
    **OPENAPI_PATH,
}

RESPONSE_SCHEMAS: dict[str, Any] = {
    "SchedulingOutcome": obj({"status": STR, "appointment_key": STR}, required=["status"]),
}


def document() -> dict[str, Any]:
    return openapi_document(
        title="Teams EHR connector: launch gateway",
        description="SMART on FHIR launches from Cerner, the clinician's visit pages, the"
        " patient's join link, and the webhooks of the EHR and Microsoft Graph.",
        paths=PATHS,
        schemas={**RESPONSE_SCHEMAS, **model_schemas((SchedulingEvent, Notifications))},
        security_schemes={
            "provider_session": {"type": "apiKey", "in": "cookie", "name": "provider_session"},
            "scheduling_signature": {
                "type": "apiKey",
                "in": "header",
                "name": "X-EHR-Signature",
                "description": "t=<unix time>,v1=<hex HMAC-SHA256 of '<t>.' + body>",
            },
        },
    )


async def openapi_json(_request: web.Request) -> web.Response:
    return web.json_response(document())
