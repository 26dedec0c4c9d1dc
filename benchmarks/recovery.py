"""Recovery over ``/ws`` (docs/protocol.md): N clients miss publications, reconnect, recover.

1. N clients connect to ``/ws``, subscribe to one channel and keep the epoch of the reply and
   the offset of the last publication they got (a warm-up publication that must reach all).
2. All of them close (close handshake), and the harness waits until the channel's presence is
   empty, so that the server has let every one of them go.
3. Another ``/ws`` client publishes ``missed`` publications (pipelined, bounded window).
4. All N reconnect at once and ``subscribe`` with ``recover`` = what they kept. Measured: the
   time from starting the reconnects until every client has its reply and every missed
   publication, and what went wrong: replies with ``recovered: false``, missed publications
   that never came (lost), publications that came twice or out of order (duplicates).

The receiving side is kept cheap, as in the fan-out runs: the exact frame of every missed
publication is known once they are published, so one dict lookup identifies and verifies one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from picows import WSCloseCode, WSFrame, WSMsgType, WSTransport

from channel import (
    REPLY_TIMEOUT_S,
    WS_PATH,
    Publisher,
    connect_publisher,
    encode_str,
    info_bytes,
    publication_bytes,
    publish_request,
    subscribe_request,
)
from chat import TAG_MEASURED, TAG_WARM, make_payload
from clients import Client, close_all, connect_many, wait_closed
from cpu import CpuProbe, Usage, measuring
from roomcast.tools.loadgen import percentile_ms, wait_until

perf_counter = time.perf_counter
TEXT = WSMsgType.TEXT
RECOVERY_CHANNEL = "bench:recovery"
GONE_TIMEOUT_S = 15.0


class RecoveryState:
    """Counters shared by every client of one run (both connections of each)."""

    def __init__(self, channel: str, clients: int) -> None:
        """Prepare the counters of ``clients`` clients."""
        self.channel = channel
        self.clients = clients
        #: exact frame of each missed publication -> its offset; filled after publishing.
        self.index: dict[bytes, int] = {}
        self.epoch = ""  # the epoch of the first subscription (every client must see it)
        # first connection
        self.subscribed = 0
        self.warmed = 0
        # second connection
        self.start = 0.0
        self.connected_at: list[float] = []
        self.replies = 0
        self.recovered_false = 0
        self.replayed_wrong = 0  # "replayed" not equal to the number of missed publications
        self.done = 0
        self.done_at: list[float] = []
        self.duplicates = 0  # a publication not newer than the client's last one
        self.before_reply = 0  # a replayed publication ahead of the subscribe reply
        self.errors: list[str] = []  # error replies, wrong epochs, unexpected frames
        self.error_count = 0
        self.slow_hits = 0
        self.frames = 0

    def error(self, text: str) -> None:
        """Count one problem; keep the text of the first few."""
        self.error_count += 1
        if len(self.errors) < 5:
            self.errors.append(text)

    def progress(self) -> int:
        """Return a counter of everything received on the second connections."""
        return self.frames + self.replies


class FirstSubscriber(Client):
    """Subscribes, keeps the epoch and the last offset it saw; closes when told."""

    def __init__(self, state: RecoveryState) -> None:
        """Bind the client to the run's counters."""
        super().__init__()
        self.state = state
        self.epoch: str | None = None
        self.offset = -1

    def on_ws_connected(self, transport: WSTransport) -> None:
        """Subscribe at once."""
        super().on_ws_connected(transport)
        transport.send(TEXT, subscribe_request(1, self.state.channel))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Keep the subscription's epoch and every publication's offset."""
        if frame.msg_type is not TEXT:
            if frame.msg_type == WSMsgType.CLOSE and not transport.is_close_frame_sent:
                self.handle_control(transport, frame)
            elif frame.msg_type == WSMsgType.CLOSE:
                transport.disconnect()  # the server answered our close
            return
        msg = json.loads(frame.get_payload_as_bytes())
        state = self.state
        if msg.get("id") == 1:
            if msg.get("ok"):
                self.epoch = msg["result"]["epoch"]
                self.offset = msg["result"]["offset"]
                state.subscribed += 1
            else:
                state.error(f"first subscribe: {msg.get('error')}")
        elif msg.get("type") == "publication" and msg.get("channel") == state.channel:
            if msg["offset"] > self.offset:
                self.offset = msg["offset"]
            if str(msg.get("data", "")).startswith(TAG_WARM.decode()):
                state.warmed += 1


class Recoverer(Client):
    """Reconnects with ``recover`` and counts the replayed publications."""

    def __init__(self, state: RecoveryState, epoch: str, offset: int, missed: int) -> None:
        """Recover from (``epoch``, ``offset``); ``missed`` publications are due."""
        super().__init__()
        self.state = state
        self.lookup = state.index.get
        self.epoch = epoch
        self.offset = offset
        self.missed = missed
        self.received = 0
        self.replied = False
        self.finished = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        """Subscribe with ``recover`` as soon as the handshake is done."""
        super().on_ws_connected(transport)
        self.state.connected_at.append(perf_counter())
        transport.send(TEXT, subscribe_request(1, self.state.channel, (self.offset, self.epoch)))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Count a replayed publication (fast path) or handle any other frame."""
        state = self.state
        offset = self.lookup(frame.get_payload_as_bytes())
        if offset is None:
            self.slow_path(transport, frame)
            return
        state.frames += 1
        if not self.replied:
            state.before_reply += 1
        if offset > self.offset:
            self.offset = offset
            self.received += 1
            if self.received >= self.missed and self.replied:
                self.finish()
        else:
            state.duplicates += 1

    def finish(self) -> None:
        """This client has its reply and every missed publication."""
        if not self.finished:
            self.finished = True
            self.state.done_at.append(perf_counter())
            self.state.done += 1

    def slow_path(self, transport: WSTransport, frame: WSFrame) -> None:
        """Handle the reply, the ``connected`` push, control frames and anything unexpected."""
        state = self.state
        if frame.msg_type is not TEXT:
            self.handle_control(transport, frame)
            return
        msg = json.loads(frame.get_payload_as_bytes())
        if msg.get("type") == "connected":
            return
        if msg.get("id") == 1:
            state.replies += 1
            self.replied = True
            if not msg.get("ok"):
                state.error(f"recover: {msg.get('error')}")
                return
            result = msg["result"]
            if not result.get("recovered"):
                state.recovered_false += 1
            if result.get("replayed") != self.missed:
                state.replayed_wrong += 1
            if result.get("epoch") != self.epoch:
                state.error(f"epoch {result.get('epoch')!r}, expected {self.epoch!r}")
            if self.received >= self.missed:
                self.finish()
            return
        if msg.get("type") == "publication" and msg.get("channel") == state.channel:
            state.frames += 1
            data = msg.get("data")
            offset = msg.get("offset")
            if not isinstance(data, str) or not isinstance(offset, int):
                state.error(f"unexpected publication {msg!r:.120}")
                return
            if offset <= self.offset:
                state.duplicates += 1
                return
            expected = make_payload(TAG_MEASURED, offset, 64).decode()
            if data != expected:
                state.error(f"offset {offset} carries {data[:20]!r}")
                return
            # Right publication, laid out otherwise than the fast path expects.
            state.slow_hits += 1
            self.offset = offset
            self.received += 1
            if self.received >= self.missed and self.replied:
                self.finish()
            return
        state.error(f"unexpected frame {msg!r:.120}")


@dataclass
class RecoveryConfig:
    """Sizes and time bounds of a recovery run."""

    clients: int = 1000
    missed: int = 100
    window: int = 256
    channel: str = RECOVERY_CHANNEL
    timeout_s: float = 60.0
    idle_timeout_s: float = 5.0


@dataclass
class RecoveryResult:
    """Figures of one recovery run."""

    clients: int
    missed: int
    outcome: str
    total_s: float | None
    connect_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    completed: int
    replies: int
    recovered_false: int
    replayed_wrong: int
    lost: int
    duplicates: int
    before_reply: int
    errors: int
    first_error: str
    slow_hits: int
    gone_s: float
    usage: Usage

    @property
    def problems(self) -> int:
        """Return everything that should be zero, added up."""
        return (
            self.recovered_false
            + self.replayed_wrong
            + self.lost
            + self.duplicates
            + self.before_reply
            + self.errors
            + (self.clients - self.replies)
        )


async def _close_cleanly(clients: list[FirstSubscriber]) -> None:
    """Send every client's close frame and wait (bounded) for the close handshakes."""
    for client in clients:
        client.transport.send_close(WSCloseCode.OK)
    if not await wait_closed(clients):
        await close_all(clients)


async def _wait_gone(publisher: Publisher, channel: str) -> None:
    """Poll the channel's presence until nobody is subscribed (bounded)."""
    deadline = perf_counter() + GONE_TIMEOUT_S
    while True:
        reply = await publisher.request({"op": "presence", "channel": channel})
        left = len(reply.get("result", {}).get("clients", ()))
        if left == 0:
            return
        if perf_counter() > deadline:
            raise RuntimeError(
                f"{left} subscribers still present {GONE_TIMEOUT_S:g} s after closing"
            )
        await asyncio.sleep(0.05)


async def run_recovery(
    host: str,
    port: int,
    cfg: RecoveryConfig,
    server_cpu: CpuProbe,
    stop_server: Callable[[], Awaitable[None]],
) -> RecoveryResult:
    """Run one recovery: subscribe, leave, miss ``cfg.missed`` publications, recover."""
    url = f"ws://{host}:{port}{WS_PATH}"
    state = RecoveryState(cfg.channel, cfg.clients)
    first = await connect_many(url, lambda: FirstSubscriber(state), cfg.clients)
    publisher: Publisher | None = None
    second: list[Recoverer] = []
    try:
        publisher = await connect_publisher(url)
        if await wait_until(lambda: state.subscribed >= cfg.clients, REPLY_TIMEOUT_S) != "done":
            raise RuntimeError(
                f"{state.subscribed} of {cfg.clients} subscriptions confirmed; "
                f"first error: {state.errors[:1]}"
            )
        # A warm-up publication every client must get (so all are live subscribers).
        warm = json.loads(encode_str(make_payload(TAG_WARM, 0, 64)))
        reply = await publisher.request({"op": "publish", "channel": cfg.channel, "data": warm})
        if not reply.get("ok"):
            raise RuntimeError(f"warm-up publish failed: {reply.get('error')}")
        if await wait_until(lambda: state.warmed >= cfg.clients, REPLY_TIMEOUT_S) != "done":
            raise RuntimeError(f"warm-up reached {state.warmed} of {cfg.clients} subscribers")
        kept = [(c.epoch, c.offset) for c in first]
        epochs = {e for e, _ in kept}
        if len(epochs) != 1 or None in epochs:
            raise RuntimeError(f"subscribers saw {len(epochs)} epochs: {sorted(map(str, epochs))}")

        t_gone = perf_counter()
        await _close_cleanly(first)
        await _wait_gone(publisher, cfg.channel)
        gone_s = perf_counter() - t_gone

        # The missed publications: data names the offset each one must get.
        base = int(reply["result"]["offset"]) + 1
        data = [encode_str(make_payload(TAG_MEASURED, base + i, 64)) for i in range(cfg.missed)]
        publisher.start(
            [publish_request(i, cfg.channel, d) for i, d in enumerate(data)], cfg.window
        )
        if await wait_until(lambda: publisher.replies >= cfg.missed, REPLY_TIMEOUT_S) != "done":
            raise RuntimeError(f"{publisher.replies} of {cfg.missed} publish replies came")
        offsets = publisher.offsets
        if publisher.errors or offsets != list(range(base, base + cfg.missed)):
            raise RuntimeError(
                f"publications got offsets {offsets[:3]}…, expected from {base}; "
                f"{publisher.errors} errors, first: {publisher.first_error}"
            )
        assert publisher.client_id is not None
        info = info_bytes(publisher.client_id)
        state.index.update(
            (publication_bytes(cfg.channel, base + i, d, info), base + i)
            for i, d in enumerate(data)
        )

        with measuring(server_cpu) as meter:
            state.start = perf_counter()
            pending = iter(kept)

            def make() -> Recoverer:
                epoch, offset = next(pending)
                assert epoch is not None
                return Recoverer(state, epoch, offset, cfg.missed)

            second = await connect_many(url, make, cfg.clients, concurrency=cfg.clients)
            outcome = await wait_until(
                lambda: state.done >= cfg.clients,
                cfg.timeout_s,
                cfg.idle_timeout_s,
                state.progress,
            )
            usage = meter.stop()
    finally:
        await stop_server()
        await close_all([*first, *second, *([publisher] if publisher else [])])

    t0 = state.start
    done = sorted(t - t0 for t in state.done_at)
    lost = sum(max(0, cfg.missed - c.received) for c in second)
    return RecoveryResult(
        clients=cfg.clients,
        missed=cfg.missed,
        outcome=outcome,
        total_s=done[-1] if len(done) == cfg.clients else None,
        connect_s=max(state.connected_at) - t0 if state.connected_at else None,
        p50_ms=percentile_ms(done, 50),
        p99_ms=percentile_ms(done, 99),
        completed=len(done),
        replies=state.replies,
        recovered_false=state.recovered_false,
        replayed_wrong=state.replayed_wrong,
        lost=lost,
        duplicates=state.duplicates,
        before_reply=state.before_reply,
        errors=state.error_count,
        first_error=state.errors[0] if state.errors else "",
        slow_hits=state.slow_hits,
        gone_s=gone_s,
        usage=usage,
    )
