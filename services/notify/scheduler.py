"""The dispatcher: takes what is due, decides, sends through ACS, records the outcome.

Work is proportional to what is due: one partial index on `due_at` over pending rows, and a
claim with `FOR UPDATE SKIP LOCKED` so replicas never take the same message. A claim pushes
`due_at` a lease ahead, so a dispatcher that dies mid-send leaves the message to be retried
with the same repeatabilityRequestId and repeatabilityFirstSent, which ACS answers with the
original message instead of sending again.

A claim is handled as a set: one statement reserves the rate-limit slots of all its
messages (their numbers locked, then the windows counted and the attempts recorded), and
the outcomes of the sends that finish together are recorded in one statement. Every write
stays fenced by the claim, so a dispatcher whose claim was taken over changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import structlog

from libs.common.crypto import FieldCipher
from libs.common.events import SmsKind, SmsOutcome, SmsSentV1, Topic, encode_event, make_event
from services.notify import lost_sends, metrics
from services.notify.acs import AcsSmsClient, SendResult, send_tag
from services.notify.clock import Clock
from services.notify.messages import render
from services.notify.phones import Refusal, recipient, recipient_hash
from services.notify.settings import NotifySettings

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

log = structlog.get_logger(__name__)

# Messages about a visit that are pointless once it is over (a reminder is so once it starts).
_OVER_WITH_THE_VISIT: frozenset[SmsKind] = frozenset({"cancellation", "confirmation", "reschedule"})

RATE_WINDOW = timedelta(minutes=1)
RATE_LIMITED = "sending number at its rate limit"
# Told after each round: (kind, result) per message handled. Tests wait on it.
RoundObserver = Callable[[list[tuple[str, str]]], None]

# The claim also answers when the next message not taken becomes due ($1 is now): when it
# took fewer than it asked for, everything due was taken, and the loop sleeps until then
# (or a NOTIFY) without asking again. With nothing claimed it is one row of NULLs and
# `next_due`.
CLAIM = """
WITH due AS (
    SELECT id FROM sms_messages WHERE status = 'pending' AND due_at <= $1
    ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE sms_messages m SET due_at = $3, claims = m.claims + 1 FROM due WHERE m.id = due.id
    RETURNING m.id, m.appointment_key, m.kind, m.claims, m.attempts, m.send_at,
              m.repeatability_request_id, m.in_flight_since
)
SELECT c.*, a.tenant_id, a.integration_id, a.starts_at, a.ends_at, a.time_zone, a.join_url,
       a.phone_encrypted, a.sms_enabled AS appointment_sms, a.booked, a.cancelled,
       i.organisation_name, i.sms_enabled AS integration_sms, i.sms_from_number, i.sms_templates,
       n.next_due
FROM (
    SELECT (SELECT due_at FROM sms_messages WHERE status = 'pending' AND due_at > $1
            ORDER BY due_at LIMIT 1) AS next_due
) n
LEFT JOIN claimed c ON true
LEFT JOIN appointments a ON a.appointment_key = c.appointment_key
LEFT JOIN integrations i ON i.integration_id = a.integration_id
"""

# The reservation of a claim's messages in one round trip (migrations/0003_reserve_sms_slots.sql,
# 0004_in_flight.sql): their numbers locked, then opt-outs, rate windows, attempts and sends, in
# a function so that the count has a snapshot taken after the locks were granted and no client
# round trip happens while they are held. Per message: 'reserved' (with repeatabilityFirstSent
# and the attempt; marked in flight), 'deferred' (its number is at its limit), 'opted_out' or
# 'lost' (taken over).
_RESERVE = "SELECT * FROM reserve_sms_slots($1, $2, $3, $4, $5, $6, $7, $8)"

# Outcomes and what goes with them, many messages in one statement: one round trip, atomic
# without a transaction of its own. Each part selects from `finished`, so an outcome from a
# dispatcher whose claim was taken over writes none of them, and an outbox row exists iff its
# outcome was recorded (what `outbox.enqueue` guarantees inside a transaction). Per message:
# the confirmation state (NULL for other kinds), the dead letter's attempts and reason (NULL
# unless parked), the sms-sent event (NULL when there is none). A send the provider accepted
# is recorded even if the message was cancelled or superseded meanwhile: it did go out; but
# not over its own record, nor over one its delivery report recorded first (`_CARRIED`). A
# round whose answer was lost after it committed is written again one outcome at a time, and
# so changes nothing the second time: each event id is made once per outcome (`_finish`), and
# the outbox insert skips one already there.
_FINISH_PARTS = (
    "WITH given AS (SELECT * FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::text[],"
    " $5::text[], $6::integer[], $7::text[], $8::timestamptz[], $9::text[], $10::integer[],"
    " $11::text[], $12::uuid[], $13::text[], $14::text[], $15::bytea[])"
    " AS g(id, claims, status, outcome, reason, segments, provider_message_id, at,"
    " confirmation, dead_attempts, dead_reason, event_id, topic, key, payload)),"
    " finished AS (UPDATE sms_messages m SET status = g.status, outcome = g.outcome,"
    " reason = g.reason, segments = g.segments,"
    " provider_message_id = coalesce(g.provider_message_id, m.provider_message_id),"
    " finished_at = g.at FROM given g"
    " WHERE m.id = g.id AND m.claims = g.claims"
    " AND (m.status = 'pending' OR (g.status = 'sent' AND m.status <> 'sent'))"
    " RETURNING m.id, m.appointment_key, m.kind),"
    " confirmed AS (UPDATE appointments a SET confirmation = c.confirmation FROM"
    " (SELECT DISTINCT ON (f.appointment_key) f.appointment_key, g.confirmation"
    " FROM finished f JOIN given g ON g.id = f.id WHERE g.confirmation IS NOT NULL"
    " ORDER BY f.appointment_key, f.id DESC) c WHERE a.appointment_key = c.appointment_key),"
    " parked AS (INSERT INTO dead_letters (sms_message_id, appointment_key, kind, attempts,"
    " reason) SELECT f.id, f.appointment_key, f.kind, g.dead_attempts, g.dead_reason"
    " FROM finished f JOIN given g ON g.id = f.id WHERE g.dead_attempts IS NOT NULL)"
)
# Outcomes without an event (a cancelled message) leave the outbox out: its trigger fires per
# statement, rows inserted or not, and would wake the relay for nothing.
_FINISH = _FINISH_PARTS + " SELECT id FROM finished"  # noqa: S608 -- constants only
_FINISH_ANNOUNCED = (
    _FINISH_PARTS  # noqa: S608 -- constants only
    + ", announced AS (INSERT INTO outbox (event_id, topic, key, payload)"
    " SELECT g.event_id, g.topic, g.key, g.payload FROM finished f JOIN given g ON g.id = f.id"
    " WHERE g.event_id IS NOT NULL ON CONFLICT (event_id) DO NOTHING) SELECT id FROM finished"
)
# Which of the outcomes a write did not record their rows already carry: the same claim,
# status, outcome and time, so written by an earlier write of the same outcome whose answer
# was lost after it committed (a consumer's cancel has its own time, a later claim its own
# number); or a send the same claim's message had recorded from its delivery report first
# (webhooks.py: its tag named the message in flight), with the message id ACS answered.
_CARRIED = (
    "SELECT m.id FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::text[],"
    " $5::timestamptz[], $6::text[]) AS g(id, claims, status, outcome, at, provider_message_id)"
    " JOIN sms_messages m ON m.id = g.id AND m.claims = g.claims AND m.status = g.status"
    " AND m.outcome IS NOT DISTINCT FROM g.outcome AND (m.finished_at = g.at"
    " OR (g.status = 'sent' AND m.provider_message_id = g.provider_message_id))"
)


@dataclass(frozen=True)
class Finish:
    status: str  # sent | refused | failed | cancelled | superseded
    outcome: SmsOutcome | None
    reason: str | None = None
    segments: int = 0
    provider_message_id: str | None = None
    dead_letter: bool = False
    attempts: int | None = None


@dataclass(frozen=True)
class _Wait:
    reason: str


@dataclass(frozen=True)
class _Ready:
    """A message that may go out once it has a slot: its number, recipient and text."""

    sender: str
    to: str
    who: str  # the recipient's keyed hash, for the opt-out
    text: str
    segments: int


# A reserved slot: repeatabilityFirstSent and the attempt it is.
_Slot = tuple[datetime, int]


@dataclass
class _Outcome:
    """An outcome waiting to be recorded with the others that finish meanwhile."""

    id: int
    values: tuple[Any, ...]  # one element per array of _FINISH_PARTS
    announce: bool
    recorded: asyncio.Future[bool]
    # Unsent, and the message was in flight when claimed (an earlier send's answer lost): a
    # delivery report stored first makes it a send recorded from that report instead.
    in_flight: bool = False
    from_report: bool = False  # so recorded


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
        # Messages claimed by the loop and not yet answered by ACS, and the claims' tasks.
        self._busy = 0
        # The loop has left due messages unclaimed for want of a slot: an answer wakes it.
        self._starved = False
        self._claims: set[asyncio.Task[None]] = set()
        self._outcomes: list[_Outcome] = []
        # Outcomes answered by ACS and not yet recorded. A slot frees on the answer, so this
        # bounds what a stalled recorder (a row locked by a consumer) lets the loop send on.
        self._unrecorded = 0
        self._recorder: asyncio.Task[None] | None = None

    def observe(self, observer: RoundObserver) -> None:
        self._observers.append(observer)

    def wake(self, *_: object) -> None:
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Keeps up to `sms_send_concurrency` messages in hand (claimed, not yet answered by
        ACS), claiming more as each is answered, so a trickle of new work never waits behind
        a slow batch."""
        backoff = 0.2
        capacity = self._settings.sms_send_concurrency
        while not self._stopping.is_set():
            self._wake.clear()
            free = capacity - self._busy - max(0, self._unrecorded - capacity)
            self._starved = free <= 0
            if free <= 0:
                # Woken (a poll, a new message's NOTIFY) with every slot busy: the next message
                # answered wakes the loop. Claiming now would lease messages no slot can send.
                await self._sleep(self._settings.scheduler_poll_interval_s)
                continue
            try:
                await self._ensure_listener()
                asked = min(free, self._settings.scheduler_batch_size)
                rows, next_due = await self._claim(asked)
                if rows:
                    self._busy += len(rows)
                    task = asyncio.create_task(self._handle_claim(rows))
                    self._claims.add(task)
                    task.add_done_callback(self._claims.discard)
                if len(rows) == free:
                    if self._busy < capacity:
                        continue  # answers came in while claiming
                    self._starved = True  # woken as one is answered
                    pause = self._settings.scheduler_poll_interval_s
                elif rows and len(rows) == asked:
                    continue  # a full batch: more may be due
                else:
                    pause = self._until(next_due)
                backoff = 0.2
            except Exception as exc:
                log.warning("dispatch round failed", error=type(exc).__name__, retry_in_s=backoff)
                await self._release_listener()
                pause, backoff = backoff, min(backoff * 2, 10.0)
            await self._sleep(pause)
        if self._claims:
            await asyncio.gather(*self._claims, return_exceptions=True)
        # stop() may have raced a listener being set up; the pool cannot close while held.
        await self._release_listener()

    async def _handle_claim(self, rows: Sequence[asyncpg.Record]) -> None:
        """Frees a message's slot as soon as ACS has answered it (or it was settled without
        a send): recording the outcome is no reason to keep the next due message waiting.
        Each result is told once recorded. An answer wakes the loop only if it left due
        messages for want of a slot (otherwise a NOTIFY or the next due time does), a retry
        so that the loop learns the new due time."""
        holding = {row["id"] for row in rows}

        def answered(message_id: int) -> None:
            if message_id in holding:
                holding.discard(message_id)
                self._busy -= 1
                if self._starved:
                    self._wake.set()

        def settled(kind: str, result: str) -> None:
            for observer in self._observers:
                observer([(kind, result)])
            if result == "retry":
                self._wake.set()

        try:
            await self._dispatch_many(rows, settled, answered)
        finally:
            self._busy -= len(holding)
            if holding and self._starved:
                self._wake.set()
            holding.clear()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        await self._release_listener()

    def _until(self, next_due: datetime | None) -> float:
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
    async def _claim(self, limit: int) -> tuple[list[asyncpg.Record], datetime | None]:
        """Up to `limit` due messages, and when the next one not taken is due."""
        now = self._clock.now()
        lease = now + timedelta(seconds=self._settings.scheduler_lease_s)
        answer = await self._pool.fetch(CLAIM, now, limit, lease)
        rows = [row for row in answer if row["id"] is not None]
        metrics.SCHEDULER_CLAIMED.inc(len(rows))
        for row in rows:
            metrics.SCHEDULER_LAG.observe(max(0.0, (now - row["send_at"]).total_seconds()))
        return rows, answer[0]["next_due"]

    async def claim_due(self, limit: int | None = None) -> list[asyncpg.Record]:
        rows, _ = await self._claim(limit or self._settings.scheduler_batch_size)
        return rows

    async def dispatch_due(self) -> int:
        """Handle one batch of due messages; returns how many were taken."""
        rows = await self.claim_due()
        if not rows:
            return 0
        results = await self._dispatch_many(rows)
        handled = [(row["kind"], result) for row, result in zip(rows, results, strict=True)]
        for observer in self._observers:
            observer(handled)
        return len(rows)

    async def _dispatch(self, row: asyncpg.Record) -> str:
        """One claimed message, as a claim of one."""
        [result] = await self._dispatch_many([row])
        return result

    async def _dispatch_many(
        self,
        rows: Sequence[asyncpg.Record],
        settled: Callable[[str, str], None] | None = None,
        answered: Callable[[int], None] | None = None,
    ) -> list[str]:
        """Decides each claimed message, reserves the slots of those that may go out in one
        statement, then sends them side by side. Each message's id is told to `answered`
        once ACS has answered it or it was settled without a send, and its result to
        `settled` once recorded. A message whose handling fails is left to its lease."""
        decided: list[Finish | _Wait | _Ready | str] = []
        for row in rows:
            try:
                decided.append(self._decide(row))
            except Exception:
                self._log_failure(row)
                decided.append("error")
        ready = [(row, d) for row, d in zip(rows, decided, strict=True) if isinstance(d, _Ready)]
        slots = await self._reserve_all(ready) if ready else {}

        async def handle(row: asyncpg.Record, decision: Finish | _Wait | _Ready | str) -> str:
            def sent() -> None:
                if answered is not None:
                    answered(row["id"])

            result = "error"
            try:
                with structlog.contextvars.bound_contextvars(
                    appointment_key=row["appointment_key"], sms_kind=row["kind"]
                ):
                    try:
                        result = await self._carry_out(row, decision, slots.get(row["id"]), sent)
                    except Exception:
                        self._log_failure(row)
                return result
            finally:
                sent()
                if settled is not None:
                    settled(row["kind"], result)

        return list(
            await asyncio.gather(*(handle(r, d) for r, d in zip(rows, decided, strict=True)))
        )

    @staticmethod
    def _log_failure(row: asyncpg.Record) -> None:
        with structlog.contextvars.bound_contextvars(
            appointment_key=row["appointment_key"], sms_kind=row["kind"]
        ):
            # The lease brings it back; nothing was recorded as done.
            log.exception("dispatch failed; the message will be retried")

    def _decide(self, row: asyncpg.Record) -> Finish | _Wait | _Ready:
        kind: SmsKind = row["kind"]
        if row["booked"] is None or not row["booked"]:
            return _Wait("appointment not booked yet")
        if row["cancelled"] and kind != "cancellation":
            return Finish("cancelled", None, "appointment cancelled")
        # Planning leaves out a reminder whose moment has passed (consumers.due_reminders); one
        # reached late (a stalled dispatcher, retries) is as out of place once the visit is on.
        if kind == "reminder" and self._clock.now() >= row["starts_at"]:
            return Finish("superseded", None, "the visit has started")
        # Likewise a cancellation notice planned in time but reached late: the visit is over.
        # And a confirmation or a notice of a move reached once the visit is over by its
        # current times (an EHR correcting a past visit's times, a late booking): nothing left
        # to tell the patient.
        if kind in _OVER_WITH_THE_VISIT and self._clock.now() >= row["ends_at"]:
            return Finish("superseded", None, "the visit has ended")
        if row["organisation_name"] is None:
            return _Wait("integration configuration not received yet")
        sender = row["sms_from_number"]
        if not (row["appointment_sms"] and row["integration_sms"] and sender):
            return Finish("refused", "no_consent", "SMS off or consents not given")
        to = recipient(
            self._cipher,
            row["phone_encrypted"],
            row["appointment_key"],
            self._settings.sms_default_region,
        )
        if isinstance(to, Refusal):
            return Finish("refused", "invalid_number", to.reason)
        text = render(
            kind,
            organisation=row["organisation_name"],
            starts_at=row["starts_at"],
            time_zone=row["time_zone"],
            join_url=row["join_url"],
            templates=orjson.loads(row["sms_templates"]),
        )
        if text is None:
            return Finish("failed", "failed", "text does not fit in 2 segments", dead_letter=True)
        return _Ready(sender, to, recipient_hash(self._hash_secret, to), text.text, text.segments)

    async def _carry_out(
        self,
        row: asyncpg.Record,
        decision: Finish | _Wait | _Ready | str,
        slot: _Slot | Finish | str | None,
        answered: Callable[[], None],
    ) -> str:
        if isinstance(decision, str):
            return decision
        if isinstance(decision, Finish):
            return await self._finish(row, decision)
        if isinstance(decision, _Wait):
            return await self._wait(row, decision.reason)
        if isinstance(slot, Finish):
            return await self._finish(row, slot)
        if slot is None or isinstance(slot, str):
            return slot or "error"
        result = await self._send(row, decision.sender, decision.to, decision.text, slot)
        answered()
        return await self._settle(row, result, decision.segments, slot[1])

    async def _send(
        self, row: asyncpg.Record, sender: str, to: str, text: str, slot: _Slot
    ) -> SendResult:
        async with self._limit:
            with metrics.PROVIDER_LATENCY.time():
                result = await self._acs.send(
                    sender=sender,
                    to=to,
                    message=text,
                    repeatability_request_id=row["repeatability_request_id"],
                    repeatability_first_sent=slot[0],
                    tag=send_tag(row["kind"], row["repeatability_request_id"]),
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
                # Honoured up to the longest backoff: an answer asking for days (or inf,
                # which overflowed timedelta) must not park a reminder past its visit.
                delay = max(delay, min(result.retry_after_s, self._settings.sms_backoff_max_s))
            cause = (
                "provider_throttled"
                if 429 in (result.status, result.recipient_status)
                else ("provider_error")
            )
            metrics.SMS_RETRIES.labels(cause).inc()
            return await self._retry(
                row,
                self._clock.now() + timedelta(seconds=delay),
                reason,
                # An answer to this attempt says nothing of an earlier one that got none
                # (in flight when claimed): that one may be at ACS, so the mark stays.
                answered=not result.unanswered and row["in_flight_since"] is None,
            )
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
    async def _reserve_all(
        self, ready: Sequence[tuple[asyncpg.Record, _Ready]]
    ) -> dict[int, _Slot | Finish | str]:
        """Opt-outs, rate-limit slots and attempts for a claim's messages in one statement;
        if that fails (a deadlock with a consumer's transaction, say), one message at a time,
        so one bad message does not hold the others back."""
        try:
            return await self._reserve(ready)
        except Exception:
            if len(ready) == 1:
                self._log_failure(ready[0][0])
                return {ready[0][0]["id"]: "error"}
            log.warning("batch reservation failed; reserving one message at a time")
        slots: dict[int, _Slot | Finish | str] = {}
        for one in ready:
            slots |= await self._reserve_all([one])
        return slots

    async def _reserve(
        self, ready: Sequence[tuple[asyncpg.Record, _Ready]]
    ) -> dict[int, _Slot | Finish | str]:
        """Per message id: its slot, a refusal (opted out), "retry" (its number is at its
        limit; put off) or "lost" (the claim was taken over)."""
        answer = await self._pool.fetch(
            _RESERVE,
            [row["id"] for row, _ in ready],
            [row["claims"] for row, _ in ready],
            [r.sender for _, r in ready],
            [r.who for _, r in ready],
            self._clock.now(),
            self._settings.sms_rate_per_minute,
            RATE_WINDOW,
            RATE_LIMITED,
        )
        slots: dict[int, _Slot | Finish | str] = {}
        for reserved in answer:
            message_id, verdict = reserved["reserved_id"], reserved["verdict"]
            if verdict == "reserved":
                slots[message_id] = (reserved["reserved_first_sent"], reserved["reserved_attempts"])
            elif verdict == "opted_out":
                slots[message_id] = Finish("refused", "opted_out", "recipient replied STOP")
            elif verdict == "deferred":
                metrics.SMS_RETRIES.labels("rate_limit").inc()
                slots[message_id] = "retry"
            else:
                slots[message_id] = "lost"
        return slots

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

    async def _retry(
        self, row: asyncpg.Record, at: datetime, reason: str, answered: bool = False
    ) -> str:
        """Puts the message off until `at`. `answered`: ACS answered that it did not take it,
        so it is no longer in flight (a reschedule replans it); without an answer it may be
        at ACS, and stays in flight."""
        status = await self._pool.execute(
            "UPDATE sms_messages SET due_at = $3, reason = $4,"
            " in_flight_since = CASE WHEN $5 THEN NULL ELSE in_flight_since END"
            " WHERE id = $1 AND claims = $2 AND status = 'pending'",
            row["id"],
            row["claims"],
            at,
            reason,
            answered,
        )
        return "retry" if status == "UPDATE 1" else "lost"

    async def _finish(self, row: asyncpg.Record, finish: Finish) -> str:
        """Records the outcome with the others finishing meanwhile (one statement for all)."""
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
        event: tuple[Any, ...] = (None, None, None, None)
        if announce:
            payload = SmsSentV1(
                integration_id=row["integration_id"],
                kind=kind,
                outcome=finish.outcome,
                segments=finish.segments,
                at=now,
            )
            sent = make_event(Topic.SMS_SENT, row["tenant_id"], row["appointment_key"], payload)
            event = (sent.event_id, sent.type, sent.key, encode_event(sent))
        outcome = _Outcome(
            row["id"],
            (
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
                *event,
            ),
            announce,
            asyncio.get_running_loop().create_future(),
            in_flight=row["in_flight_since"] is not None and finish.status != "sent",
        )
        self._outcomes.append(outcome)
        self._unrecorded += 1
        outcome.recorded.add_done_callback(self._outcome_recorded)
        if self._recorder is None:
            self._recorder = asyncio.create_task(self._record_outcomes())
        if not await outcome.recorded:
            return "lost"
        if outcome.from_report:
            metrics.SMS_SENT_FROM_REPORTS.labels(kind).inc()
            metrics.SMS_OUTCOMES.labels(kind, "sent").inc()
            log.info("sms send recorded from its delivery report", instead=finish.status)
            return "sent"
        if finish.dead_letter:
            metrics.SMS_DEAD_LETTERED.labels(kind).inc()
            log.error("sms dead-lettered", reason=finish.reason)
        if announce:
            metrics.SMS_OUTCOMES.labels(kind, finish.outcome).inc()
        if finish.outcome not in (None, "sent"):
            log.info("sms not sent", outcome=finish.outcome, reason=finish.reason)
        return finish.outcome or finish.status

    def _outcome_recorded(self, _: asyncio.Future[bool]) -> None:
        self._unrecorded -= 1
        if self._starved:
            self._wake.set()

    async def _record_outcomes(self) -> None:
        """Writes the waiting outcomes, one statement a round, until none wait: those that
        finish while a round is written go in the next. If a round fails (a deadlock with a
        consumer's transaction, say, or a connection lost, perhaps after the round committed),
        its outcomes are written one at a time."""
        batch: list[_Outcome] = []
        try:
            while self._outcomes:
                batch = []
                later: list[_Outcome] = []
                ids: set[int] = set()
                for outcome in self._outcomes:
                    # The same message twice (a claim and its stale predecessor) goes in two
                    # rounds, so each outcome is fenced on its own.
                    (later if outcome.id in ids else batch).append(outcome)
                    ids.add(outcome.id)
                self._outcomes = later
                try:
                    await self._write_outcomes(batch)
                except Exception:
                    # Written again alone, a lone outcome too: a lost answer may hide a round
                    # that committed, and a rewrite finds it carried on its row (recorded).
                    log.warning("recording outcomes failed; recording one at a time")
                    for outcome in batch:
                        try:
                            await self._write_outcomes([outcome])
                        except Exception as one_exc:
                            _fail(outcome, one_exc)
        finally:
            self._recorder = None
            # Cancelled mid-round (shutdown): whoever waits is told, and the message is left to
            # its lease (a rewrite of a recorded outcome is fenced).
            for outcome in [*batch, *self._outcomes]:
                _fail(outcome, ConnectionError("recording outcomes stopped"))
            self._outcomes = []

    async def _write_outcomes(self, batch: list[_Outcome]) -> None:
        """Writes `batch` in one statement and tells each outcome whether it is recorded:
        written now, or found on its row as an earlier write of it left it."""
        batch = sorted(batch, key=lambda outcome: outcome.id)
        usual = [o for o in batch if not o.in_flight]
        finished = await _write(self._pool, usual) if usual else set()
        for outcome in batch:
            if outcome.in_flight:
                finished |= await self._write_in_flight(outcome)
        unrecorded = [o for o in batch if o.id not in finished]
        if unrecorded:
            # Rare (a claim taken over, or this round written again after an unanswered one),
            # so the check costs the usual round nothing.
            values = [o.values for o in unrecorded]
            carried = await self._pool.fetch(
                _CARRIED, *([v[i] for v in values] for i in (0, 1, 2, 3, 7, 6))
            )
            finished |= {row["id"] for row in carried}
        for outcome in batch:
            if not outcome.recorded.done():
                outcome.recorded.set_result(outcome.id in finished)

    async def _write_in_flight(self, outcome: _Outcome) -> set[int]:
        """Writes an unsent outcome of a message claimed in flight (rare: an earlier send's
        answer was lost), under the message's row lock: if a delivery report naming the message
        was stored first, its send is recorded instead (lost_sends), as the report records one
        finished unsent: status and outcome 'sent', at the time it went, one sms-sent. The
        report is looked for after the lock is taken, so a webhook storing it meanwhile either
        committed first or finds the message finished here."""
        async with self._pool.acquire() as conn, conn.transaction():
            held = await conn.fetchval(
                "SELECT id FROM sms_messages WHERE id = $1 AND claims = $2"
                " AND status = 'pending' FOR UPDATE",
                outcome.values[0],
                outcome.values[1],
            )
            found = await lost_sends.reported(conn, [outcome.id]) if held is not None else []
            if found:
                [report] = found
                kind: SmsKind = report["kind"]
                outcome.values = (
                    *outcome.values[:2],
                    "sent",
                    "sent",
                    None,
                    report["segments"],
                    report["provider_message_id"],
                    report["in_flight_since"],
                    "sent" if kind == "confirmation" else None,
                    None,
                    None,
                    *lost_sends.sent_event(report),
                )
                outcome.announce = True
                outcome.from_report = True
            return await _write(conn, [outcome])


async def _write(conn: Any, batch: list[_Outcome]) -> set[int]:
    """Writes `batch` (sorted by id) in one statement; the ids of the outcomes recorded."""
    columns = [list(values) for values in zip(*(o.values for o in batch), strict=True)]
    statement = _FINISH_ANNOUNCED if any(o.announce for o in batch) else _FINISH
    return {row["id"] for row in await conn.fetch(statement, *columns)}


def _fail(outcome: _Outcome, exc: Exception) -> None:
    if not outcome.recorded.done():
        outcome.recorded.set_exception(exc)
