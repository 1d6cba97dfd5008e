"""The event envelope and the typed payload of every topic.

An event on the wire is the orjson encoding of `Envelope`. `decode_event` looks the payload
model up by (type, version); anything it cannot place raises `UndeliverableEvent`, which the
consumer runner sends to the topic's dead-letter topic with the reason.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Generic, Literal, TypeVar

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

_ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")


def _iso_only(value: object) -> object:
    # pydantic also reads "1732546800" as a Unix time; on the wire we accept ISO 8601 only.
    if isinstance(value, str) and not _ISO_DATETIME.match(value):
        raise ValueError("expected an ISO 8601 date-time with an offset")
    return value


def _in_utc(value: datetime) -> datetime:
    # One canonical form on the wire: an event encodes to the same bytes however its times
    # were zoned (a zone with a DST gap or fold would not even compare equal to itself).
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # "0001-01-01T00:00:00+01:00" is before year 1 in UTC; a ValueError makes it a
        # validation problem instead of an exception no consumer expects.
        raise ValueError("date-time is out of range in UTC") from None


# Every time an event carries lies in these years. Graph and Event Grid are .NET: their
# DateTime.MinValue and MaxValue (0001-01-01, 9999-12-31T23:59:59.9999999) are valid ISO
# times, which asyncpg stores as -infinity and infinity and reads back naive, and a time of
# year 1 leaves the calendar once a visit's zone shifts it: analytics dead-lettered such events.
EARLIEST_EVENT_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_EVENT_TIME = datetime(9000, 1, 1, tzinfo=UTC)


def _in_event_years(value: datetime) -> datetime:
    if not EARLIEST_EVENT_TIME <= value < LATEST_EVENT_TIME:
        raise ValueError("date-time is outside the years 1970 to 8999")
    return value


# Any aware date-time from outside (Graph, Event Grid), normalised to UTC and refused with a
# validation error when UTC cannot hold it or it lies outside the event years.
UtcDateTime = Annotated[AwareDatetime, AfterValidator(_in_utc), AfterValidator(_in_event_years)]
# On the wire, ISO 8601 only.
Timestamp = Annotated[UtcDateTime, BeforeValidator(_iso_only)]


class Topic(StrEnum):
    APPOINTMENT_CREATED = "appointment-created"
    APPOINTMENT_RESCHEDULED = "appointment-rescheduled"
    APPOINTMENT_CANCELLED = "appointment-cancelled"
    PATIENT_JOINED = "patient-joined"
    PARTICIPANT_ADMITTED = "participant-admitted"
    PARTICIPANT_LEFT = "participant-left"
    MEETING_ENDED = "meeting-ended"
    SMS_REQUESTED = "sms-requested"
    SMS_SENT = "sms-sent"
    INTEGRATION_CONFIG = "integration-config"
    TENANT_SETTINGS = "tenant-settings"


# Latest state per key is all that matters on these; Kafka keeps the last message per key.
COMPACTED_TOPICS = frozenset({Topic.INTEGRATION_CONFIG, Topic.TENANT_SETTINGS})
# Every service keeps a visit's schedule version in a Postgres integer.
MAX_SCHEDULE_VERSION = 2**31 - 1


def dead_letter_topic(topic: str) -> str:
    return f"{topic}.dlq"


class Payload(BaseModel):
    # Producers and consumers may run different releases; forbid unknown fields so a payload
    # that changed shape without a version bump is caught instead of half-read.
    model_config = ConfigDict(extra="forbid", frozen=True)


Environment = Literal["test", "production"]


class AppointmentCreatedV1(Payload):
    """A video visit exists and has a meeting. Contact fields are ciphertext, never clear."""

    integration_id: uuid.UUID
    environment: Environment
    department: str = Field(max_length=200)
    starts_at: Timestamp
    ends_at: Timestamp
    time_zone: str = Field(max_length=64)
    join_url: str | None = Field(default=None, max_length=2048)
    patient_phone_encrypted: str | None = Field(default=None, max_length=4096)
    sms_enabled: bool = False
    schedule_version: int = Field(default=1, ge=1, le=MAX_SCHEDULE_VERSION)


class PatientJoinedV1(Payload):
    """A patient opened the join link and entered the lobby."""

    participant: str = Field(max_length=128, description="pseudonym, never a name")
    lobby_entered_at: Timestamp


class AttendanceInterval(Payload):
    joined_at: Timestamp
    left_at: Timestamp | None = None


ParticipantRole = Literal["organizer", "staff", "patient", "guest"]
# meeting-ended's limits, which producer and consumers check with this same model: lowered, a
# consumer would refuse what an older producer still sends; raised, an older consumer would
# refuse what a newer producer sends. Within them an event can still be too large for Kafka
# (500 x 500 intervals is ~21 MB): the launch side bounds what it sends well below both
# (services/launch/attendance.py).
MEETING_ENDED_MAX_PARTICIPANTS = 500
ATTENDANCE_MAX_INTERVALS = 500


class ParticipantAttendance(Payload):
    participant: str = Field(max_length=128, description="pseudonym, never a name")
    role: ParticipantRole
    lobby_entered_at: Timestamp | None = None
    admitted_at: Timestamp | None = None
    intervals: list[AttendanceInterval] = Field(
        default_factory=list, max_length=ATTENDANCE_MAX_INTERVALS
    )


class MeetingEndedV1(Payload):
    """The meeting is over: who was there, when, and how long they waited in the lobby."""

    meeting_started_at: Timestamp | None = None
    meeting_ended_at: Timestamp
    participants: list[ParticipantAttendance] = Field(
        default_factory=list, max_length=MEETING_ENDED_MAX_PARTICIPANTS
    )


class AppointmentRescheduledV1(Payload):
    """The EHR moved the appointment; reminders follow the new start."""

    integration_id: uuid.UUID
    starts_at: Timestamp
    ends_at: Timestamp
    time_zone: str = Field(max_length=64)
    schedule_version: int = Field(ge=1, le=MAX_SCHEDULE_VERSION)


class AppointmentRescheduledV2(AppointmentRescheduledV1):
    """A move of a visit whose recorded end had passed: notify erased the patient's number
    then, so the move carries it again (ciphertext) for the notice and the new reminders. A
    move of a visit not over yet stays V1, without the number."""

    patient_phone_encrypted: str | None = Field(default=None, max_length=4096)


class AppointmentCancelledV1(Payload):
    """The EHR cancelled the appointment; pending reminders are dropped."""

    integration_id: uuid.UUID
    reason_code: str = Field(max_length=64, pattern=r"^[a-z0-9_-]+$")
    schedule_version: int = Field(ge=1, le=MAX_SCHEDULE_VERSION)


class ParticipantAdmittedV1(Payload):
    """Staff let a participant in from the lobby (or a staff member joined directly)."""

    participant: str = Field(max_length=128, description="pseudonym, never a name")
    role: ParticipantRole
    admitted_at: Timestamp


class ParticipantLeftV1(Payload):
    participant: str = Field(max_length=128, description="pseudonym, never a name")
    role: ParticipantRole
    left_at: Timestamp


SmsKind = Literal["confirmation", "reschedule", "cancellation", "reminder", "link"]
SmsOutcome = Literal["sent", "failed", "opted_out", "invalid_number", "no_consent"]


class SmsRequestedV1(Payload):
    """The clinician pressed "Send link to patient"."""

    integration_id: uuid.UUID
    kind: Literal["link"] = "link"
    requested_at: Timestamp


class SmsSentV1(Payload):
    """Notify's outcome for one message; no phone number, no text."""

    integration_id: uuid.UUID
    kind: SmsKind
    outcome: SmsOutcome
    segments: int = Field(ge=0, le=10)
    at: Timestamp


ReminderOffset = Literal[15, 30, 60, 1440]


def _default_reminders() -> list[ReminderOffset]:
    return [15]


ClientAuthMethod = Literal["client_secret_basic", "private_key_jwt"]
PkceMode = Literal["required", "if_supported", "off"]


class IntegrationConfigV1(Payload):
    """An integration's settings as the config service last saved them. Keyed by
    integration id on a compacted topic; secrets are field-encrypted ciphertext."""

    integration_id: uuid.UUID
    config_version: int = Field(ge=1, description="consumers keep the highest version seen")
    deleted: bool = False
    fhir_base_url: str = Field(max_length=2048)
    environment: Environment
    enabled: bool
    department: str = Field(max_length=200)
    organisation_name: str = Field(max_length=200)
    ms_tenant_id: str = Field(max_length=100)
    smart_client_id: str = Field(max_length=200)
    client_auth_method: ClientAuthMethod
    client_secret_encrypted: str | None = Field(default=None, max_length=8192)
    private_key_encrypted: str | None = Field(default=None, max_length=16384)
    pkce_mode: PkceMode = "required"
    teams_organizer_id: str = Field(max_length=200)
    sms_enabled: bool = Field(description="SMS switched on and both consents given")
    # [0-9], not \d: pydantic's regex engine takes \d for any Unicode digit.
    sms_from_number: str | None = Field(
        default=None, max_length=20, pattern=r"^\+[1-9][0-9]{6,14}$"
    )
    reminder_offsets_minutes: list[ReminderOffset] = Field(
        default_factory=_default_reminders, max_length=4
    )
    sms_templates: dict[SmsKind, str] = Field(default_factory=dict)


class TenantSettingsV1(Payload):
    """A tenant's settings that are not per integration, keyed by the Microsoft 365 tenant
    id on a compacted topic: the monthly allocation of completed appointments."""

    # Bounded by the consumers' int column: a larger value would fail every delivery.
    monthly_allocation: int = Field(ge=0, le=2**31 - 1)
    config_version: int = Field(ge=1, description="consumers keep the highest version seen")


PAYLOAD_MODELS: dict[tuple[str, int], type[Payload]] = {
    (Topic.APPOINTMENT_CREATED, 1): AppointmentCreatedV1,
    (Topic.APPOINTMENT_RESCHEDULED, 1): AppointmentRescheduledV1,
    (Topic.APPOINTMENT_RESCHEDULED, 2): AppointmentRescheduledV2,
    (Topic.APPOINTMENT_CANCELLED, 1): AppointmentCancelledV1,
    (Topic.PATIENT_JOINED, 1): PatientJoinedV1,
    (Topic.PARTICIPANT_ADMITTED, 1): ParticipantAdmittedV1,
    (Topic.PARTICIPANT_LEFT, 1): ParticipantLeftV1,
    (Topic.MEETING_ENDED, 1): MeetingEndedV1,
    (Topic.SMS_REQUESTED, 1): SmsRequestedV1,
    (Topic.SMS_SENT, 1): SmsSentV1,
    (Topic.INTEGRATION_CONFIG, 1): IntegrationConfigV1,
    (Topic.TENANT_SETTINGS, 1): TenantSettingsV1,
}

P = TypeVar("P", bound=Payload)


class Envelope(BaseModel, Generic[P]):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    type: str = Field(max_length=100)
    version: int = Field(ge=1)
    occurred_at: Timestamp = Field(default_factory=lambda: datetime.now(UTC))
    tenant_id: str = Field(min_length=1, max_length=100)
    key: str = Field(
        min_length=1,
        max_length=200,
        description="the appointment key; the integration id on integration-config",
    )
    payload: P


# Envelope[Model] looked up once: pydantic's __class_getitem__ took a fifth of decoding.
_ENVELOPES: dict[type[Payload], type[Envelope[Any]]] = {
    model: Envelope[model]  # type: ignore[valid-type]
    for model in PAYLOAD_MODELS.values()
}


class UndeliverableEvent(Exception):
    """The bytes on the topic cannot become an event this consumer understands."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def make_event(topic: Topic, tenant_id: str, key: str, payload: Payload) -> Envelope[Any]:
    version = next(
        v for (t, v), model in PAYLOAD_MODELS.items() if t == topic and model is type(payload)
    )
    return Envelope[Any](
        type=topic.value, version=version, tenant_id=tenant_id, key=key, payload=payload
    )


def encode_event(event: Envelope[Any]) -> bytes:
    return orjson.dumps(event.model_dump(mode="json"))


def decode_event(raw: bytes | None, topic: str | None = None) -> Envelope[Any]:
    """The event in `raw`, or `UndeliverableEvent` (and no other exception) with the reason.
    With `topic`, an event whose type is another topic's is undeliverable too: a handler
    only understands its own topic's payloads."""
    if raw is None:
        raise UndeliverableEvent("empty message")
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UndeliverableEvent(f"malformed JSON: {exc}") from None
    if not isinstance(document, dict):
        raise UndeliverableEvent("event is not a JSON object")
    event_type, version = document.get("type"), document.get("version")
    model = (
        # `type(...) is int`: JSON true is a bool, which Python would take for version 1.
        PAYLOAD_MODELS.get((event_type, version))
        if isinstance(event_type, str) and type(version) is int
        else None
    )
    if model is None:
        raise UndeliverableEvent(
            f"unknown event type or version: {str(event_type)[:100]!r} v{str(version)[:20]!r}"
        )
    if topic is not None and event_type != topic:
        raise UndeliverableEvent(f"a {event_type} event does not belong on topic {topic}")
    try:
        return _ENVELOPES[model].model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise UndeliverableEvent(f"invalid {event_type} v{version}: {problems}") from None
