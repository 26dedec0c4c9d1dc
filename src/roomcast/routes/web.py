"""The browser side: the chat page at ``/``, ``/static/roomcast.js``, and guest sign-in.

Guest sign-in lets the page work on the embedded defaults without any account system: a name
gets a short-lived token for ``ROOMCAST_GUEST_CHANNELS`` (``room:*`` while no token or JWT key
is configured; off otherwise, unless set). See docs/security.md.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from roomcast.auth import GUEST_NAME, AuthError
from roomcast.runtime import Runtime

__all__ = ["STATIC_DIR", "mount_web"]

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
    user: str = Field(description="The user the token is for: the name plus #xxxx.")
    expires_at: int = Field(description="Unix time the token expires.")
    channels: list[str] = Field(description="Channel patterns a guest may use.")


def mount_web(app: FastAPI, runtime: Runtime) -> None:
    """Add the page, its static files and the guest sign-in route to ``app``."""
    auth = runtime.auth
    router = APIRouter(tags=["browser"])

    @router.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @router.post(
        "/auth/guest",
        summary="Sign in as a guest (for the page at /)",
        responses={404: {"description": "Guest sign-in is off"}},
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
