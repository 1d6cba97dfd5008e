"""Token-endpoint client authentication: client_secret_basic, private_key_jwt, or none."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sandbox.ehr.settings import ClientSpec
from sandbox.ehr.state import TenantState
from sandbox.jwt_dates import numeric_date

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGS = ("RS384", "ES384")
_KEY_KINDS: dict[str, type] = {"RS384": rsa.RSAPublicKey, "ES384": ec.EllipticCurvePublicKey}
MAX_ASSERTION_LIFETIME = 300


class OAuthError(Exception):
    """An RFC 6749 error response."""

    def __init__(
        self, error: str, description: str, status: int = 400, basic_challenge: bool = False
    ) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.basic_challenge = basic_challenge


def _invalid_client(description: str, basic: bool = False) -> OAuthError:
    return OAuthError("invalid_client", description, 401, basic_challenge=basic)


def authenticate_client(
    tenant: TenantState, headers: Mapping[str, str], form: Mapping[str, str], now: float
) -> ClientSpec:
    auth = headers.get("Authorization", "")
    if auth[:6].lower() == "basic ":
        return _basic(tenant, auth[6:].strip(), form)
    if "client_assertion" in form or "client_assertion_type" in form:
        return _private_key_jwt(tenant, form, now)
    client_id = form.get("client_id", "")
    client = tenant.clients.get(client_id)
    if client is None:
        raise _invalid_client("unknown client or no client authentication")
    if client.auth_method != "none":
        raise _invalid_client(
            f"client authentication required ({client.auth_method})",
            basic=client.auth_method == "client_secret_basic",
        )
    return client


def _basic(tenant: TenantState, encoded: str, form: Mapping[str, str]) -> ClientSpec:
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise _invalid_client("malformed Basic credentials", basic=True) from exc
    client_id, secret = unquote(user), unquote(password)
    client = tenant.clients.get(client_id)
    if client is None or client.auth_method != "client_secret_basic" or not client.client_secret:
        raise _invalid_client("client authentication failed", basic=True)
    if not hmac.compare_digest(secret.encode(), client.client_secret.encode()):
        raise _invalid_client("client authentication failed", basic=True)
    if form.get("client_id", client_id) != client_id:
        raise OAuthError("invalid_request", "client_id does not match the authenticated client")
    return client


def _client_key(client: ClientSpec, kid: str | None, alg: str) -> Any:
    key: Any
    if client.public_key_pem:
        key = serialization.load_pem_public_key(client.public_key_pem.encode())
    else:
        keys: list[dict[str, Any]] = list((client.jwks or {}).get("keys", []))  # type: ignore[call-overload]
        candidates = [k for k in keys if kid is None or k.get("kid") == kid]
        if not candidates:
            raise _invalid_client("no registered key matches the assertion kid")
        key = jwt.PyJWK(candidates[0]).key
    # The alg comes from the assertion's unverified header, so anyone can name one that does
    # not fit the key (RS384 for an EC key); PyJWT then raises outside its own error types.
    if not isinstance(key, _KEY_KINDS[alg]):
        raise _invalid_client(f"client_assertion alg {alg} does not fit the registered key")
    return key


def _private_key_jwt(tenant: TenantState, form: Mapping[str, str], now: float) -> ClientSpec:
    if form.get("client_assertion_type") != JWT_BEARER:
        raise _invalid_client("client_assertion_type must be " + JWT_BEARER)
    assertion = form.get("client_assertion", "")
    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise _invalid_client(f"malformed client_assertion: {exc}") from exc
    client_id = str(unverified.get("iss", ""))
    client = tenant.clients.get(client_id)
    if client is None or client.auth_method != "private_key_jwt":
        raise _invalid_client("unknown client or client not registered for private_key_jwt")
    alg = str(header.get("alg", ""))
    if alg not in ASSERTION_ALGS:
        raise _invalid_client(f"client_assertion alg must be one of {', '.join(ASSERTION_ALGS)}")
    key = _client_key(client, header.get("kid"), alg)
    try:
        claims: dict[str, Any] = jwt.decode(
            assertion,
            key,
            algorithms=[alg],
            audience=tenant.token_url,
            options={
                "require": ["iss", "sub", "aud", "exp", "jti"],
                "verify_exp": False,  # checked below against the injectable clock
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.PyJWTError as exc:
        raise _invalid_client(f"client_assertion rejected: {exc}") from exc
    if claims["sub"] != client_id:
        raise _invalid_client("client_assertion iss and sub must both be the client_id")
    if form.get("client_id", client_id) != client_id:
        raise _invalid_client("client_id does not match the client_assertion")
    # verify_exp is off (the stand-in's clock decides), so PyJWT has not checked exp's type.
    exp = numeric_date(claims, "exp")
    if exp is None:
        raise _invalid_client("client_assertion exp is not a NumericDate")
    if exp <= now:
        raise _invalid_client("client_assertion has expired")
    if exp > now + MAX_ASSERTION_LIFETIME:
        raise _invalid_client("client_assertion exp is more than 5 minutes in the future")
    jti_key = f"{client_id}:{claims['jti']}"
    tenant.used_jtis = {k: v for k, v in tenant.used_jtis.items() if v > now}
    if jti_key in tenant.used_jtis:
        raise _invalid_client("client_assertion jti has already been used")
    tenant.used_jtis[jti_key] = exp
    return client
