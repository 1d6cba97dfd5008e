"""Online meetings and their live calls: lobby, admit, leave, end, attendance reports."""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote, unquote

from sandbox.microsoft.clock import Clock, graph_time
from sandbox.microsoft.directory import User

CALL_STARTED = "Microsoft.Communication.CallStarted"
CALL_ROSTER_UPDATE = "Microsoft.Communication.CallRosterUpdate"
CALL_ENDED = "Microsoft.Communication.CallEnded"
SAME_ORG_SCOPES = ("organization", "organizationAndFederated", "organizationExcludingGuests")
# Updatable properties the meeting keeps in fields of its own; others go to Meeting.settings.
_MODELLED = ("startDateTime", "endDateTime", "subject", "lobbyBypassSettings", "participants")


class MeetingError(Exception):
    """A meeting action that is not possible in the current state."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def normalize_join_url(url: str) -> str:
    """Decode percent-escapes until stable, so single/double-encoded forms compare equal."""
    for _ in range(4):
        decoded = unquote(url)
        if decoded == url:
            break
        url = decoded
    return url


@dataclass
class Participant:
    """One call leg: a person's presence in a call, from lobby entry to leaving."""

    leg_id: str
    role: str  # organizer | presenter | attendee
    identity_kind: str  # user | guest
    identity_id: str
    display_name: str
    tenant_id: str | None
    email: str | None
    state: str = "lobby"  # lobby | inMeeting | left
    lobby_entered_at: datetime | None = None
    admitted_at: datetime | None = None
    joined_at: datetime | None = None
    left_at: datetime | None = None

    def roster_entry(self) -> dict[str, Any]:
        """The participant as it appears in ``activeParticipants@joined/@exited``."""
        if self.identity_kind == "user":
            ident: dict[str, Any] = {
                "User": {
                    "Id": self.identity_id,
                    "DisplayName": self.display_name,
                    "TenantId": self.tenant_id,
                }
            }
        else:
            ident = {"Guest": {"Id": self.identity_id, "DisplayName": self.display_name}}
        return {
            "Id": self.leg_id,
            "Identity": ident,
            "Role": self.role.capitalize(),
            "IsInLobby": self.state == "lobby",
        }

    def public(self) -> dict[str, Any]:
        def t(dt: datetime | None) -> str | None:
            return graph_time(dt) if dt else None

        return {
            "id": self.leg_id,
            "role": self.role,
            "identityKind": self.identity_kind,
            "identityId": self.identity_id,
            "displayName": self.display_name,
            "state": self.state,
            "lobbyEnteredDateTime": t(self.lobby_entered_at),
            "admittedDateTime": t(self.admitted_at),
            "joinDateTime": t(self.joined_at),
            "leaveDateTime": t(self.left_at),
        }


@dataclass
class CallSession:
    id: str
    started_at: datetime
    participants: list[Participant] = field(default_factory=list)
    ended_at: datetime | None = None

    def present(self) -> list[Participant]:
        return [p for p in self.participants if p.state != "left"]


@dataclass
class Meeting:
    id: str
    organizer: User
    external_id: str
    subject: str
    start: datetime
    end: datetime
    thread_id: str
    join_web_url: str
    created_at: datetime
    lobby_bypass: dict[str, Any]
    participants: dict[str, Any]
    join_meeting_id: str
    call: CallSession | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)
    # Updatable settings set by PATCH that the stand-in does not act on (allowMeetingChat, …).
    settings: dict[str, Any] = field(default_factory=dict)
    # How many PATCHes changed or restated this meeting (GET /_sandbox/meetings shows it).
    update_count: int = 0

    def graph_json(self) -> dict[str, Any]:
        org = self.organizer
        return {
            "id": self.id,
            "creationDateTime": graph_time(self.created_at),
            "startDateTime": graph_time(self.start),
            "endDateTime": graph_time(self.end),
            "joinUrl": self.join_web_url,
            "joinWebUrl": self.join_web_url,
            "externalId": self.external_id,
            "subject": self.subject,
            "isBroadcast": False,
            "autoAdmittedUsers": "everyoneInCompany",
            "outerMeetingAutoAdmittedUsers": None,
            "isEntryExitAnnounced": True,
            "allowedPresenters": "everyone",
            "allowMeetingChat": "enabled",
            "videoTeleconferenceId": None,
            "lobbyBypassSettings": self.lobby_bypass,
            "chatInfo": {"threadId": self.thread_id, "messageId": "0", "replyChainMessageId": None},
            "joinMeetingIdSettings": {
                "isPasscodeRequired": False,
                "joinMeetingId": self.join_meeting_id,
                "passcode": None,
            },
            "audioConferencing": None,
            "participants": {
                "organizer": {
                    "upn": org.upn,
                    "role": "presenter",
                    "identity": {
                        "user": {
                            "id": org.oid,
                            "displayName": None,
                            "tenantId": org.tenant_id,
                            "identityProvider": "AAD",
                        }
                    },
                },
                "attendees": self.participants.get("attendees", []),
            },
            **self.settings,
        }


MeetingListener = Callable[[Meeting, str, datetime, list[Participant], list[Participant]], None]


class MeetingStore:
    """All meetings, and the state machine of their calls."""

    def __init__(self, clock: Clock, base_url: Callable[[], str]) -> None:
        self.clock = clock
        self._base_url = base_url
        self.by_id: dict[str, Meeting] = {}
        self.by_external: dict[tuple[str, str], Meeting] = {}
        self.by_join_url: dict[str, Meeting] = {}
        self.by_thread: dict[str, Meeting] = {}
        self.listeners: list[MeetingListener] = []

    # -- creation -----------------------------------------------------------------------------
    def create_or_get(
        self,
        organizer: User,
        external_id: str,
        start: datetime,
        end: datetime,
        subject: str,
        participants: dict[str, Any],
        lobby_bypass: dict[str, Any],
    ) -> tuple[Meeting, bool]:
        key = (organizer.oid, external_id)
        if key in self.by_external:
            return self.by_external[key], False
        token = base64.b32encode(secrets.token_bytes(20)).decode().lower().rstrip("=")
        thread_id = f"19:meeting_{token}@thread.v2"
        context = quote(f'{{"Tid":"{organizer.tenant_id}","Oid":"{organizer.oid}"}}', safe="")
        join_url = (
            f"{self._base_url()}/l/meetup-join/{quote(thread_id, safe='').lower()}/0"
            f"?context={context.lower()}"
        )
        meeting_id = (
            base64.urlsafe_b64encode(f"1*{organizer.oid}*0**{thread_id}".encode())
            .decode()
            .rstrip("=")
        )
        meeting = Meeting(
            id=meeting_id,
            organizer=organizer,
            external_id=external_id,
            subject=subject,
            start=start,
            end=end,
            thread_id=thread_id,
            join_web_url=join_url,
            created_at=self.clock.now(),
            lobby_bypass=lobby_bypass,
            participants=participants,
            join_meeting_id=str(secrets.randbelow(10**12)).zfill(12),
        )
        self.by_id[meeting_id] = meeting
        self.by_external[key] = meeting
        self.by_join_url[normalize_join_url(join_url)] = meeting
        self.by_thread[thread_id] = meeting
        return meeting, True

    def update(self, meeting: Meeting, changes: dict[str, Any]) -> Meeting:
        """Apply a validated PATCH: times, subject, lobby, attendees and other settings."""
        if "startDateTime" in changes:
            meeting.start, meeting.end = changes["startDateTime"], changes["endDateTime"]
        if "subject" in changes:
            meeting.subject = changes["subject"]
        if "lobbyBypassSettings" in changes:
            meeting.lobby_bypass = {**meeting.lobby_bypass, **changes["lobbyBypassSettings"]}
        if "participants" in changes:
            meeting.participants = {**meeting.participants, **changes["participants"]}
        meeting.settings.update({k: v for k, v in changes.items() if k not in _MODELLED})
        meeting.update_count += 1
        return meeting

    def find_by_join_url(self, url: str) -> Meeting | None:
        return self.by_join_url.get(normalize_join_url(url))

    def virtual_appointment_url(self, meeting: Meeting) -> str:
        conv = quote(meeting.thread_id, safe="")
        return (
            f"{self._base_url()}/webrtc-svc/api/route?tid={meeting.organizer.tenant_id}"
            f"&convId={conv}"
        )

    # -- call state machine -------------------------------------------------------------------
    def _emit(
        self,
        meeting: Meeting,
        event: str,
        joined: list[Participant] | None = None,
        exited: list[Participant] | None = None,
    ) -> None:
        now = self.clock.now()
        for listener in self.listeners:
            listener(meeting, event, now, list(joined or []), list(exited or []))

    def _bypasses_lobby(self, meeting: Meeting, p: Participant) -> bool:
        if p.role == "organizer":
            return True
        scope = str(meeting.lobby_bypass.get("scope", "organization"))
        if scope == "everyone":
            return True
        same_org = p.identity_kind == "user" and p.tenant_id == meeting.organizer.tenant_id
        return same_org and scope in (*SAME_ORG_SCOPES, "invited")

    def join(
        self, meeting: Meeting, role: str, display: str, user: User | None = None
    ) -> Participant:
        if role not in ("organizer", "presenter", "attendee"):
            raise MeetingError(400, "role must be organizer, presenter or attendee")
        if role == "organizer":
            user = user or meeting.organizer
            if user.oid != meeting.organizer.oid:
                raise MeetingError(403, "only the meeting organizer can join as organizer")
        now = self.clock.now()
        if meeting.call is None or meeting.call.ended_at is not None:
            meeting.call = CallSession(id=str(uuid.uuid4()), started_at=now)
            self._emit(meeting, CALL_STARTED)
        if user is not None:
            p = Participant(
                leg_id=str(uuid.uuid4()),
                role=role,
                identity_kind="user",
                identity_id=user.oid,
                display_name=user.display_name,
                tenant_id=user.tenant_id,
                email=user.upn,
            )
        else:
            p = Participant(
                leg_id=str(uuid.uuid4()),
                role=role,
                identity_kind="guest",
                identity_id=str(uuid.uuid4()),
                display_name=display or "Guest",
                tenant_id=None,
                email=None,
            )
        if self._bypasses_lobby(meeting, p):
            p.state, p.joined_at = "inMeeting", now
        else:
            p.state, p.lobby_entered_at = "lobby", now
        meeting.call.participants.append(p)
        self._emit(meeting, CALL_ROSTER_UPDATE, joined=[p])
        return p

    def _leg(self, meeting: Meeting, leg_id: str) -> Participant:
        if meeting.call is None or meeting.call.ended_at is not None:
            raise MeetingError(409, "the meeting call is not active")
        for p in meeting.call.participants:
            if p.leg_id == leg_id:
                return p
        raise MeetingError(404, f"no participant {leg_id} in the active call")

    def admit(self, meeting: Meeting, leg_id: str | None = None) -> list[Participant]:
        """Admit one lobby participant, or everyone waiting when ``leg_id`` is None."""
        if meeting.call is None or meeting.call.ended_at is not None:
            raise MeetingError(409, "the meeting call is not active")
        if not any(
            p.state == "inMeeting" and p.role in ("organizer", "presenter")
            for p in meeting.call.participants
        ):
            raise MeetingError(409, "only an organizer or presenter in the meeting can admit")
        if leg_id is not None:
            waiting = [self._leg(meeting, leg_id)]
            if waiting[0].state != "lobby":
                raise MeetingError(409, "participant is not in the lobby")
        else:
            waiting = [p for p in meeting.call.participants if p.state == "lobby"]
        now = self.clock.now()
        for p in waiting:
            p.state, p.admitted_at, p.joined_at = "inMeeting", now, now
        if waiting:
            self._emit(meeting, CALL_ROSTER_UPDATE, joined=waiting)
        return waiting

    def leave(self, meeting: Meeting, leg_id: str) -> Participant:
        p = self._leg(meeting, leg_id)
        if p.state == "left":
            raise MeetingError(409, "participant already left")
        p.state, p.left_at = "left", self.clock.now()
        self._emit(meeting, CALL_ROSTER_UPDATE, exited=[p])
        assert meeting.call is not None
        if not meeting.call.present():
            self._finish(meeting)
        return p

    def end(self, meeting: Meeting) -> dict[str, Any] | None:
        """End the call for everyone; returns the attendance report."""
        if meeting.call is None or meeting.call.ended_at is not None:
            raise MeetingError(409, "the meeting call is not active")
        now = self.clock.now()
        remaining = meeting.call.present()
        for p in remaining:
            p.state, p.left_at = "left", now
        if remaining:
            self._emit(meeting, CALL_ROSTER_UPDATE, exited=remaining)
        return self._finish(meeting)

    def _finish(self, meeting: Meeting) -> dict[str, Any] | None:
        call = meeting.call
        assert call is not None
        call.ended_at = self.clock.now()
        self._emit(meeting, CALL_ENDED)
        report = build_attendance_report(meeting, call)
        if report is not None:
            meeting.reports.append(report)
        return report


def build_attendance_report(meeting: Meeting, call: CallSession) -> dict[str, Any] | None:
    """Aggregate in-meeting intervals (lobby time excluded) per identity."""
    assert call.ended_at is not None
    records: dict[str, dict[str, Any]] = {}
    role_rank = {"organizer": 0, "presenter": 1, "attendee": 2}
    for p in call.participants:
        if p.joined_at is None:
            continue  # never admitted: not an attendee
        left = p.left_at or call.ended_at
        seconds = int((left - p.joined_at).total_seconds())
        rec = records.get(p.identity_id)
        if rec is None:
            odata = (
                "#microsoft.graph.communicationsUserIdentity"
                if p.identity_kind == "user"
                else "#microsoft.graph.communicationsGuestIdentity"
            )
            identity: dict[str, Any] = {
                "@odata.type": odata,
                "id": p.identity_id,
                "displayName": p.display_name,
            }
            if p.identity_kind == "user":
                identity["tenantId"] = p.tenant_id
            rec = records[p.identity_id] = {
                "id": p.identity_id,
                "emailAddress": p.email,
                "totalAttendanceInSeconds": 0,
                "role": p.role.capitalize(),
                "registrantId": None,
                "identity": identity,
                "attendanceIntervals": [],
                "_rank": role_rank[p.role],
            }
        if role_rank[p.role] < rec["_rank"]:
            rec["role"], rec["_rank"] = p.role.capitalize(), role_rank[p.role]
        rec["totalAttendanceInSeconds"] += seconds
        rec["attendanceIntervals"].append(
            {
                "joinDateTime": graph_time(p.joined_at),
                "leaveDateTime": graph_time(left),
                "durationInSeconds": seconds,
            }
        )
    if not records:
        return None
    for rec in records.values():
        rec.pop("_rank")
    return {
        "id": str(uuid.uuid4()),
        "totalParticipantCount": len(records),
        "meetingStartDateTime": graph_time(call.started_at),
        "meetingEndDateTime": graph_time(call.ended_at),
        "attendanceRecords": list(records.values()),
    }
