"""Migrations: the only code that creates or alters the forwarder's tables.

`migrate` applies the numbered steps of `MIGRATIONS` that the schema's
`forwarder_schema_version` table has not recorded yet, in one transaction that holds
a transaction-level advisory lock (so two daemons starting together serialize), then
calls `ensure_partitions`. Running it again does nothing but check the partitions.

Identifiers come from `DatabaseConfig`; each is validated and double-quoted once in
`Names`. Values always travel as query parameters, except the partition bounds of
DDL (PostgreSQL takes no parameters in DDL): those are rendered from `date` objects
by `_utc_midnight_literal`, never from text.

Day partitions: `<table>_pYYYYMMDD` holds [day 00:00 UTC, next day 00:00 UTC).
PostgreSQL refuses to create a partition while the DEFAULT partition holds rows of
its range; `ensure_partitions` then *moves* those rows: in one transaction it creates
the day table standalone, moves the rows out of the default partition into it and
attaches it. Nothing is skipped, and retention can later drop the whole day.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import asyncpg

from forwarder.config import DatabaseConfig

log = logging.getLogger(__name__)

VERSION_TABLE = "forwarder_schema_version"
SYSTEM_CHECKS_TABLE = "system_checks"
DEFAULT_PARTITION_SUFFIX = "_default"
PARTITION_SUFFIX_LEN = len("_p20240101")
MAX_IDENTIFIER_LEN = 63  # NAMEDATALEN - 1: PostgreSQL would silently truncate longer names
LOCK_TIMEOUT = "5s"  # partition DDL waits at most this long for readers/writers of the table

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")


def quote_ident(name: str) -> str:
    """Validate a lower-case SQL identifier and return it double-quoted.

    Only `[a-z_][a-z0-9_]*` up to 63 bytes is accepted, so quoting cannot be escaped
    and PostgreSQL never truncates the name.
    """
    if not _IDENTIFIER.fullmatch(name) or len(name) > MAX_IDENTIFIER_LEN:
        raise ValueError(
            f"invalid SQL identifier {name!r}: use [a-z_][a-z0-9_]*, at most "
            f"{MAX_IDENTIFIER_LEN} characters"
        )
    return f'"{name}"'


@dataclass(frozen=True, slots=True)
class Names:
    """Every identifier the forwarder uses, validated; `q_*` are quoted and schema-qualified."""

    schema: str
    table: str
    checkpoint_table: str
    dead_letter_table: str
    q_schema: str
    q_table: str
    q_default_partition: str
    q_checkpoints: str
    q_dead_letters: str
    q_system_checks: str
    q_version: str

    @classmethod
    def from_config(cls, db: DatabaseConfig) -> Names:
        if len(db.table) > MAX_IDENTIFIER_LEN - PARTITION_SUFFIX_LEN:
            raise ValueError(
                f"database.table {db.table!r} is too long: day partitions append "
                f"{PARTITION_SUFFIX_LEN} characters and names stop at {MAX_IDENTIFIER_LEN}"
            )
        s = quote_ident(db.schema_name)
        return cls(
            schema=db.schema_name,
            table=db.table,
            checkpoint_table=db.checkpoint_table,
            dead_letter_table=db.dead_letter_table,
            q_schema=s,
            q_table=f"{s}.{quote_ident(db.table)}",
            q_default_partition=f"{s}.{quote_ident(db.table + DEFAULT_PARTITION_SUFFIX)}",
            q_checkpoints=f"{s}.{quote_ident(db.checkpoint_table)}",
            q_dead_letters=f"{s}.{quote_ident(db.dead_letter_table)}",
            q_system_checks=f"{s}.{quote_ident(SYSTEM_CHECKS_TABLE)}",
            q_version=f"{s}.{quote_ident(VERSION_TABLE)}",
        )

    def partition_name(self, day: date) -> str:
        return f"{self.table}_p{day:%Y%m%d}"

    def q_partition(self, day: date) -> str:
        return f"{self.q_schema}.{quote_ident(self.partition_name(day))}"

    def q_index(self, suffix: str) -> str:
        # An index lives in its table's schema: CREATE INDEX takes an unqualified name.
        return quote_ident(f"{self.table}_{suffix}")


# --- the numbered migration steps ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    statements: Callable[[Names], list[str]]


def _v1_logs(n: Names) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS {n.q_table} (
            id bigserial,
            ts timestamptz NOT NULL,
            service text NOT NULL,
            level text NOT NULL,
            event text NOT NULL,
            message text NOT NULL,
            meta jsonb NOT NULL
        ) PARTITION BY RANGE (ts)""",
        f"CREATE TABLE IF NOT EXISTS {n.q_default_partition} PARTITION OF {n.q_table} DEFAULT",
        # Indexes on the parent propagate to every partition, present and future.
        # BRIN on ts serves every time window at almost no write cost. The btree is
        # partial: warnings and errors only (the runbook's and the badge's queries). A
        # full (service, level, ts) btree halves the COPY rate; INFO lines are found
        # through the BRIN of their time window instead.
        f"CREATE INDEX IF NOT EXISTS {n.q_index('ts_brin')} ON {n.q_table} USING brin (ts)",
        f"CREATE INDEX IF NOT EXISTS {n.q_index('problems_idx')} ON {n.q_table} "
        "(service, level, ts) WHERE level <> 'INFO'",
    ]


def _v2_checkpoints(n: Names) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS {n.q_checkpoints} (
            source text NOT NULL,
            stream text NOT NULL,
            "offset" bigint NOT NULL,
            detail jsonb NOT NULL DEFAULT '{{}}',
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (source, stream)
        )"""
    ]


def _v3_dead_letters(n: Names) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS {n.q_dead_letters} (
            id bigserial PRIMARY KEY,
            received_at timestamptz NOT NULL DEFAULT now(),
            source text,
            error text NOT NULL,
            "row" jsonb NOT NULL
        )"""
    ]


def _v4_system_checks(n: Names) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS {n.q_system_checks} (
            id bigserial PRIMARY KEY,
            ts timestamptz NOT NULL DEFAULT now(),
            name text NOT NULL,
            status text NOT NULL CHECK (status IN ('ok', 'failed')),
            severity text,
            details jsonb,
            health_checks jsonb
        )""",
        f"CREATE INDEX IF NOT EXISTS {quote_ident(SYSTEM_CHECKS_TABLE + '_name_ts_idx')} "
        f"ON {n.q_system_checks} (name, ts)",
    ]


# Append only: a released step is never edited, a change is a new step.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "log table partitioned by day, default partition, indexes", _v1_logs),
    Migration(2, "checkpoint table", _v2_checkpoints),
    Migration(3, "dead-letter table", _v3_dead_letters),
    Migration(4, "system_checks table", _v4_system_checks),
)


def lock_key(schema: str, purpose: str = "schema") -> int:
    """The advisory-lock key (a signed 64-bit int) that serializes one kind of work on
    one schema: "schema" (DDL), "retention", "check_alerts"."""
    digest = hashlib.blake2b(f"forwarder.{purpose}:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def migrate(conn: asyncpg.Connection, db: DatabaseConfig, today: date) -> list[str]:
    """Create or upgrade every table, then the day partitions; return what was done."""
    n = Names.from_config(db)
    done: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(n.schema))
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", n.schema
        ):
            await conn.execute(f"CREATE SCHEMA {n.q_schema}")
            done.append(f"created schema {n.schema}")
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {n.q_version} (
                version integer PRIMARY KEY,
                description text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )"""
        )
        current = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {n.q_version}")
        for step in MIGRATIONS:
            if step.version <= current:
                continue
            for statement in step.statements(n):
                await conn.execute(statement)
            await conn.execute(
                f"INSERT INTO {n.q_version} (version, description) VALUES ($1, $2)",
                step.version,
                step.description,
            )
            done.append(f"applied migration {step.version}: {step.description}")
    done.extend(await ensure_partitions(conn, db, today))
    return done


# --- day partitions ----------------------------------------------------------------------------


def partition_days(today: date, ahead: int) -> list[date]:
    """The days that must have a partition: yesterday, today and `ahead` days after."""
    return [today + timedelta(days=i) for i in range(-1, ahead + 1)]


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """[start, end) of a UTC day as aware datetimes."""
    start = datetime.combine(day, time(0), tzinfo=UTC)
    return start, start + timedelta(days=1)


def _utc_midnight_literal(day: date) -> str:
    # DDL takes no parameters. The bound is rendered from a `date` (never from text),
    # so the literal can only be digits and dashes.
    if not isinstance(day, date) or isinstance(day, datetime):
        raise TypeError(f"partition bound must be a date, got {type(day).__name__}")
    return f"'{day.isoformat()} 00:00:00+00'"


async def existing_partitions(conn: asyncpg.Connection, n: Names) -> set[str]:
    rows = await conn.fetch(
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = $1::text::regclass""",
        n.q_table,
    )
    return {r["relname"] for r in rows}


async def ensure_partitions(conn: asyncpg.Connection, db: DatabaseConfig, today: date) -> list[str]:
    """Create the missing day partitions around `today`; return what was done.

    Cheap when nothing is missing (one catalog query). Each missing day is created in
    its own transaction under the schema's advisory lock and a lock_timeout, so a
    long reader makes this fail fast (LockNotAvailableError) instead of stalling writers.
    """
    n = Names.from_config(db)
    have = await existing_partitions(conn, n)
    done: list[str] = []
    for day in partition_days(today, db.partitions_ahead_days):
        if n.partition_name(day) not in have:
            done.extend(await _create_day_partition(conn, n, day))
    return done


async def _create_day_partition(conn: asyncpg.Connection, n: Names, day: date) -> list[str]:
    name = n.partition_name(day)
    q_part = n.q_partition(day)
    bounds = f"FROM ({_utc_midnight_literal(day)}) TO ({_utc_midnight_literal(day + timedelta(1))})"
    start, end = day_bounds(day)
    columns = "id, ts, service, level, event, message, meta"
    async with conn.transaction():
        await conn.execute("SELECT set_config('lock_timeout', $1, true)", LOCK_TIMEOUT)
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(n.schema))
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", q_part):
            return []  # created by someone else meanwhile
        # Creating or attaching a partition locks the parent anyway; taking that lock
        # first means no row can reach the default partition between check and DDL.
        await conn.execute(f"LOCK TABLE ONLY {n.q_table} IN ACCESS EXCLUSIVE MODE")
        stranded = await conn.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {n.q_default_partition} WHERE ts >= $1 AND ts < $2)",
            start,
            end,
        )
        if not stranded:
            await conn.execute(
                f"CREATE TABLE {q_part} PARTITION OF {n.q_table} FOR VALUES {bounds}"
            )
            return [f"created partition {name}"]
        # Rows of that day sit in the default partition: create the day standalone,
        # move them there, then attach (the attach checks the default no longer has any).
        await conn.execute(
            f"CREATE TABLE {q_part} (LIKE {n.q_table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        status = await conn.execute(
            f"""WITH moved AS (
                    DELETE FROM {n.q_default_partition} WHERE ts >= $1 AND ts < $2
                    RETURNING {columns})
                INSERT INTO {q_part} ({columns}) SELECT {columns} FROM moved""",
            start,
            end,
        )
        await conn.execute(f"ALTER TABLE {n.q_table} ATTACH PARTITION {q_part} FOR VALUES {bounds}")
    moved = int(status.rsplit(" ", 1)[-1])
    log.warning(
        "moved %d rows of %s out of the default partition into the new partition %s",
        moved,
        day.isoformat(),
        name,
        extra={"component": "sink.schema"},
    )
    return [f"created partition {name} (moved {moved} rows from {n.table}_default)"]


async def table_exists(conn: asyncpg.Connection, qualified: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", qualified))
