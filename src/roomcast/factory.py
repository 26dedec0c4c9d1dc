"""``create_app(settings)``: build a roomcast ASGI app (``roomcast.app:app`` is one, from env)."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from roomcast.asyncapi import ASYNCAPI_PATH, asyncapi_router
from roomcast.brokers import BrokerUnavailable
from roomcast.core.node import Node
from roomcast.http.api import api_gate, api_router
from roomcast.http.bodies import BodyGuard
from roomcast.http.channels import ChannelRequests, channels_routes
from roomcast.http.guide import guide_routes
from roomcast.http.ops import ops_router
from roomcast.http.web import guest_gate, mount_web
from roomcast.logs import announce_generated_token, install_redaction
from roomcast.metrics import Metrics, metrics_router
from roomcast.settings import Settings
from roomcast.version import __version__

__all__ = ["create_app"]

logger = logging.getLogger("roomcast.app")

#: The collector's thresholds under ``ROOMCAST_TUNE_GC`` (Python's: 700, 10, 10). With a thousand
#: sessions a full collection took 70-180 ms, in the middle of a fan-out: measured on a chat burst
#: (1,000 members, 200 messages) on redis://, 437k deliveries/s with Python's thresholds, 639k
#: with these.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> tuple[int, ...]:
    """Fewer, shorter collector pauses: what exists at start (modules, the app) is never
    scanned again, and the young generation is collected every 20,000 allocations. Returns
    the thresholds before, for :func:`untune_gc`."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return before


def untune_gc(before: tuple[int, ...]) -> None:
    """Undo :func:`tune_gc` (the app stopped; the process may go on)."""
    gc.unfreeze()
    gc.set_threshold(*before)


def create_app(settings: Settings | None = None, *, announce: bool = False) -> FastAPI:
    """Build a roomcast app; mount it in your own FastAPI project or serve it directly.

    ``settings`` defaults to :class:`Settings` read from the environment. ``announce`` logs the
    address from the settings at start (``roomcast serve`` sets it; it knows the address).
    """
    node = Node(settings if settings is not None else Settings())
    install_redaction()
    metrics = Metrics(node) if node.settings.metrics else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        install_redaction()
        cfg = node.settings
        generated = node.auth.tokens.generated
        if generated is not None:
            # Printed once, deliberately: without it nobody could use /ws/secure. It is never
            # stored, and a restart makes a new one.
            announce_generated_token(generated, cfg.log_format)
        if announce:
            base = f"ws://{cfg.host}:{cfg.port}"
            logger.info(
                "roomcast %s listening on %s (broker %s); try: python -m websockets %s/ws/echo",
                __version__,
                base,
                cfg.broker_display,
                base,
            )
        if announce:
            logger.info(
                "/ws channels on; HTTP API %s",
                "on at /api (ROOMCAST_API_KEY set)" if cfg.api_key else "off (no ROOMCAST_API_KEY)",
            )
            if node.auth.guests_enabled:
                logger.info(
                    "chat page: open http://%s:%d/ in a browser (guest sign-in for %s)",
                    cfg.host,
                    cfg.port,
                    ", ".join(cfg.guests),
                )
        await node.start()
        before = tune_gc() if cfg.tune_gc else None
        if metrics is not None:
            metrics.start()
        try:
            yield
        finally:
            if before is not None:
                untune_gc(before)
            await node.stop()
            if metrics is not None:
                await metrics.stop()

    app = FastAPI(
        title="roomcast",
        version=__version__,
        description=f"The WebSocket endpoints: [AsyncAPI 3.0 document]({ASYNCAPI_PATH}).",
        lifespan=lifespan,
    )

    async def broker_unavailable(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=503, headers={"Retry-After": "1"})

    app.add_exception_handler(BrokerUnavailable, broker_unavailable)
    app.state.roomcast = node
    app.router.routes.extend(guide_routes(node))
    app.router.routes.extend(channels_routes(node, ChannelRequests(node)))
    app.include_router(ops_router(node))
    app.include_router(api_router(node))
    if metrics is not None:
        app.include_router(metrics_router(metrics))
    app.include_router(asyncapi_router(node.settings))
    mount_web(app, node)
    # FastAPI reads a body before the route's dependencies run: the API key and the guest
    # sign-in checks go in front of it, and so do the body's size and time bounds.
    cfg = node.settings
    app.add_middleware(
        BodyGuard,
        limit=cfg.body_limit,
        timeout=cfg.body_timeout,
        gates=[api_gate(cfg), guest_gate(node)],
    )
    return app
