"""What the runtime needs of a source."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class Source(Protocol):
    async def run(self, out: asyncio.Queue[Any], stop: asyncio.Event) -> None:
        """Put RawChunks on `out` until `stop` is set (or, in a backfill, the input ends)."""

    def status(self) -> dict[str, Any]:
        """State and counters, for /health and /metrics."""

    def progress(self) -> tuple[int, int]:
        """(bytes read, bytes known in total), for a backfill's progress bar."""
