"""Alarm state in PostgreSQL: the system_checks rows, read back after a restart.

- `write_alert`: one row per alert: status `failed` for a firing alert (the first
  notice and each repeat), `ok` for a resolution; `details` holds
  {kind: "alarm", rule, group, count, samples, window_s, started_at, summary}.
- `load_firing`: the latest alarm row of each (rule, group); those with status
  `failed` are firing (`AlarmEngine.restore` takes them).
- `reset`: write an `ok` row for every firing (rule, group) of one rule or of all
  (`forwarder alerts --reset RULE|--all`).
- `record_probe_result`: one row per probe result, the result in `health_checks`.
- `check_alerts`: the threshold rules evaluated in SQL over the log table, for
  deployments where several forwarders write into one database; writes the fire and
  resolve rows itself under an advisory lock, so two runs at once do not both fire.

Identifiers come from `Names` (validated and quoted once); values travel as
parameters. Every function takes the connection; none opens one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson

from forwarder.alarms.config import ThresholdAlarmConfig
from forwarder.alarms.rules import MAX_SAMPLES, Alert, FiringRow, ProbeOutcome
from forwarder.pipeline.stage import END_OF_STREAM, EndOfStream
from forwarder.sinks.postgres import forget_traceback
from forwarder.sinks.schema import Names, lock_key

log = logging.getLogger(__name__)

COMPONENT = "alarms.state"

ALARM_KIND = "alarm"
PROBE_KIND = "probe"
PROBE_ROW_PREFIX = "probe:"

__all__ = [
    "AlertRecorder",
    "CheckReport",
    "alert_details",
    "check_alerts",
    "load_firing",
    "record_probe_result",
    "reset",
    "threshold_query",
    "write_alert",
    "write_alerts",
]


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def alert_details(alert: Alert, reset: bool = False) -> dict[str, Any]:
    details: dict[str, Any] = {
        "kind": ALARM_KIND,
        "rule": alert.rule,
        "group": alert.group,
        "count": alert.count,
        "samples": list(alert.samples),
        "window_s": alert.window_s,
        "started_at": alert.started_at.isoformat(),
        "summary": alert.summary,
    }
    if reset:
        details["reset"] = True
    return details


_INSERT = (
    "INSERT INTO {t} (ts, name, status, severity, details, health_checks) "
    "VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb)"
)


async def write_alert(
    conn: asyncpg.Connection,
    n: Names,
    alert: Alert,
    health_checks: Mapping[str, Any] | None = None,
    *,
    reset: bool = False,
) -> None:
    """One system_checks row for `alert` (failed when firing, ok when resolved)."""
    await conn.execute(
        _INSERT.format(t=n.q_system_checks),
        alert.at,
        alert.rule,
        "failed" if alert.state == "firing" else "ok",
        alert.severity or None,
        _json(alert_details(alert, reset)),
        None if health_checks is None else _json(health_checks),
    )


async def write_alerts(
    conn: asyncpg.Connection, n: Names, alerts: Iterable[Alert], *, reset: bool = False
) -> int:
    """Rows for several alerts in one statement batch; returns how many."""
    rows = [
        (
            a.at,
            a.rule,
            "failed" if a.state == "firing" else "ok",
            a.severity or None,
            _json(alert_details(a, reset)),
            None,
        )
        for a in alerts
    ]
    if rows:
        await conn.executemany(_INSERT.format(t=n.q_system_checks), rows)
    return len(rows)


async def record_probe_result(
    conn: asyncpg.Connection, n: Names, result: ProbeOutcome, severity: str | None = None
) -> None:
    """One row per probe result: name "probe:<name>", the result in health_checks."""
    as_dict = getattr(result, "as_dict", None)
    check = (
        as_dict()
        if callable(as_dict)
        else {
            "probe": result.probe,
            "ok": result.ok,
            "detail": result.detail,
            "at": result.at.isoformat(),
        }
    )
    await conn.execute(
        _INSERT.format(t=n.q_system_checks),
        result.at,
        PROBE_ROW_PREFIX + result.probe,
        "ok" if result.ok else "failed",
        severity,
        _json({"kind": PROBE_KIND, "probe": result.probe}),
        _json({result.probe: check}),
    )


async def load_firing(conn: asyncpg.Connection, n: Names) -> list[FiringRow]:
    """The (rule, group) pairs whose latest alarm row says failed, oldest first."""
    rows = await conn.fetch(
        f"""SELECT name, ts, severity, details FROM (
                SELECT DISTINCT ON (name, details->>'group') name, status, ts, severity, details
                FROM {n.q_system_checks}
                WHERE details->>'kind' = $1
                ORDER BY name, details->>'group', ts DESC, id DESC
            ) latest
            WHERE status = 'failed'
            ORDER BY ts, name""",
        ALARM_KIND,
    )
    out: list[FiringRow] = []
    for r in rows:
        d = orjson.loads(r["details"])
        started = d.get("started_at")
        out.append(
            FiringRow(
                rule=r["name"],
                group=d.get("group"),
                count=int(d.get("count") or 0),
                samples=tuple(str(s) for s in (d.get("samples") or ()))[:MAX_SAMPLES],
                started_at=datetime.fromisoformat(started) if started else r["ts"],
                at=r["ts"],
                severity=r["severity"],
            )
        )
    return out


async def reset(
    conn: asyncpg.Connection, n: Names, at: datetime, rule: str | None = None
) -> list[FiringRow]:
    """Write an ok row for each firing (rule, group) of `rule` (None: every rule).

    Returns what was cleared. A daemon holding the same alarm in memory keeps it until
    it is reset there too (its HTTP reset), or resolves it on its own.
    """
    async with conn.transaction():
        firing = [f for f in await load_firing(conn, n) if rule is None or f.rule == rule]
        alerts = [_row_alert(f, at, "resolved", "reset by an operator") for f in firing]
        await write_alerts(conn, n, alerts, reset=True)
    return firing


def _row_alert(f: FiringRow, at: datetime, state: str, summary: str) -> Alert:
    return Alert(
        rule=f.rule,
        group=f.group,
        state=state,  # type: ignore[arg-type]
        severity=f.severity or "",
        count=f.count,
        window_s=None,
        samples=f.samples,
        started_at=f.started_at,
        at=at,
        actions=(),
        summary=f"{f.rule}: {summary}",
    )


# --- check_alerts: threshold rules in SQL ----------------------------------------------------


def threshold_query(n: Names, rule: ThresholdAlarmConfig) -> tuple[str, list[Any]]:
    """SQL counting `rule`'s matching rows in ($1, $2], grouped, that reach the threshold.

    The message regex runs in PostgreSQL (`~`, its ARE flavour): plain patterns behave as
    in Python; Python-only syntax (named groups `(?P<..>)`, `\\d` inside brackets...)
    may differ.
    """
    m = rule.match
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args) + 2}"  # $1, $2: the time range

    where = ["ts > $1", "ts <= $2"]  # (now - window, now]: as the in-memory rules count
    if m.service is not None:
        where.append(f"service = {arg(m.service)}")
    levels = m.levels()
    if levels is not None:
        where.append(f"level = ANY({arg(sorted(str(v) for v in levels))}::text[])")
    if m.event is not None:
        where.append(f"event = {arg(m.event)}")
    if m.message is not None:
        where.append(f"message ~ {arg(m.message)}")
    if m.meta:
        where.append(f"meta @> {arg(_json(m.meta))}::jsonb")
    group = "NULL::text"
    if rule.group_by is not None:
        group = f"meta->>{arg(rule.group_by)}"
        where.append(f"meta ? {arg(rule.group_by)}")
    sql = f"""SELECT {group} AS grp, count(*) AS n,
                     (array_agg(message ORDER BY ts DESC, id DESC))[1:{MAX_SAMPLES}] AS samples
              FROM {n.q_table}
              WHERE {" AND ".join(where)}
              GROUP BY 1
              HAVING count(*) >= {arg(rule.threshold)}
              ORDER BY 1"""
    return sql, args


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What one `check_alerts` run found and wrote."""

    hits: list[Alert]  # every (rule, group) at or over its threshold now
    fired: list[Alert]  # hits that were not firing: a failed row was written
    repeated: list[Alert]  # hits firing, their last failed row repeat_s old: a new one
    resolved: list[Alert]  # firing pairs under threshold, last failed row resolve_after_s old


async def check_alerts(
    conn: asyncpg.Connection,
    n: Names,
    alarms: Sequence[Any],
    now: datetime,
    window_s: float | None = None,
    *,
    write: bool = True,
) -> CheckReport:
    """Evaluate the threshold rules over the log table (the strategy's check_alerts.py).

    `window_s` replaces each rule's own window when given (`--window 60`). A pair
    reaching its threshold that is not firing fires (a failed row); one still firing
    gets a new failed row once its last is `repeat_s` old (a repeat, also the proof it
    still held then); one no longer reaching it is resolved (an ok row) once its last
    failed row is `resolve_after_s` old. So resolution here is approximate, by up to
    repeat_s. With `write=False` nothing is written (a dry run). Runs under an
    advisory lock per schema, so concurrent runs do not double-fire.
    """
    rules = [a for a in alarms if isinstance(a, ThresholdAlarmConfig)]
    hits: list[Alert] = []
    fired: list[Alert] = []
    repeated: list[Alert] = []
    resolved: list[Alert] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(n.schema, "check_alerts"))
        firing = {(f.rule, f.group): f for f in await load_firing(conn, n)}
        last_row = await _last_failed_ts(conn, n)
        for rule in rules:
            window = rule.window_s if window_s is None else window_s
            sql, args = threshold_query(n, rule)
            rows = await conn.fetch(sql, now - timedelta(seconds=window), now, *args)
            seen: set[str | None] = set()
            for r in rows:
                group = r["grp"]
                seen.add(group)
                alert = Alert(
                    rule=rule.name,
                    group=group,
                    state="firing",
                    severity=rule.severity,
                    count=int(r["n"]),
                    window_s=window,
                    samples=tuple(r["samples"] or ()),
                    started_at=now,
                    at=now,
                    actions=tuple(rule.actions),
                    summary=f"{rule.name}{'' if group is None else f' [{group}]'}: "
                    f"{r['n']} matching rows within {window:g} s (threshold {rule.threshold})",
                )
                hits.append(alert)
                was = firing.get((rule.name, group))
                if was is None:
                    fired.append(alert)
                else:
                    last = last_row.get((rule.name, group), was.at)
                    if (now - last).total_seconds() >= rule.repeat_s:
                        repeated.append(replace(alert, started_at=was.started_at))
            for (name, group), f in firing.items():
                if name != rule.name or group in seen:
                    continue
                last = last_row.get((name, group), f.at)
                if (now - last).total_seconds() >= rule.resolve_after_s:
                    resolved.append(
                        Alert(
                            rule=name,
                            group=group,
                            state="resolved",
                            severity=rule.severity,
                            count=f.count,
                            window_s=window,
                            samples=f.samples,
                            started_at=f.started_at,
                            at=now,
                            actions=tuple(rule.actions),
                            summary=f"{name}: resolved (under {rule.threshold} within "
                            f"{window:g} s)",
                        )
                    )
        if write:
            await write_alerts(conn, n, fired + repeated + resolved)
    return CheckReport(hits, fired, repeated, resolved)


async def _last_failed_ts(conn: asyncpg.Connection, n: Names) -> dict[tuple[str, Any], datetime]:
    rows = await conn.fetch(
        f"""SELECT name, details->>'group' AS grp, max(ts) AS ts FROM {n.q_system_checks}
            WHERE details->>'kind' = $1 AND status = 'failed' GROUP BY 1, 2""",
        ALARM_KIND,
    )
    return {(r["name"], r["grp"]): r["ts"] for r in rows}


# --- the writer of alert rows ----------------------------------------------------------------


class AlertRecorder:
    """Writes a system_checks row per alert taken from its queue (the engine's records_out).

    A failed write is logged and counted, and the row given up: alarm history must not
    hold up the alarms (the queue in front is lossy too). Ends on END_OF_STREAM.
    """

    def __init__(self, pool: asyncpg.Pool, names: Names, *, acquire_timeout_s: float = 5.0):
        self.pool = pool
        self.names = names
        self.acquire_timeout_s = acquire_timeout_s
        self.rows_written = 0
        self.write_errors = 0

    async def run(self, inp: asyncio.Queue[Alert | EndOfStream]) -> None:
        while True:
            item = await inp.get()
            if item is END_OF_STREAM or isinstance(item, EndOfStream):
                return
            try:
                async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
                    await write_alert(conn, self.names, item)
                self.rows_written += 1
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                forget_traceback(e)  # its name is all we log; a kept traceback is a cycle
                self.write_errors += 1
                log.warning(
                    "could not write the system_checks row of %s (%s): %s",
                    item.rule,
                    item.state,
                    type(e).__name__,
                    extra={"component": COMPONENT, "rule": item.rule},
                )
