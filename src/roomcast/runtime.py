"""What one roomcast app holds at run time: settings, the hub, tokens, live connections."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from roomcast.auth import Authenticator, TokenTable
from roomcast.brokers import Broker, BrokerUnavailable, from_settings
from roomcast.channels import Node
from roomcast.connection import Connection
from roomcast.hub import Hub
from roomcast.settings import Settings

__all__ = ["Runtime"]


@dataclass(eq=False)
class Runtime:
    """The state of one app; endpoints reach it through closures, not globals."""

    settings: Settings
    hub: Hub = field(init=False)
    broker: Broker = field(init=False)
    node: Node = field(init=False)
    auth: Authenticator = field(init=False)
    tokens: TokenTable = field(init=False)
    #: Open WebSocket connections per client IP address and per user, on this node.
    per_ip: dict[str, int] = field(default_factory=dict)
    per_user: dict[str, int] = field(default_factory=dict)
    connections: set[Connection] = field(default_factory=set)
    _relaying: set[asyncio.Task[None]] = field(default_factory=set)
    #: Chat handlers in each room on this node (joining, in, or leaving).
    _room_users: dict[str, int] = field(default_factory=dict)
    #: Log "listening on ..." at start (the CLI knows the real address; an embedder may not).
    announce: bool = False

    def __post_init__(self) -> None:
        self.hub = Hub(
            outbox_size=self.settings.outbox_size,
            close_timeout=self.settings.close_timeout,
            outbox_bytes=self.settings.outbox_bytes,
        )
        self.broker = from_settings(self.settings)
        self.auth = Authenticator(self.settings)
        self.tokens = self.auth.tokens
        self.node = Node(self.settings, self.broker, self.auth)
        self.node.claim_user = self.claim_user
        self.node.release_user = self.release_user
        self.broker.on_room(self._deliver_room)
        if self.broker.shared:
            self.hub.relay = self._relay

    # -- connection limits --------------------------------------------------------------------

    def claim_user(self, user: str) -> bool:
        """Count one more connection of ``user``; ``False`` (and nothing counted) at the limit."""
        held = self.per_user.get(user, 0)
        limit = self.settings.max_connections_per_user
        if limit and held >= limit:
            return False
        self.per_user[user] = held + 1
        return True

    def release_user(self, user: str) -> None:
        """A connection counted by :meth:`claim_user` ended."""
        left = self.per_user.get(user, 0) - 1
        if left > 0:
            self.per_user[user] = left
        else:
            self.per_user.pop(user, None)

    # -- the guide's chat rooms, on every node ------------------------------------------

    async def join_room(self, room: str) -> None:
        """A member is joining ``room`` here: make sure this node hears the room.

        Every call must be paired with one :meth:`left_room`, whatever happens in between.
        """
        self._room_users[room] = self._room_users.get(room, 0) + 1
        await self.broker.join_room(room)

    async def left_room(self, room: str) -> None:
        """A member left ``room`` here: stop hearing it if it was the last one."""
        users = self._room_users.get(room, 0) - 1
        if users > 0:
            self._room_users[room] = users
            return
        self._room_users.pop(room, None)
        with contextlib.suppress(BrokerUnavailable):
            await self.broker.leave_room(room)

    async def chat_publish(self, room: str, text: str) -> None:
        """Send ``text`` to every member of ``room``, on every node.

        While a shared broker is unreachable the room degrades to this node's members
        rather than losing the message or dropping anyone.
        """
        try:
            await self.broker.room_publish(room, text)
        except BrokerUnavailable:
            self.hub.broadcast(room, text)

    def _deliver_room(self, room: str, text: str) -> None:
        self.hub.broadcast(room, text)

    def _relay(self, room: str, text: str) -> None:
        task = asyncio.get_running_loop().create_task(self.chat_publish(room, text))
        self._relaying.add(task)
        task.add_done_callback(self._relaying.discard)
