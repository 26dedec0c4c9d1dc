import asyncio
from fastapi import FastAPI, WebSocket

app = FastAPI()

@app.websocket("/ws/stream")
async def stream(websocket: WebSocket):
    await websocket.accept()
    try:
        for i in range(10):
            await websocket.send_text(f"Streaming message {i+1}")
            await asyncio.sleep(1)
    except Exception as e:
        print("Error during streaming:", e)
    finally:
        await websocket.close()

# To run: uvicorn stream_server:app --reload
