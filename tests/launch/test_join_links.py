"""The patient's join link after a reschedule: the signature proves the link is ours, checked
before any database work; the visit's current times and status decide whether it still opens,
so a visit moved later keeps its link past the end signed in at booking, and one moved earlier
loses it at its new end plus the grace period."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import aiohttp

from libs.common.events import AppointmentCreatedV1, PatientJoinedV1, decode_event
from libs.common.web import DB_POOL
from sandbox.ehr import TENANT_A
from services.launch import join_tokens
from services.launch.patient import closed
from tests.launch import test_launch_statements
from tests.launch.test_visit_end_to_end import book_video_visit
from tests.support.kafka_reader import read_all
from tests.support.launch_harness import LaunchSystem

statements = test_launch_statements.statements
JOIN = "/join/{token}"
ENTER = "/join/{token}/enter"
OVER = "This visit is over"
PREJOIN = "Your video visit with"


def _grace(system: LaunchSystem) -> timedelta:
    return timedelta(minutes=system.settings.join_grace_minutes)


async def _booked(
    http: aiohttp.ClientSession, system: LaunchSystem, topic_prefix: str, starts_in: timedelta
) -> tuple[str, AppointmentCreatedV1]:
    """A 30-minute video visit booked in the EHR: its FHIR id and its appointment-created."""
    appointment = await book_video_visit(http, system, starts_in)
    (raw,) = await read_all(topic_prefix + "appointment-created", expect=1)
    created = decode_event(raw).payload
    assert isinstance(created, AppointmentCreatedV1)
    assert created.join_url is not None
    return str(appointment["id"]), created


async def _reschedule(
    http: aiohttp.ClientSession,
    system: LaunchSystem,
    topic_prefix: str,
    appointment: str,
    start: datetime,
    moves: int,
) -> None:
    """Moves the visit in the EHR to a 30-minute slot at `start`; waits for the gateway's
    appointment-rescheduled (the `moves`-th), published in the move's transaction."""
    base = f"{system.ehr.url}/_sandbox/tenants/{TENANT_A}/appointments"
    body = {"start": start.isoformat(), "minutes": 30}
    async with http.post(f"{base}/{appointment}/reschedule", json=body) as r:
        assert r.status == 200, await r.text()
    assert len(await read_all(topic_prefix + "appointment-rescheduled", expect=moves)) == moves


async def _open(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as r:
        return r.status, await r.text()


async def test_the_booking_link_opens_a_visit_moved_past_its_signed_expiry(
    launch_system: LaunchSystem, topic_prefix: str
) -> None:
    """The link sent at booking, whose signed end plus grace has passed, is refused while the
    visit is over and opens the pre-join page again once the visit is moved later."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        appointment, created = await _booked(http, system, topic_prefix, timedelta(hours=-3))
        assert created.join_url is not None
        # The expiry minted into the link (the booking's end plus grace) is in the past.
        assert created.ends_at + _grace(system) < datetime.now(UTC)
        status, body = await _open(http, created.join_url)
        assert status == 410
        assert OVER in body
        new_start = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
        await _reschedule(http, system, topic_prefix, appointment, new_start, moves=1)
        status, body = await _open(http, created.join_url)
        assert status == 200, body
        assert PREJOIN in body


async def test_the_link_of_a_visit_moved_earlier_stops_at_its_new_end_plus_grace(
    launch_system: LaunchSystem, topic_prefix: str
) -> None:
    """Moved earlier but not yet past its new end plus grace, the visit's link opens; moved
    further, to end more than the grace period ago, it answers 410, though the expiry signed
    at booking is hours ahead."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        appointment, created = await _booked(http, system, topic_prefix, timedelta(hours=1))
        assert created.join_url is not None
        status, _ = await _open(http, created.join_url)
        assert status == 200
        now = datetime.now(UTC)
        # Ends 10 minutes inside the grace period.
        inside = (now - timedelta(minutes=30) - _grace(system) + timedelta(minutes=10)).replace(
            microsecond=0
        )
        await _reschedule(http, system, topic_prefix, appointment, inside, moves=1)
        status, body = await _open(http, created.join_url)
        assert status == 200, body
        outside = (now - timedelta(hours=3)).replace(microsecond=0)
        await _reschedule(http, system, topic_prefix, appointment, outside, moves=2)
        status, body = await _open(http, created.join_url)
        assert status == 410
        assert OVER in body
        assert created.ends_at + _grace(system) > datetime.now(UTC) + timedelta(hours=1)


def test_a_link_closes_exactly_at_the_current_end_plus_grace() -> None:
    """The decision by the visit's row: open up to its end plus grace, inclusive, closed a
    microsecond later; a cancelled visit is closed at any time, with its own page."""
    end = datetime(2030, 1, 7, 14, 30, tzinfo=UTC)
    grace = timedelta(minutes=60)
    assert closed("booked", end, end - timedelta(days=30), grace) is None
    assert closed("booked", end, end + grace, grace) is None
    over = closed("booked", end, end + grace + timedelta(microseconds=1), grace)
    assert over is not None
    assert over.status == 410
    assert over.text is not None
    assert OVER in over.text
    cancelled = closed("cancelled", end, end - timedelta(days=1), grace)
    assert cancelled is not None
    assert cancelled.status == 410
    assert cancelled.text is not None
    assert "cancelled" in cancelled.text


async def test_forged_and_garbled_links_are_refused_before_any_database_work(
    launch_system: LaunchSystem, topic_prefix: str, statements: Counter[str]
) -> None:
    """Links we did not mint (another secret, an altered body or signature, garbage), on the
    page and on Join, answer 404 without a statement to Postgres; a genuine one is read."""
    system = launch_system
    secret = system.settings.join_token_secret.get_secret_value()
    async with aiohttp.ClientSession() as http:
        _, created = await _booked(http, system, topic_prefix, timedelta(minutes=10))
        assert created.join_url is not None
        token = created.join_url.rsplit("/", 1)[1]
        key = join_tokens.verify(secret, token)
        body, signature = token.split(".")
        far = datetime.now(UTC) + timedelta(days=365)
        refused = [
            join_tokens.mint("another-secret", key, far),
            body[:-1] + ("A" if body[-1] != "A" else "B") + "." + signature,
            body + "." + signature[:-1] + ("A" if signature[-1] != "A" else "B"),
            token + "x",
            "not-a-token",
            "a.b",
            "%C3%93Z.%C2%A7Q",
        ]
        statements.clear()
        for forged in refused:
            for path in (f"/join/{forged}", f"/join/{forged}/enter"):
                async with http.get(f"{system.url}{path}", allow_redirects=False) as r:
                    assert r.status == 404, forged
        assert (statements[JOIN], statements[ENTER]) == (0, 0), statements
        status, _ = await _open(http, created.join_url)
        assert status == 200
        assert statements[JOIN] > 0


async def test_a_visit_that_is_over_is_refused_with_one_read_and_no_arrival(
    launch_system: LaunchSystem, topic_prefix: str, statements: Counter[str]
) -> None:
    """A genuine link of a visit that is over costs the one read of the visit's row, and
    records no arrival and no patient-joined."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        _, created = await _booked(http, system, topic_prefix, timedelta(hours=-3))
        assert created.join_url is not None
        statements.clear()
        status, body = await _open(http, created.join_url)
        assert status == 410
        assert OVER in body
        assert statements == {JOIN: 1}, statements
    pool = system.app[DB_POOL]
    assert await pool.fetchval("SELECT count(*) FROM lobby_arrivals") == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE topic = 'patient-joined'") == 0


async def test_an_open_days_ahead_is_no_arrival_and_says_when_the_waiting_room_opens(
    launch_system: LaunchSystem, topic_prefix: str
) -> None:
    """Opening the link two days early shows the visit and when its waiting room opens,
    offers no Join, records no arrival or patient-joined, and Join leads back to the page."""
    system = launch_system
    async with aiohttp.ClientSession() as http:
        _, created = await _booked(http, system, topic_prefix, timedelta(days=2))
        assert created.join_url is not None
        status, body = await _open(http, created.join_url)
        assert status == 200
        assert "The waiting room opens" in body
        assert "Join the visit" not in body
        async with http.get(f"{created.join_url}/enter", allow_redirects=False) as r:
            assert r.status == 303
            assert created.join_url.endswith(r.headers["Location"])
    pool = system.app[DB_POOL]
    assert await pool.fetchval("SELECT count(*) FROM lobby_arrivals") == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE topic = 'patient-joined'") == 0


async def test_the_lobby_opens_its_set_minutes_before_the_start(
    launch_system: LaunchSystem, topic_prefix: str
) -> None:
    """Inside lobby_opens_minutes of the start, the first open is the arrival, with Join."""
    system = launch_system
    opens = timedelta(minutes=system.settings.lobby_opens_minutes)
    async with aiohttp.ClientSession() as http:
        _, created = await _booked(http, system, topic_prefix, opens - timedelta(minutes=2))
        assert created.join_url is not None
        status, body = await _open(http, created.join_url)
        assert (status, "Join the visit" in body) == (200, True)
        (raw,) = await read_all(topic_prefix + "patient-joined", expect=1)
    joined = decode_event(raw).payload
    assert isinstance(joined, PatientJoinedV1)
    assert created.starts_at - joined.lobby_entered_at < opens
