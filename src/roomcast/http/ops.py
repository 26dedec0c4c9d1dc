"""Operational HTTP endpoints: liveness and live counters."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response

from roomcast.core.node import Node

__all__ = ["ops_router"]


def ops_router(node: Node) -> APIRouter:
    """``GET /health`` and ``GET /stats`` for ``node``."""
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", summary="Liveness: the process answers")
    @router.get("/health", summary="Liveness (the same as /healthz)")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="Readiness: the broker is reachable and we accept clients")
    async def readyz(response: Response) -> dict[str, str]:
        if not node.broker.available:
            response.status_code = 503
            return {"status": "unavailable", "broker": "unreachable"}
        return {"status": "ok", "broker": "ok"}

    @router.get("/stats", summary="Live counters of connections, rooms and tasks")
    async def stats() -> dict[str, int]:
        return {**node.stats(), "asyncio_tasks": len(asyncio.all_tasks())}

    return router
