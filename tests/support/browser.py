"""Real headless Chromium (Debian's package) driven over the DevTools protocol, for tests
that must see what a person sees. No browser download, no extra Python package."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--window-size=1100,900",
    "--remote-debugging-port=0",
]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Chromium is missing: `make test` installs Debian's chromium package.")


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._ws:
            data = message.json()
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            elif "method" in data:
                for waiter in self._events.pop(data["method"], []):
                    if not waiter.done():
                        waiter.set_result(data.get("params", {}))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        await self._ws.send_json({"id": message_id, "method": method, "params": params})
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    def next_event(self, method: str) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._events.setdefault(method, []).append(future)
        return future

    async def goto(self, url: str) -> None:
        loaded = self.next_event("Page.loadEventFired")
        await self.send("Page.navigate", url=url)
        await asyncio.wait_for(loaded, 30)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_until(self, condition: str, within_s: float = 20) -> None:
        """Resolves in the page when `condition` (a JS expression) turns true, re-checked on
        every DOM change, so the test never sleeps."""
        timeout_ms = int(within_s * 1000)
        script = (
            "new Promise((resolve, reject) => {"
            f" const check = () => {{ try {{ return Boolean({condition}); }}"
            " catch (e) { return false; } };"
            " if (check()) return resolve(true);"
            " const observer = new MutationObserver(() => {"
            " if (check()) { observer.disconnect(); resolve(true); } });"
            " observer.observe(document,"
            " {subtree: true, childList: true, attributes: true, characterData: true});"
            " setTimeout(() => { observer.disconnect();"
            f" reject(new Error('timed out waiting for the page')); }}, {timeout_ms});"
            " })"
        )
        await self.evaluate(script)

    async def text(self) -> str:
        return str(await self.evaluate("document.body.innerText"))

    async def screenshot(self, name: str) -> Path:
        data = await self.send("Page.captureScreenshot", format="png")
        path = ARTIFACTS / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()


@contextlib.asynccontextmanager
async def chromium(extra_flags: tuple[str, ...] = ()) -> AsyncIterator[Page]:
    profile = Path(tempfile.mkdtemp(prefix="chromium-test-"))
    process = await asyncio.create_subprocess_exec(
        chromium_path(),
        *FLAGS,
        *extra_flags,
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        async with asyncio.timeout(30):
            # Chromium announces its DevTools port only by writing this file.
            while not port_file.exists() or not port_file.read_text().strip():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        port = port_file.read_text().split()[0]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            target = next(t for t in targets if t["type"] == "page")
            ws = await http.ws_connect(
                target["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024
            )
            page = Page(ws)
            await page.send("Page.enable")
            try:
                yield page
            finally:
                await page.close()
    finally:
        process.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 10)
        if process.returncode is None:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)
