"""The read and maintenance commands, as real processes against a real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson

from tests.integration.daemon import write_config


def forwarder(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


async def test_migrate_creates_the_tables_once(tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    config = write_config(tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema, files={})
    first = forwarder("migrate", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert "applied migration 1" in first.stdout
    assert "created partition system_logs_p" in first.stdout
    conn = await asyncpg.connect(pg_dsn)
    try:
        tables = {
            r["tablename"]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = $1", pg_schema
            )
        }
    finally:
        await conn.close()
    assert {"system_logs", "system_logs_default", "forwarder_checkpoints",
            "forwarder_dead_letters", "system_checks"} <= tables  # fmt: skip
    again = forwarder("migrate", "--config", str(config))
    assert again.returncode == 0
    assert again.stdout.strip() == "schema up to date"


async def test_recent_shows_the_latest_rows_filtered(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    config = write_config(tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema, files={})
    assert forwarder("migrate", "--config", str(config)).returncode == 0
    now = datetime.now(UTC)
    rows = [
        (
            now - timedelta(minutes=1),
            "api",
            "ERROR",
            "db.down",
            "connection refused",
            b'\x01{"n":1}',
        ),
        (now - timedelta(minutes=2), "api", "INFO", "http", "GET /", b"\x01{}"),
        (now - timedelta(minutes=3), "worker", "ERROR", "cycle", "boom", b"\x01{}"),
        (now - timedelta(hours=2), "api", "ERROR", "old", "too old", b"\x01{}"),
    ]
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.set_type_codec(
            "jsonb", schema="pg_catalog", encoder=lambda b: b, decoder=lambda b: b, format="binary"
        )
        await conn.copy_records_to_table(
            "system_logs",
            records=rows,
            schema_name=pg_schema,
            columns=["ts", "service", "level", "event", "message", "meta"],
        )
    finally:
        await conn.close()
    result = forwarder(
        "recent",
        "--config",
        str(config),
        "--service",
        "api",
        "--level",
        "error",
        "--since",
        "15m",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [(r["event"], r["message"], r["meta"]) for r in lines] == [
        ("db.down", "connection refused", {"n": 1})
    ]
    table = forwarder("recent", "--config", str(config), "--since", "1h")
    assert table.returncode == 0
    assert [line.split()[4] for line in table.stdout.splitlines()] == ["db.down", "http", "cycle"]
    bad = forwarder("recent", "--config", str(config), "--since", "soon")
    assert bad.returncode == 2 and "not a duration: 'soon'" in bad.stderr
