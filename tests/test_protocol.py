"""The `/ws` channel protocol of docs/protocol.md, against in-process servers on both
WebSocket implementations (the SIGTERM restart: against ``roomcast serve`` processes).

The example session of the document is replayed literally (parsed out of docs/protocol.md), then
every operation, every documented error and close code, presence, and the two ways a client that
does not read gets cut (4008).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from websockets.exceptions import ConnectionClosed, InvalidStatus

import roomcast
from helpers import (
    GOOD_TOKEN,
    TIMEOUT,
    USER,
    RawFrameReader,
    ServerFactory,
    async_wait_until,
    client_frame,
    close_code_lines,
    closing_socket,
    kernel_send_buffer_max,
    raw_ws_handshake,
    recv_until_closed,
    ws_connect,
)
from servers import (
    TRANSPORTS,
    AppServer,
    Frame,
    Peer,
    ServerStarter,
    channel,
    dumps,
    error_code,
    peer,
    publication,
    serve,
)

# In-process servers serve in the module's event loop (tests/servers.py); every test here is a
# coroutine (pytest-asyncio refuses the mark on a plain function).
pytestmark = pytest.mark.asyncio(loop_scope="module")

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

TOKENS = {GOOD_TOKEN: USER, "alice-token": "alice", "bob-token": "bob"}

# The limits server: small enough that the limits are cheap to reach.
MAX_PUBLICATION = 1024
MAX_MESSAGE = 4096
MAX_SUBSCRIPTIONS = 3

OPS = ("subscribe", "unsubscribe", "publish", "presence", "history", "ping")
CHANNEL_OPS = ("subscribe", "unsubscribe", "publish", "presence", "history")
CLIENT_ID = re.compile(r"[0-9a-f]{12}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(ws_impl: str) -> AsyncIterator[AppServer]:
    """Default settings, plus the tokens of alice and bob (the example session's users)."""
    async with serve(ws_impl, tokens=TOKENS) as srv:
        yield srv


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def limits(ws_impl: str) -> AsyncIterator[AppServer]:
    async with serve(
        ws_impl,
        max_publication_size=MAX_PUBLICATION,
        max_message_size=MAX_MESSAGE,
        max_subscriptions=MAX_SUBSCRIPTIONS,
    ) as srv:
        yield srv


def parse_utc(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    assert when.utcoffset() == timedelta(0), text
    return when


# -- the example session, straight from the document --------------------------------------------

# The doc's timestamps: checked for the same form, with the server's values.
DOC_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
WILDCARD = "<any>"


def example_blocks() -> list[list[tuple[str, Frame]]]:
    """The ``>``/``<`` lines of the code blocks of "## Example session", parsed.

    ``...`` (a value the document leaves out) becomes a wildcard.
    """
    section = DOC.read_text(encoding="utf-8").split("\n## Example session", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = section.split("```")[1::2]
    parsed = []
    for block in blocks:
        lines = []
        for line in block.splitlines():
            if line[:2] in ("> ", "< "):
                text = line[2:].replace(":...", f':"{WILDCARD}"')
                lines.append((line[0], json.loads(text)))
        parsed.append(lines)
    return parsed


class Binder:
    """Placeholders of the document (client ids, epochs) bound to what the server sent."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], Any] = {}
        self.timestamps: list[datetime] = []

    def bind(self, key: tuple[str, str], actual: Any) -> None:
        if key in self.values:
            assert self.values[key] == actual, f"{key} was {self.values[key]!r}, now {actual!r}"
            return
        others = [k for k, v in self.values.items() if k[0] == key[0] and v == actual]
        assert not others, f"{key} and {others} got the same value {actual!r}"
        self.values[key] = actual

    def substitute(self, value: Any, key: str = "") -> Any:
        """A frame of the document with its placeholders replaced (for frames we send)."""
        if isinstance(value, dict):
            return {k: self.substitute(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v) for v in value]
        return self.values.get((key, value), value) if isinstance(value, str) else value

    def match(self, expected: Any, actual: Any, path: str = "frame") -> None:
        if expected == WILDCARD:
            return
        if isinstance(expected, dict):
            assert isinstance(actual, dict), f"{path}: {actual!r} is not an object"
            assert set(actual) == set(expected), f"{path}: keys {sorted(actual)}"
            for key, value in expected.items():
                sub = f"{path}.{key}"
                if key == "client" and isinstance(value, str):
                    assert isinstance(actual[key], str), f"{sub}: {actual[key]!r}"
                    assert CLIENT_ID.fullmatch(actual[key]), f"{sub}: {actual[key]!r}"
                    self.bind((key, value), actual[key])
                elif key == "epoch":
                    assert isinstance(actual[key], str), f"{sub}: {actual[key]!r}"
                    assert actual[key], sub
                    self.bind((key, value), actual[key])
                elif key == "connected_at":
                    assert DOC_TIMESTAMP.fullmatch(value), f"the document's {sub}: {value!r}"
                    assert isinstance(actual[key], str), f"{sub}: {actual[key]!r}"
                    assert DOC_TIMESTAMP.fullmatch(actual[key]), f"{sub}: {actual[key]!r}"
                    self.timestamps.append(parse_utc(actual[key]))
                else:
                    self.match(value, actual[key], sub)
        elif isinstance(expected, list):
            assert isinstance(actual, list), f"{path}: {actual!r} is not an array"
            assert len(actual) == len(expected), f"{path}: {actual!r}"
            for k, (e, a) in enumerate(zip(expected, actual, strict=True)):
                self.match(e, a, f"{path}[{k}]")
        else:
            assert type(actual) is type(expected), f"{path}: {actual!r} != {expected!r}"
            assert actual == expected, f"{path}: {actual!r} != {expected!r}"


async def test_example_session(server: AppServer) -> None:
    """The example session of docs/protocol.md, frame by frame, in the document's order."""
    session, reconnect = example_blocks()
    assert len(session) >= 15, "the example session was not parsed"
    assert len(reconnect) >= 4, "the example's reconnection was not parsed"
    sends = [frame for direction, frame in session if direction == ">"]
    ch = sends[0]["channel"]
    assert ch == "chat:lobby"
    binder = Binder()
    started = datetime.now(UTC)

    # Bob is connected and subscribed before alice arrives; he drives the `<` lines that carry
    # his info (a publication of his, his leave).
    async with peer(server, "/ws?token=bob-token") as bob:
        await bob.ok("subscribe", channel=ch)
        async with ws_connect(server, "/ws?token=alice-token") as ws:
            alice = Peer(ws)
            for direction, frame in session:
                if direction == ">":
                    await alice.send(binder.substitute(frame))
                    continue
                info = frame.get("info") or {}
                if frame.get("type") == "publication" and info.get("user") == "bob":
                    await bob.ok("publish", channel=frame["channel"], data=frame["data"])
                elif frame.get("type") == "leave" and info.get("user") == "bob":
                    await bob.ws.close()
                got = await alice.frame()
                binder.match(frame, got, f"the frame for {dumps(frame)[:60]}")
                if got.get("type") == "connected":
                    alice.hello = got
            pubs = [f for _, f in session if f.get("type") == "publication"]
            last_offset = max(f["offset"] for f in pubs)

        alice_ph = session[0][1]["client"]
        bob_ph = next(f["info"]["client"] for f in pubs if f["info"]["user"] == "bob")
        assert binder.values[("client", alice_ph)] == alice.client
        assert binder.values[("client", bob_ph)] == bob.client
        assert len(binder.timestamps) == 2
        assert binder.timestamps[0] <= binder.timestamps[1], "bob connected first"
        assert started - timedelta(seconds=1) <= binder.timestamps[0]
        assert binder.timestamps[1] <= datetime.now(UTC)

    # "Reconnecting later with what alice saw last": bob publishes what she then recovers.
    first_reply = next(f for d, f in reconnect if d == "<" and "id" in f)
    missed = first_reply["result"]["replayed"]
    assert first_reply["result"]["offset"] == last_offset + missed
    published = []
    async with peer(server, "/ws?token=bob-token") as bob:
        for k in range(missed):
            data = {"text": f"while alice was away {k}"}
            await bob.ok("publish", channel=ch, data=data)
            published.append(publication(ch, last_offset + 1 + k, data, bob.info))
    async with ws_connect(server, "/ws?token=alice-token") as ws:
        alice = Peer(ws)
        for direction, frame in reconnect:
            if direction == ">":
                await alice.send(binder.substitute(frame))
            else:
                got = await alice.frame()
                binder.match(frame, got)
                if got.get("type") == "publication":
                    assert got == published.pop(0)
        assert published == []
        await alice.still_works()


# -- connecting ----------------------------------------------------------------------------------


async def test_connected_push(server: AppServer) -> None:
    async with peer(server) as anon:
        assert set(anon.hello) == {"type", "client", "user", "version"}
        assert anon.hello["user"] is None
        assert CLIENT_ID.fullmatch(anon.client), anon.hello
        assert anon.hello["version"] == roomcast.__version__
        await anon.still_works()


async def test_token_in_query_or_header(server: AppServer) -> None:
    async with (
        peer(server, f"/ws?token={GOOD_TOKEN}") as by_query,
        peer(server, "/ws", additional_headers={"Authorization": f"Bearer {GOOD_TOKEN}"}) as hdr,
    ):
        assert by_query.hello["user"] == USER
        assert hdr.hello["user"] == USER
        assert by_query.client != hdr.client
        await hdr.still_works()
    assert GOOD_TOKEN not in server.log(), "a query-string token reached the log"


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/ws?token=wrong-token", {}),
        ("/ws", {"Authorization": "Bearer wrong-token"}),
    ],
    ids=["query", "header"],
)
async def test_unknown_token_refused(server: AppServer, path: str, headers: dict[str, str]) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(server, path, additional_headers=headers):
            pass
    assert info.value.response.status_code == 403


async def test_client_ids_are_unique(server: AppServer) -> None:
    ids = []
    for _ in range(20):
        async with peer(server) as p:
            ids.append(p.client)
    assert len(set(ids)) == len(ids), ids


# -- operations ----------------------------------------------------------------------------------


async def test_subscribe_and_publish(server: AppServer) -> None:
    ch = channel()
    async with peer(server) as sub, peer(server) as pub:
        first = await sub.ok("subscribe", channel=ch)
        assert set(first) == {"epoch", "offset"}, first
        assert first["offset"] == 0
        assert isinstance(first["epoch"], str)
        assert first["epoch"]
        # A publisher that is not subscribed gets its reply and nothing else.
        for k in range(1, 6):
            await pub.send({"id": f"p{k}", "op": "publish", "channel": ch, "data": {"n": k}})
            reply = await pub.frame()
            assert reply == {
                "id": f"p{k}",
                "ok": True,
                "result": {"epoch": first["epoch"], "offset": k},
            }
        got = await sub.publications(5)
        assert got == [publication(ch, k, {"n": k}, pub.info) for k in range(1, 6)]
        # A late subscriber starts at the channel's position now.
        async with peer(server) as late:
            assert await late.ok("subscribe", channel=ch) == {"epoch": first["epoch"], "offset": 5}
            assert (await pub.ok("publish", channel=ch, data="six"))["offset"] == 6
            assert await late.push() == publication(ch, 6, "six", pub.info)
        assert await sub.push() == publication(ch, 6, "six", pub.info)
        await sub.still_works()


async def test_publisher_gets_its_own_publication_before_the_reply(
    server: AppServer,
) -> None:
    ch = channel()
    async with peer(server, f"/ws?token={GOOD_TOKEN}") as p, peer(server) as other:
        epoch = (await p.ok("subscribe", channel=ch))["epoch"]
        await other.ok("subscribe", channel=ch)
        for k in range(1, 4):
            await p.send({"id": k, "op": "publish", "channel": ch, "data": [k]})
            assert await p.frame() == publication(ch, k, [k], {"client": p.client, "user": USER})
            assert await p.frame() == {
                "id": k,
                "ok": True,
                "result": {"epoch": epoch, "offset": k},
            }
        assert [f["offset"] for f in await other.publications(3)] == [1, 2, 3]


@pytest.mark.parametrize(
    "data",
    [
        None,
        True,
        0,
        -12345678901234,
        1.5,
        "",
        "ünïcødé 🎉 \u2028",
        [],
        {},
        [1, "two", None, {"three": [3.25]}],
        {"nested": {"deep": {"deeper": [True, False]}}, "": "empty key"},
    ],
    ids=lambda d: type(d).__name__,
)
async def test_data_delivered_as_sent(server: AppServer, data: Any) -> None:
    ch = channel()
    async with peer(server) as p:
        await p.ok("subscribe", channel=ch)
        await p.ok("publish", channel=ch, data=data)
        push = p.pushes.popleft()
        assert push["data"] == data
        assert type(push["data"]) is type(data)
        history = await p.ok("history", channel=ch)
        assert history["publications"] == [push]


@pytest.mark.parametrize("number", [2**64, -(2**63) - 1, 10**30], ids=["2**64", "-2**63-1", "1e30"])
async def test_integers_beyond_64_bits_are_not_altered(server: AppServer, number: int) -> None:
    """``data`` is delivered as sent, or refused: never silently turned into another number."""
    ch = channel()
    async with peer(server) as p:
        await p.ok("subscribe", channel=ch)
        reply = await p.request("publish", channel=ch, data={"n": number})
        if reply["ok"]:
            delivered = (await p.push())["data"]["n"]
            assert type(delivered) is int, delivered
            assert delivered == number
        else:
            assert error_code(reply, reply["id"]) == "bad_request"
        await p.still_works()


async def test_unsubscribe_stops_the_pushes(server: AppServer) -> None:
    ch = channel()
    async with peer(server) as p:
        epoch = (await p.ok("subscribe", channel=ch))["epoch"]
        assert await p.ok("unsubscribe", channel=ch) == {}
        # The push of a publication precedes its reply: none may come now.
        await p.send({"id": "after", "op": "publish", "channel": ch, "data": 1})
        reply = await p.frame()
        assert reply == {"id": "after", "ok": True, "result": {"epoch": epoch, "offset": 1}}
        # And it can subscribe again.
        assert (await p.ok("subscribe", channel=ch))["offset"] == 1
        await p.still_works()


async def test_presence_and_history_shapes(server: AppServer) -> None:
    ch = channel()
    async with peer(server) as p:
        assert await p.ok("presence", channel=ch) == {"clients": []}
        empty = await p.ok("history", channel=ch)
        assert set(empty) == {"epoch", "offset", "start", "publications"}
        assert empty["offset"] == 0
        assert empty["start"] == 1
        assert empty["publications"] == []
        before = datetime.now(UTC) - timedelta(seconds=1)
        await p.ok("subscribe", channel=ch)
        (entry,) = (await p.ok("presence", channel=ch))["clients"]
        assert set(entry) == {"client", "user", "connected_at"}
        assert entry["client"] == p.client
        assert entry["user"] is None
        assert before - timedelta(seconds=TIMEOUT) <= parse_utc(entry["connected_at"])
        assert parse_utc(entry["connected_at"]) <= datetime.now(UTC)
        for k in range(3):
            await p.ok("publish", channel=ch, data=k)
        pushes = await p.publications(3)
        history = await p.ok("history", channel=ch)
        assert history == {"epoch": empty["epoch"], "offset": 3, "start": 1, "publications": pushes}
        assert (await p.ok("history", channel=ch, limit=2))["publications"] == pushes[1:]
        assert (await p.ok("history", channel=ch, since=1))["publications"] == pushes[1:]
        assert (await p.ok("history", channel=ch, before=3))["publications"] == pushes[:2]
        assert (await p.ok("history", channel=ch, since=3))["publications"] == []
        assert (await p.ok("history", channel=ch, before=1))["publications"] == []
        for limit in (1, 1000):
            assert (await p.ok("history", channel=ch, limit=limit))["offset"] == 3


@pytest.mark.parametrize(
    "rid",
    [0, 1, -7, 2**53, "a", "x" * 64, "é-ü 🎉", " "],
    ids=["zero", "one", "negative", "2**53", "a", "64-chars", "unicode", "space"],
)
async def test_ping_echoes_any_valid_id(server: AppServer, rid: Any) -> None:
    async with peer(server) as p:
        await p.send({"id": rid, "op": "ping"})
        assert await p.frame() == {"id": rid, "ok": True, "result": {}}


async def test_pipelined_requests_are_answered_in_order(server: AppServer) -> None:
    ch = channel()
    async with peer(server) as p:
        requests: list[Frame] = [{"id": 0, "op": "subscribe", "channel": ch}]
        for k in range(1, 60):
            op = ("ping", "publish", "presence", "history", "frobnicate")[k % 5]
            requests.append({"id": k, "op": op, "channel": ch, "data": k})
        for request in requests:
            await p.send(request)
        replies = []
        async with asyncio.timeout(TIMEOUT):
            while len(replies) < len(requests):
                frame = await p.frame()
                if "id" in frame:
                    replies.append(frame)
        assert [r["id"] for r in replies] == [r["id"] for r in requests]
        assert [r["ok"] for r in replies] == [r["op"] != "frobnicate" for r in requests]
        offsets = [r["result"]["offset"] for q, r in zip(requests, replies, strict=True)
                   if q["op"] == "publish"]  # fmt: skip
        assert offsets == list(range(1, 13))


async def test_unknown_fields_are_ignored(server: AppServer) -> None:
    ch = channel()
    async with peer(server) as p:
        extra = {"future": {"field": [1, 2]}, "x": None}
        assert (await p.ok("subscribe", channel=ch, **extra))["offset"] == 0
        assert (await p.ok("publish", channel=ch, data=1, **extra))["offset"] == 1
        assert await p.ok("ping", **extra) == {}
        assert await p.ok("unsubscribe", channel=ch, **extra) == {}


# -- bad input: one error reply, and the connection goes on --------------------------------------

LONG = "x" * 65


def req(rid: Any, op: str, **fields: Any) -> str:
    return dumps({"id": rid, "op": op, **fields})


def hist(**fields: Any) -> str:
    return req(9, "history", channel="c", **fields)


def sub(**fields: Any) -> str:
    return req(9, "subscribe", channel="c", **fields)


BAD_FRAMES: list[tuple[str, str, Any, str]] = [
    # (test id, the frame, the id of the reply, the error code)
    ("malformed-json", '{"id": 1, "op": "ping"', None, "bad_request"),
    ("single-quotes", "{'id': 1, 'op': 'ping'}", None, "bad_request"),
    ("empty-frame", "", None, "bad_request"),
    ("array", "[1]", None, "bad_request"),
    ("string", '"x"', None, "bad_request"),
    ("number", "3", None, "bad_request"),
    ("null", "null", None, "bad_request"),
    ("true", "true", None, "bad_request"),
    ("missing-id", '{"op": "ping"}', None, "bad_request"),
    ("null-id", req(None, "ping"), None, "bad_request"),
    ("bool-id", req(True, "ping"), None, "bad_request"),
    ("false-id", req(False, "ping"), None, "bad_request"),
    ("float-id", req(1.5, "ping"), None, "bad_request"),
    ("object-id", req({"n": 1}, "ping"), None, "bad_request"),
    ("array-id", req([1], "ping"), None, "bad_request"),
    ("empty-string-id", req("", "ping"), None, "bad_request"),
    ("65-char-id", req(LONG, "ping"), None, "bad_request"),
    ("unknown-op", req(7, "frobnicate"), 7, "unknown_op"),
    ("unknown-op-case", req(7, "PING"), 7, "unknown_op"),
    ("missing-op", '{"id": 8}', 8, "bad_request"),
    ("missing-op-string-id", '{"id": "q"}', "q", "bad_request"),
    # wrong field types and values
    ("limit-string", hist(limit="10"), 9, "bad_request"),
    ("limit-float", hist(limit=2.5), 9, "bad_request"),
    ("limit-bool", hist(limit=True), 9, "bad_request"),
    ("since-string", hist(since="1"), 9, "bad_request"),
    ("before-object", hist(before={}), 9, "bad_request"),
    ("since-and-before", hist(since=1, before=5), 9, "bad_request"),
    ("limit-0", hist(limit=0), 9, "bad_request"),
    ("limit-1001", hist(limit=1001), 9, "bad_request"),
    ("limit-negative", hist(limit=-1), 9, "bad_request"),
    ("recover-string", sub(recover="x"), 9, "bad_request"),
    ("recover-array", sub(recover=[0, "e"]), 9, "bad_request"),
    ("recover-no-epoch", sub(recover={"offset": 0}), 9, "bad_request"),
    ("recover-no-offset", sub(recover={"epoch": "e"}), 9, "bad_request"),
    ("recover-offset-string", sub(recover={"offset": "1", "epoch": "e"}), 9, "bad_request"),
    ("recover-offset-negative", sub(recover={"offset": -1, "epoch": "e"}), 9, "bad_request"),
    ("recover-offset-bool", sub(recover={"offset": True, "epoch": "e"}), 9, "bad_request"),
    ("recover-epoch-number", sub(recover={"offset": 1, "epoch": 5}), 9, "bad_request"),
    ("join-leave-string", sub(join_leave="yes"), 9, "bad_request"),
    ("join-leave-int", sub(join_leave=1), 9, "bad_request"),
    ("publish-without-data", req(9, "publish", channel="c"), 9, "bad_request"),
]


@pytest.mark.parametrize(
    ("frame", "rid", "code"), [case[1:] for case in BAD_FRAMES], ids=[c[0] for c in BAD_FRAMES]
)
async def test_bad_frame(server: AppServer, frame: str, rid: Any, code: str) -> None:
    async with peer(server) as p:
        await p.send(frame)
        assert error_code(await p.frame(), rid) == code
        await p.still_works()


def bad_channel_cases() -> list[Any]:
    names: list[tuple[str, Any, str]] = [
        ("space", "no spaces", "bad_channel"),
        ("too-long", "x" * 129, "bad_channel"),
        ("empty", "", "bad_channel"),
        ("slash", "chat/lobby", "bad_channel"),
        ("umlaut", "chät", "bad_channel"),
        ("newline", "chat\n", "bad_channel"),
        ("number", 5, "bad_channel"),
        ("null", None, "bad_channel"),
        ("list", ["chat"], "bad_channel"),
    ]
    return [
        pytest.param(op, name, code, id=f"{op}-{label}")
        for op in CHANNEL_OPS
        for label, name, code in names
    ]


@pytest.mark.parametrize(("op", "name", "code"), bad_channel_cases())
async def test_bad_channel(server: AppServer, op: str, name: Any, code: str) -> None:
    async with peer(server) as p:
        assert await p.fail(op, channel=name, data=1) == code
        await p.still_works()


@pytest.mark.parametrize("op", CHANNEL_OPS)
async def test_missing_channel(server: AppServer, op: str) -> None:
    # The document allows both readings: "a field is missing" and "the name breaks the rules".
    async with peer(server) as p:
        assert await p.fail(op, data=1) in ("bad_request", "bad_channel")
        await p.still_works()


async def test_every_allowed_character_and_the_longest_name(server: AppServer) -> None:
    tail = uuid.uuid4().hex[:8]
    names = ["ABCXYZabcxyz0189_-.:@=" + tail, ("L" + tail).ljust(128, "z"), "x"]
    async with peer(server) as p:
        for name in names:
            base = (await p.ok("subscribe", channel=name))["offset"]
            assert (await p.ok("publish", channel=name, data=name))["offset"] == base + 1
            assert (await p.push())["channel"] == name
            assert await p.ok("unsubscribe", channel=name) == {}


async def test_binary_frame(server: AppServer) -> None:
    async with peer(server) as p:
        await p.send(dumps({"id": 1, "op": "ping"}).encode())
        assert error_code(await p.frame(), None) == "bad_request"
        await p.still_works()


async def test_publish_data_null_is_data(server: AppServer) -> None:
    """``data`` may be any JSON value, ``null`` included; only a missing one is refused."""
    ch = channel()
    async with peer(server) as p:
        assert (await p.ok("publish", channel=ch, data=None))["offset"] == 1


async def test_already_and_not_subscribed(server: AppServer) -> None:
    ch = channel()
    async with peer(server) as p:
        assert await p.fail("unsubscribe", channel=ch) == "not_subscribed"
        await p.still_works()
        await p.ok("subscribe", channel=ch)
        assert await p.fail("subscribe", channel=ch) == "already_subscribed"
        assert await p.fail("subscribe", channel=ch, join_leave=True) == "already_subscribed"
        await p.still_works()
        # Still subscribed exactly once.
        await p.ok("publish", channel=ch, data=1)
        assert [f["offset"] for f in await p.publications(1)] == [1]
        await p.still_works()
        await p.ok("unsubscribe", channel=ch)
        assert await p.fail("unsubscribe", channel=ch) == "not_subscribed"
        await p.still_works()


async def test_too_many_subscriptions(limits: AppServer) -> None:
    names = [channel() for _ in range(MAX_SUBSCRIPTIONS + 1)]
    async with peer(limits) as p, peer(limits) as other:
        for name in names[:MAX_SUBSCRIPTIONS]:
            await p.ok("subscribe", channel=name)
        assert await p.fail("subscribe", channel=names[-1]) == "too_many_subscriptions"
        await p.still_works()
        # The limit is per connection, and a freed slot can be used again.
        await other.ok("subscribe", channel=names[-1])
        await p.ok("unsubscribe", channel=names[0])
        await p.ok("subscribe", channel=names[-1])
        assert await p.fail("subscribe", channel=names[0]) == "too_many_subscriptions"
        await p.still_works()


async def test_too_large(limits: AppServer) -> None:
    ch = channel()
    async with peer(limits) as p:
        await p.ok("subscribe", channel=ch)
        at_limit = "a" * (MAX_PUBLICATION - 2)  # with its quotes: exactly the limit
        assert len(dumps(at_limit)) == MAX_PUBLICATION
        assert (await p.ok("publish", channel=ch, data=at_limit))["offset"] == 1
        assert (await p.push())["data"] == at_limit
        assert await p.fail("publish", channel=ch, data=at_limit + "a") == "too_large"
        assert await p.fail("publish", channel=ch, data={"k": list(range(400))}) == "too_large"
        await p.still_works()
        # Nothing was published by the refused ones.
        assert (await p.ok("publish", channel=ch, data="small"))["offset"] == 2


async def test_message_at_the_size_limit_is_accepted(limits: AppServer) -> None:
    async with peer(limits, compression=None) as p:
        head = dumps({"id": 1, "op": "ping", "pad": ""})
        frame = head[:-2] + "p" * (MAX_MESSAGE - len(head)) + '"}'
        assert len(frame.encode()) == MAX_MESSAGE
        await p.send(frame)
        assert await p.frame() == {"id": 1, "ok": True, "result": {}}


@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_message_over_the_size_limit_closes_1009(limits: AppServer, kind: str) -> None:
    async with peer(limits, compression=None) as p, peer(limits) as bystander:
        head = dumps({"id": 1, "op": "ping", "pad": ""})
        frame = head[:-2] + "p" * (MAX_MESSAGE + 1 - len(head)) + '"}'
        assert len(frame.encode()) == MAX_MESSAGE + 1
        with contextlib.suppress(ConnectionClosed):
            await p.send(frame if kind == "text" else frame.encode())
        assert await recv_until_closed(p.ws) == []
        assert p.ws.close_code == 1009, (p.ws.close_code, p.ws.close_reason)
        await bystander.still_works()


# -- presence, join and leave --------------------------------------------------------------------


def join(ch: str, who: Peer) -> Frame:
    return {"type": "join", "channel": ch, "info": who.info}


def leave(ch: str, who: Peer) -> Frame:
    return {"type": "leave", "channel": ch, "info": who.info}


async def presence_of(p: Peer, ch: str) -> list[str]:
    clients = (await p.ok("presence", channel=ch))["clients"]
    return [c["client"] for c in clients]


async def test_presence_joins_and_leaves(server: AppServer) -> None:
    ch = channel()
    async with (
        peer(server) as watcher,
        peer(server) as quiet,
        peer(server, f"/ws?token={GOOD_TOKEN}") as a,
        peer(server) as c,  # connects before b, subscribes after it
        peer(server) as b,
    ):
        await watcher.ok("subscribe", channel=ch, join_leave=True)
        await quiet.ok("subscribe", channel=ch)
        assert await watcher.push() == join(ch, quiet), "the joiner's own join must not come"
        await a.ok("subscribe", channel=ch)
        assert await watcher.push() == join(ch, a)
        assert join(ch, a)["info"]["user"] == USER
        await b.ok("subscribe", channel=ch, join_leave=True)
        assert await watcher.push() == join(ch, b)
        await c.ok("subscribe", channel=ch)
        assert await watcher.push() == join(ch, c)
        # b joined after the others: it hears of c only, not of itself or earlier members.
        assert await b.push() == join(ch, c)

        clients = (await a.ok("presence", channel=ch))["clients"]
        assert [x["client"] for x in clients] == [p.client for p in (watcher, quiet, a, b, c)]
        assert [x["user"] for x in clients] == [None, None, USER, None, None]
        when = {x["client"]: parse_utc(x["connected_at"]) for x in clients}
        assert when[c.client] <= when[b.client], "connected_at is the connection's time"

        # A clean unsubscribe.
        await a.ok("unsubscribe", channel=ch)
        assert await watcher.push() == leave(ch, a)
        assert await b.push() == leave(ch, a)
        assert await presence_of(watcher, ch) == [p.client for p in (watcher, quiet, b, c)]
        # A clean close.
        await b.ws.close()
        assert await watcher.push() == leave(ch, b)
        assert await presence_of(watcher, ch) == [p.client for p in (watcher, quiet, c)]
        # An abrupt disconnect: no close frame, the TCP connection just goes.
        c.ws.transport.abort()
        assert await watcher.push() == leave(ch, c)
        assert await presence_of(watcher, ch) == [watcher.client, quiet.client]

        # The subscriber without join_leave heard none of it.
        await watcher.ok("publish", channel=ch, data="end")
        assert (await quiet.push())["type"] == "publication"
        assert (await watcher.push())["type"] == "publication"
        await quiet.still_works()


async def test_abrupt_disconnect_of_a_raw_client_leaves_presence(server: AppServer) -> None:
    """A client that vanishes with a TCP reset (a crashed process) leaves presence at once."""
    ch = channel()
    async with peer(server) as watcher:
        await watcher.ok("subscribe", channel=ch, join_leave=True)
        sock, initial = await asyncio.to_thread(
            raw_ws_handshake, server.port, f"/ws?token={GOOD_TOKEN}"
        )
        with closing_socket(sock):
            reader = RawFrameReader(sock, initial)
            hello = await asyncio.to_thread(raw_json, reader)
            sock.sendall(
                client_frame(1, dumps({"id": 1, "op": "subscribe", "channel": ch}).encode())
            )
            assert (await asyncio.to_thread(raw_json, reader))["ok"] is True
            info = {"client": hello["client"], "user": USER}
            assert await watcher.push() == {"type": "join", "channel": ch, "info": info}
            assert await presence_of(watcher, ch) == [watcher.client, hello["client"]]
            # Linger 0: the close sends a RST, like a crashed client.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert await watcher.push() == {"type": "leave", "channel": ch, "info": info}
        assert await presence_of(watcher, ch) == [watcher.client]


PING = 0.5


async def test_silent_client_leaves_presence_after_ping_timeout(
    start_server: ServerStarter,
) -> None:
    """A client that answers no ping is closed 1011 and leaves within interval + timeout."""
    srv = await start_server(ping_interval=PING, ping_timeout=PING)
    ch = channel()
    async with peer(srv) as watcher:
        await watcher.ok("subscribe", channel=ch, join_leave=True)
        reader, hello, _epoch = await stalled_subscriber(srv, ch)
        with closing_socket(reader.sock):
            joined = await watcher.push()
            info = {"client": hello["client"], "user": None}
            assert joined == {"type": "join", "channel": ch, "info": info}
            started = time.monotonic()
            assert await watcher.push(within=4 * PING + TIMEOUT) == {
                "type": "leave",
                "channel": ch,
                "info": info,
            }
            assert time.monotonic() - started < 4 * PING + 1
            assert await presence_of(watcher, ch) == [watcher.client]
            frames, code, _ = await asyncio.to_thread(reader.frames_until_close, TIMEOUT)
            assert code == 1011
            assert {op for op, _ in frames} == {9}, "pings only"
        # The websockets client answers pings on its own and stays.
        await asyncio.sleep(3 * PING)
        await watcher.still_works()
        assert await presence_of(watcher, ch) == [watcher.client]


# A restart is a signal to a process; how the transport closes its connections on it differs.
@pytest.mark.parametrize("ws", list(TRANSPORTS.values()), ids=list(TRANSPORTS))
async def test_server_restart_closes_1012(server_factory: ServerFactory, ws: str) -> None:
    srv = server_factory(env={"ROOMCAST_DRAIN_TIMEOUT": "2", "ROOMCAST_WS": ws})
    ch = channel()
    async with peer(srv) as a, peer(srv) as b:
        await a.ok("subscribe", channel=ch, join_leave=True)
        await b.ok("subscribe", channel=ch)
        assert (await a.push())["type"] == "join"
        srv.send_signal(signal.SIGTERM)
        for p in (a, b):
            # No leave events when everyone goes at once: nothing, then the close.
            assert await recv_until_closed(p.ws, within=2 + TIMEOUT) == []
            assert p.ws.close_code == 1012, (p.ws.close_code, p.ws.close_reason)
    assert await asyncio.to_thread(srv.wait, 2 + 2 * TIMEOUT) == 0


def raw_json(reader: RawFrameReader, within: float = TIMEOUT) -> Frame:
    opcode, payload = reader.read_frame(time.monotonic() + within)
    assert opcode == 1, (opcode, payload[:200])
    frame = json.loads(payload)
    assert isinstance(frame, dict)
    return frame


# -- clients that do not read: 4008 --------------------------------------------------------------

FLOOD_OUTBOX = 16
FLOOD_PAD = 32 * 1024  # one publication's data; a history reply carries FLOOD_OUTBOX of them
REPLY_BYTES = FLOOD_OUTBOX * FLOOD_PAD


async def test_flooding_client_is_closed_4008(start_server: ServerStarter) -> None:
    """Requests sent faster than their replies are read fill the outbox: 4008, others unharmed."""
    srv = await start_server(outbox_size=FLOOD_OUTBOX, history_size=FLOOD_OUTBOX)
    ch = channel("flood")
    async with peer(srv) as filler, peer(srv) as bystander:
        for k in range(FLOOD_OUTBOX):
            await filler.ok("publish", channel=ch, data=f"{k:04d}".ljust(FLOOD_PAD, "x"))
        # Each tiny history request asks for a REPLY_BYTES reply: the flooder's kernel buffers,
        # the server's and its outbox fill long before this many were answered.
        requests = (kernel_send_buffer_max() + (8 << 20)) // REPLY_BYTES + 4 * FLOOD_OUTBOX
        sock, initial = await asyncio.to_thread(raw_ws_handshake, srv.port, "/ws", rcvbuf=4096)
        with closing_socket(sock):
            for start in range(0, requests, 8):
                chunk = b"".join(
                    client_frame(1, dumps({"id": k, "op": "history", "channel": ch}).encode())
                    for k in range(start, min(start + 8, requests))
                )
                try:
                    await asyncio.to_thread(sock.sendall, chunk)
                except OSError:  # it was closed (and its socket reset) already
                    break
                # The server goes on serving the others meanwhile.
                await bystander.still_works()
            reader = RawFrameReader(sock, initial)
            got, code, _reason = await asyncio.to_thread(reader.frames_until_close, 4 * TIMEOUT)
        assert code == 4008
        hello, *replies = [json.loads(payload) for _, payload in got]
        assert hello["type"] == "connected"
        assert [r["id"] for r in replies] == list(range(len(replies))), "replies in order"
        assert all(len(r["result"]["publications"]) == FLOOD_OUTBOX for r in replies)
        assert len(replies) < requests
        # The channel still works.
        await bystander.ok("subscribe", channel=ch)
        await filler.ok("publish", channel=ch, data="after")
        assert (await bystander.push())["offset"] == FLOOD_OUTBOX + 1


SLOW_OUTBOX = 64
SLOW_PAD = 16 * 1024
AFTER_CUT = 10


async def stalled_subscriber(srv: AppServer, ch: str) -> tuple[RawFrameReader, Frame, str]:
    """A raw client with a tiny receive buffer, subscribed to ``ch``, that reads no more.

    Returns its frame reader (its socket is ``reader.sock``), its ``connected`` push and the
    channel's epoch.
    """
    sock, initial = await asyncio.to_thread(raw_ws_handshake, srv.port, "/ws", rcvbuf=4096)
    reader = RawFrameReader(sock, initial)
    try:
        hello = await asyncio.to_thread(raw_json, reader)
        sock.sendall(client_frame(1, dumps({"id": 1, "op": "subscribe", "channel": ch}).encode()))
        subscribed = await asyncio.to_thread(raw_json, reader)
        assert subscribed["result"]["offset"] == 0, subscribed
    except BaseException:
        sock.close()
        raise
    return reader, hello, subscribed["result"]["epoch"]


def cut_lines(srv: AppServer, since: int, client: str) -> list[str]:
    return [line for line in close_code_lines(srv.log_since(since), 4008) if client in line]


async def test_slow_subscriber_is_cut_4008_then_recovers(start_server: ServerStarter) -> None:
    srv = await start_server(
        outbox_size=SLOW_OUTBOX,
        history_size=SLOW_OUTBOX,
        # The history must hold the whole outbox's worth of padded publications.
        history_bytes=8 << 20,
    )
    ch = channel("slow")
    log_start = srv.log_offset()
    reader, hello, epoch = await stalled_subscriber(srv, ch)
    with closing_socket(reader.sock):
        async with peer(srv) as healthy, peer(srv) as pub:
            await healthy.ok("subscribe", channel=ch, join_leave=True)
            received: list[Frame] = []
            left: list[Frame] = []

            async def read_healthy() -> None:
                while True:
                    frame = await healthy.push(within=4 * TIMEOUT)
                    (left if frame["type"] == "leave" else received).append(frame)

            limit = (kernel_send_buffer_max() + (8 << 20)) // SLOW_PAD + 2 * SLOW_OUTBOX
            published: list[Any] = []
            task = asyncio.create_task(read_healthy())
            try:
                async with asyncio.timeout(6 * TIMEOUT):
                    cut_at = None
                    while cut_at is None or len(published) < cut_at + AFTER_CUT:
                        assert len(published) < limit, f"not cut after {limit} publications"
                        data = {"n": len(published) + 1, "pad": "s" * SLOW_PAD}
                        result = await pub.ok("publish", channel=ch, data=data)
                        published.append(data)
                        assert result["offset"] == len(published)
                        if cut_at is None and cut_lines(srv, log_start, hello["client"]):
                            cut_at = len(published)
                    await async_wait_until(
                        lambda: len(received) >= len(published), what="the healthy one's reads"
                    )
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            total = len(published)
            assert received == [
                publication(ch, k + 1, published[k], pub.info) for k in range(total)
            ]

            # The slow one reads now: what the server had written before the cut, then 4008.
            got, code, _reason = await asyncio.to_thread(reader.frames_until_close, 4 * TIMEOUT)
            assert code == 4008
            frames = [json.loads(payload) for _, payload in got]
            seen = [f["offset"] for f in frames]
            assert seen == list(range(1, len(seen) + 1)), "in order, no gap, no duplicate"
            assert frames == received[: len(seen)]
            last = len(seen)
            assert last < total
            # It has left (at the latest now that its close handshake could complete).
            info = {"client": hello["client"], "user": None}
            if not left:
                left.append(await healthy.push())
            assert left == [{"type": "leave", "channel": ch, "info": info}]
            assert await presence_of(healthy, ch) == [healthy.client]

            # It reconnects and recovers what the history still holds of what it missed.
            async with peer(srv) as back:
                result = await back.ok(
                    "subscribe", channel=ch, recover={"offset": last, "epoch": epoch}
                )
                first = max(last + 1, total - SLOW_OUTBOX + 1)
                assert result == {
                    "epoch": epoch,
                    "offset": total,
                    "recovered": first == last + 1,
                    "replayed": total - first + 1,
                }
                replay = await back.publications(total - first + 1)
                assert replay == received[first - 1 :]
                await pub.ok("publish", channel=ch, data="live")
                assert await back.push() == publication(ch, total + 1, "live", pub.info)
                assert await healthy.push() == join(ch, back)
                assert await healthy.push() == publication(ch, total + 1, "live", pub.info)


async def test_cut_subscriber_leaves_presence_at_once(start_server: ServerStarter) -> None:
    """A subscriber cut with 4008 gets no more publications: it leaves presence at the cut,
    even while it still reads nothing (so its close handshake cannot complete)."""
    srv = await start_server(outbox_size=16, history_size=16)
    ch = channel("cut")
    log_start = srv.log_offset()
    reader, hello, _epoch = await stalled_subscriber(srv, ch)
    with closing_socket(reader.sock):
        async with peer(srv) as watcher, peer(srv) as pub:
            await watcher.ok("subscribe", channel=ch, join_leave=True)
            limit = (kernel_send_buffer_max() + (8 << 20)) // SLOW_PAD + 64
            for n in range(limit):  # noqa: B007
                await pub.ok("publish", channel=ch, data="s" * SLOW_PAD)
                if cut_lines(srv, log_start, hello["client"]):
                    break
            else:
                pytest.fail(f"not cut after {limit} publications")
            info = {"client": hello["client"], "user": None}
            async with asyncio.timeout(TIMEOUT):
                while (frame := await watcher.push())["type"] == "publication":
                    pass
            assert frame == {"type": "leave", "channel": ch, "info": info}
            assert await presence_of(watcher, ch) == [watcher.client]
            assert n + 1 < limit


# -- the document's tables -----------------------------------------------------------------------


def doc_table_codes(heading: str) -> list[str]:
    section = DOC.read_text(encoding="utf-8").split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)


async def test_error_codes_table_is_what_the_tests_expect() -> None:
    expected = {code for *_, code in BAD_FRAMES} | {
        "bad_channel",
        "too_large",
        "already_subscribed",
        "not_subscribed",
        "too_many_subscriptions",
        "internal",  # cannot be provoked from outside
        "unavailable",  # needs a shared broker that is down (the memory broker never is)
        "unauthorized",  # these three: tests/test_security.py
        "forbidden",
        "rate_limited",
    }
    assert set(doc_table_codes("Error codes")) == expected
    assert set(OPS) <= set(re.findall(r"^### `(\w+)`", DOC.read_text(), flags=re.MULTILINE))


async def test_the_server_sends_only_documented_error_codes() -> None:
    from roomcast.codecs.roomcast_json import ErrorCode

    assert {code.value for code in ErrorCode} == set(doc_table_codes("Error codes"))
