"""A FileSource running on real files, and what it has emitted: the `tail` fixture
(registered in conftest.py) of the FileSource tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from forwarder.clock import Clock, SystemClock
from forwarder.config import FileSourceConfig
from forwarder.event import Position, RawChunk
from forwarder.sources.file import FileSource, FileTarget
from tests.support import wait_until


class Tail:
    """A running FileSource and everything it has emitted so far."""

    def __init__(self, source: FileSource, queue_size: int) -> None:
        self.source = source
        self.queue: asyncio.Queue[RawChunk] = asyncio.Queue(maxsize=queue_size)
        self.stop = asyncio.Event()
        self.chunks: list[RawChunk] = []
        self.task = asyncio.create_task(source.run(self.queue, self.stop))

    def drain(self) -> list[RawChunk]:
        while not self.queue.empty():
            self.chunks.append(self.queue.get_nowait())
        return self.chunks

    @property
    def lines(self) -> list[bytes]:
        return [line for chunk in self.drain() for line in chunk.lines]

    def flagged(self) -> list[tuple[bytes, bool]]:
        return [(line, i in c.truncated) for c in self.drain() for i, line in enumerate(c.lines)]

    async def started(self) -> None:
        # The first scan runs before the task first yields, so "ok" means it is done.
        await wait_until(lambda: self.source.status()["state"] == "ok", what="source started")

    async def wait_lines(self, n: int) -> list[bytes]:
        await wait_until(lambda: len(self.lines) >= n, what=f"{n} lines")
        return self.lines

    async def wait_scans(self, n: int = 1) -> None:
        """Wait until n more scans (and so the rest of their rounds) have run."""
        target = self.source.status()["scans"] + n
        await wait_until(lambda: self.source.status()["scans"] >= target, what="a scan")

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 5)


@pytest.fixture
async def tail() -> AsyncIterator[Callable[..., Any]]:
    """Factory: tail(config, checkpoints=..., clock=..., queue_size=...) -> started Tail."""
    started: list[Tail] = []

    async def start(
        config: FileSourceConfig,
        *,
        checkpoints: dict[str, Position] | None = None,
        clock: Clock | None = None,
        queue_size: int = 0,
        exit_on_eof: bool = False,
        ignore_identities: frozenset[tuple[int, int]] = frozenset(),
        describe: Callable[[str], FileTarget | None] | None = None,
        rotations: bool = False,
    ) -> Tail:
        source = FileSource(
            config,
            checkpoints or {},
            clock or SystemClock(),
            exit_on_eof=exit_on_eof,
            ignore_identities=ignore_identities,
            describe=describe,
            rotations=rotations,
        )
        t = Tail(source, queue_size)
        started.append(t)
        await t.started()
        return t

    yield start
    for t in started:
        if not t.task.done():
            await t.close()
        t.task.result()  # re-raise anything the source raised
