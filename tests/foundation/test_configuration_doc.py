from __future__ import annotations

from infra.settings_reference import DOC, render


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md lists every setting of every service, as the code defines it."""
    assert DOC.read_text() == render(), "run `python -m infra.settings_reference`"


def test_every_setting_says_what_it_does() -> None:
    """No setting in the reference is left without an explanation."""
    empty = [line for line in render().splitlines() if line.endswith("|  |")]
    assert empty == []
