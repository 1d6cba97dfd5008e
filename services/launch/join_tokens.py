"""Patient join links: `/join/<token>`, where the token names one appointment, is signed, and
carries nothing about the patient.

The signature is all a token proves: that we minted the link for that appointment. Whether
the link still opens the visit is the visit's to say, from its current row (patient.py:
cancelled, or over once its current end plus the grace period has passed), because a
reschedule moves the end and sends no new link (notify's notice repeats the booking's).
The token's `e` claim, the visit's end plus grace when the link was minted, is signed in as
before, so links already sent verify unchanged, but it is not checked: a link for a visit
moved later must keep working past it, and one for a visit moved earlier must stop before it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from datetime import datetime

import orjson

_KEY = re.compile(r"^apt_[0-9a-f]{40}$")


class JoinTokenError(Exception):
    """Tampered, forged or malformed; the message is safe to show the patient."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, body: str) -> str:
    return _b64(
        hmac.new(secret.encode(), b"join-link\x1f" + body.encode(), hashlib.sha256).digest()
    )


def mint(secret: str, appointment_key: str, expires_at: datetime) -> str:
    """A link for the appointment; `expires_at` (its end plus grace now) is informational."""
    body = _b64(orjson.dumps({"a": appointment_key, "e": int(expires_at.timestamp())}))
    return f"{body}.{_sign(secret, body)}"


def verify(secret: str, token: str) -> str:
    """The appointment key of a link we minted; raises JoinTokenError for anything forged,
    altered or garbled. No I/O: a link that is not ours never reaches the database."""
    # compare_digest refuses non-ASCII text (TypeError): such a token was never minted.
    if len(token) > 512 or not token.isascii() or token.count(".") != 1:
        raise JoinTokenError("This link is not valid.")
    body, signature = token.split(".")
    if not hmac.compare_digest(signature, _sign(secret, body)):
        raise JoinTokenError("This link is not valid.")
    try:
        claims = orjson.loads(_unb64(body))
        key = str(claims["a"])
        int(claims["e"])  # every link we minted has it: one without was not made by mint()
    except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        raise JoinTokenError("This link is not valid.") from None
    if not _KEY.match(key):
        raise JoinTokenError("This link is not valid.")
    return key
