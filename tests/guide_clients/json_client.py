import asyncio
import websockets
import json

async def json_client():
    uri = "ws://localhost:8000/ws/methods_json"
    async with websockets.connect(uri) as websocket:
        message = {"greeting": "Hello, JSON endpoint!"}
        await websocket.send(json.dumps(message))
        response = await websocket.recv()
        print("JSON endpoint response:", response)

asyncio.run(json_client())
