"""The dispatcher's one-at-a-time fallbacks: when the statement reserving a claim's slots, or
the one recording a round's outcomes, fails (a deadlock with a consumer's transaction, a
connection lost), each message is handled on its own and still sent and recorded once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
import structlog
from prometheus_client import REGISTRY

from libs.common.events import Topic
from services.notify.acs import AcsSmsClient, SendResult
from services.notify.phones import recipient_hash
from services.notify.scheduler import RATE_LIMITED, Dispatcher, Finish, _Outcome
from tests.notify.conftest import (
    OTHER_INTEGRATION,
    OTHER_SENDER,
    SENDER,
    Kit,
    MakeKit,
    kind_of,
)

OPTED_OUT = "+13125550177"


def deadlock() -> Exception:
    return asyncpg.exceptions.DeadlockDetectedError("deadlock detected")


def connection_lost() -> Exception:
    return asyncpg.exceptions.ConnectionDoesNotExistError(
        "connection was closed in the middle of operation"
    )


@dataclass
class Fault:
    """Makes a Dispatcher method over a list of messages fail: the first call for more than
    one message, then the first call for each id in `alone`. With `after`, the real
    statement runs (and commits) first and only its answer is lost."""

    error: Callable[[], Exception] = deadlock
    batches: int = 1
    alone: set[int] = field(default_factory=set)
    after: bool = False
    # Runs between the committed statement and the exception (with `after`).
    meanwhile: Callable[[], object] = lambda: None
    calls: list[list[int]] = field(default_factory=list)

    def install(
        self, monkeypatch: pytest.MonkeyPatch, name: str, id_of: Callable[[Any], int]
    ) -> Fault:
        real = getattr(Dispatcher, name)

        async def failing(dispatcher: Dispatcher, batch: Sequence[Any]) -> Any:
            ids = [id_of(item) for item in batch]
            self.calls.append(ids)
            fails = (len(ids) > 1 and self.batches > 0) or (len(ids) == 1 and ids[0] in self.alone)
            if fails:
                if len(ids) > 1:
                    self.batches -= 1
                else:
                    self.alone.discard(ids[0])
            if fails and not self.after:
                raise self.error()
            answer = await real(dispatcher, batch)
            if fails:
                self.meanwhile()
                raise self.error()
            return answer

        monkeypatch.setattr(Dispatcher, name, failing)
        return self

    def reservations(self, monkeypatch: pytest.MonkeyPatch) -> Fault:
        """On `Dispatcher._reserve` (reserve_sms_slots)."""
        return self.install(monkeypatch, "_reserve", lambda ready: int(ready[0]["id"]))

    def outcome_writes(self, monkeypatch: pytest.MonkeyPatch) -> Fault:
        """On `Dispatcher._write_outcomes`."""

        def outcome_id(outcome: _Outcome) -> int:
            return outcome.id

        return self.install(monkeypatch, "_write_outcomes", outcome_id)


class OutcomeRoundAnswerLost:
    """The dispatcher's pool, losing the answer of the first statement that records at least
    `size` outcomes: the statement runs and commits, then the call fails as if the connection
    had dropped before the answer came back. Counts the outcomes of every recording statement."""

    def __init__(self, pool: asyncpg.Pool, size: int = 2) -> None:
        self._pool = pool
        self._size = size
        self.lost = False
        self.writes: list[int] = []

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        recording = query.startswith("WITH given")
        if recording:
            self.writes.append(len(args[0]))
        answer = list(await self._pool.fetch(query, *args))
        if recording and len(args[0]) >= self._size and not self.lost:
            self.lost = True
            raise connection_lost()
        return answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def outcomes_counted(kind: str, outcome: str) -> float:
    """sms_messages_total for (kind, outcome): what the dispatcher reported as recorded."""
    labels = {"kind": kind, "outcome": outcome}
    return REGISTRY.get_sample_value("sms_messages_total", labels) or 0.0


def acs_requests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, datetime]]:
    """Every send request made to ACS: its repeatabilityRequestId and repeatabilityFirstSent."""
    requests: list[tuple[str, datetime]] = []
    real = AcsSmsClient.send

    async def send(client: AcsSmsClient, **kwargs: Any) -> SendResult:
        requests.append(
            (str(kwargs["repeatability_request_id"]), kwargs["repeatability_first_sent"])
        )
        return await real(client, **kwargs)

    monkeypatch.setattr(AcsSmsClient, "send", send)
    return requests


def recorder_held_until(monkeypatch: pytest.MonkeyPatch, outcomes: int) -> None:
    """Outcomes are recorded only once `outcomes` of them wait, so they make one round."""
    finishing = 0
    all_waiting = asyncio.Event()
    real_finish, real_record = Dispatcher._finish, Dispatcher._record_outcomes

    async def finish(dispatcher: Dispatcher, row: asyncpg.Record, decided: Finish) -> str:
        nonlocal finishing
        finishing += 1
        if finishing == outcomes:
            # Set before the outcome is queued, but the recorder wakes only after it is.
            all_waiting.set()
        return await real_finish(dispatcher, row, decided)

    async def record(dispatcher: Dispatcher) -> None:
        # Not forever: outcomes never recorded would hold the dispatcher's shutdown.
        with suppress(TimeoutError):
            async with asyncio.timeout(20):
                await all_waiting.wait()
        await real_record(dispatcher)

    monkeypatch.setattr(Dispatcher, "_finish", finish)
    monkeypatch.setattr(Dispatcher, "_record_outcomes", record)


@asynccontextmanager
async def dispatching(kit: Kit) -> AsyncIterator[None]:
    """The kit's dispatcher loop, running for the block (the kit is built with it off, so the
    bookings made first are claimed together)."""
    running = asyncio.create_task(kit.dispatcher.run())
    try:
        yield
    finally:
        await kit.dispatcher.stop()
        await running


async def until_handled(kit: Kit, count: int) -> None:
    await kit.until(lambda: len(kit.handled) >= count, f"{count} messages handled")


async def confirmations(kit: Kit) -> dict[str, asyncpg.Record]:
    rows = await kit.query(
        "SELECT id, appointment_key, status, outcome, claims, attempts, due_at, reason,"
        " sender, provider_message_id, repeatability_request_id, repeatability_first_sent"
        " FROM sms_messages WHERE kind = 'confirmation'"
    )
    return {row["appointment_key"]: row for row in rows}


async def message_id(kit: Kit, key: str) -> int:
    [row] = await kit.query(
        "SELECT id FROM sms_messages WHERE appointment_key = $1 AND kind = 'confirmation'", key
    )
    return int(row["id"])


async def sender_sends(kit: Kit) -> list[tuple[str, datetime]]:
    rows = await kit.query("SELECT sender, sent_at FROM sender_sends ORDER BY sent_at, sender")
    return [(row["sender"], row["sent_at"]) for row in rows]


async def assert_sent_once_each(kit: Kit, keys: set[str]) -> None:
    """Each of `keys` went out as exactly one SMS, under its own repeatabilityRequestId, and
    is recorded sent once: its provider message id, one sms-sent event, nothing left claimed."""
    rows = await confirmations(kit)
    sent = {key: row for key, row in rows.items() if row["status"] == "sent"}
    assert set(sent) == keys
    outbound = [m for m in kit.outbound() if kind_of(m) == "confirmation"]
    assert sorted(m.repeatability_request_id or "" for m in outbound) == sorted(
        str(row["repeatability_request_id"]) for row in sent.values()
    )
    by_request = {m.repeatability_request_id: m for m in outbound}
    for row in sent.values():
        sms = by_request[str(row["repeatability_request_id"])]
        assert (row["outcome"], row["provider_message_id"]) == ("sent", sms.message_id)
        assert row["sender"] == sms.sender
    events = await kit.query(
        "SELECT key, count(*) AS n FROM outbox WHERE topic = $1 GROUP BY key", Topic.SMS_SENT.value
    )
    assert {row["key"]: row["n"] for row in events} == dict.fromkeys(rows, 1)
    claimed = await kit.query(
        "SELECT appointment_key FROM sms_messages WHERE status = 'pending' AND claims > 0"
    )
    assert claimed == []


async def opt_out(kit: Kit, phone: str) -> None:
    secret = kit.settings.recipient_hash_secret.get_secret_value()
    await kit.pool.execute(
        "INSERT INTO opt_outs (sender, recipient_hash, opted_out, changed_at)"
        " VALUES ($1, $2, true, $3)",
        SENDER,
        recipient_hash(secret, phone),
        kit.clock.now(),
    )


# -- the reservation -------------------------------------------------------------------------------
async def test_a_failed_batch_reservation_reserves_each_message_alone_within_limits_and_opt_outs(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deadlocked claim reservation is redone one message at a time, limits and opt-outs held."""
    kit = await make_kit(scheduler_enabled=False, sms_rate_per_minute=2)
    await kit.configure()
    await kit.configure(integration=OTHER_INTEGRATION, sender=OTHER_SENDER)
    await opt_out(kit, OPTED_OUT)
    limited = {f"apt_fallback_limit_{n}" for n in range(3)}
    for key in sorted(limited):
        await kit.book(key)
    await kit.book("apt_fallback_opted_out", phone=OPTED_OUT)
    await kit.book("apt_fallback_other", integration=OTHER_INTEGRATION)
    fault = Fault().reservations(monkeypatch)
    t0 = kit.clock.now()

    async with dispatching(kit):
        await until_handled(kit, 5)
        assert sorted(kit.results("confirmation")) == ["opted_out", "retry", "sent", "sent", "sent"]
        [claim, *alone] = fault.calls
        assert len(claim) == 5
        assert sorted(alone) == sorted([one] for one in claim)
        rows = await confirmations(kit)
        [deferred] = [row for row in rows.values() if row["status"] == "pending"]
        assert deferred["appointment_key"] in limited
        assert (deferred["attempts"], deferred["reason"]) == (0, RATE_LIMITED)
        assert deferred["due_at"] == t0 + timedelta(minutes=1)
        refused = rows["apt_fallback_opted_out"]
        assert (refused["status"], refused["outcome"]) == ("refused", "opted_out")
        assert sorted(await sender_sends(kit)) == [(SENDER, t0), (SENDER, t0), (OTHER_SENDER, t0)]

        await kit.advance(timedelta(minutes=1))
        await until_handled(kit, 6)
    assert kit.results("confirmation").count("sent") == 4
    assert fault.calls[-1] == [deferred["id"]]
    await assert_sent_once_each(kit, limited | {"apt_fallback_other"})
    rows = await confirmations(kit)
    assert {row["attempts"] for row in rows.values() if row["status"] == "sent"} == {1}
    assert len(await sender_sends(kit)) == len(kit.outbound()) == 4


async def test_a_message_whose_own_reservation_fails_is_left_to_its_lease_and_sent_once_later(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message whose own reservation fails too waits out its lease alone, then goes out once."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    keys = {f"apt_fallback_lease_{n}" for n in range(3)}
    for key in sorted(keys):
        await kit.book(key)
    unlucky = await message_id(kit, "apt_fallback_lease_1")
    fault = Fault(alone={unlucky}).reservations(monkeypatch)
    t0 = kit.clock.now()

    async with dispatching(kit):
        await until_handled(kit, 3)
        assert sorted(kit.results("confirmation")) == ["error", "sent", "sent"]
        # No attempt, no slot, no repeatabilityFirstSent: only the claim's lease.
        left = (await confirmations(kit))["apt_fallback_lease_1"]
        assert (left["status"], left["claims"], left["attempts"]) == ("pending", 1, 0)
        assert left["due_at"] == t0 + timedelta(seconds=kit.settings.scheduler_lease_s)
        assert left["repeatability_first_sent"] is None
        assert len(await sender_sends(kit)) == len(kit.outbound()) == 2

        await kit.advance(timedelta(seconds=kit.settings.scheduler_lease_s + 1))
        await until_handled(kit, 4)
    assert kit.results("confirmation").count("sent") == 3
    assert fault.calls[-1] == [unlucky]
    await assert_sent_once_each(kit, keys)
    row = (await confirmations(kit))["apt_fallback_lease_1"]
    assert (row["claims"], row["attempts"]) == (2, 1)
    assert len(await sender_sends(kit)) == len(kit.outbound()) == 3


async def test_a_reservation_committed_but_unanswered_is_reserved_again_and_sent_once(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reservation committed but unanswered is redone: one extra attempt and slot, one SMS.

    What happens: reserve_sms_slots committed attempts = 1, the sender, the
    repeatabilityFirstSent (t0) and one sender_sends row per message. The fallback's
    reservation finds each message still pending under the same claim, so it reserves again:
    attempts = 2, a second sender_sends row (at t1), repeatabilityFirstSent kept at t0 by its
    coalesce. So, as expected, one extra attempt and rate-limit row per message and never a
    second SMS, but not thanks to the repeatability id: no request reaches ACS before a
    reservation is answered, so there is exactly one request per message and nothing for ACS
    to deduplicate. The id and the kept repeatabilityFirstSent matter when a request did go
    out and its outcome was lost (the last test). The cost of the phantom slots shows at the
    limit (the next test)."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    await kit.configure(integration=OTHER_INTEGRATION, sender=OTHER_SENDER)
    keys = {f"apt_lost_answer_{n}" for n in range(3)}
    for key in sorted(keys):
        await kit.book(key)
    await kit.book("apt_lost_answer_other", integration=OTHER_INTEGRATION)
    keys.add("apt_lost_answer_other")
    t0 = kit.clock.now()
    t1 = t0 + timedelta(seconds=5)
    fault = Fault(
        error=connection_lost, after=True, meanwhile=lambda: kit.clock.advance(5)
    ).reservations(monkeypatch)
    requests = acs_requests(monkeypatch)

    async with dispatching(kit):
        await until_handled(kit, 4)
    assert kit.results("confirmation") == ["sent"] * 4
    [claim, *alone] = fault.calls
    assert sorted(alone) == sorted([one] for one in claim)
    await assert_sent_once_each(kit, keys)
    rows = await confirmations(kit)
    assert {(row["claims"], row["attempts"]) for row in rows.values()} == {(1, 2)}
    assert {row["repeatability_first_sent"] for row in rows.values()} == {t0}
    assert sorted(requests) == sorted(
        (str(row["repeatability_request_id"]), t0) for row in rows.values()
    )
    assert len(kit.outbound()) == 4
    assert sorted(await sender_sends(kit)) == sorted(
        [(SENDER, t) for t in (t0, t1) for _ in range(3)] + [(OTHER_SENDER, t0), (OTHER_SENDER, t1)]
    )


async def test_an_unanswered_reservation_at_the_limit_puts_the_claim_off_a_window_then_sends_once(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the limit, an unanswered reservation's own slots put the claim off a window; one SMS."""
    kit = await make_kit(scheduler_enabled=False, sms_rate_per_minute=2)
    await kit.configure()
    keys = {f"apt_lost_at_limit_{n}" for n in range(2)}
    for key in sorted(keys):
        await kit.book(key)
    t0 = kit.clock.now()
    fault = Fault(error=connection_lost, after=True).reservations(monkeypatch)
    requests = acs_requests(monkeypatch)

    async with dispatching(kit):
        await until_handled(kit, 2)
        assert kit.results("confirmation") == ["retry", "retry"]
        assert kit.outbound() == []
        rows = await confirmations(kit)
        assert {
            (row["status"], row["attempts"], row["reason"], row["due_at"]) for row in rows.values()
        } == {("pending", 1, RATE_LIMITED, t0 + timedelta(minutes=1))}
        assert await sender_sends(kit) == [(SENDER, t0)] * 2

        await kit.advance(timedelta(minutes=1))
        await until_handled(kit, 4)
    assert kit.results("confirmation") == ["retry", "retry", "sent", "sent"]
    assert len(fault.calls) == 4
    await assert_sent_once_each(kit, keys)
    rows = await confirmations(kit)
    assert {(row["claims"], row["attempts"]) for row in rows.values()} == {(2, 2)}
    assert sorted(requests) == sorted(
        (str(row["repeatability_request_id"]), t0) for row in rows.values()
    )
    t1 = t0 + timedelta(minutes=1)
    assert await sender_sends(kit) == [(SENDER, t0)] * 2 + [(SENDER, t1)] * 2


# -- the outcomes ----------------------------------------------------------------------------------
async def test_a_failed_outcome_round_records_each_outcome_once_one_at_a_time(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deadlocked round of outcomes is written one at a time: each outcome and event once."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    await kit.configure(integration=OTHER_INTEGRATION, sender=OTHER_SENDER, sms_enabled=False)
    await opt_out(kit, OPTED_OUT)
    sent = {f"apt_outcomes_{n}" for n in range(3)}
    for key in sorted(sent):
        await kit.book(key)
    await kit.book("apt_outcomes_opted_out", phone=OPTED_OUT)
    await kit.book("apt_outcomes_no_consent", integration=OTHER_INTEGRATION)
    recorder_held_until(monkeypatch, 5)
    fault = Fault().outcome_writes(monkeypatch)

    async with dispatching(kit):
        await until_handled(kit, 5)
    assert sorted(kit.results("confirmation")) == [
        "no_consent",
        "opted_out",
        "sent",
        "sent",
        "sent",
    ]
    [round_, *alone] = fault.calls
    assert len(round_) == 5
    assert sorted(alone) == [[one] for one in sorted(round_)]
    await assert_sent_once_each(kit, sent)
    states = await kit.query(
        "SELECT a.appointment_key, m.status, m.outcome, a.confirmation"
        " FROM sms_messages m JOIN appointments a USING (appointment_key)"
        " WHERE m.kind = 'confirmation' AND m.status <> 'sent'"
    )
    assert {tuple(row) for row in states} == {
        ("apt_outcomes_opted_out", "refused", "opted_out", "failed"),
        ("apt_outcomes_no_consent", "refused", "no_consent", "skipped"),
    }
    confirmed = await kit.query(
        "SELECT confirmation FROM appointments WHERE appointment_key = ANY($1::text[])",
        sorted(sent),
    )
    assert {row["confirmation"] for row in confirmed} == {"sent"}
    assert len(await sender_sends(kit)) == len(kit.outbound()) == 3


async def test_an_outcome_that_fails_alone_is_told_to_its_waiter_and_resent_once_after_its_lease(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outcome failing alone is told to its waiter; after its lease ACS repeats, not resends."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    keys = {f"apt_outcome_alone_{n}" for n in range(3)}
    for key in sorted(keys):
        await kit.book(key)
    unlucky = await message_id(kit, "apt_outcome_alone_1")
    recorder_held_until(monkeypatch, 3)
    fault = Fault(alone={unlucky}).outcome_writes(monkeypatch)
    requests = acs_requests(monkeypatch)
    t0 = kit.clock.now()

    async with dispatching(kit):
        await until_handled(kit, 3)
        assert sorted(kit.results("confirmation")) == ["error", "sent", "sent"]
        assert len(fault.calls[0]) == 3
        # Its SMS went out, its outcome is not recorded: the lease brings it back.
        left = (await confirmations(kit))["apt_outcome_alone_1"]
        assert (left["status"], left["claims"], left["attempts"]) == ("pending", 1, 1)
        assert left["due_at"] == t0 + timedelta(seconds=kit.settings.scheduler_lease_s)
        assert left["provider_message_id"] is None
        assert len(kit.outbound()) == 3

        await kit.advance(timedelta(seconds=kit.settings.scheduler_lease_s + 1))
        await until_handled(kit, 4)
    assert kit.results("confirmation").count("sent") == 3
    assert fault.calls[-1] == [unlucky]
    await assert_sent_once_each(kit, keys)
    row = (await confirmations(kit))["apt_outcome_alone_1"]
    assert (row["claims"], row["attempts"]) == (2, 2)
    # Two requests for it (the second answered with the original message), one SMS.
    rid = str(row["repeatability_request_id"])
    assert [request for request in requests if request[0] == rid] == [(rid, t0), (rid, t0)]
    assert len(requests) == 4
    assert len(kit.outbound()) == 3
    # One slot counted per request: the repeat used a slot although ACS sent nothing.
    assert len(await sender_sends(kit)) == len(requests)


async def test_a_round_of_sends_committed_but_unanswered_is_reported_sent_once_not_as_errors(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sends whose outcome round committed unanswered, written again alone, are reported sent."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    keys = {f"apt_round_unanswered_{n}" for n in range(2)}
    for key in sorted(keys):
        await kit.book(key)
    recorder_held_until(monkeypatch, 2)
    pool = OutcomeRoundAnswerLost(kit.pool)
    monkeypatch.setattr(kit.dispatcher, "_pool", pool)
    counted = outcomes_counted("confirmation", "sent")

    with structlog.testing.capture_logs(processors=[structlog.processors.format_exc_info]) as logs:
        async with dispatching(kit):
            await until_handled(kit, 2)
    # The round (committed, answer lost), then each outcome alone.
    assert pool.writes == [2, 1, 1]
    assert kit.results("confirmation") == ["sent", "sent"]
    assert outcomes_counted("confirmation", "sent") - counted == 2
    await assert_sent_once_each(kit, keys)
    assert len(kit.outbound()) == 2
    assert "UniqueViolation" not in repr(logs)
    assert [entry["event"] for entry in logs if entry["log_level"] != "info"] == [
        "recording outcomes failed; recording one at a time"
    ]


async def test_a_lone_send_committed_but_unanswered_is_reported_sent_not_as_an_error(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone outcome whose write committed unanswered is written again and reported sent."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    await kit.book("apt_lone_unanswered")
    pool = OutcomeRoundAnswerLost(kit.pool, size=1)
    monkeypatch.setattr(kit.dispatcher, "_pool", pool)
    counted = outcomes_counted("confirmation", "sent")

    with structlog.testing.capture_logs(processors=[structlog.processors.format_exc_info]) as logs:
        async with dispatching(kit):
            await until_handled(kit, 1)
    assert pool.writes == [1, 1]
    assert kit.results("confirmation") == ["sent"]
    assert outcomes_counted("confirmation", "sent") - counted == 1
    await assert_sent_once_each(kit, {"apt_lone_unanswered"})
    assert [entry["event"] for entry in logs if entry["log_level"] != "info"] == [
        "recording outcomes failed; recording one at a time"
    ]


async def test_a_round_of_refusals_committed_but_unanswered_is_reported_refused_not_lost(
    make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refusals whose outcome round committed unanswered, written again alone, are reported."""
    kit = await make_kit(scheduler_enabled=False)
    await kit.configure()
    await kit.configure(integration=OTHER_INTEGRATION, sender=OTHER_SENDER, sms_enabled=False)
    await opt_out(kit, OPTED_OUT)
    await kit.book("apt_round_unanswered_opted_out", phone=OPTED_OUT)
    await kit.book("apt_round_unanswered_no_consent", integration=OTHER_INTEGRATION)
    recorder_held_until(monkeypatch, 2)
    pool = OutcomeRoundAnswerLost(kit.pool)
    monkeypatch.setattr(kit.dispatcher, "_pool", pool)
    counted = {
        outcome: outcomes_counted("confirmation", outcome)
        for outcome in ("opted_out", "no_consent")
    }

    with structlog.testing.capture_logs(processors=[structlog.processors.format_exc_info]) as logs:
        async with dispatching(kit):
            await until_handled(kit, 2)
    assert pool.writes == [2, 1, 1]
    assert sorted(kit.results("confirmation")) == ["no_consent", "opted_out"]
    for outcome, before in counted.items():
        assert outcomes_counted("confirmation", outcome) - before == 1
    assert kit.outbound() == []
    states = await kit.query(
        "SELECT a.appointment_key, m.status, m.outcome, a.confirmation"
        " FROM sms_messages m JOIN appointments a USING (appointment_key)"
        " WHERE m.kind = 'confirmation'"
    )
    assert {tuple(row) for row in states} == {
        ("apt_round_unanswered_opted_out", "refused", "opted_out", "failed"),
        ("apt_round_unanswered_no_consent", "refused", "no_consent", "skipped"),
    }
    events = await kit.query(
        "SELECT key, count(*) AS n FROM outbox WHERE topic = $1 GROUP BY key", Topic.SMS_SENT.value
    )
    assert {row["key"]: row["n"] for row in events} == {
        "apt_round_unanswered_opted_out": 1,
        "apt_round_unanswered_no_consent": 1,
    }
    assert "UniqueViolation" not in repr(logs)
    assert [entry["event"] for entry in logs if entry["log_level"] != "info"] == [
        "recording outcomes failed; recording one at a time"
    ]
