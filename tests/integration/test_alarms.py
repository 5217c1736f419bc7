"""Alarms and sampling through a real `forwarder run`, with a real HTTP receiver."""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg
import orjson
from aiohttp import web

from tests.integration.daemon import Daemon, count_rows, write_config
from tests.support import wait_until


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
