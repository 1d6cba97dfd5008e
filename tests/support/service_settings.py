"""Settings of the config and analytics services under test: on a free port, signing in at the
Microsoft stand-in, trusting its CA. Shared by their test packages and the hostile suite."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sandbox.microsoft.app import RunningSandbox
from services.analytics.settings import AnalyticsSettings
from services.config.settings import ConfigSettings
from tests.conftest import free_port


def config_test_settings(
    make_settings: Callable[..., Any], microsoft: RunningSandbox, ca_bundle: str
) -> ConfigSettings:
    port = free_port()
    settings: ConfigSettings = make_settings(
        ConfigSettings,
        http_port=port,
        public_base_url=f"http://127.0.0.1:{port}",
        entra_authority_host=microsoft.base_url,
        acs_endpoint=microsoft.base_url,
        tls_ca_bundle=ca_bundle,
        allow_loopback_http=True,
        smart_probe_timeout_s=2.0,
        phone_job_poll_interval_s=0.05,
        launch_public_base_url="https://launch.example.test",
    )
    return settings


def analytics_test_settings(
    make_settings: Callable[..., Any], microsoft: RunningSandbox, ca_bundle: str
) -> AnalyticsSettings:
    port = free_port()
    settings: AnalyticsSettings = make_settings(
        AnalyticsSettings,
        http_port=port,
        public_base_url=f"http://127.0.0.1:{port}",
        entra_authority_host=microsoft.base_url,
        tls_ca_bundle=ca_bundle,
        meetings_page_size=50,
    )
    return settings
