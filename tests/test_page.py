"""The chat page at ``/`` (static/index.html, app.js, roomcast.js) in Chromium, driven by
Playwright, against in-process servers on both WebSocket implementations: two users chatting,
a phone-sized screen, history paged in on scroll, token refresh, and missed messages recovered
through a server restart (the server stopped, a new one started on its port). docs/browser.md
describes what is tested here.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import pytest_asyncio

import roomcast
from chromium import CHROMIUM_ARGS, require_chromium
from helpers import TIMEOUT, async_wait_until
from redis_server import RedisServer, fresh_redis_fixture  # noqa: F401 (a fixture)
from servers import AppServer, ServerStarter, make_settings, serve
from tcpproxy import TcpProxy

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, Locator, Page

CHROMIUM, playwright_api = require_chromium()
expect = playwright_api.expect

# In-process servers serve in the module's event loop (tests/servers.py), and so does
# Playwright: every async fixture here runs in that loop too.
pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "page-api-key"
GUESTS: dict[str, Any] = {"guest_channels": ["room:*"], "api_key": API_KEY}
MS = TIMEOUT * 1000  # Playwright's timeouts are in milliseconds
REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def guest(name: str) -> re.Pattern[str]:
    """A guest user as the page shows it: the name and ``#`` plus four hex digits."""
    return re.compile(rf"^{re.escape(name)}#[0-9a-f]{{4}}$")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(ws_impl: str) -> AsyncIterator[AppServer]:
    """One server with guest sign-in and the HTTP API, shared by this module's tests."""
    async with serve(ws_impl, **GUESTS) as srv:
        yield srv


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium() -> AsyncIterator[Browser]:
    """One Chromium for the module; tests are kept apart by browser contexts."""
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest_asyncio.fixture(loop_scope="module")
async def browser(chromium: Browser) -> AsyncIterator[Browser]:
    """The module's Chromium; the contexts (and pages) a test opens are closed after it."""
    yield chromium
    for context in chromium.contexts:
        await context.close()


def room() -> str:
    return f"lobby-{secrets.token_hex(3)}"


async def api_publish(http_url: str, channel: str, *data: Any) -> int:
    """Publish each of ``data`` in turn through the HTTP API (retrying 503 while a fresh node
    reaches Redis); returns the offset of the last."""
    offset = 0
    async with httpx.AsyncClient(base_url=http_url, timeout=TIMEOUT) as http:
        for item in data:
            deadline = time.monotonic() + TIMEOUT
            while True:
                reply = await http.post(
                    "/api/publish",
                    json={"channel": channel, "data": item},
                    headers={"Authorization": f"Bearer {API_KEY}"},
                )
                if reply.status_code != 503 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert reply.status_code == 200, reply.text
            offset = reply.json()["offset"]
    return offset


async def open_page(context: BrowserContext, base: str, name: str, room: str) -> Page:
    """A new tab that signs in as ``name`` and joins ``room``; returns once connected."""
    page = await context.new_page()
    page.set_default_timeout(MS)
    await page.goto(f"{base}/")
    await expect(page.get_by_label("Your name", exact=True)).to_be_focused(timeout=MS)
    await page.get_by_label("Your name", exact=True).fill(name)
    await page.get_by_label("Room", exact=True).fill(room)
    await page.get_by_test_id("join").click()
    await expect(page.get_by_test_id("state")).to_have_text("connected", timeout=MS)
    assert page.url.endswith(f"#room={room}")
    return page


async def say(page: Page, text: str) -> None:
    """Type ``text`` and press Enter; returns once the page shows it."""
    await page.get_by_label("Message", exact=True).fill(text)
    await page.get_by_label("Message", exact=True).press("Enter")
    await expect(texts(page).filter(has_text=text).first).to_be_visible(timeout=MS)


def messages(page: Page) -> Locator:
    return page.locator('[data-testid="messages"] > li')


def texts(page: Page) -> Locator:
    return page.locator('[data-testid="messages"] > li [data-testid="text"]')


async def offsets(page: Page) -> list[int]:
    values = await messages(page).evaluate_all("els => els.map(el => +el.dataset.offset)")
    return [int(v) for v in values]


async def test_two_users_chat(browser: Browser, server: AppServer, tmp_path: Path) -> None:
    where = room()
    ann_context = await browser.new_context(viewport={"width": 900, "height": 560})
    bob_context = await browser.new_context(viewport={"width": 900, "height": 560})
    ann = await open_page(ann_context, server.http_url, "ann", where)
    bob = await open_page(bob_context, server.http_url, "bob", where)

    said = ["hello bob", "hi ann! is the demo ready?", "almost: <b>tags</b> show as text"]
    await say(ann, said[0])
    await say(bob, said[1])
    await say(ann, said[2])
    for page in (ann, bob):
        await expect(texts(page)).to_have_text(said, timeout=MS)
        senders = page.locator('[data-testid="messages"] > li [data-testid="sender"]')
        await expect(senders).to_have_text([guest("ann"), guest("bob"), guest("ann")])
        people = page.locator('[data-testid="presence"] > li')
        await expect(people).to_have_text([guest("ann"), guest("bob")], timeout=MS)
        assert await page.locator('[data-testid="messages"] b').count() == 0
    # Own messages are marked, on each side.
    await expect(messages(ann).nth(0)).to_have_attribute("data-own", "true")
    await expect(messages(ann).nth(1)).to_have_attribute("data-own", "false")
    await expect(messages(bob).nth(1)).to_have_attribute("data-own", "true")
    await expect(ann.get_by_role("status")).to_have_text("connected")
    await expect(ann.get_by_role("log")).to_have_count(1)

    # ann's token in a second connection (another device): the list still shows ann once.
    grant = await ann.evaluate("JSON.parse(sessionStorage.getItem('roomcast.grant'))")
    channel = f"room:{where}"
    async with roomcast.connect(server.url("/ws"), token=grant["token"]) as other:
        await other.subscribe(channel)
        await async_wait_until(
            lambda: bob.evaluate("window.roomcastChat.people.size === 3"),
            what="bob's page to see ann's second connection",
        )
        await expect(bob.locator('[data-testid="presence"] > li')).to_have_text(
            [guest("ann"), guest("bob")]
        )
        await other.publish(channel, {"text": "(sent from my phone)", "ts": time.time() * 1000})
        await expect(messages(ann).last).to_have_attribute("data-own", "true", timeout=MS)
        await expect(texts(bob).last).to_have_text("(sent from my phone)", timeout=MS)
    await async_wait_until(
        lambda: bob.evaluate("window.roomcastChat.people.size === 2"),
        what="the second connection to leave",
    )

    shot = tmp_path / "screenshot.png"
    await ann.screenshot(path=str(shot))
    assert shot.stat().st_size > 1000
    assert shot.read_bytes()[:8] == PNG
    if os.environ.get("ROOMCAST_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, REPO / "docs" / "screenshot.png")

    # User data is text, never markup.
    await say(bob, "<img src=x onerror=window.pwned=1>")
    await expect(texts(ann).last).to_have_text("<img src=x onerror=window.pwned=1>", timeout=MS)
    for page in (ann, bob):
        assert await page.evaluate("window.pwned") is None
        assert await page.locator('[data-testid="messages"] img').count() == 0

    # A reload rejoins the room of the URL, as the same user.
    await bob.reload()
    await expect(bob.get_by_test_id("state")).to_have_text("connected", timeout=MS)
    await expect(texts(bob)).to_have_count(5, timeout=MS)
    await expect(messages(bob).nth(1)).to_have_attribute("data-own", "true")  # still bob#...
    await expect(bob.locator('[data-testid="presence"] > li')).to_have_text(
        [guest("ann"), guest("bob")], timeout=MS
    )


async def test_phone_sized_screen(browser: Browser, server: AppServer, tmp_path: Path) -> None:
    context = await browser.new_context(
        viewport={"width": 375, "height": 740}, device_scale_factor=2, is_mobile=True
    )
    page = await open_page(context, server.http_url, "pat", room())
    await say(page, "x" * 400)  # one long word must wrap, not widen the page
    await say(page, "short")
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    for control in (
        page.get_by_label("Message", exact=True),
        page.get_by_role("button", name="Send"),
    ):
        await expect(control).to_be_visible()
        box = await control.bounding_box()
        assert box is not None
        assert box["x"] >= 0
        assert box["x"] + box["width"] <= 375
        assert box["y"] + box["height"] <= 740
    await expect(page.get_by_test_id("state")).to_be_visible()
    await page.screenshot(path=str(tmp_path / "phone.png"))


async def test_history_pages_in_on_scroll(browser: Browser, server: AppServer) -> None:
    where = room()
    await api_publish(server.http_url, f"room:{where}", *({"text": f"m{i}"} for i in range(1, 121)))
    context = await browser.new_context(viewport={"width": 900, "height": 600})
    page = await open_page(context, server.http_url, "hal", where)
    await expect(messages(page)).to_have_count(50, timeout=MS)
    assert await offsets(page) == list(range(71, 121))
    await expect(texts(page).last).to_have_text("m120")

    scroller = page.get_by_test_id("messages-scroller")
    await scroller.evaluate("el => el.scrollTop = 0")
    await expect(messages(page)).to_have_count(100, timeout=MS)
    await scroller.evaluate("el => el.scrollTop = 0")
    await expect(messages(page)).to_have_count(120, timeout=MS)
    assert await offsets(page) == list(range(1, 121))
    await expect(texts(page).first).to_have_text("m1")
    await expect(page.get_by_test_id("load-earlier")).to_be_hidden()


async def test_token_is_refreshed_without_reconnecting(
    browser: Browser, start_server: ServerStarter
) -> None:
    """Guest tokens of 4 s, refresh pushes 2.5 s ahead: the page renews them and stays on."""
    srv = await start_server(**GUESTS, guest_ttl=4, refresh_ahead=2.5)
    context = await browser.new_context()
    renewals: list[float] = []
    context.on(
        "request",
        lambda r: renewals.append(time.monotonic()) if '"renew"' in (r.post_data or "") else None,
    )
    started = time.monotonic()
    page = await open_page(context, srv.http_url, "rex", room())
    # Past the first token's expiry, with renewals pushed by the server meanwhile.
    await async_wait_until(
        lambda: len(renewals) >= 3 and time.monotonic() - started > 5,
        within=4 * TIMEOUT,
        what="renewed tokens",
    )
    assert await page.evaluate("window.roomcastChat.client.connections") == 1
    await expect(page.get_by_test_id("state")).to_have_text("connected")
    await say(page, "still here")


async def test_restart_with_the_memory_broker(browser: Browser, ws_impl: str) -> None:
    """The embedded defaults: the restarted server has a new history stream and a new guest
    key, so the page's token is refused; the page signs in again and shows the new stream
    after the old messages."""
    context = await browser.new_context()
    where = room()
    channel = f"room:{where}"
    async with serve(ws_impl, **GUESTS) as first:
        port = first.port
        page = await open_page(context, first.http_url, "mia", where)
        state = page.get_by_test_id("state")
        await say(page, "old 1")
        await say(page, "old 2")
    # The first server is gone (its memory with it); a new one starts on its port.
    await expect(state).to_have_text("reconnecting", timeout=MS)
    async with serve(ws_impl, port=port, **GUESTS) as second:
        await api_publish(second.http_url, channel, {"text": "new 1"})
        await expect(state).to_have_text("connected", timeout=4 * MS)
        await api_publish(second.http_url, channel, {"text": "new 2"})
        await expect(texts(page)).to_have_text(["old 1", "old 2", "new 1", "new 2"], timeout=MS)
        assert await page.evaluate("window.roomcastChat.sub.gaps") == 1  # a new epoch
        await say(page, "new 3")
        senders = page.locator('[data-testid="messages"] > li [data-testid="sender"]')
        names = await senders.all_text_contents()
        assert names[0] == names[1] != names[4]  # signed in again: a new guest
        assert guest("mia").match(names[4])
        await expect(messages(page).last).to_have_attribute("data-own", "true")
        await expect(messages(page).first).to_have_attribute("data-own", "true")
        await context.close()


async def test_missed_messages_after_a_server_restart(
    browser: Browser, fresh_redis: RedisServer, ws_impl: str
) -> None:
    """The page is cut off, the server restarts, messages are published meanwhile: once the
    page is back it shows every one of them exactly once, in order (Redis keeps the history
    and ROOMCAST_JWT_SECRET keeps the guest token valid across the restart)."""
    settings = {
        **GUESTS,
        "broker_url": fresh_redis.url,
        "jwt_secret": "page-test-secret-" + "x" * 32,
    }
    async with AsyncExitStack() as first_life:
        first = await first_life.enter_async_context(serve(ws_impl, **settings))
        # The page reaches the server through a proxy, so the test decides when it gets back.
        async with TcpProxy(first.port) as proxy:
            context = await browser.new_context()
            where = room()
            channel = f"room:{where}"
            page = await open_page(context, f"http://127.0.0.1:{proxy.port}", "rob", where)
            state = page.get_by_test_id("state")
            for i in range(1, 4):
                await api_publish(first.http_url, channel, {"text": f"before {i}"})
            await expect(texts(page)).to_have_count(3, timeout=MS)

            proxy.down = True
            await first_life.aclose()  # the first server stops
            await expect(state).to_have_text("reconnecting", timeout=MS)
            # Sent while disconnected: the request waits for the connection (requestTimeout).
            await page.get_by_label("Message", exact=True).fill("sent while away")
            await page.get_by_label("Message", exact=True).press("Enter")
            second = await first_life.enter_async_context(
                serve(ws_impl, port=first.port, **settings)
            )
            for i in range(1, 6):
                await api_publish(second.http_url, channel, {"text": f"missed {i}"})
            # Back at once, without waiting for the backoff: the network "comes back".
            await context.set_offline(True)
            await expect(state).to_have_text("offline", timeout=MS)
            proxy.down = False
            await context.set_offline(False)
            await expect(state).to_have_text("connected", timeout=MS)

            expected = [f"before {i}" for i in range(1, 4)]
            expected += [f"missed {i}" for i in range(1, 6)] + ["sent while away"]
            await expect(texts(page)).to_have_text(expected, timeout=MS)
            await api_publish(second.http_url, channel, {"text": "after"})
            await expect(texts(page)).to_have_text([*expected, "after"], timeout=MS)
            assert await offsets(page) == list(range(1, 11))
            await expect(messages(page).nth(8)).to_have_attribute("data-own", "true")
            recovery = await page.evaluate(
                "(({recoveries, gaps}) => ({recoveries, gaps}))(window.roomcastChat.sub)"
            )
            assert recovery == {"recoveries": 1, "gaps": 0}
            assert await page.evaluate("window.roomcastChat.client.connections") == 2
            await context.close()


async def test_embedded_defaults_two_tabs_chat(browser: Browser, ws_impl: str) -> None:
    """The README's first command: ``roomcast serve`` with nothing configured (no tokens, no
    JWT key, no guest setting). Two tabs open ``/``, pick names and chat."""
    async with serve(settings=make_settings(ws_impl, suite=False)) as server:
        context = await browser.new_context()
        where = room()
        ann = await open_page(context, server.http_url, "ann", where)
        bob = await open_page(context, server.http_url, "bob", where)
        await say(ann, "hi from tab one")
        await say(bob, "hi from tab two")
        for page in (ann, bob):
            await expect(texts(page)).to_have_text(
                ["hi from tab one", "hi from tab two"], timeout=MS
            )
            await expect(page.get_by_test_id("presence").locator("li")).to_have_count(2, timeout=MS)
        await context.close()


async def test_three_node_cluster(browser: Browser, fresh_redis: RedisServer, ws_impl: str) -> None:
    """Three nodes on one Redis, each user's page on a different node: everyone hears
    everyone, and the presence list shows all three."""
    settings = {
        "guest_channels": ["room:*"],
        "broker_url": fresh_redis.url,
        "jwt_secret": "cluster-page-secret-" + "y" * 32,
    }
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(serve(ws_impl, **settings)) for _ in "abc"]
        context = await browser.new_context()
        where = room()
        pages = [
            await open_page(context, node.http_url, name, where)
            for node, name in zip(nodes, ("ann", "bob", "cy"), strict=True)
        ]
        for page, name in zip(pages, ("ann", "bob", "cy"), strict=True):
            await say(page, f"{name} here")
        for page in pages:
            await expect(texts(page)).to_have_text(
                ["ann here", "bob here", "cy here"], timeout=2 * MS
            )
            await expect(page.get_by_test_id("presence").locator("li")).to_have_count(
                3, timeout=2 * MS
            )
        await context.close()
