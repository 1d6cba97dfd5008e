from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from pydantic import ValidationError

from libs.common.events import (
    AppointmentCreatedV1,
    MeetingEndedV1,
    ParticipantAdmittedV1,
    ParticipantAttendance,
    Topic,
    UndeliverableEvent,
    decode_event,
    encode_event,
    make_event,
)
from libs.common.keys import appointment_key

NOW = datetime(2026, 11, 25, 15, 0, tzinfo=UTC)


def created() -> AppointmentCreatedV1:
    return AppointmentCreatedV1(
        integration_id=uuid.uuid4(),
        environment="test",
        department="Cardiology",
        starts_at=NOW,
        ends_at=NOW + timedelta(minutes=30),
        time_zone="America/Chicago",
    )


def test_envelope_round_trips_through_orjson() -> None:
    """An encoded event decodes to an equal envelope with its typed payload."""
    event = make_event(Topic.APPOINTMENT_CREATED, "tenant-a", "apt_1", created())
    decoded = decode_event(encode_event(event))
    assert decoded == event
    assert isinstance(decoded.payload, AppointmentCreatedV1)


def test_each_topic_has_its_own_payload_model() -> None:
    """meeting-ended decodes to its own model with per-participant attendance."""
    payload = MeetingEndedV1(
        meeting_ended_at=NOW,
        participants=[
            ParticipantAttendance(participant="p1", role="patient", lobby_entered_at=NOW)
        ],
    )
    decoded = decode_event(encode_event(make_event(Topic.MEETING_ENDED, "t", "k", payload)))
    assert isinstance(decoded.payload, MeetingEndedV1)
    assert decoded.payload.participants[0].role == "patient"


def test_occurred_at_is_normalised_to_utc() -> None:
    """A non-UTC timestamp is stored as UTC."""
    document = orjson.loads(
        encode_event(make_event(Topic.APPOINTMENT_CREATED, "t", "k", created()))
    )
    document["occurred_at"] = "2026-11-25T10:00:00-05:00"
    assert decode_event(orjson.dumps(document)).occurred_at == NOW


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1,2]", "not a JSON object"),
        (None, "empty message"),
        (b'{"type":"appointment-created","version":99}', "unknown event type or version"),
        (b'{"type":"no-such-topic","version":1}', "unknown event type or version"),
    ],
)
def test_undecodable_messages_carry_a_reason(raw: bytes | None, reason: str) -> None:
    """Malformed or unknown messages raise UndeliverableEvent with a readable reason."""
    with pytest.raises(UndeliverableEvent, match=reason):
        decode_event(raw)


def test_payload_with_unexpected_field_is_refused() -> None:
    """A payload that changed shape without a version bump is refused, not half-read."""
    document = orjson.loads(
        encode_event(make_event(Topic.APPOINTMENT_CREATED, "t", "k", created()))
    )
    document["payload"]["patient_name"] = "Jane Doe"
    with pytest.raises(UndeliverableEvent, match=r"payload\.patient_name"):
        decode_event(orjson.dumps(document))


def test_invalid_reason_does_not_echo_the_input() -> None:
    """The dead-letter reason names the field, not the offending value."""
    document = orjson.loads(
        encode_event(make_event(Topic.APPOINTMENT_CREATED, "t", "k", created()))
    )
    document["payload"]["starts_at"] = "+15550101234"  # lax parsing would read a timestamp
    with pytest.raises(UndeliverableEvent) as info:
        decode_event(orjson.dumps(document))
    assert "+15550101234" not in info.value.reason


def test_appointment_key_is_stable_opaque_and_keyed() -> None:
    """The same inputs give the same key; the key hides the FHIR id; the secret matters."""
    integration = uuid.uuid4()
    first = appointment_key("s1", integration, "4711")
    assert first == appointment_key("s1", integration, "4711")
    assert "4711" not in first
    assert first != appointment_key("s2", integration, "4711")
    assert first != appointment_key("s1", uuid.uuid4(), "4711")


@pytest.mark.parametrize(
    ("at", "kept"),
    [
        ("0001-01-01T00:00:00Z", False),  # .NET DateTime.MinValue: stored as -infinity
        ("9999-12-31T23:59:59.9999999Z", False),  # .NET DateTime.MaxValue: stored as infinity
        ("0001-01-01T03:00:00Z", False),  # before year 1 once a US zone shifts it
        ("1969-12-31T23:59:59Z", False),
        ("9000-01-01T00:00:00Z", False),
        ("1970-01-01T00:00:00Z", True),
        ("8999-12-31T23:59:59+00:00", True),
    ],
)
def test_event_times_lie_within_the_years_1970_to_8999(at: str, kept: bool) -> None:
    """An event refuses a time outside the years 1970 to 8999, whose zone shifts and database
    round trips can overflow."""
    try:
        ParticipantAdmittedV1(participant="pp_dr", role="organizer", admitted_at=at)
    except ValidationError:
        assert not kept
    else:
        assert kept
