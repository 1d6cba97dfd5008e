"""Fuzzing a really-running service with schemathesis against its OpenAPI document.

The service runs on the test's event loop on a real port, with real Kafka and Postgres; the
generated requests are sent from a worker thread (schemathesis and hypothesis are
synchronous), so the loop keeps serving while the fuzzer waits for each answer. Every answer
is checked against the document, and every log line the service wrote while answering is
checked for errors: an unhandled exception is a bug even when the client saw a 4xx.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import hypothesis
import hypothesis.errors
import pytest
import requests
import requests.auth
import schemathesis
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from libs.common.events import AppointmentCreatedV1, decode_event
from libs.common.openapi import COMMON_SCHEMAS, OPENAPI_PATH, ops_paths, portal_auth_paths
from libs.common.portal_auth import SESSION_COOKIE
from libs.common.web import DB_POOL
from sandbox.ehr import TENANT_A, RunningEhr
from sandbox.microsoft.app import RunningSandbox
from services.analytics import app as analytics_app
from services.analytics import openapi as analytics_openapi
from services.config import app as config_app
from services.config import openapi as config_openapi
from services.launch import openapi as launch_openapi
from services.launch.sessions import PROVIDER_COOKIE
from services.notify import app as notify_app
from services.notify import openapi as notify_openapi
from services.notify.settings import NotifySettings
from services.notify.webhooks import DELIVERY_REPORT, RECEIVED, VALIDATION
from tests.launch.test_visit_end_to_end import book_video_visit, launch_from_ehr
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem, scheduling_headers
from tests.support.portal import PortalSession, allow_redirect_uri, portal_session
from tests.support.service_settings import analytics_test_settings, config_test_settings

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
REQUEST_TIMEOUT_S = 15
ERROR_LEVELS = frozenset({"error", "critical", "exception"})

# What a signed-in call adds to a generated case: requests keyword arguments (cookies,
# headers, params, auth). It may also edit the case (for example to sign its body).
AnyCase = Case[Any]
SignIn = Callable[[AnyCase], dict[str, Any]]


class LogWatch:
    """Error-level log lines from structlog and from the standard library (aiohttp's
    'Error handling request', asyncio's 'Task exception was never retrieved'), in order."""

    def __init__(self) -> None:
        self.structlog_events: list[MutableMapping[str, Any]] = []
        self.records: list[logging.LogRecord] = []

    def mark(self) -> tuple[int, int]:
        """Where the logs are now, for errors(since=...)."""
        return len(self.structlog_events), len(self.records)

    def errors(self, since: tuple[int, int] = (0, 0)) -> list[str]:
        events, records = since
        found = [
            f"structlog {e.get('log_level')}: {e.get('event')} "
            + str({k: v for k, v in e.items() if k not in ("event", "log_level", "exception")})
            + (f"\n{e['exception']}" if e.get("exception") else "")
            for e in self.structlog_events[events:]
            if e.get("log_level") in ERROR_LEVELS or e.get("exception")
        ]
        found += [
            f"{r.name} {r.levelname}: {r.getMessage()}\n{r.exc_text or ''}"
            for r in self.records[records:]
        ]
        return found


# aiohttp logs a handler's escaped exception, asyncio a task's; aiokafka's errors are the
# broker's (a new topic's leader moving), not the service's.
STDLIB_LOGGERS = ("aiohttp", "asyncio")


class _Collect(logging.Handler):
    def __init__(self, watch: LogWatch) -> None:
        super().__init__(logging.ERROR)
        self._watch = watch

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            return  # a malformed HTTP message, answered 400 by aiohttp's parser
        if record.name.split(".")[0] in STDLIB_LOGGERS:
            self.format(record)
            self._watch.records.append(record)


@contextmanager
def watching_logs() -> Iterator[LogWatch]:
    """Captures every structlog event and every stdlib record at ERROR or above."""
    watch = LogWatch()
    handler = _Collect(watch)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with structlog.testing.capture_logs(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.format_exc_info,
            ]
        ) as events:
            watch.structlog_events = events
            yield watch
    finally:
        root.removeHandler(handler)


@dataclass
class Target:
    """A running service and how to sign in to it."""

    name: str
    url: str
    document: dict[str, Any]
    app: web.Application
    sign_in: SignIn | None = None
    # The signed-in session's cookies and headers, and other values the fixture set up
    # (a real subscription id, a clientState, a CSRF token), for hand-written requests.
    cookies: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    known: dict[str, str] = field(default_factory=dict)
    # Operation labels ("GET /visit/roster") not fuzzed signed in, with the reason.
    signed_in_skips: dict[str, str] = field(default_factory=dict)
    # Real values for path parameters by path template, used for half the signed-in cases.
    path_values: dict[str, dict[str, str]] = field(default_factory=dict)
    # At most this many examples per mode for operations whose every request is heavy work.
    caps: dict[str, int] = field(default_factory=dict)


@dataclass
class Budget:
    """Examples per operation. Signed out, most operations refuse before reading anything;
    signed in, valid data goes deepest, and invalid data mostly stops at parsing."""

    signed_out: int = 3
    positive: int = 20
    negative: int = 10

    def examples(self, mode: GenerationMode, signed_in: bool) -> int:
        if not signed_in:
            return self.signed_out
        return self.positive if mode == GenerationMode.POSITIVE else self.negative


@dataclass
class Finding:
    operation: str
    mode: str
    signed_in: bool
    error: str

    def __str__(self) -> str:
        who = "signed in" if self.signed_in else "signed out"
        return f"--- {self.operation} ({self.mode}, {who})\n{self.error}"


def _strategy(
    operation: Any, mode: GenerationMode, path_values: dict[str, dict[str, str]]
) -> st.SearchStrategy[AnyCase]:
    generated: st.SearchStrategy[AnyCase] = operation.as_strategy(generation_mode=mode)
    fixed = path_values.get(operation.path)
    if not fixed:
        return generated
    return st.one_of(generated, operation.as_strategy(generation_mode=mode, path_parameters=fixed))


def _run_operation(
    target: Target,
    operation: Any,
    mode: GenerationMode,
    signed_in: bool,
    examples: int,
    logs: LogWatch,
) -> Finding | None:
    http = requests.Session()
    path_values = target.path_values if signed_in else {}

    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        report_multiple_bugs=False,
        print_blob=False,
    )
    @hypothesis.given(case=_strategy(operation, mode, path_values))
    def run(case: AnyCase) -> None:
        extra = target.sign_in(case) if signed_in and target.sign_in else {}
        before = logs.mark()
        response = case.call(base_url=target.url, session=http, timeout=REQUEST_TIMEOUT_S, **extra)
        new = logs.errors(since=before)
        try:
            case.validate_response(response, checks=CHECKS)
        except BaseExceptionGroup as exc:
            if new:
                exc.add_note("The service logged:\n" + "\n".join(new))
            raise
        assert not new, (
            f"the service logged an error answering {response.status_code}:\n"
            + "\n".join(new)
            + f"\n\nReproduce with:\n    {case.as_curl_command()}"
        )

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        return None  # nothing to vary: an operation without inputs has no invalid data
    except (Exception, BaseExceptionGroup) as exc:  # every failure is reported, then the test fails
        notes = "\n".join(getattr(exc, "__notes__", []))
        error = f"{type(exc).__name__}: {exc}\n{notes}"
        return Finding(operation.label, mode.value, signed_in, error)
    finally:
        http.close()
    return None


def fuzz_blocking(
    target: Target, *, signed_in: bool, budget: Budget, logs: LogWatch
) -> list[Finding]:
    """Every operation of the document, positive and negative data; the findings."""
    schema = schemathesis.openapi.from_dict(target.document)
    findings: list[Finding] = []
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operations.append(result.ok())

    # Deletions last, so the real ids the other operations use still exist for them.
    def deletes(operation: Any) -> bool:
        return bool(operation.method.upper() == "DELETE" or operation.path.endswith("/remove"))

    for operation in sorted(operations, key=deletes):
        if signed_in and operation.label in target.signed_in_skips:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            examples = min(
                budget.examples(mode, signed_in), target.caps.get(operation.label, 10**6)
            )
            finding = _run_operation(target, operation, mode, signed_in, examples, logs)
            if finding is not None:
                findings.append(finding)
    return findings


async def fuzz(target: Target, *, signed_in: bool, budget: Budget, logs: LogWatch) -> list[Finding]:
    """Runs the fuzzer in a worker thread while this loop serves the target."""
    return await asyncio.to_thread(
        fuzz_blocking, target, signed_in=signed_in, budget=budget, logs=logs
    )


def report(findings: list[Finding]) -> str:
    return f"{len(findings)} finding(s):\n" + "\n\n".join(map(str, findings))


# -- the services under fuzz, each signed in as a real user would be ---------------------------

CONTOSO_ADMIN = "admin@contosohealth.onmicrosoft.com"
ACS_WEBHOOK_SECRET = "acs-webhook-secret-for-fuzzing"
Serve = Callable[[web.Application], AbstractAsyncContextManager[str]]


def portal_sign_in(session: PortalSession) -> SignIn:
    """The portal's session cookie and CSRF header, as the portal's own script sends them."""

    def sign_in(_case: AnyCase) -> dict[str, Any]:
        return {
            "cookies": {SESSION_COOKIE: session.cookie},
            "headers": {"X-CSRF-Token": session.csrf_token},
        }

    return sign_in


def _page_form(properties: dict[str, Any]) -> dict[str, Any]:
    form = {"type": "object", "properties": {"csrf_token": {"type": "string"}, **properties}}
    return {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": form}}}


def config_pages() -> dict[str, Any]:
    """The portal's server-rendered pages and their forms, for fuzzing only: any answer but
    a 5xx (and an error log) is acceptable, so responses are left open."""
    text = {"type": "string"}
    on = {"enum": ["on", ""]}
    uuid_id = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    answer = {"default": {"description": "A page, a redirect or a refusal"}}

    def op(body: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        operation: dict[str, Any] = {"responses": answer, **extra}
        if body is not None:
            operation["requestBody"] = _page_form(body)
        return operation

    integration = {
        name: text
        for name in (
            "fhir_base_url", "environment", "smart_client_id", "client_auth_method",
            "client_secret", "private_key", "pkce_mode", "teams_organizer_id", "department",
            "organisation_name",
        )
    } | {"enabled": on}  # fmt: skip
    return {
        "/": {"get": op(parameters=[{"name": "done", "in": "query", "schema": text}])},
        "/fhir-urls": {"get": op(), "post": op(integration)},
        "/fhir-urls/{id}": {
            "get": op(parameters=uuid_id),
            "post": op(integration, parameters=uuid_id),
        },
        "/fhir-urls/{id}/enabled": {"post": op({"enabled": on}, parameters=uuid_id)},
        "/fhir-urls/{id}/remove": {"post": op({}, parameters=uuid_id)},
        "/sms": {
            "get": op(),
            "post": op(
                {"enabled": on, "vendor_may_send_sms": on, "organisation_has_patient_consent": on}
            ),
        },
        "/phone-numbers": {"get": op(), "post": op({})},
        "/phone-numbers/{id}/retry": {"post": op({}, parameters=uuid_id)},
        "/phone-numbers/{id}/links": {
            "post": op({"integration_id": {"type": "array", "items": text}}, parameters=uuid_id)
        },
        "/records": {"get": op()},
        "/allocation": {"get": op(), "post": op({"monthly_allocation": text})},
        "/audit": {"get": op(parameters=[{"name": "before", "in": "query", "schema": text}])},
    }


def config_document() -> dict[str, Any]:
    """The config API's own document plus the routes every portal has and its pages."""
    doc = copy.deepcopy(config_openapi.document())
    doc["paths"].update({**portal_auth_paths(), **ops_paths(), **OPENAPI_PATH, **config_pages()})
    doc["components"]["schemas"].update(COMMON_SCHEMAS)
    return doc


@pytest.fixture
async def config_target(
    make_settings: Callable[..., Any],
    serve: Serve,
    microsoft: RunningSandbox,
    microsoft_http: aiohttp.ClientSession,
    ehr: RunningEhr,
    ca_bundle: str,
) -> AsyncIterator[Target]:
    """The config service signed in as Contoso's Global Administrator, with one real FHIR
    base URL and one phone number whose ids the fuzzer uses for half its cases."""
    settings = config_test_settings(make_settings, microsoft, ca_bundle)
    await allow_redirect_uri(microsoft_http, microsoft, settings.redirect_uri)
    app = config_app.create_app(settings)
    async with serve(app) as url:
        session = await portal_session(microsoft_http, url, CONTOSO_ADMIN)
        integration = {
            "fhir_base_url": ehr.fhir_base(TENANT_A),
            "environment": "test",
            "smart_client_id": "teams-connector",
            "client_secret": "s3cret-from-code-console",
            "teams_organizer_id": "dr.lee@contosohealth.onmicrosoft.com",
            "organisation_name": "Contoso Health",
        }
        async with microsoft_http.post(
            f"{url}/api/integrations", json=integration, headers=session.headers()
        ) as r:
            assert r.status == 201, await r.text()
            integration_id = (await r.json())["id"]
        async with microsoft_http.post(f"{url}/api/phone-numbers", headers=session.headers()) as r:
            assert r.status == 202, await r.text()
            number_id = (await r.json())["id"]
        doc = config_document()
        path_values = {
            path: {"id": number_id if "/phone-numbers/" in path else integration_id}
            for path in doc["paths"]
            if "{id}" in path
        }
        yield Target(
            "config",
            url,
            doc,
            app,
            sign_in=portal_sign_in(session),
            cookies={SESSION_COOKIE: session.cookie},
            headers={"X-CSRF-Token": session.csrf_token},
            # Signing out would end the session the rest of the run uses.
            signed_in_skips={"POST /auth/logout": "ends the session"},
            path_values=path_values,
            # The pages render the same domain calls the API makes: fewer examples there.
            caps={
                f"{method.upper()} {path}": 8
                for path, item in config_pages().items()
                for method in item
            },
        )


@pytest.fixture
async def analytics_target(
    make_settings: Callable[..., Any],
    serve: Serve,
    microsoft: RunningSandbox,
    microsoft_http: aiohttp.ClientSession,
    ca_bundle: str,
) -> AsyncIterator[Target]:
    """The analytics service signed in as Contoso's Global Administrator."""
    settings = analytics_test_settings(make_settings, microsoft, ca_bundle)
    await allow_redirect_uri(microsoft_http, microsoft, settings.redirect_uri)
    app = analytics_app.create_app(settings)
    async with serve(app) as url:
        session = await portal_session(microsoft_http, url, CONTOSO_ADMIN)
        yield Target(
            "analytics",
            url,
            analytics_openapi.document(),
            app,
            sign_in=portal_sign_in(session),
            cookies={SESSION_COOKIE: session.cookie},
            headers={"X-CSRF-Token": session.csrf_token},
            signed_in_skips={"POST /auth/logout": "ends the session"},
        )


def _event_type_for(data: object) -> str | None:
    """The ACS event type whose data model a generated `data` object was drawn from."""
    if not isinstance(data, dict):
        return None
    if "DeliveryStatus" in data:
        return DELIVERY_REPORT
    if "Message" in data:
        return RECEIVED
    if "validationCode" in data:
        return VALIDATION
    return None


def notify_sign_in(case: AnyCase) -> dict[str, Any]:
    """Event Grid's secret in the URL; each event's type made to match its data, so the
    generated data reaches the data models instead of being ignored as an unknown type."""
    case.query = {**(case.query or {}), "code": ACS_WEBHOOK_SECRET}
    if isinstance(case.body, list):
        for event in case.body:
            if isinstance(event, dict) and (kind := _event_type_for(event.get("data"))):
                event["eventType"] = kind
    return {}


@pytest.fixture
async def notify_target(
    make_settings: Callable[..., Any],
    serve: Serve,
    microsoft: RunningSandbox,
    ca_bundle: str,
) -> AsyncIterator[Target]:
    """The notify service; signed in means knowing Event Grid's webhook secret."""
    settings: NotifySettings = make_settings(
        NotifySettings,
        acs_endpoint=microsoft.base_url,
        tls_ca_bundle=ca_bundle,
        acs_webhook_secret=ACS_WEBHOOK_SECRET,
        purge_interval_s=3600,
    )
    app = notify_app.create_app(settings)
    async with serve(app) as url:
        yield Target(
            "notify",
            url,
            notify_openapi.document(),
            app,
            sign_in=notify_sign_in,
            known={"code": ACS_WEBHOOK_SECRET},
        )


class _SignScheduling(requests.auth.AuthBase):
    """Signs the scheduling feed's body exactly as sent, as the EHR does."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        body = r.body or b""
        raw = body.encode() if isinstance(body, str) else body
        assert isinstance(raw, bytes)
        r.headers.update(scheduling_headers(raw))
        return r


def launch_sign_in(
    system: LaunchSystem, provider_cookie: str, csrf_token: str, subscription: tuple[str, str]
) -> SignIn:
    """The clinician's session cookie and form token; the EHR's signature and tenant on the
    scheduling feed (booked video visits of the configured FHIR base); Graph's subscription
    id and clientState on change notifications."""
    signer = _SignScheduling()

    def sign_in(case: AnyCase) -> dict[str, Any]:
        extra: dict[str, Any] = {"cookies": {PROVIDER_COOKIE: provider_cookie}}
        body = case.body
        if case.path in ("/visit/choose", "/visit/send-link") and isinstance(body, dict):
            body.setdefault("csrf_token", csrf_token)  # a generated one is tried as it is
        elif case.path == "/ehr/scheduling":
            extra["auth"] = signer
            if isinstance(body, dict):
                body["tenant"], body["fhir_base"] = TENANT_A, system.fhir_base
                appointment = body.get("appointment")
                if isinstance(appointment, dict) and not (
                    isinstance(appointment.get("start"), str)
                    and isinstance(appointment.get("end"), str)
                ):
                    # Generated times are kept when both are there; otherwise a real slot,
                    # so the booking goes on to Graph and Postgres.
                    soon = datetime.now(UTC) + timedelta(hours=1)
                    appointment["start"] = soon.isoformat()
                    appointment["end"] = (soon + timedelta(minutes=30)).isoformat()
                if isinstance(appointment, dict):
                    video: dict[str, Any] = {"coding": [{"code": "VIDEO_VISIT"}]}
                    kinds = appointment.get("serviceType")
                    appointment["serviceType"] = (
                        [*kinds, video] if isinstance(kinds, list) else [video]
                    )
        elif case.path == "/graph/notifications" and isinstance(body, dict):
            notes = body.get("value")
            for note in notes if isinstance(notes, list) else []:
                if isinstance(note, dict):
                    note["subscriptionId"], note["clientState"] = subscription
        return extra

    return sign_in


@pytest.fixture
async def launch_target(launch_system: LaunchSystem, topic_prefix: str) -> Target:
    """The gateway with one booked video visit: a clinician launched into it (session cookie
    and form token), its patient join link, and its Graph subscription."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        appointment = await book_video_visit(http, system)
        [created] = await read_all(topic_prefix + "appointment-created", expect=1)
        payload = decode_event(created).payload
        assert isinstance(payload, AppointmentCreatedV1)
        assert payload.join_url
        status, body, cookies = await launch_from_ehr(http, system, appointment["id"])
        assert status == 200, body
    cookie = cookies[PROVIDER_COOKIE]
    csrf_token = await system.app[DB_POOL].fetchval(
        "SELECT csrf_token FROM provider_sessions WHERE token_hash = $1",
        hashlib.sha256(cookie.encode()).digest(),
    )
    [subscription] = system.microsoft.components.graph.subscriptions.values()
    assert subscription.client_state is not None
    join_token = payload.join_url.rsplit("/", 1)[1]
    return Target(
        "launch",
        system.url,
        launch_openapi.document(),
        system.app,
        sign_in=launch_sign_in(
            system, cookie, csrf_token, (subscription.id, subscription.client_state)
        ),
        cookies={PROVIDER_COOKIE: cookie},
        known={
            "csrf_token": csrf_token,
            "subscription_id": subscription.id,
            "client_state": subscription.client_state,
            "fhir_base": system.fhir_base,
            "join_token": join_token,
        },
        signed_in_skips={"GET /visit/roster": "an event stream that never ends"},
        # A generated batch holds up to 100 notifications of up to 1000 roster changes each,
        # every one applied in Postgres: seconds per request.
        caps={"POST /graph/notifications": 6},
        path_values={
            "/join/{token}": {"token": join_token},
            "/join/{token}/enter": {"token": join_token},
            "/launch/provider/{integration_id}": {"integration_id": str(system.integration_id)},
            "/launch/patient/{integration_id}": {"integration_id": str(system.integration_id)},
        },
    )
