"""Read-side SQL over system_logs, shared by the CLI (and later the HTTP face)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from forwarder.config import DatabaseConfig
from forwarder.sinks.schema import Names

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> timedelta:
    """'90' or '90s', '15m', '2h', '7d' -> timedelta; ValueError names the bad input."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 15m, 2h, 7d)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


async def recent(
    conn: asyncpg.Connection,
    db: DatabaseConfig,
    *,
    since: datetime,
    service: str | None = None,
    level: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """The newest rows since `since`, optionally of one service and level, newest first."""
    rows = await conn.fetch(
        f"SELECT ts, service, level, event, message, meta FROM {Names.from_config(db).q_table} "
        "WHERE ts >= $1 AND ($2::text IS NULL OR service = $2) "
        "AND ($3::text IS NULL OR level = $3) ORDER BY ts DESC, id DESC LIMIT $4",
        since,
        service,
        level.upper() if level else None,
        limit,
    )
    return [dict(row) for row in rows]
