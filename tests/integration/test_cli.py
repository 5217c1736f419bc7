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
from tests.support import api_error_burst


def forwarder(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


async def insert_rows(dsn: str, schema: str, rows: list[tuple]) -> None:
    """Rows straight into system_logs (meta already in jsonb's binary form)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.set_type_codec(
            "jsonb", schema="pg_catalog", encoder=lambda b: b, decoder=lambda b: b, format="binary"
        )
        await conn.copy_records_to_table(
            "system_logs",
            records=rows,
            schema_name=schema,
            columns=["ts", "service", "level", "event", "message", "meta"],
        )
    finally:
        await conn.close()


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
    await insert_rows(pg_dsn, pg_schema, rows)
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


ALARM = api_error_burst()


async def test_check_alerts_fires_and_alerts_lists_and_resets(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    config = write_config(tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema, files={}, extra=ALARM)
    assert forwarder("migrate", "--config", str(config)).returncode == 0
    now = datetime.now(UTC)
    rows = [
        (now - timedelta(seconds=i), "api", "ERROR", "db", f"timeout {i}", b"\x01{}")
        for i in range(6)
    ]
    await insert_rows(pg_dsn, pg_schema, rows)
    dry = forwarder("check-alerts", "--config", str(config), "--window", "60", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "nothing written (dry run)" in dry.stdout
    assert forwarder("alerts", "--config", str(config)).stdout.strip() == "no alarm is firing"
    check = forwarder("check-alerts", "--config", str(config), "--window", "60")
    assert check.returncode == 0, check.stderr
    assert "fired     api_error_burst  count 6" in check.stdout
    listed = forwarder("alerts", "--config", str(config))
    assert listed.stdout.startswith("FIRING  api_error_burst  since ")
    assert "count 6" in listed.stdout
    reset = forwarder("alerts", "--config", str(config), "--reset", "api_error_burst")
    assert reset.returncode == 0 and "1 alarm(s) reset" in reset.stdout
    assert forwarder("alerts", "--config", str(config)).stdout.strip() == "no alarm is firing"


async def test_summary_merges_into_the_oneclick_report(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    config = write_config(tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema, files={})
    assert forwarder("migrate", "--config", str(config)).returncode == 0
    now = datetime.now(UTC)
    rows = [(now - timedelta(minutes=1), "api", "ERROR", "db", "x", b"\x01{}")] * 3 + [
        (now - timedelta(minutes=2), "ui", "INFO", "click", "y", b"\x01{}")
    ]
    await insert_rows(pg_dsn, pg_schema, rows)
    report = tmp_path / "latest_oneclick_report.json"
    report.write_text('{"status": "ok", "checks": [1, 2]}')
    done = forwarder("summary", "--config", str(config), "--window", "15m", "--merge", str(report))
    assert done.returncode == 0, done.stderr
    merged = orjson.loads(report.read_bytes())
    assert merged["status"] == "ok" and merged["checks"] == [1, 2]
    summary = merged["log_summary"]
    assert summary["services"]["api"]["ERROR"] == 3
    assert summary["services"]["ui"]["INFO"] == 1


async def test_retention_dry_run_reports_and_changes_nothing(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    config = write_config(tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema, files={})
    assert forwarder("migrate", "--config", str(config)).returncode == 0
    conn = await asyncpg.connect(pg_dsn)
    try:
        old = datetime.now(UTC).date() - timedelta(days=40)
        name = f"system_logs_p{old:%Y%m%d}"
        await conn.execute(
            f'CREATE TABLE "{pg_schema}"."{name}" PARTITION OF "{pg_schema}".system_logs '
            f"FOR VALUES FROM ('{old}') TO ('{old + timedelta(days=1)}')"
        )
        dry = forwarder("retention", "--config", str(config), "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert name in dry.stdout
        assert await conn.fetchval("SELECT to_regclass($1)", f"{pg_schema}.{name}") is not None
        done = forwarder("retention", "--config", str(config))
        assert done.returncode == 0, done.stderr
        assert await conn.fetchval("SELECT to_regclass($1)", f"{pg_schema}.{name}") is None
    finally:
        await conn.close()
