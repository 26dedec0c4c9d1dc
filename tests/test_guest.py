"""Guest sign-in (``POST /auth/guest``), the way the page at ``/`` gets a token.

On only while nothing else authenticates anyone (no ``ROOMCAST_TOKENS``, no JWT key), or when
``ROOMCAST_GUEST_CHANNELS`` says so; a guest may use the guest channels and nothing else.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from helpers import TIMEOUT, recv, ws_connect
from servers import AppServer, Frame, ServerStarter, serve

# In-process servers serve in the module's event loop (tests/servers.py).
pytestmark = pytest.mark.asyncio(loop_scope="module")

#: The embedded defaults: no static tokens, no JWT key, anonymous access off.
DEFAULTS: dict[str, Any] = {"tokens": {}, "anonymous_subscribe": [], "anonymous_publish": []}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def defaults_server(ws_impl: str) -> AsyncIterator[AppServer]:
    async with serve(ws_impl, **DEFAULTS) as srv:
        yield srv


async def sign_in(server: AppServer, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=TIMEOUT) as http:
        return await http.post("/auth/guest", json=body)


async def push(ws: Any) -> Frame:
    frame: Frame = json.loads(await recv(ws))
    return frame


async def request(ws: Any, frame: Frame) -> Frame:
    await ws.send(json.dumps(frame))
    while "id" not in (reply := await push(ws)):
        pass
    return reply


async def test_guest_on_embedded_defaults_uses_room_channels_only(
    defaults_server: AppServer,
) -> None:
    reply = await sign_in(defaults_server, {"name": "ann"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["user"].startswith("ann#")
    assert body["channels"] == ["room:*"]
    token = body["token"]
    offer = [Subprotocol("roomcast"), Subprotocol(f"roomcast.token.{token}")]
    async with ws_connect(defaults_server, "/ws", subprotocols=offer) as ws:
        assert ws.subprotocol == "roomcast"
        hello = await push(ws)
        assert hello["user"] == body["user"]
        ok = await request(ws, {"id": 1, "op": "subscribe", "channel": "room:lobby"})
        assert ok["ok"] is True
        ok = await request(ws, {"id": 2, "op": "publish", "channel": "room:lobby", "data": "hi"})
        assert ok["ok"] is True
        denied = await request(ws, {"id": 3, "op": "subscribe", "channel": "chat:lobby"})
        assert denied["error"]["code"] == "forbidden"


async def test_renew_keeps_the_user_and_a_forged_guest_token_is_refused(
    defaults_server: AppServer,
) -> None:
    first = (await sign_in(defaults_server, {"name": "bob"})).json()
    renewed = await sign_in(defaults_server, {"renew": first["token"]})
    assert renewed.status_code == 200
    assert renewed.json()["user"] == first["user"]
    # The renewed token is for the same user and says what the reply says; it is never older.
    claims = jwt.decode(renewed.json()["token"], options={"verify_signature": False})
    assert claims["sub"] == first["user"]
    assert claims["exp"] == renewed.json()["expires_at"] >= first["expires_at"]
    forged = jwt.encode(
        {"sub": "mallory", "exp": first["expires_at"]},
        "not-the-server-key-" + "x" * 40,
        algorithm="HS256",
        headers={"kid": "roomcast-guest"},
    )
    assert (await sign_in(defaults_server, {"renew": forged})).status_code == 401
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(defaults_server, f"/ws?token={forged}"):
            pass
    assert refused.value.response.status_code == 403


GUEST_SECRET = "guest-signing-key-" + "g" * 40
GUEST_TTL = 600


async def test_renew_gives_a_full_lifetime_from_now(start_server: ServerStarter) -> None:
    """A token about to expire is renewed for ``ROOMCAST_GUEST_TTL`` from now, not kept."""
    server = await start_server(**DEFAULTS, guest_secret=GUEST_SECRET, guest_ttl=GUEST_TTL)
    soon = int(time.time()) + 30
    old = jwt.encode(
        {"sub": "cat#1234", "exp": soon},
        GUEST_SECRET,
        algorithm="HS256",
        headers={"kid": "roomcast-guest"},
    )
    before = time.time()
    renewed = await sign_in(server, {"renew": old})
    after = time.time()
    assert renewed.status_code == 200, renewed.text
    body = renewed.json()
    assert body["user"] == "cat#1234"
    assert int(before) + GUEST_TTL <= body["expires_at"] <= after + GUEST_TTL
    claims = jwt.decode(body["token"], GUEST_SECRET, algorithms=["HS256"])
    assert (claims["sub"], claims["exp"]) == ("cat#1234", body["expires_at"])


@pytest.mark.parametrize("name", ["", "x" * 33, "<script>", "a\nb"])
async def test_bad_names_get_422(defaults_server: AppServer, name: str) -> None:
    assert (await sign_in(defaults_server, {"name": name})).status_code == 422


@pytest.mark.parametrize(
    "settings",
    [
        {},  # the suite's settings configure tokens: real authentication, so no guests
        {"tokens": {}, "guest_channels": []},
        {"tokens": {}, "jwt_secret": "s" * 40},
    ],
    ids=["static-tokens", "turned-off", "jwt-configured"],
)
async def test_guest_sign_in_off_when_authentication_is_configured(
    start_server: ServerStarter, settings: dict[str, Any]
) -> None:
    server = await start_server(**settings)
    assert (await sign_in(server, {"name": "ann"})).status_code == 404


async def test_explicit_guest_channels_with_a_jwt_secret(start_server: ServerStarter) -> None:
    """Several nodes share ROOMCAST_JWT_SECRET: a guest token from one verifies on another."""
    settings: dict[str, Any] = {"jwt_secret": "k" * 40, "guest_channels": ["demo:*"]}
    one, two = await start_server(**settings), await start_server(**settings)
    body = (await sign_in(one, {"name": "cy"})).json()
    assert body["channels"] == ["demo:*"]
    async with ws_connect(two, "/ws", additional_headers=bearer(body["token"])) as ws:
        assert (await push(ws))["user"] == body["user"]
        ok = await request(ws, {"id": 1, "op": "subscribe", "channel": "demo:x"})
        assert ok["ok"] is True


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_page_and_client_module_are_served(defaults_server: AppServer) -> None:
    async with httpx.AsyncClient(base_url=defaults_server.http_url, timeout=TIMEOUT) as http:
        page = await http.get("/")
        module = await http.get("/static/roomcast.js")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert module.status_code == 200
    assert "javascript" in module.headers["content-type"]
