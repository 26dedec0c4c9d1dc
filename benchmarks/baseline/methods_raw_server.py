from fastapi import FastAPI, WebSocket

app = FastAPI()

@app.websocket("/ws/methods_raw")
async def methods_raw(websocket: WebSocket):
    await websocket.accept()
    while True:
        # Receive raw data (a dict containing either "text" or "bytes")
        message = await websocket.receive()
        print("Received raw data:", message)
        
        if "text" in message:
            response = {"type": "websocket.send", "text": f"Raw echo: {message['text']}"}
        elif "bytes" in message:
            response = {"type": "websocket.send", "bytes": b"Raw echo: " + message["bytes"]}
        else:
            response = {"type": "websocket.send", "text": "Unknown message type."}
        
        await websocket.send(response)

# To run: uvicorn methods_raw_server:app --reload
