"""One contract for every broker (``memory://`` and ``redis://``), in-process.

Each test runs against both backends through the :class:`~roomcast.brokers.Broker` protocol,
with a recording :class:`~roomcast.brokers.Sink` standing in for the node. A broker carries
:class:`~roomcast.brokers.Publication` objects (offset, data, info) whose bytes it never parses:
every check compares them whole. Where the backends differ by design it is said so:
``memory://`` is one process, so it hands its sink every publication of the process (the node
filters by its own subscriptions), whereas a shared broker delivers only the channels a node
subscribed to. Tests of what only a shared broker has (two nodes, losing and regaining Redis)
run on ``redis://`` alone. A chat room is a channel published without history
(``history=False``): offset 0, no epoch, nothing stored.

Every test uses channel names of its own and, on Redis, a key prefix of its own.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from helpers import TIMEOUT, async_wait_until
from redis_server import (
    RedisServer,
    fresh_redis_fixture,  # noqa: F401 (a fixture)
    redis_server_fixture,  # noqa: F401 (a fixture)
    unique_prefix,
)
from roomcast.brokers import Broker, BrokerUnavailable, MemoryBroker, Position, Publication
from roomcast.brokers.redis import RedisBroker
from roomcast.brokers.redis_scripts import PRESENCE_BATCH
from roomcast.codecs.roomcast_json import encode_info

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]
REDIS_ONLY = [pytest.param("redis", marks=pytest.mark.redis)]

INFO = encode_info("c0ffee000001", "alice")


def channel(tag: str = "b") -> str:
    return f"{tag}:{uuid.uuid4().hex[:12]}"


def data(ch: str, i: int) -> bytes:
    """Publication ``i`` of ``ch``: it names its channel, so none passes for another's."""
    return orjson.dumps({"channel": ch, "n": i, "text": f"publication {i}"})


def entry(client: str, user: str | None = None) -> dict[str, Any]:
    return {"client": client, "user": user, "connected_at": "2026-01-01T00:00:00.000Z"}


class Recorder:
    """A Sink that remembers everything it is given: publications, events, node commands."""

    def __init__(self) -> None:
        self.publications: list[tuple[str, str, Publication]] = []
        self.events: list[tuple[str, str, str, bytes]] = []
        #: The epochs each channel's publications came in, in the order they changed.
        self.epochs: dict[str, list[str]] = {}
        self.reconnects = 0
        self.commands: list[tuple[str, str]] = []

    def on_publication(self, channel: str, epoch: str, publication: Publication) -> None:
        self.publications.append((channel, epoch, publication))
        seen = self.epochs.setdefault(channel, [])
        if not seen or seen[-1] != epoch:
            seen.append(epoch)

    def on_event(self, channel: str, kind: str, client: str, info: bytes) -> None:
        self.events.append((channel, kind, client, info))

    def on_command(self, command: str, argument: str) -> None:
        self.commands.append((command, argument))

    def on_reconnect(self) -> None:
        self.reconnects += 1

    def of(self, ch: str) -> list[Publication]:
        """The publications of ``ch`` delivered so far, in order."""
        return [publication for name, _, publication in self.publications if name == ch]


@dataclass
class Node:
    """A broker as one node sees it, with what it delivered."""

    broker: Broker
    sink: Recorder = field(default_factory=Recorder)

    @property
    def shared(self) -> bool:
        return self.broker.shared


MakeNode = Callable[..., Awaitable[Node]]


async def start_node(broker: Broker) -> Node:
    node = Node(broker)
    await broker.start(node.sink)
    # A networked broker connects in the background; it is ready once it says it is available.
    await async_wait_until(lambda: broker.available, 2 * TIMEOUT, "the broker to connect")
    return node


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> tuple[str, RedisServer | None]:
    if request.param == "redis":
        return "redis", request.getfixturevalue("redis_server")
    return "memory", None


@pytest.fixture
async def make(backend: tuple[str, RedisServer | None]) -> AsyncIterator[MakeNode]:
    """``await make(history_size=..., history_ttl=..., presence_ttl=...)``: a started node.

    On Redis, the nodes of one test share one key prefix (they form one cluster).
    """
    kind, server = backend
    prefix = unique_prefix("contract")
    nodes: list[Node] = []

    async def make_node(
        *, history_size: int = 100, history_ttl: float = 3600, presence_ttl: float = 30
    ) -> Node:
        broker: Broker
        if kind == "memory":
            broker = MemoryBroker(
                history_size=history_size, history_ttl=history_ttl, history_channels=1000
            )
        else:
            assert server is not None
            broker = RedisBroker(
                server.url_for(prefix),
                history_size=history_size,
                history_ttl=history_ttl,
                presence_ttl=presence_ttl,
            )
        node = await start_node(broker)
        nodes.append(node)
        return node

    yield make_node
    for node in nodes:
        await node.broker.close()


@pytest.fixture
async def node(make: MakeNode) -> Node:
    return await make()


async def publish(node: Node, ch: str, n: int, first: int = 0) -> list[Position]:
    return [await node.broker.publish(ch, data(ch, first + i), INFO) for i in range(n)]


def publications(ch: str, offsets: range, first_data: int = 0) -> list[Publication]:
    """The publications ``data(ch, first_data + k)`` by ``INFO`` at ``offsets``."""
    return [Publication(offset, data(ch, first_data + k), INFO) for k, offset in enumerate(offsets)]


# -- offsets and positions -----------------------------------------------------------------------


async def test_offsets_grow_by_one_from_one(node: Node) -> None:
    ch, other = channel(), channel()
    positions = await publish(node, ch, 5)
    assert [p.offset for p in positions] == [1, 2, 3, 4, 5]
    epoch = positions[0].epoch
    assert epoch
    assert all(p.epoch == epoch for p in positions)
    assert await node.broker.position(ch) == Position(epoch, 5)
    # Every channel has a sequence of its own.
    assert [p.offset for p in await publish(node, other, 2)] == [1, 2]
    assert (await node.broker.publish(ch, data(ch, 5), INFO)).offset == 6


async def test_a_new_channel_is_at_offset_zero_in_a_lasting_epoch(node: Node) -> None:
    ch = channel()
    first = await node.broker.position(ch)
    assert first.offset == 0
    assert first.epoch
    assert await node.broker.position(ch) == first
    page = await node.broker.history(ch, limit=10)
    assert (page.epoch, page.offset, page.start, page.publications) == (first.epoch, 0, 1, [])
    # The first publication continues the stream the position named.
    assert await node.broker.publish(ch, data(ch, 0), INFO) == Position(first.epoch, 1)
    assert await node.broker.position(ch) == Position(first.epoch, 1)
    # Epochs name streams: another channel gets another one.
    assert (await node.broker.position(channel())).epoch != first.epoch


# -- history -------------------------------------------------------------------------------------


async def test_history_paging(node: Node) -> None:
    ch = channel()
    epoch = (await publish(node, ch, 25))[0].epoch
    everything = publications(ch, range(1, 26))
    history = node.broker.history

    full = await history(ch, limit=1000)
    assert (full.epoch, full.offset, full.start) == (epoch, 25, 1)
    assert full.publications == everything  # byte for byte, oldest first

    assert (await history(ch, since=10, limit=3)).publications == everything[10:13]
    assert (await history(ch, since=0, limit=4)).publications == everything[:4]
    assert (await history(ch, since=22, limit=10)).publications == everything[22:]
    assert (await history(ch, before=10, limit=3)).publications == everything[6:9]
    assert (await history(ch, before=3, limit=10)).publications == everything[:2]
    assert (await history(ch, limit=5)).publications == everything[-5:]  # the latest
    assert (await history(ch, before=1000, limit=100)).publications == everything
    for empty in (
        await history(ch, since=25, limit=10),
        await history(ch, since=1000, limit=10),
        await history(ch, before=1, limit=10),
        await history(ch, before=0, limit=10),
    ):
        assert (empty.epoch, empty.offset, empty.start, empty.publications) == (epoch, 25, 1, [])

    # Walking forwards with `since` and backwards with `before` meets every offset once.
    forwards: list[int] = []
    since = 0
    for _ in range(10):
        page = (await history(ch, since=since, limit=7)).publications
        if not page:
            break
        forwards += [p.offset for p in page]
        since = page[-1].offset
    assert forwards == list(range(1, 26))
    backwards: list[int] = []
    before = None
    for _ in range(10):
        page = (await history(ch, before=before, limit=7)).publications
        if not page:
            break
        backwards = [p.offset for p in page] + backwards
        before = page[0].offset
    assert backwards == list(range(1, 26))


async def test_history_keeps_the_latest_history_size(make: MakeNode) -> None:
    node = await make(history_size=10)
    ch = channel()
    epoch = (await publish(node, ch, 25))[0].epoch
    page = await node.broker.history(ch, limit=1000)
    assert (page.epoch, page.offset, page.start) == (epoch, 25, 16)
    assert page.publications == publications(ch, range(16, 26), first_data=15)
    # `since` older than the start begins at the start.
    since = await node.broker.history(ch, since=3, limit=2)
    assert since.publications == publications(ch, range(16, 18), first_data=15)
    assert (await node.broker.history(ch, before=16, limit=10)).publications == []
    assert (await node.broker.history(ch, before=20, limit=10)).publications == publications(
        ch, range(16, 20), first_data=15
    )


async def test_no_history_at_all(make: MakeNode) -> None:
    node = await make(history_size=0)
    ch = channel()
    assert [p.offset for p in await publish(node, ch, 3)] == [1, 2, 3]
    page = await node.broker.history(ch, limit=100)
    assert (page.offset, page.start, page.publications) == (3, 4, [])


async def test_history_expires_after_the_ttl(make: MakeNode) -> None:
    node = await make(history_ttl=1)
    ch = channel()
    published_at = time.monotonic()
    epoch = (await publish(node, ch, 3))[0].epoch
    before = await node.broker.history(ch, limit=100)
    assert before.publications == publications(ch, range(1, 4))

    async def expired() -> Any:
        page = await node.broker.history(ch, limit=100)
        return page if not page.publications else None

    after = await async_wait_until(expired, 1 + 2 * TIMEOUT, "the history to expire")
    assert time.monotonic() - published_at >= 0.9, "expired before the TTL"
    assert after.start == after.offset + 1
    # The same stream without its publications, or a new stream: both are documented.
    assert after.offset == (3 if after.epoch == epoch else 0)
    position = await node.broker.publish(ch, data(ch, 9), INFO)
    assert position == Position(after.epoch, after.offset + 1)


# -- presence and channels -----------------------------------------------------------------------


async def test_presence_in_subscription_order(node: Node) -> None:
    ch = channel()
    broker = node.broker
    assert await broker.presence(ch) == []
    a, b, c = entry("aaaaaaaaaaaa", "alice"), entry("bbbbbbbbbbbb"), entry("cccccccccccc", "carol")
    for e in (a, b, c):
        await broker.presence_add(ch, e["client"], e)
    assert await broker.presence(ch) == [a, b, c]
    await broker.presence_remove(ch, b["client"])
    assert await broker.presence(ch) == [a, c]
    await broker.presence_add(ch, b["client"], b)  # subscribed again: now the latest
    assert await broker.presence(ch) == [a, c, b]
    await broker.presence_remove(ch, "never-there1")  # forgetting a stranger is harmless
    for e in (a, b, c):
        await broker.presence_remove(ch, e["client"])
    assert await broker.presence(ch) == []
    assert await broker.presence(channel()) == []


async def test_channels_counts_subscribers(node: Node) -> None:
    broker = node.broker
    assert await broker.channels() == {}
    first, second = channel(), channel()
    await broker.presence_add(first, "aaaaaaaaaaa1", entry("aaaaaaaaaaa1"))
    await broker.presence_add(first, "aaaaaaaaaaa2", entry("aaaaaaaaaaa2"))
    await broker.presence_add(second, "bbbbbbbbbbb1", entry("bbbbbbbbbbb1"))
    assert await broker.channels() == {first: 2, second: 1}
    await broker.presence_remove(second, "bbbbbbbbbbb1")
    assert await broker.channels() == {first: 2}
    await broker.presence_remove(first, "aaaaaaaaaaa1")
    assert await broker.channels() == {first: 1}
    # Publishing makes no subscriber.
    await publish(node, channel(), 1)
    assert await broker.channels() == {first: 1}


def store_presence(
    server: RedisServer, broker: Broker, ch: str, entries: list[dict[str, Any]], expires_in: float
) -> None:
    """Write presence entries straight into Redis, laid out as nodes write them.

    They expire in ``expires_in`` seconds; a negative value makes them a dead node's.
    """
    assert isinstance(broker, RedisBroker)
    now = time.time()
    expiry = int((now + expires_in) * 1000)
    with server.client() as conn:
        pipe = conn.pipeline(transaction=False)
        for start in range(0, len(entries), PRESENCE_BATCH):
            part = entries[start : start + PRESENCE_BATCH]
            encoded = {
                e["client"]: orjson.dumps({**e, "at": now + (start + k) / 1e6})
                for k, e in enumerate(part)
            }
            pipe.hset(f"{broker.prefix}:p:{{{ch}}}", mapping=encoded)  # type: ignore[arg-type]
            pipe.zadd(f"{broker.prefix}:z:{{{ch}}}", dict.fromkeys(encoded, expiry))
        pipe.zadd(f"{broker.prefix}:channels", {ch: expiry}, gt=True)
        pipe.execute()


async def test_presence_of_twenty_thousand_clients(
    node: Node, backend: tuple[str, RedisServer | None]
) -> None:
    # Far more than Lua can unpack() at once (about 8000): presence has no limit of its own.
    ch = channel()
    entries = [entry(f"{i:012x}") for i in range(20_000)]
    server = backend[1]
    if server is not None:
        store_presence(server, node.broker, ch, entries, expires_in=60)
    else:
        for e in entries:
            await node.broker.presence_add(ch, e["client"], e)
    assert await node.broker.presence(ch) == entries
    assert await node.broker.channels() == {ch: 20_000}
    await node.broker.presence_remove(ch, entries[0]["client"])
    assert await node.broker.presence(ch) == entries[1:]


@pytest.mark.parametrize("backend", REDIS_ONLY, indirect=True)
async def test_a_dead_nodes_presence_expires_whatever_its_size(
    node: Node, backend: tuple[str, RedisServer]
) -> None:
    broker = node.broker
    assert isinstance(broker, RedisBroker)
    server = backend[1]
    ch, deserted = channel(), channel()
    dead = [entry(f"dead{i:08x}") for i in range(12_000)]
    live = [entry(f"live{i:08x}") for i in range(8_000)]
    store_presence(server, broker, ch, dead, expires_in=-1)
    store_presence(server, broker, ch, live, expires_in=60)
    store_presence(server, broker, deserted, dead, expires_in=-1)

    assert await broker.presence(ch) == live
    assert await broker.presence(deserted) == []
    assert await broker.channels() == {ch: 8_000}
    with server.client() as conn:
        # The dead node's entries are gone from Redis, not just left out.
        p, z = f"{broker.prefix}:p:{{{ch}}}", f"{broker.prefix}:z:{{{ch}}}"
        assert (conn.hlen(p), conn.zcard(z)) == (8_000, 8_000)
        p, z = f"{broker.prefix}:p:{{{deserted}}}", f"{broker.prefix}:z:{{{deserted}}}"
        assert conn.exists(p, z) == 0


def presence_command_sizes(log: list[Any], prefix: str) -> dict[str, list[int]]:
    """How many presence entries each HSET / ZADD / HDEL / ZREM of the ``SLOWLOG`` carried."""
    sizes: dict[str, list[int]] = {}
    for item in log:
        args: list[bytes] = item[3]
        name = args[0].decode().upper()
        if name not in ("HSET", "ZADD", "HDEL", "ZREM") or not args[1].startswith(
            f"{prefix}:".encode()
        ):
            continue
        count = len(args)
        # The slow log keeps 32 arguments; the last one then says how many it left out.
        more = re.fullmatch(rb"\.\.\. \((\d+) more arguments\)", args[-1])
        if more is not None:
            count = len(args) - 1 + int(more.group(1))
        pairs = name in ("HSET", "ZADD")
        sizes.setdefault(name, []).append((count - 2) // 2 if pairs else count - 2)
    return sizes


@pytest.mark.redis
async def test_a_nodes_presence_is_written_in_bounded_commands(fresh_redis: RedisServer) -> None:
    # One command with every entry of a big channel would hold Redis for its whole length.
    prefix = unique_prefix("batch")
    broker = RedisBroker(
        fresh_redis.url_for(prefix), history_size=100, history_ttl=3600, presence_ttl=30
    )
    await start_node(broker)
    closed = False
    try:
        ch = channel()
        await broker.subscribe(ch)
        clients = [f"{i:012x}" for i in range(2_500)]
        for start in range(0, len(clients), 250):
            await asyncio.gather(
                *(broker.presence_add(ch, c, entry(c)) for c in clients[start : start + 250])
            )
        with fresh_redis.client() as conn:
            conn.config_set("slowlog-log-slower-than", 0)
            conn.config_set("slowlog-max-len", 10_000)
            conn.slowlog_reset()
        await broker._refresh_presence()  # what the heartbeat runs, and a reconnection
        assert [e["client"] for e in await broker.presence(ch)] == clients
        await broker.close()
        closed = True
        with fresh_redis.client() as conn:
            # Leaving, the node took its entries away.
            assert conn.exists(f"{prefix}:p:{{{ch}}}", f"{prefix}:z:{{{ch}}}") == 0
            log = conn.execute_command("SLOWLOG", "GET", -1)
    finally:
        if not closed:
            await broker.close()
    sizes = presence_command_sizes(log, prefix)
    for name in ("HSET", "HDEL", "ZREM"):
        assert sum(sizes.get(name, [])) == len(clients), (name, sizes.get(name))
    assert max(max(s) for s in sizes.values()) <= PRESENCE_BATCH, sizes


# -- delivery to the node ------------------------------------------------------------------------


async def test_publications_and_events_of_subscribed_channels(node: Node) -> None:
    ch, elsewhere = channel(), channel()
    sink = node.sink
    await node.broker.subscribe(ch)
    # Published before, on a channel this node does not subscribe to.
    await publish(node, elsewhere, 1)
    await node.broker.emit(elsewhere, "join", "c0ffee000001", INFO)
    await publish(node, ch, 3)
    await node.broker.emit(ch, "join", "c0ffee000001", INFO)
    join = (ch, "join", "c0ffee000001", INFO)

    await async_wait_until(lambda: len(sink.of(ch)) == 3, what="3 publications")
    assert sink.of(ch) == publications(ch, range(1, 4))
    await async_wait_until(lambda: join in sink.events, what="the event")
    assert len(sink.epochs[ch]) == 1  # one stream throughout
    if node.shared:
        # Redis delivers a node's subscriptions in order: had `elsewhere` come, it would have
        # come first. (memory:// hands the node every publication of the process by design.)
        assert sink.of(elsewhere) == []
        assert [e for e in sink.events if e[0] == elsewhere] == []

        await node.broker.unsubscribe(ch)
        marker = channel()
        await node.broker.subscribe(marker)
        await publish(node, ch, 1, first=3)
        await publish(node, marker, 1)
        await async_wait_until(lambda: sink.of(marker), what="the marker publication")
        assert len(sink.of(ch)) == 3, "delivered after unsubscribe"


#: Bytes a broker must carry as they are, though they look like its own message layout.
ODD_DATA = b'{"text":"P e 1 2 E join x"}  \n'
ODD_INFO = encode_info("c0ffee000002", "P 7 3 E leave")


async def test_data_and_info_are_carried_byte_for_byte(node: Node) -> None:
    ch = channel()
    sink = node.sink
    await node.broker.subscribe(ch)
    odd = [(ODD_DATA, ODD_INFO), (b"", b""), (b"1", b""), (b"", b"2"), (b" ", b" ")]
    positions = [await node.broker.publish(ch, d, i) for d, i in odd]
    await node.broker.emit(ch, "leave", "c0ffee000002", ODD_INFO)
    expected = [Publication(p.offset, d, i) for p, (d, i) in zip(positions, odd, strict=True)]
    await async_wait_until(lambda: len(sink.of(ch)) == len(odd), what="the publications")
    assert sink.of(ch) == expected
    await async_wait_until(lambda: sink.events, what="the event")
    assert sink.events == [(ch, "leave", "c0ffee000002", ODD_INFO)]
    assert (await node.broker.history(ch, limit=10)).publications == expected


async def test_chat_rooms_are_channels_without_history(
    node: Node, backend: tuple[str, RedisServer | None]
) -> None:
    room = channel("chat")
    sink = node.sink
    await node.broker.subscribe(room)
    said = [b"Client says: hello", b"A client left the chat"]
    for text in said:
        assert await node.broker.publish(room, text, b"", history=False) == Position("", 0)
    await async_wait_until(lambda: len(sink.of(room)) == 2, what="the room messages")
    # Delivered in order, as sent, with offset 0 and no epoch.
    assert sink.of(room) == [Publication(0, text, b"") for text in said]
    assert sink.epochs[room] == [""]
    server = backend[1]
    if server is not None:
        assert isinstance(node.broker, RedisBroker)
        with server.client() as conn:
            prefix = node.broker.prefix
            assert conn.exists(f"{prefix}:m:{{{room}}}", f"{prefix}:h:{{{room}}}") == 0, "stored"
    # Nothing stored, no offset taken.
    page = await node.broker.history(room, limit=10)
    assert (page.offset, page.start, page.publications) == (0, 1, [])
    if node.shared:
        await node.broker.unsubscribe(room)
        marker = channel("chat")
        await node.broker.subscribe(marker)
        await node.broker.publish(room, b"Client says: nobody hears this", b"", history=False)
        await node.broker.publish(marker, b"Client says: marker", b"", history=False)
        await async_wait_until(lambda: sink.of(marker), what="the marker")
        assert sink.of(marker) == [Publication(0, b"Client says: marker", b"")]
        assert len(sink.of(room)) == 2, "delivered after unsubscribe"


async def test_node_commands(node: Node) -> None:
    assert await node.broker.command("D", "alice") == 1  # one node: this one
    assert await node.broker.command("X", "two words") == 1
    await async_wait_until(lambda: len(node.sink.commands) == 2, what="the commands")
    assert node.sink.commands == [("D", "alice"), ("X", "two words")]


# -- only a shared broker ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", REDIS_ONLY, indirect=True)
async def test_nodes_share_channels_chat_rooms_and_commands(make: MakeNode) -> None:
    one, two = await make(), await make()
    ch = channel()
    await two.broker.subscribe(ch)
    positions = [
        await one.broker.publish(ch, data(ch, 0), INFO),
        await two.broker.publish(ch, data(ch, 1), INFO),
        await one.broker.publish(ch, data(ch, 2), INFO),
    ]
    assert [p.offset for p in positions] == [1, 2, 3]  # one sequence for the cluster
    assert len({p.epoch for p in positions}) == 1
    await async_wait_until(lambda: len(two.sink.of(ch)) == 3, what="delivery to node two")
    assert two.sink.of(ch) == publications(ch, range(1, 4))
    assert one.sink.of(ch) == []  # node one did not subscribe

    await one.broker.presence_add(ch, "aaaaaaaaaaaa", entry("aaaaaaaaaaaa"))
    await two.broker.presence_add(ch, "bbbbbbbbbbbb", entry("bbbbbbbbbbbb"))
    for node in (one, two):
        assert await node.broker.presence(ch) == [entry("aaaaaaaaaaaa"), entry("bbbbbbbbbbbb")]
        assert await node.broker.channels() == {ch: 2}
    await one.broker.emit(ch, "leave", "aaaaaaaaaaaa", INFO)
    await async_wait_until(lambda: two.sink.events, what="the event on node two")
    assert two.sink.events == [(ch, "leave", "aaaaaaaaaaaa", INFO)]

    # A chat room: a channel published without history, delivered to the nodes subscribed.
    room = channel("chat")
    await two.broker.subscribe(room)
    sent = await one.broker.publish(room, b"Client says: across", b"", history=False)
    assert sent == Position("", 0)
    await async_wait_until(lambda: two.sink.of(room), what="the room message on node two")
    assert two.sink.of(room) == [Publication(0, b"Client says: across", b"")]
    assert two.sink.epochs[room] == [""]
    assert one.sink.of(room) == []

    assert await one.broker.command("D", "bob") == 2  # both nodes got it
    for node in (one, two):
        await async_wait_until(lambda n=node: n.sink.commands, what="the command")
        assert node.sink.commands == [("D", "bob")]


@pytest.mark.parametrize("backend", REDIS_ONLY, indirect=True)
async def test_a_lost_stream_is_reported_as_a_reset(
    make: MakeNode, backend: tuple[str, RedisServer]
) -> None:
    node = await make()
    broker = node.broker
    assert isinstance(broker, RedisBroker)
    ch = channel()
    await broker.subscribe(ch)
    old = (await publish(node, ch, 2))[0].epoch
    await async_wait_until(lambda: len(node.sink.of(ch)) == 2, what="2 publications")
    # Redis loses the channel (evicted, flushed): its next publication starts a new stream.
    with backend[1].client() as conn:
        assert conn.delete(f"{broker.prefix}:m:{{{ch}}}", f"{broker.prefix}:h:{{{ch}}}") == 2
    new = await broker.publish(ch, data(ch, 2), INFO)
    assert new.offset == 1
    assert new.epoch != old
    await async_wait_until(lambda: len(node.sink.epochs[ch]) == 2, what="the new epoch")
    assert node.sink.epochs[ch] == [old, new.epoch]


@pytest.mark.redis
async def test_a_stream_of_another_layout_begins_again(redis_server: RedisServer) -> None:
    """Entries written in the layout of an earlier build (a finished frame, ``{t, f}``) are not
    misread after an upgrade: the channel begins again under a new epoch, so its subscribers
    recover (``recovered: false``) instead of getting garbage or a script error."""
    broker = RedisBroker(
        redis_server.url_for(unique_prefix("layout")),
        history_size=100,
        history_ttl=3600,
        presence_ttl=30,
    )
    await start_node(broker)
    try:
        ch = channel()
        await broker.position(ch)  # the meta now names this Redis process
        with redis_server.client() as conn:
            meta, stream = f"{broker.prefix}:m:{{{ch}}}", f"{broker.prefix}:h:{{{ch}}}"
            conn.delete(meta, stream)
            run = conn.info("server")["run_id"]
            conn.hset(meta, mapping={"epoch": "old", "gen": run, "offset": 2, "bytes": 9})
            conn.xadd(stream, {"t": 0, "f": b'{"frame":1}'}, id="1-1")
            conn.xadd(stream, {"t": 0, "f": b'{"frame":2}'}, id="2-1")
        page = await broker.history(ch, since=0, limit=10)
        assert (page.offset, page.start, page.publications) == (0, 1, [])
        assert page.epoch != "old"
        position = await broker.publish(ch, data(ch, 0), INFO)
        assert (position.epoch, position.offset) == (page.epoch, 1)
        page = await broker.history(ch, since=0, limit=10)
        assert page.publications == [Publication(1, data(ch, 0), INFO)]
    finally:
        await broker.close()


@pytest.mark.redis
async def test_losing_and_regaining_redis(fresh_redis: RedisServer) -> None:
    broker = RedisBroker(fresh_redis.url, history_size=100, history_ttl=3600, presence_ttl=30)
    node = await start_node(broker)
    try:
        ch = channel()
        await broker.subscribe(ch)
        await broker.presence_add(ch, "aaaaaaaaaaaa", entry("aaaaaaaaaaaa"))
        first = await broker.publish(ch, data(ch, 0), INFO)
        await async_wait_until(lambda: node.sink.of(ch), what="the first publication")

        fresh_redis.kill()
        await async_wait_until(lambda: not broker.available, TIMEOUT, "available to turn False")
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await broker.publish(ch, data(ch, 1), INFO)
        with pytest.raises(BrokerUnavailable):
            await broker.history(ch, limit=10)
        with pytest.raises(BrokerUnavailable):  # a chat room's too (the node then delivers locally)
            await broker.publish(ch, b"Client says: lost", b"", history=False)
        assert time.monotonic() - started < 2 * TIMEOUT, "an unreachable Redis must fail fast"
        assert node.sink.reconnects == 0

        await asyncio.to_thread(fresh_redis.restart)
        # The listener retries with a backoff of at most 5 s (plus jitter).
        await async_wait_until(lambda: broker.available, 3 * TIMEOUT, "available again")
        await async_wait_until(lambda: node.sink.reconnects == 1, what="on_reconnect")
        # The presence of this node's clients is written again; the stream is new.
        assert await broker.presence(ch) == [entry("aaaaaaaaaaaa")]
        again = await broker.publish(ch, data(ch, 1), INFO)
        assert again.offset == 1
        assert again.epoch != first.epoch
        # The subscription came back with the connection: the new stream reaches the node
        # under its new epoch.
        await async_wait_until(
            lambda: node.sink.epochs[ch] == [first.epoch, again.epoch], what="the new epoch"
        )
        third = await broker.publish(ch, data(ch, 2), INFO)
        await async_wait_until(
            lambda: (ch, again.epoch, Publication(2, data(ch, 2), INFO)) in node.sink.publications,
            what="delivery after the reconnect",
        )
        assert third == Position(again.epoch, 2)
    finally:
        await broker.close()


@pytest.mark.redis
async def test_no_spurious_failures_once_redis_is_back(fresh_redis: RedisServer) -> None:
    broker = RedisBroker(fresh_redis.url, history_size=100, history_ttl=3600, presence_ttl=30)
    await start_node(broker)
    try:
        ch = channel()
        # A busy node: the pool holds several connections.
        await asyncio.gather(*(broker.publish(ch, data(ch, i), INFO) for i in range(10)))
        fresh_redis.kill()
        await async_wait_until(lambda: not broker.available, TIMEOUT, "available to turn False")
        await asyncio.to_thread(fresh_redis.restart)
        await async_wait_until(lambda: broker.available, 3 * TIMEOUT, "available again")
        # The broker says it is available, and Redis is: requests must succeed.
        await asyncio.gather(*(broker.position(ch) for _ in range(10)))
        assert broker.available
    finally:
        await broker.close()
