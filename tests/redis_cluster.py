"""A real local Redis Cluster (3 masters, 3 replicas) for the tests and the benchmarks.

:class:`LocalCluster` starts ``redis-server --cluster-enabled yes`` processes on free loopback
ports (client and cluster-bus ports both chosen, never ``port + 10000`` by chance), joins them
with ``redis-cli --cluster create`` and waits until every node agrees the cluster is whole.
It can kill a node (SIGKILL), wait for its replica to take its slots over, and bring it back
(it rejoins as a replica). Nodes keep nothing on disk (``--save '' --appendonly no``, replicas
load their sync from the socket): a node that comes back is empty until it syncs.

The node timeout is short (1 s by default) so that a failover takes a few seconds, not the
15 s of Redis' default. Every wait is bounded; a failure says what it waited for and shows the
tail of each node's log.

This module does not import pytest: benchmarks/run.py uses it with ``tests/`` on
``sys.path``. Without ``redis-server`` or ``redis-cli`` (or with a Redis older than 7, which
has no sharded pub/sub) :meth:`LocalCluster.start` raises :class:`ClusterUnavailable`; the
fixtures (tests/redis_cluster_fixtures.py) turn that into a skip, or a failure under CI.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import redis

from helpers import HOST, TIMEOUT, free_port, spawn

__all__ = [
    "SLOTS",
    "ClusterError",
    "ClusterUnavailable",
    "LocalCluster",
    "cluster_binaries",
]

#: Hash slots in a Redis Cluster.
SLOTS = 16384

#: Sharded pub/sub (SSUBSCRIBE, SPUBLISH) came with Redis 7.0.
MIN_VERSION = (7, 0)


class ClusterUnavailable(RuntimeError):
    """This machine cannot run a local Redis Cluster (a binary missing, or too old)."""


class ClusterError(RuntimeError):
    """The cluster did not do what it was asked within its time (the message has the logs)."""


def cluster_binaries() -> tuple[str, str]:
    """The paths of ``redis-server`` and ``redis-cli`` (Redis >= 7), or ClusterUnavailable."""
    server = shutil.which("redis-server")
    cli = shutil.which("redis-cli")
    missing = [name for name, path in (("redis-server", server), ("redis-cli", cli)) if not path]
    if missing or server is None or cli is None:
        raise ClusterUnavailable(
            f"{' and '.join(missing)} not found on PATH: install Redis >= 7 (Debian: "
            "redis-server, which brings redis-tools) to run the Redis Cluster tests"
        )
    out = subprocess.run(
        [server, "--version"], capture_output=True, text=True, timeout=TIMEOUT, check=False
    ).stdout
    found = re.search(r"v=(\d+)\.(\d+)", out)
    if found is None or (int(found[1]), int(found[2])) < MIN_VERSION:
        raise ClusterUnavailable(
            f"{server} is too old for sharded pub/sub (Redis >= 7 needed): {out.strip()!r}"
        )
    return server, cli


@dataclass
class ClusterNode:
    """One ``redis-server`` of the cluster: its ports, directory and process."""

    port: int
    bus_port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


@dataclass
class NodeView:
    """One line of ``CLUSTER NODES``: what a node thinks of one member."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str
    connected: bool
    slots: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        """Marked as failing (``fail``) or suspected (``fail?``) by the node asked."""
        return bool(self.flags & {"fail", "fail?"})


def parse_cluster_nodes(text: str) -> list[NodeView]:
    """``CLUSTER NODES`` output, one :class:`NodeView` per member."""
    views = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        node_id, addr, flags, master_id = parts[:4]
        slots = []
        for item in parts[8:]:
            if item.startswith("["):
                continue  # a slot being imported or migrated
            first, _, last = item.partition("-")
            slots.append((int(first), int(last or first)))
        views.append(
            NodeView(
                node_id=node_id,
                port=int(addr.split("@")[0].rsplit(":", 1)[1]),
                flags=frozenset(flags.split(",")),
                master_id=master_id,
                connected=parts[7] == "connected",
                slots=slots,
            )
        )
    return views


def _info(text: str) -> dict[str, str]:
    """``CLUSTER INFO`` / ``INFO`` output as a dict."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: value.strip() for key, value in pairs}


class LocalCluster:
    """A Redis Cluster of ``masters * (1 + replicas)`` local nodes, for tests and benchmarks.

    ``with LocalCluster(workdir) as cluster: ...`` or ``start()`` / ``stop()``. Give brokers
    :attr:`url` (``redis+cluster://`` with two seeds on different shards), or
    :meth:`url_for` with a key prefix of their own.
    """

    live: ClassVar[list[LocalCluster]] = []

    def __init__(
        self,
        workdir: Path,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.workdir = Path(workdir)
        self.master_count = masters
        self.replica_count = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: dict[int, ClusterNode] = {}
        #: The slots each killed master served when it died (for wait_failover).
        self._orphans: dict[int, list[tuple[int, int]]] = {}
        self._seeds: list[int] = []
        self._server = ""
        self._cli = ""

    # -- addresses ---------------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        """Every node's client port, in the order they were created (masters first)."""
        return list(self.nodes)

    @property
    def url(self) -> str:
        """``redis+cluster://`` with two seed nodes; the broker discovers the rest."""
        seeds = ",".join(f"{HOST}:{port}" for port in self._seeds)
        return f"redis+cluster://{seeds}"

    def url_for(self, prefix: str) -> str:
        """:attr:`url` with its own key prefix (tests sharing this cluster stay apart)."""
        return f"{self.url}?prefix={prefix}"

    def client(self, port: int) -> redis.Redis:
        """A plain synchronous client of one node (no redirections followed)."""
        return redis.Redis(
            host=HOST,
            port=port,
            socket_connect_timeout=TIMEOUT,
            socket_timeout=TIMEOUT,
            decode_responses=True,
        )

    def cluster_client(self) -> redis.RedisCluster:
        """A redis-py cluster client (follows redirections), for looking at or meddling
        with keys."""
        return redis.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(HOST, p) for p in self.living()],
            socket_connect_timeout=TIMEOUT,
            socket_timeout=TIMEOUT,
            decode_responses=True,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 6 * TIMEOUT) -> LocalCluster:
        """Start the nodes, create the cluster and wait until it is whole and replicated."""
        assert not self.nodes, "already started"
        self._server, self._cli = cluster_binaries()
        self.workdir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        LocalCluster.live.append(self)
        try:
            self._start_nodes(deadline)
            self._seeds = self.ports[:2]  # two masters of different shards once created
            self._create(deadline)
            self.wait_whole(max(0.0, deadline - time.monotonic()), replicated=True)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_nodes(self, deadline: float) -> None:
        count = self.master_count * (1 + self.replica_count)
        taken: set[int] = set()
        for index in range(count):
            workdir = self.workdir / f"node{index}"
            workdir.mkdir(parents=True, exist_ok=True)
            node = ClusterNode(self._free(taken), self._free(taken), workdir)
            self.nodes[node.port] = node
            self._spawn(node)
        for node in list(self.nodes.values()):
            self._await_ping(node, deadline, taken)

    @staticmethod
    def _free(taken: set[int]) -> int:
        for _ in range(100):
            port = free_port()
            if port not in taken:
                taken.add(port)
                return port
        raise ClusterError("no free port found")

    def _spawn(self, node: ClusterNode) -> None:
        argv = [
            self._server,
            "--port", str(node.port),
            "--cluster-port", str(node.bus_port),
            "--bind", HOST,
            "--protected-mode", "no",
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(node.workdir / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # A replica fails over however long its link was down (tests kill nodes at will).
            "--cluster-replica-validity-factor", "0",
            # The topology stays as created: no replica wanders to an orphaned master.
            "--cluster-allow-replica-migration", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(node.workdir),
            # A full sync starts at once (the default waits 5 s for more replicas) and a replica
            # loads it from the socket: nothing of the data is ever written to disk.
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
            "--repl-diskless-load", "swapdb",
        ]  # fmt: skip
        node.proc = spawn(argv, node.log_path, node.workdir, append=True)
        node.starts += 1

    def _await_ping(self, node: ClusterNode, deadline: float, taken: set[int]) -> None:
        """Wait until ``node`` answers PING; a port taken meanwhile by someone else gets the
        node new ports (only before the cluster is created)."""
        while True:
            assert node.proc is not None
            if node.proc.poll() is not None:
                if "Address already in use" in node.log() and not self._seeds:
                    del self.nodes[node.port]
                    node.port, node.bus_port = self._free(taken), self._free(taken)
                    self.nodes[node.port] = node
                    self._spawn(node)
                    continue
                raise self._error(f"node {node.port} exited with code {node.proc.returncode}")
            if self._ping(node.port):
                return
            if time.monotonic() >= deadline:
                raise self._error(f"node {node.port} not answering PING")
            time.sleep(0.02)

    def _create(self, deadline: float) -> None:
        argv = [
            self._cli,
            "--cluster", "create",
            *(f"{HOST}:{port}" for port in self.ports),
            "--cluster-replicas", str(self.replica_count),
            "--cluster-yes",
        ]  # fmt: skip
        log = self.workdir / "create.log"
        try:
            with open(log, "wb") as out:
                done = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=max(1.0, deadline - time.monotonic()),
                    check=False,
                )
        except subprocess.TimeoutExpired:
            raise self._error("redis-cli --cluster create did not finish", log) from None
        if done.returncode != 0:
            raise self._error(f"redis-cli --cluster create failed ({done.returncode})", log)

    def stop(self) -> None:
        """Kill every node (no one needs its data); the logs stay in :attr:`workdir`."""
        for node in self.nodes.values():
            if node.proc is not None:
                self._sigkill(node)
        with contextlib.suppress(ValueError):
            LocalCluster.live.remove(self)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the cluster says ---------------------------------------------------------------

    def living(self) -> list[int]:
        """The ports of the nodes whose process runs."""
        return [port for port, node in self.nodes.items() if node.running]

    def view(self, port: int | None = None) -> list[NodeView]:
        """``CLUSTER NODES`` as node ``port`` (default: the first living one) sees it."""
        with self.client(self._asked(port)) as conn:
            return parse_cluster_nodes(str(conn.execute_command("CLUSTER", "NODES")))

    def cluster_info(self, port: int) -> dict[str, str]:
        with self.client(port) as conn:
            return _info(str(conn.execute_command("CLUSTER", "INFO")))

    def masters(self) -> list[int]:
        """The ports of the masters that serve slots now, by their first slot."""
        serving = [v for v in self.view() if v.is_master and v.slots and not v.failing]
        return [v.port for v in sorted(serving, key=lambda v: v.slots[0][0])]

    def replicas_of(self, master: int) -> list[int]:
        """The ports of the replicas of the master on ``master``."""
        views = self.view()
        (master_id,) = [v.node_id for v in views if v.port == master]
        return [v.port for v in views if v.master_id == master_id and not v.is_master]

    def slot(self, key: str) -> int:
        """The hash slot of ``key`` (``CLUSTER KEYSLOT``: the hash tag ``{...}`` counts)."""
        with self.client(self._asked()) as conn:
            return int(conn.execute_command("CLUSTER", "KEYSLOT", key))

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot now (``CLUSTER SLOTS``)."""
        slot = self.slot(key)
        with self.client(self._asked()) as conn:
            ranges = conn.execute_command("CLUSTER", "SLOTS")
        for first, last, master, *_ in ranges:
            if int(first) <= slot <= int(last):
                return int(master[1])
        raise ClusterError(f"no master serves slot {slot} of {key!r}")

    def _asked(self, port: int | None = None) -> int:
        if port is not None:
            return port
        for candidate in self.living():
            if self._ping(candidate):
                return candidate
        raise self._error("no living node answers")

    @staticmethod
    def _ping(port: int) -> bool:
        try:
            with redis.Redis(
                host=HOST, port=port, socket_connect_timeout=0.5, socket_timeout=0.5
            ) as conn:
                return bool(conn.ping())
        except (redis.RedisError, OSError):
            return False

    # -- waits ---------------------------------------------------------------------------------

    def wait_whole(self, timeout: float = 4 * TIMEOUT, replicated: bool = False) -> None:
        """Wait until every living node says ``cluster_state:ok`` with all slots served by
        ``masters`` masters it can reach; with ``replicated``, also that every living
        replica's link to its master is up and caught up."""
        self._wait(
            lambda: self._whole(replicated),
            timeout,
            "the cluster to be whole" + (" and replicated" if replicated else ""),
        )

    def _whole(self, replicated: bool) -> str | None:
        """What is still missing (None: nothing)."""
        living = self.living()
        for port in living:
            info = self.cluster_info(port)
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                return f"node {port}: {info.get('cluster_state')}, {info.get('cluster_slots_ok')}"
            masters = [v for v in self.view(port) if v.is_master and v.slots]
            if len(masters) != self.master_count or any(v.failing for v in masters):
                return f"node {port} sees masters {[(v.port, sorted(v.flags)) for v in masters]}"
            if sum(last - first + 1 for v in masters for first, last in v.slots) != SLOTS:
                return f"node {port}: the masters do not cover every slot"
            if not all(v.port in living for v in masters):
                return f"node {port} lists a dead master"
        if replicated:
            for port in living:
                if (lag := self._lag(port)) is not None:
                    return lag
        return None

    def _lag(self, port: int) -> str | None:
        """Why the replica on ``port`` is not in sync yet (None: it is, or it is a master)."""
        with self.client(port) as conn:
            info = conn.info("replication")
        if info.get("role") != "slave":
            return None
        if info.get("master_link_status") != "up" or info.get("master_sync_in_progress"):
            return f"replica {port}: link {info.get('master_link_status')}"
        with self.client(int(info["master_port"])) as conn:
            top = conn.info("replication")["master_repl_offset"]
        if int(info["slave_repl_offset"]) < int(top):
            return f"replica {port}: at {info['slave_repl_offset']} of {top}"
        return None

    def wait_replicated(self, timeout: float = 2 * TIMEOUT) -> None:
        """Wait until every living replica has everything its master wrote so far."""
        self._wait(
            lambda: next((lag for p in self.living() if (lag := self._lag(p))), None),
            timeout,
            "the replicas to catch up",
        )

    def _wait(self, missing: Callable[[], str | None], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: str | None = "not asked yet"
        while True:
            with contextlib.suppress(redis.RedisError, OSError):
                last = missing()
                if last is None:
                    return
            if time.monotonic() >= deadline:
                raise self._error(f"timed out after {timeout:.1f}s waiting for {what} ({last})")
            time.sleep(0.05)

    # -- failures ------------------------------------------------------------------------------

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port``: it dies at once with everything it held."""
        node = self.nodes[port]
        if not node.running:
            return
        with contextlib.suppress(redis.RedisError, OSError, ClusterError):
            mine = [v for v in self.view(port) if v.port == port and v.is_master]
            if mine and mine[0].slots:
                self._orphans[port] = mine[0].slots
        self._sigkill(node)

    def pause(self, port: int) -> None:
        """SIGSTOP the node on ``port``: it reads nothing and answers nothing until resumed."""
        node = self.nodes[port]
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        """SIGCONT a paused node."""
        node = self.nodes[port]
        assert node.proc is not None
        node.proc.send_signal(signal.SIGCONT)

    def _sigkill(self, node: ClusterNode) -> None:
        assert node.proc is not None
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(timeout=3 * TIMEOUT)

    def wait_failover(self, dead_port: int, timeout: float = 4 * TIMEOUT) -> int:
        """Wait until a replica serves the slots the master on ``dead_port`` had and the
        living nodes say the cluster is whole; return the new master's port."""
        slots = self._orphans.get(dead_port)
        if not slots:
            raise ClusterError(f"node {dead_port} was not a killed master")
        first = slots[0][0]
        heir: list[int] = []

        def missing() -> str | None:
            if (why := self._whole(replicated=False)) is not None:
                return why
            owners: set[int] = set()
            for port in self.living():
                served = [v for v in self.view(port) if v.is_master and _covers(v, first)]
                owners.update(v.port for v in served)
            if len(owners) != 1 or dead_port in owners:
                return f"slot {first} served by {sorted(owners)}"
            (new,) = owners
            with self.client(new) as conn:
                if conn.info("replication").get("role") != "master":
                    return f"node {new} not a master yet"
            heir[:] = [new]
            return None

        self._wait(missing, timeout, f"a replica to take over from master {dead_port}")
        return heir[0]

    def restart(self, port: int, timeout: float = 4 * TIMEOUT) -> None:
        """Start the killed node on ``port`` again, empty, with its cluster configuration;
        wait until it is back in a whole cluster (a master that was failed over comes back
        as a replica of its heir, synced)."""
        node = self.nodes[port]
        assert not node.running, f"node {port} is running"
        deadline = time.monotonic() + timeout
        while True:
            self._spawn(node)
            try:
                self._await_ping(node, deadline, set())
                break
            except ClusterError:
                # The port was ours a moment ago; a client may hold it briefly.
                if time.monotonic() >= deadline or "Address already in use" not in node.log():
                    raise
                time.sleep(0.1)
        self._orphans.pop(port, None)

        def missing() -> str | None:
            for asked in self.living():
                seen = [v for v in self.view(asked) if v.port == port]
                if not seen or seen[0].failing or not seen[0].connected:
                    return f"node {asked} sees {port} as {seen[0].flags if seen else 'unknown'}"
            if (why := self._whole(replicated=False)) is not None:
                return why
            return self._lag(port)

        self._wait(missing, max(0.0, deadline - time.monotonic()), f"node {port} to rejoin")

    def kill_all(self) -> None:
        """SIGKILL every node: the whole cluster is gone at once, with its data."""
        for port in self.living():
            self._sigkill(self.nodes[port])

    def restart_all(self, timeout: float = 6 * TIMEOUT) -> None:
        """Start every dead node again with its cluster configuration (and whatever an
        explicit SAVE left in its directory); wait until the cluster is whole and replicated."""
        deadline = time.monotonic() + timeout
        dead = [node for node in self.nodes.values() if not node.running]
        for node in dead:
            self._spawn(node)
        for node in dead:
            self._await_ping(node, deadline, set())
            self._orphans.pop(node.port, None)
        self.wait_whole(max(0.0, deadline - time.monotonic()), replicated=True)

    # -- diagnostics ---------------------------------------------------------------------------

    def logs(self, lines: int = 30) -> str:
        """The last ``lines`` lines of every node's log."""
        parts = []
        for node in self.nodes.values():
            state = "running" if node.running else "dead"
            tail = "\n".join(node.log().splitlines()[-lines:])
            parts.append(f"--- node {node.port} (bus {node.bus_port}, {state}) ---\n{tail}")
        return "\n".join(parts)

    def _error(self, what: str, extra: Path | None = None) -> ClusterError:
        text = f"Redis Cluster in {self.workdir}: {what}\n"
        if extra is not None and extra.exists():
            text += f"--- {extra.name} ---\n{extra.read_text('utf-8', 'replace')[-3000:]}\n"
        return ClusterError(text + self.logs())


def _covers(view: NodeView, slot: int) -> bool:
    return any(first <= slot <= last for first, last in view.slots)
