"""Retention: drop old day partitions (optionally exported first), prune side tables.

`run_retention` does one pass; `RetentionJob` runs it once a day at
`retention.hour_utc` inside the daemon; `retention_command` is `forwarder retention`.

What is removed, for `today` (a UTC date):

* Log partitions whose whole range is older than `cutoff = today - retention_days`
  at 00:00 UTC: a partition goes when its upper bound is <= cutoff. So today and
  the `retention_days` full days before it are always kept, and a row is never
  removed before it is `retention_days` days old (the strategy's
  `DELETE ... WHERE ts < now() - interval '30 days'`, rounded to whole days in the
  safe direction). Partitions are found by their bound (pg_inherits, pg_class,
  `pg_get_expr(relpartbound)`), not by their name; the default partition is never
  dropped, and a bound that is not a plain timestamptz range (MINVALUE, a list
  partition of someone else's) is left alone and noted.
* Rows of the default partition older than the cutoff: deleted in batches of
  `delete_batch_rows`, each batch its own short transaction.
* Dead letters with `received_at` older than `today - dead_letter_days`, and
  system_checks rows with `ts` older than `today - checks_days`, in batches; the
  latest row of every (name, details->>'group') whose latest row is `failed` is
  kept whatever its age, so a firing alarm or a failing probe is still restored
  after a restart (`alarms.state.load_firing`).

Export (`retention.export_dir`): each partition is streamed through a server-side
cursor (bounded memory: `EXPORT_PREFETCH` rows, `EXPORT_FLUSH_BYTES` of text) into
`<export_dir>/<schema>.<partition>.jsonl.gz`: one JSON object per row (id, ts in UTC,
service, level, event, message, meta), gzip, written under a temporary name, fsynced,
renamed, the folder fsynced. Compression and file I/O run in a worker thread, so the
daemon's loop never waits on them. The drop happens only after that: in the drop
transaction the partition is locked (SHARE: writers wait, readers do not) and its
row count and id sum must equal the exported ones, else (a late row arrived) it is
exported again, at most `EXPORT_ATTEMPTS` times. A crash before the drop leaves a
complete file and the partition: the next run exports it again over the same name.
Default-partition rows are exported per batch (`<schema>.<table>_default.<day>-<n>.jsonl.gz`):
rows are locked FOR UPDATE, the batch file is made durable, then exactly those rows
are deleted in the same transaction; a crash between the rename and the commit
leaves the rows in place, so the next run exports them again (a duplicate in the
export, never a loss).

Locks: the whole pass holds a session advisory lock per schema
(`retention_lock_key`): a second forwarder finds it taken and reports `skipped`.
Each drop also takes the schema's DDL lock (`schema.lock_key`, the one `migrate` and
`ensure_partitions` take) and runs under `lock_timeout`, so it never stalls the
sink's COPY behind a long reader; a lock timeout or deadlock is retried
`DROP_ATTEMPTS` times, then reported in `errors` (nothing is lost: the partition
stays for the next run).

Dry run: the same catalog reads and counts, nothing written, nothing exported.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import asyncpg

from forwarder.clock import Clock
from forwarder.config import DatabaseConfig
from forwarder.retention_config import RetentionConfig
from forwarder.sinks.schema import (
    DEFAULT_PARTITION_SUFFIX,
    LOCK_TIMEOUT,
    Names,
    lock_key,
    quote_ident,
    table_exists,
)

__all__ = [
    "PartitionResult",
    "RetentionConfig",
    "RetentionJob",
    "RetentionReport",
    "next_run",
    "retention_command",
    "retention_lock_key",
    "run_retention",
]

log = logging.getLogger(__name__)
_EXTRA = {"component": "retention"}

EXPORT_PREFETCH = 2000  # rows the server-side cursor fetches at a time
EXPORT_FLUSH_BYTES = 1 << 20  # JSON text gathered before it is handed to the writer thread
EXPORT_ATTEMPTS = 3  # exports of one partition when rows keep arriving during the export
DROP_ATTEMPTS = 3  # lock timeouts / deadlocks tolerated per partition before giving up
DROP_RETRY_S = 1.0  # first wait after one, doubled each time
GZIP_LEVEL = 6

_RANGE_BOUND = re.compile(r"^FOR VALUES FROM \('([^']*)'\) TO \('([^']*)'\)$")
# The row as exported: one JSON object, rendered by PostgreSQL (TimeZone is UTC there).
_ROW_JSON = (
    "jsonb_build_object('id', id, 'ts', ts, 'service', service, 'level', level, "
    "'event', event, 'message', message, 'meta', meta)::text"
)


def retention_lock_key(schema: str) -> int:
    """The session advisory-lock key held by one retention pass over `schema`."""
    return lock_key(schema, "retention")


def utc_midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


# --- the report -------------------------------------------------------------------------------


@dataclass(slots=True)
class PartitionResult:
    """One partition old enough to go: what was (or, in a dry run, would be) done."""

    name: str
    lower: datetime
    upper: datetime
    rows: int | None = None  # counted under the drop's lock (dry run: counted without)
    export: Path | None = None  # the complete export file
    dropped: bool = False
    error: str | None = None

    @property
    def day(self) -> date | None:
        """The UTC day it holds, if it is a day partition."""
        if self.upper - self.lower == timedelta(days=1) and self.lower.timetz() == time(
            0, tzinfo=UTC
        ):
            return self.lower.date()
        return None


@dataclass(slots=True)
class RetentionReport:
    dry_run: bool
    logs_cutoff: datetime
    dead_letter_cutoff: datetime
    checks_cutoff: datetime
    partitions: list[PartitionResult] = field(default_factory=list)
    default_rows: int = 0  # rows of the default partition older than logs_cutoff
    default_exports: list[Path] = field(default_factory=list)
    dead_letters: int = 0
    system_checks: int = 0
    kept_failing_checks: int = 0  # old system_checks rows kept: latest of a failing check
    skipped: str | None = None  # why nothing was done (lock taken elsewhere, no tables)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def dropped(self) -> list[PartitionResult]:
        return [p for p in self.partitions if p.dropped]

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line (for the CLI)."""
        verb = "would drop" if self.dry_run else "dropped"
        out: list[str] = []
        if self.skipped:
            return [f"retention skipped: {self.skipped}"]
        out.append(f"log rows older than {self.logs_cutoff:%Y-%m-%d %H:%M} UTC go")
        for p in self.partitions:
            rows = "?" if p.rows is None else str(p.rows)
            if p.error:
                out.append(f"partition {p.name} ({rows} rows) NOT dropped: {p.error}")
            elif p.dropped or self.dry_run:
                exported = f", exported to {p.export}" if p.export else ""
                out.append(f"{verb} partition {p.name} ({rows} rows{exported})")
        if not self.partitions:
            out.append("no partition old enough to drop")
        delete = "would delete" if self.dry_run else "deleted"
        out.append(f"{delete} {self.default_rows} old rows of the default partition")
        out.extend(f"exported default-partition rows to {path}" for path in self.default_exports)
        out.append(
            f"{delete} {self.dead_letters} dead letters received before "
            f"{self.dead_letter_cutoff:%Y-%m-%d}"
        )
        out.append(
            f"{delete} {self.system_checks} system_checks rows before "
            f"{self.checks_cutoff:%Y-%m-%d} (kept {self.kept_failing_checks}: latest of a "
            "failing check)"
        )
        out.extend(f"note: {n}" for n in self.notes)
        out.extend(f"error: {e}" for e in self.errors)
        return out


# --- one pass ---------------------------------------------------------------------------------


async def run_retention(
    conn: asyncpg.Connection,
    db: DatabaseConfig,
    cfg: RetentionConfig,
    today: date,
    *,
    dry_run: bool,
) -> RetentionReport:
    """One retention pass over the forwarder's tables; see the module docstring.

    Errors on one partition are recorded in `report.errors` and the pass goes on with
    the rest; a lost connection or a failing query outside that raises.
    """
    n = Names.from_config(db)
    report = RetentionReport(
        dry_run=dry_run,
        logs_cutoff=utc_midnight(today - timedelta(days=db.retention_days)),
        dead_letter_cutoff=utc_midnight(today - timedelta(days=cfg.dead_letter_days)),
        checks_cutoff=utc_midnight(today - timedelta(days=cfg.checks_days)),
    )
    key = retention_lock_key(n.schema)
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
        report.skipped = "another forwarder is running retention on this schema"
        log.info("retention skipped: %s", report.skipped, extra=_EXTRA)
        return report
    try:
        if await table_exists(conn, n.q_table):
            await _partitions(conn, n, cfg, report)
            try:
                await _default_partition(conn, n, cfg, report, today)
            except OSError as e:  # the export folder: full, read-only, missing rights
                report.errors.append(f"default partition: export failed, rows kept: {e}")
                log.error("retention: default partition export failed: %s", e, extra=_EXTRA)
        else:
            report.notes.append(f"table {n.table} does not exist yet (forwarder migrate)")
        if await table_exists(conn, n.q_dead_letters):
            await _dead_letters(conn, n, cfg, report)
        if await table_exists(conn, n.q_system_checks):
            await _system_checks(conn, n, cfg, report)
    finally:
        if not conn.is_closed():
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await conn.execute("SELECT pg_advisory_unlock($1)", key)
    log.info(
        "retention %s: %d partitions, %d default rows, %d dead letters, %d system_checks",
        "dry run" if dry_run else "done",
        len(report.dropped) if not dry_run else len(report.partitions),
        report.default_rows,
        report.dead_letters,
        report.system_checks,
        extra={
            **_EXTRA,
            "event": "retention.dry_run" if dry_run else "retention.done",
            "errors": report.errors,
        },
    )
    return report


@dataclass(frozen=True, slots=True)
class _Partition:
    name: str
    kind: str
    lower: datetime
    upper: datetime


async def old_partitions(
    conn: asyncpg.Connection, n: Names, cutoff: datetime, notes: list[str] | None = None
) -> list[_Partition]:
    """The attached range partitions of the log table whose upper bound is <= cutoff,
    oldest first; never the default partition."""
    async with conn.transaction(readonly=True):
        # pg_get_expr renders the bounds in the session's TimeZone: make that UTC.
        await conn.execute("SELECT set_config('TimeZone', 'UTC', true)")
        rows = await conn.fetch(
            """SELECT c.relname, c.relkind::text AS relkind,
                      pg_get_expr(c.relpartbound, c.oid) AS bound
               FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               WHERE i.inhparent = $1::text::regclass""",
            n.q_table,
        )
    out: list[_Partition] = []
    default_name = n.table + DEFAULT_PARTITION_SUFFIX
    for r in rows:
        name, bound = r["relname"], r["bound"] or ""
        if name == default_name or bound == "DEFAULT":
            continue
        match = _RANGE_BOUND.match(bound)
        lower = upper = None
        if match:
            try:
                lower = datetime.fromisoformat(match[1])
                upper = datetime.fromisoformat(match[2])
            except ValueError:
                pass
        if lower is None or upper is None or lower.tzinfo is None or upper.tzinfo is None:
            if notes is not None:
                notes.append(f"partition {name} left alone: bound is not a time range ({bound})")
            continue
        if r["relkind"] not in ("r", "p"):
            if notes is not None:
                notes.append(f"partition {name} left alone: not an ordinary table")
            continue
        if upper <= cutoff:
            out.append(_Partition(name, r["relkind"], lower.astimezone(UTC), upper.astimezone(UTC)))
    out.sort(key=lambda p: (p.lower, p.name))
    return out


async def _partitions(
    conn: asyncpg.Connection,
    n: Names,
    cfg: RetentionConfig,
    report: RetentionReport,
) -> None:
    for part in await old_partitions(conn, n, report.logs_cutoff, report.notes):
        result = PartitionResult(part.name, part.lower, part.upper)
        report.partitions.append(result)
        q_part = f"{n.q_schema}.{quote_ident(part.name)}"
        if report.dry_run:
            result.rows = await conn.fetchval(f"SELECT count(*) FROM {q_part}")
            if cfg.export_dir is not None:
                result.export = _export_path(cfg.export_dir, n, part.name)
            continue
        try:
            await _drop_partition(conn, n, cfg, q_part, result)
        except (_Retry, OSError) as e:
            result.error = str(e)
            report.errors.append(f"partition {part.name}: {e}")
            log.error("retention: partition %s not dropped: %s", part.name, e, extra=_EXTRA)


class _Retry(Exception):
    """A partition could not be dropped this time (locks, rows still arriving)."""


def _export_path(export_dir: Path, n: Names, relname: str) -> Path:
    return export_dir / f"{n.schema}.{relname}.jsonl.gz"


async def _drop_partition(
    conn: asyncpg.Connection,
    n: Names,
    cfg: RetentionConfig,
    q_part: str,
    result: PartitionResult,
) -> None:
    exported: tuple[int, int] | None = None
    wait = DROP_RETRY_S
    lock_failures = 0
    exports = 0
    while True:
        if cfg.export_dir is not None and exported is None:
            if exports >= EXPORT_ATTEMPTS:
                raise _Retry(
                    f"rows kept arriving during {EXPORT_ATTEMPTS} exports; kept for the next run"
                )
            exports += 1
            path = _export_path(cfg.export_dir, n, result.name)
            exported = await export_rows(conn, f"SELECT {_ROW_JSON}, id FROM {q_part}", (), path)
            result.export = path
        try:
            async with conn.transaction():
                await conn.execute("SELECT set_config('lock_timeout', $1, true)", LOCK_TIMEOUT)
                await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(n.schema))
                if not await table_exists(conn, q_part):
                    result.error = None
                    return  # dropped by someone else meanwhile
                # Writers wait from here on, readers do not; DROP takes the rest.
                await conn.execute(f"LOCK TABLE {q_part} IN SHARE MODE")
                count, id_sum = await conn.fetchrow(
                    f"SELECT count(*), coalesce(sum(id), 0) FROM {q_part}"
                )
                result.rows = int(count)
                if exported is not None and (int(count), int(id_sum)) != exported:
                    raise _Changed
                await conn.execute(f"DROP TABLE {q_part}")
            result.dropped = True
            log.info(
                "retention dropped partition %s (%d rows)%s",
                result.name,
                result.rows,
                f", exported to {result.export}" if result.export else "",
                extra=_EXTRA,
            )
            return
        except _Changed:
            log.warning(
                "retention: rows arrived in %s during its export; exporting it again",
                result.name,
                extra=_EXTRA,
            )
            exported = None
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as e:
            lock_failures += 1
            if lock_failures >= DROP_ATTEMPTS:
                raise _Retry(f"could not lock it ({e}); kept for the next run") from None
            await asyncio.sleep(wait)
            wait *= 2


class _Changed(Exception):
    pass


async def export_rows(
    conn: asyncpg.Connection, query: str, args: tuple[Any, ...], path: Path
) -> tuple[int, int]:
    """Stream `query` (rows of (json text, id)) into the gzip JSON-lines file `path`.

    One REPEATABLE READ read-only transaction, a server-side cursor; the file is
    written under a temporary name, fsynced and renamed only once complete. Returns
    (rows, sum of ids), what the drop checks the partition against.
    """
    writer = await asyncio.to_thread(_ExportFile, path)
    rows = id_sum = 0
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute("SELECT set_config('TimeZone', 'UTC', true)")
            parts: list[str] = []
            size = 0
            async for record in conn.cursor(query, *args, prefetch=EXPORT_PREFETCH):
                text = record[0]
                parts.append(text)
                size += len(text) + 1
                rows += 1
                id_sum += record[1]
                if size >= EXPORT_FLUSH_BYTES:
                    await asyncio.to_thread(writer.write_lines, parts)
                    parts, size = [], 0
            if parts:
                await asyncio.to_thread(writer.write_lines, parts)
        await asyncio.to_thread(writer.commit)
    except BaseException:
        await asyncio.to_thread(writer.abort)
        raise
    return rows, id_sum


class _ExportFile:
    """A gzip file written under a temporary name, made durable, then renamed."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._raw: BinaryIO = open(self.tmp, "wb")  # closed by commit or abort
        self._gz = gzip.GzipFile(
            filename=path.name.removesuffix(".gz"),
            mode="wb",
            fileobj=self._raw,
            compresslevel=GZIP_LEVEL,
            mtime=0,
        )

    def write_lines(self, lines: list[str]) -> None:
        self._gz.write(("\n".join(lines) + "\n").encode())

    def commit(self) -> None:
        self._gz.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._gz.close()
        with contextlib.suppress(OSError):
            self._raw.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _default_partition(
    conn: asyncpg.Connection,
    n: Names,
    cfg: RetentionConfig,
    report: RetentionReport,
    today: date,
) -> None:
    if not await table_exists(conn, n.q_default_partition):
        return
    q = n.q_default_partition
    cutoff, batch = report.logs_cutoff, cfg.delete_batch_rows
    if report.dry_run:
        report.default_rows = await conn.fetchval(f"SELECT count(*) FROM {q} WHERE ts < $1", cutoff)
        return
    if cfg.export_dir is None:
        while True:
            status = await conn.execute(
                f"DELETE FROM {q} WHERE ctid = ANY(ARRAY("
                f"SELECT ctid FROM {q} WHERE ts < $1 LIMIT $2))",
                cutoff,
                batch,
            )
            deleted = int(status.rsplit(" ", 1)[-1])
            report.default_rows += deleted
            if deleted < batch:
                return
    seq = 0
    while True:
        path, seq = _next_default_export(cfg.export_dir, n, today, seq)
        async with conn.transaction():
            await conn.execute("SELECT set_config('TimeZone', 'UTC', true)")
            rows = await conn.fetch(
                f"SELECT ctid, {_ROW_JSON} FROM {q} WHERE ts < $1 LIMIT $2 FOR UPDATE",
                cutoff,
                batch,
            )
            if not rows:
                return
            writer = await asyncio.to_thread(_ExportFile, path)
            try:
                await asyncio.to_thread(writer.write_lines, [r[1] for r in rows])
                await asyncio.to_thread(writer.commit)
            except BaseException:
                await asyncio.to_thread(writer.abort)
                raise
            await conn.execute(f"DELETE FROM {q} WHERE ctid = ANY($1::tid[])", [r[0] for r in rows])
        report.default_rows += len(rows)
        report.default_exports.append(path)
        if len(rows) < batch:
            return


def _next_default_export(export_dir: Path, n: Names, today: date, seq: int) -> tuple[Path, int]:
    """The first unused batch file name of the default partition's export for today."""
    while True:
        seq += 1
        path = export_dir / (
            f"{n.schema}.{n.table}{DEFAULT_PARTITION_SUFFIX}.{today:%Y%m%d}-{seq:04d}.jsonl.gz"
        )
        if not path.exists():
            return path, seq


async def _delete_in_batches(
    conn: asyncpg.Connection, table: str, where: str, args: tuple[Any, ...], batch: int
) -> int:
    """DELETE ... WHERE `where` (parameters $1..), oldest ids first, `batch` rows per
    statement (each its own transaction); returns how many."""
    k = len(args) + 1
    total = 0
    while True:
        status = await conn.execute(
            f"DELETE FROM {table} WHERE id = ANY(ARRAY("
            f"SELECT id FROM {table} WHERE {where} ORDER BY id LIMIT ${k}))",
            *args,
            batch,
        )
        deleted = int(status.rsplit(" ", 1)[-1])
        total += deleted
        if deleted < batch:
            return total


async def _dead_letters(
    conn: asyncpg.Connection, n: Names, cfg: RetentionConfig, report: RetentionReport
) -> None:
    cutoff = report.dead_letter_cutoff
    if report.dry_run:
        report.dead_letters = await conn.fetchval(
            f"SELECT count(*) FROM {n.q_dead_letters} WHERE received_at < $1", cutoff
        )
        return
    report.dead_letters = await _delete_in_batches(
        conn, n.q_dead_letters, "received_at < $1", (cutoff,), cfg.delete_batch_rows
    )


async def _system_checks(
    conn: asyncpg.Connection, n: Names, cfg: RetentionConfig, report: RetentionReport
) -> None:
    cutoff = report.checks_cutoff
    # The latest row of each (name, group) whose latest row says failed: what a
    # restart reads back as firing (alarms.state.load_firing), kept whatever its age.
    keep = [
        r["id"]
        for r in await conn.fetch(
            f"""SELECT id FROM (
                    SELECT DISTINCT ON (name, details->>'group') id, status, ts
                    FROM {n.q_system_checks}
                    ORDER BY name, details->>'group', ts DESC, id DESC
                ) latest WHERE status = 'failed' AND ts < $1""",
            cutoff,
        )
    ]
    report.kept_failing_checks = len(keep)
    where = "ts < $1 AND NOT (id = ANY($2::bigint[]))"
    if report.dry_run:
        report.system_checks = await conn.fetchval(
            f"SELECT count(*) FROM {n.q_system_checks} WHERE {where}", cutoff, keep
        )
        return
    report.system_checks = await _delete_in_batches(
        conn, n.q_system_checks, where, (cutoff, keep), cfg.delete_batch_rows
    )


# --- the daily job ----------------------------------------------------------------------------


def next_run(now: datetime, hour_utc: int) -> datetime:
    """The first `hour_utc`:00:00 UTC strictly after `now` (an aware datetime)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(UTC)
    at = datetime.combine(now.date(), time(hour_utc), tzinfo=UTC)
    return at if at > now else at + timedelta(days=1)


Wait = Callable[[asyncio.Event, float], Awaitable[None]]


async def _wait_event(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class RetentionJob:
    """Runs `run_once(today)` once a day at `hour_utc` until `stop` is set.

    Time comes from the injected clock's `now()` (wall time: the schedule is a time
    of day); the wait is sliced into `recheck_s` pieces so a wall-clock jump or a
    suspended machine is noticed. A run that raises is logged and tried again
    `retry_s` later; a run skipped because another forwarder holds the lock is not
    retried (that one does the work). Missed days are not made up: after a long
    sleep the job runs once, then at the next `hour_utc`.
    """

    def __init__(
        self,
        run_once: Callable[[date], Awaitable[RetentionReport]],
        hour_utc: int,
        clock: Clock,
        *,
        wait: Wait = _wait_event,
        recheck_s: float = 300.0,
        retry_s: float = 3600.0,
    ) -> None:
        self._run_once = run_once
        self._hour = hour_utc
        self._clock = clock
        self._wait = wait
        self._recheck_s = recheck_s
        self._retry_s = retry_s
        self.runs = 0
        self.failures = 0
        self.last_report: RetentionReport | None = None
        self.next_at: datetime | None = None

    @classmethod
    def for_database(
        cls, dsn: str, db: DatabaseConfig, cfg: RetentionConfig, clock: Clock, **kwargs: Any
    ) -> RetentionJob:
        """A job that opens its own connection to `dsn` for each run."""
        from forwarder.sinks.postgres import server_settings

        async def run_once(today: date) -> RetentionReport:
            conn = await asyncpg.connect(
                dsn, timeout=db.connect_timeout_s, server_settings=server_settings(dsn)
            )
            try:
                return await run_retention(conn, db, cfg, today, dry_run=False)
            finally:
                await conn.close()

        return cls(run_once, cfg.hour_utc, clock, **kwargs)

    async def run(self, stop: asyncio.Event) -> None:
        at = self.next_at = next_run(self._clock.now(), self._hour)
        while not stop.is_set():
            now = self._clock.now()
            remaining = (at - now).total_seconds()
            if remaining > 0:
                await self._wait(stop, min(remaining, self._recheck_s))
                continue
            self.runs += 1
            try:
                report = await self._run_once(now.astimezone(UTC).date())
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.failures += 1
                at = self.next_at = now + timedelta(seconds=self._retry_s)
                log.error(
                    "retention run failed, next try at %s: %s",
                    at.isoformat(),
                    e,
                    extra={**_EXTRA, "error_type": type(e).__name__},
                )
                continue
            self.last_report = report
            if report.errors:
                self.failures += 1
            at = self.next_at = next_run(max(at, self._clock.now()), self._hour)


# --- `forwarder retention [--dry-run]` --------------------------------------------------------


async def retention_command(settings: Any, dry_run: bool) -> RetentionReport:
    """One pass on the configured database (embedded included), for the CLI."""
    from forwarder.runtime import open_database
    from forwarder.sinks.postgres import server_settings

    cfg = getattr(settings, "retention", None) or RetentionConfig()
    database = await open_database(settings.database)
    try:
        conn = await asyncpg.connect(
            database.dsn,
            timeout=settings.database.connect_timeout_s,
            server_settings=server_settings(database.dsn),
        )
        try:
            return await run_retention(
                conn, settings.database, cfg, datetime.now(UTC).date(), dry_run=dry_run
            )
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(database.close)
