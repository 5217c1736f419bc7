"""Notifiers and the Dispatcher against real receivers: aiohttp servers on TCP and on a
unix socket (the Docker Engine API), and a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from pydantic import TypeAdapter

from forwarder.alarms.config import NotifierConfig
from forwarder.alarms.notify import (
    Dispatcher,
    EmailNotifier,
    Notifier,
    RetryPolicy,
    open_notifiers,
)
from forwarder.alarms.rules import Alert
from forwarder.alarms.secrets import SecretError
from forwarder.clock import SystemClock
from forwarder.pipeline.stage import END_OF_STREAM
from tests.component.receiver import Receiver
from tests.support import free_port, wait_until

STARTED = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
AT = datetime(2026, 11, 26, 12, 0, 42, tzinfo=UTC)
SLACK_PATH = "/services/T0001/B0001/SeCrEtToKeN"
ROUTING_KEY = "R0UT1NG-KEY-0123456789abcdef0123"
HMAC_KEY = "webhook-signing-key"
BEARER = "api-bearer-token"

NOTIFIER_CONFIG = TypeAdapter(NotifierConfig)


def make_alert(**overrides: Any) -> Alert:
    fields: dict[str, Any] = {
        "rule": "api_error_burst",
        "group": None,
        "state": "firing",
        "severity": "critical",
        "count": 5,
        "window_s": 60.0,
        "samples": ("boom 1", "boom 2"),
        "started_at": STARTED,
        "at": AT,
        "actions": (),
        "summary": "5 ERROR events from api in 60s",
    }
    fields.update(overrides)
    return Alert(**fields)


def notifier_configs(raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Fast retries for tests: the policy comes from the config, as in production."""
    defaults = {"timeout_s": 2.0, "retries": 2, "backoff_s": 0.01}
    return {name: NOTIFIER_CONFIG.validate_python({**defaults, **cfg}) for name, cfg in raw.items()}


class Running:
    """A Dispatcher running on its own input queue."""

    def __init__(self, notifiers: dict[str, Notifier], **kwargs: Any) -> None:
        self.dispatcher = Dispatcher(notifiers, SystemClock(), **kwargs)
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=100)
        self.task = asyncio.create_task(self.dispatcher.run(self.queue))

    def offer(self, alert: Alert) -> bool:
        return self.dispatcher.offer(self.queue, alert)

    def stats(self, name: str) -> dict[str, Any]:
        return self.dispatcher.stats[name].as_dict()

    async def finish(self) -> None:
        await self.queue.put(END_OF_STREAM)
        async with asyncio.timeout(10):
            await self.task


def http_configs(rec: Receiver) -> dict[str, Any]:
    return notifier_configs(
        {
            "ops_slack": {"type": "slack", "webhook_url_env": "SLACK_WEBHOOK_URL"},
            "pd": {
                "type": "pagerduty",
                "routing_key_env": "PD_ROUTING_KEY",
                "url": rec.url("/v2/enqueue"),
                "source": "forwarder-test",
            },
            "hook": {
                "type": "webhook",
                "url": rec.url("/hook"),
                "hmac_secret_env": "HOOK_KEY",
                "headers": {"X-Team": "ops"},
            },
            "stop_api": {
                "type": "http",
                "url": rec.url("/control/stop"),
                "bearer_token_env": "API_TOKEN",
            },
        }
    )


def http_environ(rec: Receiver) -> dict[str, str]:
    return {
        "SLACK_WEBHOOK_URL": rec.url(SLACK_PATH),
        "PD_ROUTING_KEY": ROUTING_KEY,
        "HOOK_KEY": HMAC_KEY,
        "API_TOKEN": BEARER,
    }


# --- HTTP notifiers: exact payloads -------------------------------------------------------------


async def test_firing_then_resolved_reach_every_receiver_with_exact_payloads(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    actions = ("ops_slack", "pd", "hook", "stop_api")
    firing = make_alert(actions=actions)
    resolved = make_alert(actions=actions, state="resolved", count=0, samples=())
    async with open_notifiers(
        http_configs(receiver), session, environ=http_environ(receiver)
    ) as notifiers:
        for name in actions:  # one shared session, never one per notifier or per call
            assert notifiers[name]._session is session  # type: ignore[attr-defined]
        run = Running(notifiers)
        assert run.offer(firing)
        await wait_until(lambda: len(receiver.requests) == 4, what="the firing notifications")
        assert run.offer(resolved)
        await wait_until(lambda: len(receiver.requests) == 7, what="the resolved notifications")
        await run.finish()

    slack = receiver.at(SLACK_PATH)
    assert [r.method for r in slack] == ["POST", "POST"]
    assert slack[0].headers["Content-Type"] == "application/json"
    assert slack[0].json() == {
        "text": "[FIRING] api_error_burst: 5 ERROR events from api in 60s",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": "FIRING: api_error_burst"}},
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": "5 ERROR events from api in 60s"},
                "fields": [
                    {"type": "mrkdwn", "text": "*Rule*\napi_error_burst"},
                    {"type": "mrkdwn", "text": "*Group*\n-"},
                    {"type": "mrkdwn", "text": "*State*\nfiring"},
                    {"type": "mrkdwn", "text": "*Severity*\ncritical"},
                    {"type": "mrkdwn", "text": "*Count*\n5 in 60s"},
                    {"type": "mrkdwn", "text": "*Since*\n2026-11-26T12:00:00+00:00"},
                ],
            },
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": "*Samples*\n```boom 1\nboom 2```"},
            },
        ],
    }
    assert slack[1].json()["text"] == (
        "[RESOLVED] api_error_burst is resolved: 5 ERROR events from api in 60s"
    )

    pd = receiver.at("/v2/enqueue")
    assert [r.json()["event_action"] for r in pd] == ["trigger", "resolve"]
    assert pd[0].json() == {
        "routing_key": ROUTING_KEY,
        "event_action": "trigger",
        "dedup_key": "api_error_burst:",
        "payload": {
            "summary": "api_error_burst [-]: 5 ERROR events from api in 60s",
            "severity": "critical",
            "source": "forwarder-test",
            "timestamp": "2026-11-26T12:00:42+00:00",
            "component": "api_error_burst",
            "group": "-",
            "class": "forwarder.alarm",
            "custom_details": {
                "rule": "api_error_burst",
                "group": None,
                "state": "firing",
                "severity": "critical",
                "count": 5,
                "window_s": 60.0,
                "samples": ["boom 1", "boom 2"],
                "started_at": "2026-11-26T12:00:00+00:00",
                "at": "2026-11-26T12:00:42+00:00",
                "actions": list(actions),
                "summary": "5 ERROR events from api in 60s",
            },
        },
        "client": "forwarder",
    }
    assert pd[1].json() == {
        "routing_key": ROUTING_KEY,
        "event_action": "resolve",
        "dedup_key": "api_error_burst:",
    }

    hook = receiver.at("/hook")
    assert len(hook) == 2
    assert hook[0].body == (
        b'{"actions":["ops_slack","pd","hook","stop_api"],"at":"2026-11-26T12:00:42+00:00",'
        b'"count":5,"group":null,"rule":"api_error_burst","samples":["boom 1","boom 2"],'
        b'"severity":"critical","started_at":"2026-11-26T12:00:00+00:00","state":"firing",'
        b'"summary":"5 ERROR events from api in 60s","version":1,"window_s":60.0}'
    )
    assert hook[0].headers["X-Team"] == "ops"
    for request in hook:  # the receiver's side of the signature check
        expected = hmac.new(HMAC_KEY.encode(), request.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(request.headers["X-Forwarder-Signature"], f"sha256={expected}")
    assert hook[1].json()["state"] == "resolved"

    stop = receiver.at("/control/stop")
    assert len(stop) == 1, "the http action runs on firing only"
    assert stop[0].method == "POST"
    assert stop[0].headers["Authorization"] == f"Bearer {BEARER}"
    assert stop[0].json()["rule"] == "api_error_burst"

    stats = {name: run.stats(name) for name in actions}
    assert stats["ops_slack"] == {
        "sent": 2,
        "failed": 0,
        "dropped": 0,
        "retried": 0,
        "skipped": 0,
        "last_error": None,
    }
    assert stats["stop_api"]["sent"] == 1 and stats["stop_api"]["skipped"] == 1
    assert run.dispatcher.status()["state"] == "stopped"


async def test_a_500_is_retried_until_it_succeeds(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.statuses[SLACK_PATH] = [500, 503, 200]
    async with open_notifiers(
        http_configs(receiver), session, environ=http_environ(receiver)
    ) as notifiers:
        run = Running(notifiers)
        run.offer(make_alert(actions=("ops_slack",)))
        await wait_until(lambda: run.stats("ops_slack")["sent"] == 1, what="delivery after retries")
        await run.finish()
    assert len(receiver.at(SLACK_PATH)) == 3
    assert run.stats("ops_slack")["retried"] == 2
    assert run.stats("ops_slack")["failed"] == 0


async def test_a_receiver_that_keeps_failing_is_counted_and_the_dispatcher_keeps_going(
    receiver: Receiver, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses[SLACK_PATH] = [500]
    receiver.statuses["/v2/enqueue"] = [500]
    caplog.set_level(logging.DEBUG, logger="forwarder.alarms.notify")
    async with open_notifiers(
        http_configs(receiver), session, environ=http_environ(receiver)
    ) as notifiers:
        run = Running(notifiers)
        run.offer(make_alert(actions=("ops_slack", "pd")))
        await wait_until(
            lambda: run.stats("ops_slack")["failed"] == 1 and run.stats("pd")["failed"] == 1,
            what="the failures to be counted",
        )
        assert len(receiver.at(SLACK_PATH)) == 3  # 1 + retries=2, then it gives up
        assert run.dispatcher.status()["state"] == "degraded"
        # The dispatcher goes on: the next alert is delivered elsewhere.
        run.offer(make_alert(actions=("hook",), rule="next_rule"))
        await wait_until(lambda: run.stats("hook")["sent"] == 1, what="the next alert")
        await run.finish()

    assert run.stats("ops_slack")["last_error"] == (f"HTTP 500 from {receiver.base}/…: error 500")
    text = "\n".join(
        r.getMessage() + " " + json.dumps(r.__dict__, default=str) for r in caplog.records
    )
    assert "failed for alarm api_error_burst (firing) after 3 attempt(s)" in text
    assert "SeCrEtToKeN" not in text, "the slack webhook URL must be redacted"
    assert ROUTING_KEY not in text
    assert receiver.url("/v2/enqueue") in text  # a plain URL may be shown


async def test_a_4xx_answer_is_not_retried(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.statuses["/v2/enqueue"] = [400]
    async with open_notifiers(
        http_configs(receiver), session, environ=http_environ(receiver)
    ) as notifiers:
        run = Running(notifiers)
        run.offer(make_alert(actions=("pd",)))
        await wait_until(lambda: run.stats("pd")["failed"] == 1, what="the permanent failure")
        await run.finish()
    assert len(receiver.at("/v2/enqueue")) == 1
    assert run.stats("pd")["retried"] == 0


async def test_a_429_is_retried(receiver: Receiver, session: aiohttp.ClientSession) -> None:
    receiver.statuses["/hook"] = [429, 200]
    async with open_notifiers(
        http_configs(receiver), session, environ=http_environ(receiver)
    ) as notifiers:
        run = Running(notifiers)
        run.offer(make_alert(actions=("hook",)))
        await wait_until(lambda: run.stats("hook")["sent"] == 1, what="delivery after 429")
        await run.finish()
    assert len(receiver.at("/hook")) == 2


async def test_a_slow_receiver_times_out_without_holding_up_the_others(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.hang.add(SLACK_PATH)
    configs = http_configs(receiver)
    configs["ops_slack"] = NOTIFIER_CONFIG.validate_python(
        {
            "type": "slack",
            "webhook_url_env": "SLACK_WEBHOOK_URL",
            "timeout_s": 0.3,
            "retries": 1,
            "backoff_s": 0.01,
        }
    )
    async with open_notifiers(configs, session, environ=http_environ(receiver)) as notifiers:
        run = Running(notifiers)
        for i in range(3):
            run.offer(make_alert(actions=("ops_slack", "hook"), rule=f"rule_{i}"))
        # The webhook lane does not wait for Slack's.
        await wait_until(lambda: run.stats("hook")["sent"] == 3, what="the webhook deliveries")
        assert run.stats("ops_slack")["failed"] == 0
        await wait_until(
            lambda: run.stats("ops_slack")["failed"] == 3, what="the slack timeouts", timeout_s=30
        )
        await run.finish()
    assert run.stats("ops_slack")["last_error"] == "timed out after 0.3s"
    assert len(receiver.at(SLACK_PATH)) == 6  # 2 attempts per alert


async def test_a_full_queue_drops_and_counts_without_blocking_the_producer(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    async with open_notifiers(
        http_configs(receiver), session, environ=http_environ(receiver)
    ) as notifiers:
        dispatcher = Dispatcher(notifiers, SystemClock())
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        alert = make_alert(actions=("ops_slack", "pd"))
        assert dispatcher.offer(queue, alert) is True
        assert dispatcher.offer(queue, alert) is False  # returns at once
        assert dispatcher.stats["ops_slack"].dropped == 1
        assert dispatcher.stats["pd"].dropped == 1
        assert dispatcher.stats["hook"].dropped == 0


async def test_a_full_lane_drops_only_for_its_own_notifier(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    receiver.hang.add(SLACK_PATH)
    async with open_notifiers(
        http_configs(receiver), session, environ=http_environ(receiver)
    ) as notifiers:
        run = Running(notifiers, lane_size=1)
        for i in range(4):
            run.offer(make_alert(actions=("ops_slack", "hook"), rule=f"rule_{i}"))
            # one at a time, so the webhook lane (fast) never overflows
            await wait_until(lambda i=i: run.stats("hook")["sent"] == i + 1, what="webhook")
        # slack: one in flight (hanging), one queued, two dropped
        assert run.stats("ops_slack")["dropped"] == 2
        assert run.stats("hook")["dropped"] == 0
        run.task.cancel()  # the runtime's drain deadline gives up on the hanging lane
        with pytest.raises(asyncio.CancelledError):
            await run.task


async def test_unknown_actions_are_counted_and_skipped(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    async with open_notifiers(
        http_configs(receiver), session, environ=http_environ(receiver)
    ) as notifiers:
        run = Running(notifiers)
        run.offer(make_alert(actions=("nobody", "hook")))
        await wait_until(lambda: run.stats("hook")["sent"] == 1, what="the known action")
        await run.finish()
    assert run.dispatcher.unknown_actions == 1


async def test_missing_secret_fails_at_build_naming_key_and_variable(
    receiver: Receiver, session: aiohttp.ClientSession
) -> None:
    environ = http_environ(receiver)
    del environ["SLACK_WEBHOOK_URL"]
    with pytest.raises(SecretError) as err:
        async with open_notifiers(http_configs(receiver), session, environ=environ):
            pass
    assert str(err.value) == (
        "notifiers.ops_slack.webhook_url_env: environment variable SLACK_WEBHOOK_URL is not set"
    )


async def test_secrets_from_files(
    receiver: Receiver, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    (tmp_path / "slack_url").write_text(receiver.url(SLACK_PATH) + "\n")
    configs = notifier_configs(
        {"s": {"type": "slack", "webhook_url_file": str(tmp_path / "slack_url")}}
    )
    async with open_notifiers(configs, session, environ={}) as notifiers:
        run = Running(notifiers)
        run.offer(make_alert(actions=("s",)))
        await wait_until(lambda: run.stats("s")["sent"] == 1, what="delivery")
        await run.finish()
    assert len(receiver.at(SLACK_PATH)) == 1  # the trailing newline was stripped

    missing = notifier_configs({"s": {"type": "slack", "webhook_url_file": str(tmp_path / "nope")}})
    with pytest.raises(SecretError) as err:
        async with open_notifiers(missing, session, environ={}):
            pass
    assert str(err.value) == (
        f"notifiers.s.webhook_url_file: cannot read {tmp_path / 'nope'}: No such file or directory"
    )


# --- docker_restart against an Engine API on a unix socket ----------------------------------------


@dataclass
class FakeEngine:
    containers: list[dict[str, Any]]
    restarts: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    list_queries: list[dict[str, Any]] = field(default_factory=list)

    async def list_containers(self, request: web.Request) -> web.Response:
        filters = json.loads(request.query.get("filters", "{}"))
        self.list_queries.append({"all": request.query.get("all"), "filters": filters})
        wanted = [label.split("=", 1) for label in filters.get("label", [])]
        found = [c for c in self.containers if all(c["Labels"].get(k) == v for k, v in wanted)]
        return web.json_response(found)

    async def restart(self, request: web.Request) -> web.Response:
        ident = request.match_info["ident"]
        if not any(c["Id"] == ident for c in self.containers):
            return web.json_response({"message": f"No such container: {ident}"}, status=404)
        self.restarts.append((ident, dict(request.query)))
        return web.Response(status=204)


def container(ident: str, name: str, service: str, project: str = "shop") -> dict[str, Any]:
    labels = {"com.docker.compose.service": service, "com.docker.compose.project": project}
    return {"Id": ident, "Names": [f"/{name}"], "Labels": labels, "State": "running"}


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[FakeEngine, Path]]:
    sock = tmp_path / "docker.sock"
    if len(str(sock)) > 100:  # AF_UNIX path limit
        pytest.skip(f"tmp_path too long for a unix socket: {sock}")
    fake = FakeEngine(
        [
            container("a" * 64, "shop-api-1", "api"),
            container("b" * 64, "shop-worker-1", "worker"),
            container("c" * 64, "other-api-1", "api", project="other"),
        ]
    )
    app = web.Application()
    app.router.add_get("/containers/json", fake.list_containers)
    app.router.add_post("/containers/{ident}/restart", fake.restart)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.UnixSite(runner, str(sock))
    await site.start()
    try:
        yield fake, sock
    finally:
        await runner.cleanup()


async def test_docker_restart_restarts_the_container_of_the_compose_service(
    engine: tuple[FakeEngine, Path], session: aiohttp.ClientSession
) -> None:
    fake, sock = engine
    configs = notifier_configs(
        {
            "restart_api": {
                "type": "docker_restart",
                "service": "api",
                "project": "shop",
                "socket": str(sock),
                "stop_timeout_s": 5,
            }
        }
    )
    async with open_notifiers(configs, session, environ={}) as notifiers:
        run = Running(notifiers)
        run.offer(make_alert(actions=("restart_api",)))
        await wait_until(lambda: run.stats("restart_api")["sent"] == 1, what="the restart")
        run.offer(make_alert(actions=("restart_api",), state="resolved"))
        await run.finish()
    assert fake.list_queries == [
        {
            "all": "1",
            "filters": {
                "label": ["com.docker.compose.service=api", "com.docker.compose.project=shop"]
            },
        }
    ]
    assert fake.restarts == [("a" * 64, {"t": "5"})]
    assert run.stats("restart_api")["skipped"] == 1  # no restart on resolution


async def test_docker_restart_without_project_restarts_every_match_and_unknown_service_fails(
    engine: tuple[FakeEngine, Path], session: aiohttp.ClientSession
) -> None:
    fake, sock = engine
    configs = notifier_configs(
        {
            "all_api": {"type": "docker_restart", "service": "api", "socket": str(sock)},
            "ghost": {"type": "docker_restart", "service": "ghost", "socket": str(sock)},
        }
    )
    async with open_notifiers(configs, session, environ={}) as notifiers:
        run = Running(notifiers)
        run.offer(make_alert(actions=("all_api", "ghost")))
        await wait_until(
            lambda: run.stats("all_api")["sent"] == 1 and run.stats("ghost")["failed"] == 1,
            what="both outcomes",
        )
        await run.finish()
    assert sorted(fake.restarts) == [("a" * 64, {"t": "10"}), ("c" * 64, {"t": "10"})]
    assert run.stats("ghost")["last_error"] == "docker: no container for compose service ghost"
    assert run.stats("ghost")["retried"] == 0  # permanent: not retried


async def test_docker_restart_with_no_engine_is_a_transient_failure(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    configs = notifier_configs(
        {"r": {"type": "docker_restart", "service": "api", "socket": str(tmp_path / "none.sock")}}
    )
    async with open_notifiers(configs, session, environ={}) as notifiers:
        run = Running(notifiers)
        run.offer(make_alert(actions=("r",)))
        await wait_until(lambda: run.stats("r")["failed"] == 1, what="the failure")
        await run.finish()
    assert run.stats("r")["retried"] == 2


# --- email through a real SMTP server -------------------------------------------------------------


class Mailbox:
    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"


class Logins:
    def __init__(self, password: str) -> None:
        self.password = password
        self.seen: list[tuple[str, bool]] = []

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        ok = auth_data.password.decode() == self.password
        self.seen.append((auth_data.login.decode(), ok))
        return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp_server() -> Iterator[tuple[Mailbox, int, Logins]]:
    mailbox, logins = Mailbox(), Logins("s3cret-pw")
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=free_port(),
        authenticator=logins,
        auth_require_tls=False,
    )
    controller.start()
    try:
        yield mailbox, controller.port, logins
    finally:
        controller.stop()


async def test_email_reaches_a_real_smtp_server(
    smtp_server: tuple[Mailbox, int, Logins], session: aiohttp.ClientSession
) -> None:
    mailbox, port, logins = smtp_server
    configs = notifier_configs(
        {
            "mail": {
                "type": "email",
                "host": "127.0.0.1",
                "port": port,
                "starttls": False,
                "username": "alarms",
                "password_env": "SMTP_PASSWORD",
                "sender": "forwarder@example.org",
                "to": ["ops@example.org", "dev@example.org"],
            }
        }
    )
    async with open_notifiers(
        configs, session, environ={"SMTP_PASSWORD": "s3cret-pw"}
    ) as notifiers:
        run = Running(notifiers)
        run.offer(make_alert(actions=("mail",), group="checkout"))
        await wait_until(lambda: len(mailbox.envelopes) == 1, what="the firing mail")
        run.offer(make_alert(actions=("mail",), group="checkout", state="resolved"))
        await wait_until(lambda: len(mailbox.envelopes) == 2, what="the resolved mail")
        await run.finish()
    assert logins.seen == [("alarms", True), ("alarms", True)]
    first = mailbox.envelopes[0]
    assert first.mail_from == "forwarder@example.org"
    assert first.rcpt_tos == ["ops@example.org", "dev@example.org"]
    text = first.content.decode()
    assert "Subject: [forwarder] FIRING: api_error_burst [checkout]\r\n" in text
    assert "Rule:     api_error_burst\r\nGroup:    checkout\r\n" in text
    assert "Samples:\r\n  boom 1\r\n  boom 2\r\n" in text
    second = mailbox.envelopes[1].content.decode()
    assert "Subject: [forwarder] RESOLVED: api_error_burst [checkout]\r\n" in second
    assert "This alarm is resolved." in second
    assert run.stats("mail")["sent"] == 2


async def test_email_with_a_wrong_password_fails_without_retry_or_leak(
    smtp_server: tuple[Mailbox, int, Logins],
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mailbox, port, logins = smtp_server
    configs = notifier_configs(
        {
            "mail": {
                "type": "email",
                "host": "127.0.0.1",
                "port": port,
                "starttls": False,
                "username": "alarms",
                "password_env": "SMTP_PASSWORD",
                "sender": "forwarder@example.org",
                "to": ["ops@example.org"],
            }
        }
    )
    async with open_notifiers(configs, session, environ={"SMTP_PASSWORD": "wrong-pw"}) as n:
        run = Running(n)
        run.offer(make_alert(actions=("mail",)))
        await wait_until(lambda: run.stats("mail")["failed"] == 1, what="the refused login")
        await run.finish()
    # permanent (535): one delivery attempt (smtplib tries each AUTH mechanism in it)
    assert run.stats("mail")["retried"] == 0
    assert logins.seen and all(seen == ("alarms", False) for seen in logins.seen)
    assert mailbox.envelopes == []
    assert str(run.stats("mail")["last_error"]).startswith("SMTP 535")
    assert "wrong-pw" not in caplog.text


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a certificate for the STARTTLS test")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_email_over_starttls_with_login(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    mailbox, logins = Mailbox(), Logins("tls-pw")
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=free_port(),
        tls_context=server_ctx,
        require_starttls=True,
        authenticator=logins,  # auth only after STARTTLS (aiosmtpd's default)
    )
    controller.start()
    try:
        notifier = EmailNotifier(
            "mail",
            host="127.0.0.1",
            port=controller.port,
            sender="forwarder@example.org",
            recipients=["ops@example.org"],
            starttls=True,
            username="alarms",
            password="tls-pw",
            tls_context=ssl.create_default_context(cafile=str(cert)),
            policy=RetryPolicy(timeout_s=5.0, max_attempts=1),
        )
        dispatcher = Dispatcher({"mail": notifier}, SystemClock())
        assert await dispatcher.deliver(notifier, make_alert(actions=("mail",)))
    finally:
        controller.stop()
    assert logins.seen == [("alarms", True)]
    assert (
        "Subject: [forwarder] FIRING: api_error_burst\r\n" in mailbox.envelopes[0].content.decode()
    )


async def test_email_to_a_closed_port_is_retried_then_counted() -> None:
    notifier = EmailNotifier(
        "mail",
        host="127.0.0.1",
        port=free_port(),
        sender="f@example.org",
        recipients=["t@example.org"],
        policy=RetryPolicy(timeout_s=2.0, max_attempts=2, initial_backoff_s=0.01),
    )
    dispatcher = Dispatcher({"mail": notifier}, SystemClock())
    assert await dispatcher.deliver(notifier, make_alert(actions=("mail",))) is False
    stats = dispatcher.stats["mail"]
    assert (stats.failed, stats.retried) == (1, 1)
    assert stats.last_error == "ConnectionRefusedError: Connection refused"


async def test_an_unreachable_slack_is_retried_and_logged_without_its_url(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    configs = notifier_configs({"s": {"type": "slack", "webhook_url_env": "URL", "retries": 1}})
    environ = {"URL": f"http://127.0.0.1:{port}{SLACK_PATH}"}
    caplog.set_level(logging.DEBUG, logger="forwarder.alarms.notify")
    async with open_notifiers(configs, session, environ=environ) as notifiers:
        run = Running(notifiers)
        run.offer(make_alert(actions=("s",)))
        await wait_until(lambda: run.stats("s")["failed"] == 1, what="the failure")
        await run.finish()
    assert run.stats("s")["retried"] == 1
    assert run.stats("s")["last_error"] == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    assert "SeCrEtToKeN" not in caplog.text
