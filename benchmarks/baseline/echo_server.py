from fastapi import FastAPI, WebSocket

app = FastAPI()

@app.websocket("/ws/echo")
async def websocket_echo(websocket: WebSocket):
    await websocket.accept()
    while True:
        # Receive a text message from the client
        data = await websocket.receive_text()
        # Send the text message back with an "Echo:" prefix
        await websocket.send_text(f"Echo: {data}")

# To run: uvicorn echo_server:app --reload
