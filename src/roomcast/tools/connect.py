"""``roomcast connect``: talk to a WebSocket endpoint from a terminal, a pipe or a file.

Each line of stdin is a frame; what arrives is printed after ``<``. On a terminal, end of input
(Ctrl-D) closes at once; from a pipe or a file the command goes on listening until nothing has
arrived for :data:`QUIET_S` (the answers may be on their way), or for ``--wait`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from dataclasses import dataclass
from typing import NoReturn

import typer
from rich.console import Console
from rich.json import JSON
from rich.text import Text
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol

from roomcast.closecodes import CloseCode
from roomcast.tools.console import (
    EXIT_ABNORMAL_CLOSE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    compact,
    fail,
    stderr,
    stdout,
)

__all__ = ["NORMAL_CLOSE_CODES", "QUIET_S", "Options", "run"]

#: Close codes after which ``connect`` exits 0.
NORMAL_CLOSE_CODES = frozenset({1000, 1001})
#: ``connect`` from a pipe: after end of input, close once nothing arrived for this long.
QUIET_S = 0.5
#: The prefix of a received frame, with its style.
RECEIVED = ("< ", "bold cyan")


@dataclass(frozen=True)
class Options:
    """What ``roomcast connect`` was asked to do (the options are described in roomcast.cli)."""

    url: str
    token: str | None
    subprotocols: list[str]
    binary: bool
    as_json: bool
    #: Seconds to go on listening after end of input; None: the default (module docstring).
    wait: float | None
    #: Seconds for the opening and the closing handshakes.
    timeout: float


def run(options: Options) -> NoReturn:
    """Run ``roomcast connect`` and exit with its code (:mod:`roomcast.tools.console`)."""
    if options.binary and options.as_json:
        fail("--binary and --json do not go together", EXIT_USAGE)
    try:
        code = asyncio.run(_connect(options))
    except KeyboardInterrupt:
        stderr().print("interrupted", style="dim")
        code = EXIT_INTERRUPTED
    raise typer.Exit(code)


def _close_text(code: int | None, reason: str) -> str:
    if code is None:
        return "no close frame (1006: the connection dropped)"
    try:
        name = CloseCode(code).name.lower().replace("_", " ")
    except ValueError:
        name = ""
    text = f"{code}" + (f" ({name})" if name else "")
    return text + (f": {reason}" if reason else "")


def _read_stdin_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes | None]) -> None:
    """Feed the lines of stdin to ``queue`` from a daemon thread; ``None`` marks end of input.

    A thread with ``os.read`` works the same for a terminal, a pipe and a regular file (the
    event loop cannot watch regular files), holds no lock of ``sys.stdin`` (so interpreter
    shutdown never waits for it) and dies with the process.
    """

    def put(item: bytes | None) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False
        return True

    def read() -> None:
        fd = sys.stdin.fileno()
        pending = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                if pending:
                    put(pending)
                put(None)
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not put(line):
                    return

    threading.Thread(target=read, name="roomcast-stdin", daemon=True).start()


def _print_frame(out: Console, message: str | bytes, as_json: bool) -> None:
    if isinstance(message, bytes):
        out.print(Text.assemble(RECEIVED, repr(message)), markup=False)
        return
    if as_json:
        try:
            json.loads(message)
        except ValueError:
            pass
        else:
            out.print(Text.assemble(RECEIVED, JSON(message, indent=2).text), markup=False)
            return
    out.print(Text.assemble(RECEIVED, message), markup=False)


async def _receive(ws: ClientConnection, out: Console, as_json: bool, arrived: list[int]) -> None:
    try:
        async for message in ws:
            arrived[0] += 1
            _print_frame(out, message, as_json)
    except ConnectionClosed:
        pass


async def _linger(
    receiver: asyncio.Task[None],
    arrived: list[int],
    wait: float | None,
    interactive: bool,
    limit_s: float,
) -> None:
    """After end of input, go on listening before closing (the answers may be on their way).

    ``--wait`` given: that many seconds. Otherwise at once on a terminal (Ctrl-D means "close"),
    and from a pipe or a file until nothing has arrived for ``QUIET_S`` (at most ``limit_s``).
    """
    if wait is not None:
        if wait > 0:
            await asyncio.wait({receiver}, timeout=wait)
        return
    if interactive:
        return
    deadline = asyncio.get_running_loop().time() + limit_s
    seen = -1
    while seen != arrived[0] and not receiver.done():
        seen = arrived[0]
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return
        await asyncio.wait({receiver}, timeout=min(QUIET_S, left))


async def _send_lines(
    ws: ClientConnection, out: Console, err: Console, binary: bool, as_json: bool, echo: bool
) -> None:
    """Send every line of stdin until end of input."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    _read_stdin_lines(asyncio.get_running_loop(), queue)
    while (raw := await queue.get()) is not None:
        line = raw.rstrip(b"\r")
        if not line:
            continue
        frame: str | bytes
        if binary:
            frame = line
        else:
            frame = line.decode("utf-8", "replace")
            if as_json:
                try:
                    value = json.loads(frame)
                except ValueError as error:
                    err.print(f"not JSON, not sent ({error}): {frame}", style="red", markup=False)
                    continue
                frame = compact(value)
        await ws.send(frame)
        if echo:
            shown = repr(frame) if isinstance(frame, bytes) else frame
            out.print(Text.assemble(("> ", "bold green"), (shown, "dim")), markup=False)


async def _open(
    url: str, token: str | None, subprotocols: list[str], wait_s: float, err: Console
) -> ClientConnection | None:
    """Open the connection, or say on ``err`` why it could not be opened."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return await ws_connect(
            url,
            additional_headers=headers,
            subprotocols=[Subprotocol(name) for name in subprotocols] or None,
            open_timeout=wait_s,
            close_timeout=wait_s,
            max_size=64 << 20,
        )
    except InvalidStatus as error:
        status = error.response.status_code
        phrase = error.response.reason_phrase
        body = error.response.body.decode("utf-8", "replace").strip() if error.response.body else ""
        problem = f"handshake refused: HTTP {status} {phrase}" + (f": {body}" if body else "")
    except InvalidURI as error:
        problem = str(error)
    except (OSError, TimeoutError, InvalidHandshake) as error:
        problem = f"cannot connect to {url}: {error or type(error).__name__}"
    err.print(f"roomcast: {problem}", style="bold red", markup=False)
    return None


async def _connect(options: Options) -> int:
    out, err = stdout(), stderr()
    url, wait_s = options.url, options.timeout
    ws = await _open(url, options.token, options.subprotocols, wait_s, err)
    if ws is None:
        return EXIT_FAILED

    interactive = sys.stdin.isatty()
    chosen = f" (subprotocol {ws.subprotocol})" if ws.subprotocol else ""
    hint = "; type a line to send it, Ctrl-D to close" if interactive else ""
    err.print(f"connected to {url}{chosen}{hint}", style="dim", markup=False)

    arrived = [0]  # frames received so far (a list: _receive counts into it)
    receiver = asyncio.create_task(_receive(ws, out, options.as_json, arrived))
    sender = asyncio.create_task(
        _send_lines(ws, out, err, options.binary, options.as_json, echo=not interactive)
    )
    we_closed = False
    try:
        await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        if sender.done() and not receiver.done():
            if sender.exception() is None:
                await _linger(receiver, arrived, options.wait, interactive, wait_s)
            if not receiver.done():
                we_closed = True
                await ws.close(1000)
        await asyncio.wait({receiver}, timeout=wait_s)
    finally:
        for task in (sender, receiver):
            task.cancel()
        await asyncio.gather(sender, receiver, return_exceptions=True)
        if ws.state.name != "CLOSED":
            ws.transport.abort()

    received = ws.protocol.close_rcvd
    if we_closed:
        err.print(f"closed: {_close_text(1000, '')}", style="dim", markup=False)
        return EXIT_OK
    code = received.code if received is not None else None
    reason = received.reason if received is not None else ""
    normal = code in NORMAL_CLOSE_CODES
    err.print(
        f"closed by the server: {_close_text(code, reason)}",
        style="dim" if normal else "bold red",
        markup=False,
    )
    return EXIT_OK if normal else EXIT_ABNORMAL_CLOSE
