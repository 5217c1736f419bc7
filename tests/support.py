"""Test helpers shared by every tier: a fake clock, a condition waiter, a free port and
the alarm rule most tests use."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web


def free_port() -> int:
    """A local TCP port that nothing listens on (until the test starts something there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api_error_burst(threshold: int = 5) -> str:
    """The `api_error_burst` alarm rule as TOML: `threshold` API errors within 60 s.

    It ends on its `window_s` line, so a test may append more keys of this rule (or
    further tables) to the text."""
    return f"""
[[alarms]]
name = "api_error_burst"
type = "threshold"
match = {{ service = "api", level = "ERROR" }}
threshold = {threshold}
window_s = 60
"""


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self._mono = 1000.0
        self._wall = start or datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)

    def monotonic(self) -> float:
        return self._mono

    def now(self) -> datetime:
        return self._wall

    def advance(self, seconds: float) -> None:
        self._mono += seconds
        self._wall += timedelta(seconds=seconds)


async def wait_until(
    condition: Callable[[], Awaitable[bool] | bool],
    timeout_s: float = 20.0,
    what: str = "condition",
) -> None:
    """Poll `condition` until it is true; fail naming `what` after `timeout_s`.

    This waits for a state, it does not sleep to a fixed point: the test fails only
    if the state never arrives.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


class RunningSource:
    """A source started on an unbounded queue, and every chunk it has emitted so far."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.stop = asyncio.Event()
        self.chunks: list[Any] = []
        self.task = asyncio.create_task(source.run(self.queue, self.stop))

    def drain(self) -> list[Any]:
        while not self.queue.empty():
            self.chunks.append(self.queue.get_nowait())
        return self.chunks

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 5)
        self.drain()


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """A real HTTP server for `app` on a free local port; yields its base URL."""
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
