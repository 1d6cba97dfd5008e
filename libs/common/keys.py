"""Opaque, stable keys derived from identifiers we must not expose."""

from __future__ import annotations

import hashlib
import hmac
import uuid


def appointment_key(secret: str, integration_id: uuid.UUID, fhir_appointment_id: str) -> str:
    """Keyed hash of (integration, FHIR Appointment id): the Kafka key and the cross-service id.

    Keyed so that somebody holding a Kafka dump cannot confirm a guessed appointment id.
    """
    message = f"{integration_id}\x1f{fhir_appointment_id}".encode()
    return "apt_" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:40]
