"""Delivering alerts: the `Notifier` protocol, pure payload builders, and the `Dispatcher`.

Payloads are built by pure functions (tested with exact JSON); notifiers only do the
one I/O call. Every HTTP notifier uses the ONE `aiohttp.ClientSession` the runtime
opened; docker_restart talks to the Engine API over its unix socket, which needs a
session of its own per socket path: `open_notifiers` creates those and closes them.

Errors are classified before they are handled (`classify`):
- transient: timeouts, connection errors, HTTP 408/425/429/5xx, SMTP 4xx replies and
  dropped SMTP connections: retried with capped exponential backoff and jitter, at
  most `RetryPolicy.max_attempts` attempts, honouring a server's Retry-After (capped);
- permanent: any other HTTP 4xx, SMTP 5xx replies (refused recipient, failed login),
  a container that does not exist, a secret that cannot be read: not retried.
Either way the alert is counted (sent / failed / dropped per notifier) and the
failure logged without the secret: webhook URLs taken from a secret are shown as
their origin only, and any secret a notifier holds is scrubbed from error text.

The `Dispatcher` never blocks the producer: `offer` puts without waiting and counts
the drop when the queue is full. Its `run` fans each alert out to one bounded lane
per notifier, so a slow receiver delays and drops only its own alerts; order is kept
per notifier (a PagerDuty trigger is never overtaken by its resolve). Resolved
alerts go only to notifiers that report resolutions (slack, pagerduty, email,
webhook); docker_restart and http actions run on firing alerts only, unless their
config sets on_resolve. A notifier's timeout_s / retries / backoff_s make its policy.
The email notifier runs smtplib in a worker thread; a cancelled attempt's thread
still ends within the socket timeout (timeout_s).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import smtplib
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, Final, Literal, Protocol
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import orjson

from forwarder.alarms.config import (
    DockerRestartNotifierConfig,
    EmailNotifierConfig,
    HttpNotifierConfig,
    NotifierConfig,
    PagerDutyNotifierConfig,
    SlackNotifierConfig,
    WebhookNotifierConfig,
)
from forwarder.alarms.rules import Alert
from forwarder.alarms.secrets import secret_ref
from forwarder.clock import Clock
from forwarder.pipeline.stage import END_OF_STREAM, EndOfStream

__all__ = [
    "PAGERDUTY_EVENTS_URL",
    "Dispatcher",
    "DockerRestartNotifier",
    "EmailNotifier",
    "HttpActionNotifier",
    "Notifier",
    "NotifierBuilder",
    "NotifierStats",
    "NotifyError",
    "PagerDutyNotifier",
    "RetryPolicy",
    "SlackNotifier",
    "WebhookNotifier",
    "alert_document",
    "backoff_delay",
    "build_notifier",
    "classify",
    "dedup_key",
    "describe_error",
    "docker_service_filters",
    "docker_session",
    "email_message",
    "open_notifiers",
    "pagerduty_payload",
    "pagerduty_severity",
    "parse_retry_after",
    "redact_url",
    "retry_policy",
    "sign_body",
    "slack_payload",
    "webhook_body",
]

log = logging.getLogger(__name__)

COMPONENT = "alarms.notify"
PAGERDUTY_EVENTS_URL: Final = "https://events.pagerduty.com/v2/enqueue"
DOCKER_SOCKET: Final = "/var/run/docker.sock"
SIGNATURE_HEADER: Final = "X-Forwarder-Signature"
USER_AGENT: Final = "forwarder-alarms/1"
MAX_ERROR_BODY_CHARS = 200  # of a receiver's error answer, in the log line
DROP_LOG_INTERVAL_S = 10.0
MAX_BACKOFF_S = 30.0  # longest wait between two attempts (unless backoff_s is longer)

ErrorKind = Literal["transient", "permanent"]


# --- errors (pure) -----------------------------------------------------------------------------


class NotifyError(Exception):
    """A delivery failed; the message is safe to log (no secret, no secret URL)."""

    def __init__(
        self, message: str, *, kind: ErrorKind, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.retry_after_s = retry_after_s


def http_status_kind(status: int) -> ErrorKind:
    """Will the same request succeed later? 408/425/429 and 5xx yes; other 4xx never."""
    if status in (408, 425, 429) or status >= 500:
        return "transient"
    return "permanent"


def classify(exc: BaseException) -> ErrorKind:
    """Transient errors are retried (with backoff); permanent ones are counted at once."""
    if isinstance(exc, NotifyError):
        return exc.kind
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        return "transient" if codes and all(400 <= c < 500 for c in codes) else "permanent"
    if isinstance(exc, smtplib.SMTPResponseException):
        return "transient" if 400 <= exc.smtp_code < 500 else "permanent"
    if isinstance(exc, smtplib.SMTPServerDisconnected | smtplib.SMTPConnectError):
        return "transient"
    if isinstance(exc, aiohttp.ClientResponseError):
        return http_status_kind(exc.status)
    if isinstance(exc, aiohttp.InvalidURL):  # a ClientError and a ValueError: config error
        return "permanent"
    if isinstance(exc, TimeoutError | aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return "transient"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "permanent"
    if isinstance(exc, OSError):  # ConnectionError, refused, reset, unreachable
        return "transient"
    return "permanent"


def describe_error(exc: BaseException) -> str:
    """One line that is safe to log: never a URL's path or query, never a payload."""
    if isinstance(exc, NotifyError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {_os_error_text(exc.os_error)}"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} {exc.message}"
    if isinstance(exc, aiohttp.ClientError):
        # str() of several aiohttp errors embeds the request URL: name the type only.
        return type(exc).__name__
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        refused = ", ".join(
            f"{addr} ({code} {_smtp_text(msg)})" for addr, (code, msg) in exc.recipients.items()
        )
        return f"SMTP recipients refused: {refused}"
    if isinstance(exc, smtplib.SMTPResponseException):
        return f"SMTP {exc.smtp_code} {_smtp_text(exc.smtp_error)}"
    if isinstance(exc, OSError) and (exc.errno is not None or exc.strerror):
        return f"{type(exc).__name__}: {_os_error_text(exc)}"
    text = str(exc)
    return f"{type(exc).__name__}: {text[:MAX_ERROR_BODY_CHARS]}" if text else type(exc).__name__


def _os_error_text(exc: OSError) -> str:
    """The errno's text ("Connection refused"), not asyncio's "Connect call failed (...)"."""
    if exc.errno is not None:
        return os.strerror(exc.errno)
    return exc.strerror or type(exc).__name__


def _smtp_text(msg: bytes | str) -> str:
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else msg
    return " ".join(text.split())[:MAX_ERROR_BODY_CHARS]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds a server asked us to wait (delta-seconds form only); None if absent or odd."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # the HTTP-date form: fall back to our own backoff
    return seconds if seconds >= 0 else None


def redact_url(url: str) -> str:
    """scheme://host[:port]/… : what may be logged of a URL that carries a secret."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    if not parts.scheme or not host:
        return "<redacted url>"
    return f"{parts.scheme}://{host}{port}/…"


def _plain_url(url: str) -> str:
    """A non-secret URL for logs: without userinfo and query (they may still hold tokens)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    query = "?…" if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{query}"


# --- backoff (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one alert is delivered to one notifier."""

    timeout_s: float = 10.0  # one attempt, connection included
    max_attempts: int = 4  # including the first
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0  # also caps a server's Retry-After

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_attempts < 1:
            raise ValueError("RetryPolicy needs timeout_s > 0 and max_attempts >= 1")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("RetryPolicy needs 0 < initial_backoff_s <= max_backoff_s")


def backoff_delay(
    failed_attempts: int,
    policy: RetryPolicy,
    rng: random.Random,
    retry_after_s: float | None = None,
) -> float:
    """Wait before the next attempt after `failed_attempts` (>= 1) failures.

    Capped exponential with "equal jitter": uniform in [c/2, c] with
    c = min(max, initial * 2^(n-1)), so retries of many alerts spread out but never
    come back at once; a server's Retry-After raises it (capped at max_backoff_s).
    """
    n = max(1, failed_attempts)
    ceiling = min(policy.max_backoff_s, policy.initial_backoff_s * 2.0 ** min(n - 1, 60))
    delay = rng.uniform(ceiling / 2.0, ceiling)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, policy.max_backoff_s))
    return delay


# --- payloads (pure) ---------------------------------------------------------------------------

_PAGERDUTY_SEVERITIES: Final[Mapping[str, str]] = {
    "critical": "critical",
    "crit": "critical",
    "fatal": "critical",
    "page": "critical",
    "emergency": "critical",
    "error": "error",
    "err": "error",
    "high": "error",
    "major": "error",
    "warning": "warning",
    "warn": "warning",
    "medium": "warning",
    "minor": "warning",
    "info": "info",
    "informational": "info",
    "notice": "info",
    "low": "info",
}

SLACK_HEADER_CHARS = 150  # Slack's limit for a header block's plain_text
SLACK_SECTION_CHARS = 3000  # Slack's limit for a section block's text
SAMPLE_CHARS = 500  # one sample message, in any payload meant for humans
PAGERDUTY_SUMMARY_CHARS = 1024  # Events API v2 limit
PAGERDUTY_DEDUP_CHARS = 255  # Events API v2 limit


def pagerduty_severity(severity: str) -> str:
    """A rule's severity as one of PagerDuty's critical|error|warning|info; unknown -> error."""
    return _PAGERDUTY_SEVERITIES.get(severity.strip().lower(), "error")


def group_label(alert: Alert) -> str:
    return "-" if alert.group is None else alert.group


def dedup_key(alert: Alert) -> str:
    """The key that ties a trigger to its resolve: "<rule>:<group>" ("<rule>:" ungrouped)."""
    return f"{alert.rule}:{alert.group or ''}"[:PAGERDUTY_DEDUP_CHARS]


def _iso(ts: datetime) -> str:
    return ts.isoformat()


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _count_text(alert: Alert) -> str:
    if alert.window_s is None:
        return str(alert.count)
    return f"{alert.count} in {alert.window_s:g}s"


def alert_document(alert: Alert) -> dict[str, Any]:
    """The alert as a JSON-ready dict: the webhook body and PagerDuty's custom_details."""
    return {
        "rule": alert.rule,
        "group": alert.group,
        "state": alert.state,
        "severity": alert.severity,
        "count": alert.count,
        "window_s": alert.window_s,
        "samples": list(alert.samples),
        "started_at": _iso(alert.started_at),
        "at": _iso(alert.at),
        "actions": list(alert.actions),
        "summary": alert.summary,
    }


def _slack_escape(text: str) -> str:
    """Slack's mrkdwn/plain text needs exactly &, < and > escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(alert: Alert, channel: str | None = None) -> dict[str, Any]:
    """An incoming-webhook message: a text fallback (notifications) and blocks."""
    firing = alert.state == "firing"
    state = "FIRING" if firing else "RESOLVED"
    where = "" if alert.group is None else f" [{alert.group}]"
    text = f"[{state}] {alert.rule}{where}: {alert.summary}"
    if not firing:
        text = f"[{state}] {alert.rule}{where} is resolved: {alert.summary}"
    fields = [
        ("Rule", alert.rule),
        ("Group", group_label(alert)),
        ("State", "firing" if firing else "resolved"),
        ("Severity", alert.severity),
        ("Count", _count_text(alert)),
        ("Since", _iso(alert.started_at)),
    ]
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {
                "type": "plain_text",
                "text": _clip(f"{state}: {alert.rule}{where}", SLACK_HEADER_CHARS),
            },
        },
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": _clip(_slack_escape(alert.summary), SLACK_SECTION_CHARS),
            },
            "fields": [
                {"type": "mrkdwn", "text": f"*{name}*\n{_clip(_slack_escape(value), 1900)}"}
                for name, value in fields
            ],
        },
    ]
    if alert.samples:
        samples = "\n".join(_clip(s, SAMPLE_CHARS) for s in alert.samples)
        blocks.append(
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": _clip(
                        "*Samples*\n```" + _slack_escape(samples) + "```", SLACK_SECTION_CHARS
                    ),
                },
            }
        )
    payload: dict[str, Any] = {"text": _slack_escape(text), "blocks": blocks}
    if channel:
        payload["channel"] = channel
    return payload


def pagerduty_payload(alert: Alert, routing_key: str, source: str) -> dict[str, Any]:
    """An Events API v2 event: trigger while firing, resolve (same dedup_key) when resolved."""
    if alert.state == "resolved":
        return {
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": dedup_key(alert),
        }
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key(alert),
        "payload": {
            "summary": _clip(
                f"{alert.rule} [{group_label(alert)}]: {alert.summary}", PAGERDUTY_SUMMARY_CHARS
            ),
            "severity": pagerduty_severity(alert.severity),
            "source": source,
            "timestamp": _iso(alert.at),
            "component": alert.rule,
            "group": group_label(alert),
            "class": "forwarder.alarm",
            "custom_details": alert_document(alert),
        },
        "client": "forwarder",
    }


def webhook_body(alert: Alert) -> bytes:
    """The webhook's JSON body; these exact bytes are what the signature covers."""
    return orjson.dumps({"version": 1, **alert_document(alert)}, option=orjson.OPT_SORT_KEYS)


def sign_body(secret: str, body: bytes) -> str:
    """The X-Forwarder-Signature value: "sha256=" + hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def email_subject(alert: Alert, prefix: str = "[forwarder]") -> str:
    state = "FIRING" if alert.state == "firing" else "RESOLVED"
    where = "" if alert.group is None else f" [{alert.group}]"
    subject = f"{state}: {alert.rule}{where}"
    subject = f"{prefix} {subject}" if prefix else subject
    return " ".join(subject.split())[:250]  # no header folding surprises, no CR/LF


def email_text(alert: Alert) -> str:
    lines = [
        alert.summary,
        "",
        f"Rule:     {alert.rule}",
        f"Group:    {group_label(alert)}",
        f"State:    {alert.state}",
        f"Severity: {alert.severity}",
        f"Count:    {_count_text(alert)}",
        f"Since:    {_iso(alert.started_at)}",
        f"At:       {_iso(alert.at)}",
    ]
    if alert.state == "resolved":
        lines.insert(1, "This alarm is resolved.")
    if alert.samples:
        lines += ["", "Samples:"] + [f"  {_clip(s, SAMPLE_CHARS)}" for s in alert.samples]
    return "\n".join(lines) + "\n"


def email_message(
    alert: Alert, sender: str, recipients: Sequence[str], subject_prefix: str = "[forwarder]"
) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = email_subject(alert, subject_prefix)
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = formatdate(alert.at.timestamp(), usegmt=True)
    msg["Message-ID"] = make_msgid(domain="forwarder.local")
    msg["X-Forwarder-Rule"] = alert.rule
    msg["X-Forwarder-State"] = alert.state
    msg.set_content(email_text(alert))
    return msg


def docker_service_filters(service: str, project: str | None = None) -> str:
    """The `filters` query value that lists the containers of a compose service."""
    labels = [f"com.docker.compose.service={service}"]
    if project:
        labels.append(f"com.docker.compose.project={project}")
    return json.dumps({"label": labels}, separators=(",", ":"))


# --- notifiers ---------------------------------------------------------------------------------


class Notifier(Protocol):
    """Delivers one alert, once; the Dispatcher owns timeouts and retries."""

    name: str  # the config key (notifiers.<name>), what rules list in `actions`
    kind: str  # the config `type`
    sends_resolved: bool  # whether resolved alerts are delivered to it at all
    policy: RetryPolicy  # timeout per attempt, attempts, backoff

    async def send(self, alert: Alert) -> None:
        """Deliver or raise (NotifyError or an I/O error, classified by `classify`)."""

    def redact(self, text: str) -> str:
        """`text` with every secret this notifier holds replaced by ***."""


class _Base:
    kind = ""
    sends_resolved = True

    def __init__(
        self, name: str, secrets: Sequence[str | None] = (), policy: RetryPolicy | None = None
    ) -> None:
        self.name = name
        self.policy = policy or RetryPolicy()
        self._secrets = tuple(sorted((s for s in secrets if s), key=len, reverse=True))

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def __repr__(self) -> str:  # never the secrets
        return f"<{type(self).__name__} {self.name!r}>"


def _snippet(text: str) -> str:
    return " ".join(text[:MAX_ERROR_BODY_CHARS].split())


async def _request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    display: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> int:
    """One HTTP request; raise NotifyError (classified) unless the answer is 2xx."""
    all_headers = {"User-Agent": USER_AGENT}
    if body is not None:
        all_headers["Content-Type"] = "application/json"
    all_headers.update(headers or {})
    async with session.request(
        method, url, data=body, headers=all_headers, allow_redirects=False
    ) as resp:
        if 200 <= resp.status < 300:
            await resp.read()
            return resp.status
        text = _snippet(await resp.text(errors="replace"))
        raise NotifyError(
            f"HTTP {resp.status} from {display}" + (f": {text}" if text else ""),
            kind=http_status_kind(resp.status),
            retry_after_s=parse_retry_after(resp.headers.get("Retry-After")),
        )


class SlackNotifier(_Base):
    kind = "slack"

    def __init__(
        self,
        name: str,
        session: aiohttp.ClientSession,
        webhook_url: str,
        *,
        channel: str | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        super().__init__(name, [webhook_url], policy)
        self._session = session
        self._url = webhook_url
        self._channel = channel
        self.display_url = redact_url(webhook_url)  # the URL is the secret

    async def send(self, alert: Alert) -> None:
        body = orjson.dumps(slack_payload(alert, channel=self._channel))
        await _request(self._session, "POST", self._url, body=body, display=self.display_url)


class PagerDutyNotifier(_Base):
    kind = "pagerduty"

    def __init__(
        self,
        name: str,
        session: aiohttp.ClientSession,
        routing_key: str,
        *,
        url: str = PAGERDUTY_EVENTS_URL,
        source: str = "forwarder",
        policy: RetryPolicy | None = None,
    ) -> None:
        super().__init__(name, [routing_key], policy)
        self._session = session
        self._routing_key = routing_key
        self._url = url
        self._source = source
        self.display_url = _plain_url(url)

    async def send(self, alert: Alert) -> None:
        body = orjson.dumps(pagerduty_payload(alert, self._routing_key, self._source))
        await _request(self._session, "POST", self._url, body=body, display=self.display_url)


class WebhookNotifier(_Base):
    """POST of the alert as JSON; with a key, `sha256=<hex HMAC>` of the body in a header."""

    kind = "webhook"

    def __init__(
        self,
        name: str,
        session: aiohttp.ClientSession,
        url: str,
        *,
        signing_secret: str | None = None,
        signature_header: str = SIGNATURE_HEADER,
        headers: Mapping[str, str] | None = None,
        url_is_secret: bool = False,
        policy: RetryPolicy | None = None,
    ) -> None:
        super().__init__(name, [signing_secret, url if url_is_secret else None], policy)
        self._session = session
        self._url = url
        self._secret = signing_secret
        self._signature_header = signature_header
        self._headers = dict(headers or {})
        self.display_url = redact_url(url) if url_is_secret else _plain_url(url)

    async def send(self, alert: Alert) -> None:
        body = webhook_body(alert)
        headers = dict(self._headers)
        if self._secret is not None:
            headers[self._signature_header] = sign_body(self._secret, body)
        await _request(
            self._session, "POST", self._url, body=body, headers=headers, display=self.display_url
        )


class HttpActionNotifier(_Base):
    """A configured request to a URL, e.g. the API's control/stop; on firing alerts only.

    With `send_alert` the body is the alert's JSON (as the webhook sends it); GET and
    DELETE requests never carry a body.
    """

    kind = "http"

    def __init__(
        self,
        name: str,
        session: aiohttp.ClientSession,
        url: str,
        *,
        method: str = "POST",
        send_alert: bool = True,
        headers: Mapping[str, str] | None = None,
        bearer_token: str | None = None,
        on_resolve: bool = False,
        policy: RetryPolicy | None = None,
    ) -> None:
        super().__init__(name, [bearer_token], policy)
        self._session = session
        self._url = url
        self._method = method.upper()
        self._send_alert = send_alert and self._method not in ("GET", "DELETE", "HEAD")
        self._headers = dict(headers or {})
        if bearer_token is not None:
            self._headers["Authorization"] = f"Bearer {bearer_token}"
        self.sends_resolved = on_resolve
        self.display_url = _plain_url(url)

    async def send(self, alert: Alert) -> None:
        await _request(
            self._session,
            self._method,
            self._url,
            body=webhook_body(alert) if self._send_alert else None,
            headers=self._headers,
            display=f"{self._method} {self.display_url}",
        )


async def _docker_error(resp: aiohttp.ClientResponse, what: str) -> NotifyError:
    """The error for an Engine API answer that is not a success (`what` gave HTTP ...)."""
    return NotifyError(
        f"docker: {what} gave HTTP {resp.status}: {_snippet(await resp.text(errors='replace'))}",
        kind=http_status_kind(resp.status),
    )


class DockerRestartNotifier(_Base):
    """Restart every container of a compose service through the Engine API.

    `session` must be bound to the Engine API's unix socket (`docker_session`). The
    containers are found by label com.docker.compose.service (and .project if set);
    stopped ones are included: restarting a container starts it again.
    """

    kind = "docker_restart"
    BASE = "http://docker"  # the host is ignored on a unix socket

    def __init__(
        self,
        name: str,
        session: aiohttp.ClientSession,
        *,
        service: str,
        project: str | None = None,
        stop_timeout_s: int | None = None,
        on_resolve: bool = False,
        policy: RetryPolicy | None = None,
    ) -> None:
        super().__init__(name, (), policy)
        self._session = session
        self._service = service
        self._project = project
        self._stop_timeout_s = stop_timeout_s
        self.sends_resolved = on_resolve

    async def containers(self) -> list[tuple[str, str]]:
        """(id, name) of every container of the service; NotifyError if there is none."""
        query = urlencode(
            {"all": "1", "filters": docker_service_filters(self._service, self._project)}
        )
        async with self._session.get(f"{self.BASE}/containers/json?{query}") as resp:
            if resp.status != 200:
                raise await _docker_error(
                    resp, f"listing the containers of service {self._service}"
                )
            found = await resp.json()
        containers = []
        for c in found if isinstance(found, list) else ():
            if isinstance(c, dict) and c.get("Id"):
                names = c.get("Names") or [c["Id"][:12]]
                containers.append((str(c["Id"]), str(names[0]).lstrip("/")))
        if not containers:
            where = f" of project {self._project}" if self._project else ""
            raise NotifyError(
                f"docker: no container for compose service {self._service}{where}",
                kind="permanent",
            )
        return containers

    async def send(self, alert: Alert) -> None:
        query = "" if self._stop_timeout_s is None else f"?t={int(self._stop_timeout_s)}"
        for container_id, container_name in await self.containers():
            url = f"{self.BASE}/containers/{quote(container_id, safe='')}/restart{query}"
            async with self._session.post(url) as resp:
                if resp.status not in (200, 204):
                    raise await _docker_error(resp, f"restart of {container_name}")
                await resp.read()
            log.warning(
                "restarted container %s (service %s) for alarm %s",
                container_name,
                self._service,
                alert.rule,
                extra={"component": COMPONENT, "notifier": self.name},
            )


class EmailNotifier(_Base):
    """SMTP through the stdlib client in a worker thread: optional STARTTLS and login."""

    kind = "email"

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int,
        sender: str,
        recipients: Sequence[str],
        starttls: bool = False,
        username: str | None = None,
        password: str | None = None,
        subject_prefix: str = "[forwarder]",
        timeout_s: float = 10.0,
        tls_context: ssl.SSLContext | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        super().__init__(name, [password], policy)
        if not recipients:
            raise ValueError("EmailNotifier needs at least one recipient")
        if (username is None) != (password is None):
            raise ValueError("EmailNotifier needs both username and password, or neither")
        self._host = host
        self._port = port
        self._sender = sender
        self._recipients = tuple(recipients)
        self._starttls = starttls
        self._username = username
        self._password = password
        self._prefix = subject_prefix
        self._timeout_s = timeout_s
        self._tls_context = tls_context

    async def send(self, alert: Alert) -> None:
        msg = email_message(alert, self._sender, self._recipients, self._prefix)
        # The socket timeout bounds the thread even when this await is cancelled.
        await asyncio.to_thread(self._deliver, msg)

    def _deliver(self, msg: EmailMessage) -> None:
        with smtplib.SMTP(self._host, self._port, timeout=self._timeout_s) as smtp:
            smtp.ehlo()
            if self._starttls:
                smtp.starttls(context=self._tls_context or ssl.create_default_context())
                smtp.ehlo()
            if self._username is not None and self._password is not None:
                smtp.login(self._username, self._password)
            smtp.send_message(msg, from_addr=self._sender, to_addrs=list(self._recipients))


# --- building from config ----------------------------------------------------------------------


def retry_policy(config: NotifierConfig) -> RetryPolicy:
    """A notifier config's timeout_s / retries / backoff_s as a RetryPolicy."""
    return RetryPolicy(
        timeout_s=config.timeout_s,
        max_attempts=config.retries + 1,
        initial_backoff_s=config.backoff_s,
        max_backoff_s=max(MAX_BACKOFF_S, config.backoff_s),
    )


def docker_session(socket_path: str | os.PathLike[str] = DOCKER_SOCKET) -> aiohttp.ClientSession:
    """A session bound to the Docker Engine API unix socket (one per socket path)."""
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=os.fspath(socket_path)))


def build_notifier(
    name: str,
    config: NotifierConfig,
    session: aiohttp.ClientSession,
    *,
    docker_sessions: Mapping[str, aiohttp.ClientSession] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Notifier:
    """The notifier for one `[notifiers.<name>]` table; secrets are resolved here, once.

    Raises SecretError (naming the key and the variable or file) when a secret cannot
    be read; the secret itself is never part of any message.
    """
    key = f"notifiers.{name}"
    policy = retry_policy(config)

    def secret(field_name: str, *, required: bool = True) -> str | None:
        return secret_ref(config, field_name, key, required=required, environ=environ)

    match config:
        case SlackNotifierConfig():
            url = secret("webhook_url")
            assert url is not None
            return SlackNotifier(name, session, url, channel=config.channel, policy=policy)
        case PagerDutyNotifierConfig():
            routing_key = secret("routing_key")
            assert routing_key is not None
            return PagerDutyNotifier(
                name, session, routing_key, url=config.url, source=config.source, policy=policy
            )
        case WebhookNotifierConfig():
            url = config.url or secret("url")
            assert url is not None
            return WebhookNotifier(
                name,
                session,
                url,
                signing_secret=secret("hmac_secret", required=False),
                signature_header=config.signature_header,
                headers=config.headers,
                url_is_secret=config.url is None,
                policy=policy,
            )
        case HttpNotifierConfig():
            return HttpActionNotifier(
                name,
                session,
                config.url,
                method=config.method,
                send_alert=config.send_alert,
                headers=config.headers,
                bearer_token=secret("bearer_token", required=False),
                on_resolve=config.on_resolve,
                policy=policy,
            )
        case EmailNotifierConfig():
            password = secret("password", required=False)
            return EmailNotifier(
                name,
                host=config.host,
                port=config.port,
                sender=config.sender,
                recipients=config.to,
                starttls=config.starttls,
                username=config.username if password is not None else None,
                password=password,
                subject_prefix=config.subject_prefix,
                timeout_s=config.timeout_s,
                policy=policy,
            )
        case DockerRestartNotifierConfig():
            socket_path = os.fspath(config.socket)
            if docker_sessions is None or socket_path not in docker_sessions:
                raise ValueError(f"{key}: no session for the docker socket {socket_path}")
            return DockerRestartNotifier(
                name,
                docker_sessions[socket_path],
                service=config.service,
                project=config.project,
                stop_timeout_s=config.stop_timeout_s,
                on_resolve=config.on_resolve,
                policy=policy,
            )
    raise ValueError(f"{key}.type: unknown notifier type {config.type!r}")


class NotifierBuilder:
    """Builds notifiers from config, at start and on every reload.

    The HTTP notifiers share `session` (the caller's); the docker_restart ones share one
    unix-socket session per socket path, opened the first time a path is needed and
    closed by `aclose`. A path a reload no longer uses keeps its session until then:
    a lane of a removed notifier may still be delivering through it, and socket paths
    are few, so waiting for exit is simpler than tracking when each lane has drained.
    """

    def __init__(
        self, session: aiohttp.ClientSession, *, environ: Mapping[str, str] | None = None
    ) -> None:
        self._session = session
        self._environ = environ
        self._docker: dict[str, aiohttp.ClientSession] = {}

    async def build(self, configs: Mapping[str, NotifierConfig]) -> dict[str, Notifier]:
        """One notifier per config; all or nothing (a missing secret raises SecretError)."""
        paths = {
            os.fspath(cfg.socket)
            for cfg in configs.values()
            if isinstance(cfg, DockerRestartNotifierConfig)
        }
        opened = {path: docker_session(path) for path in sorted(paths - self._docker.keys())}
        sessions = {**self._docker, **opened}
        try:
            notifiers = {
                name: build_notifier(
                    name, cfg, self._session, docker_sessions=sessions, environ=self._environ
                )
                for name, cfg in configs.items()
            }
        except BaseException:
            for s in opened.values():
                await s.close()
            raise
        self._docker.update(opened)
        return notifiers

    async def aclose(self) -> None:
        sessions, self._docker = self._docker, {}
        for s in sessions.values():
            await s.close()


@contextlib.asynccontextmanager
async def open_notifiers(
    configs: Mapping[str, NotifierConfig],
    session: aiohttp.ClientSession,
    *,
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[dict[str, Notifier]]:
    """Every configured notifier, built before anything is sent (a missing secret fails here).

    The HTTP notifiers share `session` (the caller's, opened and closed by the runtime);
    the docker_restart ones share one unix-socket session per socket path, opened here
    and closed on exit. (`NotifierBuilder` is the same, for callers that build again.)
    """
    builder = NotifierBuilder(session, environ=environ)
    try:
        yield await builder.build(configs)
    finally:
        await builder.aclose()


# --- the dispatcher ----------------------------------------------------------------------------


@dataclass
class NotifierStats:
    sent: int = 0
    failed: int = 0
    dropped: int = 0  # never attempted: a queue was full
    retried: int = 0  # attempts after the first
    skipped: int = 0  # resolved alerts for notifiers that act only on firing
    last_error: str | None = None
    last_delivery_ok: bool | None = None
    _last_drop_log: float = field(default=float("-inf"), repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "failed": self.failed,
            "dropped": self.dropped,
            "retried": self.retried,
            "skipped": self.skipped,
            "last_error": self.last_error,
        }


class Dispatcher:
    """Alerts in, notifications out; one bounded lane (queue + worker) per notifier.

    `replace_notifiers` swaps the set while running (a SIGHUP): a removed or changed
    notifier's lane gets END_OF_STREAM, so what it holds is still delivered with the
    old notifier, and a new lane serves the changed or added one from then on (across
    a change, the old lane's leftovers and the new lane run side by side).
    """

    def __init__(
        self,
        notifiers: Mapping[str, Notifier],
        clock: Clock,
        *,
        lane_size: int = 100,
        rng: random.Random | None = None,
    ) -> None:
        if lane_size < 1:
            raise ValueError("lane_size must be >= 1")
        self._notifiers = dict(notifiers)
        self._clock = clock
        self._lane_size = lane_size
        self._rng = rng or random.Random()
        self.stats: dict[str, NotifierStats] = {name: NotifierStats() for name in notifiers}
        self.unknown_actions = 0
        self._warned_unknown: set[str] = set()
        self._lanes: dict[str, asyncio.Queue[Alert | EndOfStream]] = {}
        self._tg: asyncio.TaskGroup | None = None  # while routing: where new lanes start
        self._state = "starting"

    @property
    def notifiers(self) -> Mapping[str, Notifier]:
        return dict(self._notifiers)

    def replace_notifiers(self, notifiers: Mapping[str, Notifier]) -> None:
        """Use `notifiers` from now on; a name mapped to the same object is unchanged.

        An unchanged notifier keeps its lane, queue and stats; a changed one keeps its
        stats. Never blocks. Before run() (or once it is stopping) only the set is
        swapped: run() opens the lanes, and a stopping dispatcher routes nothing more.
        """
        old, new = self._notifiers, dict(notifiers)
        for name, notifier in old.items():
            if new.get(name) is notifier:
                continue
            if self._tg is not None:
                self._close_lane(self._lanes.pop(name))
            if name not in new:
                self.stats.pop(name, None)
                self._log_change(name, notifier, "removed")
        for name, notifier in new.items():
            if old.get(name) is notifier:
                continue
            self.stats.setdefault(name, NotifierStats())
            self._warned_unknown.discard(name)
            if self._tg is not None:
                self._open_lane(self._tg, name, notifier)
            self._log_change(name, notifier, "changed" if name in old else "added")
        self._notifiers = new

    def _open_lane(self, tg: asyncio.TaskGroup, name: str, notifier: Notifier) -> None:
        lane: asyncio.Queue[Alert | EndOfStream] = asyncio.Queue(maxsize=self._lane_size)
        self._lanes[name] = lane
        # The worker holds the stats object: a removed notifier's last deliveries are
        # still counted (and logged) but no longer show in status().
        tg.create_task(self._lane(notifier, lane, self.stats[name]), name=f"notify.{name}")

    def _close_lane(self, lane: asyncio.Queue[Alert | EndOfStream]) -> None:
        """End a lane after what it holds; nothing else is put on it any more."""
        try:
            lane.put_nowait(END_OF_STREAM)
        except asyncio.QueueFull:  # the worker makes room as it delivers
            assert self._tg is not None
            self._tg.create_task(lane.put(END_OF_STREAM))

    def _log_change(self, name: str, notifier: Notifier, change: str) -> None:
        log.info(
            "notifier %s (%s) %s",
            name,
            notifier.kind,
            change,
            extra={"component": COMPONENT, "notifier": name, "event": f"notifier.{change}"},
        )

    # -- producer side --

    def offer(self, queue: asyncio.Queue[Alert | EndOfStream], alert: Alert) -> bool:
        """Put `alert` on the dispatcher's input without waiting; count a drop if it is full."""
        try:
            queue.put_nowait(alert)
            return True
        except asyncio.QueueFull:
            for action in alert.actions:
                stats = self.stats.get(action)
                if stats is not None:
                    self._count_drop(action, stats, alert, "the alert queue is full")
            return False

    # -- reporting --

    def status(self) -> dict[str, Any]:
        failing = sorted(n for n, s in self.stats.items() if s.last_delivery_ok is False)
        state, reason = self._state, None
        if state == "ok" and failing:
            state, reason = "degraded", "last delivery failed: " + ", ".join(failing)
        return {
            "state": state,
            "reason": reason,
            "unknown_actions": self.unknown_actions,
            "lanes": {name: lane.qsize() for name, lane in self._lanes.items()},
            "notifiers": {name: s.as_dict() for name, s in self.stats.items()},
        }

    # -- the loop --

    async def run(self, inp: asyncio.Queue[Alert | EndOfStream]) -> None:
        """Route alerts until END_OF_STREAM, then deliver what the lanes hold and return.

        Cancel it (the runtime's drain deadline) to give up on queued alerts.
        """
        self._lanes = {}
        self._state = "ok"
        try:
            async with asyncio.TaskGroup() as tg:
                for name, notifier in self._notifiers.items():
                    self._open_lane(tg, name, notifier)
                self._tg = tg
                while True:
                    item = await inp.get()
                    if item is END_OF_STREAM or isinstance(item, EndOfStream):
                        self._state = "stopping"
                        self._tg = None
                        for lane in list(self._lanes.values()):
                            await lane.put(END_OF_STREAM)
                        break
                    self.route(item)
        finally:
            self._tg = None
            self._state = "stopped"

    def route(self, alert: Alert) -> None:
        """Hand `alert` to the lane of each of its actions, without waiting."""
        for action in alert.actions:
            notifier = self._notifiers.get(action)
            if notifier is None:
                self.unknown_actions += 1
                if action not in self._warned_unknown:
                    self._warned_unknown.add(action)
                    log.warning(
                        "alarm %s names action %r, which is not a configured notifier",
                        alert.rule,
                        action,
                        extra={"component": COMPONENT},
                    )
                continue
            stats = self.stats[action]
            if alert.state == "resolved" and not notifier.sends_resolved:
                stats.skipped += 1
                continue
            try:
                self._lanes[action].put_nowait(alert)
            except asyncio.QueueFull:
                self._count_drop(action, stats, alert, "its queue is full (receiver too slow)")

    async def _lane(
        self, notifier: Notifier, lane: asyncio.Queue[Alert | EndOfStream], stats: NotifierStats
    ) -> None:
        while True:
            item = await lane.get()
            if item is END_OF_STREAM or isinstance(item, EndOfStream):
                return
            await self.deliver(notifier, item, stats)

    async def deliver(
        self, notifier: Notifier, alert: Alert, stats: NotifierStats | None = None
    ) -> bool:
        """Send with a timeout per attempt, retry transient errors; count the outcome."""
        if stats is None:
            stats = self.stats.setdefault(notifier.name, NotifierStats())
        policy = notifier.policy
        attempt = 0
        while True:
            attempt += 1
            try:
                async with asyncio.timeout(policy.timeout_s):
                    await notifier.send(alert)
            except Exception as exc:
                kind = classify(exc)
                text = notifier.redact(describe_error(exc))
                if isinstance(exc, TimeoutError):
                    text = f"timed out after {policy.timeout_s:g}s"
                stats.last_error = text
                if kind == "permanent" or attempt >= policy.max_attempts:
                    stats.failed += 1
                    stats.last_delivery_ok = False
                    log.warning(
                        "%s notifier %s failed for alarm %s (%s) after %d attempt(s): %s",
                        notifier.kind,
                        notifier.name,
                        alert.rule,
                        alert.state,
                        attempt,
                        text,
                        extra={"component": COMPONENT, "notifier": notifier.name, "error": kind},
                    )
                    return False
                retry_after = exc.retry_after_s if isinstance(exc, NotifyError) else None
                delay = backoff_delay(attempt, policy, self._rng, retry_after)
                stats.retried += 1
                log.info(
                    "%s notifier %s: attempt %d for alarm %s failed, retrying in %.2fs: %s",
                    notifier.kind,
                    notifier.name,
                    attempt,
                    alert.rule,
                    delay,
                    text,
                    extra={"component": COMPONENT, "notifier": notifier.name},
                )
                await asyncio.sleep(delay)
                continue
            stats.sent += 1
            stats.last_delivery_ok = True
            return True

    def _count_drop(self, name: str, stats: NotifierStats, alert: Alert, why: str) -> None:
        stats.dropped += 1
        now = self._clock.monotonic()
        if now - stats._last_drop_log >= DROP_LOG_INTERVAL_S:
            stats._last_drop_log = now
            log.warning(
                "dropped alarm %s (%s) for notifier %s: %s (%d dropped so far)",
                alert.rule,
                alert.state,
                name,
                why,
                stats.dropped,
                extra={"component": COMPONENT, "notifier": name},
            )
