"""Summaries of the log table: `forwarder summary`, GET /summary, and the report merge.

- `summarize`: rows per service and level over a window (the lines sampling kept out
  added back from the summary rows, as `pipeline/sample.py` describes, so the counts
  are lines, not rows), the critical-error count (ERROR lines) for the dashboard
  badge, and the alarms firing according to system_checks.
- `rate_series`: lines per bucket per service, for the status page's chart.
- `merge_into_report`: write a summary into a JSON report as its `log_summary` field,
  keeping every other field, atomically (a reader sees the old file or the new one).

Every function takes the connection (none opens one) and `Names` for identifiers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from forwarder.alarms.state import load_firing
from forwarder.pipeline.sample import SUMMARY_EVENT
from forwarder.sinks.schema import Names

__all__ = [
    "LEVELS",
    "REPORT_FIELD",
    "firing_as_dict",
    "merge_into_report",
    "rate_series",
    "summarize",
]

LEVELS = ("INFO", "WARNING", "ERROR")
CRITICAL_LEVEL = "ERROR"
REPORT_FIELD = "log_summary"
MAX_SERIES_BUCKETS = 1440


def firing_as_dict(f: Any) -> dict[str, Any]:
    """A firing alarm (engine `Firing` or system_checks `FiringRow`) as JSON-ready dict."""
    started = getattr(f, "started_at", None)
    out: dict[str, Any] = {
        "rule": f.rule,
        "group": f.group,
        "severity": getattr(f, "severity", None) or None,
        "count": f.count,
        "samples": list(getattr(f, "samples", ()) or ()),
        "started_at": started.isoformat() if isinstance(started, datetime) else started,
    }
    for key in ("notified", "clearing"):
        if hasattr(f, key):
            out[key] = getattr(f, key)
    return out


def _counts_sql(n: Names) -> str:
    return f"""
        SELECT service, level, sum(lines)::bigint AS lines FROM (
            SELECT service, level, count(*) AS lines
              FROM {n.q_table}
             WHERE ts >= $1 AND ts < $2 AND event <> $3
             GROUP BY service, level
            UNION ALL
            SELECT s.service, d.key, sum(d.value::bigint)
              FROM {n.q_table} s, jsonb_each_text(s.meta -> 'dropped') AS d
             WHERE s.ts >= $1 AND s.ts < $2 AND s.event = $3
               AND jsonb_typeof(s.meta -> 'dropped') = 'object'
               AND d.value ~ '^[0-9]{{1,18}}$'
             GROUP BY s.service, d.key
        ) t GROUP BY service, level ORDER BY service, level"""


async def _db_now(conn: asyncpg.Connection) -> datetime:
    now = await conn.fetchval("SELECT now()")
    assert isinstance(now, datetime)
    return now.astimezone(UTC)


async def summarize(
    conn: asyncpg.Connection,
    names: Names,
    window: timedelta,
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Lines per service and level in (now - window, now], ERROR lines, firing alarms.

    `now` defaults to the database's clock. Shape::

        {"window_s": 900.0, "since": "...", "until": "...",
         "services": {"api": {"INFO": 10, "WARNING": 0, "ERROR": 2, "total": 12}, ...},
         "totals": {"INFO": ..., "WARNING": ..., "ERROR": ..., "total": ...},
         "critical_errors": 2, "alarms_firing": [{"rule", "group", ...}, ...]}
    """
    if window.total_seconds() <= 0:
        raise ValueError("window must be positive")
    until = now if now is not None else await _db_now(conn)
    since = until - window
    rows = await conn.fetch(_counts_sql(names), since, until, SUMMARY_EVENT)
    services: dict[str, dict[str, int]] = {}
    totals = dict.fromkeys((*LEVELS, "total"), 0)
    for r in rows:
        counts = services.setdefault(r["service"], dict.fromkeys((*LEVELS, "total"), 0))
        level = r["level"] if r["level"] in LEVELS else str(r["level"])
        counts[level] = counts.get(level, 0) + int(r["lines"])
        counts["total"] += int(r["lines"])
        totals[level] = totals.get(level, 0) + int(r["lines"])
        totals["total"] += int(r["lines"])
    firing = await load_firing(conn, names)
    return {
        "window_s": window.total_seconds(),
        "since": since.isoformat(),
        "until": until.isoformat(),
        "services": services,
        "totals": totals,
        "critical_errors": totals.get(CRITICAL_LEVEL, 0),
        "alarms_firing": [firing_as_dict(f) for f in firing],
    }


async def rate_series(
    conn: asyncpg.Connection,
    names: Names,
    span: timedelta,
    bucket: timedelta,
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Lines per second per service, in the whole buckets of the last `span`.

    Shape: {"bucket_s": 60.0, "start": "...", "points": N,
    "services": {"api": [lines per second of each bucket, oldest first], ...}}.
    Sampled-out lines count at their summary row's bucket.
    """
    bucket_s = bucket.total_seconds()
    if bucket_s <= 0 or span.total_seconds() <= 0:
        raise ValueError("span and bucket must be positive")
    points = min(MAX_SERIES_BUCKETS, max(1, int(span.total_seconds() // bucket_s)))
    until = now if now is not None else await _db_now(conn)
    # Whole buckets aligned to the bucket size, so that consecutive refreshes line up;
    # the bucket still filling is left out (a partial count would read as a drop).
    epoch = datetime(2000, 1, 1, tzinfo=UTC)
    end = epoch + bucket * ((until - epoch) // bucket)
    start = end - bucket * points
    rows = await conn.fetch(
        f"""
        SELECT service, date_bin($4::interval, ts, $5) AS b, sum(lines)::bigint AS lines FROM (
            SELECT service, ts, 1::bigint AS lines
              FROM {names.q_table}
             WHERE ts >= $1 AND ts < $2 AND event <> $3
            UNION ALL
            SELECT s.service, s.ts, d.value::bigint
              FROM {names.q_table} s, jsonb_each_text(s.meta -> 'dropped') AS d
             WHERE s.ts >= $1 AND s.ts < $2 AND s.event = $3
               AND jsonb_typeof(s.meta -> 'dropped') = 'object'
               AND d.value ~ '^[0-9]{{1,18}}$'
        ) t GROUP BY 1, 2""",
        start,
        end,
        SUMMARY_EVENT,
        bucket,
        epoch,
    )
    services: dict[str, list[float]] = {}
    for r in rows:
        i = int((r["b"] - start) // bucket)
        if 0 <= i < points:
            series = services.setdefault(r["service"], [0.0] * points)
            series[i] += int(r["lines"]) / bucket_s
    return {
        "bucket_s": bucket_s,
        "start": start.isoformat(),
        "points": points,
        "services": dict(sorted(services.items())),
    }


def merge_into_report(path: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Set `log_summary` of the JSON report at `path`, keeping its other fields.

    A missing file becomes a report holding only the summary. A file that is not a
    JSON object is left alone (ValueError). The new file replaces the old one
    atomically, with the old one's permissions. Returns the report written.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        report: dict[str, Any] = {}
        mode = 0o644
    else:
        try:
            loaded = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} holds a JSON {type(loaded).__name__}, not an object")
        report = loaded
        mode = path.stat().st_mode & 0o777
    report[REPORT_FIELD] = summary
    data = orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n"
    folder = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return report
