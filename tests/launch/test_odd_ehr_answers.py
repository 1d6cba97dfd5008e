"""Answers from a configured EHR that are valid JSON but unusable get a clear page, never a
500. Found by a review: an access token with a control character (aiohttp refused it in the
FHIR read's Authorization header) and a search result starting at the calendar's edge
(`astimezone(UTC)` overflowed) each made the launch a 500."""

from __future__ import annotations

import copy
from typing import Any

import aiohttp
import pytest

import sandbox.ehr.fhir as ehr_fhir
import sandbox.ehr.fhir_search as ehr_search
import sandbox.ehr.oauth as ehr_oauth
from tests.launch.test_patient_launch import PATIENT, _book, _portal_launch
from tests.launch.test_visit_end_to_end import book_video_visit, launch_from_ehr
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem


@pytest.mark.parametrize("char", ["\x00", "\n", "\x7f"])
async def test_an_access_token_with_a_control_character_is_refused_clearly(
    launch_system: LaunchSystem, monkeypatch: pytest.MonkeyPatch, char: str
) -> None:
    """A token answer whose access token holds a control character ends the launch with the
    'token answer is incomplete' page (400), and nothing is read from the EHR with it."""
    original = ehr_oauth._issue
    issued: list[str] = []

    def issue(*args: Any) -> dict[str, Any]:
        body: dict[str, Any] = original(*args)
        issued.append(body["access_token"])
        body["access_token"] += char
        return body

    monkeypatch.setattr(ehr_oauth, "_issue", issue)
    async with aiohttp.ClientSession() as http:
        appointment = await book_video_visit(http, launch_system)
        status, body, _ = await launch_from_ehr(http, launch_system, appointment["id"])
    assert issued
    assert status == 400, body[:300]
    assert "token answer is incomplete" in body


@pytest.mark.parametrize("start", ["0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00"])
async def test_a_search_result_at_the_calendars_edge_is_passed_over(
    launch_system: LaunchSystem, topic_prefix: str, monkeypatch: pytest.MonkeyPatch, start: str
) -> None:
    """An appointment in the patient's search whose start UTC cannot hold is skipped, and the
    patient's real visit today still opens."""
    original = ehr_search.search_appointments

    def search(*args: Any) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = original(*args)
        if found:
            odd = copy.deepcopy(found[0])
            odd["id"] += "9"
            odd["start"] = start
            found = [odd, *found]
        return found

    monkeypatch.setattr(ehr_fhir, "search_appointments", search)
    async with aiohttp.ClientSession() as http:
        await _book(http, launch_system, PATIENT)
        await read_all(topic_prefix + "appointment-created", expect=1)
        launch_url = await _portal_launch(http, launch_system, PATIENT)
        async with http.get(launch_url) as r:
            assert r.status == 200, (await r.text())[:300]


async def test_an_empty_refresh_token_is_no_refresh_token(
    launch_system: LaunchSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token answer with refresh_token "" signs the clinician in, as one without it does."""
    original = ehr_oauth._issue

    def issue(*args: Any) -> dict[str, Any]:
        body: dict[str, Any] = original(*args)
        body["refresh_token"] = ""
        return body

    monkeypatch.setattr(ehr_oauth, "_issue", issue)
    async with aiohttp.ClientSession() as http:
        appointment = await book_video_visit(http, launch_system)
        status, body, _ = await launch_from_ehr(http, launch_system, appointment["id"])
    assert status == 200, body[:300]
