"""A terminal chat client for /ws/chat/{room}: type lines, see everyone's.

Run:  python examples/chat_client.py ws://127.0.0.1:8000/ws/chat/lobby
"""

import asyncio
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def main(url: str) -> None:
    """Print what the room says; send each line typed on stdin."""
    async with connect(url) as ws:
        loop = asyncio.get_running_loop()

        async def show() -> None:
            try:
                async for message in ws:
                    print(message)
            except ConnectionClosed as closed:
                print(f"closed: {closed.rcvd}")

        printer = asyncio.create_task(show())
        while (line := await loop.run_in_executor(None, sys.stdin.readline)) != "":
            await ws.send(line.rstrip("\n"))
        printer.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8000/ws/chat"))
