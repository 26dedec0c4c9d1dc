"""Commands sent to Redis as many per round trip as are waiting, in the order they were given.

A node on Redis used to publish one command per round trip: a sender's burst reached Redis, and
came back through pub/sub, one message per event-loop turn, and every member of a room paid a
system call per message. :class:`AutoPipeline` sends whatever commands are waiting as one
pipeline (one write, one read), and the next batch when that one is answered. A lone command
goes out at once; under load the batches grow by themselves, with no timer and no added delay.

Order: :class:`AutoPipeline` has one batch under way at a time (for a cluster: redis-py's
cluster pipeline, one connection per shard, the commands of one hash slot in the order given).
:class:`ConnectionPipeline` (one Redis) writes batches on one connection of its own without
waiting for the replies of the batches before (up to ``IN_FLIGHT`` of them), and one reader
takes the replies in order: the next batch goes out while the node is busy fanning out the
last one's messages. Either way Redis runs the commands, and publishes their messages, in the
order they were submitted.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from redis.exceptions import ResponseError

__all__ = ["AutoPipeline", "ConnectionPipeline"]

#: Commands per batch, at most (one pipeline's request and reply stay a few hundred kB).
BATCH = 512
#: Batches written whose replies are not all read yet, at most (ConnectionPipeline).
IN_FLIGHT = 8


class AutoPipeline:
    """Send waiting commands together; each caller gets its own reply or error."""

    def __init__(self, client: Any) -> None:
        #: A ``redis.asyncio.Redis`` or ``RedisCluster``: anything with ``pipeline()``.
        self.client = client
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None
        #: Batches sent, and commands in them (for the batch size in /stats).
        self.batches = 0
        self.commands = 0

    def submit(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command (``args`` as for ``execute_command``) now; await its reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        if self._task is None:
            self._task = loop.create_task(self._run(), name="roomcast-redis-pipeline")
        return future

    async def _run(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:BATCH]
                del self._queue[:BATCH]
                await self._send(batch)
        finally:
            self._task = None
            if self._queue:  # cancelled: fail what is left rather than leave callers hanging
                for _, future in self._queue:
                    if not future.done():
                        future.cancel()
                self._queue.clear()

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for args, _ in batch:
            pipe.execute_command(*args)
        self.batches += 1
        self.commands += len(batch)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as error:  # the connection failed: every command of the batch did
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def close(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class ConnectionPipeline(AutoPipeline):
    """Batches on one connection of its own, several under way at once, replies read in order.

    A failed connection fails the commands written on it (their outcome is unknown: Redis may
    have run them); those not yet written go on a new connection.
    """

    def __init__(self, pool: Any) -> None:
        #: ``client`` is the pool whose settings (address, credentials, TLS, timeouts) the
        #: connection takes.
        super().__init__(pool)
        self._conn: Any = None
        self._sent: deque[list[asyncio.Future[Any]]] = deque()
        self._reader: asyncio.Task[None] | None = None
        self._room = asyncio.Event()

    async def _connection(self) -> Any:
        conn = self._conn
        if conn is None:
            pool = self.client
            conn = pool.connection_class(**pool.connection_kwargs)
            await conn.connect()
            self._conn = conn
        return conn

    async def _run(self) -> None:
        try:
            while self._queue:
                while len(self._sent) >= IN_FLIGHT:
                    self._room.clear()
                    await self._room.wait()
                batch = self._queue[:BATCH]
                del self._queue[:BATCH]
                try:
                    conn = await self._connection()
                    futures = [future for _, future in batch]
                    self._sent.append(futures)
                    self.batches += 1
                    self.commands += len(batch)
                    await conn.send_packed_command(
                        conn.pack_commands([args for args, _ in batch]), check_health=False
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    self._fail(error, [future for _, future in batch])
                    continue
                if self._reader is None:
                    self._reader = asyncio.get_running_loop().create_task(
                        self._read(conn), name="roomcast-redis-reader"
                    )
        finally:
            self._task = None
            if self._queue and asyncio.current_task().cancelling():  # type: ignore[union-attr]
                self._cancel_all()

    async def _read(self, conn: Any) -> None:
        try:
            while self._sent:
                futures = self._sent[0]
                for future in futures:
                    try:
                        reply = await conn.read_response()
                    except ResponseError as error:
                        if not future.done():
                            future.set_exception(error)
                        continue
                    if not future.done():
                        future.set_result(reply)
                self._sent.popleft()
                self._room.set()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the connection failed: every batch written on it did
            self._fail(error, [])
        finally:
            self._reader = None

    def _fail(self, error: Exception, batch: list[asyncio.Future[Any]]) -> None:
        """The connection failed: fail what was written on it (and ``batch``), drop it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn._close()  # drop the transport now: nothing more is read from it
        written = [future for futures in self._sent for future in futures]
        self._sent.clear()
        self._room.set()
        for future in [*written, *batch]:
            if not future.done():
                future.set_exception(error)
        # A new connection for what comes next; the reader of the old one stops.
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()

    def reset(self) -> None:
        """Drop the connection if nothing is under way on it (Redis came back: it is dead)."""
        if self._conn is not None and not self._sent:
            self._conn._close()
            self._conn = None

    def _cancel_all(self) -> None:
        for _, future in self._queue:
            future.cancel()
        self._queue.clear()
        for futures in self._sent:
            for future in futures:
                future.cancel()
        self._sent.clear()

    async def close(self) -> None:
        tasks = [task for task in (self._task, self._reader) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._cancel_all()
        if self._conn is not None:
            await self._conn.disconnect()
            self._conn = None
