"""One connection's session: who it is, what it may do, its outbox and its subscriptions.

A :class:`Session` is the same for every endpoint that receives publications: a member of the
guide's chat (codec :data:`roomcast.codecs.guide.CODEC`, cut with 1013) and a ``/ws`` client
(codec :data:`roomcast.codecs.roomcast_json.CODEC`, cut with 4008). The node
(:class:`roomcast.core.node.Node`) creates it, the hub delivers to its outbox, and the endpoint
ends it with :meth:`roomcast.core.node.Node.detach`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from roomcast.auth import Grant
from roomcast.closecodes import CloseCode
from roomcast.codecs import Codec
from roomcast.connection import Connection
from roomcast.core.outbox import Outbox

if TYPE_CHECKING:
    from roomcast.core.hub import Subscriber
    from roomcast.core.node import Node

__all__ = ["Session"]


class Session:
    """One connection's session on this node."""

    __slots__ = (
        "codec",
        "conn",
        "connected_at",
        "farewell",
        "grant",
        "id",
        "info",
        "node",
        "outbox",
        "publishing",
        "publishing_bytes",
        "slow_code",
        "subscriptions",
        "timers",
        "user",
    )

    def __init__(
        self,
        node: Node,
        conn: Connection,
        codec: Codec,
        grant: Grant,
        outbox: Outbox,
        *,
        info: bytes,
        connected_at: str,
        slow_code: CloseCode,
        farewell: bytes | None = None,
    ) -> None:
        self.node = node
        self.conn = conn
        self.id = str(conn.id)
        self.codec = codec
        #: What the session may do, and until when (its token's, or anonymous access's).
        self.grant = grant
        self.user = grant.user
        self.outbox = outbox
        #: Who it is in publications and presence (encoded), and since when.
        self.info = info
        self.connected_at = connected_at
        #: The close code when it reads too slowly (the guide's chat: 1013; ``/ws``: 4008).
        self.slow_code = slow_code
        #: Published to the channels it leaves, for those who stay (the guide's chat notice).
        self.farewell = farewell
        self.subscriptions: dict[str, Subscriber] = {}
        #: The authentication deadline, or the token's refresh and expiry timers (a list only
        #: once there is one: most sessions never have any).
        self.timers: list[asyncio.TimerHandle] | None = None
        #: Its publications under way, oldest first (see :meth:`Node.pipeline`); created with
        #: the first one.
        self.publishing: deque[asyncio.Task[None]] | None = None
        self.publishing_bytes = 0

    @property
    def active(self) -> bool:
        """False once the session is being closed or is gone."""
        return self.outbox.active

    def add_timer(self, timer: asyncio.TimerHandle) -> None:
        """Keep ``timer``, to be cancelled with the others by :meth:`cancel_timers`."""
        if self.timers is None:
            self.timers = [timer]
        else:
            self.timers.append(timer)

    def cancel_timers(self) -> None:
        """Cancel the deadline and expiry timers."""
        timers = self.timers
        if timers:
            for timer in timers:
                timer.cancel()
            timers.clear()

    def send(self, payload: bytes, *, force: bool = False) -> None:
        """Queue one frame for this session alone; a full outbox cuts it.

        The outbox is bounded in frames and in bytes (``ROOMCAST_OUTBOX_SIZE``,
        ``ROOMCAST_OUTBOX_BYTES``). ``force`` is for the frames of a subscribe reply's replay,
        which the history bounds (``ROOMCAST_HISTORY_SIZE`` publications of at most
        ``ROOMCAST_MAX_PUBLICATION_SIZE``): the outbox may then exceed its bounds by that much,
        once, as the next frame that is not forced meets them.
        """
        outbox = self.outbox
        if not outbox.active:
            return
        conn = self.conn
        conn.sent += 1
        conn.sent_bytes += len(payload)
        if not outbox.send(payload, self.codec.text, force=force):
            self.node.cut(self)
