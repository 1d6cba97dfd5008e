"""Azure Communication Services phone numbers API (HMAC-SHA256 authenticated).

Search and purchase are long-running operations: each POST answers 202 with an
`Operation-Location` to poll. Signed requests only ever go to the configured resource: an
`Operation-Location` on another origin is refused, so the access key's signatures cannot be
sent elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import orjson
from pydantic import SecretStr

SIGNED_HEADERS = "x-ms-date;host;x-ms-content-sha256"
MAX_RESPONSE_BYTES = 256 * 1024


class AcsError(Exception):
    """A call failed. `transient` errors (network, 429, 5xx) are worth retrying."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


class SearchAlreadyPurchased(Exception):
    """ACS says this search was purchased already (our earlier attempt got through)."""


@dataclass(frozen=True)
class OperationStatus:
    status: str  # notStarted | running | succeeded | failed
    error: str | None
    retry_after_s: float | None


@dataclass(frozen=True)
class StartedSearch:
    operation_url: str
    search_id: str


def sign(access_key: str, method: str, url: str, body: bytes, now: datetime) -> dict[str, str]:
    """The three headers ACS HMAC authentication needs."""
    parts = urlsplit(url)
    path_and_query = parts.path + (f"?{parts.query}" if parts.query else "")
    date = format_datetime(now.astimezone(UTC), usegmt=True)
    body_hash = base64.b64encode(hashlib.sha256(body).digest()).decode()
    to_sign = f"{method.upper()}\n{path_and_query}\n{date};{parts.netloc};{body_hash}"
    mac = hmac.new(base64.b64decode(access_key), to_sign.encode(), hashlib.sha256)
    return {
        "x-ms-date": date,
        "x-ms-content-sha256": body_hash,
        "Authorization": f"HMAC-SHA256 SignedHeaders={SIGNED_HEADERS}"
        f"&Signature={base64.b64encode(mac.digest()).decode()}",
    }


def _retry_after(headers: Any) -> float | None:
    try:
        return float(headers.get("Retry-After", ""))
    except ValueError:
        return None


class AcsPhoneNumbers:
    def __init__(
        self,
        endpoint: str,
        access_key: SecretStr,
        *,
        api_version: str,
        ssl_context: ssl.SSLContext,
        timeout_s: float,
    ) -> None:
        self._endpoint = endpoint.rstrip("/")
        origin = urlsplit(self._endpoint)
        self._origin = (origin.scheme, origin.netloc)
        self._key = access_key
        self._api_version = api_version
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    def _url(self, path: str) -> str:
        return f"{self._endpoint}{path}?api-version={self._api_version}"

    def _same_origin(self, url: str) -> str:
        absolute = urljoin(self._endpoint + "/", url)
        parts = urlsplit(absolute)
        if (parts.scheme, parts.netloc) != self._origin:
            raise AcsError("ACS pointed at another host; refusing to follow.", transient=False)
        return absolute

    async def _call(
        self, method: str, url: str, document: dict[str, Any] | None = None
    ) -> tuple[int, Any, dict[str, Any]]:
        body = b"" if document is None else orjson.dumps(document)
        headers = sign(self._key.get_secret_value(), method, url, body, datetime.now(UTC))
        if document is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout, trust_env=False) as http,
                http.request(
                    method, url, data=body or None, headers=headers, ssl=self._ssl,
                    allow_redirects=False,
                ) as response,
            ):  # fmt: skip
                raw = await response.content.read(MAX_RESPONSE_BYTES)
                status, response_headers = response.status, response.headers
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise AcsError(f"ACS is unreachable ({type(exc).__name__}).", transient=True) from None
        try:
            parsed: Any = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            parsed = {}
        if status == 429 or status >= 500:
            raise AcsError(f"ACS answered HTTP {status}; will retry.", transient=True)
        return status, parsed, dict(response_headers)

    @staticmethod
    def _refusal(status: int, parsed: Any) -> AcsError:
        detail = parsed.get("error", {}) if isinstance(parsed, dict) else {}
        message = detail.get("message") if isinstance(detail, dict) else None
        if status == 401:
            return AcsError("ACS refused our credentials (check acs_access_key).", transient=False)
        return AcsError(f"ACS refused the request (HTTP {status}): {message or 'no detail'}",
                        transient=False)  # fmt: skip

    async def start_search(self, country: str) -> StartedSearch:
        url = self._url(f"/availablePhoneNumbers/countries/{country}/:search")
        body = {
            "phoneNumberType": "tollFree",
            "assignmentType": "application",
            "capabilities": {"sms": "inbound+outbound", "calling": "none"},
            "quantity": 1,
        }
        status, parsed, headers = await self._call("POST", url, body)
        if status != 202:
            raise self._refusal(status, parsed)
        location = headers.get("Operation-Location") or headers.get("operation-location")
        search_id = headers.get("search-id")
        if not location or not search_id:
            raise AcsError("ACS accepted the search but named no operation.", transient=False)
        return StartedSearch(self._same_origin(location), search_id)

    async def operation(self, operation_url: str) -> OperationStatus:
        status, parsed, headers = await self._call("GET", self._same_origin(operation_url))
        if status != 200 or not isinstance(parsed, dict):
            raise self._refusal(status, parsed)
        error = parsed.get("error")
        message = None
        if isinstance(error, dict):
            message = f"{error.get('code', 'Error')}: {error.get('message', 'no detail')}"
        return OperationStatus(str(parsed.get("status", "")), message, _retry_after(headers))

    async def search_result(self, search_id: str) -> list[str]:
        status, parsed, _ = await self._call(
            "GET", self._url(f"/availablePhoneNumbers/searchResults/{search_id}")
        )
        if status != 200 or not isinstance(parsed, dict):
            raise self._refusal(status, parsed)
        numbers = parsed.get("phoneNumbers")
        return [str(n) for n in numbers] if isinstance(numbers, list) else []

    async def start_purchase(self, search_id: str) -> str:
        status, parsed, headers = await self._call(
            "POST", self._url("/availablePhoneNumbers/:purchase"), {"searchId": search_id}
        )
        if status == 409:
            raise SearchAlreadyPurchased(search_id)
        if status != 202:
            raise self._refusal(status, parsed)
        location = headers.get("Operation-Location") or headers.get("operation-location")
        if not location:
            raise AcsError("ACS accepted the purchase but named no operation.", transient=False)
        return self._same_origin(location)

    async def owns(self, e164: str) -> bool:
        status, parsed, _ = await self._call(
            "GET", self._url(f"/phoneNumbers/%2B{e164.lstrip('+')}")
        )
        if status == 404:
            return False
        if status != 200:
            raise self._refusal(status, parsed)
        return True
