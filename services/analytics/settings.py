from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from libs.common.settings import ServiceSettings


class AnalyticsSettings(ServiceSettings):
    service_name: ClassVar[str] = "analytics"

    http_port: int = Field(default=8083, ge=0, le=65535)
