"""Sign-in for the admin portals (config, analytics) with Microsoft Entra ID.

The authorization-code flow with PKCE runs through the real `msal` library (off the event
loop: msal is synchronous). The id_token is then validated here against the tenant's JWKS,
because msal only decodes it. Sessions are server-side; the cookie holds a random token whose
SHA-256 is the session key. Roles come from the `wids` claim (directory role template ids).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal

import aiohttp
import jwt
import orjson
import structlog
from aiohttp import web
from pydantic import Field, SecretStr

from libs.common.entra import confidential_client
from libs.common.settings import ServiceSettings
from libs.common.web import DB_POOL, SETTINGS, read_form

log = structlog.get_logger(__name__)

PORTAL_MIGRATIONS = ("portal", Path(__file__).parent / "portal_migrations")
SESSION_COOKIE = "portal_session"
SIGN_IN_COOKIE = "portal_sign_in"

GLOBAL_ADMINISTRATOR = "62e90394-69f5-4237-9190-012177145e10"
GLOBAL_READER = "f2ef992c-3afb-46b9-b7cf-a126ee74c451"
REPORTS_READER = "4a5d8f65-41da-4de4-8968-e035b65339cf"
ROLE_BY_WID = {
    GLOBAL_ADMINISTRATOR: "global_admin",
    GLOBAL_READER: "global_reader",
    REPORTS_READER: "reports_reader",
}
Permission = Literal["view_config", "edit_config", "view_reports"]
GRANTS: dict[str, frozenset[Permission]] = {
    "global_admin": frozenset({"view_config", "edit_config", "view_reports"}),
    "global_reader": frozenset({"view_config", "view_reports"}),
    "reports_reader": frozenset({"view_reports"}),
}
_TENANT_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class PortalSettings(ServiceSettings):
    service_name: ClassVar[str] = "portal"

    entra_authority_host: str = "https://127.0.0.1:9443"
    entra_client_id: str = "6f1c2d3e-4b5a-4c7d-8e9f-a0b1c2d3e4f5"
    entra_client_secret: SecretStr = SecretStr("sandbox-connector-secret")
    portal_session_ttl_s: int = Field(default=8 * 3600, ge=300)

    @property
    def redirect_uri(self) -> str:
        return f"{self.public_base_url.rstrip('/')}/auth/callback"


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    user_oid: str
    upn: str
    roles: frozenset[str]
    csrf_token: str

    def can(self, need: Permission) -> bool:
        return any(need in GRANTS.get(role, frozenset()) for role in self.roles)


class SignInError(Exception):
    """The sign-in could not be completed; the message is safe to show."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _settings(request: web.Request) -> PortalSettings:
    settings = request.app[SETTINGS]
    assert isinstance(settings, PortalSettings)
    return settings


class EntraSignIn:
    """msal for the flow, pyjwt and the tenant's JWKS for the id_token."""

    def __init__(self, settings: PortalSettings) -> None:
        self._settings = settings
        self._host = settings.entra_authority_host.rstrip("/")
        self._msal: Any = None
        self._jwks: dict[str, tuple[float, dict[str, Any]]] = {}

    def _client(self) -> Any:
        # Built on first use (in a worker thread): msal reads the authority's discovery
        # document when constructed, and the portal must start even if Entra is unreachable.
        if self._msal is None:
            self._msal = confidential_client(
                self._settings.entra_client_id,
                self._settings.entra_client_secret,
                f"{self._host}/organizations",
                ca_bundle=self._settings.tls_ca_bundle,
                timeout_s=self._settings.external_call_timeout_s,
            )
        return self._msal

    def _begin(self, login_hint: str | None) -> dict[str, Any]:
        flow: dict[str, Any] = self._client().initiate_auth_code_flow(
            scopes=["User.Read"], redirect_uri=self._settings.redirect_uri, login_hint=login_hint
        )
        return flow

    def _complete(self, flow: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        result: dict[str, Any] = self._client().acquire_token_by_auth_code_flow(flow, params)
        return result

    async def begin(self, login_hint: str | None) -> dict[str, Any]:
        return await asyncio.to_thread(self._begin, login_hint)

    async def complete(self, flow: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        try:
            result = await asyncio.to_thread(self._complete, flow, params)
        except ValueError:
            # msal refuses an answer that does not fit the flow (state mismatch, neither code
            # nor error). Its message carries the state, so only the fact is logged.
            log.warning("entra sign-in answer refused by msal")
            raise SignInError("This sign-in answer cannot be used. Sign in again.") from None
        if "error" in result:
            log.warning("entra sign-in refused", error=result.get("error"))
            raise SignInError(f"Microsoft sign-in failed: {result.get('error')}")
        return await self.validate_id_token(str(result.get("id_token", "")), flow.get("nonce"))

    async def validate_id_token(self, id_token: str, nonce: str | None) -> dict[str, Any]:
        try:
            unverified = jwt.decode(id_token, options={"verify_signature": False})
            kid = jwt.get_unverified_header(id_token).get("kid", "")
        except jwt.PyJWTError:
            raise SignInError("The sign-in token is malformed.") from None
        tenant_id = str(unverified.get("tid", ""))
        if not _TENANT_ID.match(tenant_id):
            raise SignInError("The sign-in token names no valid tenant.")
        key = await self._signing_key(tenant_id, kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key,
                algorithms=["RS256"],
                audience=self._settings.entra_client_id,
                issuer=f"{self._host}/{tenant_id}/v2.0",
                options={"require": ["exp", "iat", "iss", "aud", "tid", "oid"]},
                leeway=60,
            )
        except jwt.PyJWTError as exc:
            raise SignInError(f"The sign-in token is not valid: {type(exc).__name__}.") from None
        # msal keeps the raw nonce in the flow and sends its SHA-256 hex to the authority.
        expected = hashlib.sha256(nonce.encode()).hexdigest() if nonce else ""
        if not expected or not hmac.compare_digest(str(claims.get("nonce", "")), expected):
            raise SignInError("The sign-in token does not belong to this sign-in.")
        return claims

    async def _signing_key(self, tenant_id: str, kid: str) -> Any:
        for refresh in (False, True):
            keys = await self._tenant_jwks(tenant_id, refresh)
            for jwk in keys.get("keys", []):
                if jwk.get("kid") == kid:
                    return jwt.PyJWK(jwk).key
        raise SignInError("The sign-in token was signed by an unknown key.")

    async def _tenant_jwks(self, tenant_id: str, refresh: bool) -> dict[str, Any]:
        cached = self._jwks.get(tenant_id)
        if cached and not refresh and cached[0] > time.monotonic():
            return cached[1]
        timeout = aiohttp.ClientTimeout(total=self._settings.external_call_timeout_s)
        ssl_context = self._settings.ssl_context()
        async with aiohttp.ClientSession(timeout=timeout) as http:
            discovery_url = f"{self._host}/{tenant_id}/v2.0/.well-known/openid-configuration"
            async with http.get(discovery_url, ssl=ssl_context) as response:
                response.raise_for_status()
                jwks_uri = str((await response.json()).get("jwks_uri", ""))
            # Only ever fetch keys from the configured authority host.
            if not jwks_uri.startswith(self._host + "/"):
                raise SignInError("The tenant's key location is not on the configured authority.")
            async with http.get(jwks_uri, ssl=ssl_context) as response:
                response.raise_for_status()
                keys: dict[str, Any] = await response.json()
        self._jwks[tenant_id] = (time.monotonic() + 3600, keys)
        return keys


ENTRA = web.AppKey("entra_sign_in", EntraSignIn)


_LOCAL_PATH = re.compile(r"/(?![/\\])[\x21-\x5b\x5d-\x7e]{0,2047}")


def _safe_return_to(value: str | None) -> str:
    # Only local paths: anything else would make the portal an open redirect. Printable
    # ASCII only: browsers (and yarl, building the Location) drop tabs and newlines, so
    # "/\t/evil.example" would arrive as "//evil.example", another site.
    if value and _LOCAL_PATH.fullmatch(value):
        return value
    return "/"


# Anyone may start a sign-in, and a started one that is never completed (or a session never
# logged out) would otherwise stay for good. Each new row takes up to 100 expired ones with it,
# so the tables stay as large as their live rows however many requests arrive; SKIP LOCKED
# keeps concurrent sign-ins from waiting on each other's sweep.
_NEW_SIGN_IN = (
    "WITH expired AS (DELETE FROM portal_sign_ins WHERE state_hash IN (SELECT state_hash"
    " FROM portal_sign_ins WHERE expires_at <= now() ORDER BY expires_at LIMIT 100"
    " FOR UPDATE SKIP LOCKED))"
    " INSERT INTO portal_sign_ins (state_hash, flow, return_to, expires_at)"
    " VALUES ($1, $2, $3, now() + interval '10 minutes')"
)
_NEW_SESSION = (
    "WITH expired AS (DELETE FROM portal_sessions WHERE token_hash IN (SELECT token_hash"
    " FROM portal_sessions WHERE expires_at <= now() ORDER BY expires_at LIMIT 100"
    " FOR UPDATE SKIP LOCKED))"
    " INSERT INTO portal_sessions (token_hash, tenant_id, user_oid, upn, roles, csrf_token,"
    " expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
)


async def login(request: web.Request) -> web.Response:
    settings = _settings(request)
    hint = request.query.get("login_hint")
    if hint is not None and (len(hint) > 256 or not re.fullmatch(r"[^\s<>\"']+", hint)):
        raise web.HTTPBadRequest(text="login_hint is not a valid account name")
    flow = await request.app[ENTRA].begin(hint)
    binding = secrets.token_urlsafe(32)
    flow["binding"] = hashlib.sha256(binding.encode()).hexdigest()
    sealed = settings.field_cipher().encrypt(orjson.dumps(flow).decode(), "portal-sign-in")
    await request.app[DB_POOL].execute(
        _NEW_SIGN_IN,
        _digest(flow["state"]),
        sealed,
        _safe_return_to(request.query.get("return_to")),
    )
    response = web.HTTPFound(flow["auth_uri"])
    # Ties the callback to this browser: a sign-in started elsewhere cannot be completed here.
    response.set_cookie(
        SIGN_IN_COOKIE, binding, max_age=600, httponly=True, secure=True, samesite="Lax"
    )
    raise response


_CALLBACK_PARAMS = ("code", "state", "error", "error_description", "session_state", "client_info")


async def callback(request: web.Request) -> web.Response:
    settings = _settings(request)
    # One value per parameter: the state looked up here must be the one msal checks.
    if any(len(request.query.getall(k, ())) > 1 for k in _CALLBACK_PARAMS):
        return error_page(400, "This sign-in answer repeats a parameter. Sign in again.")
    params = {k: v for k in _CALLBACK_PARAMS if (v := request.query.get(k)) is not None}
    if not params.get("code") and not params.get("error"):
        return error_page(400, "This sign-in answer has no result from Microsoft. Sign in again.")
    state = params.get("state", "")
    row = await request.app[DB_POOL].fetchrow(
        "DELETE FROM portal_sign_ins WHERE state_hash = $1 AND expires_at > now()"
        " RETURNING flow, return_to",
        _digest(state),
    )
    if row is None:
        return error_page(400, "This sign-in link has expired or was already used. Sign in again.")
    flow = orjson.loads(settings.field_cipher().decrypt(row["flow"], "portal-sign-in"))
    binding = request.cookies.get(SIGN_IN_COOKIE, "")
    expected = str(flow.pop("binding", ""))
    # A cookie that is not UTF-8 arrives with surrogates, which do not encode.
    if not binding.isascii() or not hmac.compare_digest(
        hashlib.sha256(binding.encode()).hexdigest(), expected
    ):
        return error_page(400, "This sign-in was started in another browser. Sign in again.")
    try:
        claims = await request.app[ENTRA].complete(flow, params)
    except SignInError as exc:
        return error_page(400, str(exc))
    roles = sorted({ROLE_BY_WID[w] for w in claims.get("wids", []) if w in ROLE_BY_WID})
    upn = str(claims.get("preferred_username") or claims.get("upn") or "")
    if not roles:
        log.info("portal sign-in without an admin role", tenant_id=claims["tid"])
        return error_page(
            403,
            f"{upn} is signed in, but only a Global Administrator can configure the connector"
            " (Global Reader and Reports Reader may view). Ask your Microsoft 365 administrator.",
        )
    token = secrets.token_urlsafe(32)
    await request.app[DB_POOL].execute(
        _NEW_SESSION,
        _digest(token),
        str(claims["tid"]),
        str(claims["oid"]),
        upn,
        roles,
        secrets.token_urlsafe(32),
        datetime.now(UTC) + timedelta(seconds=settings.portal_session_ttl_s),
    )
    log.info("portal sign-in", tenant_id=claims["tid"], roles=roles)
    response = web.HTTPFound(row["return_to"])
    response.del_cookie(SIGN_IN_COOKIE)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=settings.portal_session_ttl_s,
        httponly=True,
        secure=True,
        samesite="Lax",
    )
    raise response


async def logout(request: web.Request) -> web.Response:
    principal = await require_principal(request, None)
    verify_csrf(request, principal, (await read_form(request)).get("csrf_token"))
    await request.app[DB_POOL].execute(
        "DELETE FROM portal_sessions WHERE token_hash = $1",
        _digest(request.cookies.get(SESSION_COOKIE, "")),
    )
    response = web.HTTPFound("/")
    response.del_cookie(SESSION_COOKIE)
    raise response


async def current_principal(request: web.Request) -> Principal | None:
    token = request.cookies.get(SESSION_COOKIE)
    # Our tokens are URL-safe ASCII; a cookie that is not UTF-8 arrives with surrogates.
    if not token or len(token) > 128 or not token.isascii():
        return None
    row = await request.app[DB_POOL].fetchrow(
        "SELECT tenant_id, user_oid, upn, roles, csrf_token FROM portal_sessions"
        " WHERE token_hash = $1 AND expires_at > now()",
        _digest(token),
    )
    if row is None:
        return None
    return Principal(
        row["tenant_id"], row["user_oid"], row["upn"], frozenset(row["roles"]), row["csrf_token"]
    )


def _wants_html(request: web.Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("Accept", "")


async def require_principal(request: web.Request, need: Permission | None) -> Principal:
    """The signed-in principal, or the right refusal: sign-in redirect or 401 when signed
    out, 403 when the role lacks the permission."""
    principal = await current_principal(request)
    if principal is None:
        if _wants_html(request):
            raise web.HTTPFound(f"/auth/login?return_to={request.rel_url.path}")
        raise web.HTTPUnauthorized(
            text='{"error": "sign in required"}', content_type="application/json"
        )
    if need is not None and not principal.can(need):
        log.info("portal permission denied", need=need, tenant_id=principal.tenant_id)
        raise forbidden(
            request,
            "Your role does not allow this. Only a Global Administrator can change configuration.",
        )
    return principal


def forbidden(request: web.Request, message: str) -> web.HTTPForbidden:
    if _wants_html(request):
        page = error_page(403, message)
        return web.HTTPForbidden(text=page.text, content_type="text/html")
    return web.HTTPForbidden(
        text=orjson.dumps({"error": message}).decode(), content_type="application/json"
    )


def verify_csrf(request: web.Request, principal: Principal, form_value: object = None) -> None:
    """State-changing requests carry the session's CSRF token, in a form field or header."""
    presented = request.headers.get("X-CSRF-Token") or (
        form_value if isinstance(form_value, str) else ""
    )
    # compare_digest refuses non-ASCII text: such a token was never issued.
    if (
        not presented
        or not presented.isascii()
        or not hmac.compare_digest(presented, principal.csrf_token)
    ):
        raise forbidden(
            request,
            "The form's security token is missing or out of date. Reload the page and try again.",
        )


def error_page(status: int, message: str) -> web.Response:
    body = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<title>Teams EHR connector</title><style>body{font-family:system-ui,sans-serif;"
        "max-width:40em;margin:4em auto;color:#242424}h1{font-size:1.3em}</style></head>"
        f"<body><h1>{'Access denied' if status == 403 else 'Something is not right'}</h1>"
        f"<p>{html.escape(message)}</p><p><a href='/'>Back to the start</a></p></body></html>"
    )
    return web.Response(status=status, text=body, content_type="text/html")


async def session_info(request: web.Request) -> web.Response:
    """Who is signed in, and the CSRF token scripts send in X-CSRF-Token."""
    principal = await require_principal(request, None)
    return web.json_response(
        {
            "tenant_id": principal.tenant_id,
            "upn": principal.upn,
            "roles": sorted(principal.roles),
            "csrf_token": principal.csrf_token,
        },
        headers={"Cache-Control": "no-store"},
    )


def add_portal_auth(app: web.Application) -> None:
    """Routes and state for sign-in; the app must include PORTAL_MIGRATIONS."""

    settings = app[SETTINGS]
    assert isinstance(settings, PortalSettings)
    app[ENTRA] = EntraSignIn(settings)
    app.router.add_get("/auth/login", login)
    app.router.add_get("/auth/callback", callback)
    app.router.add_post("/auth/logout", logout)
    app.router.add_get("/auth/session", session_info)
