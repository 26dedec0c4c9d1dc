"""The ``roomcast`` commands for people: connect, publish, presence, history, bench.

:func:`register` adds them to the Typer app of :mod:`roomcast.cli`. Heavy imports (the
``websockets`` client, httpx, the load generator) happen inside the commands, so ``roomcast serve``
starts no slower for them. docs/cli.md describes every command.

Exit codes: 0 success (and a normal close of ``connect``), 1 failure (refused handshake,
unreachable server, HTTP error of the API, failed benchmark), 2 bad usage, 3 ``connect`` ended by
the server with a close code other than 1000/1001, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    import httpx
    from rich.console import Console
    from websockets.asyncio.client import ClientConnection

__all__ = ["register"]

#: Exit codes (see the module docstring).
EXIT_OK, EXIT_FAILED, EXIT_ABNORMAL_CLOSE, EXIT_INTERRUPTED = 0, 1, 3, 130
DEFAULT_API_URL = "http://127.0.0.1:8000"
#: Close codes after which ``connect`` exits 0.
NORMAL_CLOSE_CODES = frozenset({1000, 1001})
#: ``connect`` from a pipe: after end of input, close once nothing arrived for this long.
QUIET_S = 0.5
#: The prefix of a received frame, with its style.
RECEIVED = ("< ", "bold cyan")


def _stdout() -> Console:
    from rich.console import Console

    # soft_wrap: received frames are printed as they are, never folded at the console width.
    return Console(soft_wrap=True, highlight=False)


def _stderr() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    _stderr().print(f"roomcast: {message}", style="bold red", markup=False)
    raise typer.Exit(code)


def _close_text(code: int | None, reason: str) -> str:
    from roomcast.closecodes import CloseCode

    if code is None:
        return "no close frame (1006: the connection dropped)"
    try:
        name = CloseCode(code).name.lower().replace("_", " ")
    except ValueError:
        name = ""
    text = f"{code}" + (f" ({name})" if name else "")
    return text + (f": {reason}" if reason else "")


# -- connect --------------------------------------------------------------------------------


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

    def run() -> None:
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

    threading.Thread(target=run, name="roomcast-stdin", daemon=True).start()


def _print_frame(out: Console, message: str | bytes, as_json: bool) -> None:
    from rich.json import JSON
    from rich.text import Text

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
    from websockets.exceptions import ConnectionClosed

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
    from rich.text import Text

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
                frame = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        await ws.send(frame)
        if echo:
            shown = repr(frame) if isinstance(frame, bytes) else frame
            out.print(Text.assemble(("> ", "bold green"), (shown, "dim")), markup=False)


async def _connect(
    url: str,
    token: str | None,
    subprotocols: list[str],
    binary: bool,
    as_json: bool,
    wait: float | None,
    wait_s: float,
) -> int:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
    from websockets.typing import Subprotocol

    out, err = _stdout(), _stderr()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        ws = await connect(
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
        err.print(
            f"roomcast: handshake refused: HTTP {status} {phrase}" + (f": {body}" if body else ""),
            style="bold red",
            markup=False,
        )
        return EXIT_FAILED
    except InvalidURI as error:
        err.print(f"roomcast: {error}", style="bold red", markup=False)
        return EXIT_FAILED
    except (OSError, TimeoutError, InvalidHandshake) as error:
        err.print(
            f"roomcast: cannot connect to {url}: {error or type(error).__name__}",
            style="bold red",
            markup=False,
        )
        return EXIT_FAILED

    interactive = sys.stdin.isatty()
    chosen = f" (subprotocol {ws.subprotocol})" if ws.subprotocol else ""
    hint = "; type a line to send it, Ctrl-D to close" if interactive else ""
    err.print(f"connected to {url}{chosen}{hint}", style="dim", markup=False)

    arrived = [0]  # frames received so far (a list: _receive counts into it)
    receiver = asyncio.create_task(_receive(ws, out, as_json, arrived))
    sender = asyncio.create_task(_send_lines(ws, out, err, binary, as_json, echo=not interactive))
    we_closed = False
    try:
        await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        if sender.done() and not receiver.done():
            if sender.exception() is None:
                await _linger(receiver, arrived, wait, interactive, wait_s)
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


def connect_command(
    url: Annotated[str, typer.Argument(help="WebSocket URL, e.g. ws://127.0.0.1:8000/ws/echo.")],
    token: Annotated[
        str | None,
        typer.Option(help="Sent as 'Authorization: Bearer TOKEN'.", envvar="ROOMCAST_TOKEN"),
    ] = None,
    subprotocol: Annotated[
        list[str] | None, typer.Option(metavar="NAME", help="Offer this subprotocol (repeatable).")
    ] = None,
    binary: Annotated[bool, typer.Option("--binary", help="Send each line as bytes.")] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Lines must be JSON (sent compact); show received JSON pretty-printed."
        ),
    ] = False,
    wait: Annotated[
        float | None,
        typer.Option(
            help="At end of input, listen this many seconds before closing "
            "(default: at once on a terminal; from a pipe, until 0.5 s pass with nothing new).",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds for the opening and the closing handshakes.")
    ] = 10.0,
) -> None:
    """Talk to a WebSocket endpoint: each line of stdin is a frame; '<' marks what arrives."""
    if binary and as_json:
        _fail("--binary and --json do not go together", 2)
    try:
        code = asyncio.run(_connect(url, token, subprotocol or [], binary, as_json, wait, timeout))
    except KeyboardInterrupt:
        _stderr().print("interrupted", style="dim")
        code = EXIT_INTERRUPTED
    raise typer.Exit(code)


# -- the HTTP API ----------------------------------------------------------------------------

UrlOption = Annotated[
    str, typer.Option("--url", help="The server's HTTP address.", show_default=True)
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(help="The server's ROOMCAST_API_KEY.", envvar="ROOMCAST_API_KEY"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")]
TimeoutOption = Annotated[float, typer.Option(help="Seconds to wait for the answer.")]


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return response.text.strip()[:200]
    if isinstance(detail, list):  # FastAPI's validation errors
        parts = []
        for problem in detail:
            where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body")
            parts.append(f"{where}: {problem.get('msg')}" if where else str(problem.get("msg")))
        return "; ".join(parts)
    return str(detail) if detail is not None else ""


def _api(
    method: str, url: str, path: str, api_key: str | None, timeout: float, **kwargs: Any
) -> Any:
    """Call the API; on any failure print a clear message and exit 1."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    target = url.rstrip("/") + path
    try:
        response = httpx.request(method, target, headers=headers, timeout=timeout, **kwargs)
    except httpx.InvalidURL as error:
        _fail(f"bad --url {url!r}: {error}")
    except httpx.HTTPError as error:
        _fail(f"cannot reach {url}: {error or type(error).__name__}")
    status = response.status_code
    if status == 200:
        try:
            return response.json()
        except ValueError:
            _fail(f"{target} answered 200 but not with JSON: is this a roomcast server?")
    detail = _detail(response)
    if status == 401:
        given = "was refused" if api_key else "is required"
        _fail(f"HTTP 401: an API key {given}: give --api-key or set ROOMCAST_API_KEY")
    if status == 404:
        if "API is off" in detail:
            _fail("HTTP 404: the HTTP API is off on this server (start it with ROOMCAST_API_KEY)")
        _fail(f"HTTP 404: {target} not found: is {url} a roomcast server?")
    if status == 422:
        _fail(f"HTTP 422: the server refused the request: {detail}")
    if status == 503:
        _fail(f"HTTP 503: the server's broker is unavailable right now; retry later ({detail})")
    _fail(f"HTTP {status}: {detail or response.reason_phrase}")


def _print_json(value: Any) -> None:
    _stdout().print_json(json.dumps(value))


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def publish_command(
    channel: Annotated[str, typer.Argument(help="Channel, e.g. chat:lobby.")],
    data: Annotated[
        str, typer.Argument(help="JSON data; text that is not JSON is sent as a JSON string.")
    ],
    url: UrlOption = DEFAULT_API_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Publish DATA to CHANNEL through the HTTP API (POST /api/publish)."""
    try:
        value: Any = json.loads(data)
    except ValueError:
        value = data
    result = _api(
        "POST", url, "/api/publish", api_key, timeout, json={"channel": channel, "data": value}
    )
    if as_json:
        _print_json(result)
        return
    _stdout().print(
        f"published to {channel}: offset {result.get('offset')} (epoch {result.get('epoch')})",
        markup=False,
    )


def presence_command(
    channel: Annotated[str, typer.Argument(help="Channel, e.g. chat:lobby.")],
    url: UrlOption = DEFAULT_API_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Who is subscribed to CHANNEL (GET /api/presence/CHANNEL)."""
    from urllib.parse import quote

    from rich.table import Table

    result = _api("GET", url, f"/api/presence/{quote(channel, safe='')}", api_key, timeout)
    if as_json:
        _print_json(result)
        return
    clients = result.get("clients", [])
    out = _stdout()
    if not clients:
        out.print(f"nobody is subscribed to {channel}", markup=False)
        return
    table = Table(title=f"presence on {channel}: {len(clients)} client(s)")
    table.add_column("client", style="cyan")
    table.add_column("user")
    table.add_column("connected at")
    for client in clients:
        user = client.get("user")
        table.add_row(
            str(client.get("client")),
            "(anonymous)" if user is None else str(user),
            str(client.get("connected_at")),
        )
    out.print(table)


def history_command(
    channel: Annotated[str, typer.Argument(help="Channel, e.g. chat:lobby.")],
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Most publications shown.")] = 100,
    since: Annotated[
        int | None, typer.Option(min=0, help="Only offsets > SINCE (oldest first).")
    ] = None,
    before: Annotated[
        int | None, typer.Option(min=0, help="Only offsets < BEFORE (the newest of them).")
    ] = None,
    url: UrlOption = DEFAULT_API_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Stored publications of CHANNEL (GET /api/history/CHANNEL)."""
    from urllib.parse import quote

    from rich.table import Table

    if since is not None and before is not None:
        _fail("give --since or --before, not both", 2)
    params: dict[str, int] = {"limit": limit}
    if since is not None:
        params["since"] = since
    if before is not None:
        params["before"] = before
    result = _api(
        "GET", url, f"/api/history/{quote(channel, safe='')}", api_key, timeout, params=params
    )
    if as_json:
        _print_json(result)
        return
    publications = result.get("publications", [])
    where = (
        f"epoch {result.get('epoch')}, latest offset {result.get('offset')}, "
        f"oldest kept {result.get('start')}"
    )
    out = _stdout()
    if not publications:
        out.print(f"no publications in {channel} ({where})", markup=False)
        return
    table = Table(title=f"history of {channel}", caption=where)
    table.add_column("offset", justify="right", style="cyan")
    table.add_column("client")
    table.add_column("user")
    table.add_column("data", overflow="fold")
    for publication in publications:
        info = publication.get("info") or {}
        client, user = info.get("client"), info.get("user")
        table.add_row(
            str(publication.get("offset")),
            "(HTTP API)" if client is None else str(client),
            str(user) if user is not None else ("" if client is None else "(anonymous)"),
            _compact(publication.get("data")),
        )
    out.print(table)


# -- bench -----------------------------------------------------------------------------------

bench_app = typer.Typer(
    name="bench",
    help="Load generators for your own server: echo round trips, /ws fan-out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

TokenOption = Annotated[
    str | None,
    typer.Option(help="Sent as 'Authorization: Bearer TOKEN'.", envvar="ROOMCAST_TOKEN"),
]
HistogramOption = Annotated[
    str | None,
    typer.Option(help="Write a latency histogram to this PNG file (needs matplotlib)."),
]
BenchJsonOption = Annotated[
    bool, typer.Option("--json", help="Print the results as JSON instead of a table.")
]
BenchTimeoutOption = Annotated[
    float,
    typer.Option(help="Seconds any single wait (handshake, reply, delivery) may take."),
]


def _run_bench(kind: str, run: Any, histogram: str | None, as_json: bool) -> None:
    from roomcast import bench

    err = _stderr()
    try:
        result = asyncio.run(bench.with_progress(run, err))
    except KeyboardInterrupt:
        err.print("interrupted", style="dim")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except bench.BenchError as error:
        _fail(str(error))
    if as_json:
        _print_json(result.summary())
    else:
        _stdout().print(bench.results_table(result))
    if histogram:
        problem = bench.write_histogram(result, histogram)
        if problem:
            err.print(f"roomcast: {problem}", style="yellow", markup=False)
        else:
            err.print(f"latency histogram written to {histogram}", style="dim", markup=False)
    if not result.ok:
        raise typer.Exit(EXIT_FAILED)


@bench_app.command("echo")
def bench_echo_command(
    url: Annotated[str, typer.Argument(help="Echo endpoint, e.g. ws://127.0.0.1:8000/ws/echo.")],
    connections: Annotated[int, typer.Option(min=1, help="Concurrent connections.")] = 64,
    duration: Annotated[float, typer.Option(min=0.1, help="Seconds of load.")] = 5.0,
    size: Annotated[int, typer.Option(min=1, help="Bytes per message.")] = 64,
    rate: Annotated[
        float, typer.Option(min=0, help="Messages per second per connection; 0 = unlimited.")
    ] = 0.0,
    token: TokenOption = None,
    timeout: BenchTimeoutOption = 10.0,
    histogram: HistogramOption = None,
    as_json: BenchJsonOption = False,
) -> None:
    """Round trips: every connection sends a message and waits for the answer, in a loop."""
    from roomcast import bench

    run = bench.EchoBench(
        url=url,
        connections=connections,
        duration=duration,
        size=size,
        rate=rate,
        token=token,
        timeout=timeout,
    )
    _run_bench("echo", run, histogram, as_json)


@bench_app.command("fanout")
def bench_fanout_command(
    url: Annotated[str, typer.Argument(help="The /ws endpoint, e.g. ws://127.0.0.1:8000/ws.")],
    subscribers: Annotated[int, typer.Option(min=1, help="Subscribers on the channel.")] = 200,
    messages: Annotated[int, typer.Option(min=1, help="Publications to send.")] = 100,
    channel: Annotated[str | None, typer.Option(help="Channel (default: bench:<random>).")] = None,
    window: Annotated[
        int, typer.Option(min=1, help="Most publish requests left unanswered at once.")
    ] = 64,
    rate: Annotated[
        float, typer.Option(min=0, help="Publications per second; 0 = as fast as possible.")
    ] = 0.0,
    token: TokenOption = None,
    timeout: BenchTimeoutOption = 10.0,
    histogram: HistogramOption = None,
    as_json: BenchJsonOption = False,
) -> None:
    """Fan-out over /ws: SUBSCRIBERS on one channel, one publisher, latency publish→receipt."""
    from roomcast import bench

    run = bench.FanoutBench(
        url=url,
        subscribers=subscribers,
        messages=messages,
        channel=channel,
        window=window,
        rate=rate,
        token=token,
        timeout=timeout,
    )
    _run_bench("fanout", run, histogram, as_json)


def register(app: typer.Typer) -> None:
    """Add the commands of this module to ``app`` (the ``roomcast`` command)."""
    app.command("connect")(connect_command)
    app.command("publish")(publish_command)
    app.command("presence")(presence_command)
    app.command("history")(history_command)
    app.add_typer(bench_app, name="bench")
