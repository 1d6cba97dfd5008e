"""FHIR search parameter handling, including Cerner's Appointment search rules."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from multidict import MultiMapping

from sandbox.ehr import data as d


class SearchError(Exception):
    pass


_DATE_RE = re.compile(
    r"^(eq|ne|gt|lt|ge|le)?(\d{4}(-\d{2}(-\d{2}(T[0-9:.]+(Z|[+-]\d{2}:\d{2})?)?)?)?)$"
)


def _range(value: str) -> tuple[datetime, datetime]:
    """The [start, end) instant range a FHIR date value denotes (UTC when no offset)."""
    if "T" in value:
        ts = d.parse_iso(value)
        return ts, ts + timedelta(seconds=1)
    parts = [int(p) for p in value.split("-")]
    if len(parts) == 1:
        start = datetime(parts[0], 1, 1, tzinfo=UTC)
        return start, datetime(parts[0] + 1, 1, 1, tzinfo=UTC)
    if len(parts) == 2:
        start = datetime(parts[0], parts[1], 1, tzinfo=UTC)
        nxt = datetime(parts[0] + parts[1] // 12, parts[1] % 12 + 1, 1, tzinfo=UTC)
        return start, nxt
    start = datetime(parts[0], parts[1], parts[2], tzinfo=UTC)
    return start, start + timedelta(days=1)


def date_predicate(raw: str) -> Callable[[datetime], bool]:
    match = _DATE_RE.match(raw)
    if not match:
        raise SearchError(f"invalid date parameter: {raw!r}")
    prefix, value = match.group(1) or "eq", match.group(2)
    try:
        lo, hi = _range(value)
    except ValueError as exc:
        raise SearchError(f"invalid date parameter: {raw!r}") from exc
    preds: dict[str, Callable[[datetime], bool]] = {
        "eq": lambda t: lo <= t < hi,
        "ne": lambda t: not lo <= t < hi,
        "gt": lambda t: t >= hi,
        "ge": lambda t: t >= lo,
        "lt": lambda t: t < lo,
        "le": lambda t: t < hi,
    }
    return preds[prefix]


def _ids(q: MultiMapping[str], name: str, kind: str) -> set[str]:
    out: set[str] = set()
    for raw in q.getall(name, []):
        for item in raw.split(","):
            item = item.strip()
            if item.startswith(f"{kind}/"):
                item = item.split("/", 1)[1]
            if item:
                out.add(item)
    return out


def search_appointments(q: MultiMapping[str], data: d.TenantData) -> list[d.Resource]:
    """Cerner rules: one of _id, patient, practitioner, location; a date with the last three,
    and patient, practitioner and location may not be combined."""
    appts = list(data.resources["Appointment"].values())
    if "_id" in q:
        if any(k in q for k in ("patient", "practitioner", "location", "date")):
            raise SearchError("_id cannot be combined with other search parameters")
        ids = _ids(q, "_id", "Appointment")
        return [a for a in appts if a["id"] in ids]
    present = [k for k in ("patient", "practitioner", "location") if k in q]
    if not present:
        raise SearchError("one of _id, patient, practitioner or location is required")
    if len(present) > 1:
        raise SearchError("patient, practitioner and location cannot be combined")
    if "date" not in q:
        raise SearchError(f"date is required when searching by {present[0]}")
    kind = present[0].capitalize()
    wanted = _ids(q, present[0], kind)
    preds = [date_predicate(v) for v in q.getall("date")]
    statuses = {s for raw in q.getall("status", []) for s in raw.split(",") if s}
    out = []
    for appt in appts:
        if d.participant_id(appt, kind) not in wanted:
            continue
        start = d.parse_iso(appt["start"])
        if not all(p(start) for p in preds):
            continue
        if statuses and appt["status"] not in statuses:
            continue
        out.append(appt)
    return sorted(out, key=lambda a: (a["start"], a["id"]))


def search_generic(rtype: str, q: MultiMapping[str], data: d.TenantData) -> list[d.Resource]:
    items = list(data.resources[rtype].values())
    if "_id" in q:
        ids = _ids(q, "_id", rtype)
        return [r for r in items if r["id"] in ids]
    if rtype == "Encounter":
        if "patient" not in q and "subject" not in q:
            raise SearchError("one of _id, patient or subject is required")
        pats = _ids(q, "patient", "Patient") | _ids(q, "subject", "Patient")
        return [e for e in items if e["subject"]["reference"].split("/", 1)[1] in pats]
    if rtype in ("Patient", "Practitioner") and ("name" in q or "family" in q):
        needle = (q.get("name") or q.get("family") or "").lower()
        return [r for r in items if needle in r["name"][0]["text"].lower()]
    if rtype == "Location":
        needle = (q.get("name") or "").lower()
        return [r for r in items if needle in r["name"].lower()]
    raise SearchError(f"a search parameter is required to search {rtype}")
