"""Deterministic, fictional sample data shaped like Cerner Millennium R4 resources.

No real people: names are invented and phone numbers are in the 555-01xx fictional range.
Appointments are generated for "today" (UTC date of the clock at start-up) at fixed times.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

Resource = dict[str, Any]

VIDEO_VISIT_CODE = "VIDEO_VISIT"
VIDEO_VISIT_TEXT = "Video Visit"
IN_PERSON_CODE = "OFFICE_VISIT"
IN_PERSON_TEXT = "Office Visit"
CERNER_EXT = "https://fhir-ehr.cerner.com/r4/StructureDefinition"

DEPARTMENTS = ["Cardiology Clinic", "Family Medicine", "Behavioral Health", "Dermatology"]
PRACTITIONERS = [
    ("Avery", "Quill", "MD"),
    ("Jordan", "Marsh", "DO"),
    ("Riley", "Okafor", "NP"),
]
PATIENTS = [
    ("Casey", "Fernwood", "1984-03-12", "female"),
    ("Morgan", "Bellweather", "1976-11-02", "male"),
    ("Taylor", "Ashgrove", "1990-07-21", "female"),
    ("Quinn", "Stonebridge", "1968-01-30", "male"),
    ("Rowan", "Linden", "2001-09-09", "other"),
]
# (hour UTC, minutes, patient index, practitioner index, department index, video?)
SCHEDULE = [
    (14, 30, 0, 0, 0, True),
    (15, 20, 1, 1, 1, True),
    (16, 30, 2, 0, 0, False),
    (17, 20, 3, 2, 2, True),
    (18, 30, 4, 1, 3, True),
    (19, 20, 0, 2, 1, False),
]


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def parse_iso(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def phone_for(tenant_prefix: int, index: int) -> str:
    """A fictional US mobile number: +1 312 555 01xx."""
    return f"+1312555{100 + tenant_prefix * 10 + index:04d}"


def practitioner(pid: str, given: str, family: str, suffix: str) -> Resource:
    return {
        "resourceType": "Practitioner",
        "id": pid,
        "meta": {"versionId": "1"},
        "active": True,
        "name": [
            {
                "use": "usual",
                "text": f"{family}, {given} {suffix}",
                "family": family,
                "given": [given],
                "suffix": [suffix],
            }
        ],
    }


def patient(pid: str, given: str, family: str, birth: str, gender: str, phone: str) -> Resource:
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": {"versionId": "1"},
        "active": True,
        "name": [
            {"use": "official", "text": f"{family}, {given}", "family": family, "given": [given]}
        ],
        "telecom": [{"system": "phone", "value": phone, "use": "mobile", "rank": 1}],
        "gender": gender,
        "birthDate": birth,
    }


def location(lid: str, name: str) -> Resource:
    return {
        "resourceType": "Location",
        "id": lid,
        "meta": {"versionId": "1"},
        "status": "active",
        "name": name,
        "mode": "instance",
        "type": [{"text": "Ambulatory(s)"}],
        "physicalType": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/location-physical-type",
                    "code": "ro",
                    "display": "Room",
                }
            ],
        },
    }


def service_type(tenant: str, video: bool) -> list[Resource]:
    code, text = (VIDEO_VISIT_CODE, VIDEO_VISIT_TEXT) if video else (IN_PERSON_CODE, IN_PERSON_TEXT)
    return [
        {
            "coding": [
                {
                    "system": f"https://fhir.cerner.com/{tenant}/codeSet/14230",
                    "code": code,
                    "display": text,
                    "userSelected": True,
                }
            ],
            "text": text,
        }
    ]


def is_video_visit(appt: Resource) -> bool:
    for st in appt.get("serviceType", []):
        for coding in st.get("coding", []):
            if coding.get("code") == VIDEO_VISIT_CODE:
                return True
    return False


def appointment(
    *,
    tenant: str,
    aid: str,
    start: datetime,
    minutes: int,
    patient_res: Resource,
    practitioner_res: Resource,
    location_res: Resource,
    video: bool,
    status: str = "booked",
    updated: datetime,
) -> Resource:
    return {
        "resourceType": "Appointment",
        "id": aid,
        "meta": {"versionId": "1", "lastUpdated": iso(updated)},
        "extension": [
            {"url": f"{CERNER_EXT}/is-cancelable", "valueBoolean": True},
            {"url": f"{CERNER_EXT}/is-reschedulable", "valueBoolean": True},
        ],
        "status": status,
        "serviceCategory": [{"text": "Ambulatory"}],
        "serviceType": service_type(tenant, video),
        "description": VIDEO_VISIT_TEXT if video else IN_PERSON_TEXT,
        "start": iso(start),
        "end": iso(start + timedelta(minutes=minutes)),
        "minutesDuration": minutes,
        "participant": [
            _participant("Patient", patient_res, "PART"),
            _participant("Practitioner", practitioner_res, "PPRF"),
            _participant("Location", location_res, None),
        ],
    }


def _participant(kind: str, res: Resource, role: str | None) -> Resource:
    display = res["name"] if kind == "Location" else res["name"][0]["text"]
    entry: Resource = {
        "actor": {"reference": f"{kind}/{res['id']}", "display": display},
        "required": "required",
        "status": "accepted",
    }
    if role:
        entry["type"] = [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                        "code": role,
                    }
                ]
            }
        ]
    return entry


def encounter(eid: str, appt: Resource, video: bool) -> Resource:
    refs = {p["actor"]["reference"].split("/")[0]: p["actor"] for p in appt["participant"]}
    return {
        "resourceType": "Encounter",
        "id": eid,
        "meta": {"versionId": "1"},
        "status": "planned",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "VR" if video else "AMB",
            "display": "virtual" if video else "ambulatory",
        },
        "subject": refs["Patient"],
        "participant": [{"individual": refs["Practitioner"]}],
        "appointment": [{"reference": f"Appointment/{appt['id']}"}],
        "period": {"start": appt["start"]},
        "location": [{"location": refs["Location"], "status": "planned"}],
    }


def participant_id(appt: Resource, kind: str) -> str | None:
    for p in appt.get("participant", []):
        ref = p.get("actor", {}).get("reference", "")
        if ref.startswith(f"{kind}/"):
            return str(ref.split("/", 1)[1])
    return None


class TenantData:
    """Resources of one tenant, keyed by type then id."""

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, Resource]] = {
            "Patient": {},
            "Practitioner": {},
            "Location": {},
            "Encounter": {},
            "Appointment": {},
        }
        self._next_id = 0
        self._prefix = 1
        # A real EHR never reuses an id; ids booked at run time carry this process's start
        # time, so a restarted stand-in does not hand out ids that a connector already saw.
        self._epoch = int(time.time())
        self._booked = 0

    def new_id(self) -> str:
        self._next_id += 1
        return f"{self._prefix}{self._next_id:07d}"

    def booking_id(self) -> str:
        self._booked += 1
        return f"{self._prefix}{self._epoch}{self._booked:04d}"

    def add(self, res: Resource) -> None:
        self.resources[res["resourceType"]][res["id"]] = res

    def get(self, rtype: str, rid: str) -> Resource | None:
        return self.resources.get(rtype, {}).get(rid)

    def encounter_for(self, appt_id: str) -> Resource | None:
        for enc in self.resources["Encounter"].values():
            if any(a.get("reference") == f"Appointment/{appt_id}" for a in enc["appointment"]):
                return enc
        return None


def build_tenant_data(tenant: str, prefix: int, today: date, now: datetime) -> TenantData:
    data = TenantData()
    data._prefix = prefix
    locs = [location(data.new_id(), name) for name in DEPARTMENTS]
    pracs = [practitioner(data.new_id(), g, f, s) for g, f, s in PRACTITIONERS]
    pats = [
        patient(data.new_id(), g, f, b, sex, phone_for(prefix, i))
        for i, (g, f, b, sex) in enumerate(PATIENTS)
    ]
    for res in [*locs, *pracs, *pats]:
        data.add(res)
    midnight = datetime(today.year, today.month, today.day, tzinfo=UTC)
    for hour, minutes, pi, ri, li, video in SCHEDULE:
        appt = appointment(
            tenant=tenant,
            aid=data.new_id(),
            start=midnight + timedelta(hours=hour),
            minutes=minutes,
            patient_res=pats[pi],
            practitioner_res=pracs[ri],
            location_res=locs[li],
            video=video,
            updated=now,
        )
        data.add(appt)
        data.add(encounter(data.new_id(), appt, video))
    return data
