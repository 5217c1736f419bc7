"""The injected clock: logic takes `now` from here, tests use a fake one."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: windows, batch age, backoff."""

    def now(self) -> datetime:
        """Aware UTC wall time: only for event timestamps."""


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)


def as_utc(dt: datetime) -> datetime | None:
    """`dt` in UTC (a naive one is taken as UTC), or None when it has no UTC form."""
    tz = dt.tzinfo
    if tz is UTC:
        return dt
    if tz is None:
        return dt.replace(tzinfo=UTC)
    try:
        return dt.astimezone(UTC)
    except (OverflowError, ValueError):
        return None
