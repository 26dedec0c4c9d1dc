"""Fan-out over ``/ws`` across roomcast nodes that share one channel through Redis.

N "slots", each a ``/ws`` URL: per slot, ``per_node`` subscribers of one channel and one
publisher connection (a ``/ws`` client of its own, not subscribed). With N nodes on Redis every
slot is another node; for the single-node comparison every slot is the same node, so the load
(subscribers, publisher connections, publications) is the same. The publishers send their
shares of the burst back to back, each as ``publish`` requests pipelined with a bounded window
(``channel.Publisher``); ``data`` is the chat scenario's 64-byte message, its sequence number
unique across publishers.

Offsets are given by the broker (on Redis: one sequence per channel, whichever node published),
so how the publishers' streams interleave is unknown in advance, but the offsets of the burst
are not: they follow the warm-up's. The first subscriber to get an offset takes the slow path:
the publication is recognised by what follows the offset in its frame (``data`` and ``info``,
looked up in a table built once the publishers' client ids are known), its offset checked, and
its frame becomes the one of that offset. Every other subscriber's hot path is then as short as
in ``channel.py``: the received bytes compared with the frame of the offset it is due next,
which checks channel, offset, data, info and order at once, plus a check that it did not have
that publication yet. Off the hot path: an offset not above the subscriber's previous one is
out of order, a publication it already had is a duplicate, a publication under two offsets (or
two under one) is inconsistent. After the run, every publication's offset must be the one its
publish reply acknowledged, and those must be exactly the offsets that follow the warm-up.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from picows import WSFrame, WSMsgType, WSTransport

from channel import (
    REPLY_TIMEOUT_S,
    FanoutConfig,
    FanoutCounters,
    FanoutResult,
    FanoutSubscriber,
    Publisher,
    confirm_subscriptions,
    connect_publisher,
    encode_str,
    info_bytes,
    publication_bytes,
    publish_request,
)
from chat import TAG_MEASURED, TAG_WARM, WARMUP_TIMEOUT_S, WARMUP_TRIES, make_payload
from clients import Client, close_all, connect_many
from cpu import CpuProbe, measuring
from fanout import split
from roomcast.tools.loadgen import percentile_ms, wait_until

perf_counter = time.perf_counter
TEXT = WSMsgType.TEXT
CLUSTER_CHANNEL = "bench:cluster"


class ClusterState(FanoutCounters):
    """Receipt counters shared by every subscriber of one run (one publisher per slot).

    ``base`` is the channel's offset before the measured burst (publication i gets one above
    it, which one is known only when it arrives). ``frames[k]`` is the frame received under
    offset ``base + 1 + k`` and ``seqs[k]`` which publication it is, as the first subscriber
    to get that offset found (and checked) it; ``None`` until then, and ``None`` after the
    last one.
    """

    def __init__(self, channel: str, messages: int, size: int) -> None:
        """Prepare counters for ``messages`` measured publications of ``size``-byte text."""
        super().__init__(channel, messages, size)
        self.messages = messages
        #: Every publication frame of the channel starts with this; the offset follows.
        self.head = b'{"type":"publication","channel":"%s","offset":' % channel.encode()
        #: What follows the offset in measured publication i's frame → i (see :meth:`expect`).
        self.tails: dict[bytes, int] = {}
        self.owners: list[str] = []
        self.seqs: list[int] = [0]  # filled in place, as ``frames``
        self.seq_offset = [0] * messages  # the offset publication i was first seen under
        self.duplicates = 0  # a publication a subscriber already had
        self.out_of_order = 0  # an offset not above the subscriber's previous one
        self.inconsistent = 0  # two offsets for one publication, two publications for one

    def expect(self, owners: Sequence[str], base: int) -> None:
        """Get ready for the measured burst: ``owners[i]`` is the client id of publication i's
        publisher, ``base`` the channel's offset before the burst."""
        self.owners = list(owners)
        self.tails.clear()
        for i, (data, owner) in enumerate(zip(self.data, owners, strict=True)):
            self.tails[b',"data":%s,"info":%s}' % (data, info_bytes(owner))] = i
        self.base = base
        self.frames[:] = [None] * (self.messages + 1)
        self.seqs[:] = [0] * (self.messages + 1)


class ClusterSubscriber(FanoutSubscriber):
    """A ``/ws`` client that subscribes on connect and checks every publication it gets.

    Hot path, as in ``channel.py``: the received bytes compared with the frame of the offset
    this subscriber is due next (its channel, offset, data and info, and the order, checked
    at once), which publication that is, a check that the subscriber did not have it yet, a
    time stamp and a count. The first subscriber to get an offset finds its frame on the slow
    path, which recognises the publication by what follows the offset (``data`` and ``info``)
    and checks its offset; anything else is parsed as JSON.
    """

    state: ClusterState

    def __init__(self, state: ClusterState) -> None:
        """Bind the subscriber to the run's shared counters."""
        super().__init__(state)
        self.seqs = state.seqs
        #: Receipt time of every measured publication (0.0: not received).
        self.got = [0.0] * state.messages

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Count the publication of the offset due next (fast path), or classify the frame."""
        i = self.next
        payload = frame.get_payload_as_bytes()
        if payload == self.frames[i]:
            seq = self.seqs[i]
            got = self.got
            if not got[seq]:
                got[seq] = now = perf_counter()
                self.last[seq] = now
                self.count[seq] += 1
                self.next = i + 1
                return
        self.slow_path(transport, frame, payload)

    def last_offset(self) -> int:
        """Return the highest offset this subscriber has received."""
        if self.next:
            return max(self.offset, self.state.base + self.next)
        return self.offset

    def receive(self, seq: int, offset: int, payload: bytes) -> None:
        """Check and count measured publication ``seq``, received under ``offset``."""
        state = self.state
        if self.got[seq]:
            state.duplicates += 1  # not counted again
            return
        last = self.last_offset()
        if offset <= last:
            state.out_of_order += 1  # counted (it arrived, once), but flagged
        k = offset - state.base - 1
        if 0 <= k < state.messages:
            known = state.frames[k]
            if known is None:  # the first subscriber to get this offset
                if state.seq_offset[seq]:
                    state.inconsistent += 1  # the publication already had another offset
                else:
                    state.seq_offset[seq] = offset
                state.frames[k] = payload
                state.seqs[k] = seq
            elif known != payload:
                state.inconsistent += 1  # another publication under the same offset
            if offset > last:
                self.next = k + 1
        else:
            state.inconsistent += 1  # not one of the burst's offsets
        self.offset = max(self.offset, offset)
        self.got[seq] = now = perf_counter()
        state.last[seq] = now
        state.count[seq] += 1

    def slow_path(self, transport: WSTransport, frame: WSFrame, payload: bytes) -> None:
        """Classify a frame that is not the publication of the offset due next."""
        if self.control(transport, frame):
            return
        state = self.state
        head = state.head
        if payload.startswith(head):  # the layout the server writes: no JSON needed
            comma = payload.find(b",", len(head))
            seq = state.tails.get(payload[comma:])
            digits = payload[len(head) : comma]
            if seq is not None and digits.isdigit():
                self.receive(seq, int(digits), payload)
                return
        msg = self.publication(payload)
        if msg is None:
            return
        offset, data = msg.get("offset"), msg.get("data")
        if type(offset) is not int or not isinstance(data, str) or not data[1:9].isdigit():
            state.unexpected += 1
            return
        tag, seq = data[:1].encode(), int(data[1:9])
        if tag == TAG_WARM:
            if offset > self.last_offset():
                self.offset = offset
                state.warm[seq] += 1
            else:
                state.out_of_order += 1
            return
        if (
            tag == TAG_MEASURED
            and 0 <= seq < state.messages
            and state.owners
            and data.encode() == state.texts[seq]
            and msg.get("info") == {"client": state.owners[seq], "user": None}
        ):
            state.slow_hits += 1  # right, but laid out otherwise than expected
            self.receive(seq, offset, payload)
            return
        state.mismatched += 1


@dataclass
class ClusterConfig(FanoutConfig):
    """Sizes and time bounds of a cluster fan-out run."""

    channel: str = CLUSTER_CHANNEL
    per_node: int = 300


@dataclass
class ClusterResult(FanoutResult):
    """Figures of one cluster (or single-node) fan-out run (measured burst).

    ``p50_ms``/``p99_ms``: publish → last subscriber, per publication.
    """

    nodes: int
    slots: int
    per_node: int
    shares: list[int]
    d50_ms: float | None  # publish → receipt, over all deliveries
    d99_ms: float | None
    duplicates: int
    out_of_order: int
    offset_errors: int
    broker: float  # the broker process's share of a core over the window (0 for memory://)
    close_codes: dict[int, int]  # connections the servers closed during the run

    @property
    def subscribers(self) -> int:
        """Return the subscribers in all."""
        return self.per_node * self.slots

    @property
    def errors(self) -> int:
        """Return every other wrong frame, failed request or closed connection of the run."""
        return self.offset_errors + self.wrong + sum(self.close_codes.values())


async def _warm_up(publishers: Sequence[Publisher], state: ClusterState, members: int) -> int:
    """Each publisher in turn publishes warm-ups until one reached every subscriber.

    Returns the channel's offset after the last warm-up (the measured ones follow it).
    """
    offset = 0
    for k, publisher in enumerate(publishers):
        for attempt in range(WARMUP_TRIES):
            wid = k * WARMUP_TRIES + attempt
            data = make_payload(TAG_WARM, wid, 64).decode()
            reply = await publisher.request(
                {"op": "publish", "channel": state.channel, "data": data}
            )
            if not reply.get("ok"):
                raise RuntimeError(f"warm-up publish failed: {reply.get('error')}")
            offset = int(reply["result"]["offset"])
            outcome = await wait_until(lambda w=wid: state.warm[w] >= members, WARMUP_TIMEOUT_S)
            if outcome == "done":
                break
        else:
            best = max(state.warm.values(), default=0)
            raise RuntimeError(
                f"warm-up of publisher {k + 1} never reached all {members} subscribers "
                f"(best: {best})"
            )
    return offset


def _ack_errors(acks: Sequence[int | None], offsets: Sequence[int], base: int) -> int:
    """Count publications whose acknowledged offset is missing, repeated or not after ``base``,
    or differs from the one the subscribers saw (``offsets``, 0 where none arrived)."""
    wanted = set(range(base + 1, base + len(acks) + 1))
    seen: set[int] = set()
    errors = 0
    for ack, got in zip(acks, offsets, strict=True):
        if ack is None or ack not in wanted or ack in seen or (got and got != ack):
            errors += 1
        if ack is not None:
            seen.add(ack)
    return errors


async def run_cluster(
    urls: Sequence[str],
    cfg: ClusterConfig,
    server_cpu: CpuProbe,
    broker_cpu: CpuProbe | None,
    stop_servers: Callable[[], Awaitable[None]],
) -> ClusterResult:
    """Run one fan-out over the ``/ws`` URLs of ``urls`` (one slot each; see the module).

    The servers are stopped (``stop_servers``) before the clients disconnect, as in the other
    fan-out runs.
    """
    state = ClusterState(cfg.channel, cfg.messages, cfg.size)
    members = cfg.per_node * len(urls)
    shares = split(cfg.messages, len(urls))
    starts = [sum(shares[:k]) for k in range(len(urls))]
    clients: list[Client] = []
    subscribers: list[ClusterSubscriber] = []
    publishers: list[Publisher] = []
    start = perf_counter()
    try:
        for url in urls:
            subs = await connect_many(url, lambda: ClusterSubscriber(state), cfg.per_node)
            subscribers += subs
            clients += subs
        for url in urls:
            publisher = await connect_publisher(url)
            publishers.append(publisher)
            clients.append(publisher)
        await confirm_subscriptions(state, members)
        connect_s = perf_counter() - start
        owners: list[str] = []
        for publisher, share in zip(publishers, shares, strict=True):
            assert publisher.client_id is not None
            owners += [publisher.client_id] * share
        base = await _warm_up(publishers, state, members)
        state.expect(owners, base)
        requests = [
            [publish_request(i, cfg.channel, state.data[first + i]) for i in range(share)]
            for first, share in zip(starts, shares, strict=True)
        ]
        expected = cfg.messages * members
        with measuring(server_cpu) as meter:
            broker0 = broker_cpu() if broker_cpu else 0.0
            for publisher, reqs in zip(publishers, requests, strict=True):
                publisher.start(reqs, cfg.window)
            outcome = await state.drain(expected, cfg.drain_timeout_s, cfg.idle_timeout_s)
            usage = meter.stop()
            broker_s = (broker_cpu() - broker0) if broker_cpu else 0.0
            burst = state.burst(expected, outcome, usage)
        # Replies may trail the deliveries: wait for them (bounded) to check every offset.
        await wait_until(
            lambda: all(p.replies >= len(r) for p, r in zip(publishers, requests, strict=True)),
            REPLY_TIMEOUT_S,
        )
    finally:
        closed = dict(state.close_codes)  # closes before the servers were stopped: wrong
        await stop_servers()
        await close_all(clients)

    sent: list[float] = []
    acks: list[int | None] = []
    replies = errors = 0
    for publisher, reqs in zip(publishers, requests, strict=True):
        sent += publisher.send_times[: len(reqs)]
        acks += publisher.offsets[: len(reqs)]
        replies += publisher.replies
        errors += publisher.errors
    each = [
        t - sent[i] for sub in subscribers for i, t in enumerate(sub.got) if t
    ]  # publish → receipt, every delivery
    frame = publication_bytes(cfg.channel, base + 1, state.data[0], info_bytes(owners[0]))
    return ClusterResult(
        **burst.figures(sent, min(sent), members),
        nodes=len(set(urls)),
        slots=len(urls),
        per_node=cfg.per_node,
        messages=cfg.messages,
        shares=shares,
        window=cfg.window,
        d50_ms=percentile_ms(each, 50),
        d99_ms=percentile_ms(each, 99),
        duplicates=state.duplicates,
        out_of_order=state.out_of_order,
        offset_errors=state.inconsistent + _ack_errors(acks, state.seq_offset, base),
        wrong_channel=state.wrong_channel,
        mismatched=state.mismatched,
        unexpected=state.unexpected,
        subscribe_errors=len(state.subscribe_errors),
        publish_errors=(cfg.messages - replies) + errors,
        slow_hits=state.slow_hits,
        frame_bytes=len(frame),
        connect_s=connect_s,
        broker=broker_s / usage.wall_s if usage.wall_s else 0.0,
        close_codes=closed,
    )


def describe_frame(channel: str = CLUSTER_CHANNEL) -> bytes:
    """Return a typical measured publication frame (for the report's text)."""
    data = encode_str(make_payload(TAG_MEASURED, 0, 64))
    return publication_bytes(channel, 1000, data, info_bytes("0" * 12))
