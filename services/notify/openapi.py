"""The OpenAPI 3.1 document of the notify service's HTTP surface, served at /openapi.json:
the Event Grid webhook for ACS SMS events and the operations routes. The event envelope comes
from the pydantic model the handler validates with, so the document cannot drift from it."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from libs.common.openapi import (
    OPENAPI_PATH,
    STR,
    TOO_LARGE,
    model_schemas,
    obj,
    openapi_document,
    ops_paths,
    ref,
    response,
)
from services.notify.webhooks import (
    DELIVERY_REPORT,
    MAX_EVENTS,
    RECEIVED,
    VALIDATION,
    DeliveryReportData,
    EventGridEvent,
    SmsReceivedData,
    ValidationData,
)


def _json(description: str, schema: str = "WebhookError") -> dict[str, Any]:
    return response(description, "application/json", ref(schema))


PATHS: dict[str, Any] = {
    "/acs/events": {
        "post": {
            "summary": "Event Grid deliveries of ACS SMS events: inbound SMS (STOP/START),"
            " delivery reports and the subscription validation handshake",
            "description": "A delivery is applied whole or not at all.",
            "security": [{"event_grid_code": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "array",
                            "items": ref("EventGridEvent"),
                            "minItems": 1,
                            "maxItems": MAX_EVENTS,
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "Applied, or the validation handshake answered",
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [ref("Accepted"), ref("ValidationResponse")],
                            }
                        }
                    },
                },
                "400": _json("Not a valid delivery; names the fields, never their values"),
                "401": _json("The code query parameter is missing or wrong"),
                "413": TOO_LARGE,
                "415": _json("Not application/json"),
            },
        }
    },
    **ops_paths(),
    **OPENAPI_PATH,
}

RESPONSE_SCHEMAS: dict[str, Any] = {
    "WebhookError": {
        "type": "object",
        "properties": {
            "error": STR,
            "problems": {
                "type": "array",
                "items": obj({"field": STR, "problem": STR}),
            },
        },
        "required": ["error"],
    },
    "Accepted": obj({"accepted": {"type": "integer", "minimum": 1}}),
    "ValidationResponse": obj({"validationResponse": STR}),
}


def _schemas() -> dict[str, Any]:
    schemas = model_schemas((EventGridEvent, SmsReceivedData, DeliveryReportData, ValidationData))
    # The envelope's data is one of these by eventType; other event types are ignored.
    schemas["EventGridEvent"]["properties"]["data"] = {
        "description": f"{RECEIVED}: SmsReceivedData; {DELIVERY_REPORT}: DeliveryReportData;"
        f" {VALIDATION}: ValidationData; anything else is ignored.",
        "anyOf": [
            ref("SmsReceivedData"),
            ref("DeliveryReportData"),
            ref("ValidationData"),
            {"type": "object"},
        ],
    }
    return schemas


def document() -> dict[str, Any]:
    return openapi_document(
        title="Teams EHR connector: notify (SMS)",
        description="Receives ACS SMS events from Event Grid. Event Grid authenticates with"
        " the secret in the subscription's endpoint URL (the code query parameter).",
        paths=PATHS,
        schemas={**RESPONSE_SCHEMAS, **_schemas()},
        security_schemes={
            "event_grid_code": {"type": "apiKey", "in": "query", "name": "code"},
        },
    )


async def openapi_json(_request: web.Request) -> web.Response:
    return web.json_response(document())
