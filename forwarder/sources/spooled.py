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
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

from forwarder.clock import Clock
from forwarder.event import Position, RawChunk
from forwarder.pipeline.multiline import Grouper
from forwarder.pipeline.stage import Marker
from forwarder.sinks.spool import (
    CHECKPOINT_STREAM,
    START,
    FsyncMode,
    RecordTooLarge,
    SpoolClosed,
    SpoolFull,
    SpoolPosition,
    SpoolReader,
    SpoolRecord,
    SpoolWriter,
    from_checkpoint,
    segment_path,
    to_checkpoint,
)
from forwarder.sources.framing import Framer, Records

__all__ = [
    "CommittedReader",
    "FramedGrouper",
    "SpoolFeeder",
    "SpoolGrouping",
    "append_durably",
    "resume_position",
]

log = logging.getLogger(__name__)

COMPONENT = "source.spool"
CHUNK_LINES: Final = 500  # spool records read per step (one chunk at most)
ACK_INTERVAL_S: Final = 2.0
ROOM_POLL_S: Final = 0.1  # how often while the writer waits for room
ACK_TIMEOUT_S: Final = 5.0
FULL_WAIT_S: Final = 0.5  # one wait for room in a full spool (then the loop goes again)
SPOOL_ERROR_RETRY_S: Final = 1.0

# Reads the committed checkpoints of the source: the sink's load_checkpoints(name).
CommittedReader = Callable[[], Awaitable[Mapping[str, Position]]]


def open_spool(
    folder: Path, max_bytes: int, fsync: FsyncMode, segment_bytes: int | None = None
) -> SpoolWriter:
    """The spool of a source that cannot replay its input: segments of an eighth of its
    bound (8 MiB at most), so committed ones are deleted well before it is full."""
    return SpoolWriter(
        folder,
        max_bytes=max_bytes,
        segment_bytes=segment_bytes or min(8 * 1024 * 1024, max_bytes // 8),
        fsync=fsync,
    )


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


async def append_durably(
    writer: SpoolWriter,
    records: list[SpoolRecord],
    *,
    appended: Callable[[int], None],
    full: Callable[[SpoolFull], None],
    failed: Callable[[OSError], None],
    too_large: Callable[[], None],
) -> None:
    """Append `records` to the spool (in a worker thread), whatever it takes.

    While the spool is full: `full(e)`, then wait FULL_WAIT_S for room and try again
    (the first try does not wait: a full spool is said at once). A disk error (the
    spool is as it was): `failed(e)`, then again after SPOOL_ERROR_RETRY_S. Records
    too large for a spool record are appended in halves, down to the one record that
    is left out (`too_large()`). `appended(n)` after each append that took n records.
    A closed spool ends it (nothing more is spooled).
    """

    async def append(records: list[SpoolRecord]) -> None:
        wait_s = 0.0
        while True:
            try:
                await asyncio.to_thread(writer.append, records, timeout=wait_s)
            except SpoolFull as e:
                full(e)
                wait_s = FULL_WAIT_S
                continue
            except RecordTooLarge:
                if len(records) == 1:
                    too_large()
                    return
                mid = len(records) // 2
                await append(records[:mid])
                await append(records[mid:])
                return
            except SpoolClosed:
                return
            except OSError as e:
                failed(e)
                await asyncio.sleep(SPOOL_ERROR_RETRY_S)
                continue
            appended(len(records))
            return

    await append(records)


class FramedGrouper:
    """A framer then a grouper, as one `Grouper` (all pure): what `SpoolGrouping` feeds,
    and a file's records in the file source.

    The framer releases records in input order, so what the grouper holds starts
    before anything the framer still holds: `held_start` is where the oldest record
    either of them holds starts, and a position must never pass it.
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

    def take_errors(self) -> int:
        """`errors` since the last call."""
        errors = self.framer.errors
        self.framer.errors = 0
        return errors


_Anchor = tuple[int, SpoolPosition]  # (sequence number k, the spool position before record k)


class SpoolGrouping:
    """The spool's records -> grouper, and where a chunk may say to resume reading.

    The grouper (`pipeline/multiline.py`) is fed the records in spool order; it holds
    the record it may still extend and says where that record starts (`held_start`).
    The `starts` it is given are sequence numbers (the k-th record read in this run is
    k): it only hands them back, never does arithmetic on them. A sequence number
    becomes a spool position only when a chunk needs one: `step`, `release_due` and
    `flush` return the released records with the position just before the first line
    of the record still held (the end of what was read if none is): committing it
    never skips a line of a held record, so a crash reads that record again whole.

    The reader gives the position after a batch, not one per record, so a held
    record's position is found (in a worker thread; the feed task awaits each call):

    * from the spool format (one record per line): the line starts are counted back
      from the batch's end in its segment's bytes, when the batch skipped no bad record
      and the held record is in the batch's last segment. The common case: the last
      line of a batch is held, as a traceback may still follow it;
    * else by reading the records again, from the last known position before the held
      record (`anchors`: every batch's end, and the last held record's position).
    """

    def __init__(
        self,
        grouper: Grouper,
        reader: SpoolReader,
        start: SpoolPosition,
        meta_of: Callable[[str], Mapping[str, Any] | None] | None,
        *,
        max_records: int = CHUNK_LINES,
    ) -> None:
        self.grouper = grouper
        self._reader = reader
        self._rereader = SpoolReader(reader.folder)  # its own counters: nothing counted twice
        self._meta_of = meta_of
        self._max_records = max_records
        self.end = start  # read up to here
        self._seq = 0  # sequence number of the next record read
        self._anchors: list[_Anchor] = [(0, start)]  # ascending; none before the held record
        self._batch: tuple[int, SpoolPosition] | None = None  # last batch read whole: base, start
        self.rereads = 0  # positions found by reading records again (the slow way)

    def step(self, until: SpoolPosition, now: float) -> tuple[Records, SpoolPosition] | None:
        """Read the next records up to `until` and feed them to the grouper: the records
        it released and the chunk's position; None if there was nothing to read."""
        reader = self._reader
        bad = reader.torn_records + reader.corrupt_records
        batch = reader.read(self.end, until, max_records=self._max_records)
        records = batch.records
        if not records and batch.position == self.end:
            return None
        clean = reader.torn_records + reader.corrupt_records == bad
        base, n = self._seq, len(records)
        self._batch = (base, self.end) if clean and n else None
        self._seq = base + n
        self.end = batch.position
        anchors = self._anchors
        if anchors[-1][0] == self._seq:
            anchors[-1] = (self._seq, self.end)  # no record since: the later is as good
        else:
            anchors.append((self._seq, self.end))
        meta_of = self._meta_of
        lines = Records(
            [r.data for r in records],
            range(base, base + n),
            [i for i, r in enumerate(records) if r.truncated],
            None if meta_of is None else [meta_of(r.stream) for r in records],
            [r.time for r in records],
        )
        return self.grouper.feed(lines, now), self._position()

    def next_due(self) -> float | None:
        """Monotonic time at which `release_due` releases the held record."""
        return self.grouper.next_due()

    def release_due(self, now: float) -> tuple[Records, SpoolPosition]:
        """The held record if no line came for the flush timeout (else nothing)."""
        return self.grouper.flush_due(now), self._position()

    def flush(self) -> tuple[Records, SpoolPosition]:
        """Everything held (the end): the position is then the end of what was read."""
        return self.grouper.flush(), self._position()

    def _position(self) -> SpoolPosition:
        held = self.grouper.held_start()
        if held is None:
            self._anchors = [(self._seq, self.end)]
            return self.end
        anchors = self._anchors
        k = len(anchors) - 1
        while anchors[k][0] > held:  # anchors[0] is at or before any held record
            k -= 1
        seq, pos = anchors[k]
        if seq < held:
            pos = self._locate(held, seq, pos)
        self._anchors = [(held, pos), *anchors[k + 1 :]]
        return pos

    def _locate(self, held: int, seq: int, pos: SpoolPosition) -> SpoolPosition:
        """The position before record `held`, knowing `pos` is before record `seq`."""
        batch = self._batch
        if batch is not None and held > batch[0]:  # in the last batch, not its first
            start, end = batch[1], self.end
            floor = start.byte if start.segment == end.segment else 0
            byte = _line_start_back(self._reader.folder, end, self._seq - held, floor)
            if byte is not None:
                return SpoolPosition(end.segment, byte)
        self.rereads += 1
        again = self._rereader.read(pos, self.end, max_records=held - seq, max_bytes=1 << 62)
        if len(again.records) == held - seq:
            return again.position
        # Not the records read before (cannot happen while we are the only reader of
        # what is not committed): the earlier position repeats lines after a crash
        # rather than lose the held ones.
        log.warning(
            "spool %s: cannot find record %d again after %s; a crash now would forward "
            "%d lines twice",
            self._reader.folder,
            held,
            pos,
            held - seq,
            extra={"component": COMPONENT},
        )
        return pos


def _line_start_back(folder: Path, end: SpoolPosition, count: int, floor: int) -> int | None:
    """Where the `count`-th line before `end` starts in end's segment (a record is one
    line), or None unless all `count` lines end at or after `floor` and the last one
    ends at `end`. `floor` must be a line start (a batch's start, or 0)."""
    size = end.byte - floor
    if count < 1 or size <= 0:
        return None
    try:
        fd = os.open(segment_path(folder, end.segment), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.pread(fd, size, floor)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) != size:
        return None
    i = size - 1  # the newline that ends the last line
    for _ in range(count):
        if i < 0 or data[i] != 0x0A:
            return None
        i = data.rfind(b"\n", 0, i)  # the newline before that line, -1: floor
    return floor + i + 1


class SpoolFeeder:
    """Reads one spool from `start` into RawChunks of `source`, following its writer.

    `meta_of(stream)` is the transport meta of a record of that stream (None: none);
    without it, the chunks carry none. Without `committed`, committed segments are
    deleted only by `acknowledge` (and by the next start), or by a `follow_commits`
    of the caller's.
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
        self._meta_of = meta_of
        self._max_records = max_records
        self.fed_to = start  # the last chunk's position (never past a held record)
        self._acked_to: SpoolPosition | None = None
        self._appended = asyncio.Event()
        self._room_wanted = asyncio.Event()
        self._wanting_room = False
        self._finished = False
        # Set while `feed` has fed everything appended and waits for more.
        self.caught_up = asyncio.Event()
        self.records_fed = 0

    # -- the writer side --

    def appended(self) -> None:
        """The writer's position moved."""
        self._appended.set()

    def finish(self) -> None:
        """No more appends: `feed` returns once everything appended is fed."""
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
        """`feed`, and with `committed`, `follow_commits` while feeding."""
        async with asyncio.TaskGroup() as tg:
            feeding = tg.create_task(self.feed(out), name=f"{self.source}.feed")
            if self._committed is not None:
                tg.create_task(
                    self.follow_commits(feeding, self._committed), name=f"{self.source}.ack"
                )

    async def acknowledge(self, position: SpoolPosition) -> None:
        """Delete the segments entirely before `position` (it must be committed)."""
        self._acked_to = position
        await asyncio.to_thread(self.writer.acknowledge, position)

    async def feed(self, out: asyncio.Queue[RawChunk | Marker]) -> None:
        """Feed from `fed_to`, following the writer, until `finish` and everything
        appended is fed (the held record included)."""
        clock, writer = self._clock, self.writer
        records = SpoolGrouping(
            self._grouper,
            self.reader,
            self.fed_to,
            self._meta_of,
            max_records=self._max_records,
        )
        while True:
            self._appended.clear()
            self.caught_up.clear()
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
                self.caught_up.set()
                await self._appended.wait()
                continue
            wait_s = due - clock.monotonic()
            if wait_s <= 0:  # no line for the flush timeout: release the held record
                now = clock.monotonic()
                await self._put(out, *await asyncio.to_thread(records.release_due, now))
                continue
            self.caught_up.set()
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
                # a grouped record's meta: its first line's, and "multiline" (its line
                # count), which makes normalize parse it as one record
                line_meta=records.metas,
                times=records.times,
            )
        )
        self.fed_to = position
        self.records_fed += len(records)

    async def follow_commits(
        self,
        running: asyncio.Future[Any],
        committed: CommittedReader,
        *,
        interval_s: float = ACK_INTERVAL_S,
        new_commits: Callable[[], bool] | None = None,
    ) -> None:
        """While `running` runs: delete the spool segments `committed` says are.

        It is read every `interval_s` (every ROOM_POLL_S while the writer wants room)
        when `new_commits()` says the committed position may have moved; by default,
        when something fed is not acknowledged yet.
        """
        while not running.done():
            wanted = asyncio.ensure_future(self._room_wanted.wait())
            try:
                await asyncio.wait(
                    [running, wanted],
                    timeout=ROOM_POLL_S if self._wanting_room else interval_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                wanted.cancel()
            self._room_wanted.clear()
            if new_commits is not None:
                if not new_commits():
                    continue
            elif self._acked_to is not None and self._acked_to >= self.fed_to:
                continue
            try:
                async with asyncio.timeout(ACK_TIMEOUT_S):
                    checkpoints = await committed()
            except Exception as e:  # the database is down: the segments wait
                log.debug(
                    "cannot read the committed position of %s: %s",
                    self.source,
                    type(e).__name__,
                    extra={"component": COMPONENT, "source": self.source},
                )
                continue
            position = from_checkpoint(checkpoints.get(CHECKPOINT_STREAM), self.writer.spool_id)
            if position is not None:
                await self.acknowledge(position)
