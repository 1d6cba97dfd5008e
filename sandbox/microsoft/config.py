"""Settings of the Microsoft stand-in (CLI flags and environment variables map onto these)."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.microsoft.clock import Clock, SystemClock
from sandbox.tls import DEFAULT_TLS_DIR

# A fixed, obviously-fake ACS access key so demos and tests can sign requests.
DEFAULT_ACS_ACCESS_KEY = base64.b64encode(b"ehr-video-visit-sandbox-acs-key!").decode()
DEFAULT_NOTIFICATION_RETRY_DELAYS = (0.05, 0.2, 1.0, 5.0, 30.0)


@dataclass
class SandboxConfig:
    """Everything the stand-in can be told at start-up."""

    host: str = "127.0.0.1"
    port: int = 9443
    tls_dir: Path = DEFAULT_TLS_DIR
    clock: Clock = field(default_factory=SystemClock)
    # Entra
    access_token_lifetime_s: int = 3599
    id_token_lifetime_s: int = 3600
    extra_redirect_uris: tuple[str, ...] = ()
    # Graph
    validation_timeout_s: float = 10.0
    notification_retry_delays: tuple[float, ...] = DEFAULT_NOTIFICATION_RETRY_DELAYS
    # ACS
    acs_access_key: str = DEFAULT_ACS_ACCESS_KEY
    acs_max_clock_skew_s: int = 15 * 60
    sms_rate_per_minute: int = 200
    sms_webhook_url: str | None = None
    owned_numbers: tuple[str, ...] = ("+18005550100",)
    lro_delay_s: float = 3.0
    # Numbers bought survive a restart when set, as they do at the real ACS resource.
    numbers_state_file: Path | None = None

    @classmethod
    def from_env(cls) -> SandboxConfig:
        """Read ``MS_SANDBOX_*`` environment variables."""
        env = os.environ
        cfg = cls()
        cfg.host = env.get("MS_SANDBOX_HOST", cfg.host)
        cfg.port = int(env.get("MS_SANDBOX_PORT", cfg.port))
        cfg.tls_dir = Path(env.get("MS_SANDBOX_TLS_DIR", str(cfg.tls_dir)))
        cfg.acs_access_key = env.get("MS_SANDBOX_ACS_ACCESS_KEY", cfg.acs_access_key)
        cfg.sms_webhook_url = env.get("MS_SANDBOX_SMS_WEBHOOK_URL") or None
        cfg.lro_delay_s = float(env.get("MS_SANDBOX_LRO_DELAY_S", cfg.lro_delay_s))
        uris = env.get("MS_SANDBOX_REDIRECT_URIS", "")
        cfg.extra_redirect_uris = tuple(u.strip() for u in uris.split(",") if u.strip())
        state_file = env.get("MS_SANDBOX_NUMBERS_STATE_FILE")
        cfg.numbers_state_file = Path(state_file) if state_file else None
        numbers = env.get("MS_SANDBOX_OWNED_NUMBERS")
        if numbers is not None:
            cfg.owned_numbers = tuple(n.strip() for n in numbers.split(",") if n.strip())
        return cfg
