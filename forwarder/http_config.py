"""[http]: the one aiohttp server (intake, health, metrics, queries, the status page).

Kept out of config.py so the HTTP face can grow without touching the core config;
`Settings` carries it as `http: HttpConfig = Field(default_factory=HttpConfig, ...)`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import Field, IPvAnyNetwork, field_validator, model_validator

from forwarder.alarms.secrets import SecretError, read_secret_file
from forwarder.config_types import Name, Section

__all__ = ["HttpConfig", "TokenError", "parse_listen"]

EnvName = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
Origin = Annotated[str, Field(min_length=1, max_length=2048)]

MIN_TOKEN_CHARS = 16  # a shorter token is guessable; refused at start


class TokenError(Exception):
    """The tokens cannot be loaded; the message names the variable or file, never a token."""


def parse_listen(listen: str) -> tuple[str, int]:
    """ "127.0.0.1:8686", "[::1]:8686", ":8686" (all interfaces) -> (host, port)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"{listen!r}: use host:port, e.g. 127.0.0.1:8686")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"{listen!r}: port must be 0..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)  # ValueError names the bad address
    return host or "0.0.0.0", port


class HttpConfig(Section):
    """[http]: where the server listens, who may use it and how much it accepts."""

    enabled: bool = Field(
        False, description="serve HTTP (intake, /health, /metrics, queries, status page)"
    )
    listen: str = Field(
        "127.0.0.1:8686",
        description='host:port to listen on ("[::1]:8686" for IPv6, ":8686" for every '
        "interface); port 0 picks a free one",
    )
    tokens_env: EnvName | None = Field(
        "FORWARDER_HTTP_TOKENS",
        description="environment variable holding comma-separated bearer tokens; unset or "
        "empty: no token is required",
    )
    tokens_file: Path | None = Field(
        None,
        description="file holding comma- or newline-separated tokens; when set, used "
        "instead of tokens_env (a missing file is an error at start)",
    )
    ingest_requires_token: bool = Field(
        True,
        description="with tokens configured, POST /logs/ingest needs one too; false lets "
        "browsers send without one (a token in page JavaScript is public anyway: rely on "
        "cors_origins and rate_per_min), while reads and resets still need it",
    )
    cors_origins: list[Origin] = Field(
        default_factory=list,
        description='origins allowed to call from a browser, e.g. "https://panel.example.com"; '
        '"*" allows any',
    )
    max_body_bytes: int = Field(
        262_144,
        ge=1024,
        le=4 * 1024 * 1024,
        description="largest POST /logs/ingest body (after decompression); larger is 413",
    )
    rate_per_min: int = Field(
        120,
        ge=0,
        description="POST /logs/ingest requests per minute per client IP (bursts up to "
        "the same number); over it: 429 with Retry-After; 0 disables the limit",
    )
    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description='reverse proxies in front of the forwarder, e.g. "10.0.0.0/8": for '
        "a request from one of them the client IP (for the rate limit) is the rightmost "
        "X-Forwarded-For address that is not a trusted proxy; empty: the peer's address",
    )
    service: Name = Field("ui", description="service written on every row from POST /logs/ingest")
    source_name: Name = Field(
        "http", description="source name of the intake; keys its spool checkpoint"
    )
    spool_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024 * 1024,
        description="bytes the intake spool (data_dir/spool/http-<source_name>) may hold "
        "while the database is behind; when full, ingest answers 503 with Retry-After",
    )
    recent_max_limit: int = Field(
        500, ge=1, le=10_000, description="most rows GET /logs/recent returns"
    )
    retry_after_s: int = Field(
        5, ge=1, le=3600, description="Retry-After of a 503 (spool full, stopping, database down)"
    )

    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="a connection must send a complete request head within this many "
        "seconds of opening, or of its previous response, else it is closed (slow or "
        "trickled headers, idle keep-alive connections)",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="a request body must arrive whole within this many seconds of its "
        "head, else 408 and the connection is closed (an unread body: closed)",
    )
    max_connections: int = Field(
        512,
        ge=1,
        le=1_000_000,
        description="open connections in all; one more is answered 503 and closed "
        "(keep it well under the open-files limit the start-up log shows)",
    )
    max_connections_per_client: int = Field(
        64,
        ge=1,
        le=1_000_000,
        description="open connections from one client address; one more is answered "
        "429 and closed; trusted_proxies count only against max_connections",
    )
    max_buffered_body_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="request body bytes held in memory by every request being read "
        "together; a body that does not fit is 503 with Retry-After",
    )
    max_open_files: int = Field(
        0,
        ge=0,
        description="the daemon raises its open-files soft limit (RLIMIT_NOFILE) at "
        "start to this number, or to the hard limit when 0 or above it; the start-up "
        "log says the limit",
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and ("://" not in origin or origin.endswith("/")):
                raise ValueError(
                    f'{origin!r}: an origin is scheme://host[:port] with no path, or "*"'
                )
        return origins

    @model_validator(mode="after")
    def _bounds(self) -> HttpConfig:
        if self.spool_max_bytes < 4 * self.max_body_bytes:
            raise ValueError("spool_max_bytes must be at least 4 times max_body_bytes")
        if self.max_connections_per_client > self.max_connections:
            raise ValueError("max_connections_per_client must be at most max_connections")
        if self.max_buffered_body_bytes < self.max_body_bytes:
            raise ValueError("max_buffered_body_bytes must be at least max_body_bytes")
        if self.tokens_file is not None and "tokens_env" in self.model_fields_set:
            raise ValueError("set only one of tokens_env, tokens_file")
        return self

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    def load_tokens(self, environ: Mapping[str, str] | None = None) -> frozenset[str]:
        """The configured tokens (empty: no token required). TokenError names the problem."""
        if self.tokens_file is not None:
            path = self.tokens_file
            try:
                text = read_secret_file("http.tokens_file", path)
            except SecretError as e:
                raise TokenError(str(e)) from None
            where = f"http.tokens_file ({path})"
        elif self.tokens_env is not None:
            text = (os.environ if environ is None else environ).get(self.tokens_env, "")
            where = f"http.tokens_env ({self.tokens_env})"
        else:
            return frozenset()
        tokens = frozenset(t.strip() for t in text.replace("\n", ",").split(",") if t.strip())
        short = [t for t in tokens if len(t) < MIN_TOKEN_CHARS]
        if short:
            raise TokenError(
                f"{where}: {len(short)} token(s) shorter than {MIN_TOKEN_CHARS} characters"
            )
        return tokens
