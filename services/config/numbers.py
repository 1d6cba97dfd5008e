"""The organisation's sending numbers and the durable jobs that buy them.

"Create new phone number" inserts a job row; a worker drives it through ACS (search, poll,
purchase, poll), one step per transaction, the row locked with `FOR UPDATE SKIP LOCKED` so
replicas never run the same step at once. All state is in the row, so a restarted service
carries on where the last one stopped. A step cut short by a crash is repeated: a repeated
search is harmless, and a repeated purchase answers 409, after which we confirm the number
is ours instead of buying twice.

A step whose result the database refuses (a CHECK, a unique key, a value Postgres cannot
store) fails its job with the reason: repeating the step would only be refused again. Errors
of an unavailable database are retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
from pydantic import BaseModel, ConfigDict, Field

from libs.common.portal_auth import Principal
from services.config import audit, propagation
from services.config.acs_numbers import AcsError, AcsPhoneNumbers, SearchAlreadyPurchased
from services.config.context import ConfigContext, Refused, not_found
from services.config.settings import ConfigSettings

if TYPE_CHECKING:
    from libs.common.db import Connection

log = structlog.get_logger(__name__)

# The phone_numbers.e164 CHECK, to be matched with fullmatch: ASCII digits only (`\d` is any
# Unicode digit) and no trailing newline (`$` matches before one).
E164 = re.compile(r"\+[1-9][0-9]{6,14}")
# What the database refuses for the data, not for being unavailable: the same write would be
# refused again (CheckViolation, UniqueViolation, CharacterNotInRepertoire, NumericValueOutOfRange,
# StringDataRightTruncation, ...).
REFUSED_WRITE = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError)
PROGRESS = {"search": 10, "search_poll": 30, "purchase": 60, "purchase_poll": 80, "confirm": 90}
STEP_TEXT = {
    "search": "Asking Azure Communication Services for a toll-free number",
    "search_poll": "Searching for an available toll-free number",
    "purchase": "Number found; buying it",
    "purchase_poll": "Waiting for the purchase to complete",
    "confirm": "Confirming the purchase",
}


class LinksInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    integration_ids: list[uuid.UUID] = Field(max_length=500)


def view(row: asyncpg.Record, linked: list[str]) -> dict[str, Any]:
    created: datetime = row["created_at"]
    status = row["status"]
    if status == "active":
        progress, text = 100, "Ready"
    elif status == "failed":
        progress, text = 100, "Failed"
    else:
        progress, text = PROGRESS.get(row["step"], 0), STEP_TEXT.get(row["step"], "")
    return {
        "id": str(row["id"]),
        "phone_number": row["e164"],
        "status": status,
        "step": row["step"],
        "progress_percent": progress,
        "progress_text": text,
        "error": row["error"],
        "linked_integration_ids": linked,
        "created_at": created.isoformat(),
    }


async def _linked(conn: Connection, number_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[str]]:
    rows = await conn.fetch(
        "SELECT phone_number_id, id FROM integrations WHERE phone_number_id = any($1::uuid[])"
        " ORDER BY created_at",
        number_ids,
    )
    links: dict[uuid.UUID, list[str]] = {n: [] for n in number_ids}
    for row in rows:
        links[row["phone_number_id"]].append(str(row["id"]))
    return links


async def list_for_tenant(ctx: ConfigContext, tenant_id: str) -> list[dict[str, Any]]:
    async with ctx.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT * FROM phone_numbers WHERE tenant_id = $1 ORDER BY created_at", tenant_id
        )
        links = await _linked(conn, [r["id"] for r in rows])
    return [view(row, links[row["id"]]) for row in rows]


def parse_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise not_found("phone number") from None


async def get(ctx: ConfigContext, tenant_id: str, number_id: uuid.UUID) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT * FROM phone_numbers WHERE id = $1 AND tenant_id = $2", number_id, tenant_id
        )
        if row is None:
            raise not_found("phone number")
        links = await _linked(conn, [number_id])
    return view(row, links[number_id])


async def start(ctx: ConfigContext, principal: Principal) -> dict[str, Any]:
    number_id = uuid.uuid4()
    async with ctx.pool.acquire() as conn, conn.transaction():
        await propagation.lock_tenant(conn, principal.tenant_id)
        running = await conn.fetchval(
            "SELECT count(*) FROM phone_numbers WHERE tenant_id = $1 AND step <> 'done'",
            principal.tenant_id,
        )
        if running:
            raise Refused(409, "A phone number is already being created; wait for it to finish.")
        await conn.execute(
            "INSERT INTO phone_numbers (id, tenant_id, status, step, created_by_oid)"
            " VALUES ($1, $2, 'searching', 'search', $3)",
            number_id,
            principal.tenant_id,
            principal.user_oid,
        )
        await audit.record(
            conn, principal, "phone_number.requested", "phone_number", str(number_id),
            None, {"status": "searching"},
        )  # fmt: skip
    ctx.jobs_wake.set()
    return await get(ctx, principal.tenant_id, number_id)


async def retry(ctx: ConfigContext, principal: Principal, number_id: uuid.UUID) -> dict[str, Any]:
    async with ctx.pool.acquire() as conn, conn.transaction():
        await propagation.lock_tenant(conn, principal.tenant_id)
        row = await conn.fetchrow(
            "SELECT * FROM phone_numbers WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
            number_id,
            principal.tenant_id,
        )
        if row is None:
            raise not_found("phone number")
        if row["status"] != "failed":
            raise Refused(409, "Only a failed phone-number job can be retried.")
        # A fresh search: the failed one may have expired or been released by ACS.
        await conn.execute(
            "UPDATE phone_numbers SET status = 'searching', step = 'search', error = NULL,"
            " attempts = 0, search_operation_url = NULL, search_id = NULL,"
            " candidate_e164 = NULL, purchase_operation_url = NULL, next_attempt_at = now(),"
            " updated_at = now() WHERE id = $1",
            number_id,
        )
        await audit.record(
            conn, principal, "phone_number.retried", "phone_number", str(number_id),
            {"status": "failed", "error": row["error"]}, {"status": "searching"},
        )  # fmt: skip
    ctx.jobs_wake.set()
    return await get(ctx, principal.tenant_id, number_id)


async def set_links(
    ctx: ConfigContext, principal: Principal, number_id: uuid.UUID, data: LinksInput
) -> dict[str, Any]:
    wanted = set(data.integration_ids)
    async with ctx.pool.acquire() as conn, conn.transaction():
        tenant = await propagation.lock_tenant(conn, principal.tenant_id)
        number = await conn.fetchrow(
            "SELECT * FROM phone_numbers WHERE id = $1 AND tenant_id = $2",
            number_id,
            principal.tenant_id,
        )
        if number is None:
            raise not_found("phone number")
        if number["status"] != "active":
            raise Refused(409, "The number is not ready yet; link it once it has been bought.")
        rows = await conn.fetch(
            "SELECT id, phone_number_id FROM integrations WHERE tenant_id = $1 FOR UPDATE",
            principal.tenant_id,
        )
        known = {row["id"]: row["phone_number_id"] for row in rows}
        unknown = wanted - known.keys()
        if unknown:
            raise Refused(422, "Some of those FHIR base URLs do not exist.", "integration_ids")
        before = sorted(str(i) for i, n in known.items() if n == number_id)
        changed = [i for i, current in known.items() if (i in wanted) != (current == number_id)]
        for integration_id in changed:
            await conn.execute(
                "UPDATE integrations SET phone_number_id = $2, updated_at = now() WHERE id = $1",
                integration_id,
                number_id if integration_id in wanted else None,
            )
            await propagation.publish_integration(conn, tenant, integration_id)
        if changed:
            await audit.record(
                conn, principal, "phone_number.links_updated", "phone_number", str(number_id),
                {"phone_number": number["e164"], "linked_integration_ids": before},
                {"phone_number": number["e164"],
                 "linked_integration_ids": sorted(str(i) for i in wanted)},
            )  # fmt: skip
    return await get(ctx, principal.tenant_id, number_id)


@dataclass
class StepOutcome:
    """The row's next state after one step; None fields are left as they are."""

    step: str
    status: str | None = None
    delay_s: float = 0.0
    error: str | None = None
    fields: dict[str, str] | None = None


class PhoneNumberJobs:
    """The worker. One step per claimed row per transaction."""

    def __init__(self, ctx: ConfigContext, acs: AcsPhoneNumbers) -> None:
        self._ctx = ctx
        self._acs = acs
        self._stopping = asyncio.Event()

    @property
    def _settings(self) -> ConfigSettings:
        return self._ctx.settings

    def _wait(self, retry_after: float | None) -> float:
        base = self._settings.phone_job_poll_interval_s
        return min(retry_after if retry_after is not None else base,
                   self._settings.phone_job_max_retry_after_s)  # fmt: skip

    async def _step(self, row: asyncpg.Record) -> StepOutcome:
        step = row["step"]
        if step == "search":
            started = await self._acs.start_search(self._settings.acs_number_country)
            return StepOutcome(
                "search_poll",
                delay_s=self._wait(None),
                fields={
                    "search_operation_url": started.operation_url,
                    "search_id": started.search_id,
                },
            )
        if step == "search_poll":
            op = await self._acs.operation(row["search_operation_url"])
            if op.status == "failed":
                return StepOutcome("done", "failed", error=f"The number search failed. {op.error}")
            if op.status != "succeeded":
                return StepOutcome(step, delay_s=self._wait(op.retry_after_s))
            found = await self._acs.search_result(row["search_id"])
            if not found:
                return StepOutcome(
                    "done", "failed", error="No toll-free number is available right now."
                )
            # A purchase buys every number of the search: none is bought unless all are valid.
            invalid = [n for n in found if not E164.fullmatch(n)]
            if invalid:
                return StepOutcome(
                    "done", "failed",
                    error="ACS offered a number that is not a valid E.164 phone number"
                    f" ({invalid[0][:32]!a}); it was not bought.",
                )  # fmt: skip
            return StepOutcome("purchase", "purchasing", fields={"candidate_e164": found[0]})
        if step == "purchase":
            try:
                location = await self._acs.start_purchase(row["search_id"])
            except SearchAlreadyPurchased:
                return StepOutcome("confirm")
            return StepOutcome(
                "purchase_poll",
                delay_s=self._wait(None),
                fields={"purchase_operation_url": location},
            )
        if step == "purchase_poll":
            op = await self._acs.operation(row["purchase_operation_url"])
            if op.status == "failed":
                return StepOutcome("done", "failed", error=f"The purchase failed. {op.error}")
            if op.status != "succeeded":
                return StepOutcome(step, delay_s=self._wait(op.retry_after_s))
            return StepOutcome("done", "active")
        if step == "confirm":
            if await self._acs.owns(row["candidate_e164"]):
                return StepOutcome("done", "active")
            raise AcsError("The purchase is not visible yet.", transient=True)
        raise AssertionError(f"unknown step {step}")

    async def run_once(self) -> bool:
        """Runs one due step, if any; True when it did."""
        async with self._ctx.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM phone_numbers WHERE step <> 'done' AND next_attempt_at <= now()"
                " ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED"
            )
            if row is None:
                return False
            try:
                # A savepoint: a write the database refuses is undone, the row stays locked.
                async with conn.transaction():
                    outcome = await self._advance(conn, row)
            except REFUSED_WRITE as exc:
                log.warning(
                    "phone number step refused by the database; the job fails",
                    step=row["step"], error=type(exc).__name__,
                    constraint=exc.constraint_name, column=exc.column_name,
                )  # fmt: skip
                outcome = StepOutcome("done", "failed", error=_refused_text(row["step"], exc))
                await self._record(conn, row, outcome)
            if outcome is not None and outcome.status in ("active", "failed"):
                log.info(
                    "phone number job finished", status=outcome.status, tenant_id=row["tenant_id"]
                )
        return True

    async def _advance(self, conn: Connection, row: asyncpg.Record) -> StepOutcome | None:
        """Runs the row's step and records its outcome; None when it is to be retried."""
        try:
            outcome = await self._step(row)
        except AcsError as exc:
            attempts = row["attempts"] + 1
            if exc.transient and attempts < self._settings.phone_job_max_attempts:
                log.warning("phone number step will retry", step=row["step"], error=exc.message)
                await conn.execute(
                    "UPDATE phone_numbers SET attempts = $2, updated_at = now(),"
                    " next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1",
                    row["id"],
                    attempts,
                    min(0.5 * 2**attempts, 30.0),
                )
                return None
            outcome = StepOutcome("done", "failed", error=exc.message)
        await self._record(conn, row, outcome)
        return outcome

    @staticmethod
    async def _record(conn: Connection, row: asyncpg.Record, outcome: StepOutcome) -> None:
        fields = outcome.fields or {}
        await conn.execute(
            "UPDATE phone_numbers SET step = $2, status = coalesce($3, status),"
            " error = $4, attempts = 0,"
            " search_operation_url = coalesce($5, search_operation_url),"
            " search_id = coalesce($6, search_id),"
            " candidate_e164 = coalesce($7, candidate_e164),"
            " purchase_operation_url = coalesce($8, purchase_operation_url),"
            " e164 = CASE WHEN $3 = 'active' THEN coalesce($7, candidate_e164) ELSE e164 END,"
            " next_attempt_at = now() + make_interval(secs => $9), updated_at = now()"
            " WHERE id = $1",
            row["id"],
            outcome.step,
            outcome.status,
            outcome.error,
            fields.get("search_operation_url"),
            fields.get("search_id"),
            fields.get("candidate_e164"),
            fields.get("purchase_operation_url"),
            outcome.delay_s,
        )

    async def run(self) -> None:
        while not self._stopping.is_set():
            self._ctx.jobs_wake.clear()
            try:
                if await self.run_once():
                    continue
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Refused writes fail their job in run_once: what reaches here is an outage
                # (connection refused or lost, server starting or shutting down, ...).
                # InterfaceError: the connection closed under a step; uncaught, it ended
                # the worker until the service restarted.
                log.warning("phone number worker: database unavailable", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.phone_job_poll_interval_s):
                    await self._ctx.jobs_wake.wait()

    def stop(self) -> None:
        self._stopping.set()
        self._ctx.jobs_wake.set()


def _refused_text(step: str, exc: asyncpg.PostgresError) -> str:
    """The job's error when the database refused its step's result: the check, key or column
    named, not the refused values (they came from ACS and may be anything)."""
    what = exc.constraint_name or exc.column_name
    text = (
        f"The result of the step {step!r} could not be recorded: the database refused it"
        f" ({type(exc).__name__}{f' on {what}' if what else ''})."
    )
    if step in ("purchase", "purchase_poll", "confirm"):
        text += " ACS may have bought the number: check Azure Communication Services first."
    return text
