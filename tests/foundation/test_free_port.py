"""Loopback ports for test and benchmark servers, outside the kernel's ephemeral range."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from infra import ports


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


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
