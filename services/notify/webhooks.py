"""Event Grid webhook for ACS SMS events: inbound SMS (STOP / START) and delivery reports.

Event Grid authenticates a webhook by a secret in the subscription's endpoint URL (here the
`code` query parameter) and proves ownership with the SubscriptionValidation handshake. A
delivery is applied whole or not at all: one invalid event refuses the batch with a 400 that
names the fields, never their values (they hold phone numbers).
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

import asyncpg
import orjson
import structlog
from aiohttp import web
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from libs.common.crypto import FieldCipher
from libs.common.events import UtcDateTime
from libs.common.logging import redact_text
from services.notify import metrics, optout
from services.notify.consumers import refuse_pending
from services.notify.phones import RecipientHasher, Refusal, normalise
from services.notify.purge import purging

log = structlog.get_logger(__name__)

RECEIVED = "Microsoft.Communication.SMSReceived"
DELIVERY_REPORT = "Microsoft.Communication.SMSDeliveryReportReceived"
VALIDATION = "Microsoft.EventGrid.SubscriptionValidationEvent"
KNOWN_DELIVERY_STATUSES = frozenset({"Delivered", "Failed", "Expired", "Queued", "Sent"})
MAX_EVENTS = 500
# A STOP's purge: the numbers held for the sending number by the appointments found ($2).
_PURGE_STOPPED = purging("a.appointment_key = any($2::text[])")

# Event Grid sends "From" with or without the leading "+".
Phone = Annotated[str, StringConstraints(pattern=r"^\+?[1-9]\d{6,14}$")]
# Stored values: Postgres text holds no NUL.
NO_NUL = r"^[^\x00]*$"
Text = Annotated[str, StringConstraints(max_length=200, pattern=NO_NUL)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventGridEvent(BaseModel):
    # Event Grid may add envelope fields over time; the data models below are strict.
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1, max_length=200, pattern=NO_NUL)
    topic: str = Field(default="", max_length=1000)
    subject: str = Field(max_length=1000)
    eventType: str = Field(min_length=1, max_length=200)  # noqa: N815
    eventTime: AwareDatetime  # noqa: N815
    dataVersion: str = Field(default="", max_length=20)  # noqa: N815
    data: dict[str, Any]


class SmsReceivedData(_Strict):
    MessageId: str = Field(min_length=1, max_length=200)
    From: Phone
    To: Phone
    Message: str = Field(max_length=2048)
    ReceivedTimestamp: UtcDateTime


class DeliveryAttempt(_Strict):
    Timestamp: UtcDateTime
    SegmentsSucceeded: int = Field(ge=0, le=100)
    SegmentsFailed: int = Field(ge=0, le=100)


class DeliveryReportData(_Strict):
    MessageId: str = Field(min_length=1, max_length=200, pattern=NO_NUL)
    From: Phone
    To: Phone
    DeliveryStatus: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z]+$")
    DeliveryStatusDetails: Text
    DeliveryAttempts: list[DeliveryAttempt] = Field(default_factory=list, max_length=50)
    ReceivedTimestamp: UtcDateTime
    Tag: str | None = Field(default=None, max_length=200)


class ValidationData(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    validationCode: str = Field(min_length=1, max_length=200)  # noqa: N815


_EVENTS = TypeAdapter(list[EventGridEvent])
DATA_MODELS: dict[str, type[BaseModel]] = {
    RECEIVED: SmsReceivedData,
    DELIVERY_REPORT: DeliveryReportData,
}


def _problems(exc: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    return [
        {"field": prefix + ".".join(str(p) for p in err["loc"]), "problem": err["msg"]}
        for err in exc.errors(include_input=False)[:20]
    ]


def _refuse(status: int, reason: str, problems: list[dict[str, str]] | None = None) -> web.Response:
    metrics.WEBHOOK_REFUSED.labels(reason).inc()
    body: dict[str, Any] = {"error": reason}
    if problems:
        body["problems"] = problems
    return web.json_response(body, status=status)


Parsed = tuple[EventGridEvent, BaseModel | None]


def parse(raw: bytes) -> list[Parsed] | web.Response:
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _refuse(400, "malformed JSON")
    if not isinstance(document, list) or not 1 <= len(document) <= MAX_EVENTS:
        return _refuse(400, f"expected a JSON array of 1 to {MAX_EVENTS} events")
    try:
        events = _EVENTS.validate_python(document)
    except ValidationError as exc:
        return _refuse(400, "invalid event", _problems(exc))
    parsed: list[Parsed] = []
    for index, event in enumerate(events):
        model = DATA_MODELS.get(event.eventType)
        try:
            data = model.model_validate(event.data) if model else None
        except ValidationError as exc:
            return _refuse(400, "invalid event data", _problems(exc, f"{index}.data."))
        parsed.append((event, data))
    return parsed


class AcsEventsWebhook:
    def __init__(
        self,
        pool: asyncpg.Pool,
        secret: str,
        hash_secret: str,
        region: str,
        cipher: FieldCipher,
    ) -> None:
        self._pool = pool
        self._secret = secret
        self._hash_secret = hash_secret
        self._region = region
        self._hasher = RecipientHasher(cipher, hash_secret, region)

    async def handle(self, request: web.Request) -> web.Response:
        code = request.query.get("code", "")
        if not code or not hmac.compare_digest(code.encode(), self._secret.encode()):
            return _refuse(401, "unauthenticated")
        if request.content_type != "application/json":
            return _refuse(415, "expected application/json")
        parsed = parse(await request.read())
        if isinstance(parsed, web.Response):
            return parsed
        validation = [e for e, _ in parsed if e.eventType == VALIDATION]
        if validation:
            try:
                handshake = ValidationData.model_validate(validation[0].data)
            except ValidationError as exc:
                return _refuse(400, "invalid validation event", _problems(exc, "data."))
            return web.json_response({"validationResponse": handshake.validationCode})
        numbers = self._numbers(parsed)
        if isinstance(numbers, web.Response):
            return numbers
        first_event, first_data = parsed[0]
        if len(parsed) == 1 and isinstance(first_data, DeliveryReportData):
            # Event Grid mostly delivers one report per request: one statement is atomic on
            # its own, so no BEGIN and COMMIT round trips around it.
            _count_reports([await self._report(self._pool, first_event, first_data)])
            return web.json_response({"accepted": 1})
        recorded: list[str | None] = []
        purged = 0
        async with self._pool.acquire() as conn, conn.transaction():
            for (event, data), pair in zip(parsed, numbers, strict=True):
                if isinstance(data, SmsReceivedData) and pair is not None:
                    purged += await self._received(conn, data, *pair)
                elif isinstance(data, DeliveryReportData):
                    recorded.append(await self._report(conn, event, data))
        # Counted once committed: a batch that rolls back recorded nothing.
        _count_reports(recorded)
        metrics.PHONES_PURGED.inc(purged)
        return web.json_response({"accepted": len(parsed)})

    def _numbers(self, parsed: list[Parsed]) -> list[tuple[str, str] | None] | web.Response:
        """(our number, patient) per inbound SMS, all validated before anything is applied."""
        result: list[tuple[str, str] | None] = []
        for index, (_, data) in enumerate(parsed):
            if not isinstance(data, SmsReceivedData):
                result.append(None)
                continue
            ours = normalise(_plus(data.To), self._region)
            patient = normalise(_plus(data.From), self._region)
            for name, value in (("To", ours), ("From", patient)):
                if isinstance(value, Refusal):
                    return _refuse(
                        400,
                        "invalid event data",
                        [{"field": f"{index}.data.{name}", "problem": value.reason}],
                    )
            assert isinstance(ours, str)
            assert isinstance(patient, str)
            result.append((ours, patient))
        return result

    async def _received(self, conn: Any, data: SmsReceivedData, ours: str, patient: str) -> int:
        """Applies a STOP / START; how many numbers a STOP purged."""
        action = optout.keyword(data.Message)
        if action is None:
            return 0  # a reply that is not a keyword is not kept: it may hold anything
        at = data.ReceivedTimestamp
        applied = await optout.apply(conn, self._hash_secret, ours, patient, action, at)
        metrics.OPT_OUT_CHANGES.labels(action).inc()
        log.info("sms keyword applied", action=action)
        if action != "stop" or not applied:
            return 0
        # Nothing more goes to the patient from this number: the numbers held for it are not
        # needed any more, and the messages owed are refused now as the dispatcher would.
        keys = await optout.held_for(conn, self._hasher, ours, patient)
        if not keys:
            return 0
        purged: int = await conn.fetchval(_PURGE_STOPPED, at, keys)
        await refuse_pending(conn, keys, "opted_out", "recipient replied STOP", at)
        return purged

    async def _report(
        self, conn: Any, event: EventGridEvent, data: DeliveryReportData
    ) -> str | None:
        """Records the report; its status if that changed the row, None if the row already
        said so (a redelivery) or knows better (an older report)."""
        changed = await conn.fetchval(
            "INSERT INTO delivery_reports (provider_message_id, delivery_status, details,"
            " received_at, event_id) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (provider_message_id) DO UPDATE SET"
            " delivery_status = excluded.delivery_status, details = excluded.details,"
            " received_at = excluded.received_at, event_id = excluded.event_id"
            " WHERE delivery_reports.received_at <= excluded.received_at"
            # Event Grid delivers at least once: the same report again is no news.
            " AND (delivery_reports.delivery_status, delivery_reports.details,"
            " delivery_reports.received_at) IS DISTINCT FROM"
            " (excluded.delivery_status, excluded.details, excluded.received_at)"
            " RETURNING true",
            data.MessageId,
            data.DeliveryStatus,
            # Carrier details are free text; keep them, minus anything that looks personal.
            redact_text(data.DeliveryStatusDetails),
            data.ReceivedTimestamp,
            event.id,
        )
        return data.DeliveryStatus if changed else None


def _count_reports(recorded: list[str | None]) -> None:
    for status in recorded:
        if status is not None:
            label = status if status in KNOWN_DELIVERY_STATUSES else "other"
            metrics.DELIVERY_REPORTS.labels(label).inc()


def _plus(number: str) -> str:
    return number if number.startswith("+") else f"+{number}"
