"""The running sources, each with a stop of its own, so a reload can stop or start one.

Stopping a source loses nothing: what it read is on the raw queue and commits with its
positions; what it had not read is read by the next source of that name, which resumes
from the committed positions. That next source may start only once everything the
old one queued is committed (`flush`), or it would resume too early and read those
lines a second time. Positions belong to a source's name: renaming a source starts it
afresh, from its `read_from`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from forwarder.pipeline.stage import first_of
from forwarder.sources.base import Source

log = logging.getLogger(__name__)

COMPONENT = "runtime"


@dataclass
class _Running:
    name: str
    config: Any  # the source's config section; None for one a reload never touches
    source: Source
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class SourceChanges:
    """What a reload did to the source list, by source name."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def diff_sources(old: Mapping[str, Any], new: Mapping[str, Any]) -> SourceChanges:
    """Compare two {name: config} maps (configs compare by value)."""
    return SourceChanges(
        added=tuple(n for n in new if n not in old),
        removed=tuple(n for n in old if n not in new),
        changed=tuple(n for n in new if n in old and new[n] != old[n]),
    )


# Builds the source for a config, resuming from its committed positions.
SourceFactory = Callable[[Any], Awaitable[Source]]


class SourceSet:
    """Every source feeding the raw queue; `run` returns when all of them have stopped.

    `stop` (the daemon's drain) stops them all; `replace` stops, starts and restarts
    single sources while the rest keep reading.
    """

    def __init__(
        self, out: asyncio.Queue[Any], stop: asyncio.Event, *, exit_on_eof: bool = False
    ) -> None:
        self._out = out
        self._stop = stop
        self._exit_on_eof = exit_on_eof
        self._running: dict[str, _Running] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._lock = asyncio.Lock()  # one reload at a time

    def add(self, name: str, source: Source, config: Any = None) -> None:
        """A source to start with the others; `config` None: never reloaded."""
        if name in self._running:
            raise ValueError(f"two sources named {name!r}")
        self._running[name] = _Running(name, config, source)

    def __iter__(self) -> Iterator[Source]:
        return iter([r.source for r in self._running.values()])

    def configs(self) -> dict[str, Any]:
        """{name: config} of the reloadable sources."""
        return {r.name: r.config for r in self._running.values() if r.config is not None}

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for running in self._running.values():
                self._start(running)
            try:
                await self._wait_for_the_end()
            finally:
                self._tg = None
                for running in self._running.values():
                    running.stop.set()

    async def _wait_for_the_end(self) -> None:
        """Until the daemon stops; a backfill also ends when every source has returned."""
        if not self._exit_on_eof:
            await self._stop.wait()
            return
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if not tasks:
            return
        await first_of(self._stop.wait(), asyncio.wait(tasks))

    def _start(self, running: _Running) -> None:
        assert self._tg is not None
        running.task = self._tg.create_task(
            running.source.run(self._out, running.stop), name=f"source:{running.name}"
        )

    async def replace(
        self,
        configs: Mapping[str, Any],
        build: SourceFactory,
        flush: Callable[[], Awaitable[None]],
    ) -> SourceChanges:
        """Make the reloadable sources those of `configs` ({name: config}).

        Removed and changed sources stop; once their queued lines are committed
        (`flush`), added and changed ones start from the committed positions. The
        others are not touched. A `build` error leaves that source out and is raised
        after the rest is done.
        """
        async with self._lock:
            if self._tg is None or self._stop.is_set() or self._exit_on_eof:
                # Not running, draining, or a backfill (which reads a fixed set to its end).
                return SourceChanges()
            changes = diff_sources(self.configs(), configs)
            for name in (*changes.removed, *changes.changed):
                running = self._running.pop(name)
                running.stop.set()
                if running.task is not None:
                    await asyncio.wait([running.task])
                log.info(
                    "source %s stopped (%s)",
                    name,
                    "removed from the config" if name in changes.removed else "config changed",
                    extra={"component": COMPONENT, "event": "reload.source_stopped"},
                )
            starting = (*changes.changed, *changes.added)
            if not starting:
                return changes
            await flush()
            failed: list[tuple[str, Exception]] = []
            for name in starting:
                if name in self._running:  # e.g. the intake's name: never replaced
                    failed.append((name, ValueError("the name is taken by another source")))
                    continue
                try:
                    source = await build(configs[name])
                except Exception as e:  # a bad new source must not stop the others
                    failed.append((name, e))
                    continue
                if self._tg is None or self._stop.is_set():
                    break  # the drain began while we flushed
                running = _Running(name, configs[name], source)
                self._running[name] = running
                self._start(running)
                log.info(
                    "source %s started",
                    name,
                    extra={"component": COMPONENT, "event": "reload.source_started"},
                )
            if failed:
                name, error = failed[0]
                raise SourceStartError(name, error)
            return changes


class SourceStartError(Exception):
    def __init__(self, name: str, error: Exception) -> None:
        super().__init__(f"source {name} could not start: {error}")
        self.name = name
