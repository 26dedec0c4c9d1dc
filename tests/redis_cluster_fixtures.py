"""Fixtures for the tests that need a real Redis Cluster (tests/redis_cluster.py).

A test module gets them by importing them: ``from redis_cluster_fixtures import
redis_cluster_fixture, redis_cluster_url_fixture``. ``redis_cluster`` is one cluster per module
(it takes about two seconds to start); ``redis_cluster_url`` gives each test a broker URL with a
key prefix of its own, and after the test brings back any node the test killed, so the next
test starts from a whole cluster (its masters may be other nodes than before).

As with a single ``redis-server`` (tests/redis_server.py), a machine without ``redis-server``
and ``redis-cli`` (Redis >= 7) skips these tests, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from redis_cluster import ClusterUnavailable, LocalCluster, cluster_binaries
from redis_server import unique_prefix

__all__ = [
    "redis_cluster_fixture",
    "redis_cluster_url_fixture",
    "require_redis_cluster",
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


@pytest.fixture(name="redis_cluster_url")
def redis_cluster_url_fixture(redis_cluster: LocalCluster) -> Iterator[str]:
    """``redis+cluster://`` URL with this test's own key prefix; the cluster is whole again
    after the test (killed nodes restarted, replicas synced)."""
    yield redis_cluster.url_for(unique_prefix("cl"))
    restore(redis_cluster)


def restore(cluster: LocalCluster) -> None:
    """Restart every killed node and wait until the cluster is whole and replicated."""
    for port in cluster.ports:
        if not cluster.nodes[port].running:
            cluster.restart(port)
    cluster.wait_whole(replicated=True)
