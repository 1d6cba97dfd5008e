"""Microsoft Graph, app-only: online meetings, the patient's browser-join URL, call-event
subscriptions and attendance reports. The token comes from the real msal library, run off
the event loop (msal is synchronous) and cached per Microsoft 365 tenant."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
import requests
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from libs.common.entra import confidential_client
from services.launch.outbound import OutboundError, read_json
from services.launch.settings import LaunchSettings

GRAPH_SCOPE = ["https://graph.microsoft.com/.default"]
# An app token is reused until this long before it expires; msal would refresh it then too.
TOKEN_REFRESH_MARGIN_S = 300


class GraphError(Exception):
    """Graph refused or failed; the message is safe to log and show."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


# What Graph answers is stored in Postgres text columns and sent on in URLs and redirects.
# Postgres text holds no NUL, and a lone surrogate is not UTF-8; no id or URL of Graph's has
# a control character at all (joinWebUrl %-encodes its JSON context). Ids are base64 (meeting)
# or a GUID (subscription); the longest real URLs are a few hundred characters.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_URL_REFUSED = re.compile(r"[\x00-\x20\x7f-\x9f\ud800-\udfff]")  # the above and a space
MAX_URL_CHARS = 2048


def _plain(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("holds a control character")
    return value


def _https_url(value: str) -> str:
    if _URL_REFUSED.search(value):
        raise ValueError("holds a control character or a space")
    if not value.startswith("https://") or not urlsplit(value).hostname:
        raise ValueError("is not an https URL")
    return value


GraphId = Annotated[str, AfterValidator(_plain)]
GraphUrl = Annotated[str, Field(max_length=MAX_URL_CHARS), AfterValidator(_https_url)]


class OnlineMeeting(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    # Stored in meeting_id, whose unique index takes at most 2,704 bytes an entry.
    id: GraphId = Field(min_length=1, max_length=512)
    joinWebUrl: GraphUrl  # noqa: N815 - Graph's name
    externalId: str | None = Field(default=None, max_length=256)  # noqa: N815
    startDateTime: datetime | None = None  # noqa: N815
    endDateTime: datetime | None = None  # noqa: N815


class Subscription(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    id: GraphId = Field(min_length=1, max_length=256)
    expirationDateTime: datetime  # noqa: N815


class _JoinWebUrl(BaseModel):
    """getVirtualAppointmentJoinWebUrl's answer: `{"value": url}`."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    value: GraphUrl


def _graph_time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class GraphClient:
    def __init__(self, http: aiohttp.ClientSession, settings: LaunchSettings) -> None:
        self._http = http
        self._settings = settings
        self._base = settings.graph_base_url.rstrip("/") + "/v1.0"
        self._apps: dict[str, Any] = {}
        # Per Microsoft 365 tenant: (token, monotonic time to stop using it). Asking msal
        # for every call cost a thread hand-off and a cache search, three times per launch.
        self._tokens: dict[str, tuple[str, float]] = {}

    def _acquire(self, ms_tenant_id: str) -> tuple[str, float | None]:
        app = self._apps.get(ms_tenant_id)
        if app is None:
            app = confidential_client(
                self._settings.entra_client_id,
                self._settings.entra_client_secret,
                f"{self._settings.entra_authority_host.rstrip('/')}/{ms_tenant_id}",
                ca_bundle=self._settings.tls_ca_bundle,
                timeout_s=self._settings.external_call_timeout_s,
            )
            self._apps[ms_tenant_id] = app
        # msal serves from its token cache until the token nears expiry.
        result = app.acquire_token_for_client(scopes=GRAPH_SCOPE)
        if "access_token" not in result:
            raise GraphError(f"Entra ID refused the app token ({result.get('error')}).")
        expires_in = result.get("expires_in")
        return str(result["access_token"]), (
            float(expires_in) if isinstance(expires_in, int | float) else None
        )

    async def _token(self, ms_tenant_id: str) -> str:
        cached = self._tokens.get(ms_tenant_id)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        asked = time.monotonic()
        try:
            token, expires_in = await asyncio.to_thread(self._acquire, ms_tenant_id)
        except (requests.RequestException, ValueError) as exc:
            raise GraphError(f"Entra ID is unreachable ({type(exc).__name__}).") from None
        if expires_in is not None and expires_in > TOKEN_REFRESH_MARGIN_S:
            self._tokens[ms_tenant_id] = (token, asked + expires_in - TOKEN_REFRESH_MARGIN_S)
        return token

    async def _call(
        self, method: str, ms_tenant_id: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {await self._token(ms_tenant_id)}"}
        try:
            async with self._http.request(
                method, self._base + path, json=body, headers=headers, allow_redirects=False
            ) as response:
                payload = await read_json(response) if response.status != 204 else None
                if response.status >= 400:
                    code = (
                        payload.get("error", {}).get("code") if isinstance(payload, dict) else None
                    )
                    raise GraphError(f"Graph answered {response.status} ({code})", response.status)
                return response.status, payload
        except (aiohttp.ClientError, TimeoutError, OutboundError) as exc:
            raise GraphError(f"Graph is unreachable ({type(exc).__name__}).") from None

    async def create_or_get_meeting(
        self,
        ms_tenant_id: str,
        organizer_id: str,
        *,
        external_id: str,
        starts_at: datetime,
        ends_at: datetime,
        subject: str,
    ) -> tuple[OnlineMeeting, bool]:
        """Idempotent by externalId: 201 created, 200 found."""
        status, payload = await self._call(
            "POST",
            ms_tenant_id,
            f"/users/{quote(organizer_id, safe='')}/onlineMeetings/createOrGet",
            {
                "externalId": external_id,
                "startDateTime": _graph_time(starts_at),
                "endDateTime": _graph_time(ends_at),
                "subject": subject,
                "participants": {"attendees": []},
                # Everyone but the organizer waits in the lobby until admitted.
                "lobbyBypassSettings": {"scope": "organizer", "isDialInBypassEnabled": False},
            },
        )
        return _model(OnlineMeeting, payload), status == 201

    async def update_meeting_times(
        self,
        ms_tenant_id: str,
        organizer_id: str,
        meeting_id: str,
        *,
        starts_at: datetime,
        ends_at: datetime,
    ) -> OnlineMeeting:
        """Moves a meeting (`PATCH .../onlineMeetings/{id}`, application permission
        OnlineMeetings.ReadWrite.All under an application access policy). Graph takes the
        two times together and answers 200 with the updated meeting; setting the same times
        again changes nothing, so a repeat is safe."""
        _, payload = await self._call(
            "PATCH",
            ms_tenant_id,
            f"/users/{quote(organizer_id, safe='')}/onlineMeetings/{quote(meeting_id, safe='')}",
            {"startDateTime": _graph_time(starts_at), "endDateTime": _graph_time(ends_at)},
        )
        return _model(OnlineMeeting, payload)

    async def patient_join_url(self, ms_tenant_id: str, organizer_id: str, meeting_id: str) -> str:
        _, payload = await self._call(
            "GET",
            ms_tenant_id,
            f"/users/{quote(organizer_id, safe='')}/onlineMeetings/{quote(meeting_id, safe='')}"
            "/getVirtualAppointmentJoinWebUrl",
        )
        try:
            return _JoinWebUrl.model_validate(payload).value
        except ValidationError:
            raise GraphError("Graph returned no usable browser-join URL.") from None

    async def subscribe_call_events(
        self,
        ms_tenant_id: str,
        join_web_url: str,
        *,
        notification_url: str,
        client_state: str,
        expires_at: datetime,
    ) -> Subscription:
        resource = (
            "/communications/onlineMeetings(joinWebUrl='"
            + quote(join_web_url, safe="")
            + "')/meetingCallEvents"
        )
        _, payload = await self._call(
            "POST",
            ms_tenant_id,
            "/subscriptions",
            {
                "changeType": "updated",
                "notificationUrl": notification_url,
                "resource": resource,
                "clientState": client_state,
                "expirationDateTime": _graph_time(expires_at),
            },
        )
        return _model(Subscription, payload)

    async def renew_subscription(
        self, ms_tenant_id: str, subscription_id: str, expires_at: datetime
    ) -> Subscription:
        _, payload = await self._call(
            "PATCH",
            ms_tenant_id,
            f"/subscriptions/{quote(subscription_id, safe='')}",
            {"expirationDateTime": _graph_time(expires_at)},
        )
        return _model(Subscription, payload)

    async def delete_subscription(self, ms_tenant_id: str, subscription_id: str) -> None:
        """Ends a change-notification subscription at once (Graph answers 204)."""
        await self._call(
            "DELETE", ms_tenant_id, f"/subscriptions/{quote(subscription_id, safe='')}"
        )

    async def attendance_reports(
        self, ms_tenant_id: str, organizer_id: str, meeting_id: str
    ) -> list[dict[str, Any]]:
        base = (
            f"/users/{quote(organizer_id, safe='')}/onlineMeetings/{quote(meeting_id, safe='')}"
            "/attendanceReports"
        )
        _, listing = await self._call("GET", ms_tenant_id, base)
        reports = []
        for summary in (listing or {}).get("value", [])[:20]:
            report_id = quote(str(summary.get("id", "")), safe="")
            _, records = await self._call(
                "GET", ms_tenant_id, f"{base}/{report_id}/attendanceRecords"
            )
            reports.append({**summary, "attendanceRecords": (records or {}).get("value", [])})
        return reports


M = TypeVar("M", bound=BaseModel)


def _model(model: type[M], payload: Any) -> M:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        # The fields refused, never their values: those are meeting links and ids.
        fields = ", ".join(sorted({".".join(map(str, e["loc"])) or "body" for e in exc.errors()}))
        raise GraphError(
            f"Graph's {model.__name__} answer is not what we expect ({fields})."
        ) from None
