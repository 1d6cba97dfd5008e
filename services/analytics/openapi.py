"""The OpenAPI 3.1 document of the analytics service's HTTP surface, served at /openapi.json:
the report API (JSON or CSV), the dashboard, portal sign-in and the operations routes."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from libs.common.openapi import (
    HTML,
    OPENAPI_PATH,
    PORTAL_SECURITY_SCHEMES,
    STR,
    obj,
    openapi_document,
    ops_paths,
    portal_auth_paths,
    query,
    redirect,
    ref,
    response,
)
from services.analytics.api import RANGES_DAYS

NUMBER_OR_NULL = {"type": ["number", "null"]}
STR_OR_NULL = {"type": ["string", "null"]}
INT = {"type": "integer"}
DATE = {"type": "string", "format": "date"}
CSV = "text/csv"


def _error(description: str) -> dict[str, Any]:
    return response(description, "application/json", ref("Error"))


def _refusals(*, bad_request: bool = True) -> dict[str, Any]:
    refusals: dict[str, Any] = {
        "302": redirect("Signed out and asking for HTML: to the sign-in"),
        "401": _error("Not signed in"),
        "403": {
            "description": "The role may not view reports",
            "content": {"application/json": {"schema": ref("Error")}, HTML: {"schema": STR}},
        },
    }
    if bad_request:
        refusals["400"] = _error("A parameter is not valid; the message names it")
    return refusals


RANGE = [
    query("from", DATE),
    query("to", DATE),
    query("days", {"type": "integer", "enum": list(RANGES_DAYS)}),
]
FORMAT = query("format", {"enum": ["json", "csv"]})
CURSOR = query("cursor", {"type": "string", "maxLength": 512})
SESSION: list[dict[str, list[str]]] = [{"session": []}]


def _report(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {"schema": ref(schema)},
            CSV: {"schema": STR},
        },
    }


PATHS: dict[str, Any] = {
    "/reports/usage": {
        "get": {
            "summary": "Usage per day, department, environment or integration, with totals",
            "security": SESSION,
            "parameters": [
                *RANGE,
                query("group_by", {"enum": ["day", "department", "environment", "integration"]}),
                FORMAT,
            ],
            "responses": {"200": _report("The report", "UsageReport"), **_refusals()},
        }
    },
    "/reports/meetings": {
        "get": {
            "summary": "The per-meeting list, newest first, paged (CSV is the whole range)",
            "security": SESSION,
            "parameters": [
                *RANGE,
                FORMAT,
                query("limit", {"type": "integer", "minimum": 1}),
                CURSOR,
            ],
            "responses": {"200": _report("One page", "MeetingsPage"), **_refusals()},
        }
    },
    "/reports/allocation": {
        "get": {
            "summary": "Completed appointments against the monthly allocation",
            "security": SESSION,
            "parameters": [query("month", {"type": "string", "pattern": r"^\d{4}-\d{2}$"})],
            "responses": {
                "200": response("The month", "application/json", ref("Allocation")),
                **_refusals(),
            },
        }
    },
    "/": {
        "get": {
            "summary": "To the dashboard",
            "security": [],
            "responses": {"302": redirect("To /dashboard")},
        }
    },
    "/dashboard": {
        "get": {
            "summary": "The usage dashboard (server-rendered, no script)",
            "security": SESSION,
            "parameters": [
                query("days", {"type": "integer", "enum": list(RANGES_DAYS)}),
                CURSOR,
            ],
            "responses": {"200": response("The dashboard", HTML), **_refusals()},
        }
    },
    **portal_auth_paths(),
    **ops_paths(),
    **OPENAPI_PATH,
}

SUMMARY = obj(
    {"count": INT, "mean": NUMBER_OR_NULL, "median": NUMBER_OR_NULL, "p90": NUMBER_OR_NULL}
)
USAGE_ROW = obj(
    {
        "group": STR,
        "appointments": INT,
        "completed": INT,
        "no_show": INT,
        "lobby_wait_s": ref("FigureSummary"),
        "duration_s": ref("FigureSummary"),
        "sms_sent": INT,
    }
)
NOT_SET = {"const": "not set"}
RESPONSE_SCHEMAS: dict[str, Any] = {
    "FigureSummary": SUMMARY,
    "UsageRow": USAGE_ROW,
    "UsageReport": obj(
        {
            "from": DATE,
            "to": DATE,
            "group_by": STR,
            "rows": {"type": "array", "items": ref("UsageRow")},
            "totals": ref("UsageRow"),
            "accuracy": STR,
        }
    ),
    "Meeting": obj(
        {
            "meeting_id": STR,
            "start_time": STR_OR_NULL,
            "lobby_wait_s": NUMBER_OR_NULL,
            "duration_s": NUMBER_OR_NULL,
            "status": STR,
            "attendees": INT,
            "department": STR_OR_NULL,
            "environment": STR_OR_NULL,
            "sms_sent": INT,
        }
    ),
    "MeetingsPage": obj(
        {
            "from": DATE,
            "to": DATE,
            "meetings": {"type": "array", "items": ref("Meeting")},
            "next_cursor": STR_OR_NULL,
        }
    ),
    "Allocation": obj(
        {
            "month": STR,
            "completed_appointments": INT,
            "monthly_allocation": {"anyOf": [INT, NOT_SET]},
            "remaining_allocation": {"anyOf": [INT, NOT_SET]},
            "exceeded_limit": {"anyOf": [{"type": "boolean"}, NOT_SET]},
            "exceeded_by": {"anyOf": [INT, NOT_SET]},
        }
    ),
}


def document() -> dict[str, Any]:
    return openapi_document(
        title="Teams EHR connector: analytics",
        description="Near-real-time usage reports for portal users. Every report needs a"
        " session of a Global Administrator, Global Reader or Reports Reader and reads only"
        " that account's organisation.",
        paths=PATHS,
        schemas=RESPONSE_SCHEMAS,
        security_schemes=PORTAL_SECURITY_SCHEMES,
        security=SESSION,
    )


async def openapi_json(_request: web.Request) -> web.Response:
    return web.json_response(document())
