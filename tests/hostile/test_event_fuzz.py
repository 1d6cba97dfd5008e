"""Hostile bytes on every topic: `decode_event` either returns a valid event or raises its one
documented error, `UndeliverableEvent`; valid payloads survive encode/decode unchanged; and a
real ConsumerRunner on real Kafka parks poison in the dead-letter topic and carries on.

The payload strategies are derived from the pydantic models themselves, so a new topic or a
new field is fuzzed without touching this file (an annotation the deriver does not know fails
the test instead of being skipped)."""

from __future__ import annotations

import asyncio
import json
import random
import types
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import AwareDatetime, BaseModel

from libs.common.events import (
    PAYLOAD_MODELS,
    Envelope,
    Payload,
    Topic,
    UndeliverableEvent,
    dead_letter_topic,
    decode_event,
    encode_event,
    make_event,
)
from libs.common.kafka import ConsumerRunner
from tests.conftest import KAFKA, wait_for
from tests.support.kafka_reader import read_all_records
from tests.support.probe import (
    effects_count,
    patient_joined,
    probe_kit,
    probe_runner,
    publish,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
TOPICS = sorted({topic for topic, _ in PAYLOAD_MODELS})
JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
# Date-times near the ends of the calendar, impossible dates and Unix times in strings.
AWKWARD_TIMES = [
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "9999-12-31T23:59:59.999999-23:59",
    "2026-02-30T10:00:00Z",
    "2026-01-01T25:00:00Z",
    "2026-01-01T10:00:00",
    "1732546800",
    "2026-01-01T10:00:00+99:00",
]
HUGE = "x" * 300_000


# --- valid payloads, derived from the models --------------------------------------------------


def _constraint(metadata: list[Any], kind: type[Any], name: str) -> Any:
    for item in metadata:
        if isinstance(item, kind):
            return getattr(item, name)
    return None


def _pattern(metadata: list[Any]) -> str | None:
    for item in metadata:
        pattern = getattr(item, "pattern", None)
        if isinstance(pattern, str):
            return pattern
    return None


TIMES = st.datetimes(
    min_value=datetime(1971, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]) | st.timezones(),
)


def strategy_for(annotation: Any, metadata: list[Any]) -> st.SearchStrategy[Any]:
    """Valid Python values for a payload field's annotation and constraints."""
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *extra = get_args(annotation)
        return strategy_for(inner, [*extra, *metadata])
    if origin in (Union, types.UnionType):
        return st.one_of([strategy_for(arg, metadata) for arg in get_args(annotation)])
    if annotation is type(None):
        return st.none()
    if origin is Literal:
        return st.sampled_from(get_args(annotation))
    max_len = _constraint(metadata, annotated_types.MaxLen, "max_length")
    if origin is list:
        (item,) = get_args(annotation)
        return st.lists(strategy_for(item, []), max_size=min(max_len or 3, 3))
    if origin is dict:
        key, value = get_args(annotation)
        return st.dictionaries(strategy_for(key, []), strategy_for(value, []), max_size=3)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_values(annotation)
    if annotation is uuid.UUID:
        return st.uuids()
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        low = _constraint(metadata, annotated_types.Ge, "ge") or 0
        high = _constraint(metadata, annotated_types.Le, "le")
        return st.integers(min_value=low, max_value=high if high is not None else 2**31)
    if annotation is str:
        pattern = _pattern(metadata)
        if pattern is not None:
            return st.from_regex(pattern, fullmatch=True, alphabet=st.characters(codec="ascii"))
        return st.text(max_size=min(max_len or 40, 40))
    if annotation in (AwareDatetime, datetime):
        return TIMES
    raise TypeError(f"no fuzz strategy for {annotation!r}: teach strategy_for about it")


def model_values(model: type[BaseModel]) -> st.SearchStrategy[Any]:
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, field in model.model_fields.items():
        strategy = strategy_for(field.annotation, list(field.metadata))
        (required if field.is_required() else optional)[name] = strategy
    return st.fixed_dictionaries(required, optional=optional).map(model.model_validate)


def events(topic: str) -> st.SearchStrategy[Envelope[Any]]:
    model = PAYLOAD_MODELS[(topic, 1)]
    return st.builds(
        lambda payload, tenant, key: make_event(Topic(topic), tenant, key, payload),
        model_values(model),
        st.text(min_size=1, max_size=100),
        st.text(min_size=1, max_size=200),
    )


ANY_EVENT = st.sampled_from(TOPICS).flatmap(events)


def dumps(document: Any) -> bytes:
    """JSON as any producer might write it: the stdlib also writes integers beyond 64 bits
    and Infinity, which orjson refuses to."""
    return json.dumps(document).encode()


def decodes_or_refuses(raw: bytes | None, topic: str | None = None) -> Envelope[Any] | None:
    """The event, or None when refused with UndeliverableEvent; anything else propagates."""
    try:
        return decode_event(raw, topic)
    except UndeliverableEvent as exc:
        if not exc.reason:
            raise AssertionError("an UndeliverableEvent must say why") from None
        return None


# --- mutations of a valid envelope ------------------------------------------------------------

Document = dict[str, Any]


def _target(doc: Document, data: st.DataObject) -> tuple[Document, str]:
    """A random (object, field) in the envelope or its payload."""
    payload = doc.get("payload")
    use_payload = isinstance(payload, dict) and payload and not data.draw(st.booleans(), "top")
    container = payload if use_payload else doc
    assert isinstance(container, dict)
    return container, data.draw(st.sampled_from(sorted(container)), "field")


def _wrong_type(doc: Document, data: st.DataObject) -> None:
    container, name = _target(doc, data)
    container[name] = data.draw(JSON, "wrong value")


def _huge(doc: Document, data: st.DataObject) -> None:
    container, name = _target(doc, data)
    container[name] = HUGE


def _version(doc: Document, data: st.DataObject) -> None:
    doc["version"] = data.draw(
        st.integers() | st.just(True) | st.floats(allow_nan=False) | st.text(), "version"
    )


def _topic(doc: Document, data: st.DataObject) -> None:
    doc["type"] = data.draw(st.sampled_from(TOPICS) | st.text(max_size=300), "type")


def _extra(doc: Document, data: st.DataObject) -> None:
    payload = doc.get("payload")
    container = payload if isinstance(payload, dict) and data.draw(st.booleans()) else doc
    name = data.draw(st.text(min_size=1, max_size=20), "extra field")
    container.setdefault(name, data.draw(JSON, "extra value"))


def _drop(doc: Document, data: st.DataObject) -> None:
    container, name = _target(doc, data)
    container.pop(name, None)


def _awkward_time(doc: Document, data: st.DataObject) -> None:
    payload = doc.get("payload")
    times = [
        k
        for k, v in (payload.items() if isinstance(payload, dict) else ())
        if isinstance(v, str) and v[:2] in ("19", "20", "21")
    ]
    container: Document = doc
    name = "occurred_at"
    in_payload: bool = data.draw(st.booleans(), "in payload")
    if isinstance(payload, dict) and times and in_payload:
        container, name = payload, data.draw(st.sampled_from(times), "time field")
    container[name] = data.draw(st.sampled_from(AWKWARD_TIMES), "time")


MUTATIONS: list[Callable[[Document, st.DataObject], None]] = [
    _wrong_type,
    _huge,
    _version,
    _topic,
    _extra,
    _drop,
    _awkward_time,
]


@FUZZ
@given(raw=st.binary(max_size=2000) | st.none())
def test_random_bytes_decode_or_refuse(raw: bytes | None) -> None:
    """Arbitrary bytes (or a tombstone) decode to an event or raise UndeliverableEvent only."""
    for topic in (None, *TOPICS):
        decodes_or_refuses(raw, topic)


@FUZZ
@given(document=JSON, nesting=st.integers(min_value=0, max_value=3000))
def test_random_json_decode_or_refuse(document: Any, nesting: int) -> None:
    """Arbitrary JSON, including nesting deeper than the parser allows, is refused cleanly."""
    decodes_or_refuses(dumps(document))
    decodes_or_refuses(b"[" * nesting + dumps(document) + b"]" * nesting)
    decodes_or_refuses(dumps({"type": "patient-joined", "version": 1, "payload": document}))


@FUZZ
@given(event=ANY_EVENT, data=st.data())
def test_mutated_envelopes_decode_or_refuse(event: Envelope[Any], data: st.DataObject) -> None:
    """An envelope with wrong types, huge strings, unknown versions, extra or missing fields,
    another topic or an out-of-range date-time is a valid event or an UndeliverableEvent."""
    document = orjson.loads(encode_event(event))
    for mutate in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        mutate(document, data)
    raw = dumps(document)
    decoded = decodes_or_refuses(raw, event.type)
    if decoded is not None:
        assert decoded.type == event.type
        assert isinstance(decoded.payload, PAYLOAD_MODELS[(decoded.type, decoded.version)])
    decodes_or_refuses(raw)


@FUZZ
@given(event=ANY_EVENT)
def test_valid_events_round_trip_unchanged(event: Envelope[Any]) -> None:
    """Encoding then decoding a valid event of any topic gives the same event and bytes."""
    raw = encode_event(event)
    decoded = decode_event(raw, event.type)
    assert decoded == event
    assert type(decoded.payload) is type(event.payload)
    assert encode_event(decoded) == raw


@FUZZ
@given(event=ANY_EVENT, other=st.sampled_from(TOPICS))
def test_event_on_another_topic_is_undeliverable(event: Envelope[Any], other: str) -> None:
    """A valid event read from a topic that is not its own is refused with the reason."""
    if other == event.type:
        return
    with pytest.raises(UndeliverableEvent, match="does not belong on topic"):
        decode_event(encode_event(event), other)


def test_every_topic_has_a_fuzzable_payload() -> None:
    """Every Topic has a current payload model the strategies can build (none forgotten)."""
    assert set(TOPICS) == {t.value for t in Topic}
    for (topic, _), model in PAYLOAD_MODELS.items():
        assert issubclass(model, Payload), topic
        model_values(model)  # raises TypeError for an annotation the fuzzer cannot build


# --- the real consumer runner on real Kafka -----------------------------------------------


def _valid_document(rng: random.Random) -> Document:
    event = patient_joined("apt_fuzz")
    document: Document = orjson.loads(encode_event(event))
    document["event_id"] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return document


def poison_messages(seed: int = 20260501, fuzzed: int = 25) -> list[bytes | None]:
    """Hand-picked poison plus seeded random mutations; every one must be undeliverable on
    the patient-joined topic."""
    rng = random.Random(seed)
    other_topic = make_event(
        Topic.SMS_REQUESTED,
        "tenant-probe",
        "apt_fuzz",
        PAYLOAD_MODELS[(Topic.SMS_REQUESTED, 1)].model_validate(
            {"integration_id": str(uuid.uuid4()), "requested_at": datetime.now(UTC)}
        ),
    )
    fixed: list[bytes | None] = [
        None,
        b"",
        b"\xff\xfe\x00garbage",
        b"null",
        b"[]",
        b'"patient-joined"',
        b"[" * 5000,
        encode_event(other_topic),
    ]
    for field, value in (
        ("version", 2),
        ("version", True),
        ("type", "patient-joined.v2"),
        ("occurred_at", "0001-01-01T00:00:00+01:00"),
        ("occurred_at", "9999-12-31T23:59:59-01:00"),
        ("tenant_id", HUGE),
        ("event_id", "not-a-uuid"),
        ("unexpected", 1),
    ):
        document = _valid_document(rng)
        document[field] = value
        fixed.append(dumps(document))
    for _ in range(fuzzed):
        document = _valid_document(rng)
        name = rng.choice([*sorted(document["payload"]), "occurred_at", "key"])
        container = document["payload"] if name in document["payload"] else document
        container[name] = rng.choice(
            [None, 12, [], {"x": 1}, "", HUGE, rng.randbytes(8).hex(), *AWKWARD_TIMES]
        )
        raw = dumps(document)
        if decodes_or_refuses(raw, Topic.PATIENT_JOINED) is None:
            fixed.append(raw)
    for message in fixed:
        assert decodes_or_refuses(message, Topic.PATIENT_JOINED) is None, message
    return fixed


@pytest.fixture
async def probe(
    database_url: str, topic_prefix: str
) -> AsyncIterator[tuple[asyncpg.Pool, AIOKafkaProducer]]:
    async with probe_kit(KAFKA, database_url, topic_prefix) as kit:
        yield kit


async def test_runner_parks_fuzzed_poison_and_still_applies_the_next_event(
    probe: tuple[asyncpg.Pool, AIOKafkaProducer], topic_prefix: str
) -> None:
    """A batch of poison on one partition goes to the dead-letter topic, each with its reason,
    and the valid event behind it is applied exactly once."""
    pool, producer = probe
    topic = topic_prefix + Topic.PATIENT_JOINED
    poison = poison_messages()
    for value in poison:
        await producer.send_and_wait(topic, value=value, key=b"apt_fuzz")
    valid = patient_joined("apt_fuzz")
    await publish(producer, topic_prefix, valid)
    runner: ConsumerRunner = probe_runner(pool, producer, KAFKA, topic_prefix, "fuzz")
    applied = asyncio.Event()
    runner.observe(
        lambda outcomes: (
            applied.set() if any(e == str(valid.event_id) and ok for _, e, ok in outcomes) else None
        )
    )
    await runner.start()
    try:
        await wait_for(applied, "the valid event behind the poison")
    finally:
        await runner.stop()
    assert await effects_count(pool) == 1
    parked = await read_all_records(dead_letter_topic(topic), expect=len(poison))
    assert len(parked) == len(poison)
    assert [r.value for r in sorted(parked, key=lambda r: r.offset)] == poison
    for record in parked:
        headers = dict(record.headers)
        expected = decodes_or_refuses_reason(record.value)
        shown = headers["reason"].decode(errors="ignore")
        assert shown == expected.encode()[:1000].decode(errors="ignore")
        assert headers["consumer"].decode() == topic_prefix + "fuzz"
        assert headers["source-topic"].decode() == topic


def decodes_or_refuses_reason(raw: bytes | None) -> str:
    try:
        decode_event(raw, Topic.PATIENT_JOINED)
    except UndeliverableEvent as exc:
        return exc.reason
    raise AssertionError("expected poison")
