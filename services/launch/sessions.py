"""Server-side sessions for the clinician's provider page, started by a SMART launch."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
from aiohttp import web

from libs.common.crypto import FieldCipher

PROVIDER_COOKIE = "provider_session"


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


async def start_session(
    pool: asyncpg.Pool,
    cipher: FieldCipher,
    *,
    integration_id: uuid.UUID,
    ehr_user_id: str,
    appointment_key: str | None,
    candidates: list[dict[str, str]],
    smart_tokens: dict[str, str | None],
    ttl_s: int,
) -> str:
    token = secrets.token_urlsafe(32)
    purpose = f"provider-session:{integration_id}"
    await pool.execute(
        "INSERT INTO provider_sessions (token_hash, integration_id, ehr_user_id, appointment_key,"
        " candidates, smart_tokens, csrf_token, expires_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
        _digest(token),
        integration_id,
        ehr_user_id,
        appointment_key,
        cipher.encrypt(orjson.dumps(candidates).decode(), purpose) if candidates else None,
        cipher.encrypt(orjson.dumps(smart_tokens).decode(), purpose),
        secrets.token_urlsafe(32),
        datetime.now(UTC) + timedelta(seconds=ttl_s),
    )
    return token


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
    response.set_cookie(
        PROVIDER_COOKIE, token, max_age=ttl_s, httponly=True, secure=True, samesite="Lax"
    )
