"""Brokers: where channels live. ``from_settings`` picks one by ``ROOMCAST_BROKER_URL``."""

from __future__ import annotations

from roomcast.brokers.base import (
    Broker,
    BrokerUnavailable,
    HistoryPage,
    Position,
    Publication,
    Sink,
)
from roomcast.brokers.memory import MemoryBroker
from roomcast.errors import ConfigurationError
from roomcast.settings import Settings

__all__ = [
    "Broker",
    "BrokerUnavailable",
    "HistoryPage",
    "MemoryBroker",
    "Position",
    "Publication",
    "Sink",
    "from_settings",
]


def from_settings(settings: Settings) -> Broker:
    """The broker ``settings.broker_url`` names."""
    if settings.broker_scheme == "memory":
        return MemoryBroker(
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            history_channels=settings.history_channels,
            history_bytes=settings.history_bytes,
            history_total_bytes=settings.history_total_bytes,
        )
    if settings.broker_scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        from roomcast.brokers.redis import RedisBroker

        kind = RedisBroker
        if settings.broker_scheme.endswith("+cluster"):
            from roomcast.brokers.redis_cluster import RedisClusterBroker

            kind = RedisClusterBroker
        return kind(
            settings.broker_url,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
            presence_ttl=settings.presence_ttl,
            history_bytes=settings.history_bytes,
            meta_ttl=settings.history_meta_ttl,
        )
    raise ConfigurationError(f"unsupported broker {settings.broker_url!r}")
