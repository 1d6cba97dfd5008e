from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from libs.common.portal_auth import PortalSettings


class ConfigSettings(PortalSettings):
    service_name: ClassVar[str] = "config"

    http_port: int = Field(default=8081, ge=0, le=65535)
    public_base_url: str = "http://127.0.0.1:8081"
