"""Standard input as a daemon source: `some_app | forwarder run`, and backfills from a pipe.

`zcat old.log.gz | forwarder run --config backfill.toml --exit-on-eof` reads to the end
of its input, commits everything and exits 0; without --exit-on-eof the source idles
at the end of its input until the daemon stops. One stdin source at most (config.py).

A pipe cannot be read again, so every line goes through a disk spool first
(`sinks/spool.py`, data_dir/spool/stdin-<name>), like the HTTP intake's:

    fd 0 -> StdinReader -> LineSplitter -> SpoolWriter.append (worker thread, one fsync
    per read) -> SpoolFeeder (sources/spooled.py: framing by `format`, multiline
    grouping, chunks carrying the spool position) -> raw queue -> ... -> the sink
    commits the rows and the spool checkpoint in one transaction.

A line is appended as soon as it is read, so a kill -9 loses nothing that was read and
appended: the next start replays the spool from the committed checkpoint (a record torn
by the kill is skipped and counted). Committed segments are deleted while running, and
all of them once the end of the input is committed.

Back-pressure: when the spool is full (the database is behind), standard input is not
read until commits make room: the pipe fills and the program writing into it blocks.
That is the right behaviour for a daemon source; `forwarder pipe`, which must never
block the program it wraps, drops instead (pipe.py).

Reading: a pipe, a socket or a terminal through the event loop (`connect_read_pipe` on
a duplicate of the descriptor, paused while what it received is not spooled); anything
the loop cannot poll (a regular file, `< old.log`, or /dev/null) by reads in a worker
thread. A closed descriptor is an input at its end. A line without its newline at the
end of the input is a line; so is the unfinished line when the source stops (a SIGHUP
that changes this source's config can therefore split a line being written).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from forwarder.clock import Clock
from forwarder.config import StdinSourceConfig
from forwarder.event import Position, RawChunk
from forwarder.pipeline.multiline import build_grouper
from forwarder.pipeline.stage import Marker, first_of, flush_through
from forwarder.sinks.spool import (
    FsyncMode,
    SpoolFull,
    SpoolRecord,
)
from forwarder.sources.file import WRAPPER_LINE_BYTES, LineSplitter
from forwarder.sources.framing import build_framer
from forwarder.sources.spooled import (
    CommittedReader,
    FramedGrouper,
    SpoolFeeder,
    append_durably,
    open_spool,
    resume_position,
)

__all__ = ["StdinReader", "StdinSource", "spool_folder"]

log = logging.getLogger(__name__)

COMPONENT = "source.stdin"
STREAM: Final = "stdin"  # SpoolRecord.stream of every record
READ_BYTES: Final = 256 * 1024  # one read of a regular file
BUFFER_BYTES: Final = 256 * 1024  # received from a pipe and not yet spooled: then it pauses
APPEND_BYTES: Final = 1024 * 1024  # lines per spool append (one fsync), at most about
RECORD_OVERHEAD_BYTES: Final = 64  # what a spool record costs beyond its line, about


def spool_folder(data_dir: Path, source_name: str) -> Path:
    return data_dir / "spool" / f"stdin-{source_name}"


# --- reading the descriptor -------------------------------------------------------------------


class _Received(asyncio.Protocol):
    """What the loop read from a pipe, until taken; reading pauses over `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._transport: asyncio.ReadTransport | None = None
        self._paused = False
        self._stopped = False  # paused for good: the source is stopping
        self.ready = asyncio.Event()  # data, the end, or an error arrived
        self.eof = False
        self.error: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self.ready.set()
        if len(self._buffer) >= self._limit and not self._paused:
            self._pause()

    def eof_received(self) -> bool:
        self.eof = True
        self.ready.set()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self.ready.set()

    def take(self) -> bytes:
        """Everything received so far; reading resumes."""
        data = bytes(self._buffer)
        self._buffer.clear()
        self.ready.clear()
        if self._paused and not self.eof and not self._stopped:
            self._paused = False
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()
        return data

    def stop_reading(self) -> None:
        self._stopped = True
        if not self._paused and not self.eof:
            self._pause()

    def _pause(self) -> None:
        self._paused = True
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()


class StdinReader:
    """One descriptor (standard input) read without blocking the event loop.

    `kind` says how: "pipe" (a pipe or socket) and "terminal" through the loop, "file"
    (a regular file) and "device" (/dev/null and other devices the loop cannot poll) by
    reads in a worker thread, "closed" (no descriptor: at its end at once). A device
    that blocks forever on read (rare: a serial line) would keep that thread waiting.
    """

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.kind = "closed"
        self.size: int | None = None  # a regular file's size, for a backfill's progress
        self._dup: int | None = None
        self._reads: concurrent.futures.ThreadPoolExecutor | None = None  # files, devices
        self._read: concurrent.futures.Future[bytes] | None = None  # the read in flight
        self._received: _Received | None = None
        self._transport: asyncio.ReadTransport | None = None
        self._restore: tuple[int, int] | None = None  # (dev, ino) whose blocking mode we set
        self._eof = False

    async def open(self) -> None:
        try:
            st = os.fstat(self.fd)
            dup = os.dup(self.fd)
        except OSError:
            self._eof = True  # started with standard input closed
            return
        self._dup = dup  # not inheritable: a child process never holds our stdin
        mode = st.st_mode
        tty = os.isatty(dup)
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or tty:
            self.kind = "terminal" if tty else "pipe"
            if os.get_blocking(dup):  # the mode belongs to the open file, shared with fd 0
                self._restore = (st.st_dev, st.st_ino)
            received = _Received(BUFFER_BYTES)
            loop = asyncio.get_running_loop()
            pipe = os.fdopen(dup, "rb", buffering=0)
            self._dup = None  # the transport owns it now (it closes it)
            try:
                transport, _ = await loop.connect_read_pipe(lambda: received, pipe)
            except BaseException:
                pipe.close()
                raise
            self._received, self._transport = received, transport
            return
        self.kind = "file" if stat.S_ISREG(mode) else "device"
        if self.kind == "file":
            self.size = st.st_size
        self._reads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stdin")

    async def read(self, stop: asyncio.Event) -> bytes | None:
        """The next bytes; b"" at the end of the input; None once `stop` is set (then
        `rest` has what was received but not returned)."""
        received = self._received
        while True:
            if stop.is_set():
                return None
            if self._eof:
                return b""
            if received is None:
                assert self._dup is not None and self._reads is not None
                # A regular file (or /dev/null) answers at once: stop is checked between.
                self._read = self._reads.submit(os.read, self._dup, READ_BYTES)
                try:
                    data = await asyncio.wrap_future(self._read)
                except OSError as e:
                    log.warning(
                        "cannot read standard input (%s): taken as its end",
                        e.strerror,
                        extra={"component": COMPONENT},
                    )
                    data = b""
                if not data:
                    self._eof = True
                return data
            data = received.take()
            if data:
                return data
            if received.eof:
                self._eof = True
                if received.error is not None:
                    log.warning(
                        "standard input failed (%s): taken as its end",
                        received.error,
                        extra={"component": COMPONENT},
                    )
                continue
            await first_of(received.ready.wait(), stop.wait())

    def rest(self) -> bytes:
        """On stop: what was received and not yet returned; nothing more is read."""
        if self._received is None:
            return b""
        self._received.stop_reading()
        return self._received.take()

    @property
    def at_end(self) -> bool:
        return self._eof

    def close(self) -> None:
        """Idempotent. Puts the descriptor back in blocking mode if it was (the mode is
        shared with whoever else holds standard input: a shell, for a terminal)."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._dup is not None:
            dup, self._dup = self._dup, None
            if self._read is not None and not self._read.done():
                # Cancelled mid-read: the thread still reads it; close it after that.
                self._read.add_done_callback(lambda _: _close_quietly(dup))
            else:
                _close_quietly(dup)
        if self._reads is not None:
            self._reads.shutdown(wait=False)
            self._reads = None
        restore, self._restore = self._restore, None
        if restore is not None:
            with contextlib.suppress(OSError):
                st = os.fstat(self.fd)
                if (st.st_dev, st.st_ino) == restore:  # still the same file
                    os.set_blocking(self.fd, True)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


# --- the source -------------------------------------------------------------------------------


class StdinSource:
    """Standard input -> the spool -> the pipeline (a `Source`).

    `checkpoints` are the committed positions of `config.name` (the sink's
    `load_checkpoints`): feeding resumes there, replaying what an earlier run read and
    did not commit. `committed` (the same read, again) lets committed spool segments
    be deleted while running.
    """

    def __init__(
        self,
        config: StdinSourceConfig,
        data_dir: Path,
        clock: Clock,
        checkpoints: Mapping[str, Position] | None = None,
        *,
        exit_on_eof: bool = False,
        committed: CommittedReader | None = None,
        fd: int = 0,
        fsync: FsyncMode = "batch",
        segment_bytes: int | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.service = config.service
        self._clock = clock
        self._exit_on_eof = exit_on_eof
        self._log_extra = {"component": COMPONENT, "source": config.name}
        self.folder = spool_folder(data_dir, config.name)
        self.writer = open_spool(self.folder, config.spool_max_bytes, fsync, segment_bytes)
        self._start = resume_position(checkpoints or {}, self.writer)
        framer = build_framer(
            config.format, config.max_line_bytes, config.multiline.flush_timeout_s
        )
        self._records = FramedGrouper(framer, build_grouper(config.multiline))
        self.feeder = SpoolFeeder(
            config.name,
            config.service,
            self.writer,
            self._records,
            self._start,
            clock,
            committed=committed,
        )
        self.input = StdinReader(fd)
        # Docker and CRI wrapper lines are split as the file source splits them.
        self._split_bytes = (
            config.max_line_bytes
            if config.format == "raw"
            else max(config.max_line_bytes, WRAPPER_LINE_BYTES)
        )
        self._append_bytes = max(1, min(APPEND_BYTES, config.spool_max_bytes // 8))
        self._stop: asyncio.Event | None = None
        self._state = "starting"
        self._full = False  # an append waits for room
        self._holding = 0  # lines read, not yet in the spool
        self._warned_disk = False
        # counters
        self.bytes_read = 0
        self.lines_read = 0
        self.lines_spooled = 0
        self.lines_truncated = 0
        self.lines_too_large = 0
        self.spool_full = 0  # times the spool was full (reading paused)

    def __repr__(self) -> str:
        return f"StdinSource({self.name!r})"

    # -- the Source --

    async def run(self, out: asyncio.Queue[RawChunk | Marker], stop: asyncio.Event) -> None:
        """Spool standard input and feed the spool into `out`; at the end of the input,
        wait until what was fed is committed and empty the spool, then return (with
        exit_on_eof) or idle until `stop`. After `stop`: what was received is spooled
        and fed, then it returns (the runtime ends the stream)."""
        self._stop = stop
        try:
            await asyncio.to_thread(self.writer.acknowledge, self._start)
            await self.input.open()
            log.debug(
                "reading standard input (%s) into %s",
                self.input.kind,
                self.folder,
                extra=self._log_extra,
            )
            self._state = "ok"
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read(stop), name=f"{self.name}.read")
                tg.create_task(self._feed(out, stop), name=f"{self.name}.feed")
        finally:
            self._state = "stopped"
            self.close()

    def status(self) -> dict[str, Any]:
        state, reason = self._state, None
        used, limit = self.writer.used_bytes, self.writer.max_bytes
        if state == "ok" and self._stop is not None and self._stop.is_set():
            state = "stopping"
        elif state == "ok" and (self._full or used >= limit * 0.9):
            state = "degraded"
            reason = f"spool {used} of {limit} bytes: the database is behind" + (
                "; standard input is not read until commits make room" if self._full else ""
            )
        reader = self.feeder.reader
        return {
            "state": state,
            "reason": reason,
            "service": self.service,
            "input": self.input.kind,
            "at_end": self.input.at_end,
            "spool": str(self.folder),
            "spool_bytes": used,
            "spool_max_bytes": limit,
            "lag_bytes": self.feeder.unfed_bytes,
            "bytes_read": self.bytes_read,
            "lines_read": self.lines_read,
            "lines_spooled": self.lines_spooled,
            "lines_fed": self.feeder.records_fed,
            "lines_truncated": self.lines_truncated,
            "lines_too_large": self.lines_too_large,
            "spool_full": self.spool_full,
            "torn_records": reader.torn_records,
            "corrupt_records": reader.corrupt_records,
            "decode_errors": self._records.errors,
        }

    def progress(self) -> tuple[int, int]:
        """(bytes read, bytes known in total): a file's size, else what was read."""
        return self.bytes_read, max(self.bytes_read, self.input.size or 0)

    def close(self) -> None:
        """Release standard input and the spool folder. Idempotent."""
        self.input.close()
        self.writer.close()

    # -- standard input -> the spool --

    async def _read(self, stop: asyncio.Event) -> None:
        splitter = LineSplitter(self._split_bytes)
        try:
            while True:
                data = await self.input.read(stop)
                final = data is None or not data
                if data is None:
                    data = self.input.rest()
                self.bytes_read += len(data)
                lines, cut = splitter.feed(data) if data else ([], [])
                if final:
                    last = splitter.flush()  # an unfinished line is a line at the end
                    if last is not None:
                        if last[1]:
                            cut.append(len(lines))
                        lines.append(last[0])
                if lines:
                    await self._spool(lines, cut)
                if final:
                    break
            if self.input.at_end:
                await asyncio.to_thread(self.writer.seal)  # so its last segment can go too
                log.info(
                    "standard input ended after %d lines (%d bytes)%s",
                    self.lines_read,
                    self.bytes_read,
                    "" if self._exit_on_eof else "; the source idles until the daemon stops",
                    extra={**self._log_extra, "event": "stdin.eof"},
                )
        finally:
            if self._holding:  # cancelled (a forced exit) while the spool had no room
                log.warning(
                    "%d lines read from standard input were not spooled (the spool was full "
                    "or failing)",
                    self._holding,
                    extra={**self._log_extra, "event": "stdin.lines_lost"},
                )
            self.feeder.finish()

    async def _spool(self, lines: list[bytes], cut: list[int]) -> None:
        now = self._clock.now()
        cut_set = set(cut)
        self.lines_read += len(lines)
        self.lines_truncated += len(cut)
        self._holding = len(lines)
        batch: list[SpoolRecord] = []
        size = 0
        for i, line in enumerate(lines):
            batch.append(SpoolRecord(now, STREAM, line, i in cut_set))
            size += len(line) + RECORD_OVERHEAD_BYTES
            if size >= self._append_bytes:
                await self._append(batch)
                batch, size = [], 0
        if batch:
            await self._append(batch)

    async def _append(self, records: list[SpoolRecord]) -> None:
        """Append durably; while the spool is full, wait (standard input is not read)."""
        await append_durably(
            self.writer,
            records,
            appended=self._spooled,
            full=self._spool_is_full,
            failed=self._spool_failed,
            too_large=self._too_large,
        )

    def _spool_is_full(self, e: SpoolFull) -> None:
        if not self._full:
            self._full = True
            self.spool_full += 1
            log.warning(
                "the spool %s is full (%d bytes): standard input is not read until "
                "the database catches up",
                self.folder,
                e.max_bytes,
                extra={**self._log_extra, "event": "stdin.spool_full"},
            )
        self.feeder.want_room()

    def _spool_failed(self, e: OSError) -> None:
        if not self._warned_disk:
            self._warned_disk = True
            log.error(
                "cannot write to the spool %s (%s); retrying",
                self.folder,
                e.strerror,
                extra=self._log_extra,
            )

    def _too_large(self) -> None:
        self.lines_too_large += 1  # cannot happen within max_line_bytes' bound
        self._holding -= 1

    def _spooled(self, n: int) -> None:
        if self._full:
            self._full = False
            self.feeder.want_room(False)
            log.info("the spool has room again", extra=self._log_extra)
        self._warned_disk = False
        self.lines_spooled += n
        self._holding -= n
        self.feeder.appended()

    # -- the spool -> the pipeline --

    async def _feed(self, out: asyncio.Queue[RawChunk | Marker], stop: asyncio.Event) -> None:
        await self.feeder.run(out)
        if not self.input.at_end:
            return  # stopped: the drain commits what was fed; the next start deletes it
        if self.feeder.fed_to != self._start:
            # The end of the input: once what was fed is committed, empty the spool.
            if await flush_through(out, stop):
                await self.feeder.acknowledge(self.feeder.fed_to)
        if not self._exit_on_eof:
            await stop.wait()
