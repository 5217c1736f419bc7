"""Notification payloads, error classification and backoff: pure functions, exact values."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import smtplib
from dataclasses import replace
from datetime import UTC, datetime

import aiohttp
import orjson
import pytest

from forwarder.alarms.notify import (
    NotifyError,
    RetryPolicy,
    backoff_delay,
    classify,
    dedup_key,
    describe_error,
    docker_service_filters,
    email_message,
    http_status_kind,
    pagerduty_payload,
    pagerduty_severity,
    parse_retry_after,
    redact_url,
    sign_body,
    slack_payload,
    webhook_body,
)
from forwarder.alarms.rules import Alert
from forwarder.alarms.secrets import SecretError, resolve_secret

STARTED = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
AT = datetime(2026, 11, 26, 12, 0, 42, tzinfo=UTC)


def make_alert(**overrides: object) -> Alert:
    fields: dict[str, object] = {
        "rule": "api_error_burst",
        "group": "checkout",
        "state": "firing",
        "severity": "error",
        "count": 7,
        "window_s": 60.0,
        "samples": ("db timeout on /orders", "db timeout on /cart"),
        "started_at": STARTED,
        "at": AT,
        "actions": ("ops_slack", "pd"),
        "summary": "7 ERROR events from api in 60s",
    }
    fields.update(overrides)
    return Alert(**fields)  # type: ignore[arg-type]


# --- slack ------------------------------------------------------------------------------------


def test_slack_firing_payload_is_exact() -> None:
    assert slack_payload(make_alert()) == {
        "text": "[FIRING] api_error_burst [checkout]: 7 ERROR events from api in 60s",
        "blocks": [
            {
                "type": "header",
                "text": {"type": "plain_text", "text": "FIRING: api_error_burst [checkout]"},
            },
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": "7 ERROR events from api in 60s"},
                "fields": [
                    {"type": "mrkdwn", "text": "*Rule*\napi_error_burst"},
                    {"type": "mrkdwn", "text": "*Group*\ncheckout"},
                    {"type": "mrkdwn", "text": "*State*\nfiring"},
                    {"type": "mrkdwn", "text": "*Severity*\nerror"},
                    {"type": "mrkdwn", "text": "*Count*\n7 in 60s"},
                    {"type": "mrkdwn", "text": "*Since*\n2026-11-26T12:00:00+00:00"},
                ],
            },
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": "*Samples*\n```db timeout on /orders\ndb timeout on /cart```",
                },
            },
        ],
    }


def test_slack_resolved_message_says_resolved() -> None:
    payload = slack_payload(make_alert(state="resolved", samples=(), group=None, count=0))
    assert payload["text"] == (
        "[RESOLVED] api_error_burst is resolved: 7 ERROR events from api in 60s"
    )
    assert payload["blocks"][0]["text"]["text"] == "RESOLVED: api_error_burst"
    fields = payload["blocks"][1]["fields"]
    assert {"type": "mrkdwn", "text": "*State*\nresolved"} in fields
    assert {"type": "mrkdwn", "text": "*Group*\n-"} in fields
    assert len(payload["blocks"]) == 2  # no samples block when there are none


def test_slack_escapes_control_characters_and_clips_long_samples() -> None:
    payload = slack_payload(
        make_alert(summary="a <b> & c", samples=("x" * 2000, "<@U123>")), channel="#ops"
    )
    assert payload["channel"] == "#ops"
    assert payload["blocks"][1]["text"]["text"] == "a &lt;b&gt; &amp; c"
    samples = payload["blocks"][2]["text"]["text"]
    assert "&lt;@U123&gt;" in samples and "<@" not in samples
    assert "x" * 499 + "…" in samples and "x" * 501 not in samples
    assert len(samples) <= 3000


# --- pagerduty --------------------------------------------------------------------------------


def test_pagerduty_trigger_is_exact() -> None:
    assert pagerduty_payload(make_alert(), "R0UT1NGKEY", "host-1") == {
        "routing_key": "R0UT1NGKEY",
        "event_action": "trigger",
        "dedup_key": "api_error_burst:checkout",
        "payload": {
            "summary": "api_error_burst [checkout]: 7 ERROR events from api in 60s",
            "severity": "error",
            "source": "host-1",
            "timestamp": "2026-11-26T12:00:42+00:00",
            "component": "api_error_burst",
            "group": "checkout",
            "class": "forwarder.alarm",
            "custom_details": {
                "rule": "api_error_burst",
                "group": "checkout",
                "state": "firing",
                "severity": "error",
                "count": 7,
                "window_s": 60.0,
                "samples": ["db timeout on /orders", "db timeout on /cart"],
                "started_at": "2026-11-26T12:00:00+00:00",
                "at": "2026-11-26T12:00:42+00:00",
                "actions": ["ops_slack", "pd"],
                "summary": "7 ERROR events from api in 60s",
            },
        },
        "client": "forwarder",
    }


def test_pagerduty_resolve_carries_the_same_dedup_key() -> None:
    firing = pagerduty_payload(make_alert(), "K", "s")
    resolved = pagerduty_payload(make_alert(state="resolved"), "K", "s")
    assert resolved == {
        "routing_key": "K",
        "event_action": "resolve",
        "dedup_key": "api_error_burst:checkout",
    }
    assert firing["dedup_key"] == resolved["dedup_key"]


def test_dedup_key_of_an_ungrouped_rule_and_its_length_limit() -> None:
    assert dedup_key(make_alert(group=None)) == "api_error_burst:"
    assert len(dedup_key(make_alert(group="g" * 400))) == 255


@pytest.mark.parametrize(
    ("severity", "expected"),
    [
        ("critical", "critical"),
        ("error", "error"),
        ("warning", "warning"),
        ("info", "info"),
        ("WARN", "warning"),
        ("high", "error"),
        ("low", "info"),
        ("something-else", "error"),
    ],
)
def test_pagerduty_severity_mapping(severity: str, expected: str) -> None:
    assert pagerduty_severity(severity) == expected


def test_pagerduty_summary_is_clipped_to_the_api_limit() -> None:
    payload = pagerduty_payload(make_alert(summary="s" * 5000), "K", "s")
    assert len(payload["payload"]["summary"]) == 1024


# --- webhook ----------------------------------------------------------------------------------


def test_webhook_body_is_exact_sorted_json() -> None:
    body = webhook_body(make_alert(group=None))
    assert body == (
        b'{"actions":["ops_slack","pd"],"at":"2026-11-26T12:00:42+00:00","count":7,'
        b'"group":null,"rule":"api_error_burst","samples":["db timeout on /orders",'
        b'"db timeout on /cart"],"severity":"error","started_at":"2026-11-26T12:00:00+00:00",'
        b'"state":"firing","summary":"7 ERROR events from api in 60s","version":1,'
        b'"window_s":60.0}'
    )
    assert orjson.loads(body)["group"] is None


def test_signature_is_hmac_sha256_of_the_exact_body() -> None:
    body = webhook_body(make_alert())
    expected = hmac.new(b"k3y", body, hashlib.sha256).hexdigest()
    assert sign_body("k3y", body) == f"sha256={expected}"
    assert sign_body("k3y", body + b" ") != sign_body("k3y", body)


# --- email ------------------------------------------------------------------------------------


def test_email_subject_and_body() -> None:
    msg = email_message(make_alert(), "alarms@example.org", ["a@example.org", "b@example.org"])
    assert msg["Subject"] == "[forwarder] FIRING: api_error_burst [checkout]"
    assert msg["From"] == "alarms@example.org"
    assert msg["To"] == "a@example.org, b@example.org"
    assert msg["Date"] == "Thu, 26 Nov 2026 12:00:42 +0000"
    assert msg.get_content() == (
        "7 ERROR events from api in 60s\n"
        "\n"
        "Rule:     api_error_burst\n"
        "Group:    checkout\n"
        "State:    firing\n"
        "Severity: error\n"
        "Count:    7 in 60s\n"
        "Since:    2026-11-26T12:00:00+00:00\n"
        "At:       2026-11-26T12:00:42+00:00\n"
        "\n"
        "Samples:\n"
        "  db timeout on /orders\n"
        "  db timeout on /cart\n"
    )


def test_resolved_email_says_so_and_subject_has_no_line_breaks() -> None:
    msg = email_message(
        make_alert(state="resolved", group="evil\r\nBcc: x@example.org"), "f@x.org", ["t@x.org"], ""
    )
    assert msg["Subject"] == "RESOLVED: api_error_burst [evil Bcc: x@example.org]"
    assert msg["Bcc"] is None
    assert msg.get_content().splitlines()[1] == "This alarm is resolved."


# --- docker -----------------------------------------------------------------------------------


def test_docker_filters_select_the_compose_service_and_project() -> None:
    assert json.loads(docker_service_filters("api")) == {
        "label": ["com.docker.compose.service=api"]
    }
    assert json.loads(docker_service_filters("api", "shop")) == {
        "label": ["com.docker.compose.service=api", "com.docker.compose.project=shop"]
    }


# --- errors, redaction, backoff ---------------------------------------------------------------


def test_slack_webhook_url_is_redacted_to_its_origin() -> None:
    url = "https://hooks.slack.com/services/T000/B000/XXXXSECRET"
    assert redact_url(url) == "https://hooks.slack.com/…"
    assert redact_url("http://user:pw@127.0.0.1:8080/x?token=1") == "http://127.0.0.1:8080/…"
    assert redact_url("not a url") == "<redacted url>"


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (NotifyError("x", kind="transient"), "transient"),
        (NotifyError("x", kind="permanent"), "permanent"),
        (TimeoutError(), "transient"),
        (ConnectionRefusedError(111, "refused"), "transient"),
        (aiohttp.ServerDisconnectedError(), "transient"),
        (smtplib.SMTPServerDisconnected("gone"), "transient"),
        (smtplib.SMTPResponseException(451, b"try later"), "transient"),
        (smtplib.SMTPAuthenticationError(535, b"bad credentials"), "permanent"),
        (smtplib.SMTPRecipientsRefused({"a@x": (550, b"no such user")}), "permanent"),
        (smtplib.SMTPRecipientsRefused({"a@x": (450, b"mailbox busy")}), "transient"),
        (ValueError("bad"), "permanent"),
    ],
)
def test_classify(exc: BaseException, kind: str) -> None:
    assert classify(exc) == kind


def test_describe_error_never_shows_the_url_of_an_aiohttp_error() -> None:
    exc = aiohttp.InvalidURL("https://hooks.slack.com/services/T/B/SECRET")
    assert describe_error(exc) == "InvalidURL"
    assert "SECRET" not in describe_error(exc)
    assert describe_error(smtplib.SMTPResponseException(451, b"try\r\n later")) == (
        "SMTP 451 try later"
    )


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "permanent"),
        (404, "permanent"),
        (408, "transient"),
        (429, "transient"),
        (500, "transient"),
        (503, "transient"),
    ],
)
def test_http_status_classification(status: int, kind: str) -> None:
    assert http_status_kind(status) == kind


def test_retry_after_seconds_only() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("-1") is None


def test_backoff_grows_exponentially_within_jitter_and_is_capped() -> None:
    policy = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=8.0)
    rng = random.Random(7)
    for n, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (40, 8.0)]:
        for _ in range(50):
            delay = backoff_delay(n, policy, rng)
            assert ceiling / 2 <= delay <= ceiling, (n, delay)


def test_backoff_honours_retry_after_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=5.0)
    rng = random.Random(1)
    assert backoff_delay(1, policy, rng, retry_after_s=3.0) == 3.0
    assert backoff_delay(1, policy, rng, retry_after_s=3600.0) == 5.0


def test_backoff_is_deterministic_under_a_seed() -> None:
    policy = RetryPolicy()
    a = [backoff_delay(n, policy, random.Random(3)) for n in range(1, 6)]
    b = [backoff_delay(n, policy, random.Random(3)) for n in range(1, 6)]
    assert a == b


# --- secrets from the environment -------------------------------------------------------------


def test_secret_from_the_environment() -> None:
    env = {"SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/S"}
    assert (
        resolve_secret("notifiers.ops.webhook_url", env="SLACK_WEBHOOK_URL", environ=env)
        == env["SLACK_WEBHOOK_URL"]
    )


def test_missing_or_empty_variable_names_key_and_variable() -> None:
    with pytest.raises(SecretError) as missing:
        resolve_secret("notifiers.ops.webhook_url", env="SLACK_WEBHOOK_URL", environ={})
    assert str(missing.value) == (
        "notifiers.ops.webhook_url_env: environment variable SLACK_WEBHOOK_URL is not set"
    )
    with pytest.raises(SecretError, match="SLACK_WEBHOOK_URL is empty"):
        resolve_secret("k", env="SLACK_WEBHOOK_URL", environ={"SLACK_WEBHOOK_URL": " "})
    with pytest.raises(SecretError, match="set exactly one of k_env"):
        resolve_secret("k", environ={})


def test_alert_replace_keeps_payloads_consistent() -> None:
    # A repeat of a firing alert has the same dedup key, so PagerDuty folds it.
    first = make_alert()
    repeat = replace(first, at=datetime(2026, 11, 26, 13, 0, tzinfo=UTC), count=12)
    assert dedup_key(first) == dedup_key(repeat)
