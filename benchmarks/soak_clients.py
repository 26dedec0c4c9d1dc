"""The soak test's clients: ``/ws`` subscribers (some of them slow readers), chat members,
``/ws`` publishers and the HTTP API publisher (see soak.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterable
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from servers import HOST
from soak_state import (
    ABORT_SHARE,
    API_CONCURRENCY,
    API_KEY,
    CHAT_LEAVE,
    CHAT_LIFETIME_S,
    CHAT_SAYS,
    CHAT_SEND_EVERY_S,
    HISTORY_SIZE,
    MAX_INFLIGHT,
    PUBLISHER_DRAIN_S,
    RECONNECT_DELAY_S,
    REQUEST_TIMEOUT_S,
    RETRY_DELAY_S,
    SLOW_MSS,
    SLOW_PAUSE_S,
    SLOW_RCVBUF,
    SLOW_READ_S,
    SLOW_RESUME_S,
    SUB_LIFETIME_S,
    TOKEN,
    Retry,
    Soak,
    Track,
)


class Visitor:
    """A client that comes and goes until the end: a session, a pause, another session..."""

    soak: Soak
    node: int

    async def run(self, hard_end: float) -> None:
        soak = self.soak
        while soak.loop.time() < hard_end:
            await self.session()
            await asyncio.sleep(soak.rng.uniform(*RECONNECT_DELAY_S))

    async def session(self) -> None:
        """Connect, do what this kind of client does, leave (or be closed)."""
        raise NotImplementedError

    async def connect(self, path: str, *, slow: bool = False) -> ClientConnection | None:
        """Open ``path`` on this client's node; None (counted, after a pause) if it fails."""
        soak = self.soak
        try:
            ws = await open_ws(soak.ws_url(self.node, path), slow=slow)
        except (OSError, TimeoutError, InvalidHandshake) as error:
            soak.counts[f"connect failed ({type(error).__name__})"] += 1
            await asyncio.sleep(RETRY_DELAY_S)
            return None
        soak.counts["connects"] += 1
        return ws


class Subscriber(Visitor):
    """A ``/ws`` client of a few channels that comes and goes (or, ``slow``, stops reading)."""

    def __init__(self, soak: Soak, index: int, node: int, channels: list[str], slow: bool) -> None:
        self.soak = soak
        self.node = node
        self.slow = slow
        self.name = f"{'slow' if slow else 'sub'}{index}"
        self.tracks = {channel: Track(channel) for channel in channels}
        self.requests: dict[int, tuple[Track, tuple[str, int] | None]] = {}
        self.next_id = 0
        self.last_close = "none"
        self.connected = False
        #: A slow reader not reading on purpose.
        self.paused = False

    async def session(self) -> None:
        soak = self.soak
        ws = await self.connect("/ws", slow=self.slow)
        if ws is None:
            return
        self.connected = True
        self.paused = False
        self.requests.clear()
        try:
            await self.subscribe_all(ws)
            if self.slow:
                await self.slow_session(ws)
            else:
                await self.read(ws, self.life_end(SUB_LIFETIME_S))
                if soak.rng.random() < ABORT_SHARE:
                    ws.transport.abort()
                    soak.counts["dropped by the client (no close)"] += 1
                    self.last_close = f"dropped by the client at {soak.now():.1f} s"
                else:
                    await ws.close()
                    soak.counts["closed by the client"] += 1
                    self.last_close = f"closed by the client at {soak.now():.1f} s"
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd is not None else 1006
            soak.closed_by_server(code)
            if code == 4008 and not self.paused:
                soak.counts["4008 while reading"] += 1
            self.last_close = f"{code} at {soak.now():.1f} s"
        except Retry:
            ws.transport.abort()
            await asyncio.sleep(RETRY_DELAY_S)
        finally:
            self.connected = False
            for track in self.tracks.values():
                track.state = "idle"
            ws.transport.abort()

    async def slow_session(self, ws: ClientConnection) -> None:
        soak = self.soak
        await self.read(ws, self.life_end(SLOW_READ_S))
        if not soak.loading:
            await self.read(ws, None)
            return
        chosen = soak.rng.uniform(*SLOW_PAUSE_S)
        pause = min(chosen, soak.stop_at - soak.loop.time())
        soak.counts["slow reader pauses"] += 1
        self.paused = True
        try:
            await asyncio.sleep(max(0.0, pause))  # not reading: the server's buffers fill up
            await self.read(ws, soak.loop.time() + SLOW_RESUME_S)
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd is not None else 1006
            soak.counts[f"slow reader pauses ended by {code}"] += 1
            raise
        self.paused = False
        if pause < chosen:
            soak.counts["slow reader pauses cut short by the end"] += 1
        else:
            soak.counts["slow reader pauses not cut"] += 1
        await ws.close()
        self.last_close = f"closed by the client at {soak.now():.1f} s"

    def life_end(self, span: tuple[float, float]) -> float | None:
        """When to leave: a random lifetime, or never (None) once the load has stopped."""
        soak = self.soak
        end = soak.loop.time() + soak.rng.uniform(*span)
        return end if end < soak.stop_at else None

    async def subscribe_all(self, ws: ClientConnection) -> None:
        for track in self.tracks.values():
            self.next_id += 1
            request: dict[str, Any] = {"id": self.next_id, "op": "subscribe"}
            request["channel"] = track.channel
            recover = None
            if track.epoch is not None:
                recover = (track.epoch, track.offset)
                request["recover"] = {"epoch": track.epoch, "offset": track.offset}
            self.requests[self.next_id] = (track, recover)
            track.state = "waiting"
            await ws.send(orjson.dumps(request).decode())

    async def read(self, ws: ClientConnection, until: float | None) -> None:
        """Handle frames until ``until`` (loop time; None: until the connection ends)."""
        handle = self.handle
        if until is None:
            while True:
                handle(await ws.recv())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(until):
                while True:
                    handle(await ws.recv())

    def handle(self, raw: str | bytes) -> None:
        message = orjson.loads(raw)
        kind = message.get("type")
        if kind == "publication":
            self.on_publication(message)
        elif kind is None and "id" in message:
            self.on_reply(message)

    def on_reply(self, message: dict[str, Any]) -> None:
        soak = self.soak
        entry = self.requests.pop(message["id"], None)
        if entry is None:
            soak.anomaly("reply to no request", self.name, repr(message)[:200])
            return
        track, recover = entry
        if not message.get("ok"):
            code = message.get("error", {}).get("code")
            soak.counts[f"subscribe refused ({code})"] += 1
            raise Retry
        result = message["result"]
        epoch, top = result["epoch"], result["offset"]
        where = f"{self.name} on node {self.node + 1}, {track.channel}"
        if recover is None:
            base, context = top, "a plain subscribe"
        else:
            old_epoch, old_offset = recover
            replayed = result.get("replayed")
            if result.get("recovered"):
                soak.counts["recovered: true"] += 1
                base, context = old_offset, f"recovered: true (replayed {replayed})"
                if epoch != old_epoch or replayed != top - old_offset:
                    soak.anomaly(
                        "wrong recovered: true reply",
                        where,
                        f"recover from epoch {old_epoch} offset {old_offset}; reply {result}",
                    )
                    base = top
            else:
                soak.counts["recovered: false"] += 1
                if epoch != old_epoch:
                    soak.counts["recovered: false, new epoch"] += 1
                    base = max(0, top - HISTORY_SIZE)
                    context = f"recovered: false, new epoch (replayed {replayed})"
                elif old_offset <= top:
                    # The same stream: the history holds its last HISTORY_SIZE publications.
                    base = max(old_offset, top - HISTORY_SIZE)
                    context = f"recovered: false, same epoch (replayed {replayed})"
                else:
                    soak.anomaly(
                        "recover offset beyond the stream",
                        where,
                        f"recover from offset {old_offset} of epoch {epoch}, whose offset is {top}",
                    )
                    base, context = top, "recovered: false, offset beyond the stream"
        soak.counts["replayed"] += result.get("replayed") or 0
        track.epoch, track.offset, track.state = epoch, base, "live"
        track.context, track.reply_t, track.first = context, soak.now(), True

    def on_publication(self, message: dict[str, Any]) -> None:
        soak = self.soak
        channel = message.get("channel")
        track = self.tracks.get(channel) if isinstance(channel, str) else None
        if track is None or track.state != "live" or track.epoch is None:
            soak.anomaly(
                "publication outside a subscription",
                f"{self.name} {channel}",
                f"offset {message.get('offset')} while {track.state if track else 'unknown'}",
            )
            return
        offset = message["offset"]
        data = message.get("data")
        pid = data.get("p") if isinstance(data, dict) else None
        expected = track.offset + 1
        if offset != expected:
            if offset > expected:
                soak.gap(self, track, expected, offset)
            else:
                soak.anomaly(
                    "duplicate or out of order",
                    f"{self.name} on node {self.node + 1}, {track.channel}",
                    f"epoch {track.epoch}: offset {offset} after {track.offset}",
                    f"after {track.context}",
                    group=f"{track.channel}, epoch {track.epoch}, offset {offset}",
                    node=self.node,
                )
                return
        track.offset = offset
        track.first = False
        if not isinstance(pid, str):
            soak.anomaly("unexpected data", f"{self.name} {channel}", repr(data)[:200])
            return
        soak.delivered(self.name, track.channel, track.epoch, offset, pid)


class ChatMember(Visitor):
    """A ``/ws/chat/{room}`` member that talks now and then, and comes and goes."""

    def __init__(self, soak: Soak, index: int, node: int, room: str) -> None:
        self.soak = soak
        self.name = f"c{index}"
        self.node = node
        self.room = room
        self.seq = 0

    async def session(self) -> None:
        soak = self.soak
        ws = await self.connect(f"/ws/chat/{self.room}")
        if ws is None:
            return
        soak.counts["chat connects"] += 1
        end = soak.loop.time() + soak.rng.uniform(*CHAT_LIFETIME_S)
        talker = asyncio.create_task(self.talk(ws, min(end, soak.stop_at)))
        heard: dict[str, int] = {}
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(end if end < soak.stop_at else None):
                    while True:
                        self.hear(await ws.recv(), heard)
            await ws.close()
        except ConnectionClosed as closed:
            soak.closed_by_server(closed.rcvd.code if closed.rcvd is not None else 1006)
        finally:
            talker.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await talker
            ws.transport.abort()

    async def talk(self, ws: ClientConnection, until: float) -> None:
        soak = self.soak
        while True:
            await asyncio.sleep(soak.rng.uniform(*CHAT_SEND_EVERY_S))
            if soak.loop.time() >= until:
                return
            self.seq += 1
            await ws.send(f"{self.name}-{self.seq}")
            soak.counts["chat messages sent"] += 1

    def hear(self, raw: str | bytes, heard: dict[str, int]) -> None:
        soak = self.soak
        text = raw if isinstance(raw, str) else raw.decode()
        if text.startswith(CHAT_SAYS):
            sender, _, number = text[len(CHAT_SAYS) :].rpartition("-")
            seq = int(number)
            if seq <= heard.get(sender, 0):
                soak.anomaly("chat out of order", f"{self.name} in {self.room}", text)
            heard[sender] = seq
            soak.counts["chat deliveries"] += 1
        elif text == CHAT_LEAVE:
            soak.counts["chat leave notices"] += 1
        else:
            soak.anomaly("unexpected chat message", f"{self.name} in {self.room}", text[:200])


async def open_ws(url: str, *, slow: bool = False) -> ClientConnection:
    """Connect (loopback, never through a proxy); a slow reader gets small socket buffers."""
    sock = None
    if slow:
        # As benchmarks/staller.py: with a 1 KiB MSS and a 4 KiB receive buffer the server's
        # send buffer for this connection stays small, so not reading fills its outbox soon.
        port = int(url.split(":")[2].split("/")[0])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, SLOW_MSS)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
        except BaseException:
            sock.close()
            raise
    return await ws_connect(
        url,
        sock=sock,
        proxy=None,
        compression=None,
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        open_timeout=REQUEST_TIMEOUT_S,
        ping_interval=None,
        close_timeout=2,
        max_queue=4 if slow else 64,
    )


class WsPublisher:
    """Publishes through ``/ws`` at a steady rate, replies read as they come (pipelined)."""

    def __init__(
        self,
        soak: Soak,
        name: str,
        node: int,
        rate: float,
        channels: list[str],
        pad: int = 0,
    ) -> None:
        self.soak = soak
        self.name = name
        self.node = node
        self.interval = 1.0 / rate
        self.channels = channels
        self.pad = "x" * pad
        self.seq = 0
        self.inflight: dict[int, tuple[str, str]] = {}
        #: Set when no publish request is left unanswered.
        self.answered = asyncio.Event()

    async def run(self) -> None:
        soak = self.soak
        while soak.loading:
            try:
                ws = await open_ws(soak.ws_url(self.node, "/ws"))
            except (OSError, TimeoutError, InvalidHandshake) as error:
                soak.counts[f"connect failed ({type(error).__name__})"] += 1
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            soak.counts["connects"] += 1
            reader = asyncio.create_task(self.replies(ws))
            try:
                await self.publish_loop(ws, reader)
                # The load is over: wait (bounded) for the replies still due.
                if self.inflight:
                    self.answered.clear()
                    waiter = asyncio.ensure_future(self.answered.wait())
                    await asyncio.wait(
                        [reader, waiter],
                        timeout=PUBLISHER_DRAIN_S,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    waiter.cancel()
            except ConnectionClosed:
                pass
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await reader
                soak.counts["publish outcome unknown (/ws connection ended)"] += len(self.inflight)
                self.inflight.clear()
                await close_quietly(ws)

    async def publish_loop(self, ws: ClientConnection, reader: asyncio.Task[None]) -> None:
        soak = self.soak
        loop = soak.loop
        names = self.channels
        next_at = loop.time()
        while soak.loading and not reader.done():
            next_at += self.interval
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1:
                next_at = loop.time()  # fell behind: catch up at the set rate, not in a burst
            if len(self.inflight) >= MAX_INFLIGHT:
                soak.counts["publish skipped (too many unanswered)"] += 1
                continue
            self.seq += 1
            pid = f"{self.name}-{self.seq}"
            channel = soak.rng.choice(names)
            self.inflight[self.seq] = (pid, channel)
            data: dict[str, str] = {"p": pid, "pad": self.pad} if self.pad else {"p": pid}
            request = {"id": self.seq, "op": "publish", "channel": channel, "data": data}
            soak.counts["publish sent (/ws)"] += 1
            await ws.send(orjson.dumps(request).decode())

    async def replies(self, ws: ClientConnection) -> None:
        soak = self.soak
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = orjson.loads(await ws.recv())
                entry = self.inflight.pop(message.get("id"), None)
                if entry is None:
                    continue  # the connected push
                pid, channel = entry
                if not self.inflight:
                    self.answered.set()
                if message.get("ok"):
                    result = message["result"]
                    soak.ack(pid, channel, result["epoch"], result["offset"], "/ws")
                else:
                    code = message.get("error", {}).get("code")
                    soak.counts[f"publish refused (/ws, {code})"] += 1


async def api_publisher(soak: Soak, rate: float) -> None:
    """Publishes through ``POST /api/publish``, alternating between the nodes."""
    assert soak.http is not None
    http = soak.http
    loop = soak.loop
    names = soak.cfg.channel_names
    interval = 1.0 / rate
    running: set[asyncio.Task[None]] = set()
    seq = 0

    async def post(node: int, channel: str, pid: str) -> None:
        try:
            response = await http.post(
                soak.http_url(node, "/api/publish"),
                json={"channel": channel, "data": {"p": pid}},
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
        except httpx.HTTPError as error:
            soak.counts[f"publish failed (/api, {type(error).__name__})"] += 1
            return
        if response.status_code == 200:
            body = response.json()
            soak.ack(pid, channel, body["epoch"], body["offset"], "/api")
        else:
            soak.counts[f"publish refused (/api, HTTP {response.status_code})"] += 1

    next_at = loop.time()
    try:
        while soak.loading:
            next_at += interval
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1:
                next_at = loop.time()
            if len(running) >= API_CONCURRENCY:
                soak.counts["publish skipped (too many unanswered)"] += 1
                continue
            seq += 1
            soak.counts["publish sent (/api)"] += 1
            node = seq % len(soak.nodes)
            task = loop.create_task(post(node, soak.rng.choice(names), f"a-{seq}"))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.wait(running, timeout=REQUEST_TIMEOUT_S + 1)
    finally:
        await stop_tasks(running)


async def close_quietly(ws: ClientConnection) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(3):
            await ws.close()
    ws.transport.abort()


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them (10 s at most)."""
    tasks = [task for task in tasks if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=10)
