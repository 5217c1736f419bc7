"""The thin async loops between queues; all the logic they apply is pure.

Python 3.11 has no Queue.shutdown, so the end of a stream is an explicit marker
that each stage passes on after its producers are done.
"""

from __future__ import annotations

import asyncio
from typing import Final

from forwarder.clock import Clock
from forwarder.event import EventChunk, RawChunk
from forwarder.pipeline.normalize import normalize_chunk


class EndOfStream:
    """Marker put on a queue after the last item; the consumer drains and returns.

    Compare by identity with END_OF_STREAM, the one instance.
    """

    def __repr__(self) -> str:
        return "END_OF_STREAM"


END_OF_STREAM: Final = EndOfStream()


class NormalizeStage:
    """Raw chunks in, event chunks out; positions travel with the events they cover."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.lines_in = 0
        self.events_out = 0

    async def run(
        self,
        inp: asyncio.Queue[RawChunk | EndOfStream],
        out: asyncio.Queue[EventChunk | EndOfStream],
    ) -> None:
        while True:
            item = await inp.get()
            if item is END_OF_STREAM:
                await out.put(END_OF_STREAM)
                return
            assert isinstance(item, RawChunk)
            events = normalize_chunk(item, self.clock.now())
            self.lines_in += len(item.lines)
            self.events_out += len(events)
            positions = (item.position,) if item.position is not None else ()
            await out.put(EventChunk(events, positions))
            # Yield after every chunk, also when the queues never block: the sink's I/O
            # completions must not wait for a run of CPU-bound chunks.
            await asyncio.sleep(0)
