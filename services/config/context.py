"""What every portal handler needs, and the refusal every layer raises."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg
from aiohttp import web

from libs.common.crypto import FieldCipher
from services.config.settings import ConfigSettings


class Refused(Exception):
    """A request that changes nothing: the status and a message safe to show the admin."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def not_found(what: str) -> Refused:
    # The same answer for "does not exist" and "belongs to another tenant": ids of other
    # tenants must not be confirmable.
    return Refused(404, f"No such {what}.")


@dataclass
class ConfigContext:
    settings: ConfigSettings
    pool: asyncpg.Pool
    cipher: FieldCipher
    # Set when a phone-number job is created or retried, so the worker starts at once.
    jobs_wake: asyncio.Event = field(default_factory=asyncio.Event)
    # One RSA key check at a time: OpenSSL's check holds the GIL even in a worker thread, so
    # concurrent saves take turns and the event loop runs between them.
    key_check: asyncio.Lock = field(default_factory=asyncio.Lock)


CONTEXT = web.AppKey("config_context", ConfigContext)
