"""The ``roomcast`` command: a thin layer over :class:`~roomcast.settings.Settings`.

Every flag has an environment variable (``ROOMCAST_<NAME>``); a flag given on the command line
wins over the environment, which wins over the default.

The commands for people (``connect``, ``publish``, ``presence``, ``history``, ``bench``;
docs/cli.md) are declared here and run in :mod:`roomcast.tools`, which each command imports when
it runs: ``roomcast serve`` never loads the client, httpx, Rich or the load generator
(tests/test_imports.py).
"""

from __future__ import annotations

import asyncio
import math
import signal
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from roomcast.errors import ConfigurationError
from roomcast.settings import LogFormat, LogLevel, Settings, WsImplementation

if TYPE_CHECKING:
    import uvicorn

__all__ = ["cli", "main", "run", "uvicorn_config"]

cli = typer.Typer(
    name="roomcast",
    help="roomcast: a real-time WebSocket server for Python, on FastAPI and uvicorn.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _opt(env: str, help_: str) -> Any:
    return typer.Option(envvar=f"ROOMCAST_{env}", help=help_, show_envvar=True)


@cli.callback()
def _root() -> None:
    """roomcast: a real-time WebSocket server for Python, on FastAPI and uvicorn."""


@cli.command()
def serve(
    host: Annotated[str | None, _opt("HOST", "Interface to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, _opt("PORT", "TCP port (default 8000).")] = None,
    workers: Annotated[
        int | None, _opt("WORKERS", "Worker processes; above 1 needs a shared broker (default 1).")
    ] = None,
    broker: Annotated[
        str | None, _opt("BROKER_URL", "Where rooms live (default memory://).")
    ] = None,
    max_message_size: Annotated[
        int | None, _opt("MAX_MESSAGE_SIZE", "Largest client message in bytes (default 1 MiB).")
    ] = None,
    outbox_size: Annotated[
        int | None,
        _opt("OUTBOX_SIZE", "Frames queued per connection before it is cut (default 1024)."),
    ] = None,
    history_size: Annotated[
        int | None, _opt("HISTORY_SIZE", "/ws: publications kept per channel (default 256).")
    ] = None,
    history_ttl: Annotated[
        float | None, _opt("HISTORY_TTL", "/ws: seconds a publication is kept (default 3600).")
    ] = None,
    max_subscriptions: Annotated[
        int | None,
        _opt("MAX_SUBSCRIPTIONS", "/ws: subscriptions per connection (default 128)."),
    ] = None,
    api_key: Annotated[
        str | None, _opt("API_KEY", "Turns the HTTP API (/api) on; clients send it as Bearer.")
    ] = None,
    ping_interval: Annotated[
        float | None, _opt("PING_INTERVAL", "Seconds between pings, 0 = off (default 20).")
    ] = None,
    ping_timeout: Annotated[
        float | None, _opt("PING_TIMEOUT", "Seconds to wait for a pong (default 20).")
    ] = None,
    drain_timeout: Annotated[
        float | None,
        _opt("DRAIN_TIMEOUT", "Seconds handlers get after SIGTERM/SIGINT (default 5)."),
    ] = None,
    ws: Annotated[
        WsImplementation | None,
        _opt("WS", "roomcast (own, fast fan-out) | websockets-sansio | websockets | wsproto."),
    ] = None,
    handshake_timeout: Annotated[
        float | None, _opt("HANDSHAKE_TIMEOUT", "Seconds a request head may take (default 10).")
    ] = None,
    close_timeout: Annotated[
        float | None, _opt("CLOSE_TIMEOUT", "Seconds a peer gets to answer a close (default 5).")
    ] = None,
    log_level: Annotated[
        LogLevel | None, _opt("LOG_LEVEL", "critical|error|warning|info|debug|trace.")
    ] = None,
    access_log: Annotated[
        bool | None, _opt("ACCESS_LOG", "Log each request and handshake (default on).")
    ] = None,
    log_format: Annotated[
        LogFormat | None, _opt("LOG_FORMAT", "text (for people) | json (one object per line).")
    ] = None,
) -> None:
    """Start the server (tokens for /ws/secure: ROOMCAST_TOKENS='{"token": "user"}')."""
    given = {
        "host": host,
        "port": port,
        "workers": workers,
        "broker_url": broker,
        "max_message_size": max_message_size,
        "outbox_size": outbox_size,
        "history_size": history_size,
        "history_ttl": history_ttl,
        "max_subscriptions": max_subscriptions,
        "api_key": api_key,
        "ping_interval": ping_interval,
        "ping_timeout": ping_timeout,
        "drain_timeout": drain_timeout,
        "ws": ws,
        "handshake_timeout": handshake_timeout,
        "close_timeout": close_timeout,
        "log_level": log_level,
        "access_log": access_log,
        "log_format": log_format,
    }
    try:
        settings = Settings.model_validate(
            {key: value for key, value in given.items() if value is not None}
        )
    except ConfigurationError as error:
        typer.echo(f"roomcast: {error}", err=True)
        raise typer.Exit(2) from None
    except ValidationError as error:
        for problem in error.errors():
            where = ".".join(str(part) for part in problem["loc"]) or "settings"
            typer.echo(f"roomcast: {where}: {problem['msg']}", err=True)
        raise typer.Exit(2) from None
    run(settings)


def run(settings: Settings) -> None:
    """Serve ``settings`` with uvicorn until SIGTERM/SIGINT, then exit 0 after draining."""
    import uvicorn

    if settings.workers > 1:
        _run_workers(settings)
        return
    config = uvicorn_config(settings)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down, to let the previous
    # handler run; with Python's defaults that turns a clean drain into "killed by SIGTERM"
    # (exit 143) or a KeyboardInterrupt traceback. A drained shutdown is a success: exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    server.run()
    if not server.started:
        sys.exit(1)


def uvicorn_config(settings: Settings, **overrides: Any) -> uvicorn.Config:
    """``roomcast serve``'s uvicorn configuration for ``settings``, in one process.

    ``overrides`` replace uvicorn.Config arguments: ``app`` (by default
    ``create_app(settings, announce=True)``), ``port``, ``log_config``...
    """
    import uvicorn

    from roomcast.factory import create_app
    from roomcast.logs import logging_config
    from roomcast.transport import protocol_class
    from roomcast.transport.http import http_protocol_class

    ws: str | type[asyncio.Protocol] = settings.ws
    if settings.ws == "roomcast":
        ws = protocol_class(close_timeout=settings.close_timeout)
    options = _uvicorn_options(settings, logging_config(settings.log_level, settings.log_format))
    options.update(http=http_protocol_class(settings.handshake_timeout), ws=ws)
    options.update(overrides)
    app = options.pop("app") if "app" in options else create_app(settings, announce=True)
    return uvicorn.Config(app, **options)


def _uvicorn_options(settings: Settings, log_config: dict[str, Any]) -> dict[str, Any]:
    """The uvicorn options of one worker and of several alike (all but the protocols)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "ws_max_size": settings.max_message_size,
        "ws_ping_interval": settings.ping_interval or None,
        "ws_ping_timeout": settings.ping_timeout,
        # uvicorn takes whole seconds here.
        "timeout_graceful_shutdown": math.ceil(settings.drain_timeout),
        "log_level": settings.log_level,
        "log_config": log_config,
        "access_log": settings.access_log,
        "server_header": False,
    }


def _run_workers(settings: Settings) -> None:
    """Several worker processes on one socket (uvicorn's supervisor); they share the broker."""
    import logging
    import logging.config

    import uvicorn

    from roomcast.auth import GENERATED_TOKEN_USER
    from roomcast.logs import announce_generated_token, logging_config
    from roomcast.workers import export_settings

    generated = export_settings(settings, GENERATED_TOKEN_USER)
    log_config = logging_config(settings.log_level, settings.log_format)
    logging.config.dictConfig(log_config)
    logger = logging.getLogger("roomcast.app")
    if generated is not None:
        announce_generated_token(generated, settings.log_format)
    logger.info(
        "roomcast listening on ws://%s:%d with %d workers (broker %s)",
        settings.host,
        settings.port,
        settings.workers,
        settings.broker_display,
    )
    uvicorn.run(
        "roomcast.app:app",
        workers=settings.workers,
        http="roomcast.workers:HttpProtocol",
        ws="roomcast.workers:WebSocketProtocol" if settings.ws == "roomcast" else settings.ws,
        **_uvicorn_options(settings, log_config),
    )


def _exit_cleanly(signum: int, frame: object) -> None:
    sys.exit(0)


# -- connect (roomcast.tools.connect) -------------------------------------------------------


@cli.command("connect")
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
    from roomcast.tools import connect

    connect.run(connect.Options(url, token, subprotocol or [], binary, as_json, wait, timeout))


# -- the HTTP API (roomcast.tools.api) ---------------------------------------------------------

ChannelArgument = Annotated[str, typer.Argument(help="Channel, e.g. chat:lobby.")]
UrlOption = Annotated[
    str, typer.Option("--url", help="The server's HTTP address.", show_default=True)
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(help="The server's ROOMCAST_API_KEY.", envvar="ROOMCAST_API_KEY"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")]
TimeoutOption = Annotated[float, typer.Option(help="Seconds to wait for the answer.")]
DEFAULT_API_URL = "http://127.0.0.1:8000"


@cli.command("publish")
def publish_command(
    channel: ChannelArgument,
    data: Annotated[
        str, typer.Argument(help="JSON data; text that is not JSON is sent as a JSON string.")
    ],
    url: UrlOption = DEFAULT_API_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Publish DATA to CHANNEL through the HTTP API (POST /api/publish)."""
    from roomcast.tools import api

    api.publish(api.Api(url, api_key, timeout), channel, data, as_json)


@cli.command("presence")
def presence_command(
    channel: ChannelArgument,
    url: UrlOption = DEFAULT_API_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Who is subscribed to CHANNEL (GET /api/presence/CHANNEL)."""
    from roomcast.tools import api

    api.presence(api.Api(url, api_key, timeout), channel, as_json)


@cli.command("history")
def history_command(
    channel: ChannelArgument,
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
    from roomcast.tools import api

    api.history(api.Api(url, api_key, timeout), channel, limit, since, before, as_json)


# -- bench (roomcast.tools.bench) --------------------------------------------------------------

bench_cli = typer.Typer(
    name="bench",
    help="Load generators for your own server: echo round trips, /ws fan-out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
cli.add_typer(bench_cli, name="bench")

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


@bench_cli.command("echo")
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
    from roomcast.tools import bench

    scenario = bench.EchoBench(
        url=url,
        connections=connections,
        duration=duration,
        size=size,
        rate=rate,
        token=token,
        timeout=timeout,
    )
    bench.run(scenario, histogram, as_json)


@bench_cli.command("fanout")
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
    from roomcast.tools import bench

    scenario = bench.FanoutBench(
        url=url,
        subscribers=subscribers,
        messages=messages,
        channel=channel,
        window=window,
        rate=rate,
        token=token,
        timeout=timeout,
    )
    bench.run(scenario, histogram, as_json)


def main() -> None:
    """Entry point of the ``roomcast`` console script and ``python -m roomcast``."""
    cli()
