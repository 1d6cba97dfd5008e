"""Folds events into per-appointment facts, idempotently and in any order.

Each handler runs in the consumer's inbox transaction. It locks the appointment's fact row,
stores what the event observed (keyed by what it says, so a repeat inserts nothing),
recomputes the visit's figures from every observation so far, and moves the visit's
contribution in the daily rollup from its old place to its new one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC
from typing import TYPE_CHECKING, Any

import asyncpg

from libs.common.events import (
    AppointmentCancelledV1,
    AppointmentCreatedV1,
    AppointmentRescheduledV1,
    Envelope,
    MeetingEndedV1,
    ParticipantAdmittedV1,
    ParticipantLeftV1,
    PatientJoinedV1,
    SmsSentV1,
    TenantSettingsV1,
    Topic,
)
from services.analytics import rollup
from services.analytics.metrics import MetricsRecorder
from services.analytics.visit import Observations, PresenceChange, figures

if TYPE_CHECKING:
    from libs.common.db import Connection

Handler = Callable[["Connection", Envelope[Any]], Awaitable[None]]

_OBSERVATIONS = """
SELECT 'lobby' AS kind, participant, entered_at AS at, NULL::boolean AS joined, NULL AS role
    FROM lobby_entries WHERE appointment_key = $1
UNION ALL SELECT 'admitted', participant, admitted_at, NULL, NULL
    FROM admissions WHERE appointment_key = $1
UNION ALL SELECT 'presence', participant, at, joined, NULL
    FROM presence_changes WHERE appointment_key = $1
UNION ALL SELECT 'role', participant, NULL, NULL, role
    FROM participant_roles WHERE appointment_key = $1
UNION ALL SELECT 'sms', count(*)::text, NULL, NULL, NULL
    FROM sms_messages WHERE appointment_key = $1 AND outcome = 'sent'
"""

# A staff role, once seen, wins over a participant role: staffness must not depend on order.
_ROLE_UPSERT = (
    "INSERT INTO participant_roles AS r (appointment_key, participant, role)"
    " SELECT $1, * FROM unnest($2::text[], $3::text[])"
    " ON CONFLICT (appointment_key, participant) DO UPDATE SET role = excluded.role"
    " WHERE excluded.role IN ('organizer', 'staff') AND r.role NOT IN ('organizer', 'staff')"
)


class FactsProjector:
    def __init__(self, metrics: MetricsRecorder) -> None:
        self.metrics = metrics

    def handlers(self) -> dict[str, Handler]:
        return {
            Topic.APPOINTMENT_CREATED: self.on_appointment_created,
            Topic.APPOINTMENT_RESCHEDULED: self.on_appointment_rescheduled,
            Topic.APPOINTMENT_CANCELLED: self.on_appointment_cancelled,
            Topic.PATIENT_JOINED: self.on_patient_joined,
            Topic.PARTICIPANT_ADMITTED: self.on_participant_admitted,
            Topic.PARTICIPANT_LEFT: self.on_participant_left,
            Topic.MEETING_ENDED: self.on_meeting_ended,
            Topic.SMS_SENT: self.on_sms_sent,
            Topic.TENANT_SETTINGS: self.on_tenant_settings,
        }

    async def _lock(self, conn: Connection, event: Envelope[Any]) -> dict[str, Any]:
        """The fact row as it was before this event, locked until the transaction ends."""
        self.metrics.reset(str(event.event_id))
        row = await conn.fetchrow(
            "INSERT INTO appointment_facts (appointment_key, tenant_id) VALUES ($1, $2)"
            " ON CONFLICT (appointment_key) DO UPDATE SET updated_at = now() RETURNING *",
            event.key,
            event.tenant_id,
        )
        assert row is not None
        return dict(row)

    async def _recompute(
        self, conn: Connection, event: Envelope[Any], old: Mapping[str, Any]
    ) -> None:
        rows = await conn.fetch(_OBSERVATIONS, event.key)
        roles = {r["participant"]: r["role"] for r in rows if r["kind"] == "role"}
        observed = Observations(
            roles=roles,
            lobby_entries=frozenset(
                (r["participant"], r["at"]) for r in rows if r["kind"] == "lobby"
            ),
            admissions=frozenset(
                (r["participant"], r["at"]) for r in rows if r["kind"] == "admitted"
            ),
            changes=frozenset(
                PresenceChange(r["participant"], r["at"], r["joined"])
                for r in rows
                if r["kind"] == "presence"
            ),
            meeting_ended_at=old["meeting_ended_at"],
        )
        sms_sent = int(next(r["participant"] for r in rows if r["kind"] == "sms"))
        result = figures(observed)
        report_day = result.report_at.astimezone(UTC).date() if result.report_at else None
        new = await conn.fetchrow(
            "UPDATE appointment_facts SET status = $2, started_at = $3, report_at = $4,"
            " report_day = $5, duration_ms = $6, lobby_wait_ms = $7, attendees = $8,"
            " sms_sent = $9 WHERE appointment_key = $1 RETURNING *",
            event.key,
            result.status,
            result.started_at,
            result.report_at,
            report_day,
            result.duration_ms,
            result.lobby_wait_ms,
            result.attendees,
            sms_sent,
        )
        assert new is not None
        before, after = rollup.contribution(old), rollup.contribution(new)
        await rollup.apply(conn, before, after)
        self._observe(event, old, new, before is None and after is not None)

    def _observe(
        self, event: Envelope[Any], old: Mapping[str, Any], new: asyncpg.Record, first: bool
    ) -> None:
        event_id = str(event.event_id)
        changed = any(
            old[c] != new[c]
            for c in ("status", "started_at", "duration_ms", "lobby_wait_ms", "attendees")
        )
        if changed or first:
            self.metrics.fact_changed(event_id, new["environment"], event.occurred_at.timestamp())
        if first:
            # Prometheus cannot take an observation back, so a visit is observed once, when
            # it first counts; later corrections reach the report but not these histograms.
            self.metrics.visit_counted(
                event_id,
                new["environment"],
                new["department"],
                new["status"],
                new["lobby_wait_ms"],
                new["duration_ms"],
            )

    async def on_appointment_created(self, conn: Connection, event: Envelope[Any]) -> None:
        p = event.payload
        assert isinstance(p, AppointmentCreatedV1)
        old = await self._lock(conn, event)
        await conn.execute(
            "UPDATE appointment_facts SET integration_id = $2, environment = $3, department = $4,"
            " scheduled_start = CASE WHEN $7 >= schedule_version THEN $5 ELSE scheduled_start END,"
            " scheduled_end = CASE WHEN $7 >= schedule_version THEN $6 ELSE scheduled_end END,"
            " schedule_version = greatest(schedule_version, $7)"
            " WHERE appointment_key = $1",
            event.key,
            p.integration_id,
            p.environment,
            p.department,
            p.starts_at,
            p.ends_at,
            p.schedule_version,
        )
        if old["department"] is None and old["sms_sent"]:
            # Messages seen before the booking waited for their department label (below).
            self.metrics.sms_sent(str(event.event_id), p.environment, p.department, old["sms_sent"])
        await self._recompute(conn, event, old)

    async def on_appointment_rescheduled(self, conn: Connection, event: Envelope[Any]) -> None:
        p = event.payload
        assert isinstance(p, AppointmentRescheduledV1)
        await self._lock(conn, event)
        # The report files a visit under when it happened, not when it was booked for, so a
        # new schedule changes no figure.
        await conn.execute(
            "UPDATE appointment_facts SET integration_id = coalesce(integration_id, $2),"
            " scheduled_start = $3, scheduled_end = $4, schedule_version = $5"
            " WHERE appointment_key = $1 AND schedule_version < $5",
            event.key,
            p.integration_id,
            p.starts_at,
            p.ends_at,
            p.schedule_version,
        )

    async def on_appointment_cancelled(self, conn: Connection, event: Envelope[Any]) -> None:
        p = event.payload
        assert isinstance(p, AppointmentCancelledV1)
        await self._lock(conn, event)
        await conn.execute(
            "UPDATE appointment_facts SET integration_id = coalesce(integration_id, $2),"
            " cancelled_at = coalesce(cancelled_at, $3), cancel_reason = $4,"
            " schedule_version = greatest(schedule_version, $5)"
            " WHERE appointment_key = $1",
            event.key,
            p.integration_id,
            event.occurred_at,
            p.reason_code,
            p.schedule_version,
        )

    async def on_patient_joined(self, conn: Connection, event: Envelope[Any]) -> None:
        p = event.payload
        assert isinstance(p, PatientJoinedV1)
        old = await self._lock(conn, event)
        await conn.execute(_ROLE_UPSERT, event.key, [p.participant], ["patient"])
        await conn.execute(
            "INSERT INTO lobby_entries (appointment_key, participant, entered_at)"
            " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            event.key,
            p.participant,
            p.lobby_entered_at,
        )
        await self._recompute(conn, event, old)

    async def on_participant_admitted(self, conn: Connection, event: Envelope[Any]) -> None:
        p = event.payload
        assert isinstance(p, ParticipantAdmittedV1)
        old = await self._lock(conn, event)
        await conn.execute(_ROLE_UPSERT, event.key, [p.participant], [p.role])
        await conn.execute(
            "WITH a AS (INSERT INTO admissions (appointment_key, participant, admitted_at)"
            "  VALUES ($1, $2, $3) ON CONFLICT DO NOTHING)"
            " INSERT INTO presence_changes (appointment_key, participant, at, joined)"
            " VALUES ($1, $2, $3, true) ON CONFLICT DO NOTHING",
            event.key,
            p.participant,
            p.admitted_at,
        )
        await self._recompute(conn, event, old)

    async def on_participant_left(self, conn: Connection, event: Envelope[Any]) -> None:
        p = event.payload
        assert isinstance(p, ParticipantLeftV1)
        old = await self._lock(conn, event)
        await conn.execute(_ROLE_UPSERT, event.key, [p.participant], [p.role])
        await conn.execute(
            "INSERT INTO presence_changes (appointment_key, participant, at, joined)"
            " VALUES ($1, $2, $3, false) ON CONFLICT DO NOTHING",
            event.key,
            p.participant,
            p.left_at,
        )
        await self._recompute(conn, event, old)

    async def on_meeting_ended(self, conn: Connection, event: Envelope[Any]) -> None:
        p = event.payload
        assert isinstance(p, MeetingEndedV1)
        old = await self._lock(conn, event)
        people = p.participants
        await conn.execute(
            _ROLE_UPSERT, event.key, [a.participant for a in people], [a.role for a in people]
        )
        lobby = [(a.participant, a.lobby_entered_at) for a in people if a.lobby_entered_at]
        admitted = [(a.participant, a.admitted_at) for a in people if a.admitted_at]
        changes = [
            (a.participant, at, joined)
            for a in people
            for i in a.intervals
            for at, joined in ((i.joined_at, True), (i.left_at, False))
            if at is not None
        ]
        await conn.execute(
            "WITH l AS (INSERT INTO lobby_entries (appointment_key, participant, entered_at)"
            "  SELECT $1, * FROM unnest($2::text[], $3::timestamptz[]) ON CONFLICT DO NOTHING),"
            " a AS (INSERT INTO admissions (appointment_key, participant, admitted_at)"
            "  SELECT $1, * FROM unnest($4::text[], $5::timestamptz[]) ON CONFLICT DO NOTHING)"
            " INSERT INTO presence_changes (appointment_key, participant, at, joined)"
            " SELECT $1, * FROM unnest($6::text[], $7::timestamptz[], $8::boolean[])"
            " ON CONFLICT DO NOTHING",
            event.key,
            [w for w, _ in lobby],
            [at for _, at in lobby],
            [w for w, _ in admitted],
            [at for _, at in admitted],
            [w for w, _, _ in changes],
            [at for _, at, _ in changes],
            [j for _, _, j in changes],
        )
        # Several reports of the end (a retried publish) agree on the latest one.
        old_end = old["meeting_ended_at"]
        ended = p.meeting_ended_at if old_end is None else max(old_end, p.meeting_ended_at)
        await conn.execute(
            "UPDATE appointment_facts SET meeting_ended_at = $2 WHERE appointment_key = $1",
            event.key,
            ended,
        )
        await self._recompute(conn, event, {**old, "meeting_ended_at": ended})

    async def on_sms_sent(self, conn: Connection, event: Envelope[Any]) -> None:
        p = event.payload
        assert isinstance(p, SmsSentV1)
        old = await self._lock(conn, event)
        status = await conn.execute(
            "INSERT INTO sms_messages (event_id, appointment_key, kind, outcome, segments, at)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            event.event_id,
            event.key,
            p.kind,
            p.outcome,
            p.segments,
            p.at,
        )
        await conn.execute(
            "UPDATE appointment_facts SET integration_id = coalesce(integration_id, $2)"
            " WHERE appointment_key = $1",
            event.key,
            p.integration_id,
        )
        # Topics are consumed in no set order: a message seen before its booking is counted
        # when the booking brings the department, so its label is never "unknown".
        if status == "INSERT 0 1" and p.outcome == "sent" and old["department"] is not None:
            self.metrics.sms_sent(str(event.event_id), old["environment"], old["department"])
        await self._recompute(conn, event, old)

    async def on_tenant_settings(self, conn: Connection, event: Envelope[Any]) -> None:
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
