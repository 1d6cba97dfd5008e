from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from libs.common.settings import ServiceSettings


class NotifySettings(ServiceSettings):
    service_name: ClassVar[str] = "notify"

    http_port: int = Field(default=8082, ge=0, le=65535)
