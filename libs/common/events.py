"""The event envelope and the typed payload of every topic.

An event on the wire is the orjson encoding of `Envelope`. `decode_event` looks the payload
model up by (type, version); anything it cannot place raises `UndeliverableEvent`, which the
consumer runner sends to the topic's dead-letter topic with the reason.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
import re
from typing import Annotated, Any, Generic, Literal, TypeVar

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)


_ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")


def _iso_only(value: object) -> object:
    # pydantic also reads "1732546800" as a Unix time; on the wire we accept ISO 8601 only.
    if isinstance(value, str) and not _ISO_DATETIME.match(value):
        raise ValueError("expected an ISO 8601 date-time with an offset")
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_iso_only)]


class Topic(StrEnum):
    APPOINTMENT_CREATED = "appointment-created"
    PATIENT_JOINED = "patient-joined"
    MEETING_ENDED = "meeting-ended"


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
    schedule_version: int = Field(default=1, ge=1)


class PatientJoinedV1(Payload):
    """A patient opened the join link and entered the lobby."""

    participant: str = Field(max_length=128, description="pseudonym, never a name")
    lobby_entered_at: Timestamp


class AttendanceInterval(Payload):
    joined_at: Timestamp
    left_at: Timestamp | None = None


ParticipantRole = Literal["organizer", "staff", "patient", "guest"]


class ParticipantAttendance(Payload):
    participant: str = Field(max_length=128, description="pseudonym, never a name")
    role: ParticipantRole
    lobby_entered_at: Timestamp | None = None
    admitted_at: Timestamp | None = None
    intervals: list[AttendanceInterval] = Field(default_factory=list, max_length=500)


class MeetingEndedV1(Payload):
    """The meeting is over: who was there, when, and how long they waited in the lobby."""

    meeting_started_at: Timestamp | None = None
    meeting_ended_at: Timestamp
    participants: list[ParticipantAttendance] = Field(default_factory=list, max_length=500)


PAYLOAD_MODELS: dict[tuple[str, int], type[Payload]] = {
    (Topic.APPOINTMENT_CREATED, 1): AppointmentCreatedV1,
    (Topic.PATIENT_JOINED, 1): PatientJoinedV1,
    (Topic.MEETING_ENDED, 1): MeetingEndedV1,
}

P = TypeVar("P", bound=Payload)


class Envelope(BaseModel, Generic[P]):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    type: str = Field(max_length=100)
    version: int = Field(ge=1)
    occurred_at: Timestamp = Field(default_factory=lambda: datetime.now(UTC))
    tenant_id: str = Field(min_length=1, max_length=100)
    key: str = Field(min_length=1, max_length=200, description="the appointment key")
    payload: P

    @field_validator("occurred_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)


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


def decode_event(raw: bytes | None) -> Envelope[Any]:
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
        PAYLOAD_MODELS.get((event_type, version))
        if isinstance(event_type, str) and isinstance(version, int)
        else None
    )
    if model is None:
        raise UndeliverableEvent(f"unknown event type or version: {event_type!r} v{version!r}")
    try:
        return Envelope[model].model_validate_json(raw)  # type: ignore[valid-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise UndeliverableEvent(f"invalid {event_type} v{version}: {problems}") from None
