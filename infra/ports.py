"""Loopback ports for servers whose URL must be known before they start (tests, benchmarks).

A port the kernel hands out for `bind(("127.0.0.1", 0))` comes from the ephemeral range, the
same range every outgoing connection (a Postgres pool, a Kafka client) takes its local port
from, so between picking it and binding it an outgoing connection could take it ("address
already in use", seen once in a full test run). Ports are picked outside that range instead.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _candidates() -> range:
    try:
        low, high = (int(n) for n in _EPHEMERAL.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    # Above the range when there is room (it is clear of the fixed infrastructure ports, which
    # sit below 30000), else below it.
    return range(high + 1, 65536) if 65535 - high >= 1000 else range(1024, low)


def free_port() -> int:
    """A loopback port that is free now and that no outgoing connection will take."""
    candidates = _candidates()
    if len(candidates) < 100:
        # The ephemeral range covers (nearly) every port: nothing is outside it.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    for _ in range(200):
        port = random.choice(candidates)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {candidates.start}-{candidates.stop - 1}")
