"""What a real browser (Chromium, driven by Playwright) sees of roomcast's refusals.

docs/endpoints.md promises: a bad token on /ws/secure is an HTTP 403 that a page sees only as
``error`` then ``close`` with code 1006; a bad parameter is a close 1008 whose reason the page
can read. These tests hold the docs to that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from chromium import CHROMIUM_ARGS, require_chromium
from helpers import TIMEOUT, RoomcastServer
from servers import TRANSPORTS

CHROMIUM, playwright_api = require_chromium()


@pytest.fixture(scope="module", params=list(TRANSPORTS.values()), ids=list(TRANSPORTS))
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RoomcastServer]:
    """A ``roomcast serve`` process on each WebSocket implementation: what a browser sees of
    a refusal is the implementation's handshake and close."""
    srv = RoomcastServer(tmp_path_factory.mktemp("browser"), env={"ROOMCAST_WS": request.param})
    with srv:
        yield srv
    srv.assert_no_traceback()


# Opens a WebSocket and reports every event until it closes (bounded by a timer).
OPEN_AND_WATCH = """
([url, send, timeoutMs]) => new Promise((resolve) => {
  const events = [];
  const ws = new WebSocket(url);
  const timer = setTimeout(() => resolve({events, timedOut: true}), timeoutMs);
  ws.onopen = () => { events.push({type: "open"}); if (send !== null) ws.send(send); };
  ws.onmessage = (e) => events.push({type: "message", data: e.data});
  ws.onerror = () => events.push({type: "error"});
  ws.onclose = (e) => {
    events.push({type: "close", code: e.code, reason: e.reason, wasClean: e.wasClean});
    clearTimeout(timer);
    resolve({events, timedOut: false});
  };
})
"""


# One Chromium for the module (its fixture lives in the module's event loop, so the tests run
# there too); each test gets a page of its own.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(chromium: Any, server: RoomcastServer) -> AsyncIterator[Any]:
    page = await chromium.new_page()
    try:
        await page.goto(f"{server.http_url}/health")
        yield page
    finally:
        await page.close()


async def watch(page: Any, server: RoomcastServer, path: str, send: str | None = None) -> Any:
    url = f"ws://127.0.0.1:{server.port}{path}"
    result = await page.evaluate(OPEN_AND_WATCH, [url, send, int(4 * TIMEOUT * 1000)])
    assert not result["timedOut"], result
    return result["events"]


async def test_browser_sees_bad_token_as_error_then_1006(page: Any, server: RoomcastServer) -> None:
    events = await watch(page, server, "/ws/secure?token=wrong")
    assert [e["type"] for e in events] == ["error", "close"]
    assert events[-1]["code"] == 1006
    assert events[-1]["reason"] == ""


async def test_browser_with_good_token_is_greeted(page: Any, server: RoomcastServer) -> None:
    url = f"ws://127.0.0.1:{server.port}/ws/secure?token=secret-token"
    greeting = await page.evaluate(
        """(url) => new Promise((resolve, reject) => {
             const ws = new WebSocket(url);
             ws.onmessage = (e) => { resolve(e.data); ws.close(); };
             ws.onclose = (e) => reject(new Error("closed " + e.code));
           })""",
        url,
    )
    assert greeting == "Hello, authenticated_user! Welcome to the secure WebSocket."


async def test_browser_reads_the_reason_of_a_bad_parameter(
    page: Any, server: RoomcastServer
) -> None:
    events = await watch(page, server, "/ws/stream?count=0")
    assert [e["type"] for e in events] == ["open", "close"]
    assert events[-1]["code"] == 1008
    assert "count" in events[-1]["reason"]


async def test_browser_gets_1003_for_binary_on_a_text_endpoint(
    page: Any, server: RoomcastServer
) -> None:
    url = f"ws://127.0.0.1:{server.port}/ws/echo"
    close = await page.evaluate(
        """(url) => new Promise((resolve) => {
             const ws = new WebSocket(url);
             ws.onopen = () => ws.send(new Uint8Array([1, 2, 3]));
             ws.onclose = (e) => resolve({code: e.code, reason: e.reason});
           })""",
        url,
    )
    assert close["code"] == 1003
    assert "text" in close["reason"]
