"""roomcast embedded in-process: the app from ``create_app`` under starlette's TestClient."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

import roomcast


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = roomcast.create_app(roomcast.Settings(tokens={"t": "u"}))
    with TestClient(app) as client:
        yield client


def test_echo(client: TestClient) -> None:
    with client.websocket_connect("/ws/echo") as ws:
        ws.send_text("hi")
        assert ws.receive_text() == "Echo: hi"


def test_chat_two_members(client: TestClient) -> None:
    with client.websocket_connect("/ws/chat") as a:
        with client.websocket_connect("/ws/chat") as b:
            stats = client.get("/stats").json()
            assert stats["chat_members"] == 2
            a.send_text("x")
            assert a.receive_text() == "Client says: x"
            assert b.receive_text() == "Client says: x"
            b.send_text("y")
            assert a.receive_text() == "Client says: y"
            assert b.receive_text() == "Client says: y"
        assert a.receive_text() == "A client left the chat"


def test_secure(client: TestClient) -> None:
    with client.websocket_connect("/ws/secure?token=t") as ws:
        assert ws.receive_text() == "Hello, u! Welcome to the secure WebSocket."
        ws.send_text("x")
        assert ws.receive_text() == "You said: x"
    # Refused before accept: as an HTTP 403 denial response, or as a close before accept
    # (which an ASGI server turns into HTTP 403). Either way no WebSocket session opens.
    with (
        pytest.raises((WebSocketDenialResponse, WebSocketDisconnect)) as info,
        client.websocket_connect("/ws/secure?token=nope"),
    ):
        pass
    if isinstance(info.value, WebSocketDenialResponse):
        assert info.value.status_code == 403
    else:
        assert info.value.code == 1008, info.value.code  # becomes HTTP 403 on a real server


def test_health(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
