"""A whole visit through the real topics: the launch and notify events on Kafka become
figures in the report API and in /metrics within 5 seconds of meeting-ended."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import UTC, datetime, timedelta

from libs.common.events import encode_event
from libs.common.kafka import create_producer
from libs.common.web import CONSUMERS
from sandbox.microsoft.directory import CONTOSO_TENANT
from tests.analytics.conftest import CONTOSO_REPORTS, Analytics
from tests.analytics.visits import Person, Visit, events
from tests.conftest import KAFKA, metrics_url, wait_for


def _metric(text: str, name: str, department: str) -> float:
    pattern = rf'^{name}\{{[^}}]*department="{re.escape(department)}"[^}}]*\}} (\S+)$'
    values = [float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE)]
    return sum(values)


async def test_visit_events_on_kafka_reach_the_report_and_metrics(
    analytics: Analytics, topic_prefix: str
) -> None:
    """Booking, lobby, admissions, leaves, an SMS and meeting-ended, published to Kafka,
    show in /reports and /metrics within seconds of meeting-ended."""
    department = f"Neurology {uuid.uuid4().hex[:6]}"
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=40)
    visit = Visit(
        key=f"apt-{uuid.uuid4().hex}",
        tenant_id=CONTOSO_TENANT,
        department=department,
        environment="production",
        people=[
            Person("dr", "organizer", None, [(start, start + timedelta(minutes=30))]),
            Person(
                "pt",
                "patient",
                start - timedelta(seconds=90),
                [
                    (start + timedelta(minutes=1), start + timedelta(minutes=12)),
                    (start + timedelta(minutes=14), start + timedelta(minutes=31)),
                ],
            ),
        ],
        ended_at=start + timedelta(minutes=31),
        sms_sent=1,
    )
    stream = events(visit)
    ended = asyncio.Event()
    final_id = str(stream[-1].event_id)
    for runner in analytics.app[CONSUMERS]:
        runner.observe(
            lambda outcomes: ended.set() if any(e == final_id for _, e, _ in outcomes) else None
        )
    producer = create_producer(KAFKA)
    await producer.start()
    try:
        for event in stream[:-1]:
            await producer.send_and_wait(
                topic_prefix + event.type, encode_event(event), key=event.key.encode()
            )
        sent_at = time.monotonic()
        final = stream[-1]
        await producer.send_and_wait(
            topic_prefix + final.type, encode_event(final), key=final.key.encode()
        )
    finally:
        await producer.stop()
    # Bounds loose enough for a loaded CI machine (it takes well under a second here).
    await wait_for(ended, "meeting-ended applied", within_s=20)

    # The meeting is filed under its first admission, a minute after `start`: 23:59:30 and
    # 00:00:30 are two days.
    day = (start + timedelta(minutes=1)).date().isoformat()
    status, body, _ = await analytics.get(CONTOSO_REPORTS, f"/reports/meetings?from={day}&to={day}")
    assert time.monotonic() - sent_at < 20
    assert status == 200
    meeting = next(m for m in body["meetings"] if m["meeting_id"] == visit.key)
    assert meeting == {
        "meeting_id": visit.key,
        "start_time": (start + timedelta(minutes=1)).isoformat(),
        "lobby_wait_s": 150.0,
        "duration_s": 30 * 60.0,
        "status": "Completed",
        "attendees": 2,
        "department": department,
        "environment": "production",
        "sms_sent": 1,
    }
    _, usage, _ = await analytics.get(
        CONTOSO_REPORTS, f"/reports/usage?from={day}&to={day}&group_by=department"
    )
    row = next(r for r in usage["rows"] if r["group"] == department)
    assert (row["appointments"], row["completed"], row["sms_sent"]) == (1, 1, 1)

    async with analytics.http.get(metrics_url(analytics.app)) as r:
        metrics = await r.text()
    assert _metric(metrics, "appointments_total", department) == 1
    assert _metric(metrics, "lobby_wait_seconds_sum", department) == 150
    assert _metric(metrics, "appointment_duration_seconds_count", department) == 1
    assert _metric(metrics, "appointment_sms_sent_total", department) == 1
    assert 'analytics_event_to_fact_seconds_count{environment="production"}' in metrics
    assert f'kafka_consumer_lag_messages{{consumer="{topic_prefix}analytics"' in metrics
