"""Fuzzing: Hypothesis throws arbitrary frames at every WebSocket endpoint of one real server.

One server process per WebSocket implementation (module-scoped: roomcast's transport, then
uvicorn's websockets-sansio) gets random text, random bytes, deep and huge JSON, and wrong
types in every field of every ``/ws`` operation, on every endpoint of docs/endpoints.md and
docs/protocol.md. The server is a process, not in-process like the other endpoint tests: an
input that crashed it (a C parser's stack overflow on deep JSON) must fail these tests, not
kill the test run, and its log is the process's own output (a forged line would show there).
For every input:

- the answer is the documented one: the endpoint's reply format, or its documented close code
  (1003, 1007, 1008, 1009, HTTP 403); on ``/ws`` exactly one reply, with the request's id and
  the documented error code, after which the connection goes on (a pipelined ``ping`` gets its
  reply right after it);
- the server keeps serving others: two long-lived bystanders (``/ws/echo`` and ``/ws``) are
  checked every ``BYSTANDER_EVERY`` examples and after every test;
- nothing leaks: once a test's connections are closed, ``/stats`` is back to its value before
  the test, and at the end to the fresh server's counters (tasks, connections, ``/ws`` clients,
  writers...);
- the server never crashes: the process is alive, ``/health`` answers, its log has no traceback
  (the module's server fixture and conftest's autouse fixture check that).

Speed: a connection is reused across examples while it stays open (``/ws`` errors never close
it); endpoints whose bad input closes the connection reconnect only after such an input.

Budget: ``ROOMCAST_FUZZ_EXAMPLES`` examples per endpoint, per ``/ws`` operation and per
WebSocket implementation: 1000 by default when ``CI`` is set (derandomized: every CI run tries
the same inputs; 2000 per endpoint in all), 150 otherwise.

The bugs this file found have a regression test each at the end (the crashing ones on a
server of their own, so that a regression's traceback cannot fail the shared server's tests).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import math
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlencode

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from helpers import GOOD_TOKEN, TIMEOUT, USER, RoomcastServer, wait_until
from servers import TRANSPORTS

pytestmark = pytest.mark.slow

CI: Final = bool(os.environ.get("CI"))
EXAMPLES: Final = int(os.environ.get("ROOMCAST_FUZZ_EXAMPLES") or (1000 if CI else 150))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=CI,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
if CI:
    FUZZ = settings(FUZZ, database=None)

#: Small limits, so that the limits are cheap to reach and examples stay fast.
MAX_MESSAGE: Final = 65536
MAX_PUBLICATION: Final = 4096
MAX_SUBSCRIPTIONS: Final = 8
JWT_SECRET: Final = "fuzz-jwt-secret-0123456789abcdef0123456789"
BYSTANDER_EVERY: Final = 100

OPS: Final = ("subscribe", "unsubscribe", "publish", "presence", "history", "ping", "auth")
FIELDS: Final = (
    "channel",
    "data",
    "recover",
    "offset",
    "epoch",
    "join_leave",
    "limit",
    "since",
    "before",
    "token",
)
PUSH_TYPES: Final = frozenset({"publication", "join", "leave", "refresh"})
CHANNEL: Final = re.compile(r"[A-Za-z0-9_.:@=-]{1,128}")
ROOM: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
LEFT: Final = "A client left the chat"
STREAM_MAX_COUNT: Final = 1000
STREAM_MAX_INTERVAL: Final = 60.0
#: Python's json recursion limit is hit near here, at a depth that depends on the caller's stack.
JSON_DEPTH_BAND: Final = 800

Frame = dict[str, Any]


def dumps(value: Any, ascii: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ascii, separators=(",", ":"))


def size(frame: str | bytes) -> int:
    return len(frame) if isinstance(frame, bytes) else len(frame.encode())


# -- the server and its bystanders ---------------------------------------------------------------


@pytest.fixture(scope="module", params=list(TRANSPORTS.values()), ids=list(TRANSPORTS))
def ws_impl(request: pytest.FixtureRequest) -> str:
    """The WebSocket implementation of this module's server processes (``ROOMCAST_WS``)."""
    return str(request.param)


@pytest.fixture(scope="module")
def server(ws_impl: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoomcastServer]:
    srv = RoomcastServer(
        tmp_path_factory.mktemp("fuzz"),
        env={
            "ROOMCAST_WS": ws_impl,
            "ROOMCAST_MAX_MESSAGE_SIZE": str(MAX_MESSAGE),
            "ROOMCAST_MAX_PUBLICATION_SIZE": str(MAX_PUBLICATION),
            "ROOMCAST_MAX_SUBSCRIPTIONS": str(MAX_SUBSCRIPTIONS),
            "ROOMCAST_JWT_SECRET": JWT_SECRET,
            # The fuzzing /ws connection may stay anonymous and unsubscribed for a long time.
            "ROOMCAST_AUTH_TIMEOUT": "3600",
        },
    )
    with srv:
        yield srv
    srv.assert_no_traceback()


def open_ws(server: RoomcastServer, path: str) -> ClientConnection:
    """A connection kept open across examples (closed by :meth:`Fuzz.close`)."""
    opening = connect(
        server.url(path),
        open_timeout=TIMEOUT,
        close_timeout=TIMEOUT,
        max_queue=None,
        # No keepalive pings from the client threads: their payloads come from the random
        # module, which Hypothesis forbids while it draws (the server still pings us).
        ping_interval=None,
    )
    return opening.__enter__()


def recv_frame(ws: ClientConnection) -> Frame:
    raw = ws.recv(timeout=TIMEOUT)
    assert isinstance(raw, str), f"a binary frame on /ws: {raw!r}"
    frame = orjson.loads(raw)
    assert isinstance(frame, dict), raw
    return frame


def read_reply(ws: ClientConnection) -> tuple[list[Frame], Frame]:
    """The pushes up to the next reply, and the reply."""
    pushes: list[Frame] = []
    while True:
        frame = recv_frame(ws)
        if "id" in frame:
            return pushes, frame
        assert frame.get("type") in PUSH_TYPES, frame
        pushes.append(frame)


def received_close(ws: ClientConnection) -> int | None:
    """The code of the close frame the server sent, if any."""
    rcvd = ws.protocol.close_rcvd
    return rcvd.code if rcvd is not None else None


def assert_closed(ws: ClientConnection, codes: frozenset[int]) -> int | None:
    """The server closes ``ws`` with one of ``codes``, sending nothing else first."""
    leftovers: list[str | bytes] = []
    try:
        while True:
            leftovers.append(ws.recv(timeout=2 * TIMEOUT))
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else None
        reason = exc.rcvd.reason if exc.rcvd is not None else ""
    assert code in codes, f"closed with {code} ({reason!r}), expected one of {sorted(codes)}"
    assert not leftovers, [str(x)[:200] for x in leftovers]
    ws.close()
    return code


class Fuzz:
    """The shared server, its two bystanders and the fuzzing connections of the current test."""

    def __init__(self, server: RoomcastServer) -> None:
        self.server = server
        self.examples = 0
        self.checks = itertools.count(1)
        self.mine: set[ClientConnection] = set()
        self.sessions: dict[str, Any] = {}
        self.fresh = server.wait_stats(lambda s: s["connections"] == 0, what="a fresh server")
        self.echo = open_ws(server, "/ws/echo")
        self.by = open_ws(server, "/ws")
        assert recv_frame(self.by)["type"] == "connected"
        self.by_channel = f"fuzz-bystander:{uuid.uuid4().hex[:12]}"
        self.by.send(dumps({"id": 0, "op": "subscribe", "channel": self.by_channel}))
        assert read_reply(self.by)[1]["ok"] is True
        self.idle = self.settle()

    def settle(self) -> dict[str, int]:
        """The counters once two successive reads agree (and only the bystanders are on)."""
        previous: dict[str, int] = {}

        def steady(stats: dict[str, int]) -> bool:
            nonlocal previous
            same = stats == previous and stats["connections"] == 2
            previous = stats
            return same

        return self.server.wait_stats(steady, what="steady counters")

    def connect(self, path: str) -> ClientConnection:
        ws = open_ws(self.server, path)
        self.mine.add(ws)
        return ws

    def close(self, ws: ClientConnection | None) -> None:
        if ws is not None:
            self.mine.discard(ws)
            ws.close()

    def close_all(self) -> None:
        self.sessions.clear()
        for ws in list(self.mine):
            self.close(ws)

    def tick(self) -> None:
        self.examples += 1
        if self.examples % BYSTANDER_EVERY == 0:
            self.check_bystanders()

    def assert_alive(self) -> None:
        proc = self.server.proc
        assert proc is not None
        assert proc.poll() is None, f"the server died: {self.server.log()[-3000:]}"

    def check_bystanders(self) -> None:
        self.assert_alive()
        n = next(self.checks)
        self.echo.send(f"still here {n}")
        assert self.echo.recv(timeout=TIMEOUT) == f"Echo: still here {n}"
        request = {"id": n, "op": "publish", "channel": self.by_channel, "data": {"n": n}}
        self.by.send(dumps(request))
        pushes, reply = read_reply(self.by)
        assert reply["ok"] is True, reply
        assert [p["data"] for p in pushes] == [{"n": n}], pushes

    def finish(self) -> None:
        self.close(self.echo)
        self.close(self.by)
        self.server.wait_stats(
            lambda s: s == self.fresh, timeout=3 * TIMEOUT, what=f"the fresh counters {self.fresh}"
        )
        self.assert_alive()
        assert httpx.get(f"{self.server.http_url}/health", timeout=TIMEOUT).status_code == 200


@pytest.fixture(scope="module")
def fuzz(server: RoomcastServer) -> Iterator[Fuzz]:
    f = Fuzz(server)
    yield f
    f.close_all()
    f.finish()


@contextlib.contextmanager
def example(fuzz: Fuzz) -> Iterator[None]:
    """One example: a failure leaves unread frames behind, so its connections are dropped."""
    try:
        yield
    except BaseException:
        fuzz.close_all()
        raise
    fuzz.tick()


@pytest.fixture(autouse=True)
def _no_leak_and_bystanders_fine(fuzz: Fuzz) -> Iterator[None]:
    """After each test: its connections closed, the counters are back, the bystanders work."""
    yield
    fuzz.close_all()
    fuzz.server.wait_stats(
        lambda s: s == fuzz.idle, timeout=3 * TIMEOUT, what=f"the counters before {fuzz.idle}"
    )
    fuzz.check_bystanders()


# -- strategies: values ------------------------------------------------------------------------

BIG_INTS = st.sampled_from(
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**19, -(10**30), 10**400]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
#: Any JSON value (st.text() never makes lone surrogates, so every value encodes as UTF-8).
JSON = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=12,
)
#: Any JSON value too, integers beyond 64 bits included, but shallow: much cheaper to draw,
#: for the fields where depth is moot.
WRONG = (
    SCALARS
    | BIG_INTS
    | st.lists(SCALARS | BIG_INTS, max_size=3)
    | st.dictionaries(st.text(max_size=5), SCALARS, max_size=3)
)
MISSING: Final = object()


@st.composite
def json_text(draw: st.DrawFn, values: st.SearchStrategy[Any] = JSON) -> str:
    return dumps(draw(values), ascii=draw(st.booleans()))


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[str]) -> str:
    """A JSON text broken (or not quite) in one place."""
    text = draw(base)
    at = draw(st.integers(0, len(text)))
    how = draw(
        st.sampled_from(
            ["truncate", "insert", "delete", "trailing", "bom", "space", "dup_id", "literal"]
        )
    )
    if how == "truncate":
        return text[:at]
    if how == "insert":
        return text[:at] + draw(st.sampled_from(list('{}[]",:\\ \x00\x1fe-+.0'))) + text[at:]
    if how == "delete":
        return text[:at] + text[at + 1 :]
    if how == "trailing":
        return text + draw(st.sampled_from(["x", "}", "]", ",", " ", "\n", "{}"]))
    if how == "bom":
        return "\ufeff" + text
    if how == "space":
        return " \t\r\n" + text + " \n"
    if how == "dup_id" and text.startswith("{"):
        return '{"id":' + dumps(draw(JSON)) + "," + text[1:]
    literal = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-0", "1E2", "01"]))
    return text[:at] + literal + text[at:]


@st.composite
def deep_json(draw: st.DrawFn, wrap: bool = True) -> str:
    """Nesting from shallow to 20,000 levels, bare or inside a request's field."""
    depth = draw(st.integers(1, 300) | st.integers(240, 1100) | st.integers(1000, 20000))
    kind = draw(st.sampled_from(["[", '{"a":', "mixed"]))
    opens = ["[" if kind == "[" or (kind == "mixed" and i % 2) else '{"a":' for i in range(depth)]
    closes = "".join("]" if o == "[" else "}" for o in reversed(opens))
    inner = "".join(opens) + "1" + (closes if draw(st.booleans()) else closes[1:])
    where = draw(st.sampled_from(["bare", "data", "field", "id", "channel"])) if wrap else "bare"
    if where == "data":
        return '{"id":7,"op":"publish","channel":"fz:deep","data":' + inner + "}"
    if where == "field":
        return '{"id":7,"op":"ping","x":' + inner + "}"
    if where == "id":
        return '{"id":' + inner + ',"op":"ping"}'
    if where == "channel":
        return '{"id":7,"op":"subscribe","channel":' + inner + "}"
    return inner


@st.composite
def huge_json(draw: st.DrawFn, requests: bool = True) -> str:
    """A JSON text of close to (or just over) the message size limit, padded to an exact size."""
    target = draw(st.integers(MAX_MESSAGE - 300, MAX_MESSAGE + 40))
    shape = draw(st.sampled_from(["string", "numbers", "objects", "unicode"]))
    if shape == "string":
        body = '"' + "s" * (target - 8) + '"'
    elif shape == "numbers":
        body = "[" + ",".join(["1e308", "-0.5", "9007199254740993", "0"] * (target // 40)) + "]"
    elif shape == "objects":
        body = "[" + ",".join(['{"k":[null,true]}'] * (target // 20)) + "]"
    else:
        body = '"' + "é€😀" * (target // 12) + '"'
    if requests:
        head = draw(
            st.sampled_from(
                [
                    '{"id":8,"op":"publish","channel":"fz:huge","data":',
                    '{"id":8,"op":"ping","pad":',
                    '{"id":8,"op":"history","channel":"fz:huge","limit":',
                    "",
                ]
            )
        )
        body = head + body + ("}" if head else "")
    pad = target - size(body)
    return body + " " * pad if pad > 0 else body


@st.composite
def sized_text(draw: st.DrawFn) -> str:
    """Text of a few bytes under to a few bytes over the limit, in 1- to 4-byte characters."""
    char = draw(st.sampled_from(["a", "é", "€", "😀"]))
    target = draw(st.integers(MAX_MESSAGE - 8, MAX_MESSAGE + 8))
    text = char * (target // len(char.encode()))
    return text + "a" * (target - size(text))


SIZED_BYTES = st.integers(MAX_MESSAGE - 8, MAX_MESSAGE + 8).map(lambda n: b"\xa5" * n)
TEXT = st.text() | st.text(st.characters(codec="ascii"), max_size=40) | sized_text()
BYTES = st.binary(max_size=200) | SIZED_BYTES


# -- strategies: tokens (static, garbage, and JWTs signed with the server's secret) ---------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@st.composite
def signed_jwt(draw: st.DrawFn) -> str:
    """A JWT signed with the server's secret: mostly valid, with any value in any claim."""
    # Times relative to now: what is drawn must not depend on the clock (replays would differ).
    now = int(time.time())
    future = st.integers(60, 10**6).map(lambda delta: now + delta)
    recent = st.integers(-100, 100).map(lambda delta: now + delta)
    patterns = st.lists(st.sampled_from(["*", "fz:*", "a", "", "a*b", "**"]), max_size=3)
    claims: dict[str, Any] = {}
    for name, valid, wrong in (
        ("sub", st.text(min_size=1, max_size=12), st.just(" ") | WRONG),
        (
            "exp",
            future,
            future.map(str)
            | st.integers(-(2**40), 2**40)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.sampled_from([now + 5, now - 5, "soon", True, [now + 60], 2**63 - 1, 2**64])
            | st.sampled_from([10**20, 10**400, 1e300, "1" + "0" * 400])
            | WRONG,
        ),
        ("subscribe", patterns, WRONG),
        ("publish", patterns, WRONG),
        ("nbf", recent, WRONG),
        ("iat", recent, WRONG),
        ("aud", st.just(MISSING), st.text(max_size=5) | WRONG),
        ("iss", st.just(MISSING), st.text(max_size=5) | WRONG),
    ):
        # sub and exp: valid 70%, missing 10%, wrong 20%; the others: absent 60%, valid 20%.
        which = draw(st.integers(0, 9))
        if which < (7 if name in ("sub", "exp") else 2):
            claims[name] = draw(valid)
        elif which >= 8:
            claims[name] = draw(wrong)
    claims = {k: v for k, v in claims.items() if v is not MISSING}
    alg = draw(st.sampled_from(["HS256", "HS384", "HS512"]) | st.sampled_from(["none", "RS256"]))
    header: dict[str, Any] = {"alg": alg if draw(st.integers(0, 9)) else draw(WRONG), "typ": "JWT"}
    if draw(st.integers(0, 9)) == 0:
        header["kid"] = draw(WRONG)
    signing = b64url(dumps(header).encode()) + "." + b64url(dumps(claims).encode())
    digest = {"HS384": hashlib.sha384, "HS512": hashlib.sha512}.get(alg, hashlib.sha256)
    signature = hmac.new(JWT_SECRET.encode(), signing.encode(), digest).digest()
    return signing + "." + (b64url(signature) if alg != "none" else "")


def signed_by_us(token: str) -> bool:
    """Whether ``token`` is a three-part JWT whose signature the server's secret verifies."""
    parts = token.split(".")
    if len(parts) != 3:
        return False
    signing = (parts[0] + "." + parts[1]).encode()
    signature = parts[2].encode()
    key = JWT_SECRET.encode()
    return any(
        hmac.compare_digest(b64url(hmac.new(key, signing, digest).digest()).encode(), signature)
        for digest in (hashlib.sha256, hashlib.sha384, hashlib.sha512)
    )


TOKENS = st.just(GOOD_TOKEN) | st.text(max_size=40) | signed_jwt() | st.just("a.b.c")


# -- the guide's endpoints -------------------------------------------------------------------------


def expect_reply_or_close(
    fuzz: Fuzz, path: str, frame: str | bytes, reply: str | bytes | None, codes: frozenset[int]
) -> None:
    """Send ``frame`` on the endpoint's reused connection: ``reply`` comes back, or (``None``)
    the server closes with one of ``codes`` and the next example reconnects."""
    ws = fuzz.sessions.get(path)
    if ws is None:
        ws = fuzz.sessions[path] = fuzz.connect(path)
        if path.startswith("/ws/secure"):
            assert ws.recv(timeout=TIMEOUT) == f"Hello, {USER}! Welcome to the secure WebSocket."
    if reply is None:
        with contextlib.suppress(ConnectionClosed):
            ws.send(frame)
        del fuzz.sessions[path]
        fuzz.mine.discard(ws)
        event(f"close {assert_closed(ws, codes)}")
    else:
        ws.send(frame)
        got = ws.recv(timeout=TIMEOUT)
        # A chat member may hear that the previous connection of this test left.
        while path == "/ws/chat" and got == LEFT:
            got = ws.recv(timeout=TIMEOUT)
        assert got == reply, (str(got)[:300], str(reply)[:300])
        event("reply")


def text_answer(prefix: str, frame: str | bytes) -> tuple[str | None, frozenset[int]]:
    """The documented answer of a text endpoint: ``prefix + text``, or close codes."""
    if isinstance(frame, bytes):
        too_big = size(frame) > MAX_MESSAGE
        return None, frozenset({1003, 1009} if too_big else {1003})
    if size(frame) > MAX_MESSAGE:
        return None, frozenset({1009})
    return prefix + frame, frozenset()


TEXT_ENDPOINTS: Final = {
    "/ws/echo": "Echo: ",
    "/ws/methods_text": "Server received: ",
    "/ws/chat": "Client says: ",
}


@pytest.mark.parametrize("path", list(TEXT_ENDPOINTS))
@FUZZ
@given(frame=TEXT | BYTES)
def test_text_endpoint(fuzz: Fuzz, path: str, frame: str | bytes) -> None:
    with example(fuzz):
        reply, codes = text_answer(TEXT_ENDPOINTS[path], frame)
        expect_reply_or_close(fuzz, path, frame, reply, codes)


SECURE: Final = f"/ws/secure?token={GOOD_TOKEN}"


def handshake(fuzz: Fuzz, path: str) -> ClientConnection | int:
    """The open connection, or the HTTP status of a refused handshake."""
    try:
        return fuzz.connect(path)
    except InvalidStatus as exc:
        return exc.response.status_code


@FUZZ
@given(case=st.tuples(st.just("frame"), TEXT | BYTES) | st.tuples(st.just("token"), TOKENS))
def test_secure(fuzz: Fuzz, case: tuple[str, Any]) -> None:
    """Frames on an authenticated connection, and handshakes with any token."""
    with example(fuzz):
        kind, value = case
        if kind == "frame":
            reply, codes = text_answer("You said: ", value)
            expect_reply_or_close(fuzz, SECURE, value, reply, codes)
            return
        token: str = value
        ws = handshake(fuzz, "/ws/secure?" + urlencode({"token": token}))
        event(f"handshake {ws if isinstance(ws, int) else 101}")
        if isinstance(ws, int):
            assert ws == 403
            assert token != GOOD_TOKEN
        else:
            greeting = ws.recv(timeout=TIMEOUT)
            assert token == GOOD_TOKEN or signed_by_us(token), (token, greeting)
            assert isinstance(greeting, str), greeting
            assert re.fullmatch(r"Hello, .+! Welcome to the secure WebSocket\.", greeting, re.S)
            ws.send("x")
            assert ws.recv(timeout=TIMEOUT) == "You said: x"
            fuzz.close(ws)


@FUZZ
@given(frame=TEXT | BYTES)
def test_methods_bytes(fuzz: Fuzz, frame: str | bytes) -> None:
    with example(fuzz):
        if size(frame) > MAX_MESSAGE:
            codes = frozenset({1009} if isinstance(frame, bytes) else {1003, 1009})
            expect_reply_or_close(fuzz, "/ws/methods_bytes", frame, None, codes)
        elif isinstance(frame, str):
            expect_reply_or_close(fuzz, "/ws/methods_bytes", frame, None, frozenset({1003}))
        else:
            reply = b"Server received: " + frame
            expect_reply_or_close(fuzz, "/ws/methods_bytes", frame, reply, frozenset())


@FUZZ
@given(frame=TEXT | BYTES)
def test_methods_raw(fuzz: Fuzz, frame: str | bytes) -> None:
    with example(fuzz):
        if size(frame) > MAX_MESSAGE:
            expect_reply_or_close(fuzz, "/ws/methods_raw", frame, None, frozenset({1009}))
        elif isinstance(frame, str):
            expect_reply_or_close(fuzz, "/ws/methods_raw", frame, f"Raw echo: {frame}", frozenset())
        else:
            expect_reply_or_close(
                fuzz, "/ws/methods_raw", frame, b"Raw echo: " + frame, frozenset()
            )


def nesting(text: str) -> int:
    """The deepest bracket nesting of a JSON-ish text (outside strings)."""
    if text.count("[") + text.count("{") < JSON_DEPTH_BAND:
        return 0
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


JSON_FRAMES = (
    json_text()
    | json_text(WRONG)
    | json_text(JSON.map(lambda v: {"k": v}))
    | mutated(json_text())
    | deep_json(wrap=False)
    | huge_json(requests=False)
    | st.text(max_size=30)
    | st.sampled_from(["NaN", "[Infinity,-Infinity]", "1e400", "-0", "1" * 5000, '"\\u0000"'])
    | st.sampled_from(['"\\ud800"', '["\\udc00x"]', '{"\\ud83d":1}', '"\\ud83d\\ude00"'])
    | BYTES
)


@FUZZ
@given(frame=JSON_FRAMES)
def test_methods_json(fuzz: Fuzz, frame: str | bytes) -> None:
    """JSON in, the guide's reply out (Python's json, as the guide); else 1007."""
    with example(fuzz):
        path = "/ws/methods_json"
        if isinstance(frame, bytes) or size(frame) > MAX_MESSAGE:
            reply, codes = text_answer("", frame)
            expect_reply_or_close(fuzz, path, frame, reply, codes)
            return
        either = nesting(frame) >= JSON_DEPTH_BAND
        try:
            value = json.loads(frame)
            answer = json.dumps(
                {"message": "Server received your JSON", "data": value},
                separators=(",", ":"),
                ensure_ascii=False,
            )
        except ValueError:
            expect_reply_or_close(fuzz, path, frame, None, frozenset({1007}))
            return
        except RecursionError:
            either = True
            answer = ""
        try:
            answer.encode()
        except UnicodeEncodeError:
            # A lone surrogate escape ("\ud800") parses, but no text frame can carry it back.
            expect_reply_or_close(fuzz, path, frame, None, frozenset({1007}))
            return
        if not either:
            expect_reply_or_close(fuzz, path, frame, answer, frozenset())
            return
        # Nested about as deep as Python's recursion limit allows: parsed, or 1007, both are fine.
        ws = fuzz.sessions.pop(path, None) or fuzz.connect(path)
        try:
            ws.send(frame)
            got = ws.recv(timeout=TIMEOUT)
        except ConnectionClosed:
            assert received_close(ws) == 1007
            fuzz.close(ws)
        else:
            assert not answer or got == answer, (str(got)[:300], answer[:300])
            fuzz.sessions[path] = ws


ROOMS = (
    st.from_regex(ROOM, fullmatch=True)
    | st.text(max_size=70)
    | st.text(st.sampled_from("aZ09_.:-/%?#@= \n\x00é"), max_size=70)
    | st.integers(60, 70).map(lambda n: "r" * n)
    | st.sampled_from(["", ".", "..", "a/b", "%2F", "%", "+", "~"])
).filter(lambda room: "Traceback" not in room)  # a room name ends up in the log


@FUZZ
@given(room=ROOMS, messages=st.lists(st.text(max_size=50), max_size=2))
def test_chat_room(fuzz: Fuzz, room: str, messages: list[str]) -> None:
    """Valid room names chat; invalid ones are accepted and closed 1008."""
    with example(fuzz):
        ws = handshake(fuzz, "/ws/chat/" + quote(room, safe=""))
        # No such route for an empty name or one with a "/" (the path parameter is one segment).
        no_route = room == "" or "/" in room
        event("no route" if no_route else "valid" if ROOM.fullmatch(room) else "invalid")
        if isinstance(ws, int):
            assert no_route, (room, ws)
            assert ws in (403, 404), ws
            return
        assert not no_route, room
        if ROOM.fullmatch(room) is None:
            for message in messages:
                with contextlib.suppress(ConnectionClosed):
                    ws.send(message)
            fuzz.mine.discard(ws)
            assert_closed(ws, frozenset({1008}))
        else:
            for message in messages:
                ws.send(message)
                got = ws.recv(timeout=TIMEOUT)
                while got == LEFT:
                    got = ws.recv(timeout=TIMEOUT)
                assert got == f"Client says: {message}"
            fuzz.close(ws)


NUMBERISH = (
    st.integers(-3, 1003).map(str)
    | st.floats().map(str)
    | st.text(max_size=6)
    | st.sampled_from(
        ["", " 5", "5 ", "+5", "1_0", "0x10", "1e2", "١٢", "nan", "inf", "-0", "0.0", "1e-9"]
    )
    | st.sampled_from(["60", "60.0001", "1000", "1001", "0", "-1", "1.5"])
)
STREAM_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "count": st.integers(1, 5).map(str) | st.integers(-2, 1002).map(str) | NUMBERISH,
        "interval": st.sampled_from(["0", "0.0", "0.001", "1e-4"])
        | st.floats(0, 61).map(str)
        | NUMBERISH,
    },
)


def stream_verdict(params: dict[str, str]) -> tuple[str, int, float]:
    """The verdict: stream, close (1008), or either (numbers only Python's int/float read)."""
    count_text, interval_text = params.get("count", "10"), params.get("interval", "1")
    try:
        count, interval = int(count_text), float(interval_text)
    except ValueError:
        return "close", 0, 0.0
    plain = re.fullmatch(r"[+-]?[0-9]+", count_text) and re.fullmatch(
        r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", interval_text
    )
    if not math.isfinite(interval):
        return "close", 0, 0.0
    valid = 1 <= count <= STREAM_MAX_COUNT and 0 <= interval <= STREAM_MAX_INTERVAL
    if not plain:
        return "either", count, interval
    return ("stream" if valid else "close"), count, interval


@FUZZ
@given(params=STREAM_PARAMS)
def test_stream(fuzz: Fuzz, params: dict[str, str]) -> None:
    """Bad count or interval: accepted, then 1008; good ones stream (read whole when short)."""
    with example(fuzz):
        verdict, count, interval = stream_verdict(params)
        event(verdict)
        ws = fuzz.connect("/ws/stream?" + urlencode(params))
        try:
            first = ws.recv(timeout=TIMEOUT)
        except ConnectionClosed:
            assert verdict in ("close", "either"), params
            assert received_close(ws) == 1008
            fuzz.close(ws)
            return
        assert verdict in ("stream", "either"), (params, first)
        assert first == "Streaming message 1"
        if verdict == "stream" and count <= 50 and count * interval <= 0.05:
            rest = [ws.recv(timeout=TIMEOUT) for _ in range(count - 1)]
            assert rest == [f"Streaming message {n}" for n in range(2, count + 1)]
            fuzz.mine.discard(ws)
            assert_closed(ws, frozenset({1000}))
        else:
            fuzz.close(ws)  # the server stops streaming at once (the leak check sees it)


# -- /ws: the oracle ------------------------------------------------------------------------------


@dataclass
class Expect:
    """What the server must answer to one frame on /ws."""

    id: int | str | None = None
    errors: frozenset[str] = frozenset()
    ok: bool = False
    close: frozenset[int] = frozenset()
    op: str = ""
    channel: str | None = None
    body: Frame = field(default_factory=dict)


def bad(request_id: int | str | None = None) -> Expect:
    return Expect(request_id, frozenset({"bad_request"}))


def big_int_inside(value: Any) -> bool:
    """Whether ``value`` holds an integer beyond 64 bits (docs/protocol.md, publish)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is int and not -(2**63) <= item < 2**64:
            return True
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return False


class WsSession:
    """The reused /ws connection of a test, and what the server knows of it."""

    def __init__(self, fuzz: Fuzz, presubscribe: bool = True) -> None:
        self.fuzz = fuzz
        self.presubscribe = presubscribe
        self.ws: ClientConnection | None = None
        self.client = ""
        self.user: str | None = None
        self.subs: set[str] = set()
        self.pings = itertools.count()

    def conn(self) -> ClientConnection:
        if self.ws is None:
            self.ws = self.fuzz.connect("/ws")
            hello = recv_frame(self.ws)
            assert hello["type"] == "connected", hello
            assert hello["user"] is None, hello
            self.client, self.user, self.subs = hello["client"], None, set()
            # Start subscribed to some of the pool, so that unsubscribe, presence and the
            # publisher's own push have something to work on.
            # (Not for auth: an anonymous connection authenticates before it subscribes.)
            for number, channel in enumerate(CHANNEL_POOL[:3] if self.presubscribe else ()):
                self.ws.send(dumps({"id": -1 - number, "op": "subscribe", "channel": channel}))
                assert read_reply(self.ws)[1]["ok"] is True
                self.subs.add(channel)
        return self.ws

    def reconnect(self) -> None:
        self.fuzz.close(self.ws)
        self.ws = None

    # -- the documented answer --------------------------------------------------------------

    def expect(self, frame: str | bytes) -> Expect:
        if size(frame) > MAX_MESSAGE:
            return Expect(close=frozenset({1009}))
        if isinstance(frame, bytes):
            return bad()
        try:
            body = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return bad()
        if not isinstance(body, dict):
            return bad()
        rid = body.get("id")
        if not (type(rid) is int or (type(rid) is str and 0 < len(rid) <= 64)):
            return bad()
        op = body.get("op")
        if not isinstance(op, str):
            return bad(rid)
        if op not in OPS:
            return Expect(rid, frozenset({"unknown_op"}))
        channel = body.get("channel")
        if not (isinstance(channel, str) and CHANNEL.fullmatch(channel)):
            channel = None
        errors: set[str] = (
            set() if channel is not None or op in ("ping", "auth") else {"bad_channel"}
        )
        maybe: set[str] = set()  # acceptable, not required
        state: set[str] = set()  # errors from the connection's state
        if op == "subscribe":
            recover = body.get("recover")
            if recover is not None and not (
                isinstance(recover, dict)
                and type(recover.get("offset")) is int
                and recover["offset"] >= 0
                and isinstance(recover.get("epoch"), str)
            ):
                errors.add("bad_request")
            if "join_leave" in body:
                if body["join_leave"] is None:
                    maybe.add("bad_request")  # null for an optional bool: absent, or not a bool
                elif type(body["join_leave"]) is not bool:
                    errors.add("bad_request")
            if channel in self.subs:
                state.add("already_subscribed")
            elif channel is not None and len(self.subs) >= MAX_SUBSCRIPTIONS:
                state.add("too_many_subscriptions")
        elif op == "unsubscribe":
            if channel is not None and channel not in self.subs:
                state.add("not_subscribed")
        elif op == "publish":
            self.expect_data(frame, body, errors, maybe)
        elif op == "history":
            for name, low, high in (("limit", 1, 1000), ("since", 0, None), ("before", 0, None)):
                value = body.get(name)
                if value is not None and (
                    type(value) is not int or value < low or (high is not None and value > high)
                ):
                    errors.add("bad_request")
            if body.get("since") is not None and body.get("before") is not None:
                errors.add("bad_request")
        elif op == "auth":
            token = body.get("token")
            if not isinstance(token, str):
                errors.add("bad_request")
            elif token == GOOD_TOKEN:
                if self.user is None and self.subs:
                    errors.add("bad_request")
            elif signed_by_us(token):
                # PyJWT's rules decide; anything but a server failure will do.
                maybe |= {"unauthorized", "forbidden", "bad_request"}
            else:
                errors.add("unauthorized")
        if errors:
            return Expect(rid, frozenset(errors | maybe | state), op=op)
        if state:
            return Expect(rid, frozenset(state | maybe), op=op)
        return Expect(rid, frozenset(maybe), True, op=op, channel=channel, body=body)

    @staticmethod
    def expect_data(frame: str, body: Frame, errors: set[str], maybe: set[str]) -> None:
        if "data" not in body:
            errors.add("bad_request")
            return
        try:
            exact = json.loads(frame)["data"]  # Python's parser keeps big integers exact
        except RecursionError:
            exact = None
            maybe.add("bad_request")
        if big_int_inside(exact):
            errors.add("bad_request")
            return
        try:
            encoded = orjson.dumps(body["data"])
        except orjson.JSONEncodeError:
            errors.add("bad_request")  # nested deeper than the server's encoder goes
            return
        if len(encoded) > MAX_PUBLICATION:
            errors.add("too_large")

    # -- one example --------------------------------------------------------------------------

    def send(self, frame: str | bytes) -> None:
        ws = self.conn()  # first: a new connection starts with subscriptions
        expect = self.expect(frame)
        if expect.close:
            with contextlib.suppress(ConnectionClosed):
                ws.send(frame)
            self.fuzz.mine.discard(ws)
            self.ws = None
            event(f"close {assert_closed(ws, expect.close)}")
            return
        ping_id = f"~ping~{next(self.pings)}"
        ws.send(frame)
        ws.send(dumps({"id": ping_id, "op": "ping"}))  # exactly one reply comes before its own
        pushes, reply = read_reply(ws)
        note(f"expected {expect}, got {reply}")
        # Shown by --hypothesis-show-statistics: how often each answer came.
        event("ok" if reply.get("ok") else str(reply.get("error", {}).get("code")))
        self.check_reply(reply, expect)
        later, pong = read_reply(ws)
        assert pong == {"id": ping_id, "ok": True, "result": {}}, (reply, pong)
        if reply["ok"]:
            self.check_result(expect, reply["result"], pushes, later)
        elif reply["error"]["code"] == "too_many_subscriptions":
            self.reconnect()  # so that subscribing can succeed again

    @staticmethod
    def check_reply(reply: Frame, expect: Expect) -> None:
        assert reply["id"] == expect.id, reply
        assert type(reply["id"]) is type(expect.id), reply
        if reply["ok"] is True:
            assert expect.ok, reply
            assert set(reply) == {"id", "ok", "result"}, reply
            assert isinstance(reply["result"], dict), reply
            return
        assert reply["ok"] is False, reply
        assert set(reply) == {"id", "ok", "error"}, reply
        error = reply["error"]
        assert set(error) == {"code", "message"}, reply
        assert error["code"] in expect.errors, reply
        assert isinstance(error["message"], str), reply
        assert 0 < len(error["message"]) <= 512, reply  # no echo of a huge input

    def check_result(
        self, expect: Expect, result: Frame, pushes: list[Frame], later: list[Frame]
    ) -> None:
        op, channel, body = expect.op, expect.channel, expect.body
        if op == "ping":
            assert result == {}, result
        elif op == "unsubscribe":
            assert result == {}, result
            self.subs.discard(channel or "")
        elif op == "subscribe":
            assert channel is not None
            self.subs.add(channel)
            assert isinstance(result["epoch"], str), result
            assert type(result["offset"]) is int, result
            if body.get("recover") is None:
                assert set(result) == {"epoch", "offset"}, result
            else:
                assert set(result) == {"epoch", "offset", "recovered", "replayed"}, result
                replayed = [p for p in later if p["type"] == "publication"]
                assert len(replayed) == result["replayed"], (result, later)
                assert all(p["channel"] == channel for p in replayed), later
        elif op == "publish":
            assert set(result) == {"epoch", "offset"}, result
            assert result["offset"] >= 1, result
            if channel in self.subs:
                # With the memory:// broker the publisher's own push comes before the reply.
                mine = {"client": self.client, "user": self.user}
                own = [
                    (p["data"], p["info"])
                    for p in pushes
                    if p["type"] == "publication"
                    and p["channel"] == channel
                    and p["offset"] == result["offset"]
                ]
                assert own == [(body["data"], mine)], (result, pushes)
        elif op == "presence":
            clients = [c["client"] for c in result["clients"]]
            assert (self.client in clients) == (channel in self.subs), (result, self.subs)
        elif op == "history":
            assert set(result) == {"epoch", "offset", "start", "publications"}, result
            offsets = [p["offset"] for p in result["publications"]]
            assert offsets == sorted(set(offsets)), offsets
            assert len(offsets) <= (body.get("limit") or 100), result
            assert all(p["channel"] == channel for p in result["publications"]), result
        elif op == "auth":
            if body["token"] == GOOD_TOKEN:
                assert result == {"user": USER, "expires_at": None}, result
                self.user = USER
            else:
                assert isinstance(result["user"], str), result
                self.reconnect()  # a JWT's permissions and expiry are its own


# -- /ws: the strategies ---------------------------------------------------------------------------

CHANNEL_POOL: Final = ["fz:a", "fz:b", "fz:c", "x", "A-Z_.:@=", "c" * 128, "c" * 129]
VALID: Final[dict[str, st.SearchStrategy[Any]]] = {
    "channel": st.sampled_from(CHANNEL_POOL) | st.from_regex(CHANNEL, fullmatch=True),
    "data": JSON | st.integers(MAX_PUBLICATION - 40, MAX_PUBLICATION + 10).map(lambda n: "d" * n),
    "recover": st.fixed_dictionaries({"offset": st.integers(0, 20), "epoch": st.text(max_size=10)}),
    "join_leave": st.booleans(),
    "limit": st.integers(-1, 1001),
    "since": st.integers(-1, 30),
    "before": st.integers(-1, 30),
    "token": TOKENS,
}
#: Values of any type for each field (for ``data``, those the server refuses).
ANY: Final[dict[str, st.SearchStrategy[Any]]] = {
    "channel": WRONG | st.text(max_size=130),
    "data": st.lists(SCALARS | BIG_INTS, min_size=1, max_size=3),
    "recover": JSON | st.fixed_dictionaries({"offset": WRONG, "epoch": WRONG}),
    "join_leave": WRONG,
    "limit": WRONG,
    "since": WRONG,
    "before": WRONG,
    "token": WRONG,
}
#: The fields each operation reads; the others it must ignore.
READS: Final = {
    "subscribe": ("channel", "recover", "join_leave"),
    "unsubscribe": ("channel",),
    "publish": ("channel", "data"),
    "presence": ("channel",),
    "history": ("channel", "limit", "since", "before"),
    "ping": (),
    "auth": ("token",),
}
GOOD_IDS = st.integers() | st.integers(-(2**63), 2**64 - 1) | st.text(min_size=1, max_size=64)
BAD_IDS = st.text(min_size=65, max_size=70) | st.just("") | WRONG | st.just(MISSING)
OTHER_OPS = st.sampled_from(OPS) | st.text(max_size=8) | WRONG | st.just(MISSING)


@st.composite
def request(draw: st.DrawFn, op: str) -> Frame:
    """A request for ``op``, mostly valid, with values of any type in any of its fields.

    Each field ``op`` reads is valid (60%), missing (20%) or of any type (20%); the id and the
    op are wrong 10 and 20% of the time; a few fields ``op`` must ignore come along.
    """
    others = [name for name in FIELDS if name not in READS[op]]
    ignored = st.sampled_from(others) | st.text(max_size=6)
    body: Frame = draw(st.dictionaries(ignored, WRONG, max_size=2))
    body["id"] = draw(GOOD_IDS if draw(st.integers(0, 9)) else BAD_IDS)
    body["op"] = op if draw(st.integers(0, 9)) < 8 else draw(OTHER_OPS)
    for name in READS[op]:
        which = draw(st.integers(0, 9))
        if which < 6:
            body[name] = draw(VALID[name])
        elif which < 8:
            body.pop(name, None)
        else:
            body[name] = draw(ANY[name])
    return {k: v for k, v in body.items() if v is not MISSING}


#: Built once: Hypothesis caches its analysis of a strategy object, not of a new one per draw.
REQUESTS: Final = {op: request(op) for op in OPS}


def ws_session(fuzz: Fuzz, presubscribe: bool = True) -> WsSession:
    session = fuzz.sessions.get("/ws")
    if session is None:
        session = fuzz.sessions["/ws"] = WsSession(fuzz, presubscribe)
    assert isinstance(session, WsSession)
    return session


@pytest.mark.parametrize("op", OPS)
@FUZZ
@given(data=st.data())
def test_ws_operation(fuzz: Fuzz, op: str, data: st.DataObject) -> None:
    """Every field of every operation, of every type: one documented reply each."""
    with example(fuzz):
        body = data.draw(REQUESTS[op], label="request")
        frame = dumps(body, ascii=data.draw(st.booleans(), label="ascii"))
        ws_session(fuzz, presubscribe=op != "auth").send(frame)


WS_FRAMES = (
    st.text()
    | st.binary(max_size=100)
    | SIZED_BYTES
    | sized_text()
    | json_text()
    | json_text(WRONG)
    | json_text(st.dictionaries(st.sampled_from(("id", "op", *FIELDS)) | st.text(), JSON))
    | mutated(json_text(st.one_of(*REQUESTS.values())))
    | deep_json()
    | huge_json()
    | st.sampled_from(
        [
            '{"id":1,"op":"ping","x":NaN}',
            '{"id":1,"op":"ping","x":"\\ud800"}',
            '{"id":1,"op":"ping","x":"\\udc00\\ud800"}',
            '{"id":1,"op":"ping","x":1e400}',
            '{"id":1,"op":"ping"}garbage',
            '{"id":1,"id":"two","op":"ping"}',
            '{"id":18446744073709551616,"op":"ping"}',
            '{"id":1.0,"op":"ping"}',
            '{"id":true,"op":"ping"}',
            '{"id":"' + "i" * 64 + '","op":"ping"}',
            '{"id":1,"op":"PING"}',
            '{"id":1,"op":"ping\\u0000"}',
            '{"id":1,"op":"' + "o" * 10000 + '"}',
            '{"id":1,"op":"publish","channel":"fz:a","data":18446744073709551616}',
            '{"id":1,"op":"publish","channel":"fz:a","data":-9223372036854775809}',
            '{"id":1,"op":"publish","channel":"fz:a","data":18446744073709551615}',
            '{"id":1234567890123456789,"op":"publish","channel":"fz:a","data":1e19}',
            '{"id":1,"op":"publish","channel":"fz:a","data":[1e19,"12345678901234567890"]}',
            '{"id":1,"op":"history","channel":"fz:a","limit":1.0}',
            '{"id":1,"op":"subscribe","channel":"fz:a","recover":{"offset":1e2,"epoch":""}}',
        ]
    )
)


@FUZZ
@given(frame=WS_FRAMES)
def test_ws_frames(fuzz: Fuzz, frame: str | bytes) -> None:
    """Random text and bytes, broken, deep and huge JSON: one reply each, or 1009 if too big."""
    with example(fuzz):
        ws_session(fuzz).send(frame)


@FUZZ
@given(token=TOKENS)
def test_ws_handshake_token(fuzz: Fuzz, token: str) -> None:
    """A token that does not verify is refused with HTTP 403; the good ones connect."""
    with example(fuzz):
        ws = handshake(fuzz, "/ws?" + urlencode({"token": token}))
        event(f"handshake {ws if isinstance(ws, int) else 101}")
        if isinstance(ws, int):
            assert ws == 403
            assert token != GOOD_TOKEN
        else:
            hello = recv_frame(ws)
            assert token == GOOD_TOKEN or signed_by_us(token), (token, hello)
            assert hello["type"] == "connected", hello
            assert isinstance(hello["user"], str), hello
            ws.send(dumps({"id": 1, "op": "ping"}))
            assert read_reply(ws)[1] == {"id": 1, "ok": True, "result": {}}
            fuzz.close(ws)


# -- regressions: the bugs this file found ---------------------------------------------------------
#
# Each crashing case runs on a server of its own, stopped before conftest's autouse fixture looks
# at the live servers' logs: should the bug come back, its traceback must fail only its test.


@contextlib.contextmanager
def throwaway_server(ws: str, tmp_path: Path, **env: str) -> Iterator[RoomcastServer]:
    srv = RoomcastServer(tmp_path / "bug", env={"ROOMCAST_WS": ws, **env})
    with srv:
        yield srv


def close_code(ws: ClientConnection) -> int | None:
    try:
        ws.recv(timeout=TIMEOUT)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    return None


def test_methods_json_lone_surrogate(ws_impl: str, tmp_path: Path) -> None:
    """'"\\ud800"' parses, but cannot be sent back as text: it was a UnicodeEncodeError in the
    send, a traceback and close 1011; documented for what the server cannot take: 1007."""
    with throwaway_server(ws_impl, tmp_path) as srv, open_ws(srv, "/ws/methods_json") as ws:
        ws.send('"\\ud800"')
        assert close_code(ws) == 1007
    # Stopped: every handler has ended, so a traceback from the last input is in the log now.
    srv.assert_no_traceback()


def test_jwt_exp_beyond_64_bits(ws_impl: str, tmp_path: Path) -> None:
    """A (signed) JWT whose exp is beyond a float or 64 bits: it was an OverflowError or
    TypeError (auth answered 'internal', a handshake got HTTP 500, with a traceback)."""

    def token(exp: Any) -> str:
        signing = b64url(b'{"alg":"HS256","typ":"JWT"}') + "."
        signing += b64url(dumps({"sub": "bob", "exp": exp}).encode())
        signature = hmac.new(JWT_SECRET.encode(), signing.encode(), hashlib.sha256).digest()
        return signing + "." + b64url(signature)

    with throwaway_server(ws_impl, tmp_path, ROOMCAST_JWT_SECRET=JWT_SECRET) as srv:
        with open_ws(srv, "/ws") as ws:
            recv_frame(ws)
            for exp in (10**400, 10**20, "1" + "0" * 400):
                ws.send(dumps({"id": 1, "op": "auth", "token": token(exp)}))
                reply = read_reply(ws)[1]
                assert reply["ok"] or reply["error"]["code"] == "unauthorized", (exp, reply)
        for huge in (10**400, 1e300):
            with pytest.raises(InvalidStatus) as refused:
                open_ws(srv, "/ws?token=" + token(huge))
            assert refused.value.response.status_code == 403
    # Stopped: every handler has ended, so a traceback from the last input is in the log now.
    srv.assert_no_traceback()


def test_float_data_is_no_big_integer(fuzz: Fuzz) -> None:
    """A float of integral value >= 2**63 (1e19) in data was refused as an integer beyond 64
    bits whenever the frame held 19 digits in a row anywhere (here in the id)."""
    ws = fuzz.connect("/ws")
    recv_frame(ws)
    request = {"id": 1234567890123456789, "op": "publish", "channel": "fz:float", "data": 1e19}
    ws.send(dumps(request))
    assert read_reply(ws)[1]["ok"] is True


def test_path_cannot_forge_log_lines(fuzz: Fuzz) -> None:
    """A percent-encoded CR/LF in a WebSocket path went decoded into the access line and the
    conn= line: any client could forge log lines (CWE-117)."""
    offset = fuzz.server.log_offset()
    ws = fuzz.connect("/ws/chat/x%0Aforged-line")
    fuzz.mine.discard(ws)
    assert_closed(ws, frozenset({1008}))
    # The connection's close line is the one that carries the path: wait for it (or fail).
    wait_until(
        lambda: "closed 1008" in fuzz.server.log_since(offset), TIMEOUT, "the 1008 close logged"
    )
    lines = fuzz.server.log_since(offset).splitlines()
    assert not [line for line in lines if line.startswith("forged-line")], lines
