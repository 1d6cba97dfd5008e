"""Phone-number jobs given what cannot be stored: a number ACS offers that is not E.164 as the
phone_numbers table means it (ASCII digits, no trailing newline), or any step result the
database refuses, fails the job with its reason; an unavailable database is waited out."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import asyncpg
import pytest
import structlog
from pydantic import ValidationError

from libs.common.events import IntegrationConfigV1
from services.config.acs_numbers import AcsPhoneNumbers, StartedSearch
from services.config.numbers import PhoneNumberJobs, StepOutcome
from tests.config.conftest import CONTOSO_ADMIN, ConfigPortal
from tests.conftest import wait_for

REFUSED_LOG = "phone number step refused by the database; the job fails"
UNAVAILABLE_LOG = "phone number worker: database unavailable"

ODD_NUMBERS: dict[str, Callable[[str], str]] = {
    "trailing newline": lambda n: n + "\n",
    "Arabic-Indic digit": lambda n: n[:-1] + "\u0663",
    "fullwidth digit": lambda n: n[:-1] + "\uff10",
    "NUL": lambda n: n + "\x00",
}


class Worker:
    """Wakes the test after each round of the config service's phone-number worker."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ran = asyncio.Event()
        original = PhoneNumberJobs.run_once

        async def run_once(jobs: PhoneNumberJobs) -> bool:
            try:
                return await original(jobs)
            finally:
                self.ran.set()

        monkeypatch.setattr(PhoneNumberJobs, "run_once", run_once)

    async def until(
        self, p: ConfigPortal, number_id: str, status: str, within_s: float = 10.0
    ) -> dict[str, Any]:
        """The job once it has `status`, checked after every round of the worker."""
        seen: dict[str, Any] = {}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while True:
                    self.ran.clear()
                    code, seen = await p.call(
                        CONTOSO_ADMIN, "GET", f"/api/phone-numbers/{number_id}"
                    )
                    assert code == 200, seen
                    if seen["status"] == status:
                        return seen
                    await wait_for(self.ran, "a round of the phone-number worker")
        pytest.fail(f"the job is not {status!r} after {within_s}s: {seen}")


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> Worker:
    return Worker(monkeypatch)


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def _events(logs: list[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


class _OddSearches(dict[str, dict[str, Any]]):
    """The ACS stand-in's search results, each number passed through `odd` when stored."""

    def __init__(self, odd: Callable[[str], str]) -> None:
        super().__init__()
        self.odd = odd

    def __setitem__(self, key: str, value: dict[str, Any]) -> None:
        super().__setitem__(
            key, {**value, "phoneNumbers": [self.odd(n) for n in value["phoneNumbers"]]}
        )


async def _connect(p: ConfigPortal) -> asyncpg.Connection:
    return await asyncpg.connect(
        p.settings.database_url.get_secret_value(), server_settings={"search_path": "config"}
    )


@pytest.mark.parametrize("odd", list(ODD_NUMBERS), ids=list(ODD_NUMBERS))
async def test_number_acs_offers_that_is_not_e164_fails_the_job_unbought(
    config_portal: ConfigPortal, worker: Worker, monkeypatch: pytest.MonkeyPatch, odd: str
) -> None:
    """A number ACS offers that is not ASCII E.164 fails the job with the reason, unbought."""
    p = config_portal
    numbers = p.microsoft.components.numbers.state
    monkeypatch.setattr(numbers, "searches", _OddSearches(ODD_NUMBERS[odd]))
    owned_before = set(p.microsoft.components.acs.state.owned_numbers)
    status, job = await p.call(CONTOSO_ADMIN, "POST", "/api/phone-numbers")
    assert status == 202
    failed = await worker.until(p, job["id"], "failed")
    assert failed["step"] == "done"
    assert failed["phone_number"] is None
    assert "not a valid E.164 phone number" in failed["error"]
    (offered,) = [n for result in numbers.searches.values() for n in result["phoneNumbers"]]
    assert ascii(offered) in failed["error"]
    assert numbers.purchased_searches == set()
    assert set(p.microsoft.components.acs.state.owned_numbers) == owned_before


@pytest.mark.parametrize("refusal", ["check", "unique"])
async def test_step_result_the_database_refuses_fails_the_job_once(
    config_portal: ConfigPortal, worker: Worker, logs: list[MutableMapping[str, Any]], refusal: str
) -> None:
    """A step result the database refuses (e164 CHECK, unique key) fails the job, logged once."""
    p = config_portal
    _, job = await p.call(CONTOSO_ADMIN, "POST", "/api/phone-numbers")
    bought = (await worker.until(p, job["id"], "active"))["phone_number"]
    conn = await _connect(p)
    try:
        if refusal == "check":
            # What the old validation let through: ACS's number with a trailing newline.
            candidate, constraint = bought + "\n", "phone_numbers_e164_check"
        else:
            # Another row holds the number already.
            candidate, constraint = bought, "phone_numbers_e164_key"
            await conn.execute(
                "UPDATE phone_numbers SET e164 = NULL WHERE id = $1", uuid.UUID(job["id"])
            )
            await conn.execute(
                "INSERT INTO phone_numbers (id, tenant_id, e164, status, step, created_by_oid)"
                " VALUES ($1, 'another-tenant', $2, 'active', 'done', 'someone')",
                uuid.uuid4(),
                bought,
            )
        # The purchase has succeeded at ACS; the next poll records the number.
        await conn.execute(
            "UPDATE phone_numbers SET status = 'purchasing', step = 'purchase_poll', e164 = NULL,"
            " candidate_e164 = $2, next_attempt_at = now() WHERE id = $1",
            uuid.UUID(job["id"]),
            candidate,
        )
    finally:
        await conn.close()
    failed = await worker.until(p, job["id"], "failed")
    assert failed["step"] == "done"
    assert failed["phone_number"] is None
    assert "'purchase_poll' could not be recorded" in failed["error"]
    assert constraint in failed["error"]
    assert "ACS may have bought the number" in failed["error"]
    (refused,) = _events(logs, REFUSED_LOG)
    assert refused["step"] == "purchase_poll"
    assert refused["constraint"] == constraint
    assert _events(logs, UNAVAILABLE_LOG) == []


async def test_acs_value_postgres_cannot_store_fails_the_job_without_searching_again(
    config_portal: ConfigPortal,
    worker: Worker,
    logs: list[MutableMapping[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ACS answer Postgres cannot store (NUL in the search id) fails the job after one search."""
    p = config_portal
    searches: list[str] = []
    original = AcsPhoneNumbers.start_search

    async def start_search(acs: AcsPhoneNumbers, country: str) -> StartedSearch:
        started = await original(acs, country)
        searches.append(started.search_id)
        return StartedSearch(started.operation_url, started.search_id + "\x00")

    monkeypatch.setattr(AcsPhoneNumbers, "start_search", start_search)
    _, job = await p.call(CONTOSO_ADMIN, "POST", "/api/phone-numbers")
    failed = await worker.until(p, job["id"], "failed")
    assert "'search' could not be recorded" in failed["error"]
    assert "CharacterNotInRepertoireError" in failed["error"]
    assert "ACS may have bought" not in failed["error"]
    assert len(searches) == 1
    assert len(_events(logs, REFUSED_LOG)) == 1
    assert _events(logs, UNAVAILABLE_LOG) == []


@pytest.mark.parametrize(
    "outage",
    [
        asyncpg.exceptions.AdminShutdownError(
            "terminating connection due to administrator command"
        ),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        ConnectionResetError("connection reset by peer"),
        # What asyncpg raises when the connection dropped under the step: it ended the worker.
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle"),
        asyncpg.InterfaceError("connection is closed"),
    ],
    ids=lambda exc: type(exc).__name__,
)
async def test_database_outage_during_a_step_is_retried(
    config_portal: ConfigPortal,
    worker: Worker,
    logs: list[MutableMapping[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    outage: Exception,
) -> None:
    """A database outage during a step is retried, not failed: the job still gets its number."""
    p = config_portal
    original = PhoneNumberJobs._step
    raised: list[str] = []

    async def step(jobs: PhoneNumberJobs, row: asyncpg.Record) -> StepOutcome:
        if row["step"] == "purchase_poll" and len(raised) < 2:
            raised.append(row["step"])
            raise outage
        return await original(jobs, row)

    monkeypatch.setattr(PhoneNumberJobs, "_step", step)
    _, job = await p.call(CONTOSO_ADMIN, "POST", "/api/phone-numbers")
    done = await worker.until(p, job["id"], "active")
    assert done["phone_number"] in p.microsoft.components.acs.state.owned_numbers
    assert done["error"] is None
    assert raised == ["purchase_poll", "purchase_poll"]
    unavailable = _events(logs, UNAVAILABLE_LOG)
    assert [entry["error"] for entry in unavailable] == [type(outage).__name__] * 2
    assert _events(logs, REFUSED_LOG) == []


@pytest.mark.parametrize("odd", list(ODD_NUMBERS), ids=list(ODD_NUMBERS))
def test_integration_config_refuses_a_sender_that_is_not_ascii_e164(odd: str) -> None:
    """The integration-config event refuses an SMS sender that is not ASCII E.164."""
    event: dict[str, Any] = {
        "integration_id": str(uuid.uuid4()),
        "config_version": 1,
        "fhir_base_url": "https://fhir.example.test/r4",
        "environment": "test",
        "enabled": True,
        "department": "Cardiology",
        "organisation_name": "Contoso Health",
        "ms_tenant_id": "contoso",
        "smart_client_id": "teams-connector",
        "client_auth_method": "client_secret_basic",
        "teams_organizer_id": "dr.lee@contosohealth.onmicrosoft.com",
        "sms_enabled": True,
        "sms_from_number": "+18005550100",
    }
    assert IntegrationConfigV1.model_validate(event).sms_from_number == "+18005550100"
    event["sms_from_number"] = ODD_NUMBERS[odd]("+18005550100")
    with pytest.raises(ValidationError, match="sms_from_number"):
        IntegrationConfigV1.model_validate(event)
