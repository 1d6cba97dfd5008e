"""ACS HMAC-SHA256 request authentication (server side, plus a signer for tests/demos)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime
from urllib.parse import urlsplit

from aiohttp import web

from sandbox.microsoft.clock import parse_rfc1123, rfc1123

SIGNED_HEADERS = "x-ms-date;host;x-ms-content-sha256"


class HmacError(Exception):
    """Authentication failed; ACS answers 401."""


def content_hash(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(body).digest()).decode()


def signature(access_key: str, method: str, path_and_query: str, date: str, host: str,
              body_hash: str) -> str:  # fmt: skip
    """base64(HMAC-SHA256(base64decode(key), "METHOD\\npath?query\\ndate;host;hash"))."""
    to_sign = f"{method.upper()}\n{path_and_query}\n{date};{host};{body_hash}"
    mac = hmac.new(base64.b64decode(access_key), to_sign.encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def sign_request(
    access_key: str, method: str, url: str, body: bytes, now: datetime
) -> dict[str, str]:
    """Headers an ACS client sends (x-ms-date, x-ms-content-sha256, Authorization)."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    date = rfc1123(now)
    body_hash = content_hash(body)
    sig = signature(access_key, method, path, date, parts.netloc, body_hash)
    return {
        "x-ms-date": date,
        "x-ms-content-sha256": body_hash,
        "Authorization": f"HMAC-SHA256 SignedHeaders={SIGNED_HEADERS}&Signature={sig}",
    }


def verify(request: web.Request, body: bytes, access_key: str, now: datetime,
           max_skew_s: int) -> None:  # fmt: skip
    """Check date skew, content hash and signature; raise HmacError on any mismatch."""
    date = request.headers.get("x-ms-date") or request.headers.get("Date")
    if not date:
        raise HmacError("missing x-ms-date")
    try:
        sent = parse_rfc1123(date)
    except ValueError as exc:
        raise HmacError("malformed x-ms-date") from exc
    if abs((now - sent).total_seconds()) > max_skew_s:
        raise HmacError("x-ms-date outside the allowed clock skew")
    claimed = request.headers.get("x-ms-content-sha256", "")
    # As bytes: compare_digest refuses str with non-ASCII characters (a 500, not a 401).
    if not hmac.compare_digest(claimed.encode(), content_hash(body).encode()):
        raise HmacError("x-ms-content-sha256 does not match the body")
    auth = request.headers.get("Authorization", "")
    scheme, _, params = auth.partition(" ")
    if scheme != "HMAC-SHA256":
        raise HmacError("Authorization scheme must be HMAC-SHA256")
    fields = dict(p.split("=", 1) for p in params.split("&") if "=" in p)
    if fields.get("SignedHeaders", "").lower() != SIGNED_HEADERS:
        raise HmacError("SignedHeaders must be x-ms-date;host;x-ms-content-sha256")
    expected = signature(access_key, request.method, request.raw_path, date, request.host, claimed)
    if not hmac.compare_digest(fields.get("Signature", "").encode(), expected.encode()):
        raise HmacError("signature mismatch")


def denied(reason: str) -> web.Response:
    """ACS's 401 body."""
    return web.json_response(
        {"error": {"code": "Denied", "message": f"Denied by the resource provider. {reason}"}},
        status=401,
    )
