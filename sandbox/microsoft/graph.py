"""Microsoft Graph v1.0: onlineMeetings, virtual appointment links, attendance, subscriptions."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit

import aiohttp
import jwt
from aiohttp import web

from sandbox.microsoft.clock import graph_time, parse_time
from sandbox.microsoft.core import Sandbox, graph_error
from sandbox.microsoft.directory import GRAPH_RESOURCE, User
from sandbox.microsoft.meetings import Meeting, MeetingStore, Participant

MAX_SUBSCRIPTION_MINUTES = 3 * 24 * 60
RESOURCE_RE = re.compile(
    r"^/?communications/onlineMeetings\(joinWebUrl='(?P<url>[^']+)'\)/meetingCallEvents$",
    re.IGNORECASE,
)
MEETING_ROLES = ("OnlineMeetings.ReadWrite.All", "OnlineMeetings.Read.All")
WRITE_ROLES = ("OnlineMeetings.ReadWrite.All",)
REPORT_ROLES = ("OnlineMeetingArtifact.Read.All", "OnlineMeetings.ReadWrite.All")
# PATCH /onlineMeetings/{id} (v1.0 "Update onlineMeeting"): the properties it accepts, with
# the JSON type each must have, and the onlineMeeting properties it refuses to change.
UPDATABLE: dict[str, type] = {
    "allowAttendeeToEnableCamera": bool,
    "allowAttendeeToEnableMic": bool,
    "allowBreakoutRooms": bool,
    "allowCopyingAndSharingMeetingContent": bool,
    "allowedLobbyAdmitters": str,
    "allowedPresenters": str,
    "allowLiveShare": str,
    "allowMeetingChat": str,
    "allowPowerPointSharing": bool,
    "allowRecording": bool,
    "allowTeamworkReactions": bool,
    "allowTranscription": bool,
    "allowWhiteboard": bool,
    "anonymizeIdentityForRoles": list,
    "broadcastSettings": dict,
    "endDateTime": str,
    "isEntryExitAnnounced": bool,
    "lobbyBypassSettings": dict,
    "participants": dict,
    "recordAutomatically": bool,
    "startDateTime": str,
    "subject": str,
    "watermarkProtection": dict,
}
NOT_UPDATABLE = frozenset(
    {
        "@odata.type",
        "allowParticipantsToChangeName",
        "attendanceReports",
        "attendeeReport",
        "audioConferencing",
        "autoAdmittedUsers",
        "chatInfo",
        "chatRestrictions",
        "creationDateTime",
        "externalId",
        "id",
        "isBroadcast",
        "joinInformation",
        "joinMeetingIdSettings",
        "joinUrl",
        "joinWebUrl",
        "outerMeetingAutoAdmittedUsers",
        "recordings",
        "shareMeetingChatHistoryDefault",
        "transcripts",
        "videoTeleconferenceId",
    }
)
ENUMS: dict[str, tuple[str, ...]] = {
    "allowedPresenters": (
        "everyone",
        "organization",
        "roleIsPresenter",
        "organizer",
        "unknownFutureValue",
    ),
    "allowMeetingChat": ("enabled", "disabled", "limited", "unknownFutureValue"),
    "allowedLobbyAdmitters": (
        "organizerAndCoOrganizersAndPresenters",
        "organizerAndCoOrganizers",
        "unknownFutureValue",
    ),
    "allowLiveShare": ("enabled", "disabled", "unknownFutureValue"),
}
LOBBY_SCOPES = (
    "organizer",
    "organization",
    "organizationAndFederated",
    "everyone",
    "invited",
    "organizationExcludingGuests",
    "unknownFutureValue",
)


class GraphError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Subscription:
    id: str
    resource: str
    meeting_id: str
    change_type: str
    notification_url: str
    client_state: str | None
    expiration: datetime
    tenant_id: str
    app_id: str
    lifecycle_url: str | None

    def graph_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "resource": self.resource,
            "applicationId": self.app_id,
            "changeType": self.change_type,
            "clientState": self.client_state,
            "notificationUrl": self.notification_url,
            "lifecycleNotificationUrl": self.lifecycle_url,
            "expirationDateTime": graph_time(self.expiration),
            "creatorId": self.app_id,
            "includeResourceData": False,
            "latestSupportedTlsVersion": "v1_2",
            "encryptionCertificate": None,
            "encryptionCertificateId": None,
            "notificationQueryOptions": None,
            "notificationUrlAppId": None,
        }


class Graph:
    """Handlers and state of the Graph stand-in."""

    def __init__(self, sb: Sandbox, meetings: MeetingStore) -> None:
        self.sb = sb
        self.meetings = meetings
        self.subscriptions: dict[str, Subscription] = {}
        meetings.listeners.append(self._on_call_event)

    # -- auth ---------------------------------------------------------------------------------
    def _claims(self, request: web.Request, roles: tuple[str, ...]) -> dict[str, Any]:
        auth = request.headers.get("Authorization", "")
        if not auth:
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        try:
            claims = self.sb.keys.verify(token, audience=GRAPH_RESOURCE, now=self.sb.clock.now())
        except jwt.ExpiredSignatureError as exc:
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "Lifetime validation failed, the token is expired.",
            ) from exc
        except jwt.InvalidAudienceError as exc:
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "Access token validation failure. Invalid audience.",
            ) from exc
        except jwt.PyJWTError as exc:
            raise GraphError(
                401, "InvalidAuthenticationToken", "IDX14100: JWT is not well formed or invalid."
            ) from exc
        if claims.get("idtyp") != "app":
            raise GraphError(
                403, "Forbidden", "This API requires an application (app-only) access token."
            )
        if not set(roles) & set(claims.get("roles", [])):
            raise GraphError(
                403,
                "Forbidden",
                "Insufficient privileges to complete the operation. Missing application "
                f"permission: one of {', '.join(roles)}.",
            )
        return claims

    def _organizer(self, claims: dict[str, Any], ref: str) -> User:
        user = self.sb.directory.user(ref)
        if user is None or user.tenant_id != claims.get("tid"):
            raise GraphError(
                404, "NotFound", f"The requested user '{ref}' is invalid or not found."
            )
        return user

    def _meeting(self, organizer: User, meeting_id: str) -> Meeting:
        meeting = self.meetings.by_id.get(meeting_id)
        if meeting is None or meeting.organizer.oid != organizer.oid:
            raise GraphError(404, "NotFound", "Specified meeting is not found.")
        return meeting

    def _fail(self, request: web.Request, exc: GraphError) -> web.Response:
        rid = request.headers.get("client-request-id") or str(uuid.uuid4())
        return graph_error(exc.status, exc.code, exc.message, rid)

    def _ctx(self, fragment: str) -> str:
        return f"https://graph.microsoft.com/v1.0/$metadata#{fragment}"

    # -- onlineMeetings -----------------------------------------------------------------------
    async def create_or_get(self, request: web.Request) -> web.Response:
        try:
            claims = self._claims(request, WRITE_ROLES)
            organizer = self._organizer(claims, request.match_info["user"])
            try:
                body = await request.json()
            except ValueError as exc:
                raise GraphError(400, "BadRequest", "Invalid JSON body.") from exc
            if not isinstance(body, dict) or not body.get("externalId"):
                raise GraphError(400, "BadRequest", "externalId is required for createOrGet.")
            now = self.sb.clock.now()
            try:
                start = parse_time(body["startDateTime"]) if body.get("startDateTime") else now
                end = (
                    parse_time(body["endDateTime"])
                    if body.get("endDateTime")
                    else start + timedelta(hours=1)
                )
            except ValueError as exc:
                raise GraphError(400, "BadRequest", str(exc)) from exc
            if end < start:
                raise GraphError(400, "BadRequest", "endDateTime must be after startDateTime.")
            bypass = body.get("lobbyBypassSettings") or {
                "scope": "organization",
                "isDialInBypassEnabled": False,
            }
            meeting, created = self.meetings.create_or_get(
                organizer,
                str(body["externalId"]),
                start,
                end,
                str(body.get("subject") or ""),
                body.get("participants") or {},
                bypass,
            )
        except GraphError as exc:
            return self._fail(request, exc)
        data = {"@odata.context": self._ctx("onlineMeetings/$entity"), **meeting.graph_json()}
        return web.json_response(data, status=201 if created else 200)

    async def get_meeting(self, request: web.Request) -> web.Response:
        try:
            claims = self._claims(request, MEETING_ROLES)
            organizer = self._organizer(claims, request.match_info["user"])
            meeting = self._meeting(organizer, request.match_info["meeting"])
        except GraphError as exc:
            return self._fail(request, exc)
        data = {"@odata.context": self._ctx("onlineMeetings/$entity"), **meeting.graph_json()}
        return web.json_response(data)

    def _changes(self, body: Any) -> dict[str, Any]:
        """Validate an update body as Graph does; the changes with times parsed."""
        if not isinstance(body, dict):
            raise GraphError(400, "BadRequest", "The request body must be a JSON object.")
        for name in body:
            if name in NOT_UPDATABLE:
                raise GraphError(
                    400,
                    "InvalidArgument",
                    "One or more properties do not support updating. Please refer to Microsoft "
                    "Graph documentation for more information.",
                )
            if name not in UPDATABLE:
                raise GraphError(
                    400,
                    "BadRequest",
                    f"The property '{name}' does not exist on type 'microsoft.graph."
                    "onlineMeeting'. Make sure to only use property names that are defined by "
                    "the type or mark the type as open type.",
                )
        changes: dict[str, Any] = {}
        for name, value in body.items():
            if not isinstance(value, UPDATABLE[name]):
                raise GraphError(
                    400, "BadRequest", f"Invalid value for property '{name}' of onlineMeeting."
                )
            if name in ENUMS and value not in ENUMS[name]:
                raise GraphError(
                    400, "BadRequest", f"Requested value '{value}' was not found for '{name}'."
                )
            changes[name] = value
        if ("startDateTime" in changes) != ("endDateTime" in changes):
            raise GraphError(
                400,
                "BadRequest",
                "startDateTime and endDateTime must both be given to change the meeting time.",
            )
        if "startDateTime" in changes:
            try:
                start = parse_time(changes["startDateTime"])
                end = parse_time(changes["endDateTime"])
            except ValueError as exc:
                raise GraphError(400, "BadRequest", str(exc)) from exc
            if end < start:
                raise GraphError(400, "BadRequest", "endDateTime must be after startDateTime.")
            changes["startDateTime"], changes["endDateTime"] = start, end
        lobby = changes.get("lobbyBypassSettings")
        if lobby is not None and lobby.get("scope", "organizer") not in LOBBY_SCOPES:
            raise GraphError(
                400, "BadRequest", f"Requested value '{lobby['scope']}' was not found for 'scope'."
            )
        participants = changes.get("participants")
        if participants is not None:
            if "organizer" in participants:
                raise GraphError(
                    400,
                    "InvalidArgument",
                    "One or more properties do not support updating. Please refer to Microsoft "
                    "Graph documentation for more information.",
                )
            if not isinstance(participants.get("attendees", []), list):
                raise GraphError(400, "BadRequest", "participants.attendees must be a list.")
        return changes

    async def update_meeting(self, request: web.Request) -> web.Response:
        """PATCH: 200 with the updated meeting. Times change only in pairs."""
        try:
            claims = self._claims(request, WRITE_ROLES)
            organizer = self._organizer(claims, request.match_info["user"])
            meeting = self._meeting(organizer, request.match_info["meeting"])
            try:
                body = await request.json()
            except ValueError as exc:
                raise GraphError(
                    400,
                    "BadRequest",
                    "Unable to read JSON request payload. Please ensure Content-Type header is "
                    "set and payload is of valid JSON format.",
                ) from exc
            changes = self._changes(body)
        except GraphError as exc:
            return self._fail(request, exc)
        self.meetings.update(meeting, changes)
        data = {"@odata.context": self._ctx("onlineMeetings/$entity"), **meeting.graph_json()}
        return web.json_response(data)

    async def virtual_appointment_url(self, request: web.Request) -> web.Response:
        try:
            claims = self._claims(request, MEETING_ROLES)
            organizer = self._organizer(claims, request.match_info["user"])
            meeting = self._meeting(organizer, request.match_info["meeting"])
        except GraphError as exc:
            return self._fail(request, exc)
        return web.json_response(
            {
                "@odata.context": self._ctx("Edm.String"),
                "value": self.meetings.virtual_appointment_url(meeting),
            }
        )

    # -- attendance ---------------------------------------------------------------------------
    def _reports(self, request: web.Request) -> Meeting:
        claims = self._claims(request, REPORT_ROLES)
        organizer = self._organizer(claims, request.match_info["user"])
        return self._meeting(organizer, request.match_info["meeting"])

    @staticmethod
    def _summary(report: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in report.items() if k != "attendanceRecords"}

    async def list_reports(self, request: web.Request) -> web.Response:
        try:
            meeting = self._reports(request)
        except GraphError as exc:
            return self._fail(request, exc)
        return web.json_response(
            {
                "@odata.context": self._ctx("meetingAttendanceReports"),
                "value": [self._summary(r) for r in meeting.reports],
            }
        )

    def _report(self, meeting: Meeting, report_id: str) -> dict[str, Any]:
        for r in meeting.reports:
            if r["id"] == report_id:
                return r
        raise GraphError(404, "NotFound", "The attendance report was not found.")

    async def get_report(self, request: web.Request) -> web.Response:
        try:
            meeting = self._reports(request)
            report = self._report(meeting, request.match_info["report"])
        except GraphError as exc:
            return self._fail(request, exc)
        expand = request.query.get("$expand", "")
        data = report if "attendanceRecords" in expand else self._summary(report)
        return web.json_response(
            {"@odata.context": self._ctx("meetingAttendanceReport/$entity"), **data}
        )

    async def list_records(self, request: web.Request) -> web.Response:
        try:
            meeting = self._reports(request)
            report = self._report(meeting, request.match_info["report"])
        except GraphError as exc:
            return self._fail(request, exc)
        return web.json_response(
            {
                "@odata.context": self._ctx("attendanceRecords"),
                "value": report["attendanceRecords"],
            }
        )

    # -- subscriptions ------------------------------------------------------------------------
    def _expiration(self, value: Any) -> datetime:
        if not isinstance(value, str):
            raise GraphError(400, "ValidationError", "expirationDateTime is required.")
        try:
            when = parse_time(value)
        except ValueError as exc:
            raise GraphError(400, "ValidationError", str(exc)) from exc
        now = self.sb.clock.now()
        if when <= now:
            raise GraphError(
                400, "ValidationError", "Subscription expiration must be in the future."
            )
        if when > now + timedelta(minutes=MAX_SUBSCRIPTION_MINUTES):
            raise GraphError(
                400,
                "ValidationError",
                f"Subscription expiration can only be {MAX_SUBSCRIPTION_MINUTES} minutes in "
                "the future.",
            )
        return when

    async def _validate_endpoint(self, url: str) -> None:
        token = (
            "Validation: Testing client application reachability for subscription Request-Id: "
            + str(uuid.uuid4())
        )
        sep = "&" if urlsplit(url).query else "?"
        target = url + sep + urlencode({"validationToken": token})
        failure = GraphError(
            400,
            "ValidationError",
            "Subscription validation request failed. Notification endpoint must respond with "
            "200 OK to validation request.",
        )
        try:
            status, ctype, text = await self.sb.notifier.post(
                target,
                b"",
                {"Content-Type": "text/plain; charset=utf-8"},
                self.sb.config.validation_timeout_s,
            )
        except TimeoutError as exc:
            raise GraphError(
                400, "ValidationError", "Subscription validation request timed out."
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise failure from exc
        if status != 200 or text != token or ctype != "text/plain":
            raise failure

    async def create_subscription(self, request: web.Request) -> web.Response:
        try:
            claims = self._claims(request, MEETING_ROLES)
            try:
                body = await request.json()
            except ValueError as exc:
                raise GraphError(400, "BadRequest", "Invalid JSON body.") from exc
            change_type = str(body.get("changeType") or "")
            if not change_type:
                raise GraphError(400, "ValidationError", "changeType is required.")
            url = str(body.get("notificationUrl") or "")
            if urlsplit(url).scheme.lower() != "https":
                raise GraphError(
                    400,
                    "ValidationError",
                    "The notification URL must use the HTTPS scheme.",
                )
            lifecycle = body.get("lifecycleNotificationUrl")
            if lifecycle and urlsplit(str(lifecycle)).scheme.lower() != "https":
                raise GraphError(400, "ValidationError", "lifecycleNotificationUrl must use HTTPS.")
            resource = str(body.get("resource") or "")
            match = RESOURCE_RE.match(resource)
            if not match:
                raise GraphError(400, "InvalidRequest", f"Resource '{resource}' is not supported.")
            meeting = self.meetings.find_by_join_url(unquote(match["url"]))
            if meeting is None or meeting.organizer.tenant_id != claims.get("tid"):
                raise GraphError(404, "NotFound", "The online meeting was not found.")
            expiration = self._expiration(body.get("expirationDateTime"))
            client_state = body.get("clientState")
            if client_state is not None and len(str(client_state)) > 128:
                raise GraphError(400, "ValidationError", "clientState is limited to 128 chars.")
            await self._validate_endpoint(url)
        except GraphError as exc:
            return self._fail(request, exc)
        sub = Subscription(
            id=str(uuid.uuid4()),
            resource=resource,
            meeting_id=meeting.id,
            change_type=change_type,
            notification_url=url,
            client_state=None if client_state is None else str(client_state),
            expiration=expiration,
            tenant_id=str(claims["tid"]),
            app_id=str(claims.get("appid")),
            lifecycle_url=str(lifecycle) if lifecycle else None,
        )
        self.subscriptions[sub.id] = sub
        data = {"@odata.context": self._ctx("subscriptions/$entity"), **sub.graph_json()}
        return web.json_response(data, status=201)

    def _subscription(self, claims: dict[str, Any], sub_id: str) -> Subscription:
        sub = self.subscriptions.get(sub_id)
        if sub is None or sub.app_id != claims.get("appid") or sub.tenant_id != claims.get("tid"):
            raise GraphError(404, "ResourceNotFound", f"The object '{sub_id}' was not found.")
        return sub

    async def get_subscription(self, request: web.Request) -> web.Response:
        try:
            claims = self._claims(request, MEETING_ROLES)
            sub = self._subscription(claims, request.match_info["id"])
        except GraphError as exc:
            return self._fail(request, exc)
        return web.json_response(sub.graph_json())

    async def list_subscriptions(self, request: web.Request) -> web.Response:
        try:
            claims = self._claims(request, MEETING_ROLES)
        except GraphError as exc:
            return self._fail(request, exc)
        subs = [
            s.graph_json()
            for s in self.subscriptions.values()
            if s.app_id == claims.get("appid") and s.tenant_id == claims.get("tid")
        ]
        return web.json_response({"@odata.context": self._ctx("subscriptions"), "value": subs})

    async def update_subscription(self, request: web.Request) -> web.Response:
        try:
            claims = self._claims(request, MEETING_ROLES)
            sub = self._subscription(claims, request.match_info["id"])
            body = await request.json()
            if sub.expiration <= self.sb.clock.now():
                raise GraphError(404, "ResourceNotFound", "The subscription has expired.")
            sub.expiration = self._expiration(body.get("expirationDateTime"))
        except GraphError as exc:
            return self._fail(request, exc)
        return web.json_response(sub.graph_json())

    async def delete_subscription(self, request: web.Request) -> web.Response:
        try:
            claims = self._claims(request, MEETING_ROLES)
            sub = self._subscription(claims, request.match_info["id"])
        except GraphError as exc:
            return self._fail(request, exc)
        del self.subscriptions[sub.id]
        return web.Response(status=204)

    # -- change notifications -----------------------------------------------------------------
    def _on_call_event(
        self,
        meeting: Meeting,
        event: str,
        at: datetime,
        joined: list[Participant],
        exited: list[Participant],
    ) -> None:
        for sub in list(self.subscriptions.values()):
            if sub.meeting_id != meeting.id or sub.expiration <= at:
                continue
            enc = quote(meeting.join_web_url, safe="")
            resource = f"communications/onlineMeetings(joinWebUrl='{enc}')/meetingCallEvents"
            data: dict[str, Any] = {
                "@odata.type": "#Microsoft.Graph.onlineMeeting",
                "@odata.id": resource,
                "id": resource,
                "eventType": event,
                "eventDateTime": graph_time(at),
                "callId": meeting.call.id if meeting.call else None,
            }
            if joined or event.endswith("CallRosterUpdate"):
                data["activeParticipants@joined"] = [p.roster_entry() for p in joined]
                data["activeParticipants@exited"] = [p.roster_entry() for p in exited]
            note = {
                "subscriptionId": sub.id,
                "clientState": sub.client_state,
                "changeType": sub.change_type.split(",")[0],
                "resource": resource,
                "subscriptionExpirationDateTime": graph_time(sub.expiration),
                "resourceData": data,
                "tenantId": sub.tenant_id,
            }
            self.sb.notifier.enqueue(f"graph:{sub.id}", sub.notification_url, {"value": [note]})

    def register(self, router: web.UrlDispatcher) -> None:
        base = "/v1.0/users/{user}/onlineMeetings"
        router.add_post(base + "/createOrGet", self.create_or_get)
        router.add_get(base + "/{meeting}", self.get_meeting)
        router.add_patch(base + "/{meeting}", self.update_meeting)
        router.add_get(
            base + "/{meeting}/getVirtualAppointmentJoinWebUrl", self.virtual_appointment_url
        )
        router.add_get(base + "/{meeting}/attendanceReports", self.list_reports)
        router.add_get(base + "/{meeting}/attendanceReports/{report}", self.get_report)
        router.add_get(
            base + "/{meeting}/attendanceReports/{report}/attendanceRecords", self.list_records
        )
        router.add_post("/v1.0/subscriptions", self.create_subscription)
        router.add_get("/v1.0/subscriptions", self.list_subscriptions)
        router.add_get("/v1.0/subscriptions/{id}", self.get_subscription)
        router.add_patch("/v1.0/subscriptions/{id}", self.update_subscription)
        router.add_delete("/v1.0/subscriptions/{id}", self.delete_subscription)
