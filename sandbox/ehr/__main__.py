"""``python -m sandbox.ehr [--host H] [--port P] [--seed seed.json] [--public-url URL]``.

Environment: EHR_SANDBOX_HOST, EHR_SANDBOX_PORT, EHR_SANDBOX_SEED, EHR_SANDBOX_PUBLIC_URL,
EHR_SANDBOX_ACCESS_TOKEN_TTL. The seed JSON holds any EhrSettings fields (tenants, clients...);
seed tenants are merged by guid into the two default tenants.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from sandbox.ehr.app import create_app
from sandbox.ehr.settings import DEFAULT_HOST, DEFAULT_PORT, EhrSettings, default_tenants


def load_settings(argv: list[str] | None = None) -> EhrSettings:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m sandbox.ehr", description=__doc__)
    parser.add_argument("--host", default=env.get("EHR_SANDBOX_HOST", DEFAULT_HOST))
    parser.add_argument("--port", type=int, default=int(env.get("EHR_SANDBOX_PORT", DEFAULT_PORT)))
    parser.add_argument("--seed", default=env.get("EHR_SANDBOX_SEED"))
    parser.add_argument("--public-url", default=env.get("EHR_SANDBOX_PUBLIC_URL"))
    parser.add_argument(
        "--access-token-ttl", type=int, default=int(env.get("EHR_SANDBOX_ACCESS_TOKEN_TTL", 570))
    )
    args = parser.parse_args(argv)
    raw: dict[str, Any] = {}
    if args.seed:
        raw = json.loads(Path(args.seed).read_text())
    if "tenants" in raw:  # seed tenants override the defaults with the same guid, or add one
        merged = {t.guid: t.model_dump() for t in default_tenants()}
        for tenant in raw["tenants"]:
            merged[tenant["guid"]] = {**merged.get(tenant["guid"], {}), **tenant}
        raw["tenants"] = list(merged.values())
    raw.update(
        host=args.host,
        port=args.port,
        public_url=args.public_url or raw.get("public_url"),
        access_token_ttl=args.access_token_ttl,
    )
    return EhrSettings.model_validate(raw)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    settings = load_settings(argv)
    web.run_app(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
