"""Field-level encryption for the few values we must carry or keep (a patient's phone
number until the visit ends, an integration's SMART secret).

AES-256-GCM with a key ring: ciphertext names the key that made it, so keys rotate without
re-encrypting old values at once. Every value is bound to its purpose through the associated
data (for example "patient-phone:<appointment key>"), so a ciphertext copied into another
field or another appointment does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import SecretStr

PREFIX = "enc:v1"
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
# For local runs and tests only; deploy/ supplies real keys from a Secret.
DEV_KEYRING = SecretStr('{"dev1": "ZGV2LW9ubHktZmllbGQta2V5LW5vdC1mb3ItcHJvZCE="}')


class DecryptionError(Exception):
    """The value is not ours, was tampered with, or belongs to another purpose."""


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FieldCipher:
    def __init__(self, keyring: SecretStr, active_key_id: str) -> None:
        try:
            entries = orjson.loads(keyring.get_secret_value())
            keys = {kid: base64.b64decode(value) for kid, value in entries.items()}
        except (orjson.JSONDecodeError, AttributeError, binascii.Error, TypeError) as exc:
            raise ValueError("field encryption keyring must be JSON {key_id: base64 key}") from exc
        for kid, key in keys.items():
            if not _KEY_ID.match(kid) or len(key) != 32:
                raise ValueError(f"field encryption key {kid!r} must be 32 bytes, id [A-Za-z0-9_-]")
        if active_key_id not in keys:
            raise ValueError(f"active field encryption key {active_key_id!r} is not in the keyring")
        self._keys = {kid: AESGCM(key) for kid, key in keys.items()}
        self._active = active_key_id

    def encrypt(self, plaintext: str, purpose: str) -> str:
        nonce = os.urandom(12)
        sealed = self._keys[self._active].encrypt(nonce, plaintext.encode(), purpose.encode())
        body = base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
        return f"{PREFIX}:{self._active}:{body}"

    def decrypt(self, token: str, purpose: str) -> str:
        try:
            prefix_a, prefix_b, kid, body = token.split(":", 3)
        except ValueError:
            raise DecryptionError("not an encrypted field") from None
        if f"{prefix_a}:{prefix_b}" != PREFIX or kid not in self._keys:
            raise DecryptionError("unknown encryption format or key")
        try:
            raw = _b64decode(body)
            return self._keys[kid].decrypt(raw[:12], raw[12:], purpose.encode()).decode()
        except (InvalidTag, ValueError, binascii.Error):
            raise DecryptionError("ciphertext does not verify for this purpose") from None


def keyed_hash(secret: str, value: str, purpose: str) -> str:
    """A stable, non-reversible stand-in for a value (e.g. an opted-out phone number)."""
    return hmac.new(secret.encode(), f"{purpose}\x1f{value}".encode(), hashlib.sha256).hexdigest()
