"""Event envelope encode+decode (pydantic validation included) against bare orjson on the
same document: what our typing and validation cost per event."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import orjson

from bench.harness import Result, rate, timed
from libs.common.events import AppointmentCreatedV1, Topic, decode_event, encode_event, make_event


async def run(smoke: bool) -> Result:
    now = datetime.now(UTC)
    event = make_event(
        Topic.APPOINTMENT_CREATED,
        "tenant-bench",
        "apt_bench",
        AppointmentCreatedV1(
            integration_id=uuid.uuid4(),
            environment="production",
            department="Cardiology",
            starts_at=now,
            ends_at=now + timedelta(minutes=30),
            time_zone="America/Chicago",
            join_url="https://connector.example/join/abc",
        ),
    )
    document = event.model_dump(mode="json")
    repeat = 2_000 if smoke else 50_000
    ours = timed(lambda: decode_event(encode_event(event)), repeat)
    bare = timed(lambda: orjson.loads(orjson.dumps(document)), repeat)
    figure, baseline = rate(repeat, ours), rate(repeat, bare)
    ratio = figure / baseline
    return Result(
        name="event envelope encode+decode",
        figure=figure,
        unit="ev/s",
        baseline=baseline,
        ratio=ratio,
        goal=">= 0.05x orjson",
        meets_goal=ratio >= 0.05,
    )
