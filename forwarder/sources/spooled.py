"""Feeding a disk spool into the pipeline: the read side of every source that cannot replay.

A source that cannot read its input again (standard input; the same shape serves the
HTTP intake and `forwarder pipe`) appends each line to a spool (`sinks/spool.py`) as
it arrives, and a `SpoolFeeder` reads the spool back from the committed position:

* records are grouped as a file's are (`FramedGrouper`: the `format` framer, then the
  multiline grouper), through `SpoolGrouping`, which knows where a held record starts
  in the spool: a chunk's position never passes it, so a crash reads it again whole;
* each RawChunk carries the spool position (`to_checkpoint`), so the sink commits the
  rows and the spool checkpoint in one transaction;
* while feeding, the committed checkpoint is read now and then (often while the writer
  waits for room) and the segments entirely before it are deleted.

The writer side tells the feeder `appended()` after each append and `finish()` after
its last one; `run` returns once everything appended is fed, the held record included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from forwarder.clock import Clock
from forwarder.event import Position, RawChunk
from forwarder.pipeline.multiline import Grouper
from forwarder.pipeline.stage import Marker
from forwarder.sinks.spool import (
    CHECKPOINT_STREAM,
    START,
    SpoolPosition,
    SpoolReader,
    SpoolWriter,
    from_checkpoint,
    to_checkpoint,
)
from forwarder.sources.framing import Framer, Records

__all__ = ["CommittedReader", "FramedGrouper", "SpoolFeeder", "resume_position"]

log = logging.getLogger(__name__)

COMPONENT = "source.spool"
CHUNK_LINES: Final = 500  # spool records read per step (one chunk at most)
ACK_INTERVAL_S: Final = 2.0
ROOM_POLL_S: Final = 0.1  # how often while the writer waits for room
ACK_TIMEOUT_S: Final = 5.0

# Reads the committed checkpoints of the source: the sink's load_checkpoints(name).
CommittedReader = Callable[[], Awaitable[Mapping[str, Position]]]


def resume_position(checkpoints: Mapping[str, Position], writer: SpoolWriter) -> SpoolPosition:
    """Where feeding resumes: the committed spool checkpoint among a source's
    `checkpoints`, or the spool's start (none yet, or one about another spool)."""
    start = from_checkpoint(checkpoints.get(CHECKPOINT_STREAM), writer.spool_id)
    if start is not None and start.segment >= writer.first_segment:
        # Only possible if the folder's next_segment mark was lost: replaying is
        # better than skipping lines.
        log.warning(
            "checkpoint %s is ahead of the spool %s: reading it from its start",
            start,
            writer.folder,
            extra={"component": COMPONENT},
        )
        start = None
    return start or START


class FramedGrouper:
    """A framer then a grouper, as one `Grouper` (what `SpoolGrouping` feeds).

    The framer releases records in input order, so what the grouper holds starts
    before anything the framer still holds. (The file source composes the two the same
    way in its `_FileRecords`, with the file's own method names.)
    """

    __slots__ = ("_now", "framer", "grouper")

    def __init__(self, framer: Framer, grouper: Grouper) -> None:
        self.framer = framer
        self.grouper = grouper
        self._now = 0.0  # the last time given: flush() has none

    def feed(self, records: Records, now: float) -> Records:
        self._now = now
        return self.grouper.feed(self.framer.feed(records, now), now)

    def held_start(self) -> int | None:
        start = self.grouper.held_start()
        return self.framer.held_start() if start is None else start

    def next_due(self) -> float | None:
        a, b = self.grouper.next_due(), self.framer.next_due()
        if a is None or b is None:
            return b if a is None else a
        return min(a, b)

    def flush_due(self, now: float) -> Records:
        self._now = now
        out = Records(starts=None)
        freed = self.framer.flush_due(now)
        if freed:
            out.extend(self.grouper.feed(freed, now))
        out.extend(self.grouper.flush_due(now))
        return out

    def flush(self) -> Records:
        out = self.grouper.feed(self.framer.flush(), self._now)
        out.extend(self.grouper.flush())
        return out

    @property
    def errors(self) -> int:
        """Wrapper lines (docker, cri) that did not parse, kept as raw records."""
        return self.framer.errors


class SpoolFeeder:
    """Reads one spool from `start` into RawChunks of `source`, following its writer.

    `meta_of(stream)` is the transport meta of a record of that stream (None: none).
    Without `committed`, committed segments are deleted only by `acknowledge` (and by
    the next start).
    """

    def __init__(
        self,
        source: str,
        service: str,
        writer: SpoolWriter,
        grouper: Grouper,
        start: SpoolPosition,
        clock: Clock,
        *,
        committed: CommittedReader | None = None,
        meta_of: Callable[[str], Mapping[str, Any] | None] | None = None,
        max_records: int = CHUNK_LINES,
    ) -> None:
        self.source = source
        self.service = service
        self.writer = writer
        self.reader = SpoolReader(writer.folder)
        self._grouper = grouper
        self._clock = clock
        self._committed = committed
        self._meta_of = meta_of or _no_meta
        self._max_records = max_records
        self.fed_to = start  # the last chunk's position (never past a held record)
        self._acked_to: SpoolPosition | None = None
        self._appended = asyncio.Event()
        self._room_wanted = asyncio.Event()
        self._wanting_room = False
        self._finished = False
        self.records_fed = 0

    # -- the writer side --

    def appended(self) -> None:
        """The writer's position moved."""
        self._appended.set()

    def finish(self) -> None:
        """No more appends: `run` returns once everything appended is fed."""
        self._finished = True
        self._appended.set()

    def want_room(self, wanted: bool = True) -> None:
        """The writer waits for room (True: read the committed position now and then
        often) or has it again (False)."""
        self._wanting_room = wanted
        if wanted:
            self._room_wanted.set()

    @property
    def unfed_bytes(self) -> int:
        end, fed = self.writer.position, self.fed_to
        if end.segment == fed.segment:
            return max(0, end.byte - fed.byte)
        return self.writer.used_bytes  # across segments: at most what the spool holds

    # -- the pipeline side --

    async def run(self, out: asyncio.Queue[RawChunk | Marker]) -> None:
        async with asyncio.TaskGroup() as tg:
            feeding = tg.create_task(self._feed(out), name=f"{self.source}.feed")
            if self._committed is not None:
                tg.create_task(self._acknowledge(feeding), name=f"{self.source}.ack")

    async def acknowledge(self, position: SpoolPosition) -> None:
        """Delete the segments entirely before `position` (it must be committed)."""
        self._acked_to = position
        await asyncio.to_thread(self.writer.acknowledge, position)

    async def _feed(self, out: asyncio.Queue[RawChunk | Marker]) -> None:
        # SpoolGrouping lives in forwarder.pipe, which imports forwarder.runtime, which
        # imports the sources: imported here, at use, until it moves beside this class.
        from forwarder.pipe import SpoolGrouping

        clock, writer = self._clock, self.writer
        records = SpoolGrouping(
            self._grouper,
            self.reader,
            self.fed_to,
            self._meta_of,  # type: ignore[arg-type]  # None: no transport meta
            max_records=self._max_records,
        )
        while True:
            self._appended.clear()
            until = writer.position
            step = await asyncio.to_thread(records.step, until, clock.monotonic())
            if step is not None:
                await self._put(out, *step)
                continue
            if self._finished and writer.position == until:
                await self._put(out, *await asyncio.to_thread(records.flush))
                return
            due = records.next_due()
            if due is None:
                await self._appended.wait()
                continue
            wait_s = due - clock.monotonic()
            if wait_s <= 0:  # no line for the flush timeout: release the held record
                now = clock.monotonic()
                await self._put(out, *await asyncio.to_thread(records.release_due, now))
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._appended.wait()

    async def _put(
        self, out: asyncio.Queue[RawChunk | Marker], records: Records, position: SpoolPosition
    ) -> None:
        """The released records as one chunk at `position` (also none, to move the
        position past skipped bad records); nothing if neither changed."""
        if not records and position == self.fed_to:
            return
        await out.put(
            RawChunk(
                source=self.source,
                service=self.service,
                lines=records.payloads,
                position=to_checkpoint(self.source, position, self.writer.spool_id),
                truncated=frozenset(records.truncated),
                line_meta=records.metas,
                times=records.times,
            )
        )
        self.fed_to = position
        self.records_fed += len(records)

    async def _acknowledge(self, feeding: asyncio.Task[None]) -> None:
        """While feeding: delete the spool segments the sink has committed."""
        assert self._committed is not None
        while not feeding.done():
            wanted = asyncio.ensure_future(self._room_wanted.wait())
            try:
                await asyncio.wait(
                    [feeding, wanted],
                    timeout=ROOM_POLL_S if self._wanting_room else ACK_INTERVAL_S,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                wanted.cancel()
            self._room_wanted.clear()
            if self._acked_to is not None and self._acked_to >= self.fed_to:
                continue
            try:
                async with asyncio.timeout(ACK_TIMEOUT_S):
                    checkpoints = await self._committed()
            except Exception as e:  # the database is down: the segments wait
                log.debug(
                    "cannot read the committed position of %s: %s",
                    self.source,
                    type(e).__name__,
                    extra={"component": COMPONENT, "source": self.source},
                )
                continue
            committed = from_checkpoint(checkpoints.get(CHECKPOINT_STREAM), self.writer.spool_id)
            if committed is not None:
                await self.acknowledge(committed)


def _no_meta(stream: str) -> None:
    return None
