"""Alarms and sampling through a real `forwarder run`, with a real HTTP receiver."""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg
import orjson
from aiohttp import web

from tests.integration.daemon import Daemon, connected, count_rows, write_config
from tests.support import api_error_burst, free_port, wait_until


def line(level: str, message: str, service: str = "api", **meta: object) -> bytes:
    return (
        orjson.dumps(
            {"service": service, "level": level, "event": "t", "message": message, "meta": meta}
        )
        + b"\n"
    )


class Receiver:
    """An aiohttp server standing in for Slack and a webhook endpoint."""

    def __init__(self) -> None:
        self.slack: list[dict] = []
        self.hooks: list[tuple[dict, str | None]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/slack", self._slack)
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def _slack(self, request: web.Request) -> web.Response:
        self.slack.append(await request.json())
        return web.Response(text="ok")

    async def _hook(self, request: web.Request) -> web.Response:
        self.hooks.append((await request.json(), request.headers.get("X-Forwarder-Signature")))
        return web.Response(text="ok")

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


ALARMS = """
[[alarms]]
name = "api_error_burst"
type = "threshold"
match = {{ service = "api", level = "ERROR" }}
threshold = 5
window_s = 5
resolve_after_s = 1
actions = ["ops_slack", "audit"]

[notifiers.ops_slack]
type = "slack"
webhook_url_env = "TEST_SLACK_WEBHOOK_URL"

[notifiers.audit]
type = "webhook"
url = "http://127.0.0.1:{port}/hook"
hmac_secret_env = "TEST_HOOK_SECRET"
"""


async def test_an_error_burst_fires_notifies_records_and_resolves(
    tmp_path: Path, pg_dsn: str, pg_schema: str, monkeypatch: object
) -> None:
    receiver = await Receiver().start()
    logs = tmp_path / "logs"
    logs.mkdir()
    config = write_config(tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema,
                          files={"api": [str(logs / "api.log")]},
                          extra=ALARMS.format(port=receiver.port))  # fmt: skip
    os.environ["TEST_SLACK_WEBHOOK_URL"] = f"http://127.0.0.1:{receiver.port}/slack"
    os.environ["TEST_HOOK_SECRET"] = "s3cret-for-the-hmac"
    daemon = Daemon(config)
    daemon.env_extra = {k: os.environ[k] for k in ("TEST_SLACK_WEBHOOK_URL", "TEST_HOOK_SECRET")}
    await daemon.start()
    try:
        with (logs / "api.log").open("ab") as f:
            f.write(b"".join(line("ERROR", f"db timeout {i}") for i in range(4)))
            f.write(line("WARNING", "not an error"))
        await wait_until(lambda: _count(pg_dsn, pg_schema, 5), what="first rows")
        assert receiver.slack == []  # four errors: below the threshold
        with (logs / "api.log").open("ab") as f:
            f.write(line("ERROR", "db timeout 4"))
        await wait_until(lambda: len(receiver.slack) >= 1 and len(receiver.hooks) >= 1,
                         what="the firing notifications")  # fmt: skip
        fired = receiver.slack[0]
        assert fired["text"].startswith("[FIRING] api_error_burst")
        body, signature = receiver.hooks[0]
        assert body["rule"] == "api_error_burst" and body["state"] == "firing"
        assert body["count"] == 5
        assert signature is not None and signature.startswith("sha256=")
        await wait_until(lambda: _checks(pg_dsn, pg_schema, "failed"), what="the failed row")
        # No more errors: resolved after resolve_after_s (1 s), and said so.
        await wait_until(lambda: any(m["text"].startswith("[RESOLVED]") for m in receiver.slack),
                         what="the resolved notification")  # fmt: skip
        await wait_until(lambda: _checks(pg_dsn, pg_schema, "ok"), what="the ok row")
    finally:
        code = await daemon.stop()
        await receiver.close()
    assert code == 0, daemon.stderr()
    assert "s3cret" not in daemon.stderr()


async def _count(dsn: str, schema: str, n: int) -> bool:
    return await count_rows(dsn, schema) >= n


async def _checks(dsn: str, schema: str, status: str) -> bool:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM system_checks WHERE name = 'api_error_burst' AND status = $1",
                status,
            )
        )
    finally:
        await conn.close()


async def test_a_flood_is_sampled_but_no_error_is_dropped(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    config = write_config(tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema,
                          files={"api": [str(logs / "api.log")]},
                          sampling_threshold_per_min=100)  # fmt: skip
    daemon = await Daemon(config).start()
    lines = [line("ERROR" if i % 50 == 0 else "INFO", f"m{i}") for i in range(3000)]
    try:
        (logs / "api.log").write_bytes(b"".join(lines))
        await wait_until(lambda: _has_all_errors(pg_dsn, pg_schema), what="every error row")
    finally:
        code = await daemon.stop()  # the drain writes the summary row
    assert code == 0, daemon.stderr()
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema})
    try:
        kept_info = await conn.fetchval(
            "SELECT count(*) FROM system_logs WHERE level = 'INFO' AND event = 't'"
        )
        dropped = await conn.fetchval(
            "SELECT coalesce(sum((meta->'dropped'->>'INFO')::int), 0) FROM system_logs "
            "WHERE event = 'forwarder.sampled'"
        )
    finally:
        await conn.close()
    assert kept_info < 1000, "a flood 30x over the threshold must be sampled"
    assert kept_info + dropped == 2940, "kept + dropped rebuild the INFO total"


async def _has_all_errors(dsn: str, schema: str) -> bool:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        n = await conn.fetchval("SELECT count(*) FROM system_logs WHERE level = 'ERROR'")
    except asyncpg.UndefinedTableError:
        return False
    finally:
        await conn.close()
    return n == 60


HEALTH = """
[[alarms]]
name = "redis_down"
type = "health"
probe = "redis"
severity = "critical"
resolve_after_s = 1
actions = ["pagerduty", "support_email"]

[[alarms]]
name = "redis_up_check"
type = "health"
probe = "real_redis"
actions = ["pagerduty"]

[notifiers.pagerduty]
type = "pagerduty"
routing_key_env = "TEST_PD_KEY"
url = "http://127.0.0.1:{port}/pagerduty"

[notifiers.support_email]
type = "email"
host = "127.0.0.1"
port = {smtp_port}
starttls = false
sender = "forwarder@example.com"
to = ["support@example.com"]

[probes.redis]
type = "redis"
host = "127.0.0.1"
port = {closed_port}
interval_s = 0.2
timeout_s = 0.2

[probes.real_redis]
type = "redis"
host = "127.0.0.1"
port = 6379
interval_s = 0.2
timeout_s = 0.2
"""


async def test_a_failing_probe_pages_emails_records_and_survives_a_restart(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    import socket

    from aiosmtpd.controller import Controller

    with socket.socket() as s:  # the machine's Redis answers the second probe
        if s.connect_ex(("127.0.0.1", 6379)) != 0:
            import pytest

            pytest.skip("no Redis on 127.0.0.1:6379 (the CI machine runs one)")

    class Mailbox:
        def __init__(self) -> None:
            self.messages: list[bytes] = []

        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            self.messages.append(envelope.content)  # type: ignore[attr-defined]
            return "250 OK"

    mailbox = Mailbox()
    smtp_port = free_port()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    receiver = await Receiver().start()
    pd: list[dict] = []

    async def pagerduty(request: web.Request) -> web.Response:
        pd.append(await request.json())
        return web.json_response({"status": "success"}, status=202)

    receiver.runner.app.router._frozen = False  # type: ignore[union-attr]
    receiver.runner.app.router.add_post("/pagerduty", pagerduty)  # type: ignore[union-attr]
    config = write_config(
        tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema, files={},
        extra=HEALTH.format(port=receiver.port, smtp_port=smtp_port, closed_port=free_port()),
    )  # fmt: skip
    env = {"TEST_PD_KEY": "pd-routing-key-123"}
    daemon = Daemon(config)
    daemon.env_extra = env
    await daemon.start()
    try:
        await wait_until(lambda: any(e.get("event_action") == "trigger" for e in pd),
                         what="the PagerDuty trigger")  # fmt: skip
        trigger = next(e for e in pd if e["event_action"] == "trigger")
        assert trigger["routing_key"] == "pd-routing-key-123"
        assert trigger["dedup_key"] == "redis_down:"
        assert trigger["payload"]["severity"] == "critical"
        await wait_until(lambda: len(mailbox.messages) >= 1, what="the email")
        assert b"redis_down" in mailbox.messages[0]
        await wait_until(lambda: _probe_rows(pg_dsn, pg_schema), what="probe results recorded")
        assert await daemon.stop() == 0, daemon.stderr()
        triggers = sum(1 for e in pd if e["event_action"] == "trigger")
        # Restart: the alarm is still firing (read back), and no second page is sent.
        daemon = Daemon(config)
        daemon.env_extra = env
        await daemon.start()
        await wait_until(lambda: "firing alarm(s) restored" in daemon.stderr(),
                         what="the firing state restored")  # fmt: skip
        await wait_until(lambda: _probe_rows(pg_dsn, pg_schema, at_least=20),
                         what="more probe results after the restart")  # fmt: skip
        assert sum(1 for e in pd if e["event_action"] == "trigger") == triggers
        assert not any(e.get("dedup_key") == "redis_up_check:" for e in pd)
    finally:
        await daemon.stop()
        await receiver.close()
        smtp.stop()
    assert "pd-routing-key-123" not in daemon.stderr()
    async with connected(pg_dsn, pg_schema) as conn:
        details = await conn.fetchval(
            "SELECT details FROM system_checks WHERE name = 'redis_down' ORDER BY id LIMIT 1"
        )
    assert orjson.loads(details)["rule"] == "redis_down"  # a JSON object, not a string


async def _probe_rows(dsn: str, schema: str, at_least: int = 3) -> bool:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        ok = await conn.fetchval(
            "SELECT count(*) FROM system_checks WHERE name = 'probe:real_redis' AND status = 'ok'"
        )
        failed = await conn.fetchval(
            "SELECT count(*) FROM system_checks WHERE name = 'probe:redis' AND status = 'failed'"
        )
    finally:
        await conn.close()
    return ok >= 1 and failed >= at_least


# Appended to the api_error_burst rule (tests.support.api_error_burst).
RESET_ALARM = """resolve_after_s = 3600

[http]
enabled = true
listen = "127.0.0.1:{port}"
tokens_file = "{tokens}"
"""


async def test_alerts_reset_reaches_the_running_daemon_so_the_alarm_fires_again(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    """Reset through the daemon (memory and rows): the next burst is a new firing. With
    no daemon answering, the CLI writes the ok rows itself."""
    import asyncio

    from tests.integration.test_cli import forwarder

    tokens = tmp_path / "tokens"
    tokens.write_text("token-for-the-cli-0123456789\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    config = write_config(tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema,
                          files={"api": [str(logs / "api.log")]},
                          extra=api_error_burst()
                          + RESET_ALARM.format(port=free_port(), tokens=tokens))  # fmt: skip

    def burst() -> None:
        with (logs / "api.log").open("ab") as f:
            f.write(b"".join(line("ERROR", f"db timeout {i}") for i in range(5)))

    daemon = await Daemon(config).start()
    try:
        burst()
        await wait_until(lambda: _checks_are(pg_dsn, pg_schema, "failed", 1), what="firing")
        reset = await asyncio.to_thread(
            forwarder, "alerts", "--config", str(config), "--reset", "api_error_burst"
        )
        assert reset.returncode == 0, reset.stderr
        assert "1 alarm(s) reset in the running daemon (1 resolved in its memory)" in reset.stdout
        burst()  # a new firing, not the old one going on
        await wait_until(lambda: _checks_are(pg_dsn, pg_schema, "failed", 2), what="refiring")
    finally:
        code = await daemon.stop()
    assert code == 0, daemon.stderr()
    again = await asyncio.to_thread(forwarder, "alerts", "--config", str(config), "--all")
    assert again.returncode == 0, again.stderr
    assert "1 alarm(s) reset in system_checks" in again.stdout


async def _checks_are(dsn: str, schema: str, status: str, n: int) -> bool:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM system_checks WHERE name = 'api_error_burst' AND status = $1",
            status,
        )
    except asyncpg.UndefinedTableError:
        return False
    finally:
        await conn.close()
    assert count <= n, f"{count} {status} rows, expected {n}"
    return count == n
