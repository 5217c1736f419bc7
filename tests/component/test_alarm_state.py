"""Alarm state in a real PostgreSQL: system_checks rows, restore, reset, check_alerts."""

from __future__ import annotations

import asyncio
import tomllib
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from forwarder.alarms.config import AlarmSettings
from forwarder.alarms.engine import AlarmEngine
from forwarder.alarms.rules import Alert, FiringRow, RuleSet
from forwarder.alarms.state import (
    AlertRecorder,
    check_alerts,
    load_firing,
    record_probe_result,
    reset,
    write_alert,
)
from forwarder.config import DatabaseConfig
from forwarder.event import Event, EventChunk, Level
from forwarder.pipeline.stage import END_OF_STREAM
from forwarder.sinks.schema import Names, migrate
from tests.support import FakeClock, api_error_burst, wait_until

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)

# The api_error_burst rule's own keys, then the other rules.
MORE_RULES = """resolve_after_s = 120
repeat_s = 600

[[alarms]]
name = "ui_user_errors"
type = "threshold"
match = { service = "ui", level = ["WARNING", "ERROR"], message = "^TypeError", meta = { page = "checkout" } }
threshold = 3
window_s = 600
group_by = "user_id"

[[alarms]]
name = "redis_down"
type = "health"
probe = "redis"

[probes.redis]
type = "redis"
"""  # noqa: E501
RULES = api_error_burst() + MORE_RULES


@pytest.fixture
async def names(pg_conn: asyncpg.Connection, pg_schema: str) -> Names:
    db = DatabaseConfig(schema_name=pg_schema)
    await migrate(pg_conn, db, date(2026, 11, 26))
    return Names.from_config(db)


def settings() -> AlarmSettings:
    return AlarmSettings(**tomllib.loads(RULES))


def alert(state: str, at: datetime, group: str | None = None, **kw: Any) -> Alert:
    fields: dict[str, Any] = {
        "rule": "api_error_burst",
        "group": group,
        "state": state,
        "severity": "error",
        "count": 5,
        "window_s": 60.0,
        "samples": ("e1", "e2"),
        "started_at": NOW,
        "at": at,
        "actions": ("ops_slack",),
        "summary": "s",
    }
    fields.update(kw)
    return Alert(**fields)


async def checks(conn: asyncpg.Connection, n: Names) -> list[tuple[Any, ...]]:
    rows = await conn.fetch(
        f"SELECT ts, name, status, severity, details, health_checks FROM {n.q_system_checks} "
        "ORDER BY id"
    )
    return [
        (
            r["ts"],
            r["name"],
            r["status"],
            r["severity"],
            orjson.loads(r["details"]),
            None if r["health_checks"] is None else orjson.loads(r["health_checks"]),
        )
        for r in rows
    ]


async def test_a_row_per_alert_and_the_latest_failed_rows_come_back(
    pg_conn: asyncpg.Connection, names: Names
) -> None:
    t1, t2, t3 = (NOW + timedelta(seconds=s) for s in (0, 30, 90))
    await write_alert(pg_conn, names, alert("firing", t1), {"redis": {"ok": True}})
    await write_alert(pg_conn, names, alert("firing", t1, group="u_1", rule="ui_user_errors"))
    await write_alert(pg_conn, names, alert("resolved", t2, count=7))
    await write_alert(pg_conn, names, alert("firing", t3, group="u_2", rule="ui_user_errors"))
    rows = await checks(pg_conn, names)
    assert rows[0] == (
        t1,
        "api_error_burst",
        "failed",
        "error",
        {
            "kind": "alarm",
            "rule": "api_error_burst",
            "group": None,
            "count": 5,
            "samples": ["e1", "e2"],
            "window_s": 60.0,
            "started_at": "2026-11-26T12:00:00+00:00",
            "summary": "s",
        },
        {"redis": {"ok": True}},
    )
    assert [(r[1], r[2], r[4]["group"], r[4]["count"]) for r in rows] == [
        ("api_error_burst", "failed", None, 5),
        ("ui_user_errors", "failed", "u_1", 5),
        ("api_error_burst", "ok", None, 7),
        ("ui_user_errors", "failed", "u_2", 5),
    ]
    # api_error_burst resolved at t2: only the two UI groups are firing.
    assert await load_firing(pg_conn, names) == [
        FiringRow("ui_user_errors", "u_1", 5, ("e1", "e2"), NOW, t1, "error"),
        FiringRow("ui_user_errors", "u_2", 5, ("e1", "e2"), NOW, t3, "error"),
    ]


async def test_firing_state_survives_a_restart(
    pg_conn: asyncpg.Connection, names: Names, fake_clock: FakeClock
) -> None:
    before = RuleSet.from_config(settings().alarms)
    ev = Event(fake_clock.now(), "api", Level.ERROR, "log", "boom", {})
    fired = [a for _ in range(5) for a in before.on_event(ev, 1000.0, fake_clock.now())]
    fired += before.on_probe(_Probe("redis", False, "refused", NOW), 1000.0, NOW)
    assert [a.rule for a in fired] == ["api_error_burst", "redis_down"]
    for a in fired:
        await write_alert(pg_conn, names, a)

    after = RuleSet.from_config(settings().alarms)  # a new process
    assert after.restore(await load_firing(pg_conn, names), 5000.0) == []
    restored = [(f.rule, f.group, f.count, f.samples, f.started_at) for f in after.firing()]
    assert restored == [
        (f.rule, f.group, f.count, f.samples, f.started_at) for f in before.firing()
    ]
    assert all(f.notified for f in after.firing())


async def test_reset_writes_ok_rows_for_one_rule_or_all(
    pg_conn: asyncpg.Connection, names: Names
) -> None:
    await write_alert(pg_conn, names, alert("firing", NOW))
    await write_alert(pg_conn, names, alert("firing", NOW, group="u_1", rule="ui_user_errors"))
    await write_alert(pg_conn, names, alert("firing", NOW, group="u_2", rule="ui_user_errors"))
    later = NOW + timedelta(minutes=5)
    cleared = await reset(pg_conn, names, later, "ui_user_errors")
    assert [(f.rule, f.group) for f in cleared] == [
        ("ui_user_errors", "u_1"),
        ("ui_user_errors", "u_2"),
    ]
    assert [(f.rule, f.group) for f in await load_firing(pg_conn, names)] == [
        ("api_error_burst", None)
    ]
    ok_rows = [r for r in await checks(pg_conn, names) if r[2] == "ok"]
    assert [(r[0], r[1], r[4]["group"], r[4]["reset"]) for r in ok_rows] == [
        (later, "ui_user_errors", "u_1", True),
        (later, "ui_user_errors", "u_2", True),
    ]
    assert [f.rule for f in await reset(pg_conn, names, later)] == ["api_error_burst"]
    assert await load_firing(pg_conn, names) == []
    assert await reset(pg_conn, names, later) == []


async def test_probe_results_are_recorded_in_health_checks(
    pg_conn: asyncpg.Connection, names: Names
) -> None:
    await record_probe_result(pg_conn, names, _Probe("redis", False, "refused", NOW))
    [row] = await checks(pg_conn, names)
    assert row == (
        NOW,
        "probe:redis",
        "failed",
        None,
        {"kind": "probe", "probe": "redis"},
        {"redis": {"probe": "redis", "ok": False, "detail": "refused", "at": NOW.isoformat()}},
    )
    assert await load_firing(pg_conn, names) == []  # probe rows are not alarm state


async def insert_logs(conn: asyncpg.Connection, n: Names, rows: list[tuple[Any, ...]]) -> None:
    await conn.executemany(
        f"INSERT INTO {n.q_table} (ts, service, level, event, message, meta) "
        "VALUES ($1, $2, $3, 'log', $4, $5::jsonb)",
        [(ts, svc, lvl, msg, orjson.dumps(meta).decode()) for ts, svc, lvl, msg, meta in rows],
    )


async def test_check_alerts_fires_repeats_and_resolves_in_sql(
    pg_conn: asyncpg.Connection, names: Names
) -> None:
    s = lambda sec: NOW - timedelta(seconds=sec)  # noqa: E731
    checkout = {"page": "checkout"}
    await insert_logs(
        pg_conn,
        names,
        [(s(i * 10), "api", "ERROR", f"api {i}", {}) for i in range(5)]  # 0..40 s ago
        + [(s(61), "api", "ERROR", "too old", {})]
        + [(s(5), "api", "WARNING", "not an error", {})]
        + [(s(i), "ui", "ERROR", f"TypeError {i}", {**checkout, "user_id": "u_a"})
           for i in range(3)]
        + [(s(1), "ui", "ERROR", "TypeError x", {**checkout, "user_id": "u_b"})] * 2
        + [(s(1), "ui", "ERROR", "TypeError y", {"page": "home", "user_id": "u_b"})]
        + [(s(1), "ui", "ERROR", "ReferenceError", {**checkout, "user_id": "u_b"})]
        + [(s(1), "ui", "ERROR", "TypeError z", checkout)] * 5,  # no user: no group
    )  # fmt: skip
    alarms = settings().alarms
    report = await check_alerts(pg_conn, names, alarms, NOW)
    assert [(a.rule, a.group, a.count, a.window_s) for a in report.hits] == [
        ("api_error_burst", None, 5, 60.0),
        ("ui_user_errors", "u_a", 3, 600.0),
    ]
    assert report.hits[0].samples == ("api 0", "api 1", "api 2", "api 3", "api 4")
    assert report.fired == report.hits and report.resolved == report.repeated == []
    firing = await load_firing(pg_conn, names)
    assert [(f.rule, f.group, f.count) for f in firing] == [
        ("api_error_burst", None, 5),
        ("ui_user_errors", "u_a", 3),
    ]

    # A minute later, nothing new in the logs: api is under its threshold but its fire
    # is only 60 s old (resolve_after_s = 120); nothing is written.
    report = await check_alerts(pg_conn, names, alarms, NOW + timedelta(seconds=60))
    assert report.fired == report.repeated == report.resolved == []
    # The same window of 60 s for every rule (--window 60): u_a still counts 3.
    report = await check_alerts(pg_conn, names, alarms, NOW + timedelta(seconds=57), 60)
    assert [(a.rule, a.group) for a in report.hits] == [("ui_user_errors", "u_a")]
    # 120 s after the fire row: resolved; u_a (repeat_s 3600) neither repeats nor resolves.
    report = await check_alerts(pg_conn, names, alarms, NOW + timedelta(seconds=120))
    assert [(a.rule, a.state, a.count) for a in report.resolved] == [
        ("api_error_burst", "resolved", 5)
    ]
    assert [(f.rule, f.group) for f in await load_firing(pg_conn, names)] == [
        ("ui_user_errors", "u_a")
    ]


async def test_check_alerts_repeats_after_repeat_s_and_concurrent_runs_fire_once(
    pg_dsn: str, pg_conn: asyncpg.Connection, names: Names, pg_schema: str
) -> None:
    await insert_logs(pg_conn, names, [(NOW - timedelta(seconds=1), "api", "ERROR", "e", {})] * 5)
    alarms = settings().alarms
    conns = [
        await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema}) for _ in range(4)
    ]
    try:
        reports = await asyncio.gather(*(check_alerts(c, names, alarms, NOW) for c in conns))
    finally:
        for c in conns:
            await c.close()
    assert sorted(len(r.fired) for r in reports) == [0, 0, 0, 1]
    later = NOW + timedelta(seconds=600)  # repeat_s; the logs are re-dated to be in window
    await pg_conn.execute(f"UPDATE {names.q_table} SET ts = $1", later - timedelta(seconds=1))
    report = await check_alerts(pg_conn, names, alarms, later)
    [rep] = report.repeated
    assert (rep.rule, rep.state, rep.started_at, rep.at) == (
        "api_error_burst",
        "firing",
        NOW,
        later,
    )
    statuses = [(r[1], r[2]) for r in await checks(pg_conn, names)]
    assert statuses == [("api_error_burst", "failed")] * 2


async def test_the_engine_and_the_recorder_write_each_alert_and_end_together(
    pg_dsn: str, pg_schema: str, pg_conn: asyncpg.Connection, names: Names, fake_clock: FakeClock
) -> None:
    engine = AlarmEngine(RuleSet.from_config(settings().alarms), fake_clock, tick_s=0.01)
    events_in: asyncio.Queue[Any] = asyncio.Queue()
    probes_in: asyncio.Queue[Any] = asyncio.Queue()
    alerts_out: asyncio.Queue[Any] = asyncio.Queue()
    records: asyncio.Queue[Any] = asyncio.Queue(maxsize=100)
    pool = await asyncpg.create_pool(
        pg_dsn, min_size=1, max_size=2, server_settings={"search_path": pg_schema}
    )
    try:
        recorder = AlertRecorder(pool, names)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                engine.run(events_in, probes_in, alerts_out, asyncio.Event(), records_out=records)
            )
            tg.create_task(recorder.run(records))
            await probes_in.put(_Probe("redis", False, "refused", NOW))
            ev = Event(NOW, "api", Level.ERROR, "log", "boom", {})
            await events_in.put(EventChunk([ev] * 5))
            await wait_until(lambda: recorder.rows_written == 2, what="two rows")
            engine.reset("redis_down")
            await events_in.put(END_OF_STREAM)
    finally:
        await pool.close()
    assert (recorder.rows_written, recorder.write_errors) == (3, 0)
    rows = await checks(pg_conn, names)
    assert sorted((r[1], r[2], r[3]) for r in rows) == [
        ("api_error_burst", "failed", "error"),
        ("redis_down", "failed", "error"),
        ("redis_down", "ok", "error"),
    ]
    assert [f.rule for f in await load_firing(pg_conn, names)] == ["api_error_burst"]


class _Probe:
    def __init__(self, probe: str, ok: bool, detail: str, at: datetime) -> None:
        self.probe, self.ok, self.detail, self.at = probe, ok, detail, at
