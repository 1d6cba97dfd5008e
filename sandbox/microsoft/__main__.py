"""``python -m sandbox.microsoft``: serve the Microsoft stand-in over HTTPS."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from pathlib import Path

from sandbox.microsoft.app import start_sandbox
from sandbox.microsoft.clock import ManualClock
from sandbox.microsoft.config import SandboxConfig


def parse_args(argv: list[str] | None = None) -> SandboxConfig:
    cfg = SandboxConfig.from_env()
    p = argparse.ArgumentParser(prog="python -m sandbox.microsoft")
    p.add_argument("--host", default=cfg.host)
    p.add_argument("--port", type=int, default=cfg.port)
    p.add_argument("--tls-dir", type=Path, default=cfg.tls_dir)
    p.add_argument("--lro-delay", type=float, default=cfg.lro_delay_s)
    p.add_argument("--sms-webhook-url", default=cfg.sms_webhook_url)
    p.add_argument("--manual-clock", action="store_true", help="time moves only via the API")
    args = p.parse_args(argv)
    cfg.host, cfg.port, cfg.tls_dir = args.host, args.port, args.tls_dir
    cfg.lro_delay_s, cfg.sms_webhook_url = args.lro_delay, args.sms_webhook_url
    if args.manual_clock:
        cfg.clock = ManualClock()
    return cfg


async def serve(cfg: SandboxConfig) -> None:
    running = await start_sandbox(cfg)
    logging.getLogger("sandbox.microsoft").info("Microsoft stand-in on %s", running.base_url)
    print(f"Microsoft stand-in listening on {running.base_url} (CA: {cfg.tls_dir}/ca.pem)")
    try:
        await asyncio.Event().wait()
    finally:
        await running.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(parse_args()))


if __name__ == "__main__":
    main()
