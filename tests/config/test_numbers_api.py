from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import asyncpg

from libs.common.events import Envelope, decode_event
from sandbox.ehr import RunningEhr
from sandbox.microsoft.app import RunningSandbox
from services.config.settings import ConfigSettings
from tests.config.conftest import (
    CONTOSO_ADMIN,
    TENANT_B,
    ConfigPortal,
    Serve,
    running_portal,
)
from tests.support.kafka_reader import read_all
from tests.support.portal import allow_redirect_uri


async def wait_for_number(
    p: ConfigPortal, upn: str, number_id: str, status: str, *, step: str | None = None,
    within_s: float = 20.0,
) -> dict[str, Any]:  # fmt: skip
    """Polls the API (bounded) until the job reaches `status` (and `step`, if given)."""
    seen: dict[str, Any] = {}
    async with asyncio.timeout(within_s):
        while True:
            code, seen = await p.call(upn, "GET", f"/api/phone-numbers/{number_id}")
            assert code == 200, seen
            if seen["status"] == status and (step is None or seen["step"] == step):
                return seen
            assert seen["status"] != "failed" or status == "failed", seen
            await asyncio.sleep(0.05)


def _latest(events: list[Envelope[Any]]) -> dict[str, Any]:
    """What a consumer keeps: per key, the payload with the highest config_version."""
    latest: dict[str, Any] = {}
    for event in events:
        if (
            event.key not in latest
            or event.payload.config_version > latest[event.key].config_version
        ):
            latest[event.key] = event.payload
    return latest


async def _stand_in(p: ConfigPortal, path: str, body: dict[str, Any]) -> None:
    async with p.http.post(f"{p.microsoft.base_url}{path}", json=body) as response:
        assert response.status == 200


async def test_number_job_completes(config_portal: ConfigPortal) -> None:
    """ "Create new phone number" searches, purchases and ends with an E.164 toll-free number."""
    p = config_portal
    status, job = await p.call(CONTOSO_ADMIN, "POST", "/api/phone-numbers")
    assert status == 202
    assert job["status"] == "searching"
    assert job["phone_number"] is None
    done = await wait_for_number(p, CONTOSO_ADMIN, job["id"], "active")
    assert done["phone_number"].startswith("+18")
    assert done["progress_percent"] == 100
    _, listed = await p.call(CONTOSO_ADMIN, "GET", "/api/phone-numbers")
    assert [n["phone_number"] for n in listed["phone_numbers"]] == [done["phone_number"]]
    # ACS now really owns it: the stand-in lists the number as purchased.
    assert done["phone_number"] in p.microsoft.components.acs.state.owned_numbers


async def test_second_job_while_one_runs_is_refused(config_portal: ConfigPortal) -> None:
    """Only one number is created at a time per tenant (409)."""
    p = config_portal
    await _stand_in(p, "/_sandbox/acs/numbers/delay", {"seconds": 1.0})
    assert (await p.call(CONTOSO_ADMIN, "POST", "/api/phone-numbers"))[0] == 202
    status, body = await p.call(CONTOSO_ADMIN, "POST", "/api/phone-numbers")
    assert status == 409
    assert "already being created" in body["error"]


async def test_failed_purchase_shows_error_and_retry_succeeds(config_portal: ConfigPortal) -> None:
    """An ACS purchase failure shows its reason; retrying creates the number."""
    p = config_portal
    await _stand_in(p, "/_sandbox/acs/numbers/fail-next", {"operation": "purchase"})
    _, job = await p.call(CONTOSO_ADMIN, "POST", "/api/phone-numbers")
    failed = await wait_for_number(p, CONTOSO_ADMIN, job["id"], "failed")
    assert "purchase failed" in failed["error"]
    assert failed["phone_number"] is None
    status, again = await p.call(CONTOSO_ADMIN, "POST", f"/api/phone-numbers/{job['id']}/retry")
    assert status == 202
    assert again["error"] is None
    done = await wait_for_number(p, CONTOSO_ADMIN, job["id"], "active")
    assert done["phone_number"]
    status, _ = await p.call(CONTOSO_ADMIN, "POST", f"/api/phone-numbers/{job['id']}/retry")
    assert status == 409


async def test_job_survives_a_service_restart(
    config_settings: ConfigSettings,
    serve: Serve,
    microsoft: RunningSandbox,
    microsoft_http: aiohttp.ClientSession,
    ehr: RunningEhr,
) -> None:
    """A job stopped mid-search by a restart is finished by the next service process."""
    await allow_redirect_uri(microsoft_http, microsoft, config_settings.redirect_uri)
    async with running_portal(config_settings, serve, microsoft_http, ehr, microsoft) as first:
        await _stand_in(first, "/_sandbox/acs/numbers/delay", {"seconds": 1.5})
        _, job = await first.call(CONTOSO_ADMIN, "POST", "/api/phone-numbers")
        mid = await wait_for_number(
            first, CONTOSO_ADMIN, job["id"], "searching", step="search_poll"
        )
        assert mid["progress_percent"] < 100
        session = await first.session(CONTOSO_ADMIN)
    # The first process is gone (pool, worker and relay closed, as on SIGTERM).
    async with running_portal(config_settings, serve, microsoft_http, ehr, microsoft) as second:
        second.sessions[CONTOSO_ADMIN] = session
        still = await wait_for_number(second, CONTOSO_ADMIN, job["id"], "searching")
        assert still["step"] in ("search_poll", "purchase")
        done = await wait_for_number(second, CONTOSO_ADMIN, job["id"], "active")
    assert done["phone_number"].startswith("+1")
    assert done["phone_number"] in microsoft.components.acs.state.owned_numbers


async def test_number_linked_to_two_urls(config_portal: ConfigPortal) -> None:
    """One number serves a test and a production URL; both integration-config events carry it."""
    p = config_portal
    _, first = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", p.integration())
    _, second = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", p.integration(TENANT_B))
    _, job = await p.call(CONTOSO_ADMIN, "POST", "/api/phone-numbers")
    number = await wait_for_number(p, CONTOSO_ADMIN, job["id"], "active")
    status, linked = await p.call(
        CONTOSO_ADMIN, "PUT", f"/api/phone-numbers/{job['id']}/links",
        {"integration_ids": [first["id"], second["id"]]},
    )  # fmt: skip
    assert status == 200, linked
    assert sorted(linked["linked_integration_ids"]) == sorted([first["id"], second["id"]])
    for integration in (first, second):
        _, now = await p.call(CONTOSO_ADMIN, "GET", f"/api/integrations/{integration['id']}")
        assert now["phone_number_id"] == job["id"]
    events = [
        decode_event(raw)
        for raw in await read_all(p.settings.topic("integration-config"), expect=4)
    ]
    latest = _latest(events)
    assert latest[first["id"]].sms_from_number == number["phone_number"]
    assert latest[second["id"]].sms_from_number == number["phone_number"]
    # Unlinking one leaves the other linked.
    status, linked = await p.call(
        CONTOSO_ADMIN, "PUT", f"/api/phone-numbers/{job['id']}/links",
        {"integration_ids": [second["id"]]},
    )  # fmt: skip
    assert linked["linked_integration_ids"] == [second["id"]]
    events = [
        decode_event(raw)
        for raw in await read_all(p.settings.topic("integration-config"), expect=5)
    ]
    latest = _latest(events)
    assert latest[first["id"]].sms_from_number is None
    assert latest[second["id"]].sms_from_number == number["phone_number"]


async def test_number_cannot_be_linked_before_it_exists(config_portal: ConfigPortal) -> None:
    """Linking a number whose job has not finished is refused with 409."""
    p = config_portal
    await _stand_in(p, "/_sandbox/acs/numbers/delay", {"seconds": 1.0})
    _, first = await p.call(CONTOSO_ADMIN, "POST", "/api/integrations", p.integration())
    _, job = await p.call(CONTOSO_ADMIN, "POST", "/api/phone-numbers")
    status, body = await p.call(
        CONTOSO_ADMIN, "PUT", f"/api/phone-numbers/{job['id']}/links",
        {"integration_ids": [first["id"]]},
    )  # fmt: skip
    assert status == 409
    assert "not ready" in body["error"]


async def test_purchase_repeated_after_a_crash_is_confirmed_not_rebought(
    config_portal: ConfigPortal,
) -> None:
    """If a process bought the number but died before recording it, the next attempt's 409
    leads to a confirmation that ACS owns the number, not a second purchase."""
    p = config_portal
    _, job = await p.call(CONTOSO_ADMIN, "POST", "/api/phone-numbers")
    done = await wait_for_number(p, CONTOSO_ADMIN, job["id"], "active")
    owned_before = set(p.microsoft.components.acs.state.owned_numbers)
    # Rewind the row to "about to purchase", as a crash before the commit would leave it.
    conn = await asyncpg.connect(
        p.settings.database_url.get_secret_value(), server_settings={"search_path": "config"}
    )
    try:
        await conn.execute(
            "UPDATE phone_numbers SET status = 'purchasing', step = 'purchase', e164 = NULL,"
            " purchase_operation_url = NULL, next_attempt_at = now() WHERE id = $1",
            uuid.UUID(job["id"]),
        )
    finally:
        await conn.close()
    again = await wait_for_number(p, CONTOSO_ADMIN, job["id"], "active")
    assert again["phone_number"] == done["phone_number"]
    assert set(p.microsoft.components.acs.state.owned_numbers) == owned_before
