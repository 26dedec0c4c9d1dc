"""The guide's chat wire format: a chat message is its text, nothing around it.

The guide's chat rooms are channels without history (:mod:`roomcast.http.guide`); what a
member says is published as its UTF-8 text, and this codec hands the same text to every member.
"""

from __future__ import annotations

from typing import Final

from roomcast.brokers.base import Publication

__all__ = ["CODEC", "GuideCodec"]


class GuideCodec:
    """Chat rooms' frames: the publication's data as a text message."""

    __slots__ = ()

    name: Final = "guide"
    text: Final = True

    def publication(self, channel: str, publication: Publication) -> bytes:
        """The message itself (the publisher already wrote ``Client says: ...``)."""
        return publication.data

    def event(self, channel: str, kind: str, info: bytes) -> bytes:
        """Chat rooms have no join/leave events (a leave is a notice, published as text)."""
        raise NotImplementedError("the guide's chat has no join/leave events")


#: The one instance.
CODEC: Final = GuideCodec()
