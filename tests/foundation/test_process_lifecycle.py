from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp
import pytest

from tests.conftest import KAFKA, free_port


@pytest.mark.parametrize("service", ["config", "launch", "notify", "analytics"])
async def test_service_starts_as_a_process_and_drains_on_sigterm(
    service: str, database_url: str, topic_prefix: str
) -> None:
    """`python -m services.<name>` starts, answers /healthz and /readyz on its port and
    /metrics on its metrics port only, and exits cleanly (status 0) after SIGTERM, having
    drained."""
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "EHR_HTTP_PORT": str(port),
        "EHR_METRICS_PORT": str(metrics_port),
        "EHR_DATABASE_URL": database_url,
        "EHR_KAFKA_BOOTSTRAP_SERVERS": KAFKA,
        "EHR_KAFKA_TOPIC_PREFIX": topic_prefix,
        "EHR_LOG_JSON": "true",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        f"services.{service}",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(60):
                while True:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    assert process.returncode is None, "service exited during start"
                    await asyncio.sleep(0.2)  # another process: polling its port is the only signal
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 404
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                assert r.status == 200
                assert "http_requests_total" in await r.text()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        assert process.stdout is not None
        output = (await process.stdout.read()).decode()
        assert '"service stopped"' in output
        assert "Traceback" not in output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
