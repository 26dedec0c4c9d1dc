"""The ``roomcast`` commands for people, and the load generator they share with benchmarks/.

``connect``, ``publish``, ``presence``, ``history`` and ``bench`` are declared in
:mod:`roomcast.cli` and run here; each command imports its module when it runs, so starting the
server (``roomcast serve``, ``roomcast.app:app``, :func:`roomcast.create_app`) loads none of this
package, nor httpx and Rich (tests/test_imports.py checks it).

- :mod:`roomcast.tools.console`: what the commands print, and their exit codes.
- :mod:`roomcast.tools.connect`: ``roomcast connect``.
- :mod:`roomcast.tools.api`: ``roomcast publish``, ``presence`` and ``history`` (the HTTP API).
- :mod:`roomcast.tools.bench`: ``roomcast bench echo`` and ``bench fanout``.
- :mod:`roomcast.tools.results`: their results, as a table, JSON or a latency histogram.
- :mod:`roomcast.tools.loadgen`: what every load generator does the same way, whatever its
  WebSocket client (``roomcast bench`` uses websockets, benchmarks/ uses picows).
"""
