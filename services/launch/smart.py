"""SMART on FHIR EHR launch against a configured FHIR server: discovery, authorize, token
exchange with the integration's client authentication, and id_token validation."""

from __future__ import annotations

import base64
import functools
import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode

import aiohttp
import jwt
import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from yarl import URL

from libs.common.crypto import FieldCipher
from services.launch.integrations import Integration
from services.launch.outbound import OutboundError, check_endpoint, read_json, refusal
from services.launch.settings import LaunchSettings

ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "ES384"]
# Who launched: a clinician from the EHR, or a patient from the patient portal.
Persona = Literal["provider", "patient"]
# Cerner runs one authorize endpoint per persona and advertises the provider one at its EHR
# FHIR root; patient apps use the patient persona's, which sits beside it.
CERNER_PROVIDER_PERSONA = "/personas/provider/authorize"
CERNER_PATIENT_PERSONA = "/personas/patient/authorize"
# Client-assertion keys kept loaded, one per integration and configured key.
MAX_CACHED_PRIVATE_KEYS = 1024
# The config service's limit for new keys (services/config/integrations.py); a key saved before
# it existed is refused here rather than signed with at seconds per launch.
MAX_RSA_KEY_BITS = 4096
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class SmartConfiguration(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    issuer: str | None = Field(default=None, max_length=2048)
    authorization_endpoint: str = Field(max_length=2048)
    token_endpoint: str = Field(max_length=2048)
    jwks_uri: str | None = Field(default=None, max_length=2048)
    code_challenge_methods_supported: list[str] = Field(default_factory=list, max_length=20)
    capabilities: list[str] = Field(default_factory=list, max_length=100)


def _empty_is_none(value: object) -> object:
    return None if value == "" else value


class TokenResponse(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    # Sent back in an Authorization header: a control character there made aiohttp raise
    # inside the FHIR client, a 500 instead of this refusal. RFC 6750's b64token is stricter;
    # any visible ASCII is what a header can carry.
    access_token: str = Field(max_length=16384, pattern=r"^[\x21-\x7e]+$")
    token_type: str = Field(max_length=20)
    expires_in: int = Field(default=570, ge=0)
    scope: str = Field(default="", max_length=4096)
    id_token: str | None = Field(default=None, max_length=16384)
    # RFC 6749: 1*VSCHAR. Encrypted into the session row, then sent back in a form. An empty
    # one is no refresh token (it used to be accepted; refusing the sign-in for it would not
    # help the clinician).
    refresh_token: Annotated[str | None, BeforeValidator(_empty_is_none)] = Field(
        default=None, max_length=16384, pattern=r"^[\x20-\x7e]+$"
    )
    patient: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9.-]+$")
    encounter: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9.-]+$")


@dataclass(frozen=True)
class Pkce:
    verifier: str
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        verifier = secrets.token_urlsafe(48)
        digest = hashlib.sha256(verifier.encode()).digest()
        return cls(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode())


class SmartError(Exception):
    """The launch cannot go on; the message is safe to show the clinician."""


@functools.lru_cache(maxsize=256)
def _quoted_setting(value: str) -> str:
    """A configured value (client id, redirect URI, scopes, FHIR base), quoted for a query."""
    return quote(value, safe="")


@functools.lru_cache(maxsize=256)
def _redirect_base(endpoint: str) -> str:
    """The authorization endpoint as a Location header may carry it: normalised by yarl
    (non-ASCII and control characters percent-encoded, CR and LF dropped), once per endpoint
    rather than with every launch's query. A fragment is dropped: RFC 6749 forbids one there,
    and a query appended after it would never reach the EHR."""
    return str(URL(endpoint).with_fragment(None))


def _unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, only to pick the key: jwt.decode parses and checks the whole token
    again (alg against the allowed list included). PyJWT's own header read validates every
    character of all three segments in Python, a third of the id_token check's CPU."""
    head, dot, _ = token.partition(".")
    try:
        if not dot or len(head) > 2048:
            raise ValueError(head)
        header = orjson.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except ValueError:  # binascii.Error and orjson.JSONDecodeError are ValueErrors
        raise SmartError("The EHR's identity token is malformed.") from None
    if not isinstance(header, dict):
        raise SmartError("The EHR's identity token is malformed.")
    return header


class SmartClient:
    def __init__(self, http: aiohttp.ClientSession, settings: LaunchSettings) -> None:
        self._http = http
        self._settings = settings
        self._discovery: dict[str, tuple[float, SmartConfiguration]] = {}
        self._jwks: dict[str, _KeySet] = {}
        self._private_keys: dict[tuple[uuid.UUID, str], PrivateKey] = {}

    def _endpoint(self, url: str) -> str:
        return check_endpoint(
            url, self._settings.allow_loopback_http, self._settings.outbound_private_networks
        )

    async def discover(self, iss: str) -> SmartConfiguration:
        """Only ever called with an `iss` that matched a configured integration."""
        cached = self._discovery.get(iss)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        url = self._endpoint(f"{iss}/.well-known/smart-configuration")
        try:
            async with self._http.get(
                url, allow_redirects=False, headers={"Accept": "application/json"}
            ) as response:
                if response.status != 200:
                    raise SmartError(f"The EHR's SMART configuration answered {response.status}.")
                config = SmartConfiguration.model_validate(await read_json(response))
        except (aiohttp.ClientError, TimeoutError, OutboundError) as exc:
            raise SmartError(
                f"The EHR's SMART configuration is unreachable ({refusal(exc)})."
            ) from None
        except ValidationError:
            raise SmartError("The EHR's SMART configuration is incomplete.") from None
        try:
            for endpoint in (
                config.authorization_endpoint,
                config.token_endpoint,
                config.jwks_uri,
            ):
                if endpoint:
                    self._endpoint(endpoint)
        except OutboundError as exc:
            # The callback's discovery catches SmartError only: an OutboundError was a 500.
            raise SmartError(
                f"The EHR's SMART configuration names an endpoint we refuse ({exc})."
            ) from None
        self._discovery[iss] = (time.monotonic() + self._settings.smart_discovery_ttl_s, config)
        return config

    def uses_pkce(self, integration: Integration, config: SmartConfiguration) -> bool:
        if integration.pkce_mode == "required":
            # Some EHRs support S256 without advertising it, so "required" always sends it.
            return True
        return (
            integration.pkce_mode == "if_supported"
            and "S256" in config.code_challenge_methods_supported
        )

    def authorize_url(
        self,
        integration: Integration,
        config: SmartConfiguration,
        *,
        state: str,
        nonce: str,
        launch: str,
        redirect_uri: str,
        pkce: Pkce | None,
        persona: Persona = "provider",
    ) -> str:
        scopes = (
            self._settings.smart_patient_scopes
            if persona == "patient"
            else self._settings.smart_scopes
        )
        # The query urlencode(quote_via=quote) made, in the same order; the configured values
        # are quoted once (quote walks a string with anything to escape in Python).
        query = (
            f"response_type=code&client_id={_quoted_setting(integration.smart_client_id)}"
            f"&redirect_uri={_quoted_setting(redirect_uri)}&scope={_quoted_setting(scopes)}"
            f"&state={quote(state, safe='')}&nonce={quote(nonce, safe='')}"
            f"&launch={quote(launch, safe='')}"
            # Cerner refuses a request without aud, and aud must be the iss byte for byte.
            f"&aud={_quoted_setting(integration.fhir_base_url)}"
        )
        if pkce is not None:
            query += f"&code_challenge={quote(pkce.challenge, safe='')}&code_challenge_method=S256"
        endpoint = _redirect_base(authorization_endpoint(config, persona))
        separator = "&" if "?" in endpoint else "?"
        return endpoint + separator + query

    def _client_auth(
        self, integration: Integration, config: SmartConfiguration, cipher: FieldCipher
    ) -> tuple[dict[str, str], dict[str, str]]:
        """(headers, extra form fields) for the integration's client authentication."""
        if integration.client_auth_method == "client_secret_basic":
            if not integration.client_secret_encrypted:
                raise SmartError("This integration has no client secret configured.")
            secret = cipher.decrypt(integration.client_secret_encrypted, integration.secret_purpose)
            pair = f"{quote(integration.smart_client_id, safe='')}:{quote(secret, safe='')}"
            return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}, {}
        key = self._private_key(integration, cipher)
        algorithm = "ES384" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS384"
        now = int(time.time())
        assertion = jwt.encode(
            {
                "iss": integration.smart_client_id,
                "sub": integration.smart_client_id,
                "aud": config.token_endpoint,
                "jti": str(uuid.uuid4()),
                "iat": now,
                "exp": now + 240,
            },
            key,
            algorithm=algorithm,
        )
        return {}, {
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        }

    def _private_key(self, integration: Integration, cipher: FieldCipher) -> PrivateKey:
        """The integration's key for its client assertions, loaded once per configured key:
        loading an RSA key checks it (50 ms of CPU for a 2048-bit key on the bench machine),
        which every launch paid before."""
        sealed = integration.private_key_encrypted
        if not sealed:
            raise SmartError("This integration has no private key configured.")
        cache_key = (integration.integration_id, sealed)
        key = self._private_keys.get(cache_key)
        if key is not None:
            return key
        pem = cipher.decrypt(sealed, integration.secret_purpose)
        try:
            # The config service checked the key in full when it was saved; checking it again
            # here ran on the event loop holding the GIL (about 50 ms for 2048 bits, seconds
            # for the larger keys config accepted before it capped RSA at 4096 bits).
            loaded = load_pem_private_key(
                pem.encode(), password=None, unsafe_skip_rsa_key_validation=True
            )
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise SmartError("This integration's private key cannot be read.") from None
        if not isinstance(loaded, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise SmartError("This integration's private key must be RSA or EC (P-384).")
        if isinstance(loaded, rsa.RSAPrivateKey) and loaded.key_size > MAX_RSA_KEY_BITS:
            raise SmartError(
                f"This integration's RSA key is over {MAX_RSA_KEY_BITS} bits: save a smaller"
                " one in the admin portal."
            )
        if len(self._private_keys) >= MAX_CACHED_PRIVATE_KEYS:
            self._private_keys.clear()  # replaced keys of a long-running process
        self._private_keys[cache_key] = loaded
        return loaded

    async def _token_request(
        self,
        integration: Integration,
        config: SmartConfiguration,
        cipher: FieldCipher,
        form: dict[str, str],
    ) -> TokenResponse:
        headers, extra = self._client_auth(integration, config, cipher)
        headers["Accept"] = "application/json"
        # The body aiohttp's FormData would make of the dict, without building a FormData.
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        body = urlencode({**form, **extra}).encode()
        try:
            async with self._http.post(
                config.token_endpoint,
                data=body,
                headers=headers,
                allow_redirects=False,
            ) as response:
                body = await read_json(response)
                if response.status != 200:
                    error = body.get("error") if isinstance(body, dict) else None
                    raise SmartError(f"The EHR refused the sign-in ({error or response.status}).")
                return TokenResponse.model_validate(body)
        except (aiohttp.ClientError, TimeoutError, OutboundError) as exc:
            raise SmartError(f"The EHR's token endpoint is unreachable ({refusal(exc)}).") from None
        except ValidationError:
            raise SmartError("The EHR's token answer is incomplete.") from None

    async def exchange_code(
        self,
        integration: Integration,
        config: SmartConfiguration,
        cipher: FieldCipher,
        *,
        code: str,
        redirect_uri: str,
        verifier: str | None,
    ) -> TokenResponse:
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
        if verifier:
            form["code_verifier"] = verifier
        return await self._token_request(integration, config, cipher, form)

    async def refresh(
        self,
        integration: Integration,
        config: SmartConfiguration,
        cipher: FieldCipher,
        refresh_token: str,
    ) -> TokenResponse:
        fresh = await self._token_request(
            integration,
            config,
            cipher,
            {"grant_type": "refresh_token", "refresh_token": refresh_token},
        )
        if fresh.refresh_token is None:
            # Cerner may leave the refresh token out; the old one stays valid.
            fresh = fresh.model_copy(update={"refresh_token": refresh_token})
        return fresh

    async def validate_id_token(
        self, integration: Integration, config: SmartConfiguration, id_token: str, nonce: str
    ) -> dict[str, Any]:
        if not config.jwks_uri:
            raise SmartError("The EHR publishes no keys to check the sign-in with.")
        header = _unverified_header(id_token)
        if header.get("alg") not in ID_TOKEN_ALGORITHMS:
            raise SmartError("The EHR's identity token uses an algorithm we do not accept.")
        key = await self._key(config.jwks_uri, str(header.get("kid", "")))
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key,
                algorithms=ID_TOKEN_ALGORITHMS,
                audience=integration.smart_client_id,
                issuer=config.issuer,
                options={
                    "require": ["exp", "iat", "aud", "sub"],
                    "verify_iss": config.issuer is not None,
                },
                leeway=60,
            )
        except jwt.PyJWTError as exc:
            raise SmartError(
                f"The EHR's identity token is not valid ({type(exc).__name__})."
            ) from None
        if not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
            raise SmartError("The EHR's identity token belongs to another sign-in.")
        return claims

    async def _key(self, jwks_uri: str, kid: str) -> Any:
        for refresh in (False, True):
            cached = self._jwks.get(jwks_uri)
            if refresh or not cached or cached.expires_at < time.monotonic():
                try:
                    async with self._http.get(jwks_uri, allow_redirects=False) as response:
                        keys = await read_json(response)
                except (aiohttp.ClientError, TimeoutError, OutboundError) as exc:
                    raise SmartError(f"The EHR's keys are unreachable ({refusal(exc)}).") from None
                if not isinstance(keys, dict) or not isinstance(keys.get("keys"), list):
                    raise SmartError("The EHR's keys are not a valid JSON Web Key Set.")
                cached = self._jwks[jwks_uri] = _KeySet(time.monotonic() + 3600, keys)
            key = cached.key(kid)
            if key is not None:
                return key
        raise SmartError("The EHR's identity token was signed by an unknown key.")


@dataclass
class _KeySet:
    """An EHR's JWKS as fetched, and the key objects built from it so far, by kid: built
    once per fetch, not once per id_token."""

    expires_at: float
    jwks: dict[str, Any]
    built: dict[str, Any] = field(default_factory=dict)

    def key(self, kid: str) -> Any:
        if kid in self.built:
            return self.built[kid]
        keys = self.jwks["keys"]
        for jwk in keys:
            if not isinstance(jwk, dict):  # not a key: the others may still be good
                continue
            if jwk.get("kid") == kid or (not kid and len(keys) == 1):
                try:
                    key = jwt.PyJWK(jwk).key
                except jwt.PyJWTError:
                    continue
                self.built[kid] = key
                return key
        return None


def authorization_endpoint(config: SmartConfiguration, persona: Persona) -> str:
    """Where to send this persona. A Cerner discovery document names the provider persona's
    endpoint; a patient goes to the patient persona's beside it. Other SMART servers serve
    both personas from the one endpoint they advertise."""
    endpoint = config.authorization_endpoint
    if persona == "patient" and endpoint.endswith(CERNER_PROVIDER_PERSONA):
        return endpoint.removesuffix(CERNER_PROVIDER_PERSONA) + CERNER_PATIENT_PERSONA
    return endpoint


def _fhir_user(claims: dict[str, Any], iss: str, kind: str, label: str) -> str:
    """`fhirUser` as `<kind>/<id>`, whether the EHR sent it absolute (Cerner) or relative
    (some simulators); an absolute one must point into this FHIR server."""
    value = str(claims.get("fhirUser") or "")
    if value.startswith(iss + "/"):
        value = value[len(iss) + 1 :]
    parts = value.split("/")
    if len(parts) != 2 or parts[0] != kind or not parts[1]:
        raise SmartError(f"The EHR did not say which {label} signed in.")
    if not all(c.isalnum() or c in ".-" for c in parts[1]) or len(parts[1]) > 64:
        raise SmartError(f"The EHR's {label} id is not valid.")
    return value


def ehr_user_id(claims: dict[str, Any], iss: str) -> str:
    """The clinician's EHR user id: `fhirUser` as `Practitioner/<id>`."""
    return _fhir_user(claims, iss, "Practitioner", "practitioner")


def patient_in_context(claims: dict[str, Any], iss: str, patient: str | None) -> str:
    """The patient a patient-persona launch is for: the token's `patient` context, which must
    be the patient who signed in (`fhirUser` = `Patient/<id>`). Someone acting for a patient
    (a `RelatedPerson`) is refused. Messages never name the patient."""
    signed_in = _fhir_user(claims, iss, "Patient", "patient")
    if not patient or not secrets.compare_digest(signed_in, f"Patient/{patient}"):
        raise SmartError("The EHR's patient context is not the patient who signed in.")
    return patient
