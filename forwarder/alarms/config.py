"""Configuration of sampling, alarms, notifiers, probes and privacy.

The section models of the TOML keys `[sampling]`, `[[alarms]]`, `[notifiers.NAME]`,
`[probes.NAME]` and `[privacy]`. `AlarmSettings` groups them and checks the cross
references (an alarm's actions name defined notifiers, a health alarm names a defined
probe); `alarm_reference_problems` is the same check for a settings tree that holds
the five sections at its top level.

Secrets never appear in the TOML: every secret is a reference, `*_env` (the name of an
environment variable) or `*_file` (a file whose content is the secret), read at start
by `forwarder.alarms.secrets`. There is no field that takes a secret literally.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from forwarder.alarms.secrets import resolve_secret
from forwarder.config_types import Name, Section
from forwarder.event import Level

EnvName = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
MetaKey = Annotated[str, Field(min_length=1, max_length=255)]
MetaValue = str | int | float | bool
Severity = Literal["critical", "error", "warning", "info"]

# Header names that carry credentials: they must come from a *_env / *_file reference.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "cookie"})


def _one_of(model: Section, *keys: str, required: bool = True) -> None:
    given = [k for k in keys if getattr(model, k) is not None]
    if len(given) > 1:
        raise ValueError(f"set only one of {', '.join(keys)} (got {', '.join(given)})")
    if required and not given:
        raise ValueError(f"one of {', '.join(keys)} is required")


def _compile(key: str, pattern: str | None) -> str | None:
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{key} is not a valid regex: {e}") from None
    return pattern


# --- sampling and privacy -------------------------------------------------------------------


class SamplingConfig(Section):
    """[sampling]: per-service volume control for the database (alarms see every event)."""

    threshold_per_min: int = Field(
        500, ge=1, description="per service: at or under this many lines a minute, keep all"
    )
    never_sample: list[Level] = Field(
        default_factory=lambda: [Level.WARNING, Level.ERROR],
        description="levels always kept, whatever the volume",
    )
    window_s: float = Field(
        60.0, gt=0, le=3600, description="the sliding window volume is counted on"
    )
    seed: int | None = Field(
        None, description="seed of the sampling decisions (fixed: reproducible runs and tests)"
    )


class PrivacyConfig(Section):
    """[privacy]: user identifiers replaced by a keyed hash before storage and grouping."""

    user_keys: list[MetaKey] = Field(
        default_factory=lambda: ["user_id"], description="meta keys that identify a user"
    )
    services: list[Name] = Field(
        default_factory=lambda: ["ui"], description="services whose events are pseudonymized"
    )
    hmac_key_env: EnvName | None = Field(
        "PRIVACY_HMAC_KEY",
        description="environment variable holding the HMAC-SHA256 key (keep it stable: "
        "a new key makes every user a new group)",
    )
    hmac_key_file: Path | None = Field(
        None, description="file holding the key; when set, used instead of hmac_key_env"
    )

    @model_validator(mode="after")
    def _key(self) -> PrivacyConfig:
        if self.hmac_key_file is not None and "hmac_key_env" in self.model_fields_set:
            raise ValueError("set only one of hmac_key_env, hmac_key_file")
        if self.hmac_key_file is None and self.hmac_key_env is None and self.enabled():
            raise ValueError("one of hmac_key_env, hmac_key_file is required")
        return self

    def enabled(self) -> bool:
        return bool(self.services and self.user_keys)

    def load_key(self, environ: Mapping[str, str] | None = None) -> bytes | None:
        """The HMAC key as bytes; None when nothing is to be hashed.

        Raises SecretError naming the variable or file when the key is missing: the
        daemon must refuse to start rather than store user identifiers in clear.
        """
        if not self.enabled():
            return None
        env = None if self.hmac_key_file is not None else self.hmac_key_env
        return resolve_secret(
            "privacy.hmac_key", env=env, file=self.hmac_key_file, environ=environ
        ).encode()


# --- alarms -----------------------------------------------------------------------------------


class MatchConfig(Section):
    """Which events a rule counts: every given criterion must hold (AND)."""

    service: Name | None = Field(None, description="event service equals this")
    level: Level | list[Level] | None = Field(
        None, description='event level is this one (or one of these): "ERROR", ["WARNING","ERROR"]'
    )
    event: str | None = Field(None, description="event key equals this")
    message: str | None = Field(
        None, description="regex searched in the message (Python syntax, re.search)"
    )
    meta: dict[MetaKey, MetaValue] = Field(
        default_factory=dict, description="meta keys that must equal these values"
    )

    @field_validator("message")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        return _compile("message", v)

    def levels(self) -> frozenset[Level] | None:
        if self.level is None:
            return None
        return frozenset(self.level) if isinstance(self.level, list) else frozenset({self.level})


class _AlarmBase(Section):
    name: Name = Field(description="unique rule name; the system_checks name and dedup key")
    actions: list[Name] = Field(
        default_factory=list,
        description="notifier names ([notifiers.NAME]) told on fire, repeat and resolve",
    )
    severity: Severity = Field(
        "error", description="critical | error | warning | info (PagerDuty's severities)"
    )
    repeat_s: float = Field(
        3600.0,
        gt=0,
        description="while still firing, notify again at most this often; also the least "
        "time between two firing notices of one rule and group across resolve/re-fire",
    )
    resolve_after_s: float = Field(
        300.0, ge=0, description="resolved once the condition has been absent this long"
    )
    summary: str | None = Field(
        None, max_length=500, description="text notifications show instead of the generated one"
    )


class ThresholdAlarmConfig(_AlarmBase):
    """At least `threshold` matching events within `window_s` (per group_by value)."""

    type: Literal["threshold"]
    match: MatchConfig = Field(description="which events count")
    threshold: int = Field(ge=1, le=1_000_000, description="events within window_s that fire")
    window_s: float = Field(60.0, gt=0, le=86400, description="the sliding window, seconds")
    group_by: MetaKey | None = Field(
        None,
        description="meta key: count each value apart (e.g. user_id); events without it "
        "are not counted",
    )
    max_groups: int = Field(
        10_000, ge=1, description="groups held at most; the least recently used are dropped"
    )


class ConsecutiveAlarmConfig(_AlarmBase):
    """`count` consecutive cycles that each contain a matching event; a clean cycle resets."""

    type: Literal["consecutive"]
    match: MatchConfig = Field(description="the event that makes a cycle bad")
    count: int = Field(3, ge=1, le=10_000, description="consecutive bad cycles that fire")
    end_event: str | None = Field(
        None, description="event key that ends a cycle (the end event belongs to its cycle)"
    )
    cycle_key: MetaKey | None = Field(
        None, description="meta key holding the cycle id: a new value starts a new cycle"
    )
    cycle_service: Name | None = Field(
        None,
        description="service whose events make up the cycles; default: match.service "
        "(else every service)",
    )
    group_by: MetaKey | None = Field(
        None, description="meta key: cycles counted apart per value (e.g. worker_id)"
    )
    max_groups: int = Field(
        1_000, ge=1, description="groups held at most; the least recently used are dropped"
    )

    @model_validator(mode="after")
    def _delimiter(self) -> ConsecutiveAlarmConfig:
        _one_of(self, "end_event", "cycle_key")
        return self


class HealthAlarmConfig(_AlarmBase):
    """A probe ([probes.NAME]) fails `failures` times in a row."""

    type: Literal["health"]
    probe: Name = Field(description="the probe whose results are watched")
    failures: int = Field(1, ge=1, le=1000, description="consecutive failed results that fire")


AlarmConfig = Annotated[
    ThresholdAlarmConfig | ConsecutiveAlarmConfig | HealthAlarmConfig,
    Field(discriminator="type"),
]


# --- notifiers --------------------------------------------------------------------------------


class _NotifierBase(Section):
    timeout_s: float = Field(10.0, gt=0, le=300, description="one delivery attempt at most")
    retries: int = Field(3, ge=0, le=20, description="attempts after the first failed one")
    backoff_s: float = Field(
        1.0, gt=0, le=300, description="wait before the first retry; doubles each time"
    )


def _headers(v: dict[str, str]) -> dict[str, str]:
    for name in v:
        if name.lower() in _SECRET_HEADERS:
            raise ValueError(
                f"header {name!r} carries a credential: use the *_env / *_file reference"
            )
    return v


class SlackNotifierConfig(_NotifierBase):
    type: Literal["slack"]
    webhook_url_env: EnvName | None = Field(
        None, description="environment variable holding the incoming-webhook URL"
    )
    webhook_url_file: Path | None = Field(None, description="file holding the webhook URL")
    channel: str | None = Field(None, description="override of the webhook's channel")

    @model_validator(mode="after")
    def _secret(self) -> SlackNotifierConfig:
        _one_of(self, "webhook_url_env", "webhook_url_file")
        return self


class PagerDutyNotifierConfig(_NotifierBase):
    type: Literal["pagerduty"]
    routing_key_env: EnvName | None = Field(
        None, description="environment variable holding the Events API v2 routing key"
    )
    routing_key_file: Path | None = Field(None, description="file holding the routing key")
    url: str = Field(
        "https://events.pagerduty.com/v2/enqueue", description="the Events API v2 endpoint"
    )
    source: str = Field("forwarder", description="payload.source of the events")

    @model_validator(mode="after")
    def _secret(self) -> PagerDutyNotifierConfig:
        _one_of(self, "routing_key_env", "routing_key_file")
        return self


class EmailNotifierConfig(_NotifierBase):
    type: Literal["email"]
    host: str = Field(description="SMTP server")
    port: int = Field(587, ge=1, le=65535, description="SMTP port")
    starttls: bool = Field(True, description="upgrade the connection with STARTTLS")
    username: str | None = Field(None, description="SMTP login (the password by reference)")
    password_env: EnvName | None = Field(None, description="variable holding the SMTP password")
    password_file: Path | None = Field(None, description="file holding the SMTP password")
    sender: str = Field(description="From: address")
    to: list[str] = Field(min_length=1, description="To: addresses")
    subject_prefix: str = Field("[forwarder]", description="put before every subject")

    @model_validator(mode="after")
    def _secret(self) -> EmailNotifierConfig:
        _one_of(self, "password_env", "password_file", required=False)
        if (self.password_env or self.password_file) and not self.username:
            raise ValueError("a password is set but username is missing")
        return self


class WebhookNotifierConfig(_NotifierBase):
    type: Literal["webhook"]
    url: str | None = Field(None, description="endpoint, when it holds no secret")
    url_env: EnvName | None = Field(None, description="variable holding the endpoint URL")
    url_file: Path | None = Field(None, description="file holding the endpoint URL")
    headers: dict[str, str] = Field(
        default_factory=dict, description="extra headers without credentials"
    )
    hmac_secret_env: EnvName | None = Field(
        None, description="variable holding the key of the HMAC-SHA256 body signature"
    )
    hmac_secret_file: Path | None = Field(None, description="file holding the HMAC key")
    signature_header: str = Field(
        "X-Forwarder-Signature", description="header carrying sha256=<hex> of the body"
    )

    @field_validator("headers")
    @classmethod
    def _no_credentials(cls, v: dict[str, str]) -> dict[str, str]:
        return _headers(v)

    @model_validator(mode="after")
    def _secret(self) -> WebhookNotifierConfig:
        _one_of(self, "url", "url_env", "url_file")
        _one_of(self, "hmac_secret_env", "hmac_secret_file", required=False)
        return self


class DockerRestartNotifierConfig(_NotifierBase):
    type: Literal["docker_restart"]
    service: str = Field(min_length=1, description="compose service whose container restarts")
    project: str | None = Field(
        None, description="compose project (label com.docker.compose.project); any if unset"
    )
    socket: Path = Field(Path("/var/run/docker.sock"), description="the Engine API's unix socket")
    stop_timeout_s: int = Field(10, ge=0, le=600, description="the restart's grace before kill")
    on_resolve: bool = Field(False, description="also act on resolution (normally only on fire)")


class HttpNotifierConfig(_NotifierBase):
    type: Literal["http"]
    url: str = Field(description="the URL called, e.g. the API's control/stop")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = Field(
        "POST", description="HTTP method"
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="extra headers without credentials"
    )
    bearer_token_env: EnvName | None = Field(
        None, description="variable holding a token sent as Authorization: Bearer"
    )
    bearer_token_file: Path | None = Field(None, description="file holding the bearer token")
    send_alert: bool = Field(True, description="send the alert as the JSON body")
    on_resolve: bool = Field(False, description="also call on resolution (normally only on fire)")

    @field_validator("headers")
    @classmethod
    def _no_credentials(cls, v: dict[str, str]) -> dict[str, str]:
        return _headers(v)

    @model_validator(mode="after")
    def _secret(self) -> HttpNotifierConfig:
        _one_of(self, "bearer_token_env", "bearer_token_file", required=False)
        return self


NotifierConfig = Annotated[
    SlackNotifierConfig
    | PagerDutyNotifierConfig
    | EmailNotifierConfig
    | WebhookNotifierConfig
    | DockerRestartNotifierConfig
    | HttpNotifierConfig,
    Field(discriminator="type"),
]


# --- probes -----------------------------------------------------------------------------------


class _ProbeBase(Section):
    interval_s: float = Field(10.0, gt=0, le=86400, description="time between two checks")
    timeout_s: float = Field(2.0, gt=0, le=300, description="one check at most; then failed")

    @model_validator(mode="after")
    def _timing(self) -> _ProbeBase:
        if self.timeout_s > self.interval_s:
            raise ValueError(f"timeout_s ({self.timeout_s}) exceeds interval_s ({self.interval_s})")
        return self


class RedisProbeConfig(_ProbeBase):
    type: Literal["redis"]
    host: str = Field("127.0.0.1", description="Redis host")
    port: int = Field(6379, ge=1, le=65535, description="Redis port")
    password_env: EnvName | None = Field(None, description="variable holding the AUTH password")
    password_file: Path | None = Field(None, description="file holding the AUTH password")

    @model_validator(mode="after")
    def _secret(self) -> RedisProbeConfig:
        _one_of(self, "password_env", "password_file", required=False)
        return self


class HttpProbeConfig(_ProbeBase):
    type: Literal["http"]
    url: str = Field(description="GET this URL; any 2xx is healthy")


ProbeConfig = Annotated[RedisProbeConfig | HttpProbeConfig, Field(discriminator="type")]


# --- the sections together --------------------------------------------------------------------


def alarm_reference_problems(
    alarms: list[ThresholdAlarmConfig | ConsecutiveAlarmConfig | HealthAlarmConfig],
    notifiers: Mapping[str, object],
    probes: Mapping[str, object],
) -> list[str]:
    """Every broken cross reference, each naming its key; empty when all hold."""
    problems: list[str] = []
    seen: set[str] = set()
    for i, alarm in enumerate(alarms):
        where = f"alarms[{i}]"
        if alarm.name in seen:
            problems.append(f"{where}.name: two alarms are named {alarm.name!r}")
        seen.add(alarm.name)
        for j, action in enumerate(alarm.actions):
            if action not in notifiers:
                known = ", ".join(sorted(notifiers)) or "none defined"
                problems.append(
                    f"{where}.actions[{j}]: no notifier named {action!r} "
                    f"(add [notifiers.{action}]; defined: {known})"
                )
        if isinstance(alarm, HealthAlarmConfig) and alarm.probe not in probes:
            known = ", ".join(sorted(probes)) or "none defined"
            problems.append(
                f"{where}.probe: no probe named {alarm.probe!r} "
                f"(add [probes.{alarm.probe}]; defined: {known})"
            )
    return problems


class AlarmSettings(Section):
    """The five sections, as they sit at the top level of config/forwarder.toml."""

    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="volume control for the database"
    )
    alarms: list[AlarmConfig] = Field(default_factory=list, description="the alarm rules")
    notifiers: dict[Name, NotifierConfig] = Field(
        default_factory=dict, description="where alerts go, by name"
    )
    probes: dict[Name, ProbeConfig] = Field(
        default_factory=dict, description="health checks run on an interval, by name"
    )
    privacy: PrivacyConfig = Field(
        default_factory=PrivacyConfig, description="pseudonymization of user identifiers"
    )

    @model_validator(mode="after")
    def _references(self) -> AlarmSettings:
        problems = alarm_reference_problems(self.alarms, self.notifiers, self.probes)
        if problems:
            raise ValueError("; ".join(problems))
        return self
