"""Reads `<FHIR base>/.well-known/smart-configuration` when an admin saves a URL, so a typo
or a non-SMART server is caught in the portal instead of at a clinician's first launch."""

from __future__ import annotations

import socket
import ssl
from typing import Annotated, Any

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from services.config.fhir_urls import CheckedUrl, InvalidFhirUrl, check_endpoint_url

# Any string JSON can carry, except NUL: the document is kept in a jsonb column, which refuses
# "\u0000", so a server sending one would otherwise fail the save with a 500, not this 422.
_Text = Annotated[str, StringConstraints(max_length=2048, pattern=r"^[^\x00]*$")]


class SmartProbeFailed(Exception):
    """The URL is unreachable or does not serve a SMART configuration; safe to show."""


class SmartConfiguration(BaseModel):
    """What the portal shows and keeps from the discovery document."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    issuer: _Text | None = None
    authorization_endpoint: _Text
    token_endpoint: _Text
    jwks_uri: _Text | None = None
    code_challenge_methods_supported: list[_Text] = Field(default_factory=list, max_length=50)
    token_endpoint_auth_methods_supported: list[_Text] = Field(default_factory=list, max_length=50)
    capabilities: list[_Text] = Field(default_factory=list, max_length=200)
    scopes_supported: list[_Text] = Field(default_factory=list, max_length=500)

    @property
    def supports_pkce_s256(self) -> bool:
        return "S256" in self.code_challenge_methods_supported


class _PinnedResolver(AbstractResolver):
    """Answers with the addresses that were checked, so DNS cannot change its mind between
    the check and the connection."""

    def __init__(self, checked: CheckedUrl) -> None:
        self._checked = checked

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host.lower() != self._checked.host:
            raise OSError(f"refusing to resolve {host}")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self._checked.addresses
        ]

    async def close(self) -> None:
        return None


async def _read_capped(content: aiohttp.StreamReader, max_bytes: int) -> bytes:
    """The body to its end, or its first max_bytes + 1 bytes when it is longer. `read(n)`
    returns what has arrived so far, not n bytes: one read cut a document sent in two
    pieces, which was then refused as not JSON."""
    chunks: list[bytes] = []
    size = 0
    while size <= max_bytes and (chunk := await content.read(max_bytes + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def _check_endpoints(found: SmartConfiguration, checked: CheckedUrl) -> None:
    """The launch gateway sends the client secret to token_endpoint, fetches jwks_uri and
    sends clinicians to authorization_endpoint: each must pass the FHIR base's own address
    rule, or a SMART server could point the gateway inside our network. That rule is also
    the only parse of these URLs, so a relative or malformed one (an unclosed `[`, which
    urlsplit raises on) is a refusal naming the field, never an exception."""
    for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        url: str | None = getattr(found, name)
        if url is None:
            continue
        try:
            await check_endpoint_url(
                url,
                allow_loopback=checked.allow_loopback,
                allowed_networks=checked.allowed_networks,
            )
        except InvalidFhirUrl as exc:
            raise SmartProbeFailed(f"The SMART configuration's {name} is refused: {exc}") from None


async def probe_smart_configuration(
    checked: CheckedUrl, *, ssl_context: ssl.SSLContext, timeout_s: float, max_bytes: int
) -> SmartConfiguration:
    discovery = f"{checked.url}/.well-known/smart-configuration"
    connector = aiohttp.TCPConnector(resolver=_PinnedResolver(checked), ssl=ssl_context)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as http,
            http.get(
                discovery, allow_redirects=False, headers={"Accept": "application/json"}
            ) as response,
        ):
            if 300 <= response.status < 400:
                raise SmartProbeFailed(
                    f"{discovery} redirects elsewhere ({response.status}); enter the FHIR base"
                    " URL the EHR itself uses."
                )
            if response.status != 200:
                raise SmartProbeFailed(
                    f"{discovery} answered HTTP {response.status}: this does not look like a"
                    " SMART on FHIR server."
                )
            body = await _read_capped(response.content, max_bytes)
    except SmartProbeFailed:
        raise
    except TimeoutError:
        raise SmartProbeFailed(f"{checked.url} did not answer within {timeout_s:g} s.") from None
    except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
        raise SmartProbeFailed(f"{checked.url} is unreachable ({type(exc).__name__}).") from None
    if len(body) > max_bytes:
        raise SmartProbeFailed(f"The SMART configuration is larger than {max_bytes} bytes.")
    try:
        document: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise SmartProbeFailed(f"{discovery} is not JSON: not a SMART on FHIR server.") from None
    if not isinstance(document, dict):
        raise SmartProbeFailed(f"{discovery} is not a JSON object.")
    try:
        found = SmartConfiguration.model_validate(document)
    except ValidationError as exc:
        missing = ", ".join(sorted({str(e["loc"][0]) for e in exc.errors() if e["loc"]}))
        raise SmartProbeFailed(
            f"{discovery} is not a usable SMART configuration (problem with: {missing})."
        ) from None
    await _check_endpoints(found, checked)
    return found
