"""Who a connection is and what it may do: tokens, channel permissions, origins.

Three kinds of identity (docs/security.md):

- **JWT** (``ROOMCAST_JWT_SECRET`` for HS256/384/512, ``ROOMCAST_JWT_PUBLIC_KEY`` or
  ``ROOMCAST_JWT_JWKS_FILE`` for RS/PS/ES/EdDSA), verified with PyJWT. The algorithm a token
  names decides the key, never the other way round: an HMAC token is only ever checked with the
  secret, an asymmetric one only with a public key of a matching type, and ``alg: none`` is
  never accepted. ``sub`` is the user and ``exp`` is required; the ``subscribe`` and
  ``publish`` claims list the channels the user may use (exact names, ``prefix*`` patterns
  such as ``chat:*``, or ``*``).
- **Static tokens** (``ROOMCAST_TOKENS``, the guide's way): a user with every channel.
- **Anonymous**: the channels of ``ROOMCAST_ANONYMOUS_SUBSCRIBE`` / ``_PUBLISH`` (none by
  default).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from starlette.types import Scope

from roomcast.errors import ConfigurationError
from roomcast.settings import Settings

__all__ = [
    "SUBPROTOCOL",
    "TOKEN_SUBPROTOCOL_PREFIX",
    "AuthError",
    "Authenticator",
    "ChannelPatterns",
    "Grant",
    "TokenTable",
    "origin_allowed",
    "token_from_scope",
]

#: The subprotocol a browser offers (with a token entry) and the server selects.
SUBPROTOCOL: Final = "roomcast"
#: ``Sec-WebSocket-Protocol: roomcast, roomcast.token.<token>`` carries a token.
TOKEN_SUBPROTOCOL_PREFIX: Final = "roomcast.token."

#: The ``kid`` of guest tokens (``POST /auth/guest``): signed and checked with the guest key.
GUEST_KID: Final = "roomcast-guest"
#: A guest's chosen name: what the page shows before the ``#`` and random id of its user.
GUEST_NAME: Final = re.compile(r"[A-Za-z0-9 _.-]{1,32}")
#: Random bytes in a guest's user id (``ann#<16 hex digits>``). 64 bits: a million guests of
#: one name share an id with a probability of about 3e-8; 16 bits gave a shared id (and a
#: shared per-user connection limit) every few hundred sign-ins.
GUEST_ID_BYTES: Final = 8

#: The user a generated static token stands for; the guide's name for its one user.
GENERATED_TOKEN_USER: Final = "authenticated_user"

#: The latest ``exp`` taken (year 36812): beyond it timers and replies overflow.
MAX_EXP: Final = 2**40
HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS: Final = frozenset({"ES256", "ES384", "ES512"})
OKP_ALGORITHMS: Final = frozenset({"EdDSA"})


class AuthError(Exception):
    """A token that does not authenticate anyone; the message says why (never the token).

    ``kind`` is the metrics' ``reason`` label (:data:`roomcast.counters.AUTH_REASONS`):
    ``unknown_token``, ``expired``, ``bad_signature`` or ``other``.
    """

    def __init__(self, message: str, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind


class ChannelPatterns:
    """A set of channel patterns: exact names, ``prefix*`` and ``*``."""

    __slots__ = ("_all", "_exact", "_prefixes", "patterns")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._all = False
        exact: set[str] = set()
        prefixes: list[str] = []
        for pattern in self.patterns:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError("channel patterns must be non-empty strings")
            star = pattern.find("*")
            if star == -1:
                exact.add(pattern)
            elif star != len(pattern) - 1:
                raise ValueError(f"{pattern!r}: '*' may only end a pattern")
            elif pattern == "*":
                self._all = True
            else:
                prefixes.append(pattern[:-1])
        self._exact = frozenset(exact)
        self._prefixes = tuple(prefixes)

    def allows(self, channel: str) -> bool:
        """Whether ``channel`` matches one of the patterns."""
        return self._all or channel in self._exact or channel.startswith(self._prefixes)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __repr__(self) -> str:
        return f"ChannelPatterns({list(self.patterns)!r})"


EVERYTHING: Final = ChannelPatterns(["*"])
NOTHING: Final = ChannelPatterns([])


@dataclass(frozen=True, slots=True)
class Grant:
    """What a connection is allowed: its user, its channels, until when."""

    user: str | None
    subscribe: ChannelPatterns
    publish: ChannelPatterns
    #: Unix time the grant ends (a JWT's ``exp``); ``None``: never.
    expires_at: float | None = None
    kind: Literal["anonymous", "static", "jwt", "guest"] = "anonymous"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """Static tokens, looked up by digest.

    Keying the table by SHA-256 of the token means a lookup's timing depends on the digest,
    never on how many leading characters of a real token a guess got right.
    """

    __slots__ = ("_users", "generated")

    def __init__(self, tokens: dict[str, str]) -> None:
        #: The token made up at start when none was configured (printed once, never stored).
        self.generated: str | None = None
        if not tokens:
            self.generated = secrets.token_urlsafe(24)
            tokens = {self.generated: GENERATED_TOKEN_USER}
        self._users = {_digest(token): user for token, user in tokens.items()}

    def user(self, token: str | None) -> str | None:
        """The user ``token`` belongs to, or ``None``."""
        if not token:
            return None
        return self._users.get(_digest(token))


def _key_algorithms(key: Any) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return EC_ALGORITHMS
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return OKP_ALGORITHMS
    raise ConfigurationError(f"unsupported public key type {type(key).__name__}")


def _load_public_key(value: str) -> Any:
    text = value if value.lstrip().startswith("-----BEGIN") else Path(value).read_text()
    try:
        return load_pem_public_key(text.encode())
    except ValueError as error:
        raise ConfigurationError(
            f"ROOMCAST_JWT_PUBLIC_KEY is not a PEM public key: {error}"
        ) from None


class Authenticator:
    """Turns a token into a :class:`Grant`, or refuses it with :class:`AuthError`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tokens = TokenTable(settings.tokens)
        self.anonymous = Grant(
            None,
            ChannelPatterns(settings.anonymous_subscribe),
            ChannelPatterns(settings.anonymous_publish),
        )
        self._secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        self._public: tuple[Any, frozenset[str]] | None = None
        if settings.jwt_public_key:
            key = _load_public_key(settings.jwt_public_key)
            self._public = (key, _key_algorithms(key))
        self._jwks: dict[str, tuple[Any, frozenset[str]]] = {}
        if settings.jwt_jwks_file:
            try:
                keyset = jwt.PyJWKSet.from_json(Path(settings.jwt_jwks_file).read_text())
            except (OSError, jwt.PyJWKSetError, json.JSONDecodeError) as error:
                raise ConfigurationError(f"ROOMCAST_JWT_JWKS_FILE: {error}") from None
            for jwk in keyset.keys:
                if jwk.key_id:
                    algs = _key_algorithms(jwk.key)
                    if jwk.algorithm_name in algs:
                        # A key that names its algorithm is used for that one only.
                        algs = frozenset({jwk.algorithm_name})
                    self._jwks[jwk.key_id] = (jwk.key, algs)
        self.jwt_enabled = bool(self._secret or self._public or self._jwks)
        #: Guest sign-in (the page at ``/``): its channels, and the key of its tokens.
        guests = settings.guests
        self.guest_channels = ChannelPatterns(guests)
        self._guest_key: str | None = None
        if guests:
            if settings.guest_secret is not None:
                self._guest_key = settings.guest_secret.get_secret_value()
            else:
                self._guest_key = self._secret or secrets.token_urlsafe(32)

    @property
    def guests_enabled(self) -> bool:
        return self._guest_key is not None

    def issue_guest(self, name: str, user: str | None = None) -> tuple[str, Grant]:
        """A guest token for ``name`` (a new user ``name#`` + 16 random hex digits), or
        renewed for ``user``."""
        assert self._guest_key is not None
        if user is None:
            user = f"{name}#{secrets.token_hex(GUEST_ID_BYTES)}"
        expires_at = int(time.time() + self.settings.guest_ttl)
        token = jwt.encode(
            {"sub": user, "exp": expires_at, "iat": int(time.time())},
            self._guest_key,
            algorithm="HS256",
            headers={"kid": GUEST_KID},
        )
        grant = Grant(user, self.guest_channels, self.guest_channels, expires_at, "guest")
        return token, grant

    def verify(self, token: str) -> Grant:
        """The grant of ``token`` (static or JWT); raises :class:`AuthError`."""
        user = self.tokens.user(token)
        if user is not None:
            return Grant(user, EVERYTHING, EVERYTHING, None, "static")
        if not self.jwt_enabled and self._guest_key is None:
            raise AuthError("unknown token", "unknown_token")
        return self._verify_jwt(token)

    def _verify_jwt(self, token: str) -> Grant:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("unknown token", "unknown_token") from None
        alg = header.get("alg")
        guest = header.get("kid") == GUEST_KID
        if guest:
            if self._guest_key is None or alg != "HS256":
                raise AuthError("guest tokens are not accepted")
            key: Any = self._guest_key
        else:
            key = self._key_for(alg, header.get("kid"))
        settings = self.settings
        required = ["exp", "sub"]
        if settings.jwt_audience and not guest:
            required.append("aud")
        if settings.jwt_issuer and not guest:
            required.append("iss")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[str(alg)],
                audience=None if guest else settings.jwt_audience,
                issuer=None if guest else settings.jwt_issuer,
                leeway=settings.jwt_leeway,
                options={"require": required, "verify_sub": True},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired", "expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token not meant for this server (aud)") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token from an unknown issuer (iss)") from None
        except jwt.MissingRequiredClaimError as error:
            raise AuthError(f"token lacks the {error.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature does not verify", "bad_signature") from None
        except jwt.PyJWTError as error:
            raise AuthError(f"invalid token: {type(error).__name__}") from None
        except (ValueError, TypeError, OverflowError):  # e.g. an absurd number in a claim
            raise AuthError("invalid token: a claim is out of range") from None
        exp = claims["exp"]
        if type(exp) not in (int, float) or not 0 <= exp < MAX_EXP:
            raise AuthError("invalid token: 'exp' is out of range")
        user = claims.get("sub")
        if not isinstance(user, str) or not user.strip():
            raise AuthError("the 'sub' claim must be a non-empty string")
        if guest:
            channels = self.guest_channels
            return Grant(user, channels, channels, float(claims["exp"]), "guest")
        try:
            subscribe = ChannelPatterns(_claim_list(claims, "subscribe"))
            publish = ChannelPatterns(_claim_list(claims, "publish"))
        except ValueError as error:
            raise AuthError(f"bad channel claim: {error}") from None
        return Grant(user, subscribe, publish, float(claims["exp"]), "jwt")

    def _key_for(self, alg: object, kid: object) -> Any:
        if not isinstance(alg, str) or alg.lower() == "none":
            raise AuthError("token algorithm not accepted")
        if alg in HMAC_ALGORITHMS:
            if self._secret is None:
                raise AuthError(f"token algorithm {alg} not accepted")
            return self._secret
        if isinstance(kid, str) and kid in self._jwks:
            key, algs = self._jwks[kid]
        elif self._public is not None:
            key, algs = self._public
        else:
            raise AuthError("no key for this token")
        if alg not in algs:
            raise AuthError(f"token algorithm {alg} not accepted for this key")
        return key


def _claim_list(claims: dict[str, Any], name: str) -> list[str]:
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{name!r} must be a list of strings")
    return value


def now() -> float:
    """Unix time (separate so expiry logic reads as one clock)."""
    return time.time()


# -- handshake helpers -----------------------------------------------------------------------


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def token_from_scope(scope: Scope, query: dict[str, str]) -> tuple[str | None, str | None]:
    """The handshake's token and the subprotocol to select: ``(token, subprotocol)``.

    Looked for in ``Authorization: Bearer``, then ``Sec-WebSocket-Protocol`` (an entry
    ``roomcast.token.<token>``), then the ``token`` query parameter. The subprotocol is
    ``roomcast`` when the client offered it (browsers require the server to pick one of theirs).
    """
    offered: list[str] = list(scope.get("subprotocols") or ())
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
    authorization = _header(scope, b"authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip(), subprotocol
    for entry in offered:
        if entry.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return entry[len(TOKEN_SUBPROTOCOL_PREFIX) :], subprotocol
    return query.get("token"), subprotocol


def _origin_key(origin: str) -> str | None:
    parts = urlsplit(origin.strip().lower())
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}"


def origin_allowed(scope: Scope, allowed: Iterable[str]) -> bool:
    """Whether a handshake's ``Origin`` may connect.

    No ``Origin`` header (a non-browser client) is allowed; so is the server's own origin (its
    host and port equal the ``Host`` header) and every origin listed in ``allowed`` (``*`` lets
    any origin in). Anything else, ``Origin: null`` included, is a cross-site page.
    """
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    allowed = list(allowed)
    if "*" in allowed:
        return True
    key = _origin_key(origin)
    if key is None:
        return origin.strip() in allowed
    if key in {_origin_key(item) for item in allowed}:
        return True
    host = _header(scope, b"host")
    if host is None:
        return False
    netloc = key.partition("://")[2]
    scheme = key.partition("://")[0]
    default_port = {"http": "80", "https": "443"}.get(scheme)
    host = host.strip().lower()
    if default_port and ":" not in host.rpartition("]")[2]:
        host = f"{host}:{default_port}"
    if default_port and ":" not in netloc.rpartition("]")[2]:
        netloc = f"{netloc}:{default_port}"
    return netloc == host
