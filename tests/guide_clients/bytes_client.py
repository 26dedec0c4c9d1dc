import asyncio
import websockets

async def bytes_client():
    uri = "ws://localhost:8000/ws/methods_bytes"
    async with websockets.connect(uri) as websocket:
        await websocket.send(b"Hello, bytes endpoint!")
        response = await websocket.recv()
        print("Bytes endpoint response:", response)

asyncio.run(bytes_client())
