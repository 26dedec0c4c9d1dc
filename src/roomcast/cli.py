"""The ``roomcast`` command: a thin layer over :class:`~roomcast.settings.Settings`.

Every flag has an environment variable (``ROOMCAST_<NAME>``); a flag given on the command line
wins over the environment, which wins over the default.
"""

from __future__ import annotations

import asyncio
import math
import signal
import sys
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from roomcast.cli_tools import register as register_tools
from roomcast.errors import ConfigurationError
from roomcast.settings import LogFormat, LogLevel, Settings, WsImplementation

__all__ = ["cli", "main"]

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

    from roomcast.factory import create_app
    from roomcast.logs import logging_config
    from roomcast.transport import protocol_class
    from roomcast.transport.http import http_protocol_class

    ws: str | type[asyncio.Protocol] = settings.ws
    if settings.ws == "roomcast":
        ws = protocol_class(close_timeout=settings.close_timeout)
    config = uvicorn.Config(
        create_app(settings, announce=True),
        host=settings.host,
        port=settings.port,
        http=http_protocol_class(settings.handshake_timeout),
        ws=ws,
        ws_max_size=settings.max_message_size,
        ws_ping_interval=settings.ping_interval or None,
        ws_ping_timeout=settings.ping_timeout,
        # uvicorn takes whole seconds here.
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout),
        log_level=settings.log_level,
        log_config=logging_config(settings.log_level, settings.log_format),
        access_log=settings.access_log,
        server_header=False,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down, to let the previous
    # handler run; with Python's defaults that turns a clean drain into "killed by SIGTERM"
    # (exit 143) or a KeyboardInterrupt traceback. A drained shutdown is a success: exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    server.run()
    if not server.started:
        sys.exit(1)


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
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        http="roomcast.workers:HttpProtocol",
        ws="roomcast.workers:WebSocketProtocol" if settings.ws == "roomcast" else settings.ws,
        ws_max_size=settings.max_message_size,
        ws_ping_interval=settings.ping_interval or None,
        ws_ping_timeout=settings.ping_timeout,
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout),
        log_level=settings.log_level,
        log_config=log_config,
        access_log=settings.access_log,
        server_header=False,
    )


def _exit_cleanly(signum: int, frame: object) -> None:
    sys.exit(0)


# connect, publish, presence, history, bench (docs/cli.md).
register_tools(cli)


def main() -> None:
    """Entry point of the ``roomcast`` console script and ``python -m roomcast``."""
    cli()
