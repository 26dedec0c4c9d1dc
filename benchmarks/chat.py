"""Chat fan-out load: N members on /ws/chat, one of them sends a burst, all count receipts.

Optionally one extra member connects with a tiny receive buffer and then never reads (the
"stalled member"), after a fill phase of 1 KiB messages that fills its socket buffers. The
guide's broadcast awaits every member in turn, so its room stops; every phase here is bounded
by a timeout and by an idle timeout (no delivery for a while), so a stopped room is reported as
"stalled" instead of hanging the harness.

The members may be spread over several servers (the nodes of one cluster, which share the room
through their broker), and the burst sent back to back or paced (``ChatConfig.interval_s``).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from picows import WSFrame, WSMsgType, WSTransport

from clients import close_all, connect_many
from cpu import CpuProbe, measuring
from fanout import BurstResult, Receipts, Receiver, pace, split
from roomcast.tools.loadgen import wait_until
from staller import StalledMember

perf_counter = time.perf_counter
TEXT = WSMsgType.TEXT
PREFIX = b"Client says: "
LEFT = b"A client left the chat"
TAG_MEASURED, TAG_FILL, TAG_WARM = b"M", b"F", b"W"
WARMUP_TRIES = 5
WARMUP_TIMEOUT_S = 15.0


def make_payload(tag: bytes, seq: int, size: int) -> bytes:
    """Return a ``size``-byte message: tag, 8-digit sequence number, ``|``, padding."""
    head = tag + b"%08d|" % seq
    return head + b"x" * (size - len(head))


class ChatState(Receipts):
    """Receipt counters shared by all members of one run."""

    def __init__(self, messages: int, size: int) -> None:
        """Prepare per-message counters for ``messages`` measured messages of ``size`` bytes."""
        self.payloads = [make_payload(TAG_MEASURED, i, size) for i in range(messages)]
        self.expected = [PREFIX + p for p in self.payloads]
        # The exact expected broadcast → its sequence number, for the slow path (a measured
        # message that is not the one due next).
        self.index = {text: seq for seq, text in enumerate(self.expected)}
        self.count = [0] * messages
        self.last = [0.0] * messages
        self.fill = 0
        self.warm: Counter[int] = Counter()
        self.left = 0
        self.unexpected = 0
        self.mismatched = 0
        self.others = 0
        self.close_codes: Counter[int] = Counter()


class ChatMember(Receiver):
    """A chat member that counts every broadcast it receives and stamps the time.

    The hot path is the fan-out receivers' (:class:`fanout.Receiver`): the same as the ``/ws``
    subscriber's. Anything else (control frames, warm-up, fill, leave notices, a measured
    message not due next) takes the slow path.
    """

    def __init__(self, state: ChatState) -> None:
        """Bind the member to the run's shared counters."""
        super().__init__(state, [*state.expected, None])
        self.state = state

    def slow_path(self, transport: WSTransport, frame: WSFrame) -> None:
        """Classify a frame that is not an expected measured message."""
        state = self.state
        state.others += 1
        if frame.msg_type is not TEXT:
            if self.handle_control(transport, frame) and self.close_code is not None:
                state.close_codes[self.close_code] += 1
            return
        data = frame.get_payload_as_bytes()
        if not data.startswith(PREFIX):
            if data == LEFT:
                state.left += 1
            else:
                state.unexpected += 1
            return
        tag = data[13:14]
        if tag == TAG_FILL:
            state.fill += 1
        elif tag == TAG_WARM:
            state.warm[int(data[14:22])] += 1
        elif tag == TAG_MEASURED:
            seq = state.index.get(data)
            if seq is None or seq < self.next:
                state.mismatched += 1  # wrong bytes, a repeat, or out of order: not counted
            else:
                # Not the one due next: those before it were lost (the counts will show it).
                self.last[seq] = perf_counter()
                self.count[seq] += 1
                self.next = seq + 1
        else:
            state.unexpected += 1


@dataclass
class ChatResult(BurstResult):
    """Figures of one chat fan-out run (measured phase unless named otherwise)."""

    members: int
    with_staller: bool
    fill_expected: int
    fill_delivered: int
    fill_outcome: str
    left_notices: int
    staller: str
    staller_detail: str

    @property
    def stalled(self) -> bool:
        """Tell whether the room stopped delivering before everything arrived."""
        return self.outcome != "done"


@dataclass
class ChatConfig:
    """Sizes and time bounds of a chat run."""

    members: int = 1000
    messages: int = 200
    size: int = 64
    with_staller: bool = False
    fill_messages: int = 300
    fill_size: int = 1024
    rcvbuf: int = 4096
    drain_timeout_s: float = 30.0
    idle_timeout_s: float = 5.0
    fill_timeout_s: float = 30.0
    #: Seconds between two measured messages; 0: back to back (see :func:`fanout.pace`).
    interval_s: float = 0.0


def _reached(counts: Counter[int], key: int, target: int) -> bool:
    """Tell whether ``counts[key]`` reached ``target``."""
    return counts[key] >= target


async def _warm_up(sender: ChatMember, state: ChatState, members: int) -> None:
    """Send warm-up messages until one reached every member (proves all are registered)."""
    for wid in range(WARMUP_TRIES):
        sender.transport.send(WSMsgType.TEXT, make_payload(TAG_WARM, wid, 64))
        outcome = await wait_until(
            functools.partial(_reached, state.warm, wid, members), WARMUP_TIMEOUT_S
        )
        if outcome == "done":
            return
    raise RuntimeError(
        f"warm-up never reached all {members} members (best: {max(state.warm.values(), default=0)})"
    )


async def run_chat(
    host: str,
    port: int,
    path: str,
    cfg: ChatConfig,
    server_cpu: CpuProbe,
    stop_server: Callable[[], Awaitable[None]],
    nodes: Sequence[str] = (),
) -> ChatResult:
    """Run one fan-out: connect, warm up, (fill), send the measured burst, count receipts.

    ``nodes``: the URLs of the room on other servers (``path`` on them), if the room spans
    several; the members are shared out over ``host:port`` and those, the sender (and the
    stalled member) on the first. The servers are stopped (``stop_server``) before the members
    disconnect: the guide's chat would otherwise broadcast a leave notice to every remaining
    member for every leaver.
    """
    urls = [f"ws://{host}:{port}{path}", *nodes]
    state = ChatState(cfg.messages, cfg.size)
    start = time.perf_counter()
    members: list[ChatMember] = []
    staller: StalledMember | None = None
    try:
        for url, share in zip(urls, split(cfg.members, len(urls)), strict=True):
            members += await connect_many(url, lambda: ChatMember(state), share)
    except BaseException:
        await close_all(members)
        raise
    try:
        if cfg.with_staller:
            staller = StalledMember(host, port, path, cfg.rcvbuf)
            await asyncio.to_thread(staller.connect)
        connect_s = time.perf_counter() - start
        sender = members[0]
        await _warm_up(sender, state, cfg.members)

        fill_expected = cfg.fill_messages * cfg.members if cfg.with_staller else 0
        fill_outcome = "skipped"
        if fill_expected:
            for i in range(cfg.fill_messages):
                sender.transport.send(WSMsgType.TEXT, make_payload(TAG_FILL, i, cfg.fill_size))
            fill_outcome = await wait_until(
                lambda: state.fill >= fill_expected,
                cfg.fill_timeout_s,
                cfg.idle_timeout_s,
                state.progress,
            )
        fill_delivered = state.fill

        expected = cfg.messages * cfg.members
        send_times = [0.0] * cfg.messages
        transport_send, payloads = sender.transport.send, state.payloads

        def send(i: int) -> None:
            send_times[i] = perf_counter()
            transport_send(TEXT, payloads[i])

        with measuring(server_cpu) as meter:
            await pace(send, cfg.messages, cfg.interval_s)
            outcome = await state.drain(expected, cfg.drain_timeout_s, cfg.idle_timeout_s)
            # Snapshot now: draining the stalled member below may unblock a stopped room.
            burst = state.burst(expected, outcome, meter.stop())
            left_notices = state.left
        staller_text = staller_detail = "none"
        if staller is not None:
            staller_text, staller_detail = await asyncio.to_thread(staller.drain_for_close)
    finally:
        await stop_server()
        await close_all(members)
        if staller is not None:
            staller.close()

    return ChatResult(
        **burst.figures(send_times, send_times[0], cfg.members),
        members=cfg.members,
        messages=cfg.messages,
        with_staller=cfg.with_staller,
        fill_expected=fill_expected,
        fill_delivered=fill_delivered,
        fill_outcome=fill_outcome,
        left_notices=left_notices,
        staller=staller_text,
        staller_detail=staller_detail,
        mismatched=state.mismatched,
        unexpected=state.unexpected,
        connect_s=connect_s,
    )


@dataclass
class CutResult:
    """What a room did when one member stopped reading: cut it, stalled, or neither."""

    sent: int
    outcome: str
    staller: str
    staller_detail: str

    @property
    def summary(self) -> str:
        """Describe the outcome in a few words for the results table."""
        if self.outcome == "cut":
            return f"member cut ({self.staller}) within {self.sent:,} messages"
        if self.outcome == "stalled":
            return f"STALLED within {self.sent:,} messages"
        return f"neither cut nor stalled after {self.sent:,} messages"


def _fill_or_left(state: ChatState, fill: int) -> bool:
    """Tell whether ``fill`` fill messages arrived or a leave notice did."""
    return state.fill >= fill or state.left > 0


async def run_cut_check(
    host: str,
    port: int,
    path: str,
    stop_server: Callable[[], Awaitable[None]],
    limit_messages: int = 3000,
    size: int = 1024,
    batch: int = 100,
    rcvbuf: int = 4096,
    idle_s: float = 2.0,
) -> CutResult:
    """A room of one sender and one stalled member: send 1 KiB messages in batches until the
    room either cuts the stalled member (the sender gets "A client left the chat") or stops
    delivering to the sender (stalled), at most ``limit_messages``.
    """
    state = ChatState(0, 64)
    members = await connect_many(f"ws://{host}:{port}{path}", lambda: ChatMember(state), 1)
    staller = StalledMember(host, port, path, rcvbuf)
    try:
        await asyncio.to_thread(staller.connect)
        sender = members[0]
        await _warm_up(sender, state, 1)
        sent, outcome = 0, "neither"
        while sent < limit_messages:
            for i in range(sent, sent + batch):
                sender.transport.send(WSMsgType.TEXT, make_payload(TAG_FILL, i, size))
            sent += batch
            waited = await wait_until(
                functools.partial(_fill_or_left, state, sent),
                limit_s=10.0,
                idle=idle_s,
                progress=state.progress,
            )
            if state.left:
                outcome = "cut"
                break
            if waited != "done":
                outcome = "stalled"
                break
        verdict, detail = await asyncio.to_thread(staller.drain_for_close)
    finally:
        await stop_server()
        await close_all(members)
        staller.close()
    return CutResult(sent, outcome, verdict, detail)
