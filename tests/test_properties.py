"""Property-based checks of the guide's message formats, in-process (Starlette's TestClient)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient, WebSocketTestSession

import roomcast

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = roomcast.create_app(roomcast.Settings(tokens={"t": "u"}))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def json_ws(client: TestClient) -> Iterator[WebSocketTestSession]:
    with client.websocket_connect("/ws/methods_json") as ws:
        yield ws


@pytest.fixture(scope="module")
def raw_ws(client: TestClient) -> Iterator[WebSocketTestSession]:
    with client.websocket_connect("/ws/methods_raw") as ws:
        yield ws


@settings(max_examples=150, deadline=None)
@given(value=JSON)
def test_json_reply_is_byte_for_byte_what_the_guide_sends(
    json_ws: WebSocketTestSession, value: Any
) -> None:
    json_ws.send_text(json.dumps(value))
    expected = json.dumps(
        {"message": "Server received your JSON", "data": value},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    assert json_ws.receive_text() == expected


@settings(max_examples=100, deadline=None)
@given(payload=st.text() | st.binary())
def test_raw_echo_keeps_the_frame_type(raw_ws: WebSocketTestSession, payload: str | bytes) -> None:
    if isinstance(payload, str):
        raw_ws.send_text(payload)
        assert raw_ws.receive_text() == f"Raw echo: {payload}"
    else:
        raw_ws.send_bytes(payload)
        assert raw_ws.receive_bytes() == b"Raw echo: " + payload
