"""Teams meetings are prepared after booking, not while the EHR's scheduling webhook waits:
the confirmation SMS carries our own join link, so neither the webhook nor the SMS needs
Graph, and a Graph outage delays meetings, not bookings. A worker prepares each booked
visit's meeting `meeting_lead_minutes` before it starts (a subscription made weeks ahead
would need renewing every three days); a provider launch or the patient's Join prepares it at
once when the worker has not yet. The visit's row is locked while its meeting is made, so
the worker, launches and Joins never make two.

A reschedule marks a visit whose meeting is made (`meeting_times_stale`, in the reschedule's
own transaction); the same worker moves the meeting in Graph. A move claims the visit with a
lease and holds no lock while Graph answers, so a second reschedule is never kept waiting on
Graph: it commits meanwhile, and the mark is cleared only if the schedule version the PATCH
sent is still the visit's, so the newer times are sent next."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

import asyncpg
import structlog
from aiohttp import web
from prometheus_client import Counter

from libs.common.web import DB_POOL, SETTINGS
from services.launch.graph import GraphError
from services.launch.meeting_pace import MEETING_PACE, Allowance, FeedActivity, MeetingPace
from services.launch.meetings import Meeting, Visit, create_meeting
from services.launch.settings import LaunchSettings
from services.launch.state import GRAPH, INTEGRATIONS

log = structlog.get_logger(__name__)

Outcome = Literal["ready", "prepared", "failed", "busy", "not bookable"]
MEETINGS_PREPARED = Counter(
    "launch_meetings_prepared_total",
    "Teams meeting preparations by outcome (prepared, failed)",
    ["outcome"],
)
MoveOutcome = Literal["moved", "superseded", "dropped", "failed"]
MEETINGS_MOVED = Counter(
    "launch_meeting_moves_total",
    "Teams meeting moves after a reschedule, by outcome (moved; superseded: moved, then "
    "rescheduled again meanwhile; dropped: cancelled or over, not moved; failed)",
    ["outcome"],
)
# Set when a visit is booked or rescheduled, so the worker prepares a meeting due soon, or
# moves one, without waiting a round.
MEETING_WAKE = web.AppKey("meeting_wake", asyncio.Event)
# Called with (appointment key, outcome, schedule version) once each move's outcome is stored.
MoveObserver = Callable[[str, MoveOutcome, int], None]
MEETING_MOVES: web.AppKey[list[MoveObserver]] = web.AppKey("meeting_moves")
RETRY_DELAYS_S = (10, 30, 60, 300, 900)


def _retry_delay_s(attempts: int) -> int:
    """The wait before the next try after `attempts` failed ones (the last delay repeats)."""
    return RETRY_DELAYS_S[min(attempts, len(RETRY_DELAYS_S) - 1)]


_LOCK_VISIT = (
    "SELECT integration_id, department, starts_at, ends_at, time_zone, schedule_version,"
    " status, meeting_id, meeting_attempts FROM appointments WHERE appointment_key = $1"
    " FOR UPDATE"
)
_SET_MEETING = (
    "UPDATE appointments SET organizer_id = $2, meeting_id = $3, join_web_url = $4,"
    " patient_join_url = $5, subscription_id = $6, subscription_expires_at = $7,"
    " client_state_hash = $8, meeting_retry_at = NULL, updated_at = now()"
    " WHERE appointment_key = $1"
)
# `meeting_id IS NULL`: also run after the visit's lock is let go (`_retry_later`), when
# another preparation may have made the meeting since.
_RETRY_LATER = (
    "UPDATE appointments SET meeting_attempts = meeting_attempts + 1,"
    " meeting_retry_at = now() + make_interval(secs => $2)"
    " WHERE appointment_key = $1 AND meeting_id IS NULL"
)
_DUE = (
    "SELECT appointment_key, starts_at < now() + make_interval(mins => $3) AS urgent"
    " FROM appointments"
    " WHERE meeting_id IS NULL AND status = 'booked'"
    "  AND starts_at < now() + make_interval(mins => $1) AND ends_at > now()"
    "  AND (meeting_retry_at IS NULL OR meeting_retry_at <= now())"
    " ORDER BY starts_at LIMIT $2"
)

# Claims visits whose meeting must be moved, leasing each so no other worker PATCHes it
# meanwhile (a worker that dies mid-PATCH leaves it to be claimed again when the lease ends).
# The visit's times and version are read in the same statement, so the PATCH sends one
# version's times, and that version is what the mark is cleared against.
_CLAIM_MOVES = (
    "UPDATE appointments a SET meeting_move_retry_at = now() + make_interval(secs => $1)"
    " FROM (SELECT appointment_key FROM appointments WHERE meeting_times_stale"
    "  AND (meeting_move_retry_at IS NULL OR meeting_move_retry_at <= now())"
    "  ORDER BY starts_at LIMIT $2 FOR UPDATE SKIP LOCKED) due"
    " WHERE a.appointment_key = due.appointment_key"
    " RETURNING a.appointment_key, a.integration_id, a.organizer_id, a.meeting_id,"
    " a.starts_at, a.ends_at, a.schedule_version, a.meeting_move_attempts,"
    " a.status = 'booked' AND a.meeting_ended_at IS NULL AND a.ends_at > now() AS live"
)
# Done with one version (moved, or nothing to move): the mark stays if the visit was
# rescheduled since, and the lease ends either way, so a newer version is moved next round.
_MOVE_DONE = (
    "UPDATE appointments SET meeting_times_stale = meeting_times_stale"
    " AND schedule_version <> $2, meeting_move_attempts = 0, meeting_move_retry_at = NULL"
    " WHERE appointment_key = $1 RETURNING meeting_times_stale"
)
_MOVE_LATER = (
    "UPDATE appointments SET meeting_move_attempts = meeting_move_attempts + 1,"
    " meeting_move_retry_at = now() + make_interval(secs => $2) WHERE appointment_key = $1"
)


class _Refused(Exception):
    """Postgres refused to store the meeting Graph made (a value it cannot hold, a
    constraint): raised out of the visit's transaction, so that it rolls back."""

    def __init__(
        self, error: asyncpg.PostgresError, attempts: int, visit: Visit, meeting: Meeting
    ) -> None:
        super().__init__(type(error).__name__)
        self.error = error
        self.attempts = attempts
        self.visit = visit
        self.meeting = meeting


# SQLSTATE classes of an outage or of contention, not of what was written: connection (08),
# transaction rollback (40: serialization, deadlock), insufficient resources (53), lock not
# available (55P03), operator intervention (57: shutdown, statement timeout), system (58) and
# internal (XX) errors. These go on as before: the round (or the request) fails.
_TRANSIENT_SQLSTATES = ("08", "40", "53", "55P03", "57", "58", "XX")


def _transient(error: asyncpg.PostgresError) -> bool:
    return str(error.sqlstate or "XX").startswith(_TRANSIENT_SQLSTATES)


async def prepare_meeting(app: web.Application, key: str, *, skip_locked: bool = False) -> Outcome:
    """Makes the visit's meeting unless it has one. `skip_locked` (the worker) passes over a
    visit that a launch or Join is preparing; without it the caller waits for that one.
    Graph failing, or Postgres refusing what Graph answered, is "failed", tried again later."""
    try:
        outcome = await _prepare_locked(app, key, skip_locked)
    except _Refused as refused:
        try:
            await _retry_later(app, refused)
        finally:
            await _drop_subscription(app, refused)
        return "failed"
    if outcome == "prepared":
        MEETINGS_PREPARED.labels("prepared").inc()
        log.info("meeting prepared", appointment_key=key)
    return outcome


async def _prepare_locked(app: web.Application, key: str, skip_locked: bool) -> Outcome:
    settings = app[SETTINGS]
    assert isinstance(settings, LaunchSettings)
    async with app[DB_POOL].acquire() as conn, conn.transaction():
        row = await conn.fetchrow(_LOCK_VISIT + (" SKIP LOCKED" if skip_locked else ""), key)
        if row is None:
            return "busy" if skip_locked else "not bookable"
        if row["meeting_id"] is not None:
            return "ready"
        if row["status"] != "booked":
            return "not bookable"
        integration = await app[INTEGRATIONS].by_id(row["integration_id"])
        visit = None if integration is None else Visit.of_row(key, integration, row)
        try:
            if visit is None:
                raise GraphError("the visit's integration is no longer configured")
            meeting = await create_meeting(app[GRAPH], settings, visit)
        except GraphError as exc:
            attempts = row["meeting_attempts"]
            delay = _retry_delay_s(attempts)
            await conn.execute(_RETRY_LATER, key, delay)
            MEETINGS_PREPARED.labels("failed").inc()
            log.warning(
                "meeting preparation failed, will retry",
                appointment_key=key,
                attempt=attempts + 1,
                retry_in_s=delay,
                error=str(exc),
            )
            return "failed"
        try:
            await conn.execute(
                _SET_MEETING,
                key,
                meeting.organizer_id,
                meeting.meeting_id,
                meeting.join_web_url,
                meeting.patient_join_url,
                meeting.subscription_id,
                meeting.subscription_expires_at,
                meeting.client_state_hash,
            )
        except asyncpg.PostgresError as exc:
            if _transient(exc):
                raise
            raise _Refused(exc, row["meeting_attempts"], visit, meeting) from exc
    return "prepared"


async def _retry_later(app: web.Application, refused: _Refused) -> None:
    """Backs the visit off as a Graph failure does, in a transaction of its own (the
    visit's was aborted): otherwise it would be due again, and made again, every round."""
    key = refused.visit.appointment_key
    delay = _retry_delay_s(refused.attempts)
    await app[DB_POOL].execute(_RETRY_LATER, key, delay)
    MEETINGS_PREPARED.labels("failed").inc()
    log.warning(
        "meeting preparation failed, will retry: the database refused the meeting Graph made",
        appointment_key=key,
        attempt=refused.attempts + 1,
        retry_in_s=delay,
        # The class and SQLSTATE only: the message quotes the values, meeting links among them.
        error=f"{type(refused.error).__name__} (SQLSTATE {refused.error.sqlstate})",
    )


async def _drop_subscription(app: web.Application, refused: _Refused) -> None:
    """The call-event subscription just made is recorded nowhere: end it now rather than
    leave one more behind at each try (the meeting itself is found again by externalId)."""
    visit = refused.visit
    try:
        await app[GRAPH].delete_subscription(
            visit.integration.ms_tenant_id, refused.meeting.subscription_id
        )
    except GraphError as exc:
        # It lapses on its own when it expires; notifications for it find no visit.
        log.warning(
            "unrecorded call-event subscription not deleted",
            appointment_key=visit.appointment_key,
            error=str(exc),
        )


async def meeting_ready(app: web.Application, key: str) -> bool:
    """The visit has its meeting, prepared now if it had none (waiting for a worker that is
    preparing it); False when it could not be."""
    return await prepare_meeting(app, key) in ("ready", "prepared")


def _batch(settings: LaunchSettings) -> int:
    return settings.meeting_preparation_concurrency * 8


@dataclass(frozen=True)
class Round:
    looked_at: int
    held_back: int  # visits not urgent left for later while the feed is busy


async def prepare_due(app: web.Application) -> Round:
    """One worker round: prepares the meetings of visits starting within the lead time, a
    few at once; while the scheduling feed is busy, those of visits not urgent only as fast
    as `meeting_preparation_busy_rate` allows (meeting_pace.py)."""
    settings = app[SETTINGS]
    assert isinstance(settings, LaunchSettings)
    rows = await app[DB_POOL].fetch(
        _DUE, settings.meeting_lead_minutes, _batch(settings), settings.meeting_urgent_minutes
    )
    keys = [row["appointment_key"] for row in rows if row["urgent"]]
    later = [row["appointment_key"] for row in rows if not row["urgent"]]
    pace = app[MEETING_PACE]
    if later and pace.feed.busy():
        allowed = pace.allowance.take(len(later))
        keys += later[:allowed]
        held_back = len(later) - allowed
    else:
        keys += later
        held_back = 0
    gate = asyncio.Semaphore(settings.meeting_preparation_concurrency)

    async def one(key: str) -> None:
        async with gate:
            await prepare_meeting(app, key, skip_locked=True)

    await asyncio.gather(*(one(key) for key in keys))
    return Round(looked_at=len(rows), held_back=held_back)


def _move_lease_s(settings: LaunchSettings) -> float:
    """Longer than any PATCH takes: a token and a call, each bounded by the timeout."""
    return max(60.0, 6 * settings.external_call_timeout_s)


async def _move_meeting(app: web.Application, row: asyncpg.Record) -> MoveOutcome:
    """PATCHes one claimed visit's meeting to the times of the version claimed, or, for a
    visit cancelled or over, nothing; then stores the outcome."""
    key, version = row["appointment_key"], row["schedule_version"]
    pool = app[DB_POOL]
    if row["live"] and row["meeting_id"] and row["organizer_id"]:
        integration = await app[INTEGRATIONS].by_id(row["integration_id"])
        try:
            if integration is None:
                raise GraphError("the visit's integration is no longer configured")
            await app[GRAPH].update_meeting_times(
                integration.ms_tenant_id,
                row["organizer_id"],
                row["meeting_id"],
                starts_at=row["starts_at"],
                ends_at=row["ends_at"],
            )
        except GraphError as exc:
            attempts = row["meeting_move_attempts"]
            delay = _retry_delay_s(attempts)
            await pool.execute(_MOVE_LATER, key, delay)
            log.warning(
                "meeting move failed, will retry",
                appointment_key=key,
                attempt=attempts + 1,
                retry_in_s=delay,
                error=str(exc),
            )
            return "failed"
        outcome: MoveOutcome = "moved"
    else:
        outcome = "dropped"
    if await pool.fetchval(_MOVE_DONE, key, version):
        # Rescheduled again while Graph answered: the newer times are sent next round.
        app[MEETING_WAKE].set()
        outcome = "superseded" if outcome == "moved" else outcome
    log.info("meeting move done", outcome=outcome, appointment_key=key, schedule_version=version)
    return outcome


async def move_due(app: web.Application) -> int:
    """One worker round: moves the meetings of a few visits rescheduled since their meeting
    was made, all at once (no claim waits behind another, so each is done well inside its
    lease); returns how many visits it claimed."""
    settings = app[SETTINGS]
    assert isinstance(settings, LaunchSettings)
    rows = await app[DB_POOL].fetch(
        _CLAIM_MOVES, _move_lease_s(settings), settings.meeting_preparation_concurrency
    )

    async def one(row: asyncpg.Record) -> None:
        try:
            outcome = await _move_meeting(app, row)
        except Exception:
            # Postgres is away (or anything unforeseen): nothing is stored, the lease ends
            # and the visit is claimed again; a PATCH already sent is simply sent again.
            log.exception("meeting move interrupted", appointment_key=row["appointment_key"])
            return
        MEETINGS_MOVED.labels(outcome).inc()
        for observer in app[MEETING_MOVES]:
            observer(row["appointment_key"], outcome, row["schedule_version"])

    await asyncio.gather(*(one(row) for row in rows))
    return len(rows)


async def meeting_preparation_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    assert isinstance(settings, LaunchSettings)
    wake = app[MEETING_WAKE] = asyncio.Event()
    app[MEETING_MOVES] = []
    pace = app[MEETING_PACE] = MeetingPace(
        FeedActivity(),
        Allowance(settings.meeting_preparation_busy_rate, settings.meeting_preparation_concurrency),
    )

    async def loop() -> None:
        while True:
            wake.clear()
            done = Round(looked_at=0, held_back=0)
            moves = 0
            try:
                done = await prepare_due(app)
            except Exception:
                # Postgres is away: try again next round, nothing is lost (the rows stay).
                log.exception("meeting preparation round failed")
            try:
                moves = await move_due(app)
            except Exception:
                log.exception("meeting move round failed")
            pause = settings.meeting_preparation_interval_s
            if done.held_back:
                pause = min(pause, pace.allowance.refill_s())
            elif (
                done.looked_at >= _batch(settings)
                or moves >= settings.meeting_preparation_concurrency
            ):
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await wake.wait()

    task = asyncio.create_task(loop(), name="meeting-preparation")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
