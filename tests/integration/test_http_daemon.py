"""The HTTP face of a real `forwarder run`: intake to rows, health, metrics, the page."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import asyncpg

from tests.integration.daemon import Daemon, write_config
from tests.support import free_port, wait_until


async def test_browser_errors_posted_to_the_daemon_become_rows(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    port = free_port()
    http = f"""
[http]
enabled = true
listen = "127.0.0.1:{port}"
cors_origins = ["https://panel.example.com"]
"""
    config = write_config(tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema, files={},
                          extra=http, privacy_services=("ui",))  # fmt: skip
    daemon = Daemon(config)
    daemon.env_extra = {
        "FORWARDER_HTTP_TOKENS": "token-for-the-test-0123456789",
        "PRIVACY_HMAC_KEY": "a-privacy-key-for-the-test-0123",
    }
    await daemon.start()
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer token-for-the-test-0123456789"}
    try:
        async with aiohttp.ClientSession() as client:

            async def up() -> bool:
                try:
                    async with client.get(f"{base}/health") as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(up, what="/health answering 200")
            body = [
                {"level": "error", "message": "TypeError: x is undefined",
                 "meta": {"url": "https://panel.example.com/orders", "user_id": 7}},
                {"level": "warning", "message": "slow render", "event": "ui.slow"},
            ]  # fmt: skip
            async with client.post(f"{base}/logs/ingest", json=body, headers=auth) as r:
                assert r.status == 202, await r.text()
                assert await r.json() == {"accepted": 2}
            async with client.post(
                f"{base}/logs/ingest",
                data=b"{not json",
                headers={**auth, "Content-Type": "application/json"},
            ) as r:
                assert r.status == 400
                assert "error" in await r.json()
            async with client.post(f"{base}/logs/ingest", json=body) as r:
                assert r.status == 401

            async def stored() -> bool:
                conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema})
                try:
                    return await conn.fetchval("SELECT count(*) FROM system_logs") == 2
                except asyncpg.UndefinedTableError:
                    return False
                finally:
                    await conn.close()

            await wait_until(stored, what="the two ingested rows")
            async with client.get(f"{base}/logs/recent?service=ui&level=ERROR", headers=auth) as r:
                assert r.status == 200
                rows = await r.json()
            text = str(rows)
            assert "TypeError: x is undefined" in text
            assert "'user_id': 7" not in text  # pseudonymized before storage
            async with client.get(f"{base}/metrics") as r:
                metrics = await r.text()
            assert "forwarder_sink_rows_written_total" in metrics or "rows_written" in metrics
            async with client.get(f"{base}/") as r:
                assert r.status == 200
                assert "<html" in (await r.text()).lower()
            async with client.get(f"{base}/ui-logger.js") as r:
                assert r.status == 200 and "ForwarderLogger" in await r.text()
    finally:
        code = await daemon.stop()
    assert code == 0, daemon.stderr()


async def test_a_backfill_with_http_configured_reads_its_files_and_exits(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    """The intake never ends; a backfill (--exit-on-eof) leaves it off instead of hanging."""
    port = free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_bytes(b"".join(b"INFO backfilled %d\n" % i for i in range(50)))
    http = f'\n[http]\nenabled = true\nlisten = "127.0.0.1:{port}"\n'
    config = write_config(tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema,
                          files={"a": [str(logs / "a.log")]}, extra=http)  # fmt: skip
    daemon = Daemon(config, "--exit-on-eof")
    daemon.env_extra = {"FORWARDER_HTTP_TOKENS": "token-for-the-test-0123456789"}
    await daemon.start()
    try:
        code = await daemon.wait(60)
    finally:
        await daemon.stop()
    assert code == 0, daemon.stderr()
    assert "the HTTP server and intake are not started" in daemon.stderr()
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema})
    try:
        assert await conn.fetchval("SELECT count(*) FROM system_logs") == 50
    finally:
        await conn.close()
