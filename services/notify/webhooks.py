"""Event Grid webhook for ACS SMS events: inbound SMS (STOP / START) and delivery reports.

Event Grid authenticates a webhook by a secret in the subscription's endpoint URL (here the
`code` query parameter) and proves ownership with the SubscriptionValidation handshake. A
delivery is applied whole or not at all: one invalid event refuses the batch with a 400 that
names the fields, never their values (they hold phone numbers).

A delivery report also records a send whose answer was lost (a crash, a timeout) when a cancel
or a move finished its message unsent before a retry could learn the answer: the send's tag
names the message (acs.send_tag), and the report records it sent once, with its sms-sent event,
as the dispatcher records an accepted send. A report naming a message still pending with such a
send is answered 409, so Event Grid delivers it again (it retries any answer but 400, 401, 403
and 413) once the retry or a cancel has settled it; not a 5xx: nothing failed.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
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
from libs.common.events import SmsKind, SmsSentV1, Topic, UtcDateTime, encode_event, make_event
from libs.common.logging import redact_text
from services.notify import metrics, optout
from services.notify.acs import parse_tag
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

# The report, per provider message id ($1): stored unless the row has it already (a redelivery:
# no news) or a newer one; true when it changed the row.
_REPORT_COLUMNS = (
    "delivery_reports (provider_message_id, delivery_status, details, received_at, event_id)"
)
_REPORT_UPSERT = (
    " ON CONFLICT (provider_message_id) DO UPDATE SET"
    " delivery_status = excluded.delivery_status, details = excluded.details,"
    " received_at = excluded.received_at, event_id = excluded.event_id"
    " WHERE delivery_reports.received_at <= excluded.received_at"
    # Event Grid delivers at least once: the same report again is no news.
    " AND (delivery_reports.delivery_status, delivery_reports.details,"
    " delivery_reports.received_at) IS DISTINCT FROM"
    " (excluded.delivery_status, excluded.details, excluded.received_at)"
    " RETURNING true"
)
_STORE_REPORT = (
    f"INSERT INTO {_REPORT_COLUMNS} VALUES ($1, $2, $3, $4, $5)"  # noqa: S608 -- constants only
    + _REPORT_UPSERT
)
# A report whose tag names one of our messages ($6 its repeatabilityRequestId, $7 its kind),
# sent from the number the report names ($8), in one round trip as any report: the message, if
# the send the report proves is not recorded: marked in flight (its text went to ACS, perhaps
# more than once, under that id) with no outcome (pending: its answer not recorded yet, or lost;
# or finished unsent since by a cancel or a move: refusals and failures have an outcome, and
# their sms-sent event already), and the report's message id no message's. The report is stored
# unless the message was finished unsent: `_RECORD_SEND` then stores it and records the send in
# one statement. Partial index: migrations/0006_sends_by_tag.sql.
_NAMED = (
    "SELECT m.id, m.status, m.appointment_key, m.kind, m.in_flight_since, a.tenant_id,"
    " a.integration_id FROM sms_messages m"
    " JOIN appointments a ON a.appointment_key = m.appointment_key"
    " WHERE m.repeatability_request_id = $6 AND m.kind = $7 AND m.sender = $8"
    " AND m.in_flight_since IS NOT NULL AND m.outcome IS NULL"
    " AND m.status IN ('pending', 'cancelled', 'superseded')"
    " AND NOT EXISTS (SELECT 1 FROM sms_messages k WHERE k.provider_message_id = $1)"
)
_STORE_TAGGED_REPORT = (
    f"WITH named AS ({_NAMED} ORDER BY m.id LIMIT 1),"  # noqa: S608 -- constants only
    f" stored AS (INSERT INTO {_REPORT_COLUMNS}"
    " SELECT $1::text, $2::text, $3::text, $4::timestamptz, $5::text"
    " WHERE NOT EXISTS (SELECT 1 FROM named WHERE named.status <> 'pending')"
    f"{_REPORT_UPSERT})"
    " SELECT named.*, EXISTS (SELECT 1 FROM stored) AS stored"
    " FROM (SELECT 1) AS one LEFT JOIN named ON true"
)
# A send finished unsent ($10, found by `_STORE_TAGGED_REPORT`) recorded with its report, as the
# dispatcher records an accepted send (status and outcome 'sent', ACS's message id, the segments
# $9, a confirmation's state), at the time it went to ACS, with its sms-sent event ($11-$14), if
# it is still unrecorded: the dispatcher's late answer, or the report again, then finds it
# recorded and writes nothing. The message is locked before its appointment, as the dispatcher
# locks them (a consumer locks the appointment, then only pending messages).
_RECORD_SEND = (
    "WITH recorded AS (UPDATE sms_messages m SET status = 'sent', outcome = 'sent',"  # noqa: S608
    " reason = NULL, provider_message_id = $1, segments = $9, finished_at = m.in_flight_since"
    " WHERE m.id = $10 AND m.repeatability_request_id = $6 AND m.kind = $7 AND m.sender = $8"
    " AND m.in_flight_since IS NOT NULL AND m.outcome IS NULL"
    " AND m.status IN ('cancelled', 'superseded')"
    " AND NOT EXISTS (SELECT 1 FROM sms_messages k WHERE k.provider_message_id = $1)"
    " RETURNING m.appointment_key, m.kind),"
    " confirmed AS (UPDATE appointments a SET confirmation = 'sent' FROM recorded r"
    " WHERE a.appointment_key = r.appointment_key AND r.kind = 'confirmation'),"
    " announced AS (INSERT INTO outbox (event_id, topic, key, payload)"
    " SELECT $11::uuid, $12::text, $13::text, $14::bytea FROM recorded RETURNING event_id),"
    f" stored AS (INSERT INTO {_REPORT_COLUMNS} VALUES ($1, $2, $3, $4, $5){_REPORT_UPSERT})"
    " SELECT EXISTS (SELECT 1 FROM stored) AS stored,"
    " EXISTS (SELECT 1 FROM announced) AS recorded"
)


@dataclass(frozen=True)
class _Reported:
    status: str | None = None  # the report's status, when it changed the row
    recorded: SmsKind | None = None  # the kind of the send it recorded, if it recorded one
    # It names a send whose answer is not recorded yet: Event Grid is to deliver it again.
    again: bool = False


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
            return _reported([await self._report(self._pool, first_event, first_data)], 1)
        recorded: list[_Reported] = []
        purged = 0
        async with self._pool.acquire() as conn, conn.transaction():
            for (event, data), pair in zip(parsed, numbers, strict=True):
                if isinstance(data, SmsReceivedData) and pair is not None:
                    purged += await self._received(conn, data, *pair)
                elif isinstance(data, DeliveryReportData):
                    recorded.append(await self._report(conn, event, data))
        metrics.PHONES_PURGED.inc(purged)
        return _reported(recorded, len(parsed))

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
    ) -> _Reported:
        """Records the report; its status if that changed the row, None if the row already
        said so (a redelivery) or knows better (an older report). A send it proves that was
        finished unsent (its answer lost, then the visit cancelled or moved) is recorded with
        it; one still pending is left to the dispatcher, and the report asked for again."""
        values = (
            data.MessageId,
            data.DeliveryStatus,
            # Carrier details are free text; keep them, minus anything that looks personal.
            redact_text(data.DeliveryStatusDetails),
            data.ReceivedTimestamp,
            event.id,
        )
        tag = parse_tag(data.Tag)
        if tag is None:
            # No tag of ours: another sender's, or one sent before tags named the message.
            changed = await conn.fetchval(_STORE_REPORT, *values)
            return _Reported(data.DeliveryStatus if changed else None)
        named = (tag.repeatability_request_id, tag.kind, _plus(data.From))
        found = await conn.fetchrow(_STORE_TAGGED_REPORT, *values, *named)
        assert found is not None  # the statement always answers one row
        status = data.DeliveryStatus if found["stored"] else None
        if found["id"] is None:
            return _Reported(status)
        if found["status"] == "pending":
            # Its dispatcher may be about to record the answer (reports can be quick), or died
            # or timed out with the message in flight, to send it again after its lease, when
            # ACS answers the first result; unless a cancel comes first. Asked again (Event Grid
            # retries at 10 s, 30 s, 1 min, 5 min, ...), the report finds it recorded, or
            # finished unsent and records it.
            return _Reported(status, again=True)
        # Every attempt carries the message's segments, succeeded or failed; none: unknown.
        attempted = [a.SegmentsSucceeded + a.SegmentsFailed for a in data.DeliveryAttempts]
        segments = min(max(attempted), 10) if attempted else None
        kind: SmsKind = found["kind"]
        sent = make_event(
            Topic.SMS_SENT,
            found["tenant_id"],
            found["appointment_key"],
            SmsSentV1(
                integration_id=found["integration_id"],
                kind=kind,
                outcome="sent",
                segments=segments or 0,
                at=found["in_flight_since"],
            ),
        )
        written = await conn.fetchrow(
            _RECORD_SEND,
            *values,
            *named,
            segments,
            found["id"],
            sent.event_id,
            sent.type,
            sent.key,
            encode_event(sent),
        )
        assert written is not None  # the statement always answers one row
        status = data.DeliveryStatus if written["stored"] else None
        if not written["recorded"]:
            return _Reported(status)  # recorded meanwhile (the dispatcher, the same report)
        log.info(
            "sms send recorded from its delivery report",
            appointment_key=found["appointment_key"],
            sms_kind=kind,
        )
        return _Reported(status, kind)


def _reported(reported: list[_Reported], accepted: int) -> web.Response:
    """The answer to a delivery, once committed: 409 if a report is to be delivered again
    (the rest of it, applied, changes nothing the second time), else how many were taken."""
    _count_reports(reported)  # once committed: a batch that rolls back recorded nothing
    if any(report.again for report in reported):
        return _refuse(409, "a send reported is not settled yet; deliver again later")
    return web.json_response({"accepted": accepted})


def _count_reports(reported: list[_Reported]) -> None:
    for report in reported:
        if report.status is not None:
            label = report.status if report.status in KNOWN_DELIVERY_STATUSES else "other"
            metrics.DELIVERY_REPORTS.labels(label).inc()
        if report.recorded is not None:
            metrics.SMS_SENT_FROM_REPORTS.labels(report.recorded).inc()


def _plus(number: str) -> str:
    return number if number.startswith("+") else f"+{number}"
