"""``roomcast publish``, ``presence`` and ``history``: the server's HTTP API from a terminal.

Each command makes one request (docs/endpoints.md, "HTTP API") and prints the answer as a
sentence or a table, or as it came with ``--json``. Every failure is told in words that say
what to do (a missing key, the API turned off, a broker down) and exits 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from rich.table import Table

from roomcast.tools.console import EXIT_USAGE, compact, fail, print_json, stdout

__all__ = ["Api", "history", "presence", "publish"]


@dataclass(frozen=True)
class Api:
    """Where the API is (``url``, without ``/api``), its key, and how long an answer may take."""

    url: str
    api_key: str | None
    timeout: float

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the API and return the JSON answer; on any failure say why and exit 1."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        target = self.url.rstrip("/") + path
        try:
            response = httpx.request(
                method, target, headers=headers, timeout=self.timeout, **kwargs
            )
        except httpx.InvalidURL as error:
            fail(f"bad --url {self.url!r}: {error}")
        except httpx.HTTPError as error:
            fail(f"cannot reach {self.url}: {error or type(error).__name__}")
        if response.status_code == 200:
            try:
                return response.json()
            except ValueError:
                fail(f"{target} answered 200 but not with JSON: is this a roomcast server?")
        fail(self._problem(response, target))

    def _problem(self, response: httpx.Response, target: str) -> str:
        """What an answer other than 200 means, in words that say what to do."""
        status, detail = response.status_code, _detail(response)
        if status == 401:
            given = "was refused" if self.api_key else "is required"
            return f"HTTP 401: an API key {given}: give --api-key or set ROOMCAST_API_KEY"
        if status == 404 and "API is off" in detail:
            return "HTTP 404: the HTTP API is off on this server (start it with ROOMCAST_API_KEY)"
        if status == 404:
            return f"HTTP 404: {target} not found: is {self.url} a roomcast server?"
        if status == 422:
            return f"HTTP 422: the server refused the request: {detail}"
        if status == 503:
            return f"HTTP 503: the server's broker is unavailable right now; retry later ({detail})"
        return f"HTTP {status}: {detail or response.reason_phrase}"


def _detail(response: httpx.Response) -> str:
    """The ``detail`` of an error answer, in one line."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return response.text.strip()[:200]
    if isinstance(detail, list):  # FastAPI's validation errors
        parts = []
        for problem in detail:
            where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body")
            parts.append(f"{where}: {problem.get('msg')}" if where else str(problem.get("msg")))
        return "; ".join(parts)
    return str(detail) if detail is not None else ""


def publish(api: Api, channel: str, data: str, as_json: bool) -> None:
    """Publish ``data`` (JSON, or else a JSON string) to ``channel`` (POST /api/publish)."""
    try:
        value: Any = json.loads(data)
    except ValueError:
        value = data
    result = api.call("POST", "/api/publish", json={"channel": channel, "data": value})
    if as_json:
        print_json(result)
        return
    stdout().print(
        f"published to {channel}: offset {result.get('offset')} (epoch {result.get('epoch')})",
        markup=False,
    )


def presence(api: Api, channel: str, as_json: bool) -> None:
    """Print who is subscribed to ``channel`` (GET /api/presence/CHANNEL)."""
    result = api.call("GET", f"/api/presence/{quote(channel, safe='')}")
    if as_json:
        print_json(result)
        return
    clients = result.get("clients", [])
    out = stdout()
    if not clients:
        out.print(f"nobody is subscribed to {channel}", markup=False)
        return
    table = Table(title=f"presence on {channel}: {len(clients)} client(s)")
    table.add_column("client", style="cyan")
    table.add_column("user")
    table.add_column("connected at")
    for client in clients:
        user = client.get("user")
        table.add_row(
            str(client.get("client")),
            "(anonymous)" if user is None else str(user),
            str(client.get("connected_at")),
        )
    out.print(table)


def history(
    api: Api, channel: str, limit: int, since: int | None, before: int | None, as_json: bool
) -> None:
    """Print the stored publications of ``channel`` (GET /api/history/CHANNEL)."""
    if since is not None and before is not None:
        fail("give --since or --before, not both", EXIT_USAGE)
    params: dict[str, int] = {"limit": limit}
    if since is not None:
        params["since"] = since
    if before is not None:
        params["before"] = before
    result = api.call("GET", f"/api/history/{quote(channel, safe='')}", params=params)
    if as_json:
        print_json(result)
        return
    publications = result.get("publications", [])
    where = (
        f"epoch {result.get('epoch')}, latest offset {result.get('offset')}, "
        f"oldest kept {result.get('start')}"
    )
    out = stdout()
    if not publications:
        out.print(f"no publications in {channel} ({where})", markup=False)
        return
    table = Table(title=f"history of {channel}", caption=where)
    table.add_column("offset", justify="right", style="cyan")
    table.add_column("client")
    table.add_column("user")
    table.add_column("data", overflow="fold")
    for publication in publications:
        info = publication.get("info") or {}
        client, user = info.get("client"), info.get("user")
        table.add_row(
            str(publication.get("offset")),
            "(HTTP API)" if client is None else str(client),
            str(user) if user is not None else ("" if client is None else "(anonymous)"),
            compact(publication.get("data")),
        )
    out.print(table)
