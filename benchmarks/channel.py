"""Fan-out over ``/ws`` (docs/protocol.md): N subscribers on one channel, one publisher.

The publisher is a ``/ws`` client of its own (not subscribed) that sends ``publish`` requests
pipelined, at most ``window`` of them unanswered; every subscriber counts the publications it
receives. Sizes match the chat fan-out (``chat.py``): the same number of messages, and each
publication's ``data`` is the chat scenario's 64-byte message as a JSON string, so the two
deliveries/s figures can be compared (a ``/ws`` publication frame is larger than a chat line:
it carries the channel, the offset and the publisher's ``info`` too).

The subscriber's hot path is as short as the chat member's: once the publisher's client id and
the channel's offset are known, the exact frame the server must send for every measured
publication is built in advance, and the received bytes are compared with the frame of the
publication the subscriber is due next, which checks its channel, offset, data and info, and
the order, at once; a time stamp and a count follow. Anything else is parsed as JSON on the
slow path, where an offset not above the last one seen counts as an error.

The subscribers may be spread over several servers (the nodes of one cluster; the publisher is
on the first), and the burst pipelined or paced (``FanoutConfig.interval_s``).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from picows import WSFrame, WSMsgType, WSTransport

from chat import PREFIX, TAG_MEASURED, TAG_WARM, WARMUP_TIMEOUT_S, WARMUP_TRIES, make_payload
from clients import Client, close_all, connect_many
from cpu import CpuProbe, measuring
from fanout import BurstResult, Receipts, Receiver, pace, split
from roomcast.tools.loadgen import wait_until

perf_counter = time.perf_counter
TEXT = WSMsgType.TEXT
WS_PATH = "/ws"
FANOUT_CHANNEL = "bench:fanout"
#: Most publish requests the publisher leaves unanswered (well under ROOMCAST_OUTBOX_SIZE,
#: 1024, which bounds the replies queued for one connection).
DEFAULT_WINDOW = 256
REPLY_TIMEOUT_S = 15.0
#: Length of a client id (hex digits), as the server makes them: it is in every ``info``.
CLIENT_ID_CHARS = 12
#: The offset of the first measured publication on a fresh server: the channel starts at 0 and
#: the warm-up publication that reaches every subscriber first takes offset 1.
FIRST_MEASURED_OFFSET = 2


def encode_str(text: bytes) -> bytes:
    """Return ``text`` (ASCII, nothing to escape) as a JSON string, as orjson writes it."""
    return b'"' + text + b'"'


def publication_bytes(channel: str, offset: int, data: bytes, info: bytes) -> bytes:
    """Return the exact ``publication`` frame the server sends (docs/protocol.md).

    ``data`` and ``info`` are encoded JSON. The layout is the one the server writes; a frame
    laid out otherwise is still recognised, by the (slower) JSON path.
    """
    return b'{"type":"publication","channel":"%s","offset":%d,"data":%s,"info":%s}' % (
        channel.encode(),
        offset,
        data,
        info,
    )


def info_bytes(client_id: str | None) -> bytes:
    """Return the ``info`` of an anonymous client's publications, as the server encodes it."""
    client = b"null" if client_id is None else b'"%s"' % client_id.encode()
    return b'{"client":%s,"user":null}' % client


def mean_frame_bytes(channel: str, messages: int, size: int) -> float:
    """Return the mean length of a fan-out run's measured publication frames, computed up front.

    The same frames the subscribers expect (:meth:`FanoutState.expect`), with a client id of
    the server's length, from :data:`FIRST_MEASURED_OFFSET` on: their length grows with the
    offset's digits.
    """
    info = info_bytes("0" * CLIENT_ID_CHARS)
    total = sum(
        len(
            publication_bytes(
                channel,
                FIRST_MEASURED_OFFSET + i,
                encode_str(make_payload(TAG_MEASURED, i, size)),
                info,
            )
        )
        for i in range(messages)
    )
    return total / messages if messages else 0.0


def matched_chat_size(cfg: FanoutConfig) -> int:
    """Return the chat message size whose line ("Client says: " + message) is as long as the
    run's mean publication frame (rounded): the chat fan-out that moves as many bytes per
    delivery as the ``/ws`` one."""
    return round(mean_frame_bytes(cfg.channel, cfg.messages, cfg.size)) - len(PREFIX)


def publish_request(request_id: int, channel: str, data: bytes) -> bytes:
    """Return a ``publish`` request with already-encoded ``data``."""
    return b'{"id":%d,"op":"publish","channel":"%s","data":%s}' % (
        request_id,
        channel.encode(),
        data,
    )


def subscribe_request(
    request_id: int, channel: str, recover: tuple[int, str] | None = None
) -> bytes:
    """Return a ``subscribe`` request, with ``recover`` = (offset, epoch) if given."""
    body: dict[str, Any] = {"id": request_id, "op": "subscribe", "channel": channel}
    if recover is not None:
        body["recover"] = {"offset": recover[0], "epoch": recover[1]}
    return json.dumps(body, separators=(",", ":")).encode()


class Publisher(Client):
    """A ``/ws`` client that publishes pre-built requests with a bounded window, or paced.

    ``start`` sends up to ``window`` requests; each reply sends the next one. Paced, the
    replies send nothing: :meth:`send_next` sends the next request when it is due, whatever is
    unanswered (as a chat member sends its messages). Replies are parsed as JSON (one per
    publication, not per delivery). The ``connected`` push gives the client id, which every
    publication's ``info`` carries.
    """

    def __init__(self) -> None:
        """Start with nothing sent."""
        super().__init__()
        self.client_id: str | None = None
        self.requests: Sequence[bytes] = ()
        self.send_times: list[float] = []
        self.offsets: list[int | None] = []
        self.window = 1
        self.paced = False
        self.next = 0
        self.replies = 0
        self.errors = 0
        self.first_error = ""
        self.other_replies: dict[int | str, dict[str, Any]] = {}
        self.next_id = 1_000_000  # ids of one-off requests (presence, warm-up)

    def start(self, requests: Sequence[bytes], window: int, *, paced: bool = False) -> None:
        """Send ``requests`` (ids 0..n-1), keeping at most ``window`` unanswered; ``paced``:
        send none yet, :meth:`send_next` will."""
        self.requests = requests
        self.send_times = [0.0] * len(requests)
        self.offsets = [None] * len(requests)
        self.window = max(1, window)
        self.paced = paced
        self.next = 0
        self.replies = 0
        if not paced:
            self._send_more()

    def send_next(self, _: int = 0) -> None:
        """Send the next request now (paced publishing)."""
        i = self.next
        self.send_times[i] = perf_counter()
        self.transport.send(TEXT, self.requests[i])
        self.next = i + 1

    def _send_more(self) -> None:
        send, requests, times = self.transport.send, self.requests, self.send_times
        end = min(len(requests), self.replies + self.window)
        while self.next < end:
            i = self.next
            times[i] = perf_counter()
            send(TEXT, requests[i])
            self.next = i + 1

    async def request(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send one request of another kind and return its reply (bounded wait)."""
        rid = self.next_id
        self.next_id += 1
        self.transport.send(TEXT, json.dumps({"id": rid, **body}).encode())
        outcome = await wait_until(lambda: rid in self.other_replies, REPLY_TIMEOUT_S)
        if outcome != "done":
            raise RuntimeError(f"no reply to {body.get('op')} in {REPLY_TIMEOUT_S:g} s")
        return self.other_replies.pop(rid)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Count a publish reply and send the next request; keep other replies."""
        if frame.msg_type is not TEXT:
            self.handle_control(transport, frame)
            return
        msg = json.loads(frame.get_payload_as_bytes())
        rid = msg.get("id")
        if msg.get("type") == "connected":
            self.client_id = msg["client"]
            return
        if type(rid) is int and rid < len(self.requests):
            if msg.get("ok"):
                self.offsets[rid] = msg["result"]["offset"]
            else:
                self.errors += 1
                self.first_error = self.first_error or str(msg.get("error"))
            self.replies += 1
            if not self.paced:
                self._send_more()
        elif rid is not None:
            self.other_replies[rid] = msg


async def connect_publisher(url: str) -> Publisher:
    """Connect the publisher and wait for its ``connected`` push (its client id)."""
    (publisher,) = await connect_many(url, Publisher, 1)
    if await wait_until(lambda: publisher.client_id is not None, REPLY_TIMEOUT_S) != "done":
        await close_all([publisher])
        raise RuntimeError(f"no 'connected' push from {url}")
    return publisher


class FanoutCounters(Receipts):
    """Receipt counters shared by every subscriber of one fan-out run (``/ws`` or cluster)."""

    def __init__(self, channel: str, messages: int, size: int) -> None:
        """Prepare counters for ``messages`` measured publications of ``size``-byte text."""
        self.channel = channel
        self.texts = [make_payload(TAG_MEASURED, i, size) for i in range(messages)]
        self.data = [encode_str(t) for t in self.texts]
        #: The frames the hot path compares received bytes with (filled in place: every
        #: subscriber holds this list); just ``[None]`` (which no payload equals) until known.
        self.frames: list[bytes | None] = [None]
        #: The channel's offset the measured publications are counted from.
        self.base = 0
        self.count = [0] * messages  # deliveries of publication i, all subscribers together
        self.last = [0.0] * messages  # time of its latest delivery
        self.subscribed = 0
        self.subscribe_errors: list[str] = []
        self.warm: Counter[int] = Counter()
        self.wrong_channel = 0
        self.mismatched = 0  # a measured publication whose offset, data or info is wrong
        self.slow_hits = 0  # right measured publications that took the slow path
        self.unexpected = 0
        self.others = 0
        self.close_codes: Counter[int] = Counter()


class FanoutState(FanoutCounters):
    """Receipt counters shared by every subscriber of one run (one publisher).

    ``frames`` holds the exact frame of every measured publication, in order, then ``None``;
    ``base`` is the offset of measured publication 0 (publication i gets ``base + i``).
    """

    def __init__(self, channel: str, messages: int, size: int) -> None:
        """Prepare counters for ``messages`` measured publications of ``size``-byte text."""
        super().__init__(channel, messages, size)
        self.publisher_id = ""
        self.order_errors = 0  # an offset not above the subscriber's previous one

    def expect(self, base: int, publisher_id: str) -> None:
        """Build the exact frame of every measured publication (offsets from ``base``)."""
        info = info_bytes(publisher_id)
        self.base = base
        self.publisher_id = publisher_id
        # In place: every subscriber holds this list.
        self.frames[:] = [
            *(publication_bytes(self.channel, base + i, d, info) for i, d in enumerate(self.data)),
            None,
        ]

    @property
    def expecting(self) -> bool:
        """Tell whether the measured publications' frames are known yet."""
        return len(self.frames) > 1


class FanoutSubscriber(Receiver):
    """A ``/ws`` client that subscribes on connect; what the fan-out subscribers share.

    The hot path is the fan-out receivers' (:class:`fanout.Receiver`); off it, :meth:`control`
    and :meth:`publication` handle what every fan-out subscriber sees alike.
    """

    def __init__(self, state: FanoutCounters) -> None:
        """Bind the subscriber to the run's shared counters."""
        super().__init__(state, state.frames)
        self.state = state
        self.offset = -1  # the last offset seen on the slow path (or the subscribe reply's)

    def on_ws_connected(self, transport: WSTransport) -> None:
        """Subscribe at once (requests may follow the handshake without waiting)."""
        super().on_ws_connected(transport)
        transport.send(TEXT, subscribe_request(1, self.state.channel))

    def control(self, transport: WSTransport, frame: WSFrame) -> bool:
        """Count a frame off the hot path; handle it and return True if it is not text."""
        state = self.state
        state.others += 1
        if frame.msg_type is not TEXT:
            if self.handle_control(transport, frame) and self.close_code is not None:
                state.close_codes[self.close_code] += 1
            return True
        return False

    def publication(self, payload: bytes) -> dict[str, Any] | None:
        """Parse a text frame off the hot path: return it if it is a publication of the
        channel; otherwise handle it (``connected``, the subscribe reply) or count it."""
        state = self.state
        try:
            msg = json.loads(payload)
        except ValueError:
            state.unexpected += 1
            return None
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "connected":
            return None
        if kind is None and isinstance(msg, dict) and msg.get("id") == 1:
            if msg.get("ok"):
                state.subscribed += 1
                self.offset = msg["result"]["offset"]
            else:
                state.subscribe_errors.append(str(msg.get("error")))
            return None
        if kind != "publication":
            state.unexpected += 1
            return None
        if msg.get("channel") != state.channel:
            state.wrong_channel += 1
            return None
        return msg


class Subscriber(FanoutSubscriber):
    """A ``/ws`` client that subscribes on connect and counts the channel's publications.

    Hot path: the received bytes compared with the exact frame of the next measured
    publication this subscriber is due (channel, offset, data and info checked at once, and
    the order with them), a time stamp, a count. Anything else takes the slow path, which
    parses the JSON, checks that the offset is above the last one seen, and classifies it.
    """

    state: FanoutState

    def last_offset(self) -> int:
        """Return the highest offset this subscriber has received."""
        if self.next:
            return max(self.offset, self.state.base + self.next - 1)
        return self.offset

    def slow_path(self, transport: WSTransport, frame: WSFrame) -> None:
        """Parse and classify a frame that is not the measured publication due next."""
        if self.control(transport, frame):
            return
        msg = self.publication(frame.get_payload_as_bytes())
        if msg is None:
            return
        offset = msg.get("offset")
        if type(offset) is not int or offset <= self.last_offset():
            self.state.order_errors += 1  # a repeat, or out of order: not counted
            return
        self.offset = offset
        self.classify(msg, offset)

    def classify(self, msg: dict[str, Any], offset: int) -> None:
        """Count a publication that came through the slow path by its ``data`` tag."""
        state = self.state
        data = msg.get("data")
        if not isinstance(data, str) or not data[1:9].isdigit():
            state.unexpected += 1
            return
        tag = data[:1].encode()
        if tag == TAG_WARM:
            state.warm[int(data[1:9])] += 1
        elif tag == TAG_MEASURED and state.expecting:
            # Right, but laid out otherwise than expected, or after a gap (a lost one).
            seq = int(data[1:9])
            if (
                0 <= seq < len(state.texts)
                and data.encode() == state.texts[seq]
                and offset == state.base + seq
                and msg.get("info") == {"client": state.publisher_id, "user": None}
            ):
                state.slow_hits += 1
                self.last[seq] = perf_counter()
                self.count[seq] += 1
                self.next = seq + 1
                return
            state.mismatched += 1
        else:
            state.unexpected += 1


@dataclass
class FanoutConfig:
    """Sizes and time bounds of a fan-out run (``/ws`` or cluster)."""

    messages: int = 200
    size: int = 64
    window: int = DEFAULT_WINDOW
    channel: str = FANOUT_CHANNEL
    drain_timeout_s: float = 30.0
    idle_timeout_s: float = 5.0
    #: Seconds between two publications; 0: pipelined within ``window`` (see
    #: :func:`fanout.pace`).
    interval_s: float = 0.0


@dataclass
class ChannelConfig(FanoutConfig):
    """Sizes and time bounds of a ``/ws`` fan-out run."""

    members: int = 1000


@dataclass
class FanoutResult(BurstResult):
    """Figures of one fan-out run over ``/ws`` (one node or a cluster)."""

    window: int
    wrong_channel: int
    subscribe_errors: int
    publish_errors: int
    slow_hits: int
    frame_bytes: int

    @property
    def wrong(self) -> int:
        """Return the wrong frames and failed requests every kind of fan-out counts alike."""
        return (
            self.wrong_channel
            + self.mismatched
            + self.unexpected
            + self.subscribe_errors
            + self.publish_errors
        )


@dataclass
class ChannelResult(FanoutResult):
    """Figures of one ``/ws`` fan-out run (measured burst)."""

    members: int
    order_errors: int

    @property
    def errors(self) -> int:
        """Return every wrong frame or failed request of the run."""
        return self.order_errors + self.wrong


async def confirm_subscriptions(state: FanoutCounters, members: int) -> None:
    """Wait (bounded) for every subscriber's subscribe reply; raise unless all succeeded."""
    outcome = await wait_until(
        lambda: state.subscribed + len(state.subscribe_errors) >= members, REPLY_TIMEOUT_S
    )
    if outcome != "done" or state.subscribe_errors:
        first = state.subscribe_errors[0] if state.subscribe_errors else "no reply"
        raise RuntimeError(
            f"{state.subscribed} of {members} subscriptions confirmed; first error: {first}"
        )


async def _warm_up(publisher: Publisher, state: FanoutState, members: int) -> int:
    """Publish warm-up messages until one reached every subscriber; return its offset."""
    for wid in range(WARMUP_TRIES):
        data = encode_str(make_payload(TAG_WARM, wid, 64))
        reply = await publisher.request(
            {"op": "publish", "channel": state.channel, "data": json.loads(data)}
        )
        if not reply.get("ok"):
            raise RuntimeError(f"warm-up publish failed: {reply.get('error')}")
        outcome = await wait_until(lambda w=wid: state.warm[w] >= members, WARMUP_TIMEOUT_S)
        if outcome == "done":
            return int(reply["result"]["offset"])
    best = max(state.warm.values(), default=0)
    raise RuntimeError(f"warm-up never reached all {members} subscribers (best: {best})")


async def run_channel(
    host: str,
    port: int,
    cfg: ChannelConfig,
    server_cpu: CpuProbe,
    stop_server: Callable[[], Awaitable[None]],
    nodes: Sequence[str] = (),
) -> ChannelResult:
    """Run one ``/ws`` fan-out: subscribe, warm up, publish the measured burst, count.

    ``nodes``: the ``/ws`` URLs of other servers sharing the channel, if any; the subscribers
    are shared out over ``host:port`` and those, the publisher is on the first. The servers are
    stopped (``stop_server``) before the clients disconnect, as in the chat run.
    """
    url = f"ws://{host}:{port}{WS_PATH}"
    state = FanoutState(cfg.channel, cfg.messages, cfg.size)
    start = perf_counter()
    clients: list[Client] = []
    try:
        for node, share in zip([url, *nodes], split(cfg.members, 1 + len(nodes)), strict=True):
            clients += await connect_many(node, lambda: Subscriber(state), share)
        publisher = await connect_publisher(url)
        clients.append(publisher)
        await confirm_subscriptions(state, cfg.members)
        connect_s = perf_counter() - start
        warm_offset = await _warm_up(publisher, state, cfg.members)
        assert publisher.client_id is not None
        state.expect(warm_offset + 1, publisher.client_id)
        requests = [publish_request(i, cfg.channel, data) for i, data in enumerate(state.data)]
        expected = cfg.messages * cfg.members
        with measuring(server_cpu) as meter:
            publisher.start(requests, cfg.window, paced=cfg.interval_s > 0)
            if cfg.interval_s > 0:
                await pace(publisher.send_next, cfg.messages, cfg.interval_s)
            outcome = await state.drain(expected, cfg.drain_timeout_s, cfg.idle_timeout_s)
            burst = state.burst(expected, outcome, meter.stop())
        # The replies may trail the last delivery a little (the server answers a publish
        # after delivering it): wait for them, bounded, to check every offset.
        await wait_until(lambda: publisher.replies >= cfg.messages, REPLY_TIMEOUT_S)
    finally:
        await stop_server()
        await close_all(clients)

    send_times = publisher.send_times
    wrong_offsets = sum(
        1 for i, off in enumerate(publisher.offsets) if off is not None and off != state.base + i
    )
    publish_errors = (cfg.messages - publisher.replies) + publisher.errors + wrong_offsets
    return ChannelResult(
        **burst.figures(send_times, send_times[0], cfg.members),
        members=cfg.members,
        messages=cfg.messages,
        window=cfg.window,
        order_errors=state.order_errors,
        wrong_channel=state.wrong_channel,
        mismatched=state.mismatched,
        unexpected=state.unexpected,
        subscribe_errors=len(state.subscribe_errors),
        publish_errors=publish_errors,
        slow_hits=state.slow_hits,
        # The mean over the measured frames (their length grows with the offset's digits).
        frame_bytes=round(sum(len(f or b"") for f in state.frames[:-1]) / max(1, cfg.messages)),
        connect_s=connect_s,
    )
