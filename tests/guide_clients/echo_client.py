import asyncio
import websockets

async def echo_client():
    uri = "ws://localhost:8000/ws/echo"
    async with websockets.connect(uri) as websocket:
        await websocket.send("Hello, FastAPI!")
        response = await websocket.recv()
        print(f"Response received: {response}")

asyncio.run(echo_client())
