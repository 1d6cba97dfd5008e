"""Event Grid webhook for ACS SMS events: inbound SMS (STOP / START) and delivery reports.

Event Grid authenticates a webhook by a secret in the subscription's endpoint URL (here the
`code` query parameter) and proves ownership with the SubscriptionValidation handshake. A
delivery is applied whole or not at all: one invalid event refuses the batch with a 400 that
names the fields, never their values (they hold phone numbers).

A delivery report also records a send whose answer was lost (a crash, a timeout) when a cancel
or a move finished its message unsent before a retry could learn the answer: the send's tag
names the message (acs.send_tag), and the report records it sent once, with its sms-sent event,
as the dispatcher records an accepted send. A report naming a message still pending is stored
with its tag, and whatever finishes the message unsent or refuses it (a cancel, a move, a STOP,
SMS off) records the send from it instead (lost_sends). A valid delivery is always answered
200: Event Grid counts any other answer as a failed delivery.
"""

from __future__ import annotations

import asyncio
import hmac
import random
from dataclasses import dataclass, field
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

from libs.common.events import SmsKind, UtcDateTime
from libs.common.logging import redact_text
from services.notify import metrics, optout
from services.notify.acs import parse_tag
from services.notify.consumers import refuse_pending
from services.notify.lost_sends import record_reported
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

# The report, per provider message id ($1): stored unless the row has it already (a redelivery:
# no news) or a newer one; true when it changed the row. Its tag, if one of ours, is kept with
# it ($6 the message's repeatabilityRequestId, $7 its kind, $8 the number it came from, $9 the
# segments its attempts carried): the first tag a message id came with stays.
_STORE_REPORT = (
    "INSERT INTO delivery_reports (provider_message_id, delivery_status, details, received_at,"
    " event_id, repeatability_request_id, kind, sender, segments)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    " ON CONFLICT (provider_message_id) DO UPDATE SET"
    " delivery_status = excluded.delivery_status, details = excluded.details,"
    " received_at = excluded.received_at, event_id = excluded.event_id,"
    " repeatability_request_id = coalesce(delivery_reports.repeatability_request_id,"
    " excluded.repeatability_request_id),"
    " kind = CASE WHEN delivery_reports.repeatability_request_id IS NULL THEN excluded.kind"
    " ELSE delivery_reports.kind END,"
    " sender = CASE WHEN delivery_reports.repeatability_request_id IS NULL THEN excluded.sender"
    " ELSE delivery_reports.sender END,"
    " segments = coalesce(excluded.segments, delivery_reports.segments)"
    " WHERE delivery_reports.received_at <= excluded.received_at"
    # Event Grid delivers at least once: the same report again is no news.
    " AND (delivery_reports.delivery_status, delivery_reports.details,"
    " delivery_reports.received_at) IS DISTINCT FROM"
    " (excluded.delivery_status, excluded.details, excluded.received_at)"
    " RETURNING true"
)
# The message a stored report's tag names ($1 its repeatabilityRequestId, $2 its kind), sent
# from the number the report names ($3), if the send the report proves is not recorded: marked
# in flight (its text went to ACS, perhaps more than once, under that id) with no outcome
# (pending: its answer not recorded yet, or lost; or finished unsent since by a cancel or a
# move: refusals and failures have an outcome, and their sms-sent event already), locked, in a
# statement after the report's, so that whatever finishes it meanwhile either is seen here, once
# committed, or sees the report (lost_sends). Partial index: migrations/0006_sends_by_tag.sql.
_NAMED = (
    "SELECT m.id, m.status FROM sms_messages m"
    " WHERE m.repeatability_request_id = $1 AND m.kind = $2 AND m.sender = $3"
    " AND m.in_flight_since IS NOT NULL AND m.outcome IS NULL"
    " AND m.status IN ('pending', 'cancelled', 'superseded')"
    " ORDER BY m.id FOR UPDATE OF m"
)
# What a delivery may meet on its rows (a dispatcher's outcome write, a consumer's cancel): it
# is rolled back whole, and applied again from the start, a few times, before a 500.
_TRANSIENT = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
ATTEMPTS = 3


@dataclass(frozen=True)
class _Reported:
    status: str | None = None  # the report's status, when it changed the row
    recorded: tuple[SmsKind, ...] = ()  # the kinds of the sends it recorded


@dataclass
class _Applied:
    """What a delivery changed, counted once it is committed."""

    reported: list[_Reported] = field(default_factory=list)
    keywords: list[str] = field(default_factory=list)  # STOP / START applied
    purged: int = 0


# Event Grid sends "From" with or without the leading "+".
# ASCII digits: pydantic's \d takes any Unicode digit.
Phone = Annotated[str, StringConstraints(pattern=r"^\+?[1-9][0-9]{6,14}$")]
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
    # Never read: an odd one (a .NET MinValue) must not refuse the report it comes in.
    Timestamp: AwareDatetime
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
        hasher: RecipientHasher,
    ) -> None:
        self._pool = pool
        self._secret = secret
        self._hash_secret = hash_secret
        self._region = region
        self._hasher = hasher

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
        if (
            len(parsed) == 1
            and isinstance(first_data, DeliveryReportData)
            and parse_tag(first_data.Tag) is None
        ):
            # Event Grid mostly delivers one report per request: one statement is atomic on
            # its own, so no BEGIN and COMMIT round trips around it.
            applied = _Applied([await self._report(self._pool, first_event, first_data)])
            return _answer(applied, 1)
        for attempt in range(1, ATTEMPTS + 1):
            applied = _Applied()
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    for (event, data), pair in zip(parsed, numbers, strict=True):
                        if isinstance(data, SmsReceivedData) and pair is not None:
                            await self._received(conn, data, *pair, applied)
                        elif isinstance(data, DeliveryReportData):
                            applied.reported.append(await self._report(conn, event, data))
                break
            except _TRANSIENT as exc:
                # Rolled back whole: applied again, it finds what it found the first time, or
                # what committed since (the redelivery Event Grid would make, sooner).
                if attempt == ATTEMPTS:
                    raise
                log.warning("webhook delivery retried", error=type(exc).__name__, attempt=attempt)
                await asyncio.sleep(random.uniform(0.01, 0.05) * attempt)
        return _answer(applied, len(parsed))

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

    async def _received(
        self, conn: Any, data: SmsReceivedData, ours: str, patient: str, applied: _Applied
    ) -> None:
        """Applies a STOP / START: the change is told to `applied` if it changed the patient's
        word (a redelivery, or an older reply, does not), with the numbers a STOP purged."""
        action = optout.keyword(data.Message)
        if action is None:
            return  # a reply that is not a keyword is not kept: it may hold anything
        at = data.ReceivedTimestamp
        if not await optout.apply(conn, self._hash_secret, ours, patient, action, at):
            return
        applied.keywords.append(action)
        log.info("sms keyword applied", action=action)
        if action != "stop":
            return
        # Nothing more goes to the patient from this number: the numbers held for it are not
        # needed any more, and the messages owed are refused now as the dispatcher would.
        keys = await optout.held_for(conn, self._hasher, ours, patient)
        if not keys:
            return
        applied.purged += await conn.fetchval(_PURGE_STOPPED, at, keys)
        await refuse_pending(conn, keys, "opted_out", "recipient replied STOP", at)

    async def _report(
        self, conn: Any, event: EventGridEvent, data: DeliveryReportData
    ) -> _Reported:
        """Records the report; its status if that changed the row, None if the row already
        said so (a redelivery) or knows better (an older report). A send it proves that was
        finished unsent (its answer lost, then the visit cancelled or moved) is recorded with
        it; one still pending is left to its retry, or to what finishes it (lost_sends), which
        finds the report stored."""
        tag = parse_tag(data.Tag)
        # Every attempt carries the message's segments, succeeded or failed; none: unknown.
        attempted = [a.SegmentsSucceeded + a.SegmentsFailed for a in data.DeliveryAttempts]
        named = (
            (tag.repeatability_request_id, tag.kind, _plus(data.From))
            if tag is not None
            else (None, None, None)
        )
        changed = await conn.fetchval(
            _STORE_REPORT,
            data.MessageId,
            data.DeliveryStatus,
            # Carrier details are free text; keep them, minus anything that looks personal.
            redact_text(data.DeliveryStatusDetails),
            data.ReceivedTimestamp,
            event.id,
            *named,
            min(max(attempted), 10) if attempted and tag is not None else None,
        )
        status = data.DeliveryStatus if changed else None
        if tag is None:
            # No tag of ours: another sender's, or one sent before tags named the message.
            return _Reported(status)
        found = await conn.fetch(_NAMED, *named)
        unsent = [row["id"] for row in found if row["status"] != "pending"]
        # A pending one: its dispatcher may be about to record the answer (reports can be
        # quick), or died or timed out with the message in flight, to send it again after its
        # lease, when ACS answers the first result; or its retry finishes it unsent (a STOP,
        # SMS off) and finds this report. Nothing is asked of Event Grid again.
        recorded = tuple(await record_reported(conn, unsent))
        if recorded:
            log.info("sms send recorded from its delivery report", sms_kind=recorded[0])
        return _Reported(status, recorded)


def _answer(applied: _Applied, accepted: int) -> web.Response:
    """The answer to a delivery, once committed: how many events were taken."""
    _count(applied)  # once committed: a batch that rolls back recorded nothing
    return web.json_response({"accepted": accepted})


def _count(applied: _Applied) -> None:
    for report in applied.reported:
        if report.status is not None:
            label = report.status if report.status in KNOWN_DELIVERY_STATUSES else "other"
            metrics.DELIVERY_REPORTS.labels(label).inc()
        for kind in report.recorded:
            metrics.SMS_SENT_FROM_REPORTS.labels(kind).inc()
    for action in applied.keywords:
        metrics.OPT_OUT_CHANGES.labels(action).inc()
    metrics.PHONES_PURGED.inc(applied.purged)


def _plus(number: str) -> str:
    return number if number.startswith("+") else f"+{number}"
