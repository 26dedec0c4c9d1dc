"""Fixtures for the tests that need a real Redis Cluster (tests/redis_cluster.py).

A test module gets them by importing them: ``from redis_cluster_fixtures import
redis_cluster_fixture, redis_cluster_url_fixture``. ``redis_cluster`` is one cluster per module
(it takes about two seconds to start); ``redis_cluster_url`` gives each test a broker URL with a
key prefix of its own, and ``restored_cluster`` (which it uses) brings back after the test any
node the test killed or paused, so the next test starts from a whole cluster (its masters may be
other nodes than before).
``fresh_redis_or_cluster_fixture`` replaces ``fresh_redis`` (tests/redis_server.py) in a module
whose tests kill "the" Redis: each test runs on its own ``redis-server``, then on the module's
cluster, all of whose nodes it kills (:class:`ClusterAsOneRedis`).

As with a single ``redis-server`` (tests/redis_server.py), a machine without ``redis-server``
and ``redis-cli`` (Redis >= 7) skips these tests, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import ClusterNode

from helpers import HOST, TIMEOUT
from redis_cluster import ClusterUnavailable, LocalCluster, cluster_binaries
from redis_server import RedisServer, unique_prefix

__all__ = [
    "ClusterAsOneRedis",
    "fresh_redis_or_cluster_fixture",
    "redis_cluster_fixture",
    "redis_cluster_url_fixture",
    "require_redis_cluster",
    "restore",
    "restored_cluster_fixture",
]


def require_redis_cluster() -> None:
    """Skip the test without Redis >= 7's binaries (fail it under CI)."""
    try:
        cluster_binaries()
    except ClusterUnavailable as missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs it: {missing}", pytrace=False)
        pytest.skip(str(missing))


@pytest.fixture(scope="module", name="redis_cluster")
def redis_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A 3-master, 3-replica Redis Cluster shared by the tests of a module."""
    require_redis_cluster()
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    with cluster:
        yield cluster


@pytest.fixture(name="restored_cluster")
def restored_cluster_fixture(redis_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The module's cluster, for a test that kills nodes: whole again after the test (killed
    or paused nodes back, replicas synced)."""
    yield redis_cluster
    restore(redis_cluster)


@pytest.fixture(name="redis_cluster_url")
def redis_cluster_url_fixture(restored_cluster: LocalCluster) -> str:
    """``redis+cluster://`` URL with this test's own key prefix (the cluster is whole again
    after the test)."""
    return restored_cluster.url_for(unique_prefix("cl"))


def restore(cluster: LocalCluster) -> None:
    """Resume paused nodes, restart killed ones, wait until the cluster is whole and
    replicated."""
    for port in cluster.living():
        cluster.resume(port)
    cluster.restart_all()


class SnapshotEveryNode(redis.RedisCluster):
    """A cluster client whose SAVE snapshots every node, as SAVE on one Redis saves it all."""

    def save(self, **kwargs: Any) -> Any:
        kwargs.setdefault("target_nodes", redis.RedisCluster.ALL_NODES)
        return super().save(**kwargs)


class ClusterAsOneRedis:
    """A :class:`LocalCluster` standing in for a ``RedisServer`` in the tests that kill "the"
    Redis: its URL is the cluster's; ``kill()`` kills every node (everything held is lost, as
    a Redis without persistence loses it) and ``restart()`` brings them all back, empty but
    for an explicit SAVE; ``client()`` follows the cluster's redirections."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster

    @property
    def url(self) -> str:
        return self.cluster.url

    def url_for(self, prefix: str) -> str:
        return self.cluster.url_for(prefix)

    @property
    def running(self) -> bool:
        return len(self.cluster.living()) == len(self.cluster.ports)

    def client(self) -> redis.RedisCluster:
        return SnapshotEveryNode(
            startup_nodes=[ClusterNode(HOST, port) for port in self.cluster.living()],
            socket_connect_timeout=TIMEOUT,
            socket_timeout=TIMEOUT,
        )

    def kill(self) -> None:
        self.cluster.kill_all()

    def restart(self, timeout: float = 6 * TIMEOUT) -> ClusterAsOneRedis:
        self.cluster.kill_all()
        self.cluster.restart_all(timeout)
        return self

    def stop(self) -> None:
        """Leave the cluster whole for the next test (the module's cluster outlives this)."""
        restore(self.cluster)


@pytest.fixture(name="fresh_redis", params=["redis", "cluster"])
def fresh_redis_or_cluster_fixture(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[RedisServer | ClusterAsOneRedis]:
    """The test's own ``redis-server`` (as ``fresh_redis`` in tests/redis_server.py), then the
    module's Redis Cluster in its place: a test of what happens when "the" Redis dies runs on
    both. Its ``kill()`` kills every node of the cluster."""
    if request.param == "redis":
        server = RedisServer(tmp_path / "redis")
        try:
            yield server.start()
        finally:
            server.stop()
        return
    store = ClusterAsOneRedis(request.getfixturevalue("redis_cluster"))
    try:
        yield store
    finally:
        store.stop()
