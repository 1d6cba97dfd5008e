"""Patient join links: `/join/<token>`, where the token names one appointment, expires at the
appointment's end plus a grace period, is signed, and carries nothing about the patient."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from datetime import datetime

import orjson

_KEY = re.compile(r"^apt_[0-9a-f]{40}$")


class JoinTokenError(Exception):
    """Tampered, malformed or expired; the message is safe to show the patient."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, body: str) -> str:
    return _b64(
        hmac.new(secret.encode(), b"join-link\x1f" + body.encode(), hashlib.sha256).digest()
    )


def mint(secret: str, appointment_key: str, expires_at: datetime) -> str:
    body = _b64(orjson.dumps({"a": appointment_key, "e": int(expires_at.timestamp())}))
    return f"{body}.{_sign(secret, body)}"


def verify(secret: str, token: str, now: datetime) -> str:
    """The appointment key the token names; raises JoinTokenError otherwise."""
    # compare_digest refuses non-ASCII text (TypeError): such a token was never minted.
    if len(token) > 512 or not token.isascii() or token.count(".") != 1:
        raise JoinTokenError("This link is not valid.")
    body, signature = token.split(".")
    if not hmac.compare_digest(signature, _sign(secret, body)):
        raise JoinTokenError("This link is not valid.")
    try:
        claims = orjson.loads(_unb64(body))
        key, expires = str(claims["a"]), int(claims["e"])
    except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        raise JoinTokenError("This link is not valid.") from None
    if not _KEY.match(key):
        raise JoinTokenError("This link is not valid.")
    if now.timestamp() > expires:
        raise JoinTokenError("This visit is over, so its link has expired.")
    return key
