"""Loopback ports for test and benchmark servers, outside the kernel's ephemeral range."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra import ports

_bindable = ports._bound


def test_ports_are_picked_above_the_ephemeral_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Linux's default range, a port comes from above it and is free."""
    (tmp_path / "range").write_text("32768\t60999\n")
    monkeypatch.setattr(ports, "_EPHEMERAL", tmp_path / "range")
    port = ports.free_port()
    assert 60999 < port <= 65535
    assert _bindable(port)


def test_a_range_covering_every_port_still_gives_a_free_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the ephemeral range leaves no room on either side, the kernel picks the port."""
    (tmp_path / "range").write_text("1024\t65535\n")
    monkeypatch.setattr(ports, "_EPHEMERAL", tmp_path / "range")
    assert _bindable(ports.free_port())


def test_no_port_is_handed_out_twice_until_every_candidate_has_been(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Picks within one process are distinct while candidates remain (two picks for one server
    were the same port about once in 4,500)."""
    (tmp_path / "range").write_text("1024\t64535\n")  # leaves 1,000 candidates above
    monkeypatch.setattr(ports, "_EPHEMERAL", tmp_path / "range")
    picked = [ports.free_port() for _ in range(900)]
    assert len(set(picked)) == len(picked)
    assert all(64535 < port <= 65535 for port in picked)
