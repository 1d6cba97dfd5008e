"""A scripted day of video visits, driven only through the stand-ins' admin APIs (as a clinic,
its patients and Teams would act) and the gateway's public pages, like `make demo`.

Each visit records what the script did, so the test can compute the reference facts itself:
the department it booked, whether the patient came, and the moments (as the outside world saw
them) of lobby entry, admission and the end of the meeting.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import aiohttp
import orjson

from infra.demo import follow
from infra.sample_data import EHR, TENANT_A
from libs.common.keys import appointment_key
from libs.common.settings import ServiceSettings

MICROSOFT = "https://127.0.0.1:9443"
KEY_SECRET = ServiceSettings.model_fields["appointment_key_secret"].default.get_secret_value()
LINK = re.compile(r"https?://\S+/join/([A-Za-z0-9_\-]+)\.\S+")
T = TypeVar("T")


class DayFailed(Exception):
    pass


async def eventually(
    what: str, probe: Callable[[], Awaitable[T | None]], within_s: float, every_s: float = 0.5
) -> T:
    """Polls another process's state; transport errors count as "not yet" (it may be the
    process a fault just killed)."""
    deadline = time.monotonic() + within_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            found = await probe()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            found, last = None, exc
        if found is not None:
            return found
        await asyncio.sleep(every_s)
    raise DayFailed(f"timed out after {within_s:.0f} s waiting for {what} (last error: {last!r})")


def key_of_link(text: str) -> str | None:
    """The appointment key a join link names (its token is base64 JSON with `a`)."""
    found = LINK.search(text)
    if found is None:
        return None
    token = found.group(1)
    document = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    return str(document["a"])


def sms_kind(text: str) -> str:
    if "is booked for" in text:
        return "confirmation"
    if "reminder," in text:
        return "reminder"
    if "has moved to" in text:
        return "reschedule"
    if "cancelled" in text:
        return "cancellation"
    return "link"


class SmsWatcher:
    """One poller of the ACS stand-in's sent messages, indexed by appointment and kind."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self._http = http
        self.by_key: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self.total = 0
        self._changed = asyncio.Condition()

    async def refresh(self) -> list[dict[str, Any]]:
        async with self._http.get(f"{MICROSOFT}/_sandbox/sms/messages") as r:
            r.raise_for_status()
            messages: list[dict[str, Any]] = (await r.json())["value"]
        index: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
        for message in messages:
            key = key_of_link(str(message.get("message", "")))
            if key is not None:
                index[key][sms_kind(message["message"])].append(message)
        async with self._changed:
            self.by_key, self.total = index, len(messages)
            self._changed.notify_all()
        return messages

    async def run(self) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                await self.refresh()
            await asyncio.sleep(0.5)

    async def wait(self, key: str, kind: str, within_s: float) -> dict[str, Any]:
        async def found() -> dict[str, Any] | None:
            messages = self.by_key.get(key, {}).get(kind, [])
            return messages[0] if messages else None

        async with asyncio.timeout(within_s):
            async with self._changed:
                while (message := await found()) is None:
                    await self._changed.wait()
        return message


@dataclass
class Visit:
    index: int
    outcome: Literal["completed", "no_show"]
    launched: bool
    reminded: bool
    start: datetime
    patient: str = ""
    patient_name: str = ""
    location: str = ""
    department: str = ""
    fhir_id: str = ""
    key: str = ""
    # time.time() just before the patient first opened the join link, and after it answered.
    lobby_from: float | None = None
    lobby_to: float | None = None
    admitted_at: datetime | None = None
    ended_at: datetime | None = None
    done: bool = False
    steps: list[str] = field(default_factory=list)


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


class Day:
    def __init__(
        self, http: aiohttp.ClientSession, integration_id: str, count: int, concurrency: int
    ) -> None:
        self.http = http
        self.integration_id = uuid.UUID(integration_id)
        self.count = count
        self.sms = SmsWatcher(http)
        self.visits: list[Visit] = []
        self.started = 0
        self.finished = 0
        self.progress = asyncio.Condition()
        self._slots = asyncio.Semaphore(concurrency)
        self._meetings: dict[str, str] = {}

    def plan(self, directory: dict[str, Any]) -> None:
        now = datetime.now(UTC).replace(microsecond=0)
        for i in range(self.count):
            reminded = i % 4 == 0
            # Reminders are planned 15 min before the start; a reminded visit's start is set
            # when it is booked (visit()), so its reminder falls due 30 s later, in the run.
            start = now + timedelta(hours=2, minutes=i)
            patient = directory["patients"][i % len(directory["patients"])]
            location = directory["locations"][i % len(directory["locations"])]
            self.visits.append(
                Visit(
                    index=i,
                    outcome="no_show" if i % 5 == 3 else "completed",
                    launched=i % 3 == 0,
                    reminded=reminded,
                    start=start,
                    patient=patient["id"],
                    patient_name=patient["name"],
                    location=location["id"],
                    department=location["name"],
                )
            )

    async def run(self) -> None:
        async with self.http.get(f"{EHR}/_sandbox/tenants/{TENANT_A}/directory") as r:
            r.raise_for_status()
            directory = await r.json()
        self.plan(directory)
        self.practitioner = directory["practitioners"][0]["id"]
        watcher = asyncio.create_task(self.sms.run(), name="sms-watcher")
        try:
            async with asyncio.TaskGroup() as group:
                for visit in self.visits:
                    await self._slots.acquire()
                    group.create_task(self._one(visit))
                    async with self.progress:
                        self.started += 1
                        self.progress.notify_all()
        finally:
            watcher.cancel()

    async def wait_started(self, share: float) -> None:
        async with self.progress:
            await self.progress.wait_for(lambda: self.started >= share * self.count)

    async def _one(self, visit: Visit) -> None:
        try:
            await self.visit(visit)
        except Exception as exc:
            raise DayFailed(f"visit {visit.index} failed after {visit.steps}: {exc!r}") from exc
        finally:
            self._slots.release()
            async with self.progress:
                self.finished += 1
                self.progress.notify_all()

    async def _post(self, url: str, body: dict[str, Any], expect: int = 200) -> Any:
        async with self.http.post(url, json=body) as r:
            payload = await r.json(content_type=None)
            if r.status != expect:
                raise DayFailed(f"POST {url} answered {r.status}: {payload}")
            return payload

    async def meeting_of(self, key: str) -> str:
        async def probe() -> str | None:
            if key not in self._meetings:
                async with self.http.get(f"{MICROSOFT}/_sandbox/meetings") as r:
                    self._meetings.update({m["externalId"]: m["id"] for m in await r.json()})
            return self._meetings.get(key)

        return await eventually("the Teams meeting", probe, within_s=60)

    async def visit(self, visit: Visit) -> None:
        if visit.reminded:
            visit.start = datetime.now(UTC).replace(microsecond=0) + timedelta(
                minutes=15, seconds=30
            )
        booking = {
            "patient": visit.patient,
            "practitioner": self.practitioner,
            "location": visit.location,
            "start": visit.start.isoformat(),
            "minutes": 20,
            "video": True,
        }
        appointment = await self._post(
            f"{EHR}/_sandbox/tenants/{TENANT_A}/appointments", booking, expect=201
        )
        visit.fhir_id = appointment["id"]
        visit.key = appointment_key(KEY_SECRET, self.integration_id, visit.fhir_id)
        visit.steps.append("booked")

        sms = await self.sms.wait(visit.key, "confirmation", within_s=300)
        visit.steps.append("confirmed")
        link = LINK.search(sms["message"])
        assert link is not None

        if visit.launched:

            async def provider_page() -> bool | None:
                launch = await self._post(
                    f"{EHR}/_sandbox/tenants/{TENANT_A}/launches",
                    {"appointment": visit.fhir_id},
                    expect=201,
                )
                status, page = await follow(self.http, launch["launch_url"])
                return True if status == 200 and "Join the meeting" in page else None

            await eventually("the provider page", provider_page, within_s=90, every_s=1)
            visit.steps.append("launched")

        meeting = f"{MICROSOFT}/_sandbox/meetings/{await self.meeting_of(visit.key)}"
        await self._post(f"{meeting}/join", {"role": "organizer"})
        visit.steps.append("organizer joined")
        if visit.outcome == "completed":
            visit.lobby_from = time.time()

            async def prejoin() -> bool | None:
                async with self.http.get(link.group(0)) as r:
                    return True if r.status == 200 and "Join the visit" in await r.text() else None

            await eventually("the pre-join page", prejoin, within_s=90, every_s=1)
            visit.lobby_to = time.time()
            # A real guest types a name; the gateway must not keep it (privacy scan).
            await self._post(f"{meeting}/join", {"role": "attendee", "display": visit.patient_name})
            visit.steps.append("patient in lobby")
            await asyncio.sleep(0.4 + (visit.index % 4) * 0.3)  # time in the lobby
            await self._post(f"{meeting}/admit", {})
            visit.steps.append("admitted")
            await asyncio.sleep(0.5 + (visit.index % 3) * 0.4)  # the consultation
        else:
            await asyncio.sleep(1.0)  # the clinician waits for a patient who never comes
        await self._post(f"{meeting}/end", {})
        visit.steps.append("ended")
        async with self.http.get(f"{meeting}/state") as r:
            state = await r.json()
        patients = [p for p in state["participants"] if p["role"] == "attendee"]
        if patients:
            visit.admitted_at = parse_time(patients[0]["admittedDateTime"])
        leaves = [parse_time(p["leaveDateTime"]) for p in state["participants"]]
        visit.ended_at = max((t for t in leaves if t is not None), default=None)
        visit.done = True
