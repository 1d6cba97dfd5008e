from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr

from libs.common.settings import ServiceSettings


class LaunchSettings(ServiceSettings):
    service_name: ClassVar[str] = "launch"

    http_port: int = Field(default=8080, ge=0, le=65535)
    public_base_url: str = "http://127.0.0.1:8080"
    # Bearer token the EHR-side scheduling feed presents until the signed webhook replaces it.
    scheduling_api_token: SecretStr = SecretStr("dev-only-scheduling-token-change-me")
