from fastapi import FastAPI, WebSocket

app = FastAPI()

@app.websocket("/ws/methods_json")
async def methods_json(websocket: WebSocket):
    await websocket.accept()
    while True:
        data = await websocket.receive_json()
        print("Received JSON:", data)
        response = {"message": "Server received your JSON", "data": data}
        await websocket.send_json(response)

# To run: uvicorn methods_json_server:app --reload
