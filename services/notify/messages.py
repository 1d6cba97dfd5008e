"""What a patient reads: templates per integration, local visit time, segment counting.

Texts carry the organisation's name, the visit's local time and the join link, never clinical
detail. They must fit in two SMS segments; a configured template that does not is replaced by
the default, and the organisation name is shortened as a last resort.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from libs.common.events import SmsKind

MAX_SEGMENTS = 2

DEFAULT_TEMPLATES: dict[SmsKind, str] = {
    "confirmation": (
        "{organisation}: your video visit is booked for {when}. Join from your phone or "
        "computer: {link} Reply STOP to opt out."
    ),
    "reschedule": "{organisation}: your video visit has moved to {when}. Join: {link}",
    "cancellation": "{organisation}: your video visit on {when} has been cancelled.",
    "reminder": "{organisation}: reminder, your video visit starts {when}. Join: {link}",
    "link": "{organisation}: join your video visit ({when}) here: {link}",
}
PLACEHOLDERS = frozenset({"organisation", "when", "link"})
_PLACEHOLDER = re.compile(r"\{([a-z_]*)\}")

# GSM 03.38 default alphabet; the extension table costs two septets per character.
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")


class TemplateError(ValueError):
    """A configured template uses something other than {organisation}, {when}, {link}."""


@dataclass(frozen=True)
class Encoding:
    name: str
    units: int
    segments: int


def encoding(text: str) -> Encoding:
    """Segments as the carrier counts them: GSM-7 160/153 septets, else UCS-2 70/67 units."""
    if all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text):
        units = sum(2 if c in GSM7_EXTENSION else 1 for c in text)
        single, multi, name = 160, 153, "GSM-7"
    else:
        # Characters beyond the BMP take a surrogate pair in UTF-16.
        units = sum(2 if ord(c) > 0xFFFF else 1 for c in text)
        single, multi, name = 70, 67, "UCS-2"
    return Encoding(name, units, 1 if units <= single else math.ceil(units / multi))


def check_template(template: str) -> None:
    unknown = set(_PLACEHOLDER.findall(template)) - PLACEHOLDERS
    if unknown:
        raise TemplateError(f"unknown placeholders: {', '.join(sorted(unknown))}")


def local_time(starts_at: datetime, time_zone: str) -> str:
    """ "Tue 25 Nov, 9:00 AM CST" in the appointment's own zone (UTC if it is unknown)."""
    try:
        zone = ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    local = starts_at.astimezone(zone)
    hour = local.strftime("%I").lstrip("0")
    return f"{local:%a %d %b}, {hour}:{local:%M %p} {local.tzname()}"


def _fill(template: str, values: Mapping[str, str]) -> str:
    # Plain substitution, not str.format: a template is configuration, and format() would
    # let it reach attributes of the values.
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


@dataclass(frozen=True)
class Rendered:
    text: str
    segments: int


def render(
    kind: SmsKind,
    *,
    organisation: str,
    starts_at: datetime,
    time_zone: str,
    join_url: str | None,
    templates: Mapping[str, str],
) -> Rendered | None:
    """The message text, or None when nothing fits in two segments."""
    values = {"when": local_time(starts_at, time_zone), "link": join_url or ""}
    candidates: list[str] = []
    configured = templates.get(kind)
    if configured:
        try:
            check_template(configured)
            candidates.append(configured)
        except TemplateError:
            pass
    candidates.append(DEFAULT_TEMPLATES[kind])
    names = [organisation.strip() or "Your care team"]
    # Shortened names keep the message to two segments when the name is what overflows.
    names += [names[0][:n].rstrip() for n in (40, 20) if len(names[0]) > n]
    for template in candidates:
        for name in names:
            text = _fill(template, {**values, "organisation": name}).strip()
            counted = encoding(text)
            if counted.segments <= MAX_SEGMENTS:
                return Rendered(text, counted.segments)
    return None
