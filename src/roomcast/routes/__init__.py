"""roomcast's routes: the guide's endpoints (classic) and operational HTTP endpoints (ops)."""
