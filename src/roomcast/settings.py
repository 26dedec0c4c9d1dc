"""One settings object for the whole server.

Every field can be set with an environment variable ``ROOMCAST_<FIELD>`` (``ROOMCAST_TOKENS``
takes JSON), and the CLI's flags override the environment.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from roomcast.errors import ConfigurationError

__all__ = ["Settings"]

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]
LogFormat = Literal["text", "json"]
#: "roomcast" is roomcast's own WebSocket protocol (pre-framed fan-out, hardened parsing); the
#: others are uvicorn's, on which roomcast falls back to plain ASGI sends.
WsImplementation = Literal["roomcast", "websockets-sansio", "websockets", "wsproto"]

#: Broker URL schemes whose rooms and channels are shared between processes.
SHARED_BROKER_SCHEMES: frozenset[str] = frozenset(
    {"redis", "rediss", "redis+cluster", "rediss+cluster"}
)


class Settings(BaseSettings):
    """roomcast's configuration (environment prefix ``ROOMCAST_``)."""

    model_config = SettingsConfigDict(env_prefix="ROOMCAST_", extra="forbid")

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    workers: int = Field(
        1, ge=1, le=64, description="Worker processes; above 1 needs a shared broker."
    )
    broker_url: str = Field(
        "memory://",
        description="Where rooms and channels live: memory:// (this process), redis://host:port "
        "or redis+cluster://host:port[,host:port...] (a Redis Cluster).",
    )
    presence_ttl: float = Field(
        30.0,
        ge=1,
        le=3600,
        description="Seconds after which a dead node's presence entries expire (shared broker).",
    )
    tokens: dict[str, str] = Field(
        default_factory=dict,
        description='Tokens for /ws/secure as JSON {"token": "user"}; empty: one is generated.',
    )
    max_message_size: int = Field(
        1024 * 1024, ge=125, description="Largest message a client may send, in bytes."
    )
    outbox_size: int = Field(
        1024,
        ge=1,
        description="Frames queued for one connection before it is cut (chat 1013, /ws 4008).",
    )
    outbox_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description=(
            "Bytes one connection's outbox and transport buffer may hold before it is cut "
            "(chat 1013, /ws 4008); an empty outbox takes any one message."
        ),
    )
    max_subscriptions: int = Field(
        128, ge=1, description="Channels one /ws connection may subscribe to."
    )
    max_publication_size: int = Field(
        65536, ge=16, description="Largest publication data, in bytes of JSON."
    )
    channel_max_length: int = Field(128, ge=1, le=1024, description="Longest channel name.")
    history_size: int = Field(256, ge=0, description="Publications kept per channel.")
    history_ttl: float = Field(3600.0, gt=0, description="Seconds a publication is kept.")
    history_channels: int = Field(
        10000, ge=1, description="Channels whose history the memory:// broker keeps."
    )
    history_bytes: int = Field(
        1024 * 1024,
        ge=0,
        description="Bytes of publication data kept per channel (the oldest go first).",
    )
    history_total_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description=(
            "Bytes of history the memory:// broker keeps in all (past it, the oldest "
            "publications of the least recently published channels go first)."
        ),
    )
    history_meta_ttl: float = Field(
        30 * 86400.0,
        gt=0,
        description=(
            "Seconds a channel's position (epoch, offset) outlives its last use in a shared "
            "broker; never less than the history TTL."
        ),
    )
    api_key: SecretStr | None = Field(
        None, description="Turns the HTTP API on; requests must carry it as a Bearer token."
    )
    max_body_size: int | None = Field(
        None,
        ge=1,
        description=(
            "Largest HTTP request body (the API, guest sign-in), in bytes (413 over it); unset: "
            "2 x max_publication_size + 1000 x (channel_max_length + 3) + 64 KiB."
        ),
    )
    body_timeout: float = Field(
        10.0, gt=0, description="Seconds an HTTP request body may take to arrive (408 after)."
    )
    jwt_secret: SecretStr | None = Field(
        None, description="Secret for HS256/HS384/HS512 tokens on /ws and /ws/secure."
    )
    jwt_public_key: str | None = Field(
        None,
        description="PEM public key (or a path to one) for RS/PS/ES/EdDSA tokens.",
    )
    jwt_jwks_file: str | None = Field(
        None, description="A JWKS file (JSON) of public keys, chosen by the token's 'kid'."
    )
    jwt_audience: str | None = Field(None, description="When set, tokens must carry this 'aud'.")
    jwt_issuer: str | None = Field(None, description="When set, tokens must carry this 'iss'.")
    jwt_leeway: float = Field(
        0.0, ge=0, le=300, description="Seconds of clock skew allowed on 'exp' and 'nbf'."
    )
    refresh_ahead: float = Field(
        30.0,
        ge=0,
        description="Seconds before a token expires that /ws sends a 'refresh' push.",
    )
    anonymous_subscribe: list[str] = Field(
        default_factory=list,
        description='Channels anonymous /ws clients may subscribe to (JSON, e.g. ["public:*"]).',
    )
    anonymous_publish: list[str] = Field(
        default_factory=list, description="Channels anonymous /ws clients may publish to."
    )
    guest_channels: list[str] | None = Field(
        None,
        description=(
            "Channels of the guest sign-in that the page at / uses (POST /auth/guest); "
            'unset: ["room:*"] while no token or JWT key is configured, else off; [] turns it off.'
        ),
    )
    guest_secret: SecretStr | None = Field(
        None,
        description="Signs guest tokens; default: ROOMCAST_JWT_SECRET, else made up at start.",
    )
    guest_ttl: float = Field(3600.0, gt=0, description="Seconds a guest token lasts.")
    guest_rate: float = Field(
        2.0, ge=0, description="Guest sign-ins per second from one client address; 0: no limit."
    )
    guest_burst: int = Field(
        10, ge=1, description="Guest sign-ins one client address may make at once."
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed besides the server's own (JSON list; * for any).",
    )
    rate_limit: float = Field(
        100.0, ge=0, description="Messages per second one connection may send; 0: no limit."
    )
    rate_burst: int = Field(200, ge=1, description="Messages a connection may send at once.")
    max_connections_per_user: int = Field(
        100, ge=0, description="Connections one user may hold on this node; 0: no limit."
    )
    max_connections_per_ip: int = Field(
        0, ge=0, description="Connections one IP address may hold on this node; 0: no limit."
    )
    auth_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a /ws connection without a token has to authenticate or subscribe.",
    )
    ping_interval: float = Field(20.0, ge=0, description="Seconds between server pings; 0: off.")
    ping_timeout: float = Field(20.0, gt=0, description="Seconds to wait for a pong.")
    drain_timeout: float = Field(
        5.0, ge=0, description="Seconds handlers get to finish after a shutdown signal."
    )
    stream_max_count: int = Field(1000, ge=1, description="Largest count /ws/stream accepts.")
    stream_max_interval: float = Field(
        60.0, ge=0, description="Largest interval /ws/stream accepts, in seconds."
    )
    ws: WsImplementation = Field(
        "roomcast", description="WebSocket implementation: roomcast's own, or one of uvicorn's."
    )
    handshake_timeout: float = Field(
        10.0, gt=0, description="Seconds a request head (the upgrade included) may take."
    )
    close_timeout: float = Field(
        5.0, gt=0, description="Seconds the peer gets to answer a close frame."
    )
    tune_gc: bool = Field(
        True,
        description="Freeze the objects made at start and raise the garbage collector's "
        "thresholds (20000, 20, 20): fewer, shorter pauses under load; off to leave the "
        "process's collector alone.",
    )
    log_level: LogLevel = Field("info", description="Log level of the server.")
    log_format: LogFormat = Field(
        "text", description="Log lines for people (text) or one JSON object per line (json)."
    )
    access_log: bool = Field(True, description="Log every request and handshake.")
    metrics: bool = Field(
        True, description="Serve Prometheus metrics at GET /metrics (no key: firewall it)."
    )

    @field_validator("tokens")
    @classmethod
    def _tokens_not_blank(cls, tokens: dict[str, str]) -> dict[str, str]:
        for token, user in tokens.items():
            if not token.strip() or not user.strip():
                raise ValueError("tokens and user names must not be blank")
        return tokens

    @field_validator("anonymous_subscribe", "anonymous_publish", "guest_channels")
    @classmethod
    def _patterns(cls, patterns: list[str] | None) -> list[str] | None:
        for pattern in patterns or ():
            if not pattern or "*" in pattern[:-1]:
                raise ValueError(f"{pattern!r}: a channel name, or a prefix ending in '*'")
        return patterns

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, url: str) -> str:
        scheme = url.partition("://")[0]
        if scheme != "memory" and scheme not in SHARED_BROKER_SCHEMES:
            raise ValueError(
                f"unsupported broker {url!r}: use memory://, redis://host:port[/db] "
                "(rediss:// for TLS) or redis+cluster://host:port[,host:port...]"
            )
        return url

    @model_validator(mode="after")
    def _workers_need_a_shared_broker(self) -> Settings:
        # The guide's biggest trap: rooms held in one process's memory silently split across
        # workers, so members on different workers never see each other. Refuse it.
        if self.workers > 1 and self.broker_scheme not in SHARED_BROKER_SCHEMES:
            raise ConfigurationError(
                f"--workers {self.workers} refused: with broker {self.broker_url} every worker "
                "process keeps its own rooms in memory, so chat members connected to different "
                "workers would never see each other's messages. Run one worker (the default), "
                "or configure a shared broker with --broker / ROOMCAST_BROKER_URL "
                "(redis://host:port)."
            )
        return self

    @property
    def guests(self) -> list[str]:
        """The channels of guest sign-in; empty when it is off."""
        if self.guest_channels is not None:
            return self.guest_channels
        configured = self.tokens or self.jwt_secret or self.jwt_public_key or self.jwt_jwks_file
        return [] if configured else ["room:*"]

    @property
    def body_limit(self) -> int:
        """The largest HTTP request body: :attr:`max_body_size`, or enough for the largest
        publication (written with spaces or escapes) or a broadcast to 1000 channels."""
        if self.max_body_size is not None:
            return self.max_body_size
        return 2 * self.max_publication_size + 1000 * (self.channel_max_length + 3) + 65536

    @property
    def broker_display(self) -> str:
        """:attr:`broker_url` without credentials, for logs."""
        scheme, _, rest = self.broker_url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    @property
    def broker_scheme(self) -> str:
        """The scheme of :attr:`broker_url`, e.g. ``memory``."""
        return self.broker_url.partition("://")[0]
