"""The dispatcher: takes what is due, decides, sends through ACS, records the outcome.

Work is proportional to what is due: one partial index on `due_at` over pending rows, and a
claim with `FOR UPDATE SKIP LOCKED` so replicas never take the same message. A claim pushes
`due_at` a lease ahead, so a dispatcher that dies mid-send leaves the message to be retried
with the same repeatabilityRequestId and repeatabilityFirstSent, which ACS answers with the
original message instead of sending again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import structlog

from libs.common.crypto import FieldCipher
from libs.common.events import SmsKind, SmsOutcome, SmsSentV1, Topic, encode_event, make_event
from services.notify import metrics
from services.notify.acs import AcsSmsClient, SendResult
from services.notify.clock import Clock
from services.notify.messages import render
from services.notify.phones import Refusal, recipient, recipient_hash
from services.notify.settings import NotifySettings

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

log = structlog.get_logger(__name__)

RATE_WINDOW = timedelta(minutes=1)
# Told after each round: (kind, result) per message handled. Tests wait on it.
RoundObserver = Callable[[list[tuple[str, str]]], None]

CLAIM = """
WITH due AS (
    SELECT id FROM sms_messages WHERE status = 'pending' AND due_at <= $1
    ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE sms_messages m SET due_at = $3, claims = m.claims + 1 FROM due WHERE m.id = due.id
    RETURNING m.id, m.appointment_key, m.kind, m.claims, m.attempts, m.send_at,
              m.repeatability_request_id
)
SELECT c.*, a.tenant_id, a.integration_id, a.starts_at, a.time_zone, a.join_url,
       a.phone_encrypted, a.sms_enabled AS appointment_sms, a.booked, a.cancelled,
       i.organisation_name, i.sms_enabled AS integration_sms, i.sms_from_number, i.sms_templates
FROM claimed c
LEFT JOIN appointments a ON a.appointment_key = c.appointment_key
LEFT JOIN integrations i ON i.integration_id = a.integration_id
"""

# Serialises the window check per sending number across replicas; the key is the one earlier
# versions lock, so old and new replicas still exclude each other during a rollout. The
# opt-out is read in the same round trip.
_LOCK_SENDER = (
    "SELECT pg_advisory_xact_lock(hashtext('sms-rate:' || $1)),"
    " (SELECT opted_out FROM opt_outs WHERE sender = $1 AND recipient_hash = $2)"
)
# The window as one row, the count and the oldest send (a busy number has up to `limit` sends
# in it; fetching them all tripled this query's client CPU), and, only if a slot is free and
# the claim still holds, the attempt and the send recorded: no row for `recorded` means the
# number is full or the message was taken over.
_RECORD_ATTEMPT = """
WITH window_ AS (
    SELECT count(*) AS sent, min(sent_at) AS oldest FROM (
        SELECT sent_at FROM sender_sends WHERE sender = $1 AND sent_at > $2
        ORDER BY sent_at LIMIT $3
    ) w
), recorded AS (
    UPDATE sms_messages SET attempts = attempts + 1, sender = $1,
        repeatability_first_sent = coalesce(repeatability_first_sent, $6)
    WHERE id = $4 AND claims = $5 AND status = 'pending' AND (SELECT sent FROM window_) < $3
    RETURNING repeatability_first_sent, attempts
), counted AS (
    INSERT INTO sender_sends (sender, sent_at) SELECT $1, $6 FROM recorded
)
SELECT window_.sent, window_.oldest, recorded.repeatability_first_sent, recorded.attempts
FROM window_ LEFT JOIN recorded ON true
"""

# The outcome and what goes with it in one statement: one round trip, atomic without a
# transaction of its own. Each part selects from `finished`, so a dispatcher whose claim was
# taken over writes none of them, and the outbox row exists iff the outcome was recorded (what
# `outbox.enqueue` guarantees inside a transaction). $9 is the confirmation state (NULL for
# other kinds), $10 and $11 the dead letter's attempts and reason (NULL unless parked).
# A send the provider accepted is recorded even if the message was cancelled or superseded
# meanwhile: it did go out.
_FINISH_PARTS = (
    "WITH finished AS (UPDATE sms_messages SET status = $3, outcome = $4, reason = $5,"
    " segments = $6, provider_message_id = coalesce($7, provider_message_id), finished_at = $8"
    " WHERE id = $1 AND claims = $2 AND (status = 'pending' OR $3 = 'sent')"
    " RETURNING id, appointment_key, kind),"
    " confirmed AS (UPDATE appointments a SET confirmation = $9 FROM finished f"
    " WHERE $9::text IS NOT NULL AND a.appointment_key = f.appointment_key),"
    " parked AS (INSERT INTO dead_letters (sms_message_id, appointment_key, kind, attempts,"
    " reason) SELECT id, appointment_key, kind, $10, $11 FROM finished"
    " WHERE $10::integer IS NOT NULL)"
)
# Outcomes without an event (a cancelled message) leave the outbox out: its trigger fires per
# statement, rows inserted or not, and would wake the relay for nothing.
_FINISH = _FINISH_PARTS + " SELECT id FROM finished"  # noqa: S608 -- constants only
_FINISH_ANNOUNCED = (
    _FINISH_PARTS  # noqa: S608 -- constants only
    + ", announced AS (INSERT INTO outbox (event_id, topic, key, payload)"
    " SELECT $12, $13, $14, $15 FROM finished) SELECT id FROM finished"
)


@dataclass(frozen=True)
class Finish:
    status: str  # sent | refused | failed | cancelled
    outcome: SmsOutcome | None
    reason: str | None = None
    segments: int = 0
    provider_message_id: str | None = None
    dead_letter: bool = False
    attempts: int | None = None


class Dispatcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        acs: AcsSmsClient,
        settings: NotifySettings,
        clock: Clock,
    ) -> None:
        self._pool = pool
        self._acs = acs
        self._settings = settings
        self._cipher: FieldCipher = settings.field_cipher()
        self._hash_secret = settings.recipient_hash_secret.get_secret_value()
        self._clock = clock
        self._channel = f"sms_due_{settings.database_schema}"
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._observers: list[RoundObserver] = []
        self._listener: PoolConnectionProxy[asyncpg.Record] | None = None
        self._limit = asyncio.Semaphore(settings.sms_send_concurrency)
        self._in_flight: set[asyncio.Task[str]] = set()

    def observe(self, observer: RoundObserver) -> None:
        self._observers.append(observer)

    def wake(self, *_: object) -> None:
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Keeps up to `sms_send_concurrency` sends in flight, claiming more as each finishes,
        so a trickle of new work never waits behind a slow batch."""
        backoff = 0.2
        capacity = self._settings.sms_send_concurrency
        while not self._stopping.is_set():
            self._wake.clear()
            free = capacity - len(self._in_flight)
            if free <= 0:
                # Woken (a poll, a new message's NOTIFY) with every slot busy: the next send
                # to finish wakes the loop. Claiming now would take a whole batch past the
                # capacity, leases ticking, and the round after would fail on a negative LIMIT.
                await self._sleep(self._settings.scheduler_poll_interval_s)
                continue
            try:
                await self._ensure_listener()
                rows = await self.claim_due(min(free, self._settings.scheduler_batch_size))
                for row in rows:
                    task = asyncio.create_task(self._guarded(row))
                    self._in_flight.add(task)
                    task.add_done_callback(self._finished(row["kind"]))
                if rows and len(rows) == free:
                    pause = self._settings.scheduler_poll_interval_s  # woken as a send finishes
                elif rows:
                    continue
                else:
                    pause = await self._until_next_due()
                backoff = 0.2
            except Exception as exc:
                log.warning("dispatch round failed", error=type(exc).__name__, retry_in_s=backoff)
                await self._release_listener()
                pause, backoff = backoff, min(backoff * 2, 10.0)
            await self._sleep(pause)
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        # stop() may have raced a listener being set up; the pool cannot close while held.
        await self._release_listener()

    def _finished(self, kind: str) -> Callable[[asyncio.Task[str]], None]:
        def done(task: asyncio.Task[str]) -> None:
            self._in_flight.discard(task)
            result = "error" if task.cancelled() or task.exception() else task.result()
            for observer in self._observers:
                observer([(kind, result)])
            self._wake.set()

        return done

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        await self._release_listener()

    async def _until_next_due(self) -> float:
        next_due: datetime | None = await self._pool.fetchval(
            "SELECT due_at FROM sms_messages WHERE status = 'pending' ORDER BY due_at LIMIT 1"
        )
        poll = self._settings.scheduler_poll_interval_s
        if next_due is None:
            return poll
        return max(0.0, min(poll, (next_due - self._clock.now()).total_seconds()))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _ensure_listener(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        conn = await self._pool.acquire()
        try:
            await conn.add_listener(self._channel, self.wake)
        except BaseException:
            await self._pool.release(conn)
            raise
        self._listener = conn

    async def _release_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        with contextlib.suppress(Exception):
            await listener.remove_listener(self._channel, self.wake)
        with contextlib.suppress(Exception):
            await self._pool.release(listener)

    # -- one round -----------------------------------------------------------------------------
    async def claim_due(self, limit: int | None = None) -> list[asyncpg.Record]:
        now = self._clock.now()
        lease = now + timedelta(seconds=self._settings.scheduler_lease_s)
        rows = await self._pool.fetch(
            CLAIM, now, limit or self._settings.scheduler_batch_size, lease
        )
        metrics.SCHEDULER_CLAIMED.inc(len(rows))
        for row in rows:
            metrics.SCHEDULER_LAG.observe(max(0.0, (now - row["send_at"]).total_seconds()))
        return rows

    async def dispatch_due(self) -> int:
        """Handle one batch of due messages; returns how many were taken."""
        rows = await self.claim_due()
        if not rows:
            return 0
        results = await asyncio.gather(*(self._guarded(row) for row in rows))
        handled = [(row["kind"], result) for row, result in zip(rows, results, strict=True)]
        for observer in self._observers:
            observer(handled)
        return len(rows)

    async def _guarded(self, row: asyncpg.Record) -> str:
        async with self._limit:
            with structlog.contextvars.bound_contextvars(
                appointment_key=row["appointment_key"], sms_kind=row["kind"]
            ):
                try:
                    return await self._dispatch(row)
                except Exception:
                    # The lease brings it back; nothing was recorded as done.
                    log.exception("dispatch failed; the message will be retried")
                    return "error"

    async def _dispatch(self, row: asyncpg.Record) -> str:
        kind: SmsKind = row["kind"]
        if row["booked"] is None or not row["booked"]:
            return await self._wait(row, "appointment not booked yet")
        if row["cancelled"] and kind != "cancellation":
            return await self._finish(row, Finish("cancelled", None, "appointment cancelled"))
        if row["organisation_name"] is None:
            return await self._wait(row, "integration configuration not received yet")
        sender = row["sms_from_number"]
        if not (row["appointment_sms"] and row["integration_sms"] and sender):
            return await self._finish(
                row, Finish("refused", "no_consent", "SMS off or consents not given")
            )
        to = recipient(
            self._cipher,
            row["phone_encrypted"],
            row["appointment_key"],
            self._settings.sms_default_region,
        )
        if isinstance(to, Refusal):
            return await self._finish(row, Finish("refused", "invalid_number", to.reason))
        text = render(
            kind,
            organisation=row["organisation_name"],
            starts_at=row["starts_at"],
            time_zone=row["time_zone"],
            join_url=row["join_url"],
            templates=orjson.loads(row["sms_templates"]),
        )
        if text is None:
            return await self._finish(
                row,
                Finish("failed", "failed", "text does not fit in 2 segments", dead_letter=True),
            )
        slot = await self._reserve(row, sender, recipient_hash(self._hash_secret, to))
        if isinstance(slot, str):
            return slot
        result = await self._send(row, sender, to, text.text, slot)
        return await self._settle(row, result, text.segments, slot[1])

    async def _send(
        self, row: asyncpg.Record, sender: str, to: str, text: str, slot: tuple[datetime, int]
    ) -> SendResult:
        with metrics.PROVIDER_LATENCY.time():
            result = await self._acs.send(
                sender=sender,
                to=to,
                message=text,
                repeatability_request_id=row["repeatability_request_id"],
                repeatability_first_sent=slot[0],
                tag=f"notify:{row['kind']}",
            )
        metrics.PROVIDER_RESPONSES.labels(metrics.status_class(result.status)).inc()
        return result

    async def _settle(
        self, row: asyncpg.Record, result: SendResult, segments: int, attempts: int
    ) -> str:
        if result.accepted:
            return await self._finish(
                row, Finish("sent", "sent", None, segments, result.message_id)
            )
        reason = f"provider answered {result.status or 'nothing'}" + (
            f" ({result.error_code})" if result.error_code else ""
        )
        if result.retryable and attempts < self._settings.sms_max_attempts:
            delay = self._backoff(attempts)
            if result.retry_after_s is not None:
                delay = max(delay, result.retry_after_s)
            cause = (
                "provider_throttled"
                if 429 in (result.status, result.recipient_status)
                else ("provider_error")
            )
            metrics.SMS_RETRIES.labels(cause).inc()
            return await self._retry(row, self._clock.now() + timedelta(seconds=delay), reason)
        if not result.retryable:
            reason = f"refused: {reason}"
        else:
            reason = f"gave up after {attempts} attempts: {reason}"
        return await self._finish(
            row, Finish("failed", "failed", reason, dead_letter=True, attempts=attempts)
        )

    def _backoff(self, attempts: int) -> float:
        ceiling: float = min(
            self._settings.sms_backoff_max_s,
            self._settings.sms_backoff_base_s * 2.0 ** max(0, attempts - 1),
        )
        # Jitter spreads the retries of many messages throttled at the same moment.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    # -- state changes, each fenced by the claim so a stale dispatcher changes nothing ---------
    async def _reserve(
        self, row: asyncpg.Record, sender: str, who: str
    ) -> tuple[datetime, int] | str:
        """Opt-out check, a rate-limit slot and the attempt recorded, before the call."""
        now = self._clock.now()
        limit = self._settings.sms_rate_per_minute
        async with self._pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(_LOCK_SENDER, sender, who, column=1):
                return await self._finish(
                    row, Finish("refused", "opted_out", "recipient replied STOP"), conn
                )
            # A separate statement after the lock, so its snapshot sees the sends committed
            # before the lock was granted (the lock's own statement took its snapshot before
            # waiting for it).
            window = await conn.fetchrow(
                _RECORD_ATTEMPT, sender, now - RATE_WINDOW, limit, row["id"], row["claims"], now
            )
            assert window is not None  # an aggregate's one row
            if window["sent"] >= limit:
                metrics.SMS_RETRIES.labels("rate_limit").inc()
                return await self._retry(
                    row, window["oldest"] + RATE_WINDOW, "sending number at its rate limit",
                    conn,
                )  # fmt: skip
            if window["attempts"] is None:
                return "lost"
            return window["repeatability_first_sent"], window["attempts"]

    async def _wait(self, row: asyncpg.Record, reason: str) -> str:
        attempts = row["attempts"] + 1
        if attempts >= self._settings.sms_max_attempts:
            return await self._finish(
                row, Finish("failed", "failed", f"gave up: {reason}", dead_letter=True)
            )
        metrics.SMS_RETRIES.labels("waiting").inc()
        await self._pool.execute(
            "UPDATE sms_messages SET attempts = $3 WHERE id = $1 AND claims = $2",
            row["id"],
            row["claims"],
            attempts,
        )
        return await self._retry(
            row, self._clock.now() + timedelta(seconds=self._backoff(attempts)), reason
        )

    async def _retry(self, row: asyncpg.Record, at: datetime, reason: str, conn: Any = None) -> str:
        status = await (conn or self._pool).execute(
            "UPDATE sms_messages SET due_at = $3, reason = $4"
            " WHERE id = $1 AND claims = $2 AND status = 'pending'",
            row["id"],
            row["claims"],
            at,
            reason,
        )
        return "retry" if status == "UPDATE 1" else "lost"

    async def _finish(self, row: asyncpg.Record, finish: Finish, conn: Any = None) -> str:
        now = self._clock.now()
        kind: SmsKind = row["kind"]
        announce = finish.outcome is not None and row["integration_id"] is not None
        confirmation = None
        if kind == "confirmation":
            confirmation = {"sent": "sent", "cancelled": "skipped"}.get(
                finish.status, "skipped" if finish.outcome == "no_consent" else "failed"
            )
        parked: tuple[int | None, str | None] = (None, None)
        if finish.dead_letter:
            attempts = finish.attempts if finish.attempts is not None else row["attempts"]
            parked = (attempts, finish.reason or "unknown")
        args: tuple[Any, ...] = (
            row["id"],
            row["claims"],
            finish.status,
            finish.outcome,
            finish.reason,
            finish.segments,
            finish.provider_message_id,
            now,
            confirmation,
            *parked,
        )
        if announce:
            payload = SmsSentV1(
                integration_id=row["integration_id"],
                kind=kind,
                outcome=finish.outcome,
                segments=finish.segments,
                at=now,
            )
            event = make_event(Topic.SMS_SENT, row["tenant_id"], row["appointment_key"], payload)
            args += (event.event_id, event.type, event.key, encode_event(event))
        statement = _FINISH_ANNOUNCED if announce else _FINISH
        if await (conn or self._pool).fetchval(statement, *args) is None:
            return "lost"
        if finish.dead_letter:
            metrics.SMS_DEAD_LETTERED.labels(kind).inc()
            log.error("sms dead-lettered", reason=finish.reason)
        if announce:
            metrics.SMS_OUTCOMES.labels(kind, finish.outcome).inc()
        if finish.outcome not in (None, "sent"):
            log.info("sms not sent", outcome=finish.outcome, reason=finish.reason)
        return finish.outcome or finish.status
