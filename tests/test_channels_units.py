"""Unit tests of the /ws wire format and the memory broker (no sockets, a fake clock)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from roomcast.brokers import Publication
from roomcast.brokers.memory import MemoryBroker
from roomcast.codecs.roomcast_json import (
    CODEC,
    ErrorCode,
    RequestError,
    channel_pattern,
    error_reply,
    event_frame,
    history_result,
    ok_reply,
    parse_request,
    publication_frame,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.publications: list[tuple[str, int, bytes]] = []
        self.events: list[tuple[str, str, str, bytes]] = []
        self.commands: list[tuple[str, str]] = []

    def on_publication(self, channel: str, epoch: str, publication: Publication) -> None:
        self.publications.append((channel, publication.offset, publication.data))

    def on_event(self, channel: str, kind: str, client: str, info: bytes) -> None:
        self.events.append((channel, kind, client, info))

    def on_command(self, command: str, argument: str) -> None:
        self.commands.append((command, argument))

    def on_reconnect(self) -> None:
        raise AssertionError("the memory broker never disconnects")


@pytest.mark.parametrize(
    ("frame", "code", "request_id"),
    [
        (b"binary", ErrorCode.BAD_REQUEST, None),
        ("{", ErrorCode.BAD_REQUEST, None),
        ("[1]", ErrorCode.BAD_REQUEST, None),
        ('{"op": "ping"}', ErrorCode.BAD_REQUEST, None),
        ('{"id": true, "op": "ping"}', ErrorCode.BAD_REQUEST, None),
        ('{"id": 1.5, "op": "ping"}', ErrorCode.BAD_REQUEST, None),
        ('{"id": "", "op": "ping"}', ErrorCode.BAD_REQUEST, None),
        ('{"id": "' + "x" * 65 + '", "op": "ping"}', ErrorCode.BAD_REQUEST, None),
        ('{"id": 7}', ErrorCode.BAD_REQUEST, 7),
        ('{"id": 7, "op": 3}', ErrorCode.BAD_REQUEST, 7),
        ('{"id": "a", "op": "nope"}', ErrorCode.UNKNOWN_OP, "a"),
    ],
)
def test_unreadable_requests(frame: str | bytes, code: ErrorCode, request_id: object) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(frame)
    assert caught.value.code is code
    assert caught.value.request_id == request_id


def test_field_readers() -> None:
    request = parse_request('{"id": 1, "op": "history", "limit": true, "since": 3}')
    assert request.integer("since", low=0) == 3
    assert request.integer("before", low=0) is None
    with pytest.raises(RequestError, match="'limit' must be an integer"):
        request.integer("limit", low=1, high=10)
    with pytest.raises(RequestError, match=r"'since' must be an integer 4\.\.9"):
        request.integer("since", low=4, high=9)


@given(st.text(max_size=200))
def test_channel_names(name: str) -> None:
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.:@=")
    expected = 1 <= len(name) <= 128 and set(name) <= allowed
    assert (channel_pattern(128).fullmatch(name) is not None) == expected


@given(
    st.text(alphabet="abc:", min_size=1, max_size=10),
    st.integers(min_value=1, max_value=2**53),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=10,
    ),
)
def test_frames_are_the_json_they_claim(channel: str, offset: int, data: object) -> None:
    info = orjson.dumps({"client": "c1", "user": None})
    frame = publication_frame(channel, offset, orjson.dumps(data), info)
    assert CODEC.publication(channel, Publication(offset, orjson.dumps(data), info)) == frame
    assert orjson.loads(frame) == {
        "type": "publication",
        "channel": channel,
        "offset": offset,
        "data": data,
        "info": {"client": "c1", "user": None},
    }
    assert orjson.loads(ok_reply(offset, history_result("e", 3, 2, [frame, frame]))) == {
        "id": offset,
        "ok": True,
        "result": {
            "epoch": "e",
            "offset": 3,
            "start": 2,
            "publications": [orjson.loads(frame)] * 2,
        },
    }
    assert orjson.loads(event_frame("join", channel, info))["channel"] == channel
    assert orjson.loads(error_reply(None, ErrorCode.INTERNAL, "x"))["error"]["code"] == "internal"


def _broker(size: int = 5, ttl: float = 60.0, channels: int = 100) -> tuple[MemoryBroker, Clock]:
    clock = Clock()
    broker = MemoryBroker(
        history_size=size, history_ttl=ttl, history_channels=channels, clock=clock
    )
    return broker, clock


def test_history_size_and_paging() -> None:
    async def scenario() -> None:
        broker, _ = _broker(size=5)
        sink = Recorder()
        await broker.start(sink)
        try:
            for i in range(8):
                position = await broker.publish("c", orjson.dumps(i), b"null")
                assert position.offset == i + 1
            assert [offset for _, offset, _ in sink.publications] == list(range(1, 9))
            page = await broker.history("c", limit=100)
            assert (page.offset, page.start) == (8, 4)
            assert [p.offset for p in page.publications] == [4, 5, 6, 7, 8]
            page = await broker.history("c", since=5, limit=100)
            assert [p.offset for p in page.publications] == [6, 7, 8]
            page = await broker.history("c", since=0, limit=2)
            assert [p.offset for p in page.publications] == [4, 5]
            page = await broker.history("c", before=7, limit=2)
            assert [p.offset for p in page.publications] == [5, 6]
            page = await broker.history("c", before=4, limit=2)
            assert page.publications == []
            page = await broker.history("c", since=8, limit=2)
            assert page.publications == []
        finally:
            await broker.close()

    asyncio.run(scenario())


def test_ttl_and_idle_streams() -> None:
    async def scenario() -> None:
        broker, clock = _broker(size=5, ttl=10)
        first = await broker.publish("c", b"1", b"null")
        clock.now += 6
        await broker.publish("c", b"2", b"null")
        clock.now += 6
        page = await broker.history("c", limit=10)
        assert [p.offset for p in page.publications] == [2]
        clock.now += 20
        broker.sweep()
        # Idle past the TTL with nothing left and nobody subscribed: a new epoch begins.
        position = await broker.position("c")
        assert position.epoch != first.epoch
        assert position.offset == 0

    asyncio.run(scenario())


def test_channel_bound_spares_channels_in_use() -> None:
    async def scenario() -> None:
        broker, _ = _broker(channels=3)
        await broker.presence_add("kept", "c1", {"client": "c1"})
        kept = await broker.publish("kept", b"1", b"null")
        for name in ("a", "b", "c", "d"):
            await broker.publish(name, b"1", b"null")
        assert (await broker.position("kept")) == kept  # still there: it has a subscriber
        assert (await broker.position("a")).offset == 0  # evicted: started again
        assert await broker.channels() == {"kept": 1}
        await broker.presence_remove("kept", "c1")
        assert await broker.channels() == {}

    asyncio.run(scenario())


def test_history_bytes_per_channel_and_in_all() -> None:
    """history_bytes bounds one channel; history_total_bytes all of them, the least recently
    published channel losing its oldest publications first."""
    broker = MemoryBroker(
        history_size=100,
        history_ttl=60,
        history_channels=100,
        history_bytes=1000,
        history_total_bytes=2000,
        clock=Clock(),
    )
    payload = orjson.dumps("x" * 200)

    async def run() -> None:
        for _ in range(10):
            await broker.publish("a:1", payload, b"{}")
        page = await broker.history("a:1", since=0, limit=100)
        sizes = [len(p.data) + len(p.info) for p in page.publications]
        assert sum(sizes) <= 1000 < sum(sizes) + sizes[0]
        assert page.start == page.publications[0].offset == 11 - len(sizes)
        for channel in ("a:2", "a:3"):
            for _ in range(10):
                await broker.publish(channel, payload, b"{}")
        assert broker.stored_bytes <= 2000
        oldest = await broker.history("a:1", since=0, limit=100)
        newest = await broker.history("a:3", since=0, limit=100)
        assert len(oldest.publications) < len(sizes)  # a:1 gave way first
        assert len(newest.publications) == len(sizes)
        assert oldest.offset == 10  # its stream goes on; only publications were dropped

    asyncio.run(run())


def test_history_less_publications_carry_no_offset_and_are_not_stored() -> None:
    """A chat room's publications: delivered with offset 0, no stream, no history."""

    async def run() -> None:
        broker, _ = _broker()
        sink = Recorder()
        await broker.start(sink)
        try:
            position = await broker.publish("chat/r", b"hi", b"", history=False)
            assert (position.epoch, position.offset) == ("", 0)
            assert sink.publications == [("chat/r", 0, b"hi")]
            assert broker.stored_bytes == 0
            assert (await broker.history("chat/r", limit=10)).publications == []
            await broker.emit("c", "join", "c1", b"{}")
            assert sink.events == [("c", "join", "c1", b"{}")]
            assert await broker.command("D", "u") == 1
            assert sink.commands == [("D", "u")]
        finally:
            await broker.close()

    asyncio.run(run())
