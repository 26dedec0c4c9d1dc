"""Embed roomcast in your own FastAPI app.

Run:  uvicorn examples.embed:app --port 8000
Then: python -m websockets ws://127.0.0.1:8000/rt/ws/chat/lobby
"""

from fastapi import FastAPI

from roomcast import Settings, create_app

app = FastAPI(title="my app")
app.mount("/rt", create_app(Settings(tokens={"my-token": "alice"})))


@app.get("/")
async def index() -> dict[str, str]:
    """Your own routes live next to roomcast's."""
    return {"chat": "/rt/ws/chat/lobby", "secure": "/rt/ws/secure?token=my-token"}
