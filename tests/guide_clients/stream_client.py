import asyncio
import websockets

async def stream_client():
    uri = "ws://localhost:8000/ws/stream"
    async with websockets.connect(uri) as websocket:
        try:
            while True:
                message = await websocket.recv()
                print(f"Streamed response: {message}")
        except websockets.exceptions.ConnectionClosed:
            print("Stream ended.")

asyncio.run(stream_client())
