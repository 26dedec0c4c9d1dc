"""roomcast on a real Redis Cluster (``redis+cluster://``): 3 masters, 3 replicas.

Nodes are ``roomcast serve`` processes sharing a local cluster (tests/redis_cluster.py). A
channel's keys all carry its name as their hash tag (``P:kind:{channel}``, see
src/roomcast/brokers/redis.py), so a channel lives on one shard: the tests pick channel and
room names that land on each of the three masters, and check with the cluster itself
(``PUBSUB SHARDCHANNELS``, ``SCAN``) that each one's pub/sub channel and keys are there.

Then failures, on the same cluster (each test leaves it whole: ``restored_cluster``):

- a master killed under load is failed over to its replica while the nodes keep serving:
  every subscriber ends with every publication the history holds, in order, once; a
  publication after the failover reaches the subscribers on both nodes; ``/readyz`` says 503
  while a shard the node listens to has no master and 200 from the failover on;
- a failover whose replica missed the last acknowledged publications (it was paused and cut
  off before the master died) hands none of their offsets out again under the same epoch;
- a whole shard lost (master and replica) makes every node unready until it is back, empty;
  the channel then begins again and its subscribers are told.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from helpers import TIMEOUT, RoomcastServer, async_wait_until
from redis_cluster import LocalCluster
from redis_cluster_fixtures import (
    redis_cluster_fixture,  # noqa: F401 (a fixture)
    redis_cluster_url_fixture,  # noqa: F401 (a fixture)
    restored_cluster_fixture,  # noqa: F401 (a fixture)
)
from redis_server import unique_prefix
from servers import Peer, channel, peer, publication
from test_chaos import (
    KEY,
    Publisher,
    Subscriber,
    api_publish,
    readyz_is,
    runs,
    start_nodes,
    whole_history,
)
from test_cluster import everyone_hears_everyone, join_chat

pytestmark = pytest.mark.redis

API_INFO = {"client": None, "user": None}
PRESENCE_TTL = 3.0
#: The key prefix of the module's two nodes (``pair``).
PAIR_PREFIX = unique_prefix("pair")


# -- where channels live -------------------------------------------------------------------------


def tag(name: str) -> str:
    """A key whose slot is the slot of every key of channel ``name`` (its hash tag)."""
    return "{" + name + "}"


def on_every_master(cluster: LocalCluster, make: Callable[[], str]) -> list[str]:
    """New names from ``make``, the i-th served by the i-th of the cluster's masters now."""
    masters = cluster.masters()
    picked: dict[int, str] = {}
    for _ in range(200):
        name = make()
        picked.setdefault(cluster.master_of(tag(name)), name)
        if len(picked) == len(masters):
            return [picked[port] for port in masters]
    raise AssertionError(f"no name of each master in 200 tries: {picked}")


def shard_channels(cluster: LocalCluster) -> dict[int, list[str]]:
    """Each master's active sharded pub/sub channels (``PUBSUB SHARDCHANNELS``)."""
    found = {}
    for port in cluster.masters():
        with cluster.client(port) as conn:
            found[port] = list(conn.execute_command("PUBSUB", "SHARDCHANNELS"))
    return found


def keys_by_master(cluster: LocalCluster, name: str) -> dict[int, list[str]]:
    """The masters holding keys of channel ``name`` (by its hash tag), and those keys."""
    found = {}
    for port in cluster.masters():
        with cluster.client(port) as conn:
            keys = list(conn.scan_iter(match=f"*{tag(name)}*", count=1000))
        if keys:
            found[port] = sorted(keys)
    return found


def assert_spread(cluster: LocalCluster, names: Sequence[str], keys: bool) -> None:
    """Each of ``names`` is subscribed (and with ``keys``, stored) on its own master."""
    masters = cluster.masters()
    channels = shard_channels(cluster)
    for name, master in zip(names, masters, strict=True):
        holders = [port for port, subscribed in channels.items() if tag(name) in str(subscribed)]
        assert holders == [master], f"{name}: subscribed on {holders}, {channels}"
        if keys:
            stored = keys_by_master(cluster, name)
            assert list(stored) == [master], f"{name}: keys on {stored}"


# -- nodes ---------------------------------------------------------------------------------------


def cluster_nodes(
    tmp_path: Path, cluster: LocalCluster, url: str, n: int = 2, **env: str
) -> list[RoomcastServer]:
    """``n`` ready nodes on ``url`` (test_chaos.start_nodes with the cluster's URL)."""
    return start_nodes(
        tmp_path,
        cluster,  # type: ignore[arg-type]  # only its URL is used, and overridden here
        n=n,
        ROOMCAST_BROKER_URL=url,
        ROOMCAST_PRESENCE_TTL=str(PRESENCE_TTL),
        **env,
    )


@pytest.fixture(scope="module")
def pair(
    redis_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[RoomcastServer]]:
    """Two nodes (A, B) on the module's cluster, with a key prefix of their own."""
    url = redis_cluster.url_for(PAIR_PREFIX)
    nodes = cluster_nodes(tmp_path_factory.mktemp("pair"), redis_cluster, url)
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()
    for node in nodes:
        node.assert_no_traceback()


@asynccontextmanager
async def peers(servers: Sequence[RoomcastServer]) -> AsyncIterator[list[Peer]]:
    """One `/ws` peer on each of ``servers``."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(peer(server)) for server in servers]


# -- members of two nodes meet on every shard ----------------------------------------------------


async def test_ws_channels_on_every_shard_cross_nodes(
    pair: list[RoomcastServer], redis_cluster: LocalCluster
) -> None:
    """Subscribers on A and B of three channels, one per master: publications from either
    node reach both in one order of offsets; history and presence agree on both nodes."""
    a, b = pair
    names = on_every_master(redis_cluster, lambda: channel("spread"))
    async with peers([a, b]) as subs, peers([a, b]) as pubs:
        for ch in names:
            epochs = {(await sub.ok("subscribe", channel=ch))["epoch"] for sub in subs}
            assert len(epochs) == 1, epochs
        sent: dict[str, list[dict[str, Any]]] = {ch: [] for ch in names}
        for i in range(4):
            for ch in names:
                pub = pubs[i % 2]
                result = await pub.ok("publish", channel=ch, data={"i": i})
                assert result["offset"] == i + 1, result
                sent[ch].append(publication(ch, i + 1, {"i": i}, pub.info))
        for sub in subs:
            got = await sub.publications(4 * len(names))
            for ch in names:
                assert [f for f in got if f["channel"] == ch] == sent[ch]
            await sub.still_works()
        assert_spread(redis_cluster, names, keys=True)
        members = sorted(sub.client for sub in subs)
        for ch in names:
            for node, sub in zip(pair, subs, strict=True):
                history = await whole_history(node, ch)
                assert [(p["offset"], p["data"]) for p in history["all"]] == [
                    (f["offset"], f["data"]) for f in sent[ch]
                ]
                clients = (await sub.ok("presence", channel=ch))["clients"]
                assert sorted(e["client"] for e in clients) == members


async def test_chat_rooms_on_every_shard_cross_nodes(
    pair: list[RoomcastServer], redis_cluster: LocalCluster
) -> None:
    """Members of ``/ws/chat/{room}`` on A and B hear each other, for a room on each master,
    and in ``/ws/chat``'s room."""
    a, b = pair
    chats = on_every_master(redis_cluster, lambda: "chat/" + channel("room").replace(":", "-"))
    rooms = [name.removeprefix("chat/") for name in chats]
    async with AsyncExitStack() as stack:
        everyone = []
        for room in rooms:
            members = [
                await join_chat(stack, node, f"/ws/chat/{room}", f"{room}-{i}")
                for i, node in enumerate([a, b, b])
            ]
            everyone.append(members)
        lobby = [
            await join_chat(stack, node, "/ws/chat", f"lobby-{i}") for i, node in enumerate([a, b])
        ]
        # Every node's subscription is live once a message of each member went round.
        for room, members in zip(rooms, everyone, strict=True):
            await everyone_hears_everyone(members, room)
        await everyone_hears_everyone(lobby, "lobby")
        assert_spread(redis_cluster, chats, keys=False)
        # Rooms stay apart: nobody heard another room's members.
        for room, members in zip(rooms, everyone, strict=True):
            for member in members:
                strangers = [m for m in member.got if "msg-" in m and f"msg-{room}-" not in m]
                assert not strangers, strangers


async def test_recovery_on_the_other_node_on_every_shard(
    pair: list[RoomcastServer], redis_cluster: LocalCluster
) -> None:
    """A subscriber of A goes away; back on B it gets what it missed from the history
    (``recovered: true``), then the live publications, with no gap."""
    a, b = pair
    for ch in on_every_master(redis_cluster, lambda: channel("recover")):
        sent = [publication(ch, i + 1, i, API_INFO) for i in range(8)]
        async with peer(a) as sub:
            epoch = (await sub.ok("subscribe", channel=ch))["epoch"]
            for i in range(3):
                assert (await api_publish(b, ch, i))["offset"] == i + 1
            assert await sub.publications(3) == sent[:3]
        for i in range(3, 8):
            await api_publish(a, ch, i)  # missed while away
        async with peer(b) as back:
            result = await back.ok("subscribe", channel=ch, recover={"offset": 3, "epoch": epoch})
            assert result == {"epoch": epoch, "offset": 8, "recovered": True, "replayed": 5}
            assert await back.publications(5) == sent[3:]
            assert (await api_publish(a, ch, "live"))["offset"] == 9
            assert await back.publications(1) == [publication(ch, 9, "live", API_INFO)]
            await back.still_works()


# -- failures ------------------------------------------------------------------------------------


class Readiness:
    """``/readyz`` of each node, sampled every 50 ms in the background: (time, status)."""

    def __init__(self, nodes: Sequence[RoomcastServer]) -> None:
        self.nodes = nodes
        self.samples: list[list[tuple[float, int]]] = [[] for _ in nodes]
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            while True:
                for node, samples in zip(self.nodes, self.samples, strict=True):
                    # The time the question was asked: an answer older than a change of
                    # state cannot be counted after it.
                    asked = time.monotonic()
                    try:
                        status = (await http.get(f"{node.http_url}/readyz")).status_code
                    except httpx.HTTPError:
                        status = 0
                    samples.append((asked, status))
                await asyncio.sleep(0.05)

    async def __aenter__(self) -> Readiness:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def since(self, k: int, moment: float) -> list[int]:
        """Node ``k``'s statuses sampled from ``moment`` on."""
        return [status for at, status in self.samples[k] if at >= moment]


async def until_ready(nodes: Sequence[RoomcastServer], status: int, within: float) -> float:
    """Wait until every node's ``/readyz`` answers ``status``; return when they all did."""
    for node in nodes:
        await async_wait_until(
            lambda n=node: readyz_is(n, status), within, f"{node.http_url}/readyz {status}"
        )
    return time.monotonic()


TOTAL = 3000
KILL_AFTER = 1000
PER_NODE = 2


@pytest.fixture
def failover_nodes(
    tmp_path: Path, redis_cluster: LocalCluster, redis_cluster_url: str
) -> Iterator[list[RoomcastServer]]:
    """Two nodes of the test's own, with a history larger than everything published."""
    nodes = cluster_nodes(
        tmp_path, redis_cluster, redis_cluster_url, ROOMCAST_HISTORY_SIZE=str(2 * TOTAL)
    )
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()
    for node in nodes:
        node.assert_no_traceback()


async def test_a_killed_master_is_failed_over_under_load(
    failover_nodes: list[RoomcastServer], redis_cluster: LocalCluster
) -> None:
    """Two nodes publish 3,000 messages to a channel whose master is killed a third of the
    way in. The replica takes over; the nodes keep their clients and serve again, ``/readyz``
    says so, and every subscriber on both nodes ends with exactly what the history holds."""
    a, b = failover_nodes
    ch, other, _ = on_every_master(redis_cluster, lambda: channel("failover"))
    dead = redis_cluster.master_of(tag(ch))
    (replica,) = redis_cluster.replicas_of(dead)
    subscribers = [Subscriber(node, ch) for node in (a, b) for _ in range(PER_NODE)]
    bystanders = [Subscriber(node, other) for node in (a, b)]
    publishers = [Publisher(node, ch, i, TOTAL // 2) for i, node in enumerate((a, b))]
    tasks: list[asyncio.Task[None]] = []
    try:
        async with Readiness(failover_nodes) as readiness:
            for s in subscribers + bystanders:
                await s.start()
            tasks = [asyncio.create_task(p.run()) for p in publishers]

            def acked() -> int:
                for task in tasks:
                    if task.done():
                        task.result()  # a failed publisher fails the test now
                return sum(len(p.acked) for p in publishers)

            await async_wait_until(lambda: acked() >= KILL_AFTER, 6 * TIMEOUT, "publications")
            clients = [(await node.astats())["ws_clients"] for node in (a, b)]
            assert clients == [PER_NODE + 2] * 2  # subscribers, a bystander, a publisher
            listening = PER_NODE + 1  # the subscribers and the bystander
            assert all(s == 200 for k in (0, 1) for _, s in readiness.samples[k])

            redis_cluster.kill(dead)
            killed = time.monotonic()
            # Both nodes subscribe on the dead master: they know at once they cannot deliver.
            await until_ready(failover_nodes, 503, TIMEOUT)
            assert acked() < TOTAL, "the publishers finished before the master died"
            heir = await asyncio.to_thread(redis_cluster.wait_failover, dead)
            assert heir == replica
            failed_over = time.monotonic()
            ready = await until_ready(failover_nodes, 200, 3 * TIMEOUT)
            # Every subscription is there (a publisher that finished has gone).
            for node in (a, b):
                await node.await_stats(lambda st: st["ws_subscriptions"] == listening, TIMEOUT)

            # Ready means serving: each node publishes at once, to the failed-over shard too.
            for node in (a, b):
                for target in (ch, other):
                    await api_publish(node, target, "probe")
            async with asyncio.timeout(12 * TIMEOUT):
                await asyncio.gather(*tasks)
            assert acked() == TOTAL

            history = await whole_history(a, ch)
            top = history["offset"]
            marker = [await api_publish(node, ch, f"after-{k}") for k, node in enumerate((a, b))]
            assert [m["offset"] for m in marker] == [top + 1, top + 2]
            for s in subscribers:
                await async_wait_until(
                    lambda s=s: s.caught_up(top + 2), 4 * TIMEOUT, "the markers from A and B"
                )
                assert s.got.pop() == (top + 2, "after-1")
                assert s.got.pop() == (top + 1, "after-0")
            for s in bystanders:
                await async_wait_until(lambda s=s: len(s.got) >= 2, TIMEOUT, "the bystanders")
                assert s.got == [(1, "probe"), (2, "probe")]
        # Once ready again, each node stayed ready.
        for k in (0, 1):
            after = readiness.since(k, ready)
            assert set(after) == {200}, f"node {k} after the failover: {after}"
        assert failed_over - killed < 4 * TIMEOUT

        # The subscriptions moved to the heir: both nodes listen there now.
        with redis_cluster.client(heir) as conn:
            names = [n for n in conn.execute_command("PUBSUB", "SHARDCHANNELS") if tag(ch) in n]
            assert len(names) == 1, names
            counts = conn.execute_command("PUBSUB", "SHARDNUMSUB", *names)
        assert [int(c) for c in counts[1::2]] == [2], f"subscribers on the heir: {counts}"

        check_delivery(history, publishers, subscribers)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in subscribers + bystanders:
            await s.close()


def check_delivery(
    history: dict[str, Any], publishers: Sequence[Publisher], subscribers: Sequence[Subscriber]
) -> None:
    """What a failover may cost, and what it may not.

    The history (nothing trimmed) is the truth: every subscriber got every publication it holds,
    in order, once. Publications acknowledged by the dead master after the last write its
    replica received are lost with it; their offsets are never handed out again under the same
    epoch. Either the channel goes on under its epoch, skipping those offsets (the history has
    one jump, and anything acknowledged or delivered but not held lies inside it), or it begins
    again under a new one and each subscriber is told (``recovered: false``).
    """
    final = history["epoch"]
    held = {p["offset"]: p["data"] for p in history["all"]}
    offsets = list(held)
    assert history["start"] == 1
    assert offsets[0] == 1
    assert offsets == sorted(set(offsets)), "the history is out of order"
    acked = {key: data for p in publishers for key, data in p.acked.items()}
    epochs = {epoch for epoch, _ in acked}
    assert final in epochs
    assert len(epochs) <= 2, epochs
    acked_final = {offset: data for (epoch, offset), data in acked.items() if epoch == final}
    # Nothing acknowledged in the final epoch says other than the history.
    assert all(held[o] == data for o, data in acked_final.items() if o in held)
    if len(epochs) == 1:
        jumps = [(x, y) for x, y in itertools.pairwise(offsets) if y != x + 1]
        assert len(jumps) <= 1, f"one failover, more than one skip: {jumps}"
        skipped = range(jumps[0][0] + 1, jumps[0][1]) if jumps else range(0)
        lost = sorted(set(acked_final) - set(held))
        assert all(o in skipped for o in lost), f"acknowledged, not held: {lost[:10]}"
        for k, s in enumerate(subscribers):
            got = [o for o, _ in s.got]
            assert got == sorted(set(got)), f"subscriber {k}: out of order or twice"
            mine = dict(s.got)
            missing = [o for o in offsets if o not in mine]
            assert not missing, f"subscriber {k} never got {len(missing)}, e.g. {missing[:10]}"
            assert all(mine[o] == held[o] for o in offsets), f"subscriber {k}: other data"
            extra = [o for o in got if o not in held]
            assert all(o in skipped for o in extra), f"subscriber {k}: {extra[:10]}"
        return
    (lost_epoch,) = epochs - {final}
    acked_lost = {offset: data for (epoch, offset), data in acked.items() if epoch == lost_epoch}
    assert offsets == list(range(1, len(offsets) + 1))
    for k, s in enumerate(subscribers):
        streams = runs(s.got)
        assert streams[-1] == list(held.items()), f"subscriber {k}: not what the history holds"
        assert len(streams) == 2, f"subscriber {k}: {len(streams)} streams"
        before = streams[0]
        assert [o for o, _ in before] == list(range(1, len(before) + 1))
        assert all(data == acked_lost[o] for o, data in before if o in acked_lost)
        assert s.subscription.gaps >= 1, f"subscriber {k} was not told"


async def test_a_failover_that_lost_acknowledged_writes_hands_out_no_offset_twice(
    pair: list[RoomcastServer], restored_cluster: LocalCluster
) -> None:
    """The replica is cut off (paused, its link dropped by the master) while five more
    publications are acknowledged and delivered; then the master dies. The promoted replica
    never had them: their offsets must not be handed out again under the same epoch, and the
    subscribers on both nodes get what comes next as what comes next."""
    cluster = restored_cluster
    a, b = pair
    await until_ready(pair, 200, 3 * TIMEOUT)
    ch = channel("lostwrites")
    master = cluster.master_of(tag(ch))
    (replica,) = cluster.replicas_of(master)
    async with peers([a, b]) as subs:
        epoch = {(await sub.ok("subscribe", channel=ch))["epoch"] for sub in subs}.pop()
        for i in range(5):
            await api_publish(a, ch, i)
        await asyncio.to_thread(cluster.wait_replicated)
        cluster.pause(replica)
        with cluster.client(master) as conn:
            assert conn.execute_command("CLIENT", "KILL", "TYPE", "replica") == 1
        for i in range(5, 10):
            assert await api_publish(b, ch, i) == {"epoch": epoch, "offset": i + 1}
        for sub in subs:
            assert [f["offset"] for f in await sub.publications(10)] == list(range(1, 11))
        cluster.kill(master)
        cluster.resume(replica)
        assert await asyncio.to_thread(cluster.wait_failover, master) == replica
        with cluster.client(replica) as conn:
            # The test's premise: the new master lacks the last five.
            assert conn.execute_command("XLEN", f"{PAIR_PREFIX}:h:{tag(ch)}") == 5
        await until_ready(pair, 200, 3 * TIMEOUT)

        after = await api_publish(a, ch, "after")
        reused = after["epoch"] == epoch and after["offset"] <= 10
        assert not reused, f"offset {after['offset']} handed out twice under {epoch}"
        for k, sub in enumerate(subs):
            if after["epoch"] == epoch:
                frame = await sub.push(2 * TIMEOUT)
                assert frame == publication(ch, after["offset"], "after", API_INFO), k
                await sub.still_works()
            else:
                # A new stream: the subscriber is told to recover (1012).
                with contextlib.suppress(ConnectionClosed):
                    await sub.push(2 * TIMEOUT)
                assert sub.ws.close_code == 1012, f"subscriber {k}: {sub.ws.close_code}"


OUTAGE = 1.5


async def test_a_lost_shard_makes_every_node_unready_until_it_is_back(
    pair: list[RoomcastServer], restored_cluster: LocalCluster
) -> None:
    """A channel's master and its replica both die: no one serves its slot, the cluster is
    down, and every node says so (503) until the shard is back, empty. The subscribers keep
    their connections, then recover into the channel's new stream."""
    redis_cluster = restored_cluster
    a, b = pair
    await until_ready(pair, 200, 3 * TIMEOUT)
    ch = channel("lost")
    master = redis_cluster.master_of(tag(ch))
    (replica,) = redis_cluster.replicas_of(master)
    subscribers = [Subscriber(node, ch) for node in (a, b)]
    try:
        for s in subscribers:
            await s.start()
        first = [await api_publish(node, ch, i) for i, node in enumerate((a, b, a))]
        assert [p["offset"] for p in first] == [1, 2, 3]
        for s in subscribers:
            await async_wait_until(lambda s=s: s.caught_up(3), TIMEOUT, "the first three")
        clients = [(await node.astats())["ws_clients"] for node in (a, b)]

        redis_cluster.kill(replica)  # first, so that nobody takes the master's place
        redis_cluster.kill(master)
        await until_ready(pair, 503, TIMEOUT)
        async with Readiness(pair) as readiness:
            outage_ends = time.monotonic() + OUTAGE
            while time.monotonic() < outage_ends:
                assert [(await node.astats())["ws_clients"] for node in (a, b)] == clients
                await asyncio.sleep(0.1)
            for node in (a, b):
                async with httpx.AsyncClient(base_url=node.http_url, timeout=TIMEOUT) as http:
                    reply = await http.post(
                        "/api/publish",
                        json={"channel": ch, "data": "x"},
                        headers={"X-API-Key": KEY},
                    )
                assert reply.status_code == 503, reply.text
        for k in (0, 1):
            assert set(readiness.since(k, 0)) == {503}, f"node {k}: {readiness.since(k, 0)}"

        await asyncio.to_thread(redis_cluster.restart_all)  # both, empty
        await until_ready(pair, 200, 3 * TIMEOUT)
        again = await api_publish(b, ch, "again")
        assert again["epoch"] != first[0]["epoch"], "an empty shard went on with the old stream"
        assert again["offset"] == 1
        for k, s in enumerate(subscribers):
            await async_wait_until(lambda s=s: s.caught_up(1), 3 * TIMEOUT, "the new stream")
            assert [offset for offset, _ in s.got] == [1, 2, 3, 1], f"subscriber {k}"
            assert s.got[-1] == (1, "again")
            assert s.subscription.gaps >= 1  # recovered: false, a new epoch
            assert s.client.connections >= 2  # closed with 1012, came back
        # Live publications flow again, from either node.
        assert (await api_publish(a, ch, "live"))["offset"] == 2
        for s in subscribers:
            await async_wait_until(lambda s=s: s.caught_up(2), TIMEOUT, "a live publication")
    finally:
        for s in subscribers:
            await s.close()
