from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.launch.settings import LaunchSettings


def test_environment_beats_dotenv_beats_secret_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values come from the environment first, then .env, then Kubernetes secret files."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "ehr_join_token_secret").write_text("from-secret-file")
    (secrets / "ehr_appointment_key_secret").write_text("key-from-secret-file")
    (secrets / "ehr_log_level").write_text("ERROR")
    (tmp_path / ".env").write_text("EHR_LOG_LEVEL=WARNING\nEHR_HTTP_PORT=9999\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EHR_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("EHR_HTTP_PORT", "7070")

    settings = LaunchSettings()

    assert settings.http_port == 7070
    assert settings.log_level == "WARNING"
    assert settings.join_token_secret.get_secret_value() == "from-secret-file"
    assert settings.appointment_key_secret.get_secret_value() == "key-from-secret-file"


def test_secrets_are_masked_when_printed() -> None:
    """SecretStr keeps secrets out of reprs and logs."""
    settings = LaunchSettings(join_token_secret="very-secret")
    assert "very-secret" not in repr(settings)
    assert "very-secret" not in str(settings.model_dump())


def test_a_misspelt_keyword_is_refused() -> None:
    """A setting passed in code under a name that does not exist raises instead of vanishing."""
    with pytest.raises(TypeError, match="ca_bundle"):
        LaunchSettings(ca_bundle="ca.pem")


def test_metrics_port_defaults_beside_the_http_port_and_never_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unset, the metrics port is the HTTP port + 1000 (any free port when the HTTP port is
    0); set, it is used as given, and one equal to the HTTP port is refused."""
    monkeypatch.chdir(tmp_path)
    for name in ("EHR_HTTP_PORT", "EHR_METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert LaunchSettings().metrics_listen_port == 9080
    assert LaunchSettings(http_port=0).metrics_listen_port == 0
    assert LaunchSettings(metrics_port=0).metrics_listen_port == 0
    monkeypatch.setenv("EHR_METRICS_PORT", "9090")
    assert LaunchSettings().metrics_listen_port == 9090
    with pytest.raises(ValidationError, match="must differ"):
        LaunchSettings(http_port=9090)
    with pytest.raises(ValidationError, match="set EHR_METRICS_PORT"):
        LaunchSettings(http_port=65000, metrics_port=None)
