"""The thin async loops between queues; all the logic they apply is pure.

Python 3.11 has no Queue.shutdown, so the end of a stream is an explicit marker
that each stage passes on after its producers are done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final

from forwarder.clock import Clock
from forwarder.event import EventChunk, RawChunk
from forwarder.pipeline.normalize import normalize_chunk

if TYPE_CHECKING:
    from forwarder.alarms.privacy import Pseudonymizer
    from forwarder.pipeline.sample import Sampler


class Marker:
    """An in-band signal travelling a queue in order with the items around it."""


class EndOfStream(Marker):
    """Marker put on a queue after the last item; the consumer drains and returns.

    Compare by identity with END_OF_STREAM, the one instance.
    """

    def __repr__(self) -> str:
        return "END_OF_STREAM"


END_OF_STREAM: Final = EndOfStream()


class Flush(Marker):
    """Marker that every stage passes on in order; the sink commits every row queued
    before it, then sets `done`. So once `done` is set, each position a source put on
    the raw queue before the marker is committed: a source restarted by a reload can
    resume from the committed positions without reading a line twice.
    """

    def __init__(self) -> None:
        self.done = asyncio.Event()

    def __repr__(self) -> str:
        return f"Flush(done={self.done.is_set()})"


async def flush_through(queue: asyncio.Queue[Any], stop: asyncio.Event) -> bool:
    """Put a Flush on `queue`; True once everything put before it is committed, False
    if `stop` came first (a drain: the stages may end before reaching it)."""
    marker = Flush()
    await queue.put(marker)
    await first_of(marker.done.wait(), stop.wait())
    return marker.done.is_set()


async def first_of(*aws: Awaitable[Any]) -> None:
    """Until the first of `aws` completes; the others are cancelled."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


class NormalizeStage:
    """Raw chunks in, event chunks out; positions travel with the events they cover.

    Optional steps, in this order: pseudonymize user identifiers (before anything sees
    them), hand every event to the alarms (before sampling: sampling must never hide an
    event from an alarm; this put blocks like any other, the alarm engine is cheap),
    then sample what goes to the database.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        privacy: Pseudonymizer | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        self.clock = clock
        self.privacy = privacy
        self.sampler = sampler
        self.lines_in = 0
        self.events_out = 0

    async def run(
        self,
        inp: asyncio.Queue[RawChunk | Marker],
        out: asyncio.Queue[EventChunk | Marker],
        alarms: asyncio.Queue[EventChunk | Marker] | None = None,
    ) -> None:
        sampler = self.sampler
        while True:
            item = await inp.get()
            if item is END_OF_STREAM:
                if sampler is not None:
                    summaries = sampler.summaries(self.clock.monotonic(), flush=True)
                    if summaries:
                        await out.put(EventChunk(summaries))
                if alarms is not None:
                    await alarms.put(END_OF_STREAM)
                await out.put(END_OF_STREAM)
                return
            if isinstance(item, Flush):
                await out.put(item)
                continue
            assert isinstance(item, RawChunk)
            events = normalize_chunk(item, self.clock.now())
            if self.privacy is not None:
                events = self.privacy.apply_all(events)
            self.lines_in += len(item.lines)
            positions = (item.position,) if item.position is not None else ()
            chunk = EventChunk(events, positions)
            if alarms is not None:
                await alarms.put(chunk)
            if sampler is not None:
                now = self.clock.monotonic()
                chunk = sampler.sample_chunk(chunk, now)
                summaries = sampler.summaries(now)
                if summaries:
                    chunk = EventChunk([*chunk.events, *summaries], chunk.positions)
            self.events_out += len(chunk.events)
            await out.put(chunk)
            # Yield after every chunk, also when the queues never block: the sink's I/O
            # completions must not wait for a run of CPU-bound chunks.
            await asyncio.sleep(0)
