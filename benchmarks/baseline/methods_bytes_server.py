from fastapi import FastAPI, WebSocket

app = FastAPI()

@app.websocket("/ws/methods_bytes")
async def methods_bytes(websocket: WebSocket):
    await websocket.accept()
    while True:
        data = await websocket.receive_bytes()
        print("Received bytes:", data)
        await websocket.send_bytes(b"Server received: " + data)

# To run: uvicorn methods_bytes_server:app --reload
