"""SMART on FHIR authorization server modelled on Cerner's (authorize, token, discovery, JWKS)."""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from aiohttp import web

from sandbox.ehr.app_keys import SANDBOX
from sandbox.ehr.client_auth import OAuthError, authenticate_client
from sandbox.ehr.keys import jwks
from sandbox.ehr.state import PERSONAS, SMART_PATH, AuthCode, Grant, Launch, Sandbox, TenantState

FHIR_TYPES = ("Patient", "Practitioner", "Encounter", "Appointment", "Location")
# Types with a patient compartment: patient/<Type>.read confines a token to its patient.
PATIENT_TYPES = ("Patient", "Encounter", "Appointment")
SUPPORTED_SCOPES = [
    "launch",
    "openid",
    "fhirUser",
    "profile",
    "online_access",
    "offline_access",
    *[f"user/{t}.read" for t in FHIR_TYPES],
    "user/Appointment.write",
    *[f"patient/{t}.read" for t in PATIENT_TYPES],
]
CAPABILITIES = [
    "launch-ehr",
    "client-public",
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "context-ehr-patient",
    "context-ehr-encounter",
    "context-banner",
    "context-style",
    "sso-openid-connect",
    "permission-user",
    "permission-patient",
    "permission-offline",
    "permission-v1",
]
PKCE_RE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def tenant_or_404(request: web.Request) -> TenantState:
    tenant = request.app[SANDBOX].tenant(request.match_info["tenant"])
    if tenant is None:
        raise web.HTTPNotFound(text="unknown tenant")
    return tenant


def smart_configuration(tenant: TenantState) -> dict[str, Any]:
    return {
        "issuer": tenant.issuer,
        "jwks_uri": tenant.jwks_url,
        "authorization_endpoint": tenant.authorize_url,
        "token_endpoint": tenant.token_url,
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "private_key_jwt",
            "none",
        ],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "response_types_supported": ["code"],
        "scopes_supported": SUPPORTED_SCOPES,
        "code_challenge_methods_supported": ["S256"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "capabilities": CAPABILITIES,
    }


async def smart_config_handler(request: web.Request) -> web.Response:
    return web.json_response(smart_configuration(tenant_or_404(request)))


async def openid_config_handler(request: web.Request) -> web.Response:
    tenant = tenant_or_404(request)
    return web.json_response(
        {
            "issuer": tenant.issuer,
            "jwks_uri": tenant.jwks_url,
            "authorization_endpoint": tenant.authorize_url,
            "token_endpoint": tenant.token_url,
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": SUPPORTED_SCOPES,
        }
    )


async def jwks_handler(request: web.Request) -> web.Response:
    return web.json_response(jwks([tenant_or_404(request).signing_key]))


# --- authorize ------------------------------------------------------------------------------


def add_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&{urlencode(params)}" if parts.query else urlencode(params)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def error_page(message: str) -> web.Response:
    body = (
        "<!doctype html><html><head><title>Authorization error</title></head><body>"
        f"<h1>Authorization error</h1><p>{html.escape(message)}</p></body></html>"
    )
    return web.Response(status=400, text=body, content_type="text/html")


class _Redirect(Exception):
    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


def _validate_authorize(
    tenant: TenantState, q: dict[str, str], allowed: list[str] | None, now: float, persona: str
) -> tuple[list[str], Launch]:
    if q.get("response_type") != "code":
        raise _Redirect("unsupported_response_type", "response_type must be code")
    if not q.get("state"):
        raise _Redirect("invalid_request", "state is required")
    aud = q.get("aud")
    if not aud:
        raise _Redirect("invalid_request", "aud is required")
    if aud != tenant.fhir_base:
        raise _Redirect("invalid_request", "aud does not identify this FHIR server")
    scopes = q.get("scope", "").split()
    if not scopes:
        raise _Redirect("invalid_scope", "scope is required")
    unknown = [s for s in scopes if s not in SUPPORTED_SCOPES]
    if unknown:
        raise _Redirect("invalid_scope", f"unsupported scope(s): {' '.join(unknown)}")
    if allowed is not None and any(s not in allowed for s in scopes):
        raise _Redirect("invalid_scope", "scope not granted to this client")
    if "launch" not in scopes:
        raise _Redirect("invalid_scope", "the launch scope is required for an EHR launch")
    launch_id = q.get("launch")
    if not launch_id:
        raise _Redirect("invalid_request", "launch is required")
    launch = tenant.launches.get(launch_id)
    if launch is None or launch.expires_at <= now:
        raise _Redirect("invalid_request", "launch is unknown or has expired")
    if launch.persona != persona:
        raise _Redirect("invalid_request", f"launch was not issued for the {persona} persona")
    if persona == "patient" and any(s.startswith("user/") for s in scopes):
        raise _Redirect("invalid_scope", "user scopes are not available to the patient persona")
    if any(s.startswith("patient/") for s in scopes) and not launch.patient:
        raise _Redirect("invalid_scope", "patient scopes need a patient in the launch context")
    challenge = q.get("code_challenge", "")
    if not challenge:
        raise _Redirect("invalid_request", "code_challenge is required (PKCE)")
    if q.get("code_challenge_method") != "S256":
        raise _Redirect("invalid_request", "code_challenge_method must be S256")
    if not re.fullmatch(r"[A-Za-z0-9_-]{43}", challenge):
        raise _Redirect("invalid_request", "code_challenge is not a base64url SHA-256 digest")
    return scopes, launch


async def authorize_handler(request: web.Request) -> web.Response:
    """Cerner has one authorize endpoint per persona: `provider` for clinicians launched from
    PowerChart, `patient` for patients launched from the patient portal."""
    tenant = tenant_or_404(request)
    persona = request.match_info["persona"]
    sandbox: Sandbox = request.app[SANDBOX]
    q = {k: v for k, v in request.query.items()}
    client = tenant.clients.get(q.get("client_id", ""))
    if client is None:
        return error_page("Unknown client_id for this tenant.")
    redirect_uri = q.get("redirect_uri", "")
    if redirect_uri not in client.redirect_uris:
        return error_page("redirect_uri is missing or not registered for this client.")
    now = sandbox.clock()
    state = q.get("state")
    try:
        scopes, launch = _validate_authorize(tenant, q, client.scopes, now, persona)
    except _Redirect as err:
        params = {"error": err.error, "error_description": err.description}
        if state:
            params["state"] = state
        raise web.HTTPFound(add_query(redirect_uri, params)) from None
    code = AuthCode(
        code=secrets.token_urlsafe(32),
        client_id=client.client_id,
        redirect_uri=redirect_uri,
        scopes=scopes,
        launch=launch,
        code_challenge=q["code_challenge"],
        nonce=q.get("nonce"),
        expires_at=now + sandbox.settings.code_ttl,
    )
    tenant.codes[code.code] = code
    raise web.HTTPFound(add_query(redirect_uri, {"code": code.code, "state": state or ""}))


# --- token ------------------------------------------------------------------------------------


def oauth_error(err: OAuthError) -> web.Response:
    headers = dict(NO_STORE)
    if err.basic_challenge:
        headers["WWW-Authenticate"] = 'Basic realm="token"'
    return web.json_response(
        {"error": err.error, "error_description": err.description},
        status=err.status,
        headers=headers,
    )


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _issue(
    sandbox: Sandbox, tenant: TenantState, grant_base: Grant, with_id_token: bool, nonce: str | None
) -> dict[str, Any]:
    now = sandbox.clock()
    ttl = sandbox.settings.access_token_ttl
    access = secrets.token_urlsafe(32)
    grant = Grant(
        client_id=grant_base.client_id,
        scopes=grant_base.scopes,
        launch=grant_base.launch,
        expires_at=now + ttl,
        code=grant_base.code,
    )
    tenant.access_tokens[access] = grant
    launch = grant.launch
    body: dict[str, Any] = {
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": ttl,
        "scope": " ".join(grant.scopes),
        "need_patient_banner": True,
        "smart_style_url": f"{tenant.origin}/_sandbox/smart-style.json",
        "tenant": tenant.guid,
    }
    if launch.persona == "provider":
        body["user"] = launch.practitioner
    if launch.patient:
        body["patient"] = launch.patient
    if launch.encounter:
        body["encounter"] = launch.encounter
    if with_id_token and "openid" in grant.scopes:
        # The patient persona's user is the patient: fhirUser is a Patient reference.
        kind, who = (
            ("Patient", launch.patient)
            if launch.persona == "patient"
            else ("Practitioner", launch.practitioner)
        )
        claims: dict[str, Any] = {
            "iss": tenant.issuer,
            "sub": who,
            "aud": grant.client_id,
            "iat": int(now),
            "exp": int(now) + ttl,
        }
        if nonce:
            claims["nonce"] = nonce
        if "fhirUser" in grant.scopes or "profile" in grant.scopes:
            claims["fhirUser"] = f"{tenant.fhir_base}/{kind}/{who}"
            person = tenant.data.get(kind, who or "")
            if person is not None:
                claims["name"] = person["name"][0]["text"]
        body["id_token"] = tenant.signing_key.sign(claims)
    return body


def _authorization_code(
    sandbox: Sandbox, tenant: TenantState, client_id: str, form: dict[str, str]
) -> dict[str, Any]:
    now = sandbox.clock()
    code_value = form.get("code")
    if not code_value:
        raise OAuthError("invalid_request", "code is required")
    code = tenant.codes.get(code_value)
    if code is None:
        raise OAuthError("invalid_grant", "authorization code is invalid")
    if code.used:
        for token in code.issued_tokens:  # RFC 6749 4.1.2: revoke what the code produced
            tenant.access_tokens.pop(token, None)
            tenant.refresh_tokens.pop(token, None)
        raise OAuthError("invalid_grant", "authorization code has already been used")
    if code.client_id != client_id:
        raise OAuthError("invalid_grant", "authorization code was issued to another client")
    code.used = True
    if code.expires_at <= now:
        raise OAuthError("invalid_grant", "authorization code has expired")
    if form.get("redirect_uri") != code.redirect_uri:
        raise OAuthError("invalid_grant", "redirect_uri does not match the authorize request")
    verifier = form.get("code_verifier", "")
    if not PKCE_RE.fullmatch(verifier) or not secrets.compare_digest(
        s256(verifier), code.code_challenge
    ):
        raise OAuthError("invalid_grant", "code_verifier does not match code_challenge")
    base = Grant(client_id, code.scopes, code.launch, 0, code=code.code)
    body = _issue(sandbox, tenant, base, True, code.nonce)
    code.issued_tokens.append(body["access_token"])
    if "online_access" in code.scopes or "offline_access" in code.scopes:
        refresh = secrets.token_urlsafe(32)
        tenant.refresh_tokens[refresh] = Grant(
            client_id,
            code.scopes,
            code.launch,
            now + sandbox.settings.refresh_token_ttl,
            code=code.code,
        )
        code.issued_tokens.append(refresh)
        body["refresh_token"] = refresh
    return body


def _refresh(
    sandbox: Sandbox, tenant: TenantState, client_id: str, form: dict[str, str]
) -> dict[str, Any]:
    token = form.get("refresh_token")
    if not token:
        raise OAuthError("invalid_request", "refresh_token is required")
    grant = tenant.refresh_tokens.get(token)
    if grant is None or grant.client_id != client_id or grant.expires_at <= sandbox.clock():
        raise OAuthError("invalid_grant", "refresh_token is invalid or expired")
    scopes = grant.scopes
    if form.get("scope"):
        requested = form["scope"].split()
        if any(s not in grant.scopes for s in requested):
            raise OAuthError("invalid_scope", "scope exceeds the original grant")
        scopes = requested
    # Like Cerner, the refresh response omits refresh_token: the client keeps the old one.
    return _issue(sandbox, tenant, Grant(client_id, scopes, grant.launch, 0), False, None)


async def token_handler(request: web.Request) -> web.Response:
    tenant = tenant_or_404(request)
    sandbox: Sandbox = request.app[SANDBOX]
    if request.content_type != "application/x-www-form-urlencoded":
        return oauth_error(
            OAuthError("invalid_request", "body must be application/x-www-form-urlencoded")
        )
    form = {k: str(v) for k, v in (await request.post()).items()}
    try:
        client = authenticate_client(tenant, request.headers, form, sandbox.clock())
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            body = _authorization_code(sandbox, tenant, client.client_id, form)
        elif grant_type == "refresh_token":
            body = _refresh(sandbox, tenant, client.client_id, form)
        else:
            raise OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} not supported")
    except OAuthError as err:
        return oauth_error(err)
    return web.json_response(body, headers=NO_STORE)


async def smart_style_handler(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "color_background": "#edeae3",
            "color_highlight": "#69b5ce",
            "color_text": "#303030",
            "font_family": "sans-serif",
            "dim_border_radius": "0px",
        }
    )


def routes() -> list[web.RouteDef]:
    base = f"/tenants/{{tenant}}/{SMART_PATH}"
    return [
        web.get("/r4/{tenant}/.well-known/smart-configuration", smart_config_handler),
        web.get(f"{base}/.well-known/openid-configuration", openid_config_handler),
        web.get(f"{base}/jwks", jwks_handler),
        web.get(f"{base}/personas/{{persona:{'|'.join(PERSONAS)}}}/authorize", authorize_handler),
        web.post(f"{base}/token", token_handler),
        web.get("/_sandbox/smart-style.json", smart_style_handler),
    ]
