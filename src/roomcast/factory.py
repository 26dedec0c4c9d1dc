"""``create_app(settings)``: build a roomcast ASGI app (``roomcast.app:app`` is one, from env)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from roomcast import __version__
from roomcast.asyncapi import ASYNCAPI_PATH, asyncapi_router
from roomcast.brokers import BrokerUnavailable
from roomcast.logs import announce_generated_token, install_redaction
from roomcast.metrics import Metrics, metrics_router
from roomcast.routes.api import api_gate, api_router
from roomcast.routes.bodies import BodyGuard
from roomcast.routes.classic import classic_routes
from roomcast.routes.ops import ops_router
from roomcast.routes.realtime import realtime_routes
from roomcast.routes.web import guest_gate, mount_web
from roomcast.runtime import Runtime
from roomcast.settings import Settings

__all__ = ["create_app"]

logger = logging.getLogger("roomcast.app")


def create_app(settings: Settings | None = None, *, announce: bool = False) -> FastAPI:
    """Build a roomcast app; mount it in your own FastAPI project or serve it directly.

    ``settings`` defaults to :class:`Settings` read from the environment. ``announce`` logs the
    address from the settings at start (``roomcast serve`` sets it; it knows the address).
    """
    runtime = Runtime(settings if settings is not None else Settings(), announce=announce)
    install_redaction()
    metrics = Metrics(runtime) if runtime.settings.metrics else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        install_redaction()
        cfg = runtime.settings
        if runtime.tokens.generated is not None:
            # Printed once, deliberately: without it nobody could use /ws/secure. It is never
            # stored, and a restart makes a new one.
            announce_generated_token(runtime.tokens.generated, cfg.log_format)
        if runtime.announce:
            base = f"ws://{cfg.host}:{cfg.port}"
            logger.info(
                "roomcast %s listening on %s (broker %s); try: python -m websockets %s/ws/echo",
                __version__,
                base,
                cfg.broker_display,
                base,
            )
        if runtime.announce:
            logger.info(
                "/ws channels on; HTTP API %s",
                "on at /api (ROOMCAST_API_KEY set)" if cfg.api_key else "off (no ROOMCAST_API_KEY)",
            )
            if runtime.auth.guests_enabled:
                logger.info(
                    "chat page: open http://%s:%d/ in a browser (guest sign-in for %s)",
                    cfg.host,
                    cfg.port,
                    ", ".join(cfg.guests),
                )
        await runtime.node.start()
        if metrics is not None:
            metrics.start()
        try:
            yield
        finally:
            await runtime.hub.stop()
            await runtime.node.stop()
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
    app.state.roomcast = runtime
    app.router.routes.extend(classic_routes(runtime))
    app.router.routes.extend(realtime_routes(runtime))
    app.include_router(ops_router(runtime))
    app.include_router(api_router(runtime))
    if metrics is not None:
        app.include_router(metrics_router(metrics))
    app.include_router(asyncapi_router(runtime.settings))
    mount_web(app, runtime)
    # FastAPI reads a body before the route's dependencies run: the API key and the guest
    # sign-in checks go in front of it, and so do the body's size and time bounds.
    cfg = runtime.settings
    app.add_middleware(
        BodyGuard,
        limit=cfg.body_limit,
        timeout=cfg.body_timeout,
        gates=[api_gate(cfg), guest_gate(runtime)],
    )
    return app
