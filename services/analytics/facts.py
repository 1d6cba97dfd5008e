"""Folds events into per-appointment facts, idempotently and in any order.

A poll of events is applied in the consumer's inbox transaction in a fixed number of
statements, however many events it holds: lock (or create) every appointment's fact row,
store what the events observed (keyed by what they say, so a repeat inserts nothing), read
back every observation of those appointments, recompute their figures, write the rows, and
move each visit's contribution in the daily rollup from its old place to its new one. A single
event (the per-event fallback) is a poll of one, so both paths share every rule.
"""

# ruff: noqa: S608 -- the one built statement (_WRITE) is made of the constant column list.
from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from libs.common.events import Envelope, TenantSettingsV1, Topic
from services.analytics import rollup
from services.analytics.fold import Appointment, fold
from services.analytics.metrics import MetricsRecorder
from services.analytics.settings import DEFAULT_REPORT_TIME_ZONE, known_zone
from services.analytics.visit import Observations, PresenceChange, figures

if TYPE_CHECKING:
    from libs.common.db import Connection

Handler = Callable[["Connection", Envelope[Any]], Awaitable[None]]
DEFAULT_REPORT_ZONE = ZoneInfo(DEFAULT_REPORT_TIME_ZONE)

# Sorted keys: every transaction locks fact rows in the same order.
_LOCK = (
    "INSERT INTO appointment_facts AS f (appointment_key, tenant_id)"
    " SELECT * FROM unnest($1::text[], $2::text[])"
    " ON CONFLICT (appointment_key) DO UPDATE SET updated_at = now() RETURNING f.*"
)

# A staff role, once seen, wins over a participant role (the poll's roles are folded by the
# same rule). Data-modifying CTEs all run, whatever the final SELECT reads.
_OBSERVE = """
WITH roles AS (
    INSERT INTO participant_roles AS r (appointment_key, participant, role)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
    ON CONFLICT (appointment_key, participant) DO UPDATE SET role = excluded.role
    WHERE excluded.role IN ('organizer', 'staff') AND r.role NOT IN ('organizer', 'staff')
), lobby AS (
    INSERT INTO lobby_entries (appointment_key, participant, entered_at)
    SELECT * FROM unnest($4::text[], $5::text[], $6::timestamptz[]) ON CONFLICT DO NOTHING
), admitted AS (
    INSERT INTO admissions (appointment_key, participant, admitted_at)
    SELECT * FROM unnest($7::text[], $8::text[], $9::timestamptz[]) ON CONFLICT DO NOTHING
), presence AS (
    INSERT INTO presence_changes (appointment_key, participant, at, joined)
    SELECT * FROM unnest($10::text[], $11::text[], $12::timestamptz[], $13::boolean[])
    ON CONFLICT DO NOTHING
)
INSERT INTO sms_messages (event_id, appointment_key, kind, outcome, segments, at)
SELECT * FROM unnest($14::uuid[], $15::text[], $16::text[], $17::text[], $18::int[],
    $19::timestamptz[])
ON CONFLICT DO NOTHING RETURNING event_id
"""

_OBSERVATIONS = """
SELECT appointment_key, 'lobby' AS kind, participant, entered_at AS at, NULL::boolean AS joined,
    NULL AS role
    FROM lobby_entries WHERE appointment_key = ANY($1::text[])
UNION ALL SELECT appointment_key, 'admitted', participant, admitted_at, NULL, NULL
    FROM admissions WHERE appointment_key = ANY($1::text[])
UNION ALL SELECT appointment_key, 'presence', participant, at, joined, NULL
    FROM presence_changes WHERE appointment_key = ANY($1::text[])
UNION ALL SELECT appointment_key, 'role', participant, NULL, NULL, role
    FROM participant_roles WHERE appointment_key = ANY($1::text[])
UNION ALL SELECT appointment_key, 'sms', count(*)::text, NULL, NULL, NULL
    FROM sms_messages WHERE appointment_key = ANY($1::text[]) AND outcome = 'sent'
    GROUP BY appointment_key
"""

# Every column a poll may change, in the order of the arrays bound below.
_WRITTEN = (
    ("integration_id", "uuid"),
    ("environment", "text"),
    ("department", "text"),
    ("scheduled_start", "timestamptz"),
    ("scheduled_end", "timestamptz"),
    ("time_zone", "text"),
    ("schedule_version", "int"),
    ("cancelled_at", "timestamptz"),
    ("cancel_reason", "text"),
    ("meeting_ended_at", "timestamptz"),
    ("status", "text"),
    ("started_at", "timestamptz"),
    ("report_at", "timestamptz"),
    ("report_day", "date"),
    ("duration_ms", "bigint"),
    ("lobby_wait_ms", "bigint"),
    ("attendees", "int"),
    ("sms_sent", "int"),
)
_WRITE = (
    "UPDATE appointment_facts AS f SET "
    + ", ".join(f"{c} = v.{c}" for c, _ in _WRITTEN)
    + " FROM unnest($1::text[], "
    + ", ".join(f"${i}::{t}[]" for i, (_, t) in enumerate(_WRITTEN, start=2))
    + ") AS v(appointment_key, "
    + ", ".join(c for c, _ in _WRITTEN)
    + ") WHERE f.appointment_key = v.appointment_key"
)
_FIGURES = ("status", "started_at", "duration_ms", "lobby_wait_ms", "attendees")
_SCHEDULE_ONLY = frozenset({Topic.APPOINTMENT_RESCHEDULED, Topic.APPOINTMENT_CANCELLED})


class FactsProjector:
    def __init__(
        self, metrics: MetricsRecorder, report_zone: ZoneInfo = DEFAULT_REPORT_ZONE
    ) -> None:
        self.metrics = metrics
        # The day of a visit whose booking gave no usable zone (or has not arrived yet).
        self.report_zone = report_zone

    def handlers(self) -> dict[str, Handler]:
        """The per-event path: each event is a poll of one."""

        async def one(conn: Connection, event: Envelope[Any]) -> None:
            await self.apply(conn, [event])

        # Written out, one key per topic: infra/deploy_check.py reads the consumed topics
        # (and so the Kafka ACLs the service needs) from these keys.
        return {
            Topic.APPOINTMENT_CREATED: one,
            Topic.APPOINTMENT_RESCHEDULED: one,
            Topic.APPOINTMENT_CANCELLED: one,
            Topic.PATIENT_JOINED: one,
            Topic.PARTICIPANT_ADMITTED: one,
            Topic.PARTICIPANT_LEFT: one,
            Topic.MEETING_ENDED: one,
            Topic.SMS_SENT: one,
            Topic.TENANT_SETTINGS: one,
        }

    async def apply(self, conn: Connection, events: list[Envelope[Any]]) -> None:
        """Applies a poll's first deliveries, in poll order, inside the inbox transaction."""
        for event in events:
            # A retried poll stashes its metric observations again.
            self.metrics.reset(str(event.event_id))
        visit_events = [e for e in events if e.type != Topic.TENANT_SETTINGS]
        for event in events:
            if event.type == Topic.TENANT_SETTINGS:
                await self._tenant_settings(conn, event)
        if visit_events:
            await self._apply_visits(conn, visit_events)

    async def _apply_visits(self, conn: Connection, events: list[Envelope[Any]]) -> None:
        tenants: dict[str, str] = {}
        for event in events:
            tenants.setdefault(event.key, event.tenant_id)
        keys = sorted(tenants)
        rows = await conn.fetch(_LOCK, keys, [tenants[k] for k in keys])
        appointments = {}
        for r in rows:
            before = dict(r)
            # Copying the dict is several times cheaper than reading the record again.
            appointments[before["appointment_key"]] = Appointment(before, before.copy())
        for event in events:
            fold(appointments[event.key], event)
        inserted_sms = await self._observe_all(conn, list(appointments.values()))
        observed = await self._observations(conn, keys)
        for key in keys:
            self._recompute(appointments[key], observed.get(key, []))
        await conn.execute(
            _WRITE, keys, *([appointments[k].row[c] for k in keys] for c, _ in _WRITTEN)
        )
        await rollup.apply(
            conn,
            [
                (rollup.contribution(a.before), rollup.contribution(a.row))
                for a in appointments.values()
            ],
        )
        for key in keys:
            self._meter(appointments[key], inserted_sms)

    async def _observe_all(self, conn: Connection, appointments: list[Appointment]) -> set[Any]:
        """Stores the poll's observations; returns the ids of the SMS rows it inserted."""
        roles = [(a.row["appointment_key"], p, r) for a in appointments for p, r in a.roles.items()]
        lobby = [(a.row["appointment_key"], p, at) for a in appointments for p, at in a.lobby]
        admitted = [(a.row["appointment_key"], *x) for a in appointments for x in a.admitted]
        presence = [(a.row["appointment_key"], *x) for a in appointments for x in a.presence]
        sms = [s for a in appointments for s in a.sms]
        if not (roles or lobby or admitted or presence or sms):
            return set()
        rows = await conn.fetch(
            _OBSERVE,
            *_columns(roles, 3),
            *_columns(lobby, 3),
            *_columns(admitted, 3),
            *_columns(presence, 4),
            [s.event_id for s in sms],
            [s.appointment_key for s in sms],
            [s.kind for s in sms],
            [s.outcome for s in sms],
            [s.segments for s in sms],
            [s.at for s in sms],
        )
        return {r["event_id"] for r in rows}

    async def _observations(self, conn: Connection, keys: list[str]) -> dict[str, list[Any]]:
        by_key: dict[str, list[Any]] = defaultdict(list)
        for r in await conn.fetch(_OBSERVATIONS, keys):
            by_key[r["appointment_key"]].append(r)
        return by_key

    def _recompute(self, appointment: Appointment, rows: list[Any]) -> None:
        row = appointment.row
        roles: dict[str, str] = {}
        lobby: set[tuple[str, datetime]] = set()
        admissions: set[tuple[str, datetime]] = set()
        changes: set[PresenceChange] = set()
        sms_sent = 0
        # One pass over the rows, whatever their kind (columns in _OBSERVATIONS's order).
        for _key, kind, participant, at, joined, role in rows:
            if kind == "presence":
                changes.add(PresenceChange(participant, at, joined))
            elif kind == "lobby":
                lobby.add((participant, at))
            elif kind == "admitted":
                admissions.add((participant, at))
            elif kind == "role":
                roles[participant] = role
            else:  # "sms": its count, in the participant column
                sms_sent += int(participant)
        observed = Observations(
            roles=roles,
            lobby_entries=frozenset(lobby),
            admissions=frozenset(admissions),
            changes=frozenset(changes),
            meeting_ended_at=row["meeting_ended_at"],
        )
        result = figures(observed)
        # Filed under when it happened; an appointment that never became a visit (its SMS
        # still count, see rollup.contribution) under when it was booked for. The day is the
        # visit's own local day, as the hospital counts it: a 19:30 visit in Chicago on 31
        # January is a January visit, though it is 1 February in UTC. A zone that arrives
        # after the figures (topics are not ordered) refiles the visit; the rollup moves it.
        filed_at = result.report_at or row["scheduled_start"]
        zone = known_zone(row["time_zone"]) or self.report_zone
        row.update(
            status=result.status,
            started_at=result.started_at,
            report_at=result.report_at,
            report_day=filed_at.astimezone(zone).date() if filed_at else None,
            duration_ms=result.duration_ms,
            lobby_wait_ms=result.lobby_wait_ms,
            attendees=result.attendees,
            sms_sent=sms_sent,
        )

    def _meter(self, appointment: Appointment, inserted_sms: set[Any]) -> None:
        """Stashes the poll's metric observations of one appointment, under its last event
        (they are observed once the poll commits)."""
        old, new = appointment.before, appointment.row
        event_id = str(appointment.events[-1].event_id)
        first = not rollup.counts_as_visit(old) and rollup.counts_as_visit(new)
        if first or any(old[c] != new[c] for c in _FIGURES):
            # One observation per appointment and poll, from the earliest event of the poll
            # that bears on the figures (a reschedule or cancellation does not).
            bearing = [e for e in appointment.events if e.type not in _SCHEDULE_ONLY]
            occurred = min(e.occurred_at for e in bearing or appointment.events).timestamp()
            self.metrics.fact_changed(event_id, new["environment"], occurred)
        if first:
            # Prometheus cannot take an observation back, so a visit is observed once, when
            # it first counts (with its figures as the poll leaves them); later corrections
            # reach the report but not these histograms.
            self.metrics.visit_counted(
                event_id,
                new["environment"],
                new["department"],
                new["status"],
                new["lobby_wait_ms"],
                new["duration_ms"],
            )
        for (environment, department), count in _sms_counts(appointment, inserted_sms).items():
            self.metrics.sms_sent(event_id, environment, department, count)

    async def _tenant_settings(self, conn: Connection, event: Envelope[Any]) -> None:
        p = event.payload
        assert isinstance(p, TenantSettingsV1)
        # Keyed by tenant on a compacted topic; an older version replayed never wins.
        await conn.execute(
            "INSERT INTO tenant_allocations AS t (tenant_id, monthly_allocation, config_version)"
            " VALUES ($1, $2, $3) ON CONFLICT (tenant_id) DO UPDATE SET"
            " monthly_allocation = excluded.monthly_allocation,"
            " config_version = excluded.config_version, updated_at = now()"
            " WHERE excluded.config_version > t.config_version",
            event.tenant_id,
            p.monthly_allocation,
            p.config_version,
        )


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as the column arrays unnest takes (empty arrays for no rows)."""
    return [[row[i] for row in rows] for i in range(width)]


def _sms_counts(appointment: Appointment, inserted: set[Any]) -> dict[tuple[str, str], int]:
    """Messages sent, by the labels they are counted under. Topics are consumed in no set
    order: a message seen before its booking waits for the booking's department (so its label
    is never "unknown"), and is counted when the booking arrives, as are those the appointment
    held before the poll without a department."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    waiting = appointment.before["sms_sent"] if appointment.before["department"] is None else 0
    labelled = appointment.labelled
    for index, sms in enumerate([*appointment.sms, None]):
        if labelled is not None and labelled[0] == index and waiting:
            counts[(labelled[1], labelled[2])] += waiting
            waiting = 0
        if sms is None or sms.outcome != "sent" or sms.event_id not in inserted:
            continue
        if sms.department is None:
            waiting += 1
        else:
            counts[(sms.environment or "unknown", sms.department)] += 1
    return counts
