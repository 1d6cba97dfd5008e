from __future__ import annotations

import base64

import pytest
from pydantic import SecretStr

from libs.common.crypto import DEV_KEYRING, DecryptionError, FieldCipher, keyed_hash

OTHER_KEY = base64.b64encode(b"k" * 32).decode()


def test_round_trip_and_ciphertext_hides_the_value() -> None:
    """A phone number encrypts to ciphertext that neither contains it nor repeats."""
    cipher = FieldCipher(DEV_KEYRING, "dev1")
    first = cipher.encrypt("+15550101234", "patient-phone:apt_1")
    second = cipher.encrypt("+15550101234", "patient-phone:apt_1")
    assert "5550101234" not in first
    assert first != second
    assert cipher.decrypt(first, "patient-phone:apt_1") == "+15550101234"


def test_ciphertext_is_bound_to_its_purpose() -> None:
    """A ciphertext moved to another appointment or field does not decrypt."""
    cipher = FieldCipher(DEV_KEYRING, "dev1")
    token = cipher.encrypt("+15550101234", "patient-phone:apt_1")
    with pytest.raises(DecryptionError):
        cipher.decrypt(token, "patient-phone:apt_2")


@pytest.mark.parametrize(
    "token", ["", "plain", "enc:v1:dev1:", "enc:v1:nokey:AAAA", "enc:v2:dev1:AAAA"]
)
def test_garbage_is_refused(token: str) -> None:
    """Anything that is not our ciphertext raises DecryptionError, never crashes."""
    with pytest.raises(DecryptionError):
        FieldCipher(DEV_KEYRING, "dev1").decrypt(token, "p")


def test_tampered_ciphertext_is_refused() -> None:
    """Flipping one character breaks the GCM tag."""
    cipher = FieldCipher(DEV_KEYRING, "dev1")
    token = cipher.encrypt("secret", "p")
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(DecryptionError):
        cipher.decrypt(tampered, "p")


def test_rotation_old_values_still_decrypt() -> None:
    """After a new active key is added, values made with the old key still decrypt."""
    old = FieldCipher(DEV_KEYRING, "dev1").encrypt("secret", "p")
    ring = SecretStr(f'{{"dev1": "{DEV_KEYRING.get_secret_value()[10:-2]}", "k2": "{OTHER_KEY}"}}')
    rotated = FieldCipher(ring, "k2")
    assert rotated.decrypt(old, "p") == "secret"
    assert rotated.encrypt("x", "p").startswith("enc:v1:k2:")


def test_bad_keyring_is_refused() -> None:
    """A short key or a missing active key is a configuration error at start."""
    with pytest.raises(ValueError, match="32 bytes"):
        FieldCipher(SecretStr('{"k": "c2hvcnQ="}'), "k")
    with pytest.raises(ValueError, match="not in the keyring"):
        FieldCipher(DEV_KEYRING, "k9")


def test_keyed_hash_is_stable_and_purpose_bound() -> None:
    """The same number hashes the same way for one purpose and differently for another."""
    assert keyed_hash("s", "+15550101234", "opt-out") == keyed_hash("s", "+15550101234", "opt-out")
    assert keyed_hash("s", "+15550101234", "opt-out") != keyed_hash("s", "+15550101234", "x")
