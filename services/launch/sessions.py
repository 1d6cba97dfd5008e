"""Server-side sessions for the clinician's provider page, started by a SMART launch."""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
from aiohttp import hdrs, web

from libs.common.crypto import FieldCipher

PROVIDER_COOKIE = "provider_session"
_COOKIE_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")


@dataclass(frozen=True)
class ProviderSession:
    token_hash: bytes
    integration_id: uuid.UUID
    ehr_user_id: str
    appointment_key: str | None
    candidates: list[dict[str, str]]
    csrf_token: str


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


_SESSION_COLUMNS = (
    "token_hash, integration_id, ehr_user_id, appointment_key, candidates, smart_tokens,"
    " csrf_token, expires_at"
)
# The types of NewSession.values(), in order.
_SESSION_TYPES = ("bytea", "uuid", "text", "text", "text", "text", "timestamptz")


def _session_values(key: str, first: int) -> str:
    """A session row's values in _SESSION_COLUMNS' order: `key` the visit's appointment key
    (a parameter, NULL while the clinician chooses among several visits), NewSession.values()
    from parameter `first` on."""
    token_hash, integration_id, ehr_user_id, candidates, smart_tokens, csrf_token, expires_at = (
        f"${first + i}::{kind}" for i, kind in enumerate(_SESSION_TYPES)
    )
    return (
        f"{token_hash}, {integration_id}, {ehr_user_id}, {key}, {candidates}, {smart_tokens},"
        f" {csrf_token}, {expires_at}"
    )


def insert_session_sql(key: str, first: int) -> str:
    """The INSERT starting a session, for a statement holding the visit's appointment key in
    parameter `key` (e.g. "$1::text") and NewSession.values() from parameter `first` on."""
    return (
        f"INSERT INTO provider_sessions ({_SESSION_COLUMNS})"  # noqa: S608
        f" VALUES ({_session_values(key, first)})"
    )


# $1 the visit's appointment key, $2.. NewSession.values().
_SESSION_VALUES = _session_values("$1::text", 2)
_INSERT_SESSION = insert_session_sql("$1::text", 2)
# A clinician's launch of a visit that has its meeting (the usual case: prepared a day ahead)
# records the clinician on the visit and starts their session in one statement, one round
# trip where there were two. A visit that is unknown, or still without its meeting, gets no
# session here: the launch makes or waits for the meeting and then starts it.
_RECORD_CLINICIAN_STARTING_SESSION = (
    "WITH visit AS (UPDATE appointments SET ehr_user_id = $4, updated_at = now()"  # noqa: S608
    " WHERE appointment_key = $1 RETURNING meeting_id IS NOT NULL AS has_meeting),"
    f" started AS (INSERT INTO provider_sessions ({_SESSION_COLUMNS})"
    f" SELECT {_SESSION_VALUES} FROM visit WHERE has_meeting)"
    " SELECT has_meeting FROM visit"
)


@dataclass(frozen=True)
class NewSession:
    """A session sealed and ready to store. `token` goes in the cookie; only its hash is
    stored. Built before its visit is known, so that the statement recording the clinician
    on the visit can start it too."""

    token: str = field(repr=False)
    integration_id: uuid.UUID
    ehr_user_id: str
    candidates: str | None  # ciphertext
    smart_tokens: str  # ciphertext
    csrf_token: str = field(repr=False)
    expires_at: datetime

    def values(self) -> tuple[object, ...]:
        return (
            _digest(self.token),
            self.integration_id,
            self.ehr_user_id,
            self.candidates,
            self.smart_tokens,
            self.csrf_token,
            self.expires_at,
        )


def new_session(
    cipher: FieldCipher,
    *,
    integration_id: uuid.UUID,
    ehr_user_id: str,
    candidates: list[dict[str, str]],
    smart_tokens: dict[str, str | None],
    ttl_s: int,
) -> NewSession:
    purpose = f"provider-session:{integration_id}"
    return NewSession(
        token=secrets.token_urlsafe(32),
        integration_id=integration_id,
        ehr_user_id=ehr_user_id,
        candidates=(
            cipher.encrypt(orjson.dumps(candidates).decode(), purpose) if candidates else None
        ),
        smart_tokens=cipher.encrypt(orjson.dumps(smart_tokens).decode(), purpose),
        csrf_token=secrets.token_urlsafe(32),
        expires_at=datetime.now(UTC) + timedelta(seconds=ttl_s),
    )


async def start_session(
    pool: asyncpg.Pool, session: NewSession, appointment_key: str | None
) -> None:
    await pool.execute(_INSERT_SESSION, appointment_key, *session.values())


async def record_clinician_starting_session(
    pool: asyncpg.Pool, appointment_key: str, session: NewSession
) -> bool | None:
    """Records the session's clinician (their EHR user id) on the visit, and starts the
    session if the visit has its meeting. None when the visit is unknown, False when it has
    no meeting yet: no session was started then."""
    has_meeting: bool | None = await pool.fetchval(
        _RECORD_CLINICIAN_STARTING_SESSION, appointment_key, *session.values()
    )
    return has_meeting


def session_token_hash(request: web.Request) -> bytes | None:
    """The hash of the presented session cookie, as stored; None when there is none."""
    token = request.cookies.get(PROVIDER_COOKIE, "")
    # Our tokens are URL-safe ASCII; a cookie that is not UTF-8 arrives with surrogates.
    if not token or len(token) > 128 or not token.isascii():
        return None
    return _digest(token)


async def current_session(
    request: web.Request, pool: asyncpg.Pool, cipher: FieldCipher
) -> ProviderSession | None:
    token_hash = session_token_hash(request)
    if token_hash is None:
        return None
    row = await pool.fetchrow(
        "SELECT token_hash, integration_id, ehr_user_id, appointment_key, candidates, csrf_token"
        " FROM provider_sessions WHERE token_hash = $1 AND expires_at > now()",
        token_hash,
    )
    if row is None:
        return None
    candidates: list[dict[str, str]] = []
    if row["candidates"]:
        candidates = orjson.loads(
            cipher.decrypt(row["candidates"], f"provider-session:{row['integration_id']}")
        )
    return ProviderSession(
        row["token_hash"],
        row["integration_id"],
        row["ehr_user_id"],
        row["appointment_key"],
        candidates,
        row["csrf_token"],
    )


def set_session_cookie(response: web.StreamResponse, token: str, ttl_s: int) -> None:
    """The header `response.set_cookie` writes, byte for byte, without its SimpleCookie and
    Morsel (10 us): the token is ours, URL-safe base64, with nothing to quote."""
    if not _COOKIE_TOKEN.fullmatch(token):
        raise ValueError("a session token is URL-safe base64")
    response.headers.add(
        hdrs.SET_COOKIE,
        f"{PROVIDER_COOKIE}={token}; HttpOnly; Max-Age={int(ttl_s)}; Path=/; SameSite=Lax; Secure",
    )
