"""roomcast's HTTP and WebSocket endpoints: the guide's (guide), ``/ws`` (channels), the HTTP
API (api), operations (ops) and the web page (web)."""
