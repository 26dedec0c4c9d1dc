"""What one roomcast app holds at run time: settings, the hub, tokens, live connections."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from dataclasses import dataclass, field

from roomcast.brokers import Broker, BrokerUnavailable, from_settings
from roomcast.channels import Node
from roomcast.connection import Connection
from roomcast.hub import Hub
from roomcast.settings import Settings

__all__ = ["Runtime", "TokenTable"]

#: The user a generated token stands for; the guide's name for its one user.
GENERATED_TOKEN_USER = "authenticated_user"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """Static tokens for ``/ws/secure``, looked up by digest.

    Keying the table by SHA-256 of the token means a lookup's timing depends on the digest,
    never on how many leading characters of a real token a guess got right.
    """

    __slots__ = ("_users", "generated")

    def __init__(self, tokens: dict[str, str]) -> None:
        #: The token made up at start when none was configured (printed once, never stored).
        self.generated: str | None = None
        if not tokens:
            self.generated = secrets.token_urlsafe(24)
            tokens = {self.generated: GENERATED_TOKEN_USER}
        self._users = {_digest(token): user for token, user in tokens.items()}

    def user(self, token: str | None) -> str | None:
        """The user ``token`` belongs to, or ``None``."""
        if not token:
            return None
        return self._users.get(_digest(token))


@dataclass(eq=False)
class Runtime:
    """The state of one app; endpoints reach it through closures, not globals."""

    settings: Settings
    hub: Hub = field(init=False)
    broker: Broker = field(init=False)
    node: Node = field(init=False)
    tokens: TokenTable = field(init=False)
    connections: set[Connection] = field(default_factory=set)
    _relaying: set[asyncio.Task[None]] = field(default_factory=set)
    #: Chat handlers in each room on this node (joining, in, or leaving).
    _room_users: dict[str, int] = field(default_factory=dict)
    #: Log "listening on ..." at start (the CLI knows the real address; an embedder may not).
    announce: bool = False

    def __post_init__(self) -> None:
        self.hub = Hub(
            outbox_size=self.settings.outbox_size, close_timeout=self.settings.close_timeout
        )
        self.broker = from_settings(self.settings)
        self.node = Node(self.settings, self.broker)
        self.broker.on_room(self._deliver_room)
        if self.broker.shared:
            self.hub.relay = self._relay
        self.tokens = TokenTable(self.settings.tokens)

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
