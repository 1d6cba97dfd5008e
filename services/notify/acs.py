"""Azure Communication Services SMS adapter: `POST /sms?api-version=2021-03-07`, HMAC-signed.

It returns what happened without deciding what to do about it; the dispatcher retries,
dead-letters or records. The recipient number passes through here and nowhere else in clear.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime
from typing import Any, get_args
from urllib.parse import urlsplit

import aiohttp
import orjson
from pydantic import SecretStr

from libs.common.events import SmsKind
from services.notify.clock import Clock

API_VERSION = "2021-03-07"
SIGNED_HEADERS = "x-ms-date;host;x-ms-content-sha256"
# The send's tag, which ACS gives back in the message's delivery report: the kind and the
# message's repeatabilityRequestId (stable across its re-sends, a UUIDv5 of its planning key,
# which ACS has already: nothing personal), 56 characters at most. A report whose answer was
# lost is matched to its message by it. The only shape accepted back: lowercase, canonical.
_KINDS: dict[str, SmsKind] = {kind: kind for kind in get_args(SmsKind)}
_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_TAG = re.compile(f"notify:({'|'.join(_KINDS)}):({_UUID})")


def rfc1123(moment: datetime) -> str:
    return format_datetime(moment, usegmt=True)


def content_hash(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(body).digest()).decode()


def sign(
    access_key: SecretStr, method: str, url: str, body: bytes, moment: datetime
) -> dict[str, str]:
    """The headers of ACS's HMAC-SHA256 scheme, Host included because it is signed."""
    parts = urlsplit(url)
    path_and_query = parts.path + (f"?{parts.query}" if parts.query else "")
    date = rfc1123(moment)
    body_hash = content_hash(body)
    to_sign = f"{method.upper()}\n{path_and_query}\n{date};{parts.netloc};{body_hash}"
    key = base64.b64decode(access_key.get_secret_value())
    signature = base64.b64encode(hmac.new(key, to_sign.encode(), hashlib.sha256).digest())
    return {
        "Host": parts.netloc,
        "x-ms-date": date,
        "x-ms-content-sha256": body_hash,
        "Authorization": (
            f"HMAC-SHA256 SignedHeaders={SIGNED_HEADERS}&Signature={signature.decode()}"
        ),
        "Content-Type": "application/json",
    }


def send_tag(kind: SmsKind, repeatability_request_id: uuid.UUID) -> str:
    return f"notify:{kind}:{repeatability_request_id}"


@dataclass(frozen=True)
class SentTag:
    kind: SmsKind
    repeatability_request_id: uuid.UUID


def parse_tag(tag: str | None) -> SentTag | None:
    """The message a delivery report's tag names, or None: no tag, another sender's, the
    format before it named the message (`notify:<kind>`), or anything not exactly the shape
    `send_tag` makes."""
    match = _TAG.fullmatch(tag) if tag is not None else None
    if match is None:
        return None
    return SentTag(_KINDS[match.group(1)], uuid.UUID(match.group(2)))


@dataclass(frozen=True)
class SendResult:
    """One recipient's outcome. `status` is the HTTP status of the call (0: no answer);
    `recipient_status` the per-recipient httpStatusCode when the call was accepted."""

    status: int
    message_id: str | None = None
    recipient_status: int | None = None
    repeatability_result: str | None = None
    error_code: str | None = None
    retry_after_s: float | None = None

    @property
    def accepted(self) -> bool:
        return (
            self.status == 202
            and self.message_id is not None
            and self.recipient_status
            in (
                200,
                202,
            )
        )

    @property
    def unanswered(self) -> bool:
        """Whether the message may have gone without our knowing: no answer, or a call
        accepted whose per-recipient answer could not be read."""
        return self.status == 0 or (self.status == 202 and self.recipient_status is None)

    @property
    def retryable(self) -> bool:
        effective = self.recipient_status if self.status == 202 else self.status
        return effective is None or effective == 0 or effective == 429 or effective >= 500


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class AcsSmsClient:
    def __init__(
        self,
        endpoint: str,
        access_key: SecretStr,
        session: aiohttp.ClientSession,
        clock: Clock,
        timeout_s: float,
    ) -> None:
        self._url = f"{endpoint.rstrip('/')}/sms?api-version={API_VERSION}"
        self._key = access_key
        self._session = session
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def send(
        self,
        *,
        sender: str,
        to: str,
        message: str,
        repeatability_request_id: uuid.UUID,
        repeatability_first_sent: datetime,
        tag: str,
    ) -> SendResult:
        body = orjson.dumps(
            {
                "from": sender,
                "smsRecipients": [
                    {
                        "to": to,
                        "repeatabilityRequestId": str(repeatability_request_id),
                        "repeatabilityFirstSent": rfc1123(repeatability_first_sent),
                    }
                ],
                "message": message,
                "smsSendOptions": {"enableDeliveryReport": True, "tag": tag},
            }
        )
        headers = sign(self._key, "POST", self._url, body, self._clock.now())
        try:
            async with self._session.post(
                self._url, data=body, headers=headers, timeout=self._timeout
            ) as response:
                document = await _json(response)
                retry_after = _retry_after(response.headers.get("Retry-After"))
                if response.status != 202:
                    return SendResult(
                        status=response.status,
                        error_code=_error_code(document),
                        retry_after_s=retry_after,
                    )
        except (aiohttp.ClientError, TimeoutError):
            # No answer: the message may or may not have gone; the repeatability id makes
            # the retry safe either way.
            return SendResult(status=0, error_code="no-response")
        return _recipient_result(document)


async def _json(response: aiohttp.ClientResponse) -> Any:
    try:
        return orjson.loads(await response.read())
    except orjson.JSONDecodeError:
        return None


def _error_code(document: Any) -> str | None:
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        code = document["error"].get("code")
        return str(code)[:64] if code else None
    return None


def _recipient_result(document: Any) -> SendResult:
    values = document.get("value") if isinstance(document, dict) else None
    if not isinstance(values, list) or len(values) != 1 or not isinstance(values[0], dict):
        return SendResult(status=202, error_code="malformed-response")
    item = values[0]
    status = item.get("httpStatusCode")
    message_id = item.get("messageId")
    return SendResult(
        status=202,
        message_id=str(message_id)[:200] if message_id else None,
        recipient_status=int(status) if isinstance(status, int) else None,
        repeatability_result=item.get("repeatabilityResult"),
        # errorMessage is free text that may quote the number; keep only the status.
        error_code=None if item.get("successful") else f"recipient-{status}",
    )
