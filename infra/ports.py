"""Loopback ports for servers whose URL must be known before they start (tests, benchmarks).

A port the kernel hands out for `bind(("127.0.0.1", 0))` comes from the ephemeral range, the
same range every outgoing connection (a Postgres pool, a Kafka client) takes its local port
from, so between picking it and binding it an outgoing connection could take it ("address
already in use", seen once in a full test run). Ports are picked outside that range instead.

A process never hands out the same port twice until it has handed out every candidate: picked at
random with replacement, two picks for one fixture (a server's HTTP and TLS ports) were the same
port about once in 4,500, and a CI run makes hundreds of such picks while earlier servers still
hold theirs ("address already in use" on a port above the ephemeral range, CI, seventh session).
"""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")

_lock = threading.Lock()
_handed_out: set[int] = set()
_order: tuple[range, Iterator[int]] | None = None


def _candidates() -> range:
    try:
        low, high = (int(n) for n in _EPHEMERAL.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    # Above the range when there is room (it is clear of the fixed infrastructure ports, which
    # sit below 30000), else below it.
    return range(high + 1, 65536) if 65535 - high >= 1000 else range(1024, low)


def _next_candidate(candidates: range) -> int:
    """The next port of a shuffled pass over the candidates; a new pass once one is used up."""
    global _order
    if _order is None or _order[0] != candidates:
        _order = (candidates, iter(()))
    for _ in range(2):
        port = next(_order[1], None)
        if port is not None:
            return port
        shuffled = list(candidates)
        random.shuffle(shuffled)
        _order = (candidates, iter(shuffled))
    raise RuntimeError("no loopback port candidates")


def _bound(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A loopback port that is free now, that no outgoing connection will take, and that this
    process has not handed out before."""
    with _lock:
        candidates = _candidates()
        if len(candidates) < 100:
            # The ephemeral range covers (nearly) every port: nothing is outside it.
            for _ in range(200):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    port = int(sock.getsockname()[1])
                if port not in _handed_out:
                    _handed_out.add(port)
                    return port
            raise RuntimeError("the kernel keeps handing out ports already given")
        for _ in range(len(candidates)):
            port = _next_candidate(candidates)
            if _bound(port):
                _handed_out.add(port)
                return port
        raise RuntimeError(f"no free loopback port in {candidates.start}-{candidates.stop - 1}")
