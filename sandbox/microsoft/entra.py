"""Entra ID (v2.0 endpoints): discovery, JWKS, authorize (auth code + PKCE) and token."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote_plus, urlencode

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from sandbox.jwt_dates import numeric_date
from sandbox.microsoft.clock import graph_time
from sandbox.microsoft.core import Sandbox
from sandbox.microsoft.directory import GRAPH_APP_ID, GRAPH_RESOURCE, App, Tenant, User

MULTI_TENANT = ("common", "organizations")
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CODE_LIFETIME = timedelta(minutes=10)


@dataclass
class AuthCode:
    client_id: str
    redirect_uri: str
    user: User
    scope: str
    nonce: str | None
    challenge: str | None
    challenge_method: str
    expires: datetime


@dataclass
class RefreshGrant:
    client_id: str
    user: User
    scope: str


class EntraError(Exception):
    """An OAuth error answered in Entra's JSON shape."""

    def __init__(self, status: int, error: str, code: int, description: str) -> None:
        super().__init__(description)
        self.status, self.error, self.code, self.description = status, error, code, description


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Entra:
    """Handlers and state of the Entra stand-in."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.codes: dict[str, AuthCode] = {}
        self.refresh_tokens: dict[str, RefreshGrant] = {}

    # -- helpers -----------------------------------------------------------------------------
    def issuer(self, tenant_id: str) -> str:
        return f"{self.sb.base_url}/{tenant_id}/v2.0"

    def _error(self, exc: EntraError) -> web.Response:
        now = self.sb.clock.now()
        trace = str(uuid.uuid4())
        desc = (
            f"AADSTS{exc.code}: {exc.description}\r\nTrace ID: {trace}\r\n"
            f"Correlation ID: {trace}\r\nTimestamp: {now:%Y-%m-%d %H:%M:%SZ}"
        )
        body = {
            "error": exc.error,
            "error_description": desc,
            "error_codes": [exc.code],
            "timestamp": f"{now:%Y-%m-%d %H:%M:%SZ}",
            "trace_id": trace,
            "correlation_id": trace,
            "error_uri": f"{self.sb.base_url}/error?code={exc.code}",
        }
        return web.json_response(body, status=exc.status)

    def _tenant(self, ref: str, *, allow_multi: bool = True) -> Tenant | None:
        """Resolve the path tenant; None for common/organizations."""
        if ref.lower() in MULTI_TENANT:
            if allow_multi:
                return None
            raise EntraError(
                400,
                "invalid_request",
                900023,
                f"Specified tenant identifier '{ref}' is not valid for this grant.",
            )
        tenant = self.sb.directory.tenant(ref)
        if tenant is None:
            raise EntraError(
                400,
                "invalid_tenant",
                90002,
                f"Tenant '{ref}' not found. Check to make sure you have the correct tenant ID "
                "and are signing into the correct cloud.",
            )
        return tenant

    # -- discovery ---------------------------------------------------------------------------
    async def openid_configuration(self, request: web.Request) -> web.Response:
        ref = request.match_info["tenant"]
        try:
            tenant = self._tenant(ref)
        except EntraError as exc:
            return self._error(exc)
        base = f"{self.sb.base_url}/{ref}"
        issuer = self.issuer(tenant.id if tenant else "{tenantid}")
        doc = {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": issuer,
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": f"{self.sb.base_url}/oidc/userinfo",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "claims_supported": [
                "sub",
                "iss",
                "aud",
                "exp",
                "iat",
                "nonce",
                "name",
                "preferred_username",
                "oid",
                "tid",
                "ver",
                "wids",
            ],
            "tenant_region_scope": "NA",
            "cloud_instance_name": "127.0.0.1",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
        }
        return web.json_response(doc)

    async def jwks(self, request: web.Request) -> web.Response:
        try:
            self._tenant(request.match_info["tenant"])
        except EntraError as exc:
            return self._error(exc)
        return web.json_response(self.sb.keys.jwks())

    # -- authorize ---------------------------------------------------------------------------
    def _error_page(self, code: int, message: str, status: int = 400) -> web.Response:
        body = (
            "<!doctype html><html><head><title>Sign in error</title></head><body>"
            f"<h1>Sorry, but we're having trouble signing you in.</h1>"
            f"<p id='error'>AADSTS{code}: {html.escape(message)}</p></body></html>"
        )
        return web.Response(text=body, status=status, content_type="text/html")

    async def authorize(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        ref = request.match_info["tenant"]
        try:
            tenant = self._tenant(ref)
        except EntraError as exc:
            return self._error_page(exc.code, exc.description)
        app = self.sb.directory.apps.get(q.get("client_id", ""))
        if app is None:
            return self._error_page(
                700016, f"Application with identifier '{q.get('client_id')}' was not found."
            )
        redirect_uri = q.get("redirect_uri", "")
        if redirect_uri not in app.redirect_uris:
            return self._error_page(
                50011,
                f"The redirect URI '{redirect_uri}' specified in the request does not match "
                f"the redirect URIs configured for the application '{app.client_id}'.",
            )
        state = q.get("state")

        def back(params: dict[str, str]) -> web.Response:
            if state is not None:
                params["state"] = state
            sep = "&" if "?" in redirect_uri else "?"
            return web.Response(
                status=302, headers={"Location": redirect_uri + sep + urlencode(params)}
            )

        def fail(error: str, code: int, message: str) -> web.Response:
            return back({"error": error, "error_description": f"AADSTS{code}: {message}"})

        if q.get("response_type") != "code":
            return fail("unsupported_response_type", 700054, "response_type must be 'code'.")
        if "openid" not in q.get("scope", "").split() and not q.get("scope"):
            return fail("invalid_request", 900144, "The request body must contain 'scope'.")
        challenge = q.get("code_challenge")
        method = q.get("code_challenge_method", "plain" if challenge else "")
        if challenge and method not in ("S256", "plain"):
            return fail("invalid_request", 501491, "Invalid code_challenge_method.")
        hint = q.get("login_hint")
        if not hint:
            return self._pick_account(request, tenant)
        user = self.sb.directory.user(hint)
        if user is None:
            return fail("invalid_request", 50034, f"The user account {hint} does not exist.")
        if tenant is not None and user.tenant_id != tenant.id:
            return fail(
                "invalid_request",
                50020,
                f"User account '{user.upn}' from identity provider does not exist in tenant "
                f"'{tenant.display_name}'.",
            )
        code = b64url(secrets.token_bytes(48))
        self.codes[code] = AuthCode(
            client_id=app.client_id,
            redirect_uri=redirect_uri,
            user=user,
            scope=q.get("scope", ""),
            nonce=q.get("nonce"),
            challenge=challenge,
            challenge_method=method,
            expires=self.sb.clock.now() + CODE_LIFETIME,
        )
        return back({"code": code, "session_state": str(uuid.uuid4())})

    def _pick_account(self, request: web.Request, tenant: Tenant | None) -> web.Response:
        users = [
            u
            for u in self.sb.directory.users.values()
            if tenant is None or u.tenant_id == tenant.id
        ]
        items = []
        for u in users:
            params = dict(request.query)
            params["login_hint"] = u.upn
            href = html.escape(f"{request.path}?{urlencode(params)}")
            tname = self.sb.directory.tenants[u.tenant_id].display_name
            items.append(
                f"<li><a href='{href}'>{html.escape(u.display_name)}</a> "
                f"<small>{html.escape(u.upn)} ({html.escape(tname)})</small></li>"
            )
        body = (
            "<!doctype html><html><head><meta charset='utf-8'><title>Pick an account</title>"
            "<style>body{font-family:sans-serif;max-width:36em;margin:3em auto}"
            "li{margin:.6em 0}</style></head><body><h1>Pick an account</h1>"
            "<p>Microsoft sign-in (local sandbox)</p><ul>" + "".join(items) + "</ul></body></html>"
        )
        return web.Response(text=body, content_type="text/html")

    # -- token -------------------------------------------------------------------------------
    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        data = {k: str(v) for k, v in form.items()}
        try:
            tenant = self._tenant(request.match_info["tenant"])
            app = self._authenticate_client(request, data)
            grant = data.get("grant_type")
            if grant == "client_credentials":
                if tenant is None:
                    self._tenant(request.match_info["tenant"], allow_multi=False)
                    raise AssertionError("unreachable")
                return web.json_response(self._client_credentials(app, tenant, data))
            if grant == "authorization_code":
                return web.json_response(self._authorization_code(app, tenant, data))
            if grant == "refresh_token":
                return web.json_response(self._refresh(app, data))
            raise EntraError(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant}'.",
            )
        except EntraError as exc:
            return self._error(exc)

    def _authenticate_client(self, request: web.Request, data: dict[str, str]) -> App:
        client_id = data.get("client_id", "")
        secret = data.get("client_secret")
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                raw = base64.b64decode(auth[6:].strip()).decode()
            except ValueError as exc:
                raise EntraError(401, "invalid_client", 7000215, "Malformed Basic auth.") from exc
            basic_id, _, basic_secret = raw.partition(":")
            client_id, secret = unquote_plus(basic_id), unquote_plus(basic_secret)
        app = self.sb.directory.apps.get(client_id)
        if app is None:
            raise EntraError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory.",
            )
        if data.get("client_assertion_type") == JWT_BEARER and data.get("client_assertion"):
            self._verify_assertion(app, data["client_assertion"], request)
            return app
        if secret is None:
            raise EntraError(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' "
                "or 'client_secret'.",
            )
        # compare_digest takes str only when ASCII (TypeError otherwise), and the secret is
        # whatever the caller sent.
        if not any(secrets.compare_digest(secret.encode(), s.encode()) for s in app.secrets):
            raise EntraError(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request "
                f"is the client secret value, not the client secret ID, for a secret added to "
                f"app '{app.client_id}'.",
            )
        return app

    def _verify_assertion(self, app: App, assertion: str, request: web.Request) -> None:
        token_url = f"{self.sb.base_url}{request.path}"
        for pem in app.certificate_pems:
            try:
                if "CERTIFICATE" in pem:
                    key: Any = x509.load_pem_x509_certificate(pem.encode()).public_key()
                else:
                    key = load_pem_public_key(pem.encode())
                claims: dict[str, Any] = jwt.decode(
                    assertion,
                    key,
                    algorithms=["RS256", "PS256"],
                    audience=token_url,
                    options={"verify_exp": False},
                )
            except (jwt.PyJWTError, ValueError):
                continue
            if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
                break
            expires = numeric_date(claims, "exp")
            if expires is None or expires <= self.sb.clock.now().timestamp():
                raise EntraError(401, "invalid_client", 700024, "Client assertion is expired.")
            return
        raise EntraError(
            401,
            "invalid_client",
            700027,
            "Client assertion failed signature validation or has a wrong audience/issuer.",
        )

    def _client_credentials(self, app: App, tenant: Tenant, data: dict[str, str]) -> dict[str, Any]:
        scopes = data.get("scope", "").split()
        resource = None
        if len(scopes) == 1 and scopes[0].endswith("/.default"):
            resource = scopes[0][: -len("/.default")]
        if resource not in (GRAPH_RESOURCE, GRAPH_APP_ID, GRAPH_RESOURCE + "/"):
            raise EntraError(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {' '.join(scopes)} is not valid. Client "
                "credential flows must have a scope value with /.default suffixed to the "
                "resource identifier (application ID URI).",
            )
        now = self.sb.clock.now()
        lifetime = self.sb.config.access_token_lifetime_s
        claims = {
            "aud": GRAPH_RESOURCE,
            "iss": self.issuer(tenant.id),
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int(now.timestamp()) + lifetime,
            "app_displayname": app.display_name,
            "appid": app.client_id,
            "azp": app.client_id,
            "idtyp": "app",
            "oid": app.service_principal_id,
            "sub": app.service_principal_id,
            "roles": list(app.roles),
            "tid": tenant.id,
            "uti": b64url(secrets.token_bytes(16)),
            "ver": "2.0",
        }
        token = self.sb.keys.sign(claims)
        return {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
        }

    def _authorization_code(
        self, app: App, tenant: Tenant | None, data: dict[str, str]
    ) -> dict[str, Any]:
        code = self.codes.pop(data.get("code", ""), None)
        if code is None:
            raise EntraError(
                400,
                "invalid_grant",
                54005,
                "OAuth2 Authorization code was already redeemed, please retry with a new valid "
                "code or use an existing refresh token.",
            )
        if code.expires <= self.sb.clock.now():
            raise EntraError(400, "invalid_grant", 70008, "The provided authorization code "
                             "or refresh token has expired due to inactivity.")  # fmt: skip
        if code.client_id != app.client_id:
            raise EntraError(400, "invalid_grant", 70000, "The code was issued to another app.")
        if data.get("redirect_uri") != code.redirect_uri:
            raise EntraError(
                400,
                "invalid_grant",
                50148,
                "The redirect_uri does not match the one used in the authorization request.",
            )
        if code.challenge:
            verifier = data.get("code_verifier", "")
            expected = (
                b64url(hashlib.sha256(verifier.encode()).digest())
                if code.challenge_method == "S256"
                else verifier
            )
            if not verifier or not secrets.compare_digest(
                expected.encode(), code.challenge.encode()
            ):
                raise EntraError(
                    400,
                    "invalid_grant",
                    501481,
                    "The Code_Verifier does not match the code_challenge supplied in the "
                    "authorization request.",
                )
        if tenant is not None and tenant.id != code.user.tenant_id:
            raise EntraError(400, "invalid_grant", 50020, "The code belongs to another tenant.")
        return self._user_tokens(app, code.user, code.scope, code.nonce)

    def _refresh(self, app: App, data: dict[str, str]) -> dict[str, Any]:
        grant = self.refresh_tokens.get(data.get("refresh_token", ""))
        if grant is None or grant.client_id != app.client_id:
            raise EntraError(400, "invalid_grant", 9002313, "Invalid refresh token.")
        return self._user_tokens(app, grant.user, grant.scope, None)

    def _user_tokens(self, app: App, user: User, scope: str, nonce: str | None) -> dict[str, Any]:
        now = int(self.sb.clock.now().timestamp())
        iss = self.issuer(user.tenant_id)
        sub = b64url(hashlib.sha256(f"{user.oid}:{app.client_id}".encode()).digest())[:43]
        id_claims: dict[str, Any] = {
            "aud": app.client_id,
            "iss": iss,
            "iat": now,
            "nbf": now,
            "exp": now + self.sb.config.id_token_lifetime_s,
            "name": user.display_name,
            "oid": user.oid,
            "preferred_username": user.upn,
            "sub": sub,
            "tid": user.tenant_id,
            "ver": "2.0",
            "wids": list(user.wids),
            "uti": b64url(secrets.token_bytes(16)),
        }
        if nonce is not None:
            id_claims["nonce"] = nonce
        lifetime = self.sb.config.access_token_lifetime_s
        access_claims = {
            "aud": GRAPH_RESOURCE,
            "iss": iss,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "appid": app.client_id,
            "azp": app.client_id,
            "idtyp": "user",
            "name": user.display_name,
            "oid": user.oid,
            "scp": "openid profile email User.Read",
            "sub": sub,
            "tid": user.tenant_id,
            "upn": user.upn,
            "wids": list(user.wids),
            "ver": "2.0",
        }
        result: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": "openid profile email https://graph.microsoft.com/User.Read",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": self.sb.keys.sign(access_claims),
            "id_token": self.sb.keys.sign(id_claims),
            "client_info": b64url(json.dumps({"uid": user.oid, "utid": user.tenant_id}).encode()),
        }
        if "offline_access" in scope.split():
            rt = b64url(secrets.token_bytes(48))
            self.refresh_tokens[rt] = RefreshGrant(app.client_id, user, scope)
            result["refresh_token"] = rt
            result["scope"] += " offline_access"
        return result

    # -- admin -------------------------------------------------------------------------------
    async def admin_list_apps(self, request: web.Request) -> web.Response:
        return web.json_response([a.public() for a in self.sb.directory.apps.values()])

    async def admin_put_app(self, request: web.Request) -> web.Response:
        body = await request.json()
        client_id = str(body.get("clientId") or uuid.uuid4())
        existing = self.sb.directory.apps.get(client_id)
        app = existing or App(client_id=client_id, display_name=str(body.get("displayName", "")))
        if "displayName" in body:
            app.display_name = str(body["displayName"])
        if "clientSecret" in body:
            app.secrets = [str(body["clientSecret"])]
        if "redirectUris" in body:
            app.redirect_uris = [str(u) for u in body["redirectUris"]]
        if "addRedirectUris" in body:
            app.redirect_uris += [str(u) for u in body["addRedirectUris"]]
        if "roles" in body:
            app.roles = [str(r) for r in body["roles"]]
        if "certificatePems" in body:
            app.certificate_pems = [str(p) for p in body["certificatePems"]]
        self.sb.directory.register(app)
        return web.json_response(app.public(), status=200 if existing else 201)

    async def admin_list_users(self, request: web.Request) -> web.Response:
        d = self.sb.directory
        return web.json_response(
            {
                "tenants": [
                    {"id": t.id, "displayName": t.display_name, "domain": t.domain}
                    for t in d.tenants.values()
                ],
                "users": [
                    {
                        "id": u.oid,
                        "tenantId": u.tenant_id,
                        "userPrincipalName": u.upn,
                        "displayName": u.display_name,
                        "wids": list(u.wids),
                    }
                    for u in d.users.values()
                ],
                "now": graph_time(self.sb.clock.now()),
            }
        )

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/_sandbox/entra/apps", self.admin_list_apps)
        router.add_post("/_sandbox/entra/apps", self.admin_put_app)
        router.add_get("/_sandbox/entra/users", self.admin_list_users)
        router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self.openid_configuration)
        router.add_get("/{tenant}/discovery/v2.0/keys", self.jwks)
        router.add_get("/{tenant}/oauth2/v2.0/authorize", self.authorize)
        router.add_post("/{tenant}/oauth2/v2.0/token", self.token)
