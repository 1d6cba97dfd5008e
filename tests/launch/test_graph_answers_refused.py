"""What Graph answers for a meeting is stored in Postgres and sent on to browsers: an answer
that Postgres cannot hold (NUL) or that is no id or URL at all is a Graph failure, backed off
like any other, and a meeting the database refuses anyway is backed off too, never retried
every round with a new call-event subscription each time."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from libs.common.events import AppointmentCreatedV1, Envelope, decode_event
from sandbox.microsoft.graph import Subscription as SandboxSubscription
from sandbox.microsoft.meetings import Meeting as SandboxMeeting
from services.launch import meeting_preparation
from services.launch.graph import OnlineMeeting, Subscription
from services.launch.meeting_preparation import prepare_meeting
from services.launch.meetings import Meeting, create_meeting
from tests.launch.test_meeting_preparation import _meeting_of
from tests.launch.test_visit_end_to_end import book_video_visit, launch_from_ehr
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem

# Shapes as Graph's documentation shows them: a base64 meeting id, a joinWebUrl carrying
# %-encoded JSON, a virtual-appointment URL with `:` and `@` unencoded, a GUID subscription id.
MEETING_ID = (
    "MSpkYzE3Njc0Yy04MWQ5LTRhZGItYmZiMi04ZjZhNDQyZTRhMDMqMCoqMTk6bWVldGluZ19ORGM0TWpJd1pUUXRPV0U"
    "xWkMwMFpqWTJMV0kyTUdZdE5qRXpOR00zTmpjeE5qTTBAdGhyZWFkLnYy_-="
)
JOIN_WEB_URL = (
    "https://teams.microsoft.com/l/meetup-join/19%3ameeting_NDc4MjIwZTQtOWE1ZC00ZjY2LWI2MGYtNj"
    "EzNGM3NjcxNjM0%40thread.v2/0?context=%7b%22Tid%22%3a%2272f988bf-86f1-41af-91ab-2d7cd011db4"
    "7%22%2c%22Oid%22%3a%22550fae72-d251-43ec-868c-373732c2704f%22%7d"
)
SUBSCRIPTION_ID = "7f105c7d-2dc5-4530-97cd-4e7ae6534c07"
EXPIRES = "2026-01-01T00:00:00Z"


def _meeting(**change: Any) -> dict[str, Any]:
    return {"id": MEETING_ID, "joinWebUrl": JOIN_WEB_URL, **change}


def test_graph_ids_and_urls_of_real_shape_are_accepted() -> None:
    """A meeting and a subscription as Graph documents them are taken as they are."""
    assert OnlineMeeting.model_validate(_meeting()).joinWebUrl == JOIN_WEB_URL
    assert Subscription.model_validate({"id": SUBSCRIPTION_ID, "expirationDateTime": EXPIRES})


@pytest.mark.parametrize(
    "answer",
    [
        _meeting(id=MEETING_ID + "\x00"),
        _meeting(id="A" * 513),
        _meeting(joinWebUrl=JOIN_WEB_URL + "\x00"),
        _meeting(joinWebUrl=JOIN_WEB_URL + "\r\nSet-Cookie: a=b"),
        _meeting(joinWebUrl=JOIN_WEB_URL + "&" + "x" * 2048),
        _meeting(joinWebUrl="http://teams.microsoft.com/l/meetup-join/x"),
        _meeting(joinWebUrl="javascript:alert(1)"),
    ],
    ids=["id NUL", "id too long", "url NUL", "url CRLF", "url too long", "url http", "not url"],
)
def test_a_meeting_answer_holding_what_no_id_or_url_holds_is_refused(
    answer: dict[str, Any],
) -> None:
    """A meeting id or joinWebUrl with a control character, over its bound, or no https URL
    is refused."""
    with pytest.raises(ValidationError):
        OnlineMeeting.model_validate(answer)


@pytest.mark.parametrize("subscription_id", ["\x00" + SUBSCRIPTION_ID, "a\x1fb", "a" * 257])
def test_a_subscription_id_with_a_control_character_or_too_long_is_refused(
    subscription_id: str,
) -> None:
    """A subscription id with a control character or over 256 characters is refused."""
    with pytest.raises(ValidationError):
        Subscription.model_validate({"id": subscription_id, "expirationDateTime": EXPIRES})


async def _booked(system: LaunchSystem, topic_prefix: str, starts_in: timedelta) -> str:
    """Books a video visit; its appointment key."""
    async with aiohttp.ClientSession() as http:
        await book_video_visit(http, system, starts_in)
    (raw,) = await read_all(topic_prefix + "appointment-created", expect=1)
    created: Envelope[AppointmentCreatedV1] = decode_event(raw)
    return created.key


def _answering(original: Callable[[Any], dict[str, Any]], field: str, suffix: str) -> Any:
    def graph_json(self: Any) -> dict[str, Any]:
        data = original(self)
        data[field] += suffix
        return data

    return graph_json


@pytest.mark.parametrize(
    ("model", "field", "suffix"),
    [
        (SandboxMeeting, "id", "\x00"),
        (SandboxMeeting, "joinWebUrl", "\x00"),
        (SandboxMeeting, "joinWebUrl", "&" + "x" * 2048),
        (SandboxSubscription, "id", "\x00"),
    ],
    ids=["meeting id NUL", "joinWebUrl NUL", "joinWebUrl too long", "subscription id NUL"],
)
async def test_a_graph_answer_postgres_cannot_hold_is_a_graph_failure_backed_off(
    launch_system: LaunchSystem,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    model: type[SandboxMeeting] | type[SandboxSubscription],
    field: str,
    suffix: str,
) -> None:
    """A meeting or subscription answer holding NUL or over its bound fails as Graph failing
    does: no meeting stored, the visit retried later, not every round."""
    system = launch_system
    monkeypatch.setattr(model, "graph_json", _answering(model.graph_json, field, suffix))
    key = await _booked(system, topic_prefix, timedelta(days=20))
    assert await prepare_meeting(system.app, key) == "failed"
    visit = await _meeting_of(system, key)
    assert visit["meeting_id"] is None
    assert visit["subscription_id"] is None
    assert visit["meeting_attempts"] == 1
    assert visit["retry_later"]


async def test_a_browser_join_url_with_nul_backs_off_and_join_says_not_ready(
    launch_system: LaunchSystem, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A browser-join URL holding NUL is a Graph failure made before any subscription: the
    visit is backed off, the patient's Join answers 503 "not ready yet" and a clinician's
    launch 503, neither a 500."""
    system = launch_system
    meetings = system.microsoft.components.meetings
    original = meetings.virtual_appointment_url
    monkeypatch.setattr(meetings, "virtual_appointment_url", lambda m: original(m) + "\x00")
    async with aiohttp.ClientSession() as http:
        fhir_appointment = await book_video_visit(http, system, timedelta(minutes=10))
        (raw,) = await read_all(topic_prefix + "appointment-created", expect=1)
        created: Envelope[AppointmentCreatedV1] = decode_event(raw)
        assert created.payload.join_url
        assert await prepare_meeting(system.app, created.key) == "failed"
        visit = await _meeting_of(system, created.key)
        assert visit["meeting_id"] is None
        assert visit["meeting_attempts"] >= 1
        assert visit["retry_later"]
        async with http.get(created.payload.join_url + "/enter", allow_redirects=False) as r:
            assert r.status == 503
            assert "not ready yet" in await r.text()
        status, page, _ = await launch_from_ehr(http, system, str(fhir_appointment["id"]))
        assert status == 503, page
        assert "could not be prepared" in page
    assert system.microsoft.components.graph.subscriptions == {}
    assert (await _meeting_of(system, created.key))["meeting_id"] is None


async def test_a_meeting_the_database_refuses_is_backed_off_and_its_subscription_ended(
    launch_system: LaunchSystem, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should Postgres refuse the meeting Graph made, the visit is backed off in a fresh
    transaction and the subscription just made is deleted, each try; once Graph's answer
    can be stored, the meeting is prepared."""
    system = launch_system
    subscriptions = system.microsoft.components.graph.subscriptions

    async def unstorable(*args: Any) -> Meeting:
        meeting = await create_meeting(*args)
        return dataclasses.replace(meeting, patient_join_url=meeting.patient_join_url + "\x00")

    monkeypatch.setattr(meeting_preparation, "create_meeting", unstorable)
    key = await _booked(system, topic_prefix, timedelta(days=20))
    for attempt in (1, 2):
        assert await prepare_meeting(system.app, key) == "failed"
        visit = await _meeting_of(system, key)
        assert visit["meeting_id"] is None
        assert visit["meeting_attempts"] == attempt
        assert visit["retry_later"]
        assert subscriptions == {}

    monkeypatch.setattr(meeting_preparation, "create_meeting", create_meeting)
    assert await prepare_meeting(system.app, key) == "prepared"
    prepared = await _meeting_of(system, key)
    assert prepared["meeting_id"]
    assert not prepared["retry_later"]
    assert list(subscriptions) == [prepared["subscription_id"]]
