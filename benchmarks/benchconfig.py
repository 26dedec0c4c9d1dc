"""The benchmark's configuration, shared by run.py and describe.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SCENARIOS = (
    "ceiling",
    "echo",
    "chat",
    "channel",
    "recovery",
    "cluster",
    "scale",
    "connect",
    "memory",
    "deflate",
)
#: The servers that have the /ws channel protocol (the channel and recovery scenarios).
WS_ROLES = ("roomcast", "roomcast-asgi")
#: The configurations of the cluster scenario (the columns of its table): N nodes on Redis,
#: one node on memory://, one node on Redis; each takes the same load.
CLUSTER_KINDS = ("cluster", "single-memory", "single-redis")
#: The roomcast configurations of the scale scenario (rows of its tables): one node on
#: memory://, on redis://, on redis+cluster://, and N nodes on redis://.
SCALE_CONFIGS = ("memory", "redis", "redis-cluster", "nodes")
#: The other servers in the scale scenario's chat rows (chat only: they have no /ws).
SCALE_PEERS = ("baseline", "node", "socketify")


@dataclass
class Config:
    """What to run and how big."""

    only: tuple[str, ...]
    servers: tuple[str, ...]
    repeats: int
    duration: float
    echo_rounds: int
    warmup: float
    echo_conns: int
    members: int
    messages: int
    fill_messages: int
    idle_counts: tuple[int, ...]
    connect_clients: int
    connect_duration: float
    connect_limit: int
    settle: float
    drain_timeout: float
    idle_timeout: float
    roomcast_as_baseline: bool
    output: Path | None
    wait_quiet: bool
    quick: bool = False
    publish_window: int = 256
    missed: int = 100
    channel_pairs: int = 5
    cluster_nodes: int = 3
    cluster_subscribers: int = 300  # per node
    cluster_rounds: int = 3
    scale_paced_messages: int = 2000
    scale_interval_ms: float = 1.0
    scale_rounds: int = 3
    cluster_masters: int = 3  # the scale scenario's Redis Cluster
    cluster_replicas: int = 1  # per master
