"""Reading the launch context from the configured FHIR server, and only from it.

FHIR JSON from the EHR is validated before use; display names and everything else we do not
need are dropped at the model boundary.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aiohttp
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from libs.common.events import MAX_SCHEDULE_VERSION
from libs.common.web import whole_number
from services.launch.outbound import OutboundError, read_json

FHIR_ID = re.compile(r"^[A-Za-z0-9.-]{1,64}$")
VIDEO_VISIT = "VIDEO_VISIT"


class FhirError(Exception):
    """Reading the EHR failed; the message is safe to show the clinician."""


class Reference(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    reference: str | None = Field(default=None, max_length=512)


class Coding(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    system: str | None = Field(default=None, max_length=512)
    code: str | None = Field(default=None, max_length=128)
    display: str | None = Field(default=None, max_length=256)


class CodeableConcept(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    coding: list[Coding] = Field(default_factory=list, max_length=50)
    text: str | None = Field(default=None, max_length=256)


class Meta(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    versionId: str | None = Field(default=None, max_length=64)  # noqa: N815 - FHIR's name


EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def _usable_time(at: datetime) -> bool:
    try:
        return EARLIEST <= at.astimezone(UTC) < LATEST
    except OverflowError:  # 0001-01-01T00:00+01:00 is year 0 in UTC
        return False


class Appointment(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    resourceType: str = Field(pattern="^Appointment$")  # noqa: N815
    id: str = Field(pattern=FHIR_ID.pattern)
    status: str = Field(max_length=32)
    start: AwareDatetime | None = None
    end: AwareDatetime | None = None
    meta: Meta = Meta()
    serviceType: list[CodeableConcept] = Field(default_factory=list, max_length=20)  # noqa: N815
    participant: list[dict[str, Any]] = Field(default_factory=list, max_length=50)

    @property
    def times(self) -> tuple[datetime, datetime] | None:
        """Start and end, or None unless both are given, in order, within the years every
        later use can compute with: the join link expires at the end plus a grace period,
        reminders fall before the start and reports bucket by day, and times near the
        calendar's ends overflow them (checked before anything is made for the visit, a
        Teams meeting included)."""
        start, end = self.start, self.end
        if start is None or end is None or not (_usable_time(start) and _usable_time(end)):
            return None
        return (start, end) if start < end else None

    @property
    def is_video_visit(self) -> bool:
        return any(c.code == VIDEO_VISIT for t in self.serviceType for c in t.coding)

    @property
    def schedule_version(self) -> int:
        version = whole_number(self.meta.versionId or "1", 10)
        # Within Postgres' integer, with room for the one increment a cancel adds
        # (scheduling._cancel): at 2**31 - 1 that cancel overflowed, a 500 on every redelivery.
        return version if version is not None and version < MAX_SCHEDULE_VERSION else 1

    def department(self, fallback: str) -> str:
        for participant in self.participant:
            actor = participant.get("actor") or {}
            if isinstance(actor, dict) and str(actor.get("reference", "")).startswith("Location/"):
                display = actor.get("display")
                # Stored and sent to Graph: no NUL or control characters.
                if isinstance(display, str) and 0 < len(display) <= 200 and display.isprintable():
                    return display
        return fallback

    def reference_to(self, resource_type: str) -> str | None:
        for participant in self.participant:
            actor = participant.get("actor") or {}
            reference = str(actor.get("reference", "")) if isinstance(actor, dict) else ""
            if reference.startswith(resource_type + "/"):
                return reference.split("/", 1)[1]
        return None


class Encounter(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    resourceType: str = Field(pattern="^Encounter$")  # noqa: N815
    id: str = Field(pattern=FHIR_ID.pattern)
    appointment: list[Reference] = Field(default_factory=list, max_length=20)


class FhirClient:
    """Requests go to `iss` + a validated relative path, never to a URL from a response."""

    def __init__(self, http: aiohttp.ClientSession, iss: str, access_token: str) -> None:
        self._http = http
        self._iss = iss
        self._headers = {
            "Authorization": f"Bearer {access_token}",
            "Accept": "application/fhir+json",
        }

    async def _get(self, path: str, params: list[tuple[str, str]] | None = None) -> Any:
        try:
            async with self._http.get(
                f"{self._iss}/{path}", params=params, headers=self._headers, allow_redirects=False
            ) as response:
                if response.status == 404:
                    return None
                if response.status != 200:
                    raise FhirError(
                        f"The EHR answered {response.status} when reading {path.split('/')[0]}."
                    )
                return await read_json(response)
        except (aiohttp.ClientError, TimeoutError, OutboundError, ValueError) as exc:
            # ValueError: aiohttp refusing a header, e.g. an access token with a control
            # character (TokenResponse refuses those; this keeps any other a clear refusal).
            raise FhirError(f"The EHR could not be read ({type(exc).__name__}).") from None

    async def read_appointment(self, appointment_id: str) -> Appointment | None:
        if not FHIR_ID.match(appointment_id):
            raise FhirError("The appointment reference is not valid.")
        body = await self._get(f"Appointment/{appointment_id}")
        return None if body is None else _parse(Appointment, body)

    async def appointments_of_encounter(self, encounter_id: str) -> list[Appointment]:
        if not FHIR_ID.match(encounter_id):
            raise FhirError("The encounter reference is not valid.")
        body = await self._get(f"Encounter/{encounter_id}")
        if body is None:
            return []
        encounter = _parse(Encounter, body)
        found = []
        for ref in encounter.appointment:
            target = (ref.reference or "").removeprefix(self._iss + "/")
            if target.startswith("Appointment/"):
                appointment = await self.read_appointment(target.split("/", 1)[1])
                if appointment is not None:
                    found.append(appointment)
        return found

    async def todays_appointments(self, patient_id: str, now: datetime) -> list[Appointment]:
        """Cerner wants a date with the patient and no practitioner or location with it."""
        if not FHIR_ID.match(patient_id):
            raise FhirError("The patient reference is not valid.")
        window_start, window_end = now - timedelta(hours=12), now + timedelta(hours=24)
        params = [
            ("patient", patient_id),
            ("date", f"ge{window_start.date().isoformat()}"),
            ("date", f"lt{(window_end.date() + timedelta(days=1)).isoformat()}"),
        ]
        bundle = await self._get("Appointment", params)
        entries = bundle.get("entry", []) if isinstance(bundle, dict) else []
        if not isinstance(entries, list):
            raise FhirError("The EHR's search answer is not a valid FHIR Bundle.")
        found = []
        for entry in entries[:100]:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict) or resource.get("resourceType") != "Appointment":
                continue
            appointment = _parse(Appointment, resource)
            # A start near the calendar's ends overflowed here (a 500 for the whole search).
            start = appointment.start
            if start and _usable_time(start) and window_start <= start.astimezone(UTC) < window_end:
                found.append(appointment)
        return found


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], body: Any) -> M:
    try:
        return model.model_validate(body)
    except ValidationError:
        raise FhirError(f"The EHR's {model.__name__} is not valid FHIR.") from None
