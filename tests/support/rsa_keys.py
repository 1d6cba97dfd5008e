"""Private keys for the key-handling tests, built without a key generator's wait."""

from __future__ import annotations

import math
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def pem(key: Any) -> str:
    """A private key as unencrypted PKCS#8 PEM."""
    return str(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
    )


def mersenne_rsa_key(p_exponent: int, q_exponent: int) -> str:
    """A genuine RSA key whose primes are Mersenne primes: built at once, however large, and
    as slow to check as any key of its size."""
    p, q, e = 2**p_exponent - 1, 2**q_exponent - 1, 65537
    d = pow(e, -1, math.lcm(p - 1, q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
    )
    return pem(numbers.private_key(unsafe_skip_rsa_key_validation=True))
