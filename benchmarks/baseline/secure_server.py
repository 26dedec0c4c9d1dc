from fastapi import FastAPI, WebSocket, Query, HTTPException, WebSocketDisconnect

app = FastAPI()

async def get_current_user(token: str = Query(...)):
    if token != "secret-token":
        raise HTTPException(status_code=400, detail="Invalid token")
    return {"user": "authenticated_user"}

@app.websocket("/ws/secure")
async def secure_endpoint(websocket: WebSocket, token: str = Query(...)):
    try:
        user = await get_current_user(token)
    except HTTPException:
        await websocket.close(code=1008)  # Policy Violation
        return

    await websocket.accept()
    await websocket.send_text(f"Hello, {user['user']}! Welcome to the secure WebSocket.")
    try:
        while True:
            data = await websocket.receive_text()
            await websocket.send_text(f"You said: {data}")
    except WebSocketDisconnect:
        print("Client disconnected")

# To run: uvicorn secure_server:app --reload
