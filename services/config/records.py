"""The integration records the Cerner admin pastes into Cerner. Derived from settings and
the integration id only, never typed, so they cannot drift from what the gateway serves."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from services.config.settings import ConfigSettings


@dataclass(frozen=True)
class IntegrationRecord:
    key: str
    label: str
    value: str
    where: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def provider_launch_url(settings: ConfigSettings, integration_id: uuid.UUID) -> str:
    return f"{settings.launch_public_base_url.rstrip('/')}/launch/provider/{integration_id}"


def patient_launch_url(settings: ConfigSettings, integration_id: uuid.UUID) -> str:
    return f"{settings.launch_public_base_url.rstrip('/')}/launch/patient/{integration_id}"


def integration_records(
    settings: ConfigSettings, integration_id: uuid.UUID, row: Mapping[str, Any] | Any
) -> list[IntegrationRecord]:
    return [
        IntegrationRecord(
            "provider_launch_url",
            "Provider launch URL",
            provider_launch_url(settings, integration_id),
            'Cerner Code Console: your provider (PowerChart) SMART app, field "SMART Launch'
            ' URI". Clinicians reach the Teams visit from PowerChart through it.',
        ),
        IntegrationRecord(
            "patient_launch_url",
            "Patient launch URL",
            patient_launch_url(settings, integration_id),
            'Cerner Code Console: your patient-facing SMART app, field "SMART Launch URI"'
            " (patient portal launches).",
        ),
        IntegrationRecord(
            "redirect_uri",
            "SMART redirect URI",
            f"{settings.launch_public_base_url.rstrip('/')}/launch/callback",
            'Cerner Code Console: the same SMART app, field "Redirect URI". The authorization'
            " server sends the clinician back here after sign-in.",
        ),
        IntegrationRecord(
            "fhir_base_url",
            "FHIR base URL (iss)",
            str(row["fhir_base_url"]),
            "Must equal, character for character, the FHIR server the Code Console app is"
            " registered against for this environment.",
        ),
        IntegrationRecord(
            "smart_client_id",
            "SMART client ID",
            str(row["smart_client_id"]),
            "Copied from the Code Console app into this portal; shown here to check both match.",
        ),
    ]
