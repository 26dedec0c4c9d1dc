"""The ``redis+cluster://`` broker on its own, against a real local Redis Cluster."""

from __future__ import annotations

import asyncio

import pytest

from redis_cluster import LocalCluster
from redis_cluster_fixtures import redis_cluster_fixture  # noqa: F401 (a fixture)
from redis_server import unique_prefix
from roomcast.brokers.redis_cluster import RedisClusterBroker, parse_cluster_url

pytestmark = pytest.mark.redis


class Sink:
    def on_publication(self, *args: object) -> None: ...
    def on_event(self, *args: object) -> None: ...
    def on_command(self, *args: object) -> None: ...
    def on_reconnect(self) -> None: ...


def test_cluster_urls() -> None:
    seeds, options, query = parse_cluster_url(
        "rediss+cluster://bob:s%40cret@10.0.0.1:7000,10.0.0.2:7001?prefix=app"
    )
    assert seeds == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert options == {"username": "bob", "password": "s@cret", "ssl": True}
    assert query == {"prefix": "app"}
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_cluster_url("redis+cluster://")


async def test_a_thousand_requests_at_once_all_succeed(redis_cluster: LocalCluster) -> None:
    """A thousand clients subscribing at once (position, presence) on every shard: none fails.
    (redis-py's cluster client failed about 10 % of them past its connections per node.)"""
    broker = RedisClusterBroker(
        redis_cluster.url_for(unique_prefix("burst")),
        history_size=100,
        history_ttl=600,
        presence_ttl=30,
    )
    await broker.start(Sink())
    try:
        assert broker.available
        channels = [f"burst:{i}" for i in range(12)]
        results = await asyncio.gather(
            *(broker.position(channels[i % 12]) for i in range(1000)),
            *(
                broker.presence_add(channels[i % 12], f"c{i:011d}", {"client": f"c{i:011d}"})
                for i in range(1000)
            ),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == [], f"{len(errors)} failed, first: {errors[0]!r}"
        listed = [await broker.presence(ch) for ch in channels]
        assert sum(map(len, listed)) == 1000
        assert broker.available
    finally:
        await broker.close()
