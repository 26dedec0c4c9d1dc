"""Commands sent to Redis as many per round trip as are waiting, in the order they were given.

A node on Redis used to publish one command per round trip: a sender's burst reached Redis, and
came back through pub/sub, one message per event-loop turn, and every member of a room paid a
system call per message. :class:`AutoPipeline` sends whatever commands are waiting as one
pipeline (one write, one read), and the next batch when that one is answered. A lone command
goes out at once; under load the batches grow by themselves, with no timer and no added delay.

Order: one batch is under way at a time, on one connection (for a cluster: one per shard, with
the commands of one hash slot in the order given), so Redis runs the commands, and publishes
their messages, in the order they were submitted.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["AutoPipeline"]

#: Commands per batch, at most (one pipeline's request and reply stay a few hundred kB).
BATCH = 512


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
