"""The browser side: the chat page at ``/``, ``/static/roomcast.js``, and guest sign-in.

Guest sign-in lets the page work on the embedded defaults without any account system: a name
gets a short-lived token for ``ROOMCAST_GUEST_CHANNELS`` (``room:*`` while no token or JWT key
is configured; off otherwise, unless set), at most ``ROOMCAST_GUEST_RATE`` per second (bursts
of ``ROOMCAST_GUEST_BURST``) from one client address. See docs/security.md.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.types import Scope

from roomcast.auth import GUEST_NAME, AuthError
from roomcast.core.node import Node
from roomcast.http.bodies import Gate, Refusal, route_path

__all__ = ["STATIC_DIR", "AddressLimiter", "guest_gate", "mount_web"]

#: The guest sign-in route (its gate and its handler).
GUEST_PATH = "/auth/guest"

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


class GuestIn(BaseModel):
    name: str | None = Field(
        None, description="The name to show (1-32 of A-Z a-z 0-9 space _ . -).", examples=["ann"]
    )
    renew: str | None = Field(
        None, description="A guest token about to expire: a fresh one for the same user."
    )


class GuestOut(BaseModel):
    token: str = Field(description="Send it to /ws (subprotocol roomcast.token.<token>).")
    user: str = Field(
        description="The user the token is for: the name, '#' and 16 random hex digits."
    )
    expires_at: int = Field(description="Unix time the token expires.")
    channels: list[str] = Field(description="Channel patterns a guest may use.")


class AddressLimiter:
    """A token bucket per client address: ``rate`` per second, ``burst`` at once.

    At most ``max_addresses`` buckets are kept; past that the least recently used one is
    dropped (it starts full again when its address comes back), so the table stays bounded
    whatever addresses a flood comes from.
    """

    def __init__(self, rate: float, burst: int, max_addresses: int = 10_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_addresses = max_addresses
        #: address -> (tokens left, when counted); in order of last use.
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, address: str, now: float | None = None) -> float:
        """Take one token for ``address``: 0 if it had one, else the seconds until it will."""
        now = time.monotonic() if now is None else now
        tokens, then = self._buckets.pop(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[address] = (tokens, now)
        if len(self._buckets) > self.max_addresses:
            del self._buckets[next(iter(self._buckets))]
        return wait


def guest_gate(node: Node) -> Gate:
    """The checks of ``POST /auth/guest`` that need only the request head: 404 while guest
    sign-in is off, 429 (with ``Retry-After``) over the per-address rate."""
    auth = node.auth
    settings = node.settings
    limiter = AddressLimiter(settings.guest_rate, settings.guest_burst)

    def gate(scope: Scope) -> Refusal | None:
        if scope["method"] != "POST" or route_path(scope) != GUEST_PATH:
            return None
        if not auth.guests_enabled:
            return Refusal(404, "guest sign-in is off (ROOMCAST_GUEST_CHANNELS)")
        if not limiter.rate:
            return None
        client = scope.get("client")
        wait = limiter.take(client[0] if client else "")
        if wait:
            after = max(1, math.ceil(wait))
            return Refusal(
                429,
                f"too many guest sign-ins from this address; retry in {after} s",
                {"Retry-After": str(after)},
            )
        return None

    return gate


def mount_web(app: FastAPI, node: Node) -> None:
    """Add the page, its static files and the guest sign-in route to ``app``."""
    auth = node.auth
    router = APIRouter(tags=["browser"])

    @router.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @router.post(
        GUEST_PATH,
        summary="Sign in as a guest (for the page at /)",
        responses={
            404: {"description": "Guest sign-in is off"},
            413: {"description": "The body is over ROOMCAST_MAX_BODY_SIZE"},
            429: {"description": "Over ROOMCAST_GUEST_RATE sign-ins from this address"},
        },
    )
    async def guest(body: GuestIn) -> GuestOut:
        if not auth.guests_enabled:
            raise HTTPException(404, "guest sign-in is off (ROOMCAST_GUEST_CHANNELS)")
        if body.renew is not None:
            try:
                grant = auth.verify(body.renew)
            except AuthError as error:
                raise HTTPException(401, f"cannot renew: {error}") from None
            if grant.kind != "guest" or grant.user is None:
                raise HTTPException(401, "cannot renew: not a guest token")
            token, grant = auth.issue_guest("", grant.user)
        else:
            name = (body.name or "").strip()
            if GUEST_NAME.fullmatch(name) is None:
                raise HTTPException(422, "name: 1-32 characters of A-Z a-z 0-9 space _ . -")
            token, grant = auth.issue_guest(name)
        assert grant.user is not None
        assert grant.expires_at is not None
        return GuestOut(
            token=token,
            user=grant.user,
            expires_at=int(grant.expires_at),
            channels=list(auth.guest_channels.patterns),
        )

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
