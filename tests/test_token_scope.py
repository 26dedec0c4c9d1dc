"""A fresh token's channels replace the old ones: subscriptions it no longer allows end at once.

``auth`` on an authenticated ``/ws`` connection is the refresh (docs/protocol.md, ``auth``).
When the fresh token allows fewer channels, every subscription outside them is dropped with an
``unsubscribed`` push, and no publication of those channels reaches the connection any more
(docs/security.md, "Expiry and refresh"). Publications go out through the HTTP API, and every
"nothing arrives" check ends on a publication of a channel still allowed, sent after the one
that must not arrive, so that it cannot pass by merely not waiting long enough.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio

import roomcast
from helpers import TIMEOUT
from roomcast.client import Publication, ServerError
from servers import AppServer, Frame, Peer, peer, serve

# In-process servers serve in the module's event loop (tests/servers.py), and so do the
# HTTP client below, the Python client and Playwright.
pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRET = "roomcast-scope-secret-" + "3c" * 40
API_KEY = "scope-api-key"
FAST = {"backoff_min": 0.05, "backoff_max": 0.2, "request_timeout": 4 * TIMEOUT}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scoped(ws_impl: str) -> AsyncIterator[AppServer]:
    """JWT users, the HTTP API, and no anonymous access."""
    async with serve(
        ws_impl,
        jwt_secret=SECRET,
        api_key=API_KEY,
        anonymous_subscribe=[],
        anonymous_publish=[],
    ) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module")
async def api(scoped: AppServer) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=scoped.http_url, headers=headers, timeout=TIMEOUT) as c:
        yield c


def token(user: str, subscribe: list[str]) -> str:
    claims = {"sub": user, "exp": int(time.time()) + 3600, "subscribe": subscribe, "publish": []}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def bearer(value: str) -> dict[str, Any]:
    return {"additional_headers": {"Authorization": f"Bearer {value}"}}


def channel_of(frame: Frame) -> str:
    channel: str = frame["channel"]
    return channel


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def publish(api: httpx.AsyncClient, channel: str, data: Any) -> int:
    reply = await api.post("/api/publish", json={"channel": channel, "data": data})
    assert reply.status_code == 200, reply.text
    offset: int = reply.json()["offset"]
    return offset


async def until_publication(p: Peer, channel: str, offset: int) -> list[Frame]:
    """Every push up to and including the publication ``offset`` of ``channel``."""
    got: list[Frame] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            frame = await p.push()
            got.append(frame)
            if frame.get("type") == "publication" and (frame["channel"], frame["offset"]) == (
                channel,
                offset,
            ):
                return got


async def test_narrowing_auth_unsubscribes_with_a_push(
    scoped: AppServer, api: httpx.AsyncClient
) -> None:
    user = unique("ann-")
    payroll, audit = unique("secret:payroll-"), unique("secret:audit-")
    news = unique("public:news-")
    async with (
        peer(scoped, "/ws", **bearer(token(user, ["secret:*", "public:*"]))) as p,
        peer(scoped, "/ws", **bearer(token(unique("obs-"), ["secret:*"]))) as observer,
    ):
        for channel in (payroll, audit, news):
            await p.ok("subscribe", channel=channel)
        await observer.ok("subscribe", channel=payroll, join_leave=True)
        # The subscription works before the narrowing (so its end below is the narrowing's).
        offset = await publish(api, payroll, "before")
        assert [f["data"] for f in await until_publication(p, payroll, offset)] == ["before"]

        narrow = token(user, ["public:*"])
        result = await p.ok("auth", token=narrow)
        assert result["user"] == user
        # The pushes come before the reply: once `auth` is answered, the client knows.
        ended = [p.pushes.popleft() for _ in range(len(p.pushes))]
        assert sorted(f.get("channel", "") for f in ended) == sorted([payroll, audit]), ended
        for frame in ended:
            assert set(frame) == {"type", "channel", "reason"}, frame
            assert frame["type"] == "unsubscribed", frame
            assert isinstance(frame["reason"], str), frame
            assert channel_of(frame) in frame["reason"], frame

        assert await p.fail("history", channel=payroll) == "forbidden"
        assert await p.fail("unsubscribe", channel=payroll) == "not_subscribed"
        # Publications of the revoked channels no longer arrive; the allowed one's still do.
        await publish(api, payroll, "after")
        await publish(api, audit, "after")
        last = await publish(api, news, "control")
        frames = await until_publication(p, news, last)
        assert [(f["type"], f["channel"]) for f in frames] == [("publication", news)], frames

        # The connection left the channel everywhere: presence, and a leave event for others.
        presence = (await api.get(f"/api/presence/{payroll}")).json()
        assert [c["client"] for c in presence["clients"]] == [observer.client], presence
        heard = await until_publication(observer, payroll, offset + 1)  # "after"
        leaves = [f for f in heard if f["type"] == "leave"]
        assert leaves == [{"type": "leave", "channel": payroll, "info": p.info}], heard
        await p.still_works()


async def test_refresh_with_the_same_channels_keeps_every_subscription(
    scoped: AppServer, api: httpx.AsyncClient
) -> None:
    user = unique("bo-")
    payroll = unique("secret:payroll-")
    async with peer(scoped, "/ws", **bearer(token(user, ["secret:*", "public:*"]))) as p:
        await p.ok("subscribe", channel=payroll)
        await p.ok("auth", token=token(user, ["public:*", "secret:*"]))
        # A narrower grant that still covers the channel keeps it too.
        await p.ok("auth", token=token(user, [payroll]))
        assert not p.pushes, p.pushes
        offset = await publish(api, payroll, "still here")
        frames = await until_publication(p, payroll, offset)
        assert [f["data"] for f in frames] == ["still here"], frames


async def test_python_client_ends_the_revoked_subscription(
    scoped: AppServer, api: httpx.AsyncClient
) -> None:
    user = unique("cy-")
    payroll, news = unique("secret:payroll-"), unique("public:news-")
    url = scoped.url("/ws")
    async with roomcast.connect(url, token=token(user, ["secret:*", "public:*"]), **FAST) as c:
        revoked = await c.subscribe(payroll)
        kept = await c.subscribe(news)
        await c.request("auth", token=token(user, ["public:*"]))
        with pytest.raises(ServerError) as ended:
            await asyncio.wait_for(anext(revoked), TIMEOUT)
        assert ended.value.code == "unsubscribed"
        assert payroll in ended.value.message
        offset = await publish(api, news, "kept")
        item = await asyncio.wait_for(anext(kept), TIMEOUT)
        assert item == Publication(news, offset, "kept", {"client": None, "user": None})
        # Ended for good: the client holds it no more (subscribing again asks the server).
        await revoked.unsubscribe()
        with pytest.raises(ServerError) as refused:
            await c.subscribe(payroll)
        assert refused.value.code == "forbidden"


# The browser client (roomcast.js) in Chromium: the revoked subscription fires `end`.
NARROW_IN_THE_BROWSER = """
async ([url, wide, narrow, revokedChannel, keptChannel, ms]) => {
  const { connect } = await import("/static/roomcast.js");
  const client = connect(url, { token: wide });
  try {
    const revoked = client.subscribe(revokedChannel);
    const kept = client.subscribe(keptChannel);
    await Promise.all([revoked.ready(), kept.ready()]);
    const ended = new Promise((resolve, reject) => {
      revoked.addEventListener("end", (e) => resolve(e.detail.error));
      setTimeout(() => reject(new Error("no end event")), ms);
    });
    await client.request("auth", { token: narrow });
    const error = await ended;
    return {
      code: error.code,
      message: error.message,
      revokedActive: revoked.active,
      keptActive: kept.active,
      held: [...client.subscriptions.keys()],
    };
  } finally {
    client.close();
  }
}
"""


async def test_browser_client_ends_the_revoked_subscription(scoped: AppServer) -> None:
    from chromium import CHROMIUM_ARGS, require_chromium

    chromium, playwright_api = require_chromium()
    user = unique("di-")
    payroll, news = unique("secret:payroll-"), unique("public:news-")
    wide, narrow = token(user, ["secret:*", "public:*"]), token(user, ["public:*"])
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(f"{scoped.http_url}/health")
            args = [scoped.url("/ws"), wide, narrow, payroll, news, int(TIMEOUT * 1000)]
            result = await asyncio.wait_for(page.evaluate(NARROW_IN_THE_BROWSER, args), 4 * TIMEOUT)
        finally:
            await browser.close()
    assert result["code"] == "unsubscribed", result
    assert payroll in result["message"], result
    assert result["revokedActive"] is False, result
    assert result["keptActive"] is True, result
    assert result["held"] == [news], result
