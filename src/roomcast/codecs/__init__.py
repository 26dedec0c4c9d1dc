"""Codecs: each turns publications into one wire format's frames, and knows nothing of sockets.

The channel hub encodes a publication once per codec in use on the channel, and hands the same
bytes to every subscriber of that codec.
"""

from __future__ import annotations

from typing import Protocol

from roomcast.brokers.base import Publication

__all__ = ["Codec"]


class Codec(Protocol):
    """What the hub needs of a wire format."""

    @property
    def name(self) -> str:
        """A short name (logs, metrics)."""
        ...

    @property
    def text(self) -> bool:
        """True if frames are text messages, False for binary ones."""
        ...

    def publication(self, channel: str, publication: Publication) -> bytes:
        """``publication`` of ``channel`` as this format's frame payload."""
        ...

    def event(self, channel: str, kind: str, info: bytes) -> bytes:
        """A ``join`` or ``leave`` on ``channel`` of the client described by ``info``."""
        ...
