"""Access control and abuse limits, against in-process servers (both WebSocket implementations)
over real sockets.

JWT verification (HS/RS/ES, JWKS by ``kid``, audience, issuer, the classic attacks), token
expiry and refresh, channel permissions, the origin check, the per-connection, per-user and
per-IP limits, the handshake and authentication deadlines, and tokens kept out of the logs.

The other suites run with anonymous access to every channel and no rate limit (see
``servers.SUITE_SETTINGS``); every server here sets its own access rules.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol

from helpers import (
    HOST,
    TIMEOUT,
    recv,
    recv_until_closed,
    ws_connect,
)
from roomcast import Settings
from servers import AppServer, ServerStarter, peer, serve

# -- keys and tokens ----------------------------------------------------------------------------

# HMAC secrets long enough for HS512 (PyJWT warns about shorter ones, and warnings are errors).
SECRET = "roomcast-test-secret-" + "5f" * 40
OTHER_SECRET = "roomcast-other-secret-" + "a7" * 40
AUDIENCE = "roomcast-tests"
ISSUER = "https://issuer.example"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC_PEM = (
    RSA_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
EC_KEYS = {kid: ec.generate_private_key(ec.SECP256R1()) for kid in ("ec-1", "ec-2")}

REFRESH_AHEAD = 2.0
AUTH_TIMEOUT = 1.0
#: How late after a configured deadline a close may come (a loaded machine); less than the
#: gap to any default, so a deadline that ignores its setting fails.
SLACK = 2.0
HANDSHAKE_TIMEOUT = 1.0
MAX_MESSAGE = 4096
MAX_SUBSCRIPTIONS = 2
PER_USER = 2
PER_IP = 3
RATE = 5
BURST = 5

#: Settings that turn anonymous access off (base_env allows every channel).
ANONYMOUS_OFF: dict[str, str | None] = {
    "ROOMCAST_ANONYMOUS_SUBSCRIBE": None,
    "ROOMCAST_ANONYMOUS_PUBLISH": None,
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def claims(
    sub: str | None = "alice",
    *,
    ttl: float = 3600,
    exp: int | None = None,
    aud: str | None = AUDIENCE,
    iss: str | None = ISSUER,
    subscribe: list[str] | None = None,
    publish: list[str] | None = None,
) -> dict[str, Any]:
    """A payload; ``None`` leaves a claim out. A random ``jti`` makes every token unique."""
    payload: dict[str, Any] = {"jti": uuid.uuid4().hex}
    if sub is not None:
        payload["sub"] = sub
    payload["exp"] = exp if exp is not None else int(time.time() + ttl)
    if aud is not None:
        payload["aud"] = aud
    if iss is not None:
        payload["iss"] = iss
    payload["subscribe"] = subscribe if subscribe is not None else ["*"]
    payload["publish"] = publish if publish is not None else ["*"]
    return payload


def hs(payload: Mapping[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(dict(payload), secret, algorithm=alg)


def rs(payload: Mapping[str, Any], key: rsa.RSAPrivateKey = RSA_KEY) -> str:
    return jwt.encode(dict(payload), key, algorithm="RS256")


def es(payload: Mapping[str, Any], kid: str, key: ec.EllipticCurvePrivateKey) -> str:
    return jwt.encode(dict(payload), key, algorithm="ES256", headers={"kid": kid})


def unsigned(payload: Mapping[str, Any]) -> str:
    """An ``alg: none`` token, built by hand."""
    return f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{b64json(dict(payload))}."


def hs_with_public_key(payload: Mapping[str, Any]) -> str:
    """HS256 signed with the RSA public key's PEM as the HMAC secret (key confusion)."""
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT'})}.{b64json(dict(payload))}"
    mac = hmac.new(RSA_PUBLIC_PEM.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def jwks_json() -> str:
    keys = []
    for kid, key in EC_KEYS.items():
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        keys.append({**jwk, "kid": kid, "alg": "ES256", "use": "sig"})
    return json.dumps({"keys": keys})


# -- servers ------------------------------------------------------------------------------------

# In-process servers serve in the module's event loop (tests/servers.py).
pytestmark = pytest.mark.asyncio(loop_scope="module")

#: Settings that turn anonymous access off (the suite's settings allow every channel).
ANONYMOUS_OFF: dict[str, Any] = {"anonymous_subscribe": [], "anonymous_publish": []}
#: roomcast's own rate limit (the suite's settings turn it off).
DEFAULT_RATE_LIMIT = Settings.model_fields["rate_limit"].default


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secured(ws_impl: str) -> AsyncIterator[AppServer]:
    """HS tokens with audience and issuer, anonymous access off, one allowed foreign origin."""
    async with serve(
        ws_impl,
        **ANONYMOUS_OFF,
        jwt_secret=SECRET,
        jwt_audience=AUDIENCE,
        jwt_issuer=ISSUER,
        refresh_ahead=REFRESH_AHEAD,
        allowed_origins=["https://app.example"],
    ) as srv:
        yield srv


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def asymmetric(
    ws_impl: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AppServer]:
    """An RSA public key (PEM text) and a JWKS of two EC keys; no HMAC secret."""
    jwks = tmp_path_factory.mktemp("jwks") / "jwks.json"
    jwks.write_text(jwks_json())
    async with serve(
        ws_impl, **ANONYMOUS_OFF, jwt_public_key=RSA_PUBLIC_PEM, jwt_jwks_file=str(jwks)
    ) as srv:
        yield srv


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def auth_deadline(ws_impl: str) -> AsyncIterator[AppServer]:
    async with serve(ws_impl, **ANONYMOUS_OFF, jwt_secret=SECRET, auth_timeout=AUTH_TIMEOUT) as srv:
        yield srv


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def public(ws_impl: str) -> AsyncIterator[AppServer]:
    """Anonymous clients may subscribe to ``public:*`` (and nothing else), within 1 s."""
    async with serve(
        ws_impl,
        **ANONYMOUS_OFF | {"anonymous_subscribe": ["public:*"]},
        jwt_secret=SECRET,
        auth_timeout=AUTH_TIMEOUT,
    ) as srv:
        yield srv


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def limits(ws_impl: str) -> AsyncIterator[AppServer]:
    """Message size, subscriptions, connections per user and the handshake deadline."""
    async with serve(
        ws_impl,
        **ANONYMOUS_OFF,
        jwt_secret=SECRET,
        rate_limit=DEFAULT_RATE_LIMIT,
        max_message_size=MAX_MESSAGE,
        max_subscriptions=MAX_SUBSCRIPTIONS,
        max_connections_per_user=PER_USER,
        handshake_timeout=HANDSHAKE_TIMEOUT,
    ) as srv:
        yield srv


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rated(ws_impl: str) -> AsyncIterator[AppServer]:
    async with serve(ws_impl, **ANONYMOUS_OFF, rate_limit=RATE, rate_burst=BURST) as srv:
        yield srv


def bearer(token: str) -> dict[str, Any]:
    return {"additional_headers": {"Authorization": f"Bearer {token}"}}


def token_subprotocols(token: str) -> dict[str, Any]:
    return {"subprotocols": [Subprotocol("roomcast"), Subprotocol(f"roomcast.token.{token}")]}


def carry(path: str, token: str, how: str) -> tuple[str, dict[str, Any]]:
    """The path and connect() arguments that present ``token`` the way ``how`` says."""
    if how == "header":
        return path, bearer(token)
    if how == "query":
        return f"{path}?token={token}", {}
    assert how == "subprotocol", how
    return path, token_subprotocols(token)


async def assert_refused(server: AppServer, path: str, **kwargs: Any) -> None:
    """The handshake is refused with HTTP 403."""
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(server, path, **kwargs):
            pass
    assert info.value.response.status_code == 403


async def closed_with(ws: ClientConnection, within: float = TIMEOUT) -> int | None:
    """Read until the server closes (failing after ``within`` seconds); its close code.

    ``within`` only bounds the wait: a test that pins *when* the close comes measures it.
    """
    try:
        await recv_until_closed(ws, within)
    except TimeoutError:
        raise AssertionError(
            f"the connection was not closed within {within:.1f}s "
            f"(close frame received from the server: {ws.protocol.close_rcvd})"
        ) from None
    return ws.close_code


async def echoes(server: AppServer, ws: ClientConnection | None = None) -> None:
    """An echo round trip, on ``ws`` or on a new connection."""
    if ws is None:
        async with ws_connect(server, "/ws/echo") as fresh:
            await echoes(server, fresh)
        return
    text = unique("still-here-")
    await ws.send(text)
    assert await recv(ws) == f"Echo: {text}"


# -- 1. JWT: valid tokens -----------------------------------------------------------------------

HOWS = ("header", "query", "subprotocol")


@pytest.mark.parametrize("how", HOWS)
async def test_valid_hs256_token_on_ws(secured: AppServer, how: str) -> None:
    user = unique("user-")
    path, kwargs = carry("/ws", hs(claims(user)), how)
    async with peer(secured, path, **kwargs) as p:
        assert p.hello["user"] == user, p.hello
        assert p.ws.subprotocol == ("roomcast" if how == "subprotocol" else None)
        await p.ping()


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
async def test_valid_hs384_and_hs512_tokens(secured: AppServer, alg: str) -> None:
    user = unique("user-")
    async with peer(secured, "/ws", **bearer(hs(claims(user), alg=alg))) as p:
        assert p.hello["user"] == user, p.hello


@pytest.mark.parametrize("how", HOWS)
async def test_valid_token_on_secure(secured: AppServer, how: str) -> None:
    user = unique("user-")
    path, kwargs = carry("/ws/secure", hs(claims(user)), how)
    async with ws_connect(secured, path, **kwargs) as ws:
        assert await recv(ws) == f"Hello, {user}! Welcome to the secure WebSocket."
        await ws.send("hi")
        assert await recv(ws) == "You said: hi"


async def test_rs256_with_public_key(asymmetric: AppServer) -> None:
    user = unique("rsa-")
    async with peer(asymmetric, "/ws", **bearer(rs(claims(user, aud=None, iss=None)))) as p:
        assert p.hello["user"] == user, p.hello


async def test_rs256_with_public_key_file(start_server: ServerStarter, tmp_path: Path) -> None:
    pem = tmp_path / "public.pem"
    pem.write_text(RSA_PUBLIC_PEM)
    srv = await start_server(**ANONYMOUS_OFF, jwt_public_key=str(pem))
    user = unique("rsa-")
    async with peer(srv, "/ws", **bearer(rs(claims(user, aud=None, iss=None)))) as p:
        assert p.hello["user"] == user, p.hello
    forged = rs(claims(user, aud=None, iss=None), OTHER_RSA_KEY)
    await assert_refused(srv, "/ws", **bearer(forged))


@pytest.mark.parametrize("kid", sorted(EC_KEYS))
async def test_es256_from_jwks_by_kid(asymmetric: AppServer, kid: str) -> None:
    user = unique("ec-")
    token = es(claims(user, aud=None, iss=None), kid, EC_KEYS[kid])
    async with peer(asymmetric, "/ws", **bearer(token)) as p:
        assert p.hello["user"] == user, p.hello
    async with ws_connect(asymmetric, f"/ws/secure?token={token}") as ws:
        assert await recv(ws) == f"Hello, {user}! Welcome to the secure WebSocket."


# -- 1. JWT: refused tokens ---------------------------------------------------------------------


def bad_token(case: str) -> str:
    """A token that must not verify on the server of its case (see REFUSED)."""
    if case == "forged":
        return hs(claims(), secret=OTHER_SECRET)
    if case == "expired":
        return hs(claims(ttl=-10))
    if case == "alg_none":
        return unsigned(claims())
    if case == "rs256_without_public_key":
        return rs(claims())
    if case == "wrong_audience":
        return hs(claims(aud="someone-else"))
    if case == "no_audience":
        return hs(claims(aud=None))
    if case == "wrong_issuer":
        return hs(claims(iss="https://evil.example"))
    if case == "no_issuer":
        return hs(claims(iss=None))
    if case == "no_exp":
        payload = claims()
        del payload["exp"]
        return hs(payload)
    if case == "no_sub":
        return hs(claims(sub=None))
    if case == "not_a_jwt":
        return unique("garbage-")
    # The server with asymmetric keys only:
    if case == "hs_rs_confusion":
        return hs_with_public_key(claims(aud=None, iss=None))
    if case == "alg_none_asymmetric":
        return unsigned(claims(aud=None, iss=None))
    if case == "rs256_other_key":
        return rs(claims(aud=None, iss=None), OTHER_RSA_KEY)
    if case == "es256_wrong_kid":
        return es(claims(aud=None, iss=None), "ec-1", EC_KEYS["ec-2"])
    if case == "es256_unknown_kid":
        return es(claims(aud=None, iss=None), "ec-9", EC_KEYS["ec-1"])
    if case == "hs256_without_secret":
        return hs(claims(aud=None, iss=None))
    raise AssertionError(case)


SECURED_CASES = [
    "forged",
    "expired",
    "alg_none",
    "rs256_without_public_key",
    "wrong_audience",
    "no_audience",
    "wrong_issuer",
    "no_issuer",
    "no_exp",
    "no_sub",
    "not_a_jwt",
]
ASYMMETRIC_CASES = [
    "hs_rs_confusion",
    "alg_none_asymmetric",
    "rs256_other_key",
    "es256_wrong_kid",
    "es256_unknown_kid",
    "hs256_without_secret",
]
TRANSPORTS = [("/ws", "header"), ("/ws", "query"), ("/ws", "subprotocol"), ("/ws/secure", "query")]


@pytest.mark.parametrize(("path", "how"), TRANSPORTS)
@pytest.mark.parametrize("case", SECURED_CASES + ASYMMETRIC_CASES)
async def test_bad_token_refused_403(
    request: pytest.FixtureRequest, ws_impl: str, case: str, path: str, how: str
) -> None:
    # ws_impl: the server fetched below is the one of this test's WebSocket implementation.
    server_name = "asymmetric" if case in ASYMMETRIC_CASES else "secured"
    srv: AppServer = request.getfixturevalue(server_name)
    full_path, kwargs = carry(path, bad_token(case), how)
    await assert_refused(srv, full_path, **kwargs)


# -- 1. JWT: expiry, refresh and in-band auth ---------------------------------------------------


def soon() -> int:
    """An ``exp`` 2.5 to 3.5 s ahead: the refresh push is due about 1 s after connecting."""
    return math.ceil(time.time() + 2.5)


async def test_token_expiry_refresh_push_then_4003(secured: AppServer) -> None:
    exp = soon()
    async with peer(secured, "/ws", **bearer(hs(claims(unique("exp-"), exp=exp)))) as p:
        push = await p.frame(within=exp - time.time() + TIMEOUT)
        arrived = time.time()
        assert push == {"type": "refresh", "expires_at": exp}
        # Due REFRESH_AHEAD before exp: neither at once nor at the end.
        assert exp - REFRESH_AHEAD - 0.3 <= arrived < exp, (arrived, exp)
        rest = await recv_until_closed(p.ws, exp - time.time() + TIMEOUT)
        closed = time.time()
        assert rest == []
        assert p.ws.close_code == 4003, (p.ws.close_code, p.ws.close_reason)
        assert closed >= exp - 0.3, (closed, exp)


async def test_fresh_token_keeps_connection_past_expiry(secured: AppServer) -> None:
    user = unique("exp-")
    exp = soon()
    async with peer(secured, "/ws", **bearer(hs(claims(user, exp=exp)))) as p:
        push = await p.frame(within=exp - time.time() + TIMEOUT)
        assert push == {"type": "refresh", "expires_at": exp}
        later = exp + 600
        result = await p.ok("auth", token=hs(claims(user, exp=later)))
        assert result == {"user": user, "expires_at": later}
        await p.quiet(exp - time.time() + 0.7)
        await p.ping()


async def test_auth_for_another_user_or_bad_token_refused(secured: AppServer) -> None:
    user = unique("alice-")
    async with peer(secured, "/ws", **bearer(hs(claims(user)))) as p:
        assert await p.fail("auth", token=hs(claims(unique("mallory-")))) == "forbidden"
        assert await p.fail("auth", token=hs(claims(user), secret=OTHER_SECRET)) == "unauthorized"
        assert await p.fail("auth", token=hs(claims(user, ttl=-10))) == "unauthorized"
        assert await p.fail("auth", token=unsigned(claims(user))) == "unauthorized"
        await p.ping()
        assert not p.pushes, p.pushes


async def test_in_band_auth_on_anonymous_connection(secured: AppServer) -> None:
    user = unique("inband-")
    async with peer(secured, "/ws") as p:
        assert p.hello["user"] is None, p.hello
        exp = int(time.time()) + 3600
        token = hs(claims(user, exp=exp, subscribe=["chat:*"], publish=["chat:lobby"]))
        assert await p.ok("auth", token=token) == {"user": user, "expires_at": exp}
        channel = unique("chat:x-")
        assert set(await p.ok("subscribe", channel=channel)) == {"epoch", "offset"}
        assert await p.fail("subscribe", channel=unique("news:x-")) == "forbidden"
        presence = await p.ok("presence", channel=channel)
        assert [c["user"] for c in presence["clients"]] == [user]


# -- 2. permissions -----------------------------------------------------------------------------


async def test_channel_permissions_of_a_jwt_user(secured: AppServer) -> None:
    token = hs(claims(unique("perm-"), subscribe=["chat:*"], publish=["chat:lobby"]))
    news = unique("news:x-")
    async with peer(secured, "/ws", **bearer(token)) as p:
        assert set(await p.ok("subscribe", channel=unique("chat:x-"))) == {"epoch", "offset"}
        assert await p.fail("subscribe", channel=news) == "forbidden"
        assert await p.fail("publish", channel=unique("chat:other-"), data=1) == "forbidden"
        assert set(await p.ok("publish", channel="chat:lobby", data=1)) == {"epoch", "offset"}
        assert await p.fail("presence", channel=news) == "forbidden"
        assert await p.fail("history", channel=news) == "forbidden"
        await p.ping()


async def test_anonymous_forbidden_by_default(secured: AppServer) -> None:
    async with peer(secured, "/ws") as p:
        assert p.hello["user"] is None, p.hello
        for channel in ("chat:lobby", unique("public:"), unique("x:")):
            assert await p.fail("subscribe", channel=channel) == "forbidden"
            assert await p.fail("publish", channel=channel, data=1) == "forbidden"
            assert await p.fail("presence", channel=channel) == "forbidden"
            assert await p.fail("history", channel=channel) == "forbidden"
        await p.ping()


async def test_anonymous_subscribe_patterns(public: AppServer) -> None:
    async with peer(public, "/ws") as p:
        assert set(await p.ok("subscribe", channel="public:news")) == {"epoch", "offset"}
        assert await p.fail("publish", channel="public:news", data=1) == "forbidden"
        assert await p.fail("subscribe", channel=unique("chat:x-")) == "forbidden"
        await p.ping()


# -- 3. origin check ----------------------------------------------------------------------------


def same_origin(server: AppServer) -> str:
    return f"http://{HOST}:{server.port}"


@pytest.mark.parametrize("path", ["/ws", "/ws/echo"])
@pytest.mark.parametrize("origin", ["http://evil.example", "null", "https://app.example.evil"])
async def test_foreign_origin_refused(secured: AppServer, path: str, origin: str) -> None:
    await assert_refused(secured, path, origin=Origin(origin))


@pytest.mark.parametrize("path", ["/ws", "/ws/echo"])
@pytest.mark.parametrize("origin", ["same", "none", "https://app.example"])
async def test_allowed_origin(secured: AppServer, path: str, origin: str) -> None:
    kwargs: dict[str, Any] = {}
    if origin == "same":
        kwargs["origin"] = Origin(same_origin(secured))
    elif origin != "none":
        kwargs["origin"] = Origin(origin)
    if path == "/ws":
        async with peer(secured, path, **kwargs) as p:
            await p.ping()
    else:
        async with ws_connect(secured, path, **kwargs) as ws:
            await echoes(secured, ws)


# -- 4. limits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ws", "/ws/echo"])
async def test_message_over_size_limit_closes_1009(limits: AppServer, path: str) -> None:
    token = hs(claims(unique("size-"), aud=None, iss=None))
    async with peer(limits, "/ws", **bearer(token)) as bystander:
        async with ws_connect(limits, path, **bearer(token)) as ws:
            await ws.send("x" * (MAX_MESSAGE + 1))
            assert await closed_with(ws) == 1009, ws.close_reason
        await bystander.ping()
        await echoes(limits)


async def test_too_many_subscriptions(limits: AppServer) -> None:
    token = hs(claims(unique("subs-"), aud=None, iss=None, subscribe=["lim:*"]))
    async with peer(limits, "/ws", **bearer(token)) as p:
        for _ in range(MAX_SUBSCRIPTIONS):
            await p.ok("subscribe", channel=unique("lim:"))
        assert await p.fail("subscribe", channel=unique("lim:")) == "too_many_subscriptions"
        await p.ping()


async def test_rate_limit_on_ws(rated: AppServer) -> None:
    async with peer(rated, "/ws") as bystander, peer(rated, "/ws") as p:
        ids = [f"p{n}" for n in range(30)]
        for rid in ids:
            await p.send({"id": rid, "op": "ping"})

        async def keep_flooding() -> None:
            for n in itertools.count():
                await p.send({"id": f"more{n}", "op": "ping"})
                await asyncio.sleep(0.01)

        flood = asyncio.ensure_future(keep_flooding())
        try:
            frames = await recv_until_closed(p.ws)
        finally:
            flood.cancel()
            await asyncio.gather(flood, return_exceptions=True)
        assert p.ws.close_code == 4029, (p.ws.close_code, p.ws.close_reason)
        replies = [json.loads(f) for f in frames]
        seen = [r["id"] for r in replies]
        assert len(seen) == len(set(seen)), seen
        ok = [r["id"] for r in replies if r.get("ok") is True]
        limited = [r for r in replies if r.get("ok") is False]
        assert ok[:BURST] == ids[:BURST], replies
        assert limited, replies
        for reply in limited:
            assert reply["error"]["code"] == "rate_limited", reply
            assert reply["id"] in ids, reply
        await bystander.ping()


async def test_rate_limit_on_echo(rated: AppServer) -> None:
    # The client waits longer than TIMEOUT for the server's end of the closing handshake, so
    # a server that does not finish it in time fails here rather than races the client.
    flooder = ws_connect(rated, "/ws/echo", close_timeout=3 * TIMEOUT)
    async with ws_connect(rated, "/ws/echo") as bystander, flooder as ws:
        for n in range(30):
            await ws.send(f"m{n}")
        assert await closed_with(ws) == 1008, ws.close_reason
        await echoes(rated, bystander)


async def wait_connections(server: AppServer, n: int) -> None:
    await server.await_stats(lambda s: s["connections"] == n, what=f"{n} connections")


async def test_connections_per_user(limits: AppServer) -> None:
    user = unique("many-")
    token = hs(claims(user, aud=None, iss=None))
    await wait_connections(limits, 0)
    async with AsyncExitStack() as stack:
        held = [
            await stack.enter_async_context(peer(limits, "/ws", **bearer(token)))
            for _ in range(PER_USER)
        ]
        # The user's slots are taken: a third connection is accepted, then closed.
        async with ws_connect(limits, "/ws", **bearer(token)) as third:
            assert await closed_with(third) == 4009, third.close_reason
        async with ws_connect(limits, f"/ws/secure?token={token}") as third:
            assert await closed_with(third) == 1008, third.close_reason
        for p in held:
            await p.ping()
        # Another user is not affected.
        async with peer(
            limits, "/ws", **bearer(hs(claims(unique("other-"), aud=None, iss=None)))
        ) as other:
            await other.ping()
        await held.pop().ws.close()
        await wait_connections(limits, PER_USER - 1)
        async with peer(limits, "/ws", **bearer(token)) as again:
            await again.ping()
        await wait_connections(limits, PER_USER - 1)
        async with ws_connect(limits, f"/ws/secure?token={token}") as secure:
            assert await recv(secure) == f"Hello, {user}! Welcome to the secure WebSocket."


async def test_connections_per_ip(start_server: ServerStarter) -> None:
    srv = await start_server(**ANONYMOUS_OFF, max_connections_per_ip=PER_IP)
    async with AsyncExitStack() as stack:
        held = [await stack.enter_async_context(ws_connect(srv, "/ws/echo")) for _ in range(PER_IP)]
        async with ws_connect(srv, "/ws/echo") as extra:
            assert await closed_with(extra) == 1008, extra.close_reason
        async with ws_connect(srv, "/ws") as extra:
            assert await closed_with(extra) == 4009, extra.close_reason
        for ws in held:
            await echoes(srv, ws)
        await held.pop().close()
        await wait_connections(srv, PER_IP - 1)
        async with peer(srv, "/ws") as p:
            await p.ping()


async def test_handshake_timeout(limits: AppServer) -> None:
    started = time.monotonic()
    silent = await asyncio.open_connection(HOST, limits.port)
    partial = await asyncio.open_connection(HOST, limits.port)
    partial[1].write(
        f"GET /ws/echo HTTP/1.1\r\nHost: {HOST}:{limits.port}\r\nUpgrade: websocket\r\n".encode()
    )
    await partial[1].drain()
    try:
        # A normal client is served meanwhile.
        await echoes(limits)

        async def dropped(reader: asyncio.StreamReader) -> float:
            try:
                data = await reader.read(65536)
            except ConnectionResetError:
                data = b""
            assert data == b"", data
            return time.monotonic() - started

        async with asyncio.timeout(HANDSHAKE_TIMEOUT + TIMEOUT):
            elapsed = await asyncio.gather(dropped(silent[0]), dropped(partial[0]))
        for seconds in elapsed:
            assert HANDSHAKE_TIMEOUT - 0.2 <= seconds <= HANDSHAKE_TIMEOUT + TIMEOUT, elapsed
    finally:
        for _, writer in (silent, partial):
            writer.close()


async def test_auth_timeout_closes_4002(auth_deadline: AppServer) -> None:
    started = time.monotonic()
    async with peer(auth_deadline, "/ws") as p:
        assert await closed_with(p.ws, AUTH_TIMEOUT + TIMEOUT) == 4002, p.ws.close_reason
        # At the deadline: not before it, and not at some other (default) deadline after it.
        elapsed = time.monotonic() - started
        assert AUTH_TIMEOUT - 0.2 <= elapsed <= AUTH_TIMEOUT + SLACK, elapsed


async def test_auth_in_time_stays_open(auth_deadline: AppServer) -> None:
    user = unique("intime-")
    async with peer(auth_deadline, "/ws") as p:
        assert (await p.ok("auth", token=hs(claims(user, aud=None, iss=None))))["user"] == user
        await p.quiet(2 * AUTH_TIMEOUT)
        await p.ping()


async def test_subscribed_in_time_stays_open(public: AppServer) -> None:
    async with peer(public, "/ws") as p:
        await p.ok("subscribe", channel=unique("public:"))
        await p.quiet(2 * AUTH_TIMEOUT)
        await p.ping()


# -- 5. tokens never in logs --------------------------------------------------------------------


async def test_tokens_never_in_logs(secured: AppServer) -> None:
    user = unique("logged-")
    good = [hs(claims(user)) for _ in range(4)]
    bad = [hs(claims(user), secret=OTHER_SECRET), unique("not-a-jwt-"), hs(claims(user, ttl=-5))]
    offset = secured.log_offset()
    async with peer(secured, f"/ws?token={good[0]}") as p:
        assert p.hello["user"] == user
    async with peer(secured, "/ws", **token_subprotocols(good[1])) as p:
        assert p.hello["user"] == user
    async with peer(secured, "/ws", **bearer(good[3])) as p:
        assert p.hello["user"] == user
        # A bad token sent in-band.
        assert await p.fail("auth", token=bad[0]) == "unauthorized"
    async with ws_connect(secured, f"/ws/secure?token={good[2]}") as ws:
        assert await recv(ws) == f"Hello, {user}! Welcome to the secure WebSocket."
    for token in bad:
        await assert_refused(secured, f"/ws?token={token}")
        await assert_refused(secured, "/ws", **token_subprotocols(token))
        await assert_refused(secured, f"/ws/secure?token={token}")
        await assert_refused(secured, "/ws", **bearer(token))
    # Every refusal is logged (once its close went out): wait for the lines, then look.
    refusals = 4 * len(bad)
    deadline = time.monotonic() + TIMEOUT
    while secured.log_since(offset).count("refused with HTTP 403") < refusals:
        assert time.monotonic() < deadline, secured.log_since(offset)
        await asyncio.sleep(0.05)
    text = secured.log_since(offset)
    for token in good + bad:
        assert token not in text, f"a token is in the server log:\n{text}"
        # Nor its signature alone (a log line cut or reformatted around it).
        signature = token.rpartition(".")[2]
        if len(signature) > 16:
            assert signature not in text, f"a token signature is in the server log:\n{text}"
