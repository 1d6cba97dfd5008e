"""RS256 signing keys for Entra tokens, and their JWKS."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from sandbox.jwt_dates import numeric_date


class SigningKey:
    """One RSA key pair with a ``kid``."""

    def __init__(self) -> None:
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pub = self.private.public_key()
        self.public = pub
        der_n = pub.public_numbers().n.to_bytes(256, "big")
        self.kid = hashlib.sha256(der_n).hexdigest()[:27]

    def jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.public, as_dict=True)
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256", "kty": "RSA"})
        return jwk


class KeySet:
    """The active signing key plus the JWKS document that publishes it."""

    def __init__(self) -> None:
        self.active = SigningKey()
        self._keys = {self.active.kid: self.active}

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.jwk() for k in self._keys.values()]}

    def sign(self, claims: dict[str, Any]) -> str:
        headers = {"kid": self.active.kid, "typ": "JWT"}
        return jwt.encode(claims, self.active.private, algorithm="RS256", headers=headers)

    def verify(self, token: str, *, audience: str | list[str], now: datetime) -> dict[str, Any]:
        """Verify signature, audience and lifetime against ``now``; raise jwt errors."""
        header = jwt.get_unverified_header(token)
        key = self._keys.get(str(header.get("kid")))
        if key is None:
            raise jwt.InvalidSignatureError("unknown kid")
        claims: dict[str, Any] = jwt.decode(
            token,
            key.public,
            algorithms=["RS256"],
            audience=audience,
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
        ts = now.timestamp()
        expires, not_before = numeric_date(claims, "exp"), numeric_date(claims, "nbf", 0)
        if expires is None or not_before is None:
            raise jwt.InvalidTokenError("exp and nbf must be numbers")
        if expires <= ts:
            raise jwt.ExpiredSignatureError("token expired")
        if not_before > ts + 300:
            raise jwt.ImmatureSignatureError("token not yet valid")
        return claims


def new_id() -> str:
    """A fresh GUID string."""
    return str(uuid.uuid4())
