"""The app for ASGI servers: ``uvicorn roomcast.app:app``, ``hypercorn roomcast.app:app``.

Importing this module builds the app from the ``ROOMCAST_*`` environment (and generates a token
for /ws/secure if none is configured); ``import roomcast`` alone does not.
"""

from roomcast.factory import create_app

__all__ = ["app"]

app = create_app()
