import asyncio
import websockets

async def text_client():
    uri = "ws://localhost:8000/ws/methods_text"
    async with websockets.connect(uri) as websocket:
        await websocket.send("Hello, text endpoint!")
        response = await websocket.recv()
        print("Text endpoint response:", response)

asyncio.run(text_client())
