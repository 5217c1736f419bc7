"""Migrations against a real PostgreSQL, each test in its own schema."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest

from forwarder.config import DatabaseConfig
from forwarder.sinks.schema import (
    MIGRATIONS,
    Names,
    ensure_partitions,
    migrate,
    partition_days,
    quote_ident,
)

TODAY = date(2026, 11, 26)


def db_config(schema: str, **kw: object) -> DatabaseConfig:
    return DatabaseConfig(schema_name=schema, **kw)  # type: ignore[arg-type]


async def regclass(conn: asyncpg.Connection, schema: str, name: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{schema}"."{name}"'))


async def partitions(conn: asyncpg.Connection, schema: str, table: str) -> dict[str, str]:
    await conn.execute("SET TimeZone = 'UTC'")  # partition bounds are shown in session time
    rows = await conn.fetch(
        """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = $1::text::regclass""",
        f'"{schema}"."{table}"',
    )
    return {r["relname"]: r["bound"] for r in rows}


def test_partition_days_run_from_yesterday_to_today_plus_ahead() -> None:
    assert partition_days(TODAY, 3) == [TODAY + timedelta(days=d) for d in (-1, 0, 1, 2, 3)]
    assert partition_days(date(2024, 3, 1), 1) == [
        date(2024, 2, 29),
        date(2024, 3, 1),
        date(2024, 3, 2),
    ]


def test_identifiers_are_validated_and_quoted_once() -> None:
    assert quote_ident("system_logs") == '"system_logs"'
    for bad in ['a"b', "A", "1a", "a-b", "", "x" * 64, "a;drop"]:
        with pytest.raises(ValueError):
            quote_ident(bad)
    n = Names.from_config(db_config("s1", table="logs"))
    assert n.q_table == '"s1"."logs"'
    assert n.q_partition(TODAY) == '"s1"."logs_p20261126"'
    with pytest.raises(ValueError, match="too long"):
        Names.from_config(db_config("s1", table="x" * 54))  # + "_pYYYYMMDD" would pass 63


async def test_migrate_creates_every_table_and_is_idempotent(
    pg_conn: asyncpg.Connection, pg_schema: str
) -> None:
    db = db_config(pg_schema)
    done = await migrate(pg_conn, db, TODAY)
    assert [f"applied migration {m.version}: {m.description}" for m in MIGRATIONS] == done[:4]
    assert "created partition system_logs_p20261125" in done
    for table in (
        "system_logs",
        "system_logs_default",
        "forwarder_checkpoints",
        "forwarder_dead_letters",
        "system_checks",
        "forwarder_schema_version",
    ):
        assert await regclass(pg_conn, pg_schema, table), table

    columns = await pg_conn.fetch(
        """SELECT table_name, column_name, data_type, is_nullable
           FROM information_schema.columns WHERE table_schema = $1
           AND table_name IN ('system_logs', 'forwarder_checkpoints', 'forwarder_dead_letters')
           ORDER BY table_name, ordinal_position""",
        pg_schema,
    )
    got = {(r["table_name"], r["column_name"]): (r["data_type"], r["is_nullable"]) for r in columns}
    assert got[("system_logs", "ts")] == ("timestamp with time zone", "NO")
    assert got[("system_logs", "meta")] == ("jsonb", "NO")
    assert got[("system_logs", "id")] == ("bigint", "NO")
    assert got[("forwarder_checkpoints", "offset")] == ("bigint", "NO")
    assert got[("forwarder_checkpoints", "detail")] == ("jsonb", "NO")
    assert got[("forwarder_dead_letters", "row")] == ("jsonb", "NO")
    assert got[("forwarder_dead_letters", "error")] == ("text", "NO")
    pk = await pg_conn.fetchval(
        """SELECT pg_get_constraintdef(oid) FROM pg_constraint
           WHERE conrelid = $1::text::regclass AND contype = 'p'""",
        f'"{pg_schema}"."forwarder_checkpoints"',
    )
    assert pk == "PRIMARY KEY (source, stream)"
    with pytest.raises(asyncpg.CheckViolationError):
        await pg_conn.execute("INSERT INTO system_checks (name, status) VALUES ('x', 'maybe')")

    indexes = await pg_conn.fetch(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = $2",
        pg_schema,
        "system_logs_p20261126",
    )
    defs = " | ".join(r["indexdef"] for r in indexes)
    assert "brin (ts)" in defs  # propagated
    assert "btree (service, level, ts) WHERE (level <> 'INFO'::text)" in defs

    assert await migrate(pg_conn, db, TODAY) == []  # the second run has nothing to do
    versions = await pg_conn.fetch("SELECT version FROM forwarder_schema_version ORDER BY 1")
    assert [r["version"] for r in versions] == [m.version for m in MIGRATIONS]


async def test_day_partitions_are_named_and_bounded_in_utc(
    pg_conn: asyncpg.Connection, pg_schema: str
) -> None:
    await migrate(pg_conn, db_config(pg_schema, partitions_ahead_days=2), TODAY)
    bounds = await partitions(pg_conn, pg_schema, "system_logs")

    def day(d: str, n: str) -> str:
        return f"FOR VALUES FROM ('2026-11-{d} 00:00:00+00') TO ('2026-11-{n} 00:00:00+00')"

    assert bounds == {
        "system_logs_default": "DEFAULT",
        "system_logs_p20261125": day("25", "26"),
        "system_logs_p20261126": day("26", "27"),
        "system_logs_p20261127": day("27", "28"),
        "system_logs_p20261128": day("28", "29"),
    }


async def test_rows_land_in_their_day_and_out_of_range_rows_in_default(
    pg_conn: asyncpg.Connection, pg_schema: str
) -> None:
    await migrate(pg_conn, db_config(pg_schema), TODAY)
    for ts in (
        datetime(2001, 1, 1, tzinfo=UTC),
        datetime(2026, 11, 26, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 11, 27, tzinfo=UTC),
    ):
        await pg_conn.execute(
            "INSERT INTO system_logs (ts, service, level, event, message, meta) "
            "VALUES ($1, 'api', 'INFO', 'e', 'm', '{}')",
            ts,
        )
    rows = await pg_conn.fetch(
        "SELECT ts, tableoid::regclass::text AS part FROM system_logs ORDER BY ts"
    )
    assert [r["part"] for r in rows] == [
        "system_logs_default",
        "system_logs_p20261126",
        "system_logs_p20261127",
    ]


async def test_a_new_day_moves_its_rows_out_of_the_default_partition(
    pg_conn: asyncpg.Connection, pg_schema: str
) -> None:
    db = db_config(pg_schema, partitions_ahead_days=1)
    await migrate(pg_conn, db, TODAY)
    await pg_conn.execute(
        "ALTER TABLE system_logs ADD CONSTRAINT no_poison CHECK (event <> 'poison')"
    )
    future = datetime(2026, 12, 5, 8, tzinfo=UTC)
    for i in range(3):
        await pg_conn.execute(
            "INSERT INTO system_logs (ts, service, level, event, message, meta) "
            "VALUES ($1, 'api', 'INFO', 'e', $2, '{}')",
            future,
            f"m{i}",
        )
    assert await pg_conn.fetchval("SELECT count(*) FROM system_logs_default") == 3

    done = await ensure_partitions(pg_conn, db, date(2026, 12, 4))
    assert "created partition system_logs_p20261205 (moved 3 rows from system_logs_default)" in done
    assert "created partition system_logs_p20261204" in done
    assert await pg_conn.fetchval("SELECT count(*) FROM system_logs_default") == 0
    assert await pg_conn.fetchval("SELECT count(*) FROM system_logs_p20261205") == 3
    bounds = await partitions(pg_conn, pg_schema, "system_logs")
    assert bounds["system_logs_p20261205"] == (
        "FOR VALUES FROM ('2026-12-05 00:00:00+00') TO ('2026-12-06 00:00:00+00')"
    )
    # The moved partition behaves like the others: indexes, constraints, ids.
    indexes = await pg_conn.fetchval(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND tablename = $2",
        pg_schema,
        "system_logs_p20261205",
    )
    assert indexes == 2
    with pytest.raises(asyncpg.CheckViolationError):
        await pg_conn.execute(
            "INSERT INTO system_logs (ts, service, level, event, message, meta) "
            "VALUES ($1, 'api', 'INFO', 'poison', 'm', '{}')",
            future,
        )
    ids = await pg_conn.fetch("SELECT id FROM system_logs ORDER BY id")
    assert len({r["id"] for r in ids}) == 3
    assert await ensure_partitions(pg_conn, db, date(2026, 12, 4)) == []


async def test_concurrent_migrations_serialize(pg_dsn: str, pg_schema: str) -> None:
    db = db_config(pg_schema)
    conns = [await asyncpg.connect(pg_dsn) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c, db, TODAY) for c in conns))
    finally:
        for c in conns:
            await c.close()
    # One of them applied the steps; the day partitions may be shared out between them,
    # but each was created exactly once and none failed.
    applied = [r for r in results if any(line.startswith("applied migration") for line in r)]
    assert len(applied) == 1
    created = sorted(line for r in results for line in r if line.startswith("created partition"))
    assert created == [
        f"created partition system_logs_p{d:%Y%m%d}" for d in partition_days(TODAY, 3)
    ]
    conn = await asyncpg.connect(pg_dsn)
    try:
        count = await conn.fetchval(f'SELECT count(*) FROM "{pg_schema}".forwarder_schema_version')
    finally:
        await conn.close()
    assert count == len(MIGRATIONS)


async def test_migrate_creates_a_missing_schema(
    pg_conn: asyncpg.Connection, pg_schema: str
) -> None:
    fresh = pg_schema + "_new"
    try:
        done = await migrate(pg_conn, db_config(fresh, table="logs"), TODAY)
        assert done[0] == f"created schema {fresh}"
        assert await regclass(pg_conn, fresh, "logs_p20261126")
    finally:
        await pg_conn.execute(f'DROP SCHEMA IF EXISTS "{fresh}" CASCADE')
