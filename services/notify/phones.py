"""Patient phone numbers: decrypted only to send, normalised to E.164, never logged."""

from __future__ import annotations

from dataclasses import dataclass

import phonenumbers

from libs.common.crypto import DecryptionError, FieldCipher, keyed_hash

RECIPIENT_HASH_PURPOSE = "sms-recipient"


def phone_purpose(appointment_key: str) -> str:
    return f"patient-phone:{appointment_key}"


@dataclass(frozen=True)
class Refusal:
    """Why a number cannot be messaged; the reason never contains the number."""

    reason: str


def normalise(raw: str, default_region: str) -> str | Refusal:
    """E.164 for a mobile-capable, valid number, or the reason it is refused."""
    try:
        parsed = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException as exc:
        return Refusal(f"unparseable number (parse error {exc.error_type})")
    if not phonenumbers.is_possible_number(parsed):
        return Refusal("impossible number (wrong length for its country)")
    if not phonenumbers.is_valid_number(parsed):
        return Refusal("invalid number (no such range in its country)")
    kind = phonenumbers.number_type(parsed)
    if kind in (
        phonenumbers.PhoneNumberType.FIXED_LINE,
        phonenumbers.PhoneNumberType.PREMIUM_RATE,
        phonenumbers.PhoneNumberType.SHARED_COST,
        phonenumbers.PhoneNumberType.VOIP,
        phonenumbers.PhoneNumberType.PAGER,
        phonenumbers.PhoneNumberType.UAN,
        phonenumbers.PhoneNumberType.VOICEMAIL,
    ):
        return Refusal(f"number cannot receive SMS ({kind_name(kind)})")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def kind_name(kind: int) -> str:
    for name in dir(phonenumbers.PhoneNumberType):
        if getattr(phonenumbers.PhoneNumberType, name) == kind:
            return name.lower()
    return "unknown"


def recipient(
    cipher: FieldCipher, ciphertext: str | None, appointment_key: str, default_region: str
) -> str | Refusal:
    """The E.164 number to send to, decrypted just now, or the reason there is none."""
    if not ciphertext:
        return Refusal("no number on file")
    try:
        raw = cipher.decrypt(ciphertext, phone_purpose(appointment_key))
    except DecryptionError:
        return Refusal("number does not decrypt for this appointment")
    return normalise(raw, default_region)


def recipient_hash(secret: str, e164: str) -> str:
    return keyed_hash(secret, e164, RECIPIENT_HASH_PURPOSE)


class RecipientHasher:
    """The keyed hash stored beside a patient's number (appointments.recipient_hash): the
    recipient_hash of its E.164 form, which a STOP from that number carries, so the
    appointments holding it are found without decrypting every number held."""

    def __init__(self, cipher: FieldCipher, secret: str, default_region: str) -> None:
        self._cipher = cipher
        self._secret = secret
        self._region = default_region

    def of(self, e164: str) -> str:
        return recipient_hash(self._secret, e164)

    def held(self, ciphertext: str | None, appointment_key: str) -> str | None:
        """None when no number is held; "" for one that does not decrypt or that SMS cannot
        go to (never a recipient, so no reply is matched to it)."""
        if ciphertext is None:
            return None
        to = recipient(self._cipher, ciphertext, appointment_key, self._region)
        return "" if isinstance(to, Refusal) else self.of(to)
