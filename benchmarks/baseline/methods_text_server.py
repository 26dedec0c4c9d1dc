from fastapi import FastAPI, WebSocket

app = FastAPI()

@app.websocket("/ws/methods_text")
async def methods_text(websocket: WebSocket):
    await websocket.accept()
    while True:
        message = await websocket.receive_text()
        print("Received text:", message)
        await websocket.send_text(f"Server received: {message}")

# To run: uvicorn methods_text_server:app --reload
