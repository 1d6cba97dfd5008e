"""A rescheduled visit moves its Teams meeting in Graph: the reschedule marks the visit in its
own transaction and the meeting worker PATCHes the meeting, clearing the mark only if the
schedule version it sent is still current."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import structlog
from aiokafka import AIOKafkaProducer

from libs.common.events import AppointmentCreatedV1, AppointmentRescheduledV1, decode_event
from libs.common.web import DB_POOL
from sandbox.ehr import TENANT_A
from sandbox.microsoft.clock import parse_time
from sandbox.microsoft.directory import FABRIKAM_TENANT
from services.launch.meeting_preparation import (
    MEETING_MOVES,
    MEETING_WAKE,
    MoveOutcome,
    prepare_meeting,
)
from services.launch.state import GRAPH, INTEGRATIONS
from tests.conftest import wait_for
from tests.launch.test_visit_end_to_end import book_video_visit
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import (
    ORGANIZER,
    LaunchSystem,
    integration_config,
    publish_integration,
)

Seen = tuple[str, MoveOutcome, int]


class Moves:
    """The meeting worker's move outcomes, as it reports them, to wait on."""

    def __init__(self, system: LaunchSystem) -> None:
        self.seen: list[Seen] = []
        self._changed = asyncio.Event()
        system.app[MEETING_MOVES].append(self._observe)

    def _observe(self, key: str, outcome: MoveOutcome, version: int) -> None:
        self.seen.append((key, outcome, version))
        self._changed.set()

    def of(self, key: str) -> list[tuple[MoveOutcome, int]]:
        return [(outcome, version) for k, outcome, version in self.seen if k == key]

    async def until(self, done: Callable[[list[Seen]], bool], what: str) -> None:
        while not done(self.seen):
            self._changed.clear()
            await wait_for(self._changed, what)


def _at(minutes: int) -> datetime:
    return (datetime.now(UTC) + timedelta(minutes=minutes)).replace(microsecond=0)


async def _booked(
    http: aiohttp.ClientSession, system: LaunchSystem, topic_prefix: str, starts_in: timedelta
) -> tuple[str, AppointmentCreatedV1, str]:
    """A video visit booked in the EHR: its FHIR id, its appointment-created and key."""
    appointment = await book_video_visit(http, system, starts_in)
    (raw,) = await read_all(topic_prefix + "appointment-created", expect=1)
    created = decode_event(raw)
    assert isinstance(created.payload, AppointmentCreatedV1)
    return str(appointment["id"]), created.payload, created.key


async def _reschedule(
    http: aiohttp.ClientSession, system: LaunchSystem, appointment: str, start: datetime, mins: int
) -> None:
    """Moves the appointment in the EHR, which sends the signed `rescheduled` event."""
    base = f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}/appointments"
    body = {"start": start.isoformat(), "minutes": mins}
    async with http.post(f"{base}/{appointment}/reschedule", json=body) as r:
        assert r.status == 200, await r.text()


async def _rescheduled(topic_prefix: str, expect: int) -> list[AppointmentRescheduledV1]:
    payloads = []
    for raw in await read_all(topic_prefix + "appointment-rescheduled", expect=expect):
        payload = decode_event(raw).payload
        assert isinstance(payload, AppointmentRescheduledV1)
        payloads.append(payload)
    assert len(payloads) == expect
    return payloads


async def _teams_meeting(
    system: LaunchSystem, microsoft_http: aiohttp.ClientSession, key: str
) -> dict[str, Any]:
    async with microsoft_http.get(f"{system.microsoft.base_url}/_sandbox/meetings") as r:
        (meeting,) = [m for m in await r.json() if m["externalId"] == key]
    return dict(meeting)


def _times(meeting: dict[str, Any]) -> tuple[datetime, datetime]:
    return parse_time(meeting["startDateTime"]), parse_time(meeting["endDateTime"])


async def _mark(system: LaunchSystem, key: str) -> dict[str, Any]:
    row = await system.app[DB_POOL].fetchrow(
        "SELECT meeting_times_stale, meeting_move_attempts, schedule_version,"
        " meeting_move_retry_at > now() AS later FROM appointments WHERE appointment_key = $1",
        key,
    )
    assert row is not None
    return dict(row)


async def _prepared(system: LaunchSystem, key: str) -> None:
    # The worker may be preparing it: this waits on the row's lock and finds it made.
    assert await prepare_meeting(system.app, key) in ("prepared", "ready")


async def _retry_now(system: LaunchSystem, key: str) -> None:
    """The backoff (or a dead worker's lease) is over: the visit is due again."""
    await system.app[DB_POOL].execute(
        "UPDATE appointments SET meeting_move_retry_at = now() WHERE appointment_key = $1", key
    )
    system.app[MEETING_WAKE].set()


async def _use_ms_tenant(
    system: LaunchSystem, producer: AIOKafkaProducer, topic_prefix: str, tenant: str, version: int
) -> None:
    """The admin points the integration at another Microsoft 365 tenant (or back)."""
    applied = asyncio.Event()
    system.consumer.observe(lambda outcomes: applied.set() if outcomes else None)
    config = integration_config(system.settings, system.integration_id, system.fhir_base)
    changed = config.model_copy(update={"ms_tenant_id": tenant, "config_version": version})
    await publish_integration(producer, topic_prefix, "contoso", changed)
    await wait_for(applied, f"the gateway to apply integration version {version}")
    system.app[INTEGRATIONS].invalidate()


async def test_a_rescheduled_visit_moves_its_meeting(
    launch_system: LaunchSystem, topic_prefix: str, microsoft_http: aiohttp.ClientSession
) -> None:
    """Rescheduled after its meeting was made, the visit's Teams meeting takes the new times
    with one PATCH, and the mark is cleared."""
    system = launch_system
    moves = Moves(system)
    async with aiohttp.ClientSession() as http:
        appointment, created, key = await _booked(http, system, topic_prefix, timedelta(hours=1))
        await _prepared(system, key)
        before = await _teams_meeting(system, microsoft_http, key)
        assert _times(before) == (created.starts_at, created.ends_at)
        new_start = _at(180)
        await _reschedule(http, system, appointment, new_start, 45)
        (moved,) = await _rescheduled(topic_prefix, 1)
    await moves.until(lambda seen: (key, "moved", moved.schedule_version) in seen, "the move")
    meeting = await _teams_meeting(system, microsoft_http, key)
    assert meeting["id"] == before["id"]
    assert _times(meeting) == (new_start, new_start + timedelta(minutes=45))
    assert meeting["updateCount"] == 1
    mark = await _mark(system, key)
    assert not mark["meeting_times_stale"]
    assert mark["meeting_move_attempts"] == 0
    assert moves.of(key) == [("moved", moved.schedule_version)]


async def test_two_reschedules_in_a_row_leave_the_last_times(
    launch_system: LaunchSystem, topic_prefix: str, microsoft_http: aiohttp.ClientSession
) -> None:
    """Two reschedules back to back: the meeting ends with the second one's times."""
    system = launch_system
    moves = Moves(system)
    async with aiohttp.ClientSession() as http:
        appointment, _, key = await _booked(http, system, topic_prefix, timedelta(hours=1))
        await _prepared(system, key)
        await _reschedule(http, system, appointment, _at(120), 30)
        last_start = _at(240)
        await _reschedule(http, system, appointment, last_start, 20)
        _, last = await _rescheduled(topic_prefix, 2)
    await moves.until(lambda seen: (key, "moved", last.schedule_version) in seen, "the last move")
    meeting = await _teams_meeting(system, microsoft_http, key)
    assert _times(meeting) == (last_start, last_start + timedelta(minutes=20))
    assert not (await _mark(system, key))["meeting_times_stale"]


async def test_a_reschedule_during_the_patch_is_sent_after_it(
    launch_system: LaunchSystem,
    topic_prefix: str,
    microsoft_http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second reschedule committed while the first one's PATCH is in flight (the worker
    holds no lock the webhook waits on) is not lost: the first PATCH's outcome is
    'superseded', the mark stays, and a second PATCH sends the newer times."""
    system = launch_system
    moves = Moves(system)
    graph = system.app[GRAPH]
    real_update = graph.update_meeting_times
    sent: list[datetime] = []
    first_start, second_start = _at(120), _at(300)
    async with aiohttp.ClientSession() as http:
        appointment, _, key = await _booked(http, system, topic_prefix, timedelta(hours=1))
        await _prepared(system, key)

        async def second_reschedule_meanwhile(*args: Any, **kwargs: Any) -> Any:
            sent.append(kwargs["starts_at"])
            if len(sent) == 1:
                await _reschedule(http, system, appointment, second_start, 30)
                await _rescheduled(topic_prefix, 2)  # committed by the gateway
            return await real_update(*args, **kwargs)

        monkeypatch.setattr(graph, "update_meeting_times", second_reschedule_meanwhile)
        await _reschedule(http, system, appointment, first_start, 30)
        await moves.until(lambda seen: any(s[1] == "moved" for s in seen), "the second move")
    first, second = await _rescheduled(topic_prefix, 2)
    assert moves.of(key) == [
        ("superseded", first.schedule_version),
        ("moved", second.schedule_version),
    ]
    assert sent == [first_start, second_start]
    meeting = await _teams_meeting(system, microsoft_http, key)
    assert _times(meeting) == (second_start, second_start + timedelta(minutes=30))
    assert meeting["updateCount"] == 2
    assert not (await _mark(system, key))["meeting_times_stale"]


async def test_a_visit_rescheduled_before_its_meeting_is_made_needs_no_patch(
    launch_system: LaunchSystem, topic_prefix: str, microsoft_http: aiohttp.ClientSession
) -> None:
    """A visit without its meeting yet is not marked: the meeting is made later with the new
    times, and never PATCHed."""
    system = launch_system
    moves = Moves(system)
    async with aiohttp.ClientSession() as http:
        appointment, _, key = await _booked(http, system, topic_prefix, timedelta(days=20))
        new_start = _at(30)
        await _reschedule(http, system, appointment, new_start, 40)
        await _rescheduled(topic_prefix, 1)
    assert not (await _mark(system, key))["meeting_times_stale"]
    await _prepared(system, key)
    meeting = await _teams_meeting(system, microsoft_http, key)
    assert _times(meeting) == (new_start, new_start + timedelta(minutes=40))
    assert meeting["updateCount"] == 0
    assert not (await _mark(system, key))["meeting_times_stale"]
    assert moves.of(key) == []


async def test_a_meeting_made_before_a_crash_takes_the_new_times_when_prepared(
    launch_system: LaunchSystem, topic_prefix: str, microsoft_http: aiohttp.ClientSession
) -> None:
    """A meeting Graph made before the gateway crashed (so never recorded, never marked)
    keeps the old times in Graph; createOrGet returns it as it is, so preparing the visit
    after the reschedule moves it to the new times."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        appointment, created, key = await _booked(http, system, topic_prefix, timedelta(days=20))
        config = integration_config(system.settings, system.integration_id, system.fhir_base)
        orphan, made = await system.app[GRAPH].create_or_get_meeting(
            config.ms_tenant_id,
            ORGANIZER,
            external_id=key,
            starts_at=created.starts_at,
            ends_at=created.ends_at,
            subject="Video visit (General Medicine)",
        )
        assert made
        new_start = _at(30)
        await _reschedule(http, system, appointment, new_start, 30)
        await _rescheduled(topic_prefix, 1)
    await _prepared(system, key)
    meeting = await _teams_meeting(system, microsoft_http, key)
    assert meeting["id"] == orphan.id
    assert _times(meeting) == (new_start, new_start + timedelta(minutes=30))


async def _move_refused_once(
    system: LaunchSystem,
    producer: AIOKafkaProducer,
    topic_prefix: str,
    http: aiohttp.ClientSession,
    moves: Moves,
) -> tuple[str, str, datetime]:
    """A visit with its meeting, rescheduled while Graph refuses the PATCH (the integration
    points at another Microsoft 365 tenant, where the organizer is not found): the move
    failed once and waits for its retry. Its FHIR id, key and new start."""
    appointment, _, key = await _booked(http, system, topic_prefix, timedelta(hours=1))
    await _prepared(system, key)
    await _use_ms_tenant(system, producer, topic_prefix, FABRIKAM_TENANT, version=2)
    new_start = _at(150)
    await _reschedule(http, system, appointment, new_start, 30)
    await _rescheduled(topic_prefix, 1)
    await moves.until(lambda seen: (key, "failed") in [s[:2] for s in seen], "a failed move")
    mark = await _mark(system, key)
    assert mark["meeting_times_stale"]
    assert mark["meeting_move_attempts"] == 1
    assert mark["later"]
    return appointment, key, new_start


async def test_a_refused_patch_is_retried(
    launch_system: LaunchSystem,
    producer: AIOKafkaProducer,
    topic_prefix: str,
    microsoft_http: aiohttp.ClientSession,
) -> None:
    """A PATCH Graph refuses keeps the mark and is retried after the worker's backoff; the
    retry moves the meeting and clears the mark. The failure is logged by appointment key
    only."""
    system = launch_system
    moves = Moves(system)
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as http:
            _, key, new_start = await _move_refused_once(
                system, producer, topic_prefix, http, moves
            )
    original = integration_config(system.settings, system.integration_id, system.fhir_base)
    await _use_ms_tenant(system, producer, topic_prefix, original.ms_tenant_id, version=3)
    await _retry_now(system, key)
    await moves.until(lambda seen: (key, "moved") in [s[:2] for s in seen], "the retried move")
    meeting = await _teams_meeting(system, microsoft_http, key)
    assert _times(meeting) == (new_start, new_start + timedelta(minutes=30))
    assert meeting["updateCount"] == 1
    mark = await _mark(system, key)
    assert not mark["meeting_times_stale"]
    assert mark["meeting_move_attempts"] == 0
    (failure,) = [e for e in logs if e.get("event") == "meeting move failed, will retry"]
    assert failure["appointment_key"] == key
    assert failure["error"] == "Graph answered 404 (NotFound)"
    assert set(failure) == {
        "event",
        "log_level",
        "appointment_key",
        "attempt",
        "retry_in_s",
        "error",
    }


async def test_a_cancelled_visit_is_not_moved(
    launch_system: LaunchSystem,
    producer: AIOKafkaProducer,
    topic_prefix: str,
    microsoft_http: aiohttp.ClientSession,
) -> None:
    """A visit cancelled while its move waits for a retry is never PATCHed: the worker drops
    the mark and the meeting keeps its times."""
    system = launch_system
    moves = Moves(system)
    async with aiohttp.ClientSession() as http:
        appointment, key, _ = await _move_refused_once(system, producer, topic_prefix, http, moves)
        before = await _teams_meeting(system, microsoft_http, key)
        base = f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}/appointments"
        async with http.post(f"{base}/{appointment}/cancel", json={}) as r:
            assert r.status == 200, await r.text()
        await read_all(topic_prefix + "appointment-cancelled", expect=1)
    original = integration_config(system.settings, system.integration_id, system.fhir_base)
    await _use_ms_tenant(system, producer, topic_prefix, original.ms_tenant_id, version=3)
    await _retry_now(system, key)
    await moves.until(lambda seen: (key, "dropped") in [s[:2] for s in seen], "the dropped move")
    meeting = await _teams_meeting(system, microsoft_http, key)
    assert _times(meeting) == _times(before)
    assert meeting["updateCount"] == 0
    assert not (await _mark(system, key))["meeting_times_stale"]
    assert [outcome for outcome, _ in moves.of(key)] == ["failed", "dropped"]


async def test_a_worker_that_dies_mid_patch_leaves_the_move_to_be_done_again(
    launch_system: LaunchSystem,
    topic_prefix: str,
    microsoft_http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that dies after claiming a move (nothing recorded) leaves the visit leased;
    once the lease is over the move is claimed again and simply PATCHed."""
    system = launch_system
    moves = Moves(system)
    graph = system.app[GRAPH]
    real_update = graph.update_meeting_times
    attempts: list[datetime] = []
    died = asyncio.Event()

    async def dies_the_first_time(*args: Any, **kwargs: Any) -> Any:
        attempts.append(kwargs["starts_at"])
        if len(attempts) == 1:
            died.set()
            raise RuntimeError("the worker died here")
        return await real_update(*args, **kwargs)

    monkeypatch.setattr(graph, "update_meeting_times", dies_the_first_time)
    async with aiohttp.ClientSession() as http:
        appointment, _, key = await _booked(http, system, topic_prefix, timedelta(hours=1))
        await _prepared(system, key)
        new_start = _at(200)
        await _reschedule(http, system, appointment, new_start, 30)
        await _rescheduled(topic_prefix, 1)
    await wait_for(died, "the worker to claim the move and die")
    mark = await _mark(system, key)
    assert mark["meeting_times_stale"]
    assert mark["later"], "the dead worker's lease holds the visit"
    await _retry_now(system, key)
    await moves.until(lambda seen: (key, "moved") in [s[:2] for s in seen], "the move redone")
    assert attempts == [new_start, new_start]
    meeting = await _teams_meeting(system, microsoft_http, key)
    assert _times(meeting) == (new_start, new_start + timedelta(minutes=30))
