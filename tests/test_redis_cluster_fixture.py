"""The local Redis Cluster the cluster tests run on (tests/redis_cluster.py) does what they
rely on: it comes up whole in a few seconds, with three masters of one replica each, knows
which master serves a key, and fails a killed master over to its replica without losing what
was replicated."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import HOST
from redis_cluster import SLOTS, LocalCluster
from redis_cluster_fixtures import (
    redis_cluster_fixture,  # noqa: F401 (a fixture)
    redis_cluster_url_fixture,  # noqa: F401 (a fixture)
    require_redis_cluster,
    restore,
    restored_cluster_fixture,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.redis


def test_a_cluster_comes_up_whole_in_a_few_seconds(tmp_path: Path) -> None:
    require_redis_cluster()
    started = time.monotonic()
    with LocalCluster(tmp_path) as cluster:
        took = time.monotonic() - started
        assert took < 10, f"the cluster took {took:.1f}s to start"
        assert len(cluster.ports) == 6
        assert len(set(cluster.ports)) == 6
        buses = {node.bus_port for node in cluster.nodes.values()}
        assert len(buses) == 6
        assert not buses & set(cluster.ports)
        for port in cluster.ports:
            info = cluster.cluster_info(port)
            assert info["cluster_state"] == "ok", info
            assert info["cluster_known_nodes"] == "6", info
            assert info["cluster_size"] == "3", info
    assert not cluster.living()


def test_three_masters_of_one_replica_each_serve_every_slot(redis_cluster: LocalCluster) -> None:
    masters = redis_cluster.masters()
    assert len(masters) == 3
    replicas = [redis_cluster.replicas_of(port) for port in masters]
    assert all(len(r) == 1 for r in replicas), replicas
    assert sorted(masters + [r[0] for r in replicas]) == sorted(redis_cluster.ports)
    seeds = redis_cluster.url.removeprefix("redis+cluster://").split(",")
    # Two seeds, masters of different shards (as created; failovers come later).
    assert len(seeds) == 2
    assert set(seeds) <= {f"{HOST}:{port}" for port in masters}
    assert redis_cluster.url_for("p").endswith("?prefix=p")
    # The hash tag decides the slot: every key of one tag is on one master.
    assert redis_cluster.slot("a:{room}:h") == redis_cluster.slot("{room}")
    owners = {redis_cluster.master_of(f"{{k{i}}}") for i in range(30)}
    assert owners == set(masters)
    assert redis_cluster.slot("{k0}") in range(SLOTS)


def test_a_killed_master_is_failed_over_and_comes_back_a_replica(
    redis_cluster: LocalCluster, redis_cluster_url: str
) -> None:
    key = "fixture:{failover}"
    with redis_cluster.cluster_client() as conn:
        conn.set(key, "kept")
    redis_cluster.wait_replicated()
    dead = redis_cluster.master_of(key)
    (replica,) = redis_cluster.replicas_of(dead)
    started = time.monotonic()
    redis_cluster.kill(dead)
    assert dead not in redis_cluster.living()
    heir = redis_cluster.wait_failover(dead)
    took = time.monotonic() - started
    assert heir == replica
    assert took < 10, f"the failover took {took:.1f}s"
    assert redis_cluster.master_of(key) == heir
    assert len(redis_cluster.masters()) == 3
    assert dead not in redis_cluster.masters()
    with redis_cluster.client(heir) as conn:
        assert conn.get(key) == "kept"

    redis_cluster.restart(dead)
    assert redis_cluster.replicas_of(heir) == [dead]
    redis_cluster.wait_whole(replicated=True)
    with redis_cluster.client(dead) as conn:
        assert conn.execute_command("READONLY")
        assert conn.get(key) == "kept"


def test_a_test_that_leaves_a_node_dead_gets_it_back(redis_cluster: LocalCluster) -> None:
    """What ``redis_cluster_url`` does after a test: restart the dead, wait until whole."""
    victim = redis_cluster.masters()[2]
    redis_cluster.kill(victim)
    redis_cluster.wait_failover(victim)
    restore(redis_cluster)
    assert sorted(redis_cluster.living()) == sorted(redis_cluster.ports)
    assert len(redis_cluster.masters()) == 3
