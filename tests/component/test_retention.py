"""Retention against a real PostgreSQL (each test in its own schema), and its schedule."""

from __future__ import annotations

import asyncio
import gzip
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

import forwarder.retention as retention
from forwarder.config import DatabaseConfig, parse_config
from forwarder.retention import (
    RetentionConfig,
    RetentionJob,
    RetentionReport,
    next_run,
    retention_command,
    retention_lock_key,
    run_retention,
)
from forwarder.sinks.schema import ensure_partitions, migrate
from tests.support import FakeClock, wait_until

TODAY = date(2026, 11, 26)
CUTOFF_DAY = TODAY - timedelta(days=30)  # 2026-10-27: days before it go
OLD_DAYS = [date(2026, 9, 30) + timedelta(days=i) for i in range(5)]  # 09-30 .. 10-04
EDGE_DAYS = [CUTOFF_DAY - timedelta(days=1) + timedelta(days=i) for i in range(5)]  # 10-26 ..
ROWS_PER_DAY = 40


def db_config(schema: str, **kw: Any) -> DatabaseConfig:
    return DatabaseConfig(schema_name=schema, **kw)


def at(day: date, hour: int = 12) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


async def insert_rows(conn: asyncpg.Connection, day: date, n: int, tag: str) -> None:
    """n rows spread over `day` (UTC), each with a unicode, quote-bearing meta."""
    await conn.execute(
        """INSERT INTO system_logs (ts, service, level, event, message, meta)
           SELECT $1::timestamptz + (i * interval '1 minute'), 'api', 'INFO', 'e',
                  'line ' || i || ' "quoted" é',
                  jsonb_build_object('seq', i, 'tag', $2::text, 'day', $3::text)
           FROM generate_series(0, $4 - 1) AS i""",
        at(day, 0),
        tag,
        day.isoformat(),
        n,
    )


async def partition_names(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = 'system_logs'::regclass"""
    )
    return {r["relname"] for r in rows}


async def snapshot(conn: asyncpg.Connection) -> dict[str, Any]:
    """Everything retention may touch, to compare before and after."""
    return {
        "partitions": await partition_names(conn),
        "rows": await conn.fetchval("SELECT count(*) FROM system_logs"),
        "default": await conn.fetchval("SELECT count(*) FROM system_logs_default"),
        "dead": await conn.fetchval("SELECT count(*) FROM forwarder_dead_letters"),
        "checks": await conn.fetchval("SELECT count(*) FROM system_checks"),
    }


@pytest.fixture
async def logs(pg_conn: asyncpg.Connection, pg_schema: str) -> DatabaseConfig:
    """Tables migrated for TODAY, partitions for old days and around the cutoff, rows in
    each, and rows in the default partition: one old day and one recent day."""
    db = db_config(pg_schema)
    await migrate(pg_conn, db, TODAY)
    await ensure_partitions(pg_conn, db, OLD_DAYS[1])  # 09-30 .. 10-04
    await ensure_partitions(pg_conn, db, EDGE_DAYS[1])  # 10-26 .. 10-30
    for day in OLD_DAYS + EDGE_DAYS + [TODAY]:
        await insert_rows(pg_conn, day, ROWS_PER_DAY, "part")
    await insert_rows(pg_conn, date(2026, 9, 1), 25, "default-old")  # no partition: default
    await insert_rows(pg_conn, date(2026, 11, 1), 15, "default-new")
    return db


def names(days: list[date]) -> set[str]:
    return {f"system_logs_p{d:%Y%m%d}" for d in days}


async def test_old_partitions_go_recent_stay_and_old_default_rows_are_deleted(
    pg_conn: asyncpg.Connection, logs: DatabaseConfig
) -> None:
    cfg = RetentionConfig(delete_batch_rows=7)  # several batches in the default partition
    report = await run_retention(pg_conn, logs, cfg, TODAY, dry_run=False)

    assert report.ok, report.errors
    gone = names([*OLD_DAYS, EDGE_DAYS[0]])  # 10-26 ends exactly at the cutoff: it goes
    assert {p.name for p in report.dropped} == gone
    assert all(p.rows == ROWS_PER_DAY for p in report.dropped)
    assert {p.day for p in report.dropped} == {*OLD_DAYS, EDGE_DAYS[0]}
    left = await partition_names(pg_conn)
    assert not left & gone
    assert names(EDGE_DAYS[1:]) <= left  # 10-27 on: younger than 30 full days
    assert names([TODAY]) <= left and "system_logs_default" in left
    assert report.default_rows == 25
    assert report.logs_cutoff == at(CUTOFF_DAY, 0)
    tags = dict(
        await pg_conn.fetch("SELECT meta->>'tag', count(*) FROM system_logs_default GROUP BY 1")
    )
    assert tags == {"default-new": 15}
    assert await pg_conn.fetchval("SELECT min(ts) FROM system_logs") >= report.logs_cutoff
    assert await pg_conn.fetchval("SELECT count(*) FROM system_logs") == (
        ROWS_PER_DAY * (len(EDGE_DAYS) - 1 + 1) + 15
    )


async def test_export_files_hold_every_row_and_are_written_before_the_drop(
    pg_conn: asyncpg.Connection, logs: DatabaseConfig, pg_schema: str, tmp_path: Path
) -> None:
    expected: dict[str, dict[int, dict[str, Any]]] = {}
    for day in [*OLD_DAYS, EDGE_DAYS[0]]:
        rows = await pg_conn.fetch(
            f"SELECT id, ts, service, level, event, message, meta FROM system_logs_p{day:%Y%m%d}"
        )
        expected[f"system_logs_p{day:%Y%m%d}"] = {r["id"]: dict(r) for r in rows}
    old_default = {
        r["id"]
        for r in await pg_conn.fetch(
            "SELECT id FROM system_logs_default WHERE meta->>'tag' = 'default-old'"
        )
    }
    export = tmp_path / "export"
    cfg = RetentionConfig(export_dir=export, delete_batch_rows=10)
    report = await run_retention(pg_conn, logs, cfg, TODAY, dry_run=False)

    assert report.ok, report.errors
    assert len(report.dropped) == len(expected)
    for p in report.dropped:
        assert p.export == export / f"{pg_schema}.{p.name}.jsonl.gz"
        lines = gzip.decompress(p.export.read_bytes()).decode().splitlines()
        objs = [orjson.loads(line) for line in lines]
        assert len(objs) == ROWS_PER_DAY == p.rows
        by_id = {o["id"]: o for o in objs}
        assert by_id.keys() == expected[p.name].keys()  # all rows, each once
        for row_id, obj in by_id.items():
            row = expected[p.name][row_id]
            assert set(obj) == {"id", "ts", "service", "level", "event", "message", "meta"}
            assert datetime.fromisoformat(obj["ts"]) == row["ts"]
            assert obj["ts"].endswith("+00:00")
            assert (obj["service"], obj["level"], obj["event"], obj["message"]) == (
                row["service"],
                row["level"],
                row["event"],
                row["message"],
            )
            assert obj["meta"] == orjson.loads(row["meta"])
    # Default-partition rows: batch files of at most 10 rows, all old rows once.
    assert len(report.default_exports) == 3  # 25 rows in batches of 10
    seen: list[int] = []
    for path in report.default_exports:
        assert path.name.startswith(f"{pg_schema}.system_logs_default.{TODAY:%Y%m%d}-")
        objs = [orjson.loads(x) for x in gzip.decompress(path.read_bytes()).splitlines()]
        assert 0 < len(objs) <= 10
        assert all(o["meta"]["tag"] == "default-old" for o in objs)
        seen += [o["id"] for o in objs]
    assert sorted(seen) == sorted(old_default)
    assert not [p for p in export.iterdir() if p.name.startswith(".")], "temporary files left"

    # A second pass (another day) writes new default batch files, never over old ones.
    await insert_rows(pg_conn, date(2026, 9, 2), 3, "default-old-2")
    again = await run_retention(pg_conn, logs, cfg, TODAY, dry_run=False)
    assert again.default_rows == 3
    assert again.default_exports[0].name.endswith("-0004.jsonl.gz")


async def test_dry_run_reports_what_would_go_and_changes_nothing(
    pg_conn: asyncpg.Connection, logs: DatabaseConfig, tmp_path: Path
) -> None:
    await add_side_rows(pg_conn)
    before = await snapshot(pg_conn)
    cfg = RetentionConfig(export_dir=tmp_path / "export")
    report = await run_retention(pg_conn, logs, cfg, TODAY, dry_run=True)

    assert await snapshot(pg_conn) == before
    assert not (tmp_path / "export").exists()
    assert report.dry_run and report.ok
    assert {p.name for p in report.partitions} == names([*OLD_DAYS, EDGE_DAYS[0]])
    assert all(p.rows == ROWS_PER_DAY and not p.dropped for p in report.partitions)
    assert (report.default_rows, report.dead_letters, report.system_checks) == (25, 2, 4)
    assert report.kept_failing_checks == 2
    text = "\n".join(report.lines())
    assert "would drop partition system_logs_p20260930 (40 rows" in text
    assert "would delete 25 old rows of the default partition" in text

    real = await run_retention(pg_conn, logs, cfg, TODAY, dry_run=False)
    assert {p.name for p in real.dropped} == {p.name for p in report.partitions}
    assert (real.default_rows, real.dead_letters, real.system_checks) == (25, 2, 4)


async def add_side_rows(conn: asyncpg.Connection) -> None:
    """Dead letters and system_checks rows, old (before the 90-day cutoff) and recent."""
    old, recent = at(TODAY - timedelta(days=120)), at(TODAY - timedelta(days=10))
    for received_at in (old, old, recent):
        await conn.execute(
            "INSERT INTO forwarder_dead_letters (received_at, source, error, row) "
            "VALUES ($1, 's', 'bad', '{}')",
            received_at,
        )

    async def check(ts: datetime, name: str, status: str, group: str | None) -> None:
        details: dict[str, str] = {"kind": "alarm", "rule": name}
        if name.startswith("probe:"):
            details = {"kind": "probe", "probe": name.removeprefix("probe:")}
        if group is not None:
            details["group"] = group
        await conn.execute(
            "INSERT INTO system_checks (ts, name, status, details) VALUES ($1, $2, $3, $4)",
            ts,
            name,
            status,
            orjson.dumps(details).decode(),
        )

    # r1/g1: failing since long ago: its latest (old) row stays, the older one goes.
    await check(old - timedelta(hours=2), "r1", "failed", "g1")
    await check(old, "r1", "failed", "g1")
    # r1/g2: failed then resolved, both old: both go.
    await check(old - timedelta(hours=1), "r1", "failed", "g2")
    await check(old, "r1", "ok", "g2")
    # probe:db (no group): failing, latest row old: stays.
    await check(old, "probe:db", "failed", None)
    # r2: old failed row, then a recent one: the old one goes, the recent one stays.
    await check(old, "r2", "failed", None)
    await check(recent, "r2", "failed", None)


async def test_dead_letters_and_system_checks_are_pruned_keeping_what_still_fails(
    pg_conn: asyncpg.Connection, logs: DatabaseConfig
) -> None:
    await add_side_rows(pg_conn)
    cfg = RetentionConfig(delete_batch_rows=1)  # one row per statement: the loop ends
    report = await run_retention(pg_conn, logs, cfg, TODAY, dry_run=False)

    assert (report.dead_letters, report.system_checks, report.kept_failing_checks) == (2, 4, 2)
    assert await pg_conn.fetchval("SELECT count(*) FROM forwarder_dead_letters") == 1
    left = await pg_conn.fetch(
        "SELECT name, status, details->>'group' AS grp FROM system_checks ORDER BY name, ts"
    )
    assert [tuple(r) for r in left] == [
        ("probe:db", "failed", None),
        ("r1", "failed", "g1"),
        ("r2", "failed", None),
    ]
    # What a restart reads back as firing is unchanged.
    from forwarder.alarms.state import load_firing
    from forwarder.sinks.schema import Names

    firing = {(f.rule, f.group) for f in await load_firing(pg_conn, Names.from_config(logs))}
    assert firing == {("r1", "g1"), ("r2", None)}  # probe rows are not alarm rows


async def test_a_second_run_finds_nothing_to_do(
    pg_conn: asyncpg.Connection, logs: DatabaseConfig, tmp_path: Path
) -> None:
    await add_side_rows(pg_conn)
    cfg = RetentionConfig(export_dir=tmp_path / "x")
    first = await run_retention(pg_conn, logs, cfg, TODAY, dry_run=False)
    assert first.dropped and first.ok
    after_first = await snapshot(pg_conn)
    files = sorted(p.name for p in (tmp_path / "x").iterdir())
    second = await run_retention(pg_conn, logs, cfg, TODAY, dry_run=False)
    assert second.ok and not second.partitions
    assert (second.default_rows, second.dead_letters, second.system_checks) == (0, 0, 0)
    assert not second.default_exports
    assert await snapshot(pg_conn) == after_first
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == files
    assert "no partition old enough to drop" in second.lines()


async def test_a_second_forwarder_finds_the_lock_taken_and_skips(
    pg_conn: asyncpg.Connection, logs: DatabaseConfig, pg_dsn: str, pg_schema: str
) -> None:
    other = await asyncpg.connect(pg_dsn)
    try:
        assert await other.fetchval(
            "SELECT pg_try_advisory_lock($1)", retention_lock_key(pg_schema)
        )
        before = await snapshot(pg_conn)
        report = await run_retention(pg_conn, logs, RetentionConfig(), TODAY, dry_run=False)
        assert report.skipped and "another forwarder" in report.skipped
        assert await snapshot(pg_conn) == before
    finally:
        await other.close()
    report = await run_retention(pg_conn, logs, RetentionConfig(), TODAY, dry_run=False)
    assert report.skipped is None and report.dropped
    # The pass released its lock: another session can take it.
    other = await asyncpg.connect(pg_dsn)
    try:
        assert await other.fetchval(
            "SELECT pg_try_advisory_lock($1)", retention_lock_key(pg_schema)
        )
    finally:
        await other.close()


async def test_rows_arriving_during_the_export_are_exported_before_the_drop(
    pg_conn: asyncpg.Connection,
    logs: DatabaseConfig,
    pg_dsn: str,
    pg_schema: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A late backfill lands in an old partition after its export: it is exported again."""
    real_export = retention.export_rows
    late = await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema})
    calls: list[Path] = []

    async def export_then_insert(conn: Any, query: str, args: Any, path: Path) -> Any:
        result = await real_export(conn, query, args, path)
        if path.name.endswith("p20260930.jsonl.gz") and not calls:
            await insert_rows(late, OLD_DAYS[0], 1, "late")  # after the export's snapshot
        calls.append(path)
        return result

    monkeypatch.setattr(retention, "export_rows", export_then_insert)
    try:
        cfg = RetentionConfig(export_dir=tmp_path / "x")
        report = await run_retention(pg_conn, logs, cfg, TODAY, dry_run=False)
    finally:
        await late.close()
    assert report.ok, report.errors
    first = next(p for p in report.partitions if p.name == "system_logs_p20260930")
    assert first.dropped and first.rows == ROWS_PER_DAY + 1
    assert [p.name for p in calls].count(first.export.name) == 2  # type: ignore[union-attr]
    lines = gzip.decompress(first.export.read_bytes()).splitlines()  # type: ignore[union-attr]
    tags = sorted(orjson.loads(x)["meta"]["tag"] for x in lines)
    assert tags == ["late"] + ["part"] * ROWS_PER_DAY


async def test_a_partition_that_cannot_be_locked_stays_and_is_reported(
    pg_conn: asyncpg.Connection,
    logs: DatabaseConfig,
    pg_dsn: str,
    pg_schema: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(retention, "LOCK_TIMEOUT", "50ms")
    monkeypatch.setattr(retention, "DROP_RETRY_S", 0.01)
    reader = await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema})
    try:
        async with reader.transaction():
            # A long reader of one old day: its ACCESS SHARE lock blocks the DROP.
            await reader.fetchval("SELECT count(*) FROM system_logs_p20261001")
            report = await run_retention(pg_conn, logs, RetentionConfig(), TODAY, dry_run=False)
    finally:
        await reader.close()
    assert not report.ok
    stuck = [p for p in report.partitions if p.error]
    assert [p.name for p in stuck] == ["system_logs_p20261001"]
    assert "kept for the next run" in report.errors[0]
    assert "system_logs_p20261001" in await partition_names(pg_conn)
    assert len(report.dropped) == len(OLD_DAYS)  # the others went
    again = await run_retention(pg_conn, logs, RetentionConfig(), TODAY, dry_run=False)
    assert again.ok and [p.name for p in again.dropped] == ["system_logs_p20261001"]


async def test_without_tables_nothing_fails(pg_conn: asyncpg.Connection, pg_schema: str) -> None:
    report = await run_retention(
        pg_conn, db_config(pg_schema), RetentionConfig(), TODAY, dry_run=False
    )
    assert report.ok and not report.partitions
    assert any("does not exist yet" in n for n in report.notes)


async def test_partitions_not_of_the_day_layout_are_judged_by_their_bounds(
    pg_conn: asyncpg.Connection, pg_schema: str
) -> None:
    """A hand-made partition spanning a month, and one from MINVALUE."""
    db = db_config(pg_schema)
    await migrate(pg_conn, db, TODAY)
    await pg_conn.execute(
        "CREATE TABLE logs_2026_08 PARTITION OF system_logs "
        "FOR VALUES FROM ('2026-08-01 00:00+00') TO ('2026-09-01 00:00+00')"
    )
    await pg_conn.execute(
        "CREATE TABLE logs_ancient PARTITION OF system_logs "
        "FOR VALUES FROM (MINVALUE) TO ('2000-01-01 00:00+00')"
    )
    await pg_conn.execute("SET TimeZone = 'America/New_York'")  # bounds render in UTC anyway
    report = await run_retention(pg_conn, db, RetentionConfig(), TODAY, dry_run=False)
    assert [(p.name, p.day) for p in report.dropped] == [("logs_2026_08", None)]
    assert any("logs_ancient" in n for n in report.notes)
    assert "logs_ancient" in await partition_names(pg_conn)


async def test_retention_command_uses_the_settings(pg_dsn: str, pg_schema: str) -> None:
    settings = parse_config({"database": {"dsn": pg_dsn, "schema_name": pg_schema}})
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema})
    try:
        db = settings.database
        today = datetime.now(UTC).date()
        await migrate(conn, db, today)
        old = today - timedelta(days=db.retention_days + 5)
        await ensure_partitions(conn, db, old)
        await insert_rows(conn, old, 3, "old")
        dry = await retention_command(settings, dry_run=True)
        assert dry.dry_run and len(dry.partitions) == 5  # old-1 .. old+3
        assert (await snapshot(conn))["rows"] == 3
        done = await retention_command(settings, dry_run=False)
        assert len(done.dropped) == 5
        assert (await snapshot(conn))["rows"] == 0
    finally:
        await conn.close()


# --- the schedule ------------------------------------------------------------------------------


def test_next_run_is_the_next_hour_strictly_after_now() -> None:
    def t(d: int, h: int, m: int = 0, s: int = 0) -> datetime:
        return datetime(2026, 11, d, h, m, s, tzinfo=UTC)

    assert next_run(t(26, 1, 30), 3) == t(26, 3)
    assert next_run(t(26, 3), 3) == t(27, 3)  # at the hour itself: the next day's
    assert next_run(t(26, 2, 59, 59), 3) == t(26, 3)
    assert next_run(t(26, 23, 59), 0) == t(27, 0)
    assert next_run(datetime(2026, 12, 31, 5, tzinfo=UTC), 4) == datetime(2027, 1, 1, 4, tzinfo=UTC)
    # Another zone is converted, not read as UTC.
    paris = datetime(2026, 11, 26, 3, 30, tzinfo=UTC).astimezone(
        __import__("zoneinfo").ZoneInfo("Europe/Paris")
    )
    assert next_run(paris, 3) == t(27, 3)
    with pytest.raises(ValueError):
        next_run(datetime(2026, 11, 26), 3)


class JobHarness:
    """A job on a fake clock: its waits advance the clock instead of sleeping."""

    def __init__(self, start: datetime, fail: set[int] | None = None) -> None:
        self.clock = FakeClock(start)
        self.stop = asyncio.Event()
        self.calls: list[tuple[date, datetime]] = []
        self.fail = fail or set()
        self.waits: list[float] = []

    async def run_once(self, today: date) -> RetentionReport:
        self.calls.append((today, self.clock.now()))
        if len(self.calls) in self.fail:
            raise ConnectionError("database down")
        self.clock.advance(40)  # a run takes time
        cut = datetime.combine(today, datetime.min.time(), tzinfo=UTC)
        return RetentionReport(
            dry_run=False, logs_cutoff=cut, dead_letter_cutoff=cut, checks_cutoff=cut
        )

    async def wait(self, stop: asyncio.Event, seconds: float) -> None:
        assert seconds > 0
        self.waits.append(seconds)
        self.clock.advance(seconds)
        if self.clock.now() > datetime(2026, 12, 1, tzinfo=UTC):
            stop.set()
        await asyncio.sleep(0)


async def test_job_runs_once_a_day_at_its_hour() -> None:
    h = JobHarness(datetime(2026, 11, 26, 12, 0, tzinfo=UTC))
    job = RetentionJob(h.run_once, 3, h.clock, wait=h.wait, recheck_s=600)
    await job.run(h.stop)
    assert [c[0] for c in h.calls] == [date(2026, 11, d) for d in (27, 28, 29, 30)]
    assert all(c[1].hour == 3 and c[1].minute == 0 for c in h.calls)
    assert max(h.waits) <= 600  # sliced, so a wall-clock jump is noticed
    assert job.runs == 4 and job.failures == 0 and job.last_report is not None


async def test_job_retries_a_failed_run_later_the_same_day() -> None:
    h = JobHarness(datetime(2026, 11, 29, 12, 0, tzinfo=UTC), fail={1})
    job = RetentionJob(h.run_once, 3, h.clock, wait=h.wait, retry_s=3600)
    await job.run(h.stop)
    assert [c[1] for c in h.calls] == [
        datetime(2026, 11, 30, 3, tzinfo=UTC),
        datetime(2026, 11, 30, 4, tzinfo=UTC),  # an hour after the failure
    ]  # then the next day's run is after the harness stops (12-01 00:00)
    assert job.failures == 1


async def test_job_does_not_make_up_missed_days_after_a_long_sleep() -> None:
    h = JobHarness(datetime(2026, 11, 20, 12, 0, tzinfo=UTC))

    async def sleepy_wait(stop: asyncio.Event, seconds: float) -> None:
        if not h.waits:
            h.clock.advance(5 * 86400)  # the machine was suspended for five days
        await h.wait(stop, seconds)

    job = RetentionJob(h.run_once, 3, h.clock, wait=sleepy_wait)
    await job.run(h.stop)
    days = [c[0] for c in h.calls]
    assert days[0] == date(2026, 11, 25)  # once on waking (12:00 + 5 days, well past 03:00)
    assert days[1:] == [date(2026, 11, d) for d in range(26, 31)]  # then daily at 03:00


async def test_job_stops_promptly_when_asked() -> None:
    stop = asyncio.Event()
    clock = FakeClock(datetime(2026, 11, 26, 12, tzinfo=UTC))

    async def never(today: date) -> RetentionReport:
        raise AssertionError("not due")

    job = RetentionJob(never, 3, clock)
    task = asyncio.create_task(job.run(stop))
    await wait_until(lambda: job.next_at is not None, what="the job waiting for its hour")
    stop.set()
    await asyncio.wait_for(task, 2)
    assert job.next_at == datetime(2026, 11, 27, 3, tzinfo=UTC)


async def test_job_for_a_database_connects_and_runs_the_pass(
    pg_conn: asyncpg.Connection, logs: DatabaseConfig, pg_dsn: str
) -> None:
    """What the daemon wires: a job with its own connection per run, on a fake clock."""
    clock = FakeClock(datetime(2026, 11, 26, 2, 59, 50, tzinfo=UTC))
    stop = asyncio.Event()

    async def wait(stop_: asyncio.Event, seconds: float) -> None:
        if job.last_report is not None:
            stop_.set()  # one run is enough
        clock.advance(seconds)
        await asyncio.sleep(0)

    job = RetentionJob.for_database(pg_dsn, logs, RetentionConfig(), clock, wait=wait)
    await asyncio.wait_for(job.run(stop), 30)
    report = job.last_report
    assert report is not None and report.ok
    assert {p.name for p in report.dropped} == names([*OLD_DAYS, EDGE_DAYS[0]])
    assert report.logs_cutoff == at(CUTOFF_DAY, 0)  # "today" came from the injected clock
    assert job.next_at == datetime(2026, 11, 27, 3, tzinfo=UTC)


async def test_an_export_folder_that_cannot_be_written_keeps_every_row(
    pg_conn: asyncpg.Connection, logs: DatabaseConfig, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the export folder should be")
    before = await snapshot(pg_conn)
    cfg = RetentionConfig(export_dir=blocker / "export")
    report = await run_retention(pg_conn, logs, cfg, TODAY, dry_run=False)
    assert not report.ok and not report.dropped
    assert len(report.errors) == len(OLD_DAYS) + 1 + 1  # each partition, the default one
    after = await snapshot(pg_conn)
    assert (after["partitions"], after["rows"]) == (before["partitions"], before["rows"])
