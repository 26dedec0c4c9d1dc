"""roomcast's own guards in auth.py, checked directly (not only through PyJWT's).

PyJWT refuses ``alg: none`` and a key of the wrong type by itself today, so a test that only
sends such tokens to a server passes with roomcast's guards deleted. These call the guards, so
they keep holding if the library changes. Also: the origin check's host-and-port rule, and a
JWK's ``alg`` pinning the key to that one algorithm (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from helpers import HOST, ws_connect
from roomcast.auth import GUEST_KID, MAX_EXP, Authenticator, AuthError, origin_allowed
from roomcast.errors import ConfigurationError
from roomcast.settings import Settings
from servers import ServerStarter, in_server_loop

SECRET = "pins-secret-" + "s" * 40
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def payload(user: str = "pat") -> dict[str, Any]:
    return {"sub": user, "exp": int(time.time()) + 600}


# -- origin: the server's own origin is its host AND port ------------------------------------------


def scope(host: str | None, origin: str | None) -> dict[str, Any]:
    headers = []
    if host is not None:
        headers.append((b"host", host.encode("latin-1")))
    if origin is not None:
        headers.append((b"origin", origin.encode("latin-1")))
    return {"type": "websocket", "headers": headers}


@pytest.mark.parametrize(
    ("host", "origin", "allowed"),
    [
        ("127.0.0.1:8000", "http://127.0.0.1:8000", True),
        ("127.0.0.1:8000", "http://127.0.0.1:8001", False),  # same host, other port
        ("127.0.0.1:8000", "http://127.0.0.1", False),  # same host, default port
        ("example.com", "https://example.com:443", True),  # default port spelt out
        ("example.com", "https://example.com:8443", False),
        ("example.com:80", "http://example.com", True),
        ("example.com", "http://example.com:8080", False),
        ("EXAMPLE.com:8000", "http://example.COM:8000", True),  # case does not matter
        ("[::1]:8000", "http://[::1]:8000", True),
        ("[::1]:8000", "http://[::1]:9000", False),
        ("127.0.0.1:8000", "http://127.0.0.2:8000", False),  # other host, same port
        (None, "http://127.0.0.1:8000", False),  # no Host: nothing to compare with
        ("127.0.0.1:8000", "null", False),
        ("", "http:", False),  # no host on either side is no match
        ("", "//", False),
        ("127.0.0.1:8000", None, True),  # no Origin: not a browser
    ],
)
def test_own_origin_is_host_and_port(host: str | None, origin: str | None, allowed: bool) -> None:
    assert origin_allowed(scope(host, origin), []) is allowed


def test_allowed_origins_list() -> None:
    listed = ["https://app.example", "http://localhost:3000"]
    assert origin_allowed(scope("h:1", "https://APP.example"), listed)
    assert origin_allowed(scope("h:1", "https://app.example/"), listed)  # path ignored
    assert not origin_allowed(scope("h:1", "https://app.example:444"), listed)
    assert not origin_allowed(scope("h:1", "http://app.example"), listed)  # scheme counts
    assert not origin_allowed(scope("h:1", "http://localhost:3001"), listed)
    assert not origin_allowed(scope("h:1", "null"), listed)
    assert origin_allowed(scope("h:1", "null"), ["null"])  # listed as written
    assert origin_allowed(scope("h:1", "https://anything.example"), ["*"])


@in_server_loop
async def test_same_host_other_port_refused_by_a_server(start_server: ServerStarter) -> None:
    server = await start_server(allowed_origins=[])
    async with ws_connect(server, "/ws/echo", origin=Origin(f"http://{HOST}:{server.port}")):
        pass
    for other in (server.port + 1, 80):
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(server, "/ws/echo", origin=Origin(f"http://{HOST}:{other}")):
                pass
        assert refused.value.response.status_code == 403


# -- JWT: roomcast's guards, called directly ------------------------------------------------------


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    """A JWKS of one RSA key pinned to RS256 ("alg") and one P-256 EC key."""
    rsa_jwk = RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True)
    ec_jwk = jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key(), as_dict=True)
    keys = [{**rsa_jwk, "kid": "rsa-pinned", "alg": "RS256"}, {**ec_jwk, "kid": "ec-any"}]
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    return path


@pytest.mark.parametrize("alg", ["none", "None", "NONE", None, 256])
def test_key_for_refuses_no_algorithm(alg: object) -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET, jwt_public_key=pem(RSA_KEY)))
    # Refused by roomcast's own first guard, before any key is looked for.
    with pytest.raises(AuthError, match=r"^token algorithm not accepted$"):
        auth._key_for(alg, None)


def test_key_for_matches_the_algorithm_to_the_key(jwks_file: Path) -> None:
    auth = Authenticator(Settings(jwt_public_key=pem(RSA_KEY), jwt_jwks_file=str(jwks_file)))
    # No secret: no HMAC algorithm, whatever the key (the HS/RS confusion).
    for alg in ("HS256", "HS384", "HS512"):
        with pytest.raises(AuthError, match=f"{alg} not accepted"):
            auth._key_for(alg, None)
    # The public key is RSA: RSA algorithms only.
    assert auth._key_for("RS256", None) is auth._key_for("PS512", None)
    for alg in ("ES256", "EdDSA", "XS256"):
        with pytest.raises(AuthError, match="not accepted for this key"):
            auth._key_for(alg, None)
    # A kid that names a JWK picks it: its type decides, and a pinned alg is the only one.
    auth._key_for("RS256", "rsa-pinned")
    for alg in ("PS256", "RS384", "RS512", "ES256"):
        with pytest.raises(AuthError, match="not accepted for this key"):
            auth._key_for(alg, "rsa-pinned")
    auth._key_for("ES256", "ec-any")  # (PyJWT takes a P-256 JWK's alg from its curve)
    with pytest.raises(AuthError, match="not accepted for this key"):
        auth._key_for("RS256", "ec-any")
    # An unknown kid falls back to the public key.
    auth._key_for("RS256", "no-such-kid")


def test_key_for_without_any_public_key() -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET))
    assert auth._key_for("HS256", None) == SECRET
    with pytest.raises(AuthError, match="no key for this token"):
        auth._key_for("RS256", None)


def test_a_jwk_alg_pins_its_key(jwks_file: Path) -> None:
    """PS256 signed with the RS256-pinned key's private half: same key, other algorithm."""
    auth = Authenticator(Settings(jwt_jwks_file=str(jwks_file)))
    good = jwt.encode(payload(), RSA_KEY, algorithm="RS256", headers={"kid": "rsa-pinned"})
    assert auth.verify(good).user == "pat"
    other = jwt.encode(payload(), RSA_KEY, algorithm="PS256", headers={"kid": "rsa-pinned"})
    with pytest.raises(AuthError, match="PS256 not accepted for this key"):
        auth.verify(other)


def test_verify_refuses_what_the_guards_refuse(jwks_file: Path) -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET, jwt_jwks_file=str(jwks_file)))
    header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    body = jwt.utils.base64url_encode(json.dumps(payload()).encode()).decode()
    with pytest.raises(AuthError, match="algorithm not accepted"):
        auth.verify(f"{header}.{body}.")
    hs = jwt.encode(payload(), SECRET, algorithm="HS256")
    assert auth.verify(hs).kind == "jwt"
    es = jwt.encode(payload(), EC_KEY, algorithm="ES256", headers={"kid": "rsa-pinned"})
    with pytest.raises(AuthError, match="ES256 not accepted for this key"):
        auth.verify(es)


# -- configuration and guest keys -----------------------------------------------------------------


@pytest.mark.parametrize("content", [None, "not json", '{"keys": "nope"}'])
def test_a_bad_jwks_file_is_a_configuration_error(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigurationError, match="ROOMCAST_JWT_JWKS_FILE"):
        Authenticator(Settings(jwt_jwks_file=str(path)))


GUEST_SECRET = "guest-" + "k" * 64


@pytest.mark.parametrize(
    ("settings", "signed_with"),
    [
        ({"guest_channels": ["room:*"], "guest_secret": GUEST_SECRET}, GUEST_SECRET),
        ({"guest_channels": ["room:*"], "jwt_secret": SECRET}, SECRET),
        (
            {"guest_channels": ["room:*"], "jwt_secret": SECRET, "guest_secret": GUEST_SECRET},
            GUEST_SECRET,
        ),
    ],
)
def test_guest_tokens_are_signed_with_the_guest_key(
    settings: dict[str, Any], signed_with: str
) -> None:
    auth = Authenticator(Settings(**settings))
    token, grant = auth.issue_guest("ann")
    claims = jwt.decode(token, signed_with, algorithms=["HS256"])
    assert claims["sub"] == grant.user
    assert grant.subscribe.patterns == grant.publish.patterns == ("room:*",)
    assert auth.verify(token).kind == "guest"


def test_guest_key_made_up_when_none_is_configured() -> None:
    auth = Authenticator(Settings(guest_channels=["room:*"], tokens={"t": "u"}))
    token, _ = auth.issue_guest("ann")
    assert auth.verify(token).user.startswith("ann#")  # type: ignore[union-attr]
    other = Authenticator(Settings(guest_channels=["room:*"], tokens={"t": "u"}))
    with pytest.raises(AuthError):
        other.verify(token)  # another server's made-up key


def test_guest_tokens_only_hs256_and_only_when_guests_are_on() -> None:
    auth = Authenticator(Settings(guest_channels=["room:*"], guest_secret=GUEST_SECRET))
    for alg in ("HS384", "HS512"):
        token = jwt.encode(payload(), GUEST_SECRET, algorithm=alg, headers={"kid": GUEST_KID})
        with pytest.raises(AuthError, match="guest tokens are not accepted"):
            auth.verify(token)
    off = Authenticator(Settings(guest_channels=[], jwt_secret=GUEST_SECRET))
    token = jwt.encode(payload(), GUEST_SECRET, algorithm="HS256", headers={"kid": GUEST_KID})
    with pytest.raises(AuthError, match="guest tokens are not accepted"):
        off.verify(token)


def test_guest_tokens_need_no_audience_nor_issuer() -> None:
    """``ROOMCAST_JWT_AUDIENCE``/``_ISSUER`` are for the identity provider's tokens; the
    server's own guest tokens carry neither and are still accepted."""
    auth = Authenticator(
        Settings(
            guest_channels=["room:*"],
            jwt_secret=SECRET,
            jwt_audience="roomcast",
            jwt_issuer="https://idp.example",
        )
    )
    token, grant = auth.issue_guest("ann")
    assert auth.verify(token).user == grant.user
    # ... while a JWT of the identity provider needs both.
    with pytest.raises(AuthError, match="'aud'"):
        auth.verify(jwt.encode({**payload(), "iss": "https://idp.example"}, SECRET))
    with pytest.raises(AuthError, match="'iss'"):
        auth.verify(jwt.encode({**payload(), "aud": "roomcast"}, SECRET))
    full = {**payload(), "aud": "roomcast", "iss": "https://idp.example"}
    assert auth.verify(jwt.encode(full, SECRET)).kind == "jwt"


def signed(claims_json: str, secret: str = SECRET) -> str:
    """An HS256 token over ``claims_json`` as written (numbers JSON encoders would refuse)."""
    b64 = jwt.utils.base64url_encode
    header = b64(b'{"alg":"HS256","typ":"JWT"}').decode()
    signing = header + "." + b64(claims_json.encode()).decode()
    mac = hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest()
    return signing + "." + b64(mac).decode()


@pytest.mark.parametrize(
    ("exp", "refusal"),
    [
        (str(MAX_EXP - 1), None),
        (str(MAX_EXP), "'exp' is out of range"),  # the latest exp taken is below 2**40
        (str(2**64), "'exp' is out of range"),
        (str(10**400), "'exp' is out of range"),
        ("1e12", None),  # a float of integral value, within range
        ("1e300", "'exp' is out of range"),
        ("1e400", "invalid token"),  # infinity once parsed: PyJWT refuses it itself
    ],
)
def test_exp_out_of_range_is_refused(exp: str, refusal: str | None) -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET))
    token = signed(f'{{"sub": "pat", "exp": {exp}}}')
    if refusal is None:
        assert auth.verify(token).user == "pat"
    else:
        with pytest.raises(AuthError, match=refusal):
            auth.verify(token)


@pytest.mark.parametrize("error", [ValueError, TypeError, OverflowError])
def test_a_claim_the_library_chokes_on_is_an_auth_error(
    monkeypatch: pytest.MonkeyPatch, error: type[Exception]
) -> None:
    """Older PyJWT raised OverflowError for an absurd number in a claim; roomcast's own guard
    turns whatever such error into a refusal (not a 500 or a traceback)."""
    auth = Authenticator(Settings(jwt_secret=SECRET))

    def choke(*args: Any, **kwargs: Any) -> Any:
        raise error("absurd")

    monkeypatch.setattr(jwt, "decode", choke)
    with pytest.raises(AuthError, match="a claim is out of range"):
        auth.verify(signed('{"sub": "pat", "exp": 1}'))


def test_other_invalid_tokens_are_auth_errors() -> None:
    """Whatever PyJWT refuses is an AuthError with its kind, never another exception."""
    auth = Authenticator(Settings(jwt_secret=SECRET))
    later = {**payload(), "nbf": int(time.time()) + 600}
    with pytest.raises(AuthError, match="invalid token: ImmatureSignatureError"):
        auth.verify(jwt.encode(later, SECRET))
    with pytest.raises(AuthError, match="invalid token: DecodeError"):
        auth.verify(signed('{"sub": "pat", "exp": "soon"}'))


@pytest.mark.parametrize("sub", ["", "   ", "\t"])
def test_a_blank_sub_is_refused(sub: str) -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET))
    with pytest.raises(AuthError, match="'sub' claim must be a non-empty string"):
        auth.verify(jwt.encode({**payload(), "sub": sub}, SECRET))
    assert auth.verify(jwt.encode({**payload(), "sub": " x "}, SECRET)).user == " x "


@pytest.mark.parametrize(
    "claim", [{"subscribe": ["a*b"]}, {"publish": [""]}, {"subscribe": "*"}, {"publish": [1]}]
)
def test_a_bad_channel_claim_is_refused(claim: dict[str, Any]) -> None:
    auth = Authenticator(Settings(jwt_secret=SECRET))
    with pytest.raises(AuthError, match="bad channel claim"):
        auth.verify(jwt.encode({**payload(), **claim}, SECRET))
    good = auth.verify(jwt.encode({**payload(), "subscribe": ["a*"], "publish": ["b"]}, SECRET))
    assert good.subscribe.allows("a1")
    assert not good.subscribe.allows("b")
    assert good.publish.allows("b")
    assert not good.publish.allows("a1")


def test_the_claims_roomcast_requires_of_pyjwt(monkeypatch: pytest.MonkeyPatch) -> None:
    """What roomcast asks PyJWT to require and check (PyJWT enforces ``aud``/``iss`` itself
    today when they are configured; the request keeps it so if that changes)."""
    asked: list[dict[str, Any]] = []
    decode = jwt.decode

    def recording(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs)
        return decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", recording)
    auth = Authenticator(
        Settings(
            guest_channels=["room:*"],
            jwt_secret=SECRET,
            jwt_audience="roomcast",
            jwt_issuer="https://idp.example",
        )
    )
    full = {**payload(), "aud": "roomcast", "iss": "https://idp.example"}
    auth.verify(jwt.encode(full, SECRET))
    options = asked[-1]["options"]
    assert sorted(options["require"]) == ["aud", "exp", "iss", "sub"]
    assert options["verify_sub"] is True
    assert (asked[-1]["audience"], asked[-1]["issuer"]) == ("roomcast", "https://idp.example")
    assert asked[-1]["algorithms"] == ["HS256"]
    token, _ = auth.issue_guest("ann")
    auth.verify(token)
    assert sorted(asked[-1]["options"]["require"]) == ["exp", "sub"]
    assert (asked[-1]["audience"], asked[-1]["issuer"]) == (None, None)
