"""Recovery of missed publications and history paging (docs/protocol.md), against in-process
servers on both WebSocket implementations.

The `/ws` client used here is the suite's ``Peer`` (tests/servers.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import TIMEOUT, async_wait_until, ws_connect
from servers import AppServer, Frame, Peer, ServerStarter, channel, peer, publication, serve

# In-process servers serve in the module's event loop (tests/servers.py).
pytestmark = pytest.mark.asyncio(loop_scope="module")

SHORT_HISTORY = 10


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def short_history(ws_impl: str) -> AsyncIterator[AppServer]:
    async with serve(ws_impl, history_size=SHORT_HISTORY) as srv:
        yield srv


async def open_peer(server: AppServer) -> Peer:
    p = Peer(await ws_connect(server, "/ws"))
    p.hello = await p.frame()
    assert p.hello["type"] == "connected", p.hello
    return p


async def drop(p: Peer, how: str) -> None:
    """Leave cleanly (close frame) or abruptly (the TCP connection just goes)."""
    if how == "abort":
        p.ws.transport.abort()
    await p.ws.close()


async def publish(pub: Peer, ch: str, n: int, sent: dict[int, Any]) -> None:
    """Publish ``n`` publications; ``sent`` maps each offset given to its data."""
    for _ in range(n):
        data = {"k": len(sent), "text": f"publication {len(sent)}"}
        result = await pub.ok("publish", channel=ch, data=data)
        assert result["offset"] not in sent
        sent[result["offset"]] = data


def expected(ch: str, offsets: range, sent: dict[int, Any], pub: Peer) -> list[Frame]:
    return [publication(ch, k, sent[k], pub.info) for k in offsets]


# -- recovered: true -----------------------------------------------------------------------------

MISSED = 12


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_recover_replays_what_was_missed_then_live(server: AppServer, how: str) -> None:
    ch = channel("rec")
    sent: dict[int, Any] = {}
    async with peer(server) as pub:
        sub = await open_peer(server)
        epoch = (await sub.ok("subscribe", channel=ch))["epoch"]
        await publish(pub, ch, 3, sent)
        assert await sub.publications(3) == expected(ch, range(1, 4), sent, pub)
        await drop(sub, how)

        await publish(pub, ch, MISSED, sent)
        async with peer(server) as back:
            result = await back.ok("subscribe", channel=ch, recover={"offset": 3, "epoch": epoch})
            assert result == {
                "epoch": epoch,
                "offset": 3 + MISSED,
                "recovered": True,
                "replayed": MISSED,
            }
            replayed = await back.publications(MISSED)
            assert replayed == expected(ch, range(4, 4 + MISSED), sent, pub)
            # Live ones follow at once, with no gap.
            await publish(pub, ch, 5, sent)
            live = await back.publications(5)
            assert live == expected(ch, range(4 + MISSED, 9 + MISSED), sent, pub)
            await back.still_works()


async def test_recover_with_nothing_missed(server: AppServer) -> None:
    ch = channel("rec")
    sent: dict[int, Any] = {}
    async with peer(server) as pub, peer(server) as sub:
        epoch = (await sub.ok("subscribe", channel=ch))["epoch"]
        await publish(pub, ch, 4, sent)
        await sub.publications(4)
        async with peer(server) as back:
            result = await back.ok("subscribe", channel=ch, recover={"offset": 4, "epoch": epoch})
            assert result == {"epoch": epoch, "offset": 4, "recovered": True, "replayed": 0}
            await publish(pub, ch, 1, sent)
            assert await back.publications(1) == expected(ch, range(5, 6), sent, pub)


RACE = 80


@pytest.mark.parametrize("recover", [True, False], ids=["recover", "plain"])
async def test_subscribe_racing_a_publisher(server: AppServer, recover: bool) -> None:
    """Publications made while the subscribe request is under way: no gap, no duplicate."""
    ch = channel("race")
    sent: dict[int, Any] = {}
    async with peer(server) as pub, peer(server) as racer:
        async with peer(server) as sub:
            epoch = (await sub.ok("subscribe", channel=ch))["epoch"]
            await publish(pub, ch, 5, sent)
            await sub.publications(2)  # it saw 1 and 2 only
        await publish(pub, ch, 7, sent)

        started = asyncio.Event()

        async def race() -> None:
            for k in range(RACE):
                await publish(racer, ch, 1, sent)
                if k == 5:
                    started.set()

        task = asyncio.create_task(race())
        try:
            async with peer(server) as back:
                async with asyncio.timeout(TIMEOUT):
                    await started.wait()
                fields: dict[str, Any] = {"channel": ch}
                if recover:
                    fields["recover"] = {"offset": 2, "epoch": epoch}
                result = await back.ok("subscribe", **fields)
                async with asyncio.timeout(2 * TIMEOUT):
                    await task
                total = len(sent)
                assert total == 12 + RACE
                position = result["offset"]
                assert 12 + 6 <= position <= total
                if recover:
                    assert result == {
                        "epoch": epoch,
                        "offset": position,
                        "recovered": True,
                        "replayed": position - 2,
                    }
                    first = 3
                else:
                    assert result == {"epoch": epoch, "offset": position}
                    first = position + 1
                got = await back.publications(total - first + 1)
                assert [f["offset"] for f in got] == list(range(first, total + 1))
                assert got == [
                    publication(ch, k, sent[k], racer.info if k > 12 else pub.info)
                    for k in range(first, total + 1)
                ]
                await back.still_works()
        finally:
            task.cancel()


# -- recovered: false ----------------------------------------------------------------------------


async def test_gap_older_than_the_history(short_history: AppServer) -> None:
    ch = channel("gap")
    sent: dict[int, Any] = {}
    async with peer(short_history) as pub:
        async with peer(short_history) as sub:
            epoch = (await sub.ok("subscribe", channel=ch))["epoch"]
            await publish(pub, ch, 2, sent)
            await sub.publications(2)
        await publish(pub, ch, 25, sent)
        async with peer(short_history) as back:
            result = await back.ok("subscribe", channel=ch, recover={"offset": 2, "epoch": epoch})
            assert result == {
                "epoch": epoch,
                "offset": 27,
                "recovered": False,
                "replayed": SHORT_HISTORY,
            }
            # The retained suffix, then the live ones.
            assert await back.publications(SHORT_HISTORY) == expected(ch, range(18, 28), sent, pub)
            await publish(pub, ch, 1, sent)
            assert await back.publications(1) == expected(ch, range(28, 29), sent, pub)
            await back.still_works()


@pytest.mark.parametrize(
    ("offset", "epoch"),
    [(3, "not-the-epoch"), (3, ""), (9, None), (1000, None)],
    ids=["other-epoch", "empty-epoch", "offset-beyond", "far-beyond"],
)
async def test_recover_from_nothing_it_can_use(
    server: AppServer, offset: int, epoch: str | None
) -> None:
    ch = channel("bad-pos")
    sent: dict[int, Any] = {}
    async with peer(server) as pub:
        async with peer(server) as sub:
            real = (await sub.ok("subscribe", channel=ch))["epoch"]
        await publish(pub, ch, 5, sent)
        async with peer(server) as back:
            result = await back.ok(
                "subscribe",
                channel=ch,
                recover={"offset": offset, "epoch": real if epoch is None else epoch},
            )
            if epoch is None:
                # The right stream, but an offset it never reached: nothing to replay.
                assert result == {"epoch": real, "offset": 5, "recovered": False, "replayed": 0}
            else:
                # A stream the client knew is gone: everything held of the current one is news
                # to it, so all of it is replayed (docs/protocol.md, "subscribe").
                assert result == {"epoch": real, "offset": 5, "recovered": False, "replayed": 5}
                assert await back.publications(5) == expected(ch, range(1, 6), sent, pub)
            # Then the live ones, with no gap.
            await publish(pub, ch, 1, sent)
            assert await back.publications(1) == expected(ch, range(6, 7), sent, pub)
            await back.still_works()


# -- the invariant, on generated interleavings ---------------------------------------------------

HOW = st.sampled_from(["close", "abort"])
STEP = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 6)),
    st.tuples(st.just("read"), st.integers(0, 6)),
    st.tuples(st.just("reconnect"), HOW, st.integers(0, 6)),
    st.tuples(st.just("race"), HOW, st.integers(1, 10)),
)


async def interleaving(server: AppServer, steps: list[tuple[Any, ...]]) -> None:
    ch = channel("hyp")
    sent: dict[int, Any] = {}
    seen: list[int] = []
    pub = await open_peer(server)
    sub = await open_peer(server)
    try:
        epoch = (await sub.ok("subscribe", channel=ch))["epoch"]

        async def read(n: int) -> None:
            for frame in await sub.publications(n):
                assert frame == publication(ch, frame["offset"], sent[frame["offset"]], pub.info)
                seen.append(frame["offset"])

        def last() -> int:
            return seen[-1] if seen else 0

        async def come_back() -> Frame:
            nonlocal sub
            sub = await open_peer(server)
            return await sub.ok("subscribe", channel=ch, recover={"offset": last(), "epoch": epoch})

        for step in steps:
            if step[0] == "publish":
                await publish(pub, ch, step[1], sent)
            elif step[0] == "read":
                await read(min(step[1], len(sent) - last()))
            elif step[0] == "reconnect":
                await drop(sub, step[1])
                await publish(pub, ch, step[2], sent)
                result = await come_back()
                replayed = len(sent) - last()
                assert result == {
                    "epoch": epoch,
                    "offset": len(sent),
                    "recovered": True,
                    "replayed": replayed,
                }
            else:  # race: publications while the new subscribe request is under way
                await drop(sub, step[1])
                task = asyncio.create_task(publish(pub, ch, step[2], sent))
                try:
                    result = await come_back()
                    async with asyncio.timeout(TIMEOUT):
                        await task
                finally:
                    task.cancel()
                assert result["recovered"] is True, result
                assert result["replayed"] == result["offset"] - last(), (result, last())
        await read(len(sent) - last())
        assert seen == list(range(1, len(sent) + 1))
        await sub.still_works()
    finally:
        await sub.ws.close()
        await pub.ws.close()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=st.lists(STEP, max_size=10))
async def test_every_publication_exactly_once_in_order(
    server: AppServer, steps: list[tuple[Any, ...]]
) -> None:
    """Across all its connections, a recovering subscriber sees offsets 1..total once each."""
    await interleaving(server, steps)


# -- history -------------------------------------------------------------------------------------

PAGE = 7


async def walk(p: Peer, ch: str, direction: str) -> list[list[int]]:
    """Page through the whole history with ``since`` (forwards) or ``before`` (backwards)."""
    pages: list[list[int]] = []
    fields: dict[str, Any] = {"since": 0} if direction == "forwards" else {}
    for _ in range(100):
        result = await p.ok("history", channel=ch, limit=PAGE, **fields)
        offsets = [f["offset"] for f in result["publications"]]
        if not offsets:
            return pages
        assert len(offsets) <= PAGE
        pages.append(offsets)
        fields = {"since": offsets[-1]} if direction == "forwards" else {"before": offsets[0]}
    pytest.fail(f"history walk {direction} does not end: {pages[-3:]}")


async def test_history_paging_walks_everything_once(server: AppServer) -> None:
    ch = channel("hist")
    sent: dict[int, Any] = {}
    async with peer(server) as pub, peer(server) as sub:
        epoch = (await sub.ok("subscribe", channel=ch))["epoch"]
        await publish(pub, ch, 25, sent)
        pushes = await sub.publications(25)

        forwards = await walk(sub, ch, "forwards")
        assert forwards == [list(range(k, min(k + PAGE, 26))) for k in range(1, 26, PAGE)]
        backwards = await walk(sub, ch, "backwards")
        assert sorted(k for page in backwards for k in page) == list(range(1, 26))
        assert backwards[0] == list(range(19, 26))
        assert backwards[-1] == list(range(1, 5))

        full = await sub.ok("history", channel=ch, limit=1000)
        assert full == {"epoch": epoch, "offset": 25, "start": 1, "publications": pushes}
        page = await sub.ok("history", channel=ch, since=10, limit=3)
        assert page == {"epoch": epoch, "offset": 25, "start": 1, "publications": pushes[10:13]}
        page = await sub.ok("history", channel=ch, before=10, limit=3)
        assert page["publications"] == pushes[6:9]
        assert (await sub.ok("history", channel=ch, since=25))["publications"] == []
        assert (await sub.ok("history", channel=ch, since=1000))["publications"] == []
        assert (await sub.ok("history", channel=ch, before=1))["publications"] == []
        assert (await sub.ok("history", channel=ch, before=1000))["publications"] == pushes[-100:]


async def test_history_default_limit(server: AppServer) -> None:
    ch = channel("hist")
    sent: dict[int, Any] = {}
    async with peer(server) as pub:
        await publish(pub, ch, 120, sent)
        result = await pub.ok("history", channel=ch)
        assert [f["offset"] for f in result["publications"]] == list(range(21, 121))
        assert result["start"] == 1
        assert result["offset"] == 120


async def test_history_holds_the_latest_only(short_history: AppServer) -> None:
    ch = channel("hist")
    sent: dict[int, Any] = {}
    async with peer(short_history) as pub:
        await publish(pub, ch, 25, sent)
        result = await pub.ok("history", channel=ch)
        assert result["start"] == 16
        assert result["offset"] == 25
        assert result["publications"] == expected(ch, range(16, 26), sent, pub)
        assert await walk(pub, ch, "forwards") == [list(range(16, 23)), list(range(23, 26))]
        assert await walk(pub, ch, "backwards") == [list(range(19, 26)), list(range(16, 19))]
        assert (await pub.ok("history", channel=ch, before=16))["publications"] == []
        since = await pub.ok("history", channel=ch, since=3, limit=2)
        assert since["publications"] == expected(ch, range(16, 18), sent, pub)


async def test_history_expires_after_the_ttl(start_server: ServerStarter) -> None:
    srv = await start_server(history_ttl=1)
    ch = channel("ttl")
    sent: dict[int, Any] = {}
    async with peer(srv) as pub:
        published_at = time.monotonic()
        await publish(pub, ch, 3, sent)
        before = await pub.ok("history", channel=ch)
        assert before["start"] == 1
        assert before["publications"] == expected(ch, range(1, 4), sent, pub)

        async def expired() -> Frame | None:
            result = await pub.ok("history", channel=ch)
            return result if not result["publications"] else None

        after = await async_wait_until(expired, within=1 + 2 * TIMEOUT, what="the TTL expiry")
        assert time.monotonic() - published_at >= 0.9, "expired before the TTL"
        assert after["start"] == after["offset"] + 1
        # Either the same stream, without its publications, or a new epoch (the channel was
        # idle past its retention): both are documented.
        same = after["epoch"] == before["epoch"]
        assert after["offset"] == (3 if same else 0)
        # What was missed is gone: nothing to replay.
        async with peer(srv) as back:
            result = await back.ok(
                "subscribe", channel=ch, recover={"offset": 1, "epoch": before["epoch"]}
            )
            assert result == {
                "epoch": after["epoch"],
                "offset": after["offset"],
                "recovered": False,
                "replayed": 0,
            }
            offset = (await pub.ok("publish", channel=ch, data="again"))["offset"]
            assert offset == after["offset"] + 1
            assert (await back.publications(1))[0]["offset"] == offset


async def test_history_of_the_least_recently_published_channel_is_dropped(
    start_server: ServerStarter,
) -> None:
    """Past ROOMCAST_HISTORY_CHANNELS, a channel's next publication starts a new epoch."""
    srv = await start_server(history_channels=2)
    first, second, third = channel("lru"), channel("lru"), channel("lru")
    async with peer(srv) as pub:
        await publish(pub, first, 2, {})
        old = (await pub.ok("history", channel=first))["epoch"]
        await publish(pub, second, 2, {})
        await publish(pub, third, 2, {})  # first is now the least recently published
        result = await pub.ok("publish", channel=first, data="anew")
        assert result["offset"] == 1
        assert result["epoch"] != old
        history = await pub.ok("history", channel=first)
        assert history["start"] == 1
        assert [f["data"] for f in history["publications"]] == ["anew"]
        # The two others kept theirs.
        assert len((await pub.ok("history", channel=third))["publications"]) == 2
