"""Tail log files: glob, follow by identity (dev:ino), rotation, truncation, long lines.

The pure part is `LineSplitter` (bytes in, complete lines out, bounded memory). The
async part is `FileSource.run`: every round it reads at most `read_budget_bytes` from
each tracked file with `os.pread` on an fd it holds and puts one `RawChunk` per read on
the output queue (awaiting `put` is the backpressure). A chunk's position is the byte
just after its last complete line, so committing it with the rows is exact.

Files are tracked by identity with an open fd, not by path: when a path names another
file (rename + create), the old file is kept and read to its end until it has not grown
for `rotate_wait_s` (or it was deleted), and the new file is read from its head.
A file rotated while the forwarder was down is found again at the first scan: each
checkpoint whose file no watched path names any more is looked up by inode in the
directory it was read in, and read from its committed offset to its end.

A file truncated and written again past the read offset between two polls (copytruncate)
is noticed because its first bytes no longer match its fingerprint (checked at most once
per `glob_interval_s`). The forwarder's own output (`ignore_identities`) is never read.

Records: each file's lines go through its own framer (`sources.framing`, by `format`:
raw, docker json-file, CRI) and grouper (`pipeline.multiline`: Python tracebacks or
custom patterns); with format "raw" and multiline "off" lines go straight to chunks.
Either stage may hold a record that is not complete yet (a docker piece waiting for
the rest of its line, a line a traceback may still join). A chunk's position then
stops at the first byte of the oldest held record, so a restart reads it again whole:
exactly once also across kill -9. A held record is released after
`multiline.flush_timeout_s` without a line (the idle wait wakes up for it), at the end
of the file with `exit_on_eof`, when a rotated file is closed, and when the file is
truncated (then with the next chunk of the new content). `describe(path)` names the
service and meta of each file (the docker source's containers).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import gzip
import hashlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from forwarder.clock import Clock
from forwarder.config import FileSourceConfig
from forwarder.event import Position, RawChunk
from forwarder.pipeline.multiline import build_grouper
from forwarder.sources.framing import Records, build_framer
from forwarder.sources.rotations import chain_of, list_copies
from forwarder.sources.spooled import FramedGrouper
from forwarder.sources.watch import FolderWatcher

log = logging.getLogger(__name__)

COMPONENT = "source.file"
# Identities of files closed after rotate_wait, remembered so that a file that shows up
# again under a watched path resumes instead of being read twice. Bounded, oldest first out.
MAX_REMEMBERED = 4096
# Docker and CRI wrapper lines are split into lines of their own at this size at least,
# whatever max_line_bytes is: a runtime writes at most 16 KiB of log per wrapper line,
# up to six times that once JSON-escaped; max_line_bytes then bounds the joined record.
WRAPPER_LINE_BYTES = 128 * 1024
# Seconds a stopping source waits for a walk in flight (it stops at its next entry).
WALK_STOP_WAIT_S = 1.0
# Directory entries one scan examines at most, over all the globs of a source: a glob
# over a huge tree must not keep a worker thread and memory busy without bound. A scan
# stops there (logged, counted in scans_capped); files beyond it are not found.
MAX_SCAN_ENTRIES = 100_000
SYMLINK_SKIPPED = "skipping %s: a symlink; set follow_symlinks = true to read it"


@dataclass(frozen=True)
class FileTarget:
    """What a tailed file is: the service its rows are written as, and facts about it
    (container id, name, ...) carried as `RawChunk.meta` on every chunk of the file."""

    service: str
    meta: Mapping[str, Any] = field(default_factory=dict)


class LineSplitter:
    """Bytes in, complete lines out; holds at most `max_line_bytes + 1` bytes of a partial line.

    `feed(data)` returns `(lines, truncated)`: the lines completed by `data` (without the
    `\\n`, and without one `\\r` before it) and the indices of those cut at
    `max_line_bytes`. Of a line longer than that, only the first `max_line_bytes` are
    kept; the rest up to its newline is dropped as it arrives, never buffered.
    `pending_bytes` is how many bytes fed since the last newline are not yet part of a
    line: the caller's read offset minus it is the offset just after the last line.
    """

    __slots__ = ("_cut", "_max", "_skip", "_tail", "pending_bytes")

    def __init__(self, max_line_bytes: int, *, skip_first_line: bool = False) -> None:
        if max_line_bytes < 1:
            raise ValueError("max_line_bytes must be at least 1")
        self._max = max_line_bytes
        self._tail = bytearray()  # start of the unfinished line (<= max + 1 bytes)
        self._cut = False  # the unfinished line is over max: _tail is its kept prefix
        self._skip = skip_first_line  # drop everything up to the next newline, emit nothing
        self.pending_bytes = 0

    @property
    def skipping(self) -> bool:
        """Whether the bytes up to the next newline are dropped (read_from tail)."""
        return self._skip

    @property
    def held_bytes(self) -> int:
        """Bytes of the unfinished line held in memory (at most max_line_bytes + 1)."""
        return len(self._tail)

    def reset(self) -> None:
        """Forget the unfinished line (the file was truncated)."""
        self._tail = bytearray()
        self._cut = False
        self._skip = False
        self.pending_bytes = 0

    def feed(self, data: bytes) -> tuple[list[bytes], list[int]]:
        first_nl = data.find(b"\n")
        if first_nl < 0:
            self._hold(data, 0)
            self.pending_bytes += len(data)
            return [], []
        lines: list[bytes] = []
        truncated: list[int] = []
        # 1. The line that was pending before this data (or starts it).
        if self._skip:
            self._skip = False
        else:
            line, cut = self._complete(data, first_nl)
            if cut:
                truncated.append(0)
            lines.append(line)
        self._tail = bytearray()
        self._cut = False
        # 2. Every whole line between the first and the last newline: one split.
        last_nl = data.rfind(b"\n")
        if last_nl > first_nl:
            middle = data[first_nl + 1 : last_nl + 1]
            if b"\r" in middle:
                middle = middle.replace(b"\r\n", b"\n")
            parts = middle.split(b"\n")
            parts.pop()  # the empty string after the final newline
            if len(middle) > self._max + 1 and max(map(len, parts)) > self._max:
                base = len(lines)
                for i, part in enumerate(parts):
                    if len(part) > self._max:
                        parts[i] = part[: self._max]
                        truncated.append(base + i)
            lines.extend(parts)
        # 3. The unfinished rest.
        self._hold(data, last_nl + 1)
        self.pending_bytes = len(data) - last_nl - 1
        return lines, truncated

    def flush(self) -> tuple[bytes, bool] | None:
        """End of input: the unfinished line as if a newline followed, or None."""
        if self._skip or self.pending_bytes == 0:
            self.reset()
            return None
        line = bytes(self._tail)
        cut = self._cut
        if not cut:
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self._max:
                line, cut = line[: self._max], True
        self.reset()
        return line, cut

    def _complete(self, data: bytes, nl: int) -> tuple[bytes, bool]:
        """The held start of a line plus data[:nl]: the line and whether it was cut."""
        if self._cut:
            return bytes(self._tail), True
        held = len(self._tail)
        if held + nl <= self._max + 1:  # + 1: room for a \r that is stripped
            line = bytes(self._tail) + data[:nl] if held else data[:nl]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self._max:
                return line[: self._max], True
            return line, False
        if held >= self._max:
            return bytes(self._tail[: self._max]), True
        return bytes(self._tail) + data[: self._max - held], True

    def _hold(self, data: bytes, start: int) -> None:
        """Keep data[start:] (no newline in it) as the start of the unfinished line."""
        if self._skip or self._cut:
            return
        size = len(data) - start
        held = len(self._tail)
        if held + size <= self._max + 1:
            self._tail += data[start:] if start else data
            return
        # Over the limit even without a final \r: keep the first max bytes, drop the rest.
        if held < self._max:
            self._tail += data[start : start + self._max - held]
        else:
            del self._tail[self._max :]
        self._cut = True


class _LineStarts(Sequence[int]):
    """File offsets where the lines completed by one read start, computed on demand.

    Line 0 starts at `first` (before this read when it completes a held partial line);
    every later line starts after a newline in `data`, read at file offset `base`.
    """

    __slots__ = ("_all", "_base", "_data", "_first", "_n", "_skip")

    def __init__(self, data: bytes, base: int, first: int, n: int, skip: bool) -> None:
        self._data = data
        self._base = base
        self._first = first
        self._n = n
        self._skip = skip  # the first newline of data ended a skipped line
        self._all: list[int] | None = None

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[int]: ...
    def __getitem__(self, i: int | slice) -> int | Sequence[int]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._n))]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        if i == 0:
            return self._first
        if self._all is None:
            if i == self._n - 1:  # the common question: where the last line starts
                data = self._data
                return self._base + data.rfind(b"\n", 0, data.rfind(b"\n")) + 1
            self._all = self._compute()
        return self._all[i]

    def _compute(self) -> list[int]:
        base, find = self._base, self._data.find
        starts = [self._first]
        nl = find(b"\n")  # the newline that ends line 0 (or the skipped line)
        if self._skip:
            nl = find(b"\n", nl + 1)
        for _ in range(self._n - 1):
            starts.append(base + nl + 1)
            nl = find(b"\n", nl + 1)
        return starts


@dataclass(eq=False)
class _TrackedFile:
    key: str  # f"{st_dev}:{st_ino}"
    path: str
    fd: int
    offset: int  # bytes consumed (read offset)
    size: int
    splitter: LineSplitter
    last_growth: float
    rotated: bool = False  # no watched path names this file any more
    deleted: bool = False
    fp: str = ""
    fp_len: int = -1  # -1: not computed yet
    fp_checked: float = float("-inf")  # monotonic time the head was last compared with fp
    read_error: bool = False
    target: FileTarget | None = None  # None: the source's own service, no meta
    records: FramedGrouper | None = None  # None: raw lines, no grouping (the fast path)
    carry: Records | None = None  # released when the file was truncated, not yet emitted
    chain: str | None = None  # with rotations: the written file this is (or was, a copy of)


class FileSource:
    """Tails the files matched by `config.paths`; resumes from committed positions."""

    def __init__(
        self,
        config: FileSourceConfig,
        checkpoints: Mapping[str, Position],
        clock: Clock,
        *,
        exit_on_eof: bool = False,
        ignore_identities: frozenset[tuple[int, int]] = frozenset(),
        describe: Callable[[str], FileTarget | None] | None = None,
        rotations: bool = False,
    ) -> None:
        """`ignore_identities`: (st_dev, st_ino) of files never to read, such as the
        forwarder's own stderr (see `own_output_identities`).

        `rotations`: the numbered copies of every matched file (`x.log.1` ... `x.log.N`,
        `sources.rotations`) are read too, oldest first, before the file itself, so a
        copy created and rotated away between two scans is not missed (dockerd's
        json-file logs). Copies that existed before the first start are the file's
        history: read with read_from = "head", skipped with "tail"; a copy newer than
        one read before (rotated while the forwarder was down) is always read.

        `describe(path)` is called before a matched path is opened (again at every scan
        while it is not tracked; a file recovered after a rotation while down is passed
        under its rotated name): None skips the file; a `FileTarget` gives the service
        and the meta of every chunk read from it. Without it, every file is the
        configured service with no meta."""
        self.name = config.name  # the source's name, for status
        self._config = config
        self._describe = describe
        self._undescribed: set[str] = set()  # paths describe() skipped, logged once
        self._clock = clock
        self._exit_on_eof = exit_on_eof
        self._ignore = ignore_identities
        # stream key -> Position to verify and resume from; each is used at most once
        # (an inode can be reused after its file was deleted).
        self._resume: dict[str, Position] = dict(checkpoints)
        self._files: dict[str, _TrackedFile] = {}
        self._rotations = rotations
        # Written files of which some file was read before (a checkpoint names it or a
        # copy of it): their copies on disk at start are not history to skip.
        self._chains_read = {
            chain_of(cp.detail["path"])
            for cp in checkpoints.values()
            if rotations and cp.source == config.name and isinstance(cp.detail.get("path"), str)
        }
        # Identities not to open again while (size, mtime) is unchanged: copies read to
        # their end and closed, history skipped. Bounded, oldest first out.
        self._unchanged: dict[str, tuple[int, int]] = {}
        self._finished_fps: dict[tuple[str, int], int] = {}  # (fp, fp_len) -> final offset
        self._opened_paths: dict[str, None] = {}  # recently opened or skipped (bounded)
        self._watcher: FolderWatcher | None = None
        self._watch_asked: set[str] = set()  # folders the last scan asked to watch
        self._walking: asyncio.Future[Discovery] | None = None  # the walk in its thread
        self._abort = threading.Event()  # set when run ends: a walk in flight stops
        self._rescan = False  # scan again as soon as the walk in flight (if any) is done
        # O_NOFOLLOW: a matched file swapped for a symlink after the walk is not opened.
        self._open_flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
        if not config.follow_symlinks:
            self._open_flags |= os.O_NOFOLLOW
        self._warned: set[tuple[str, str]] = set()
        self._log_extra = {"component": COMPONENT, "source": config.name}
        self._state = "starting"
        self._scans = 0
        self.lines_read = 0
        self.bytes_read = 0
        self.lines_truncated = 0
        self.truncations_detected = 0
        self.rotations_detected = 0
        self.rotated_copies_opened = 0
        self.history_copies_skipped = 0
        self.compressed_copies_unread = 0
        self.files_missed = 0
        self.decode_errors = 0
        self.symlinks_skipped = 0
        self.symlink_loops = 0
        self.scans_capped = 0
        self.scan_entries = 0  # examined by the last scan
        cfg = config
        self._framed = cfg.format != "raw" or cfg.multiline.mode != "off"
        self._split_bytes = (
            cfg.max_line_bytes
            if cfg.format == "raw"
            else max(cfg.max_line_bytes, WRAPPER_LINE_BYTES)
        )

    # -- reporting ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "state": self._state,
            "files": [
                {
                    "path": f.path,
                    "stream": f.key,
                    "offset": f.offset,
                    "size": f.size,
                    "rotated": f.rotated,
                }
                for f in self._files.values()
            ],
            "lines_read": self.lines_read,
            "bytes_read": self.bytes_read,
            "lines_truncated": self.lines_truncated,
            "truncations_detected": self.truncations_detected,
            "rotations_detected": self.rotations_detected,
            "rotated_copies_opened": self.rotated_copies_opened,
            "history_copies_skipped": self.history_copies_skipped,
            "compressed_copies_unread": self.compressed_copies_unread,
            "files_missed": self.files_missed,
            "decode_errors": self.decode_errors,
            "symlinks_skipped": self.symlinks_skipped,
            "symlink_loops": self.symlink_loops,
            "scans_capped": self.scans_capped,
            "scan_entries": self.scan_entries,
            "scanning": self._walking is not None,
            "scans": self._scans,
            "watched_folders": self._watcher.folders if self._watcher is not None else 0,
        }

    def progress(self) -> tuple[int, int]:
        """(bytes read so far, bytes read so far + bytes still unread in open files)."""
        remaining = sum(max(0, f.size - f.offset) for f in self._files.values())
        return self.bytes_read, self.bytes_read + remaining

    # -- the loop ----------------------------------------------------------------------

    async def run(self, out: asyncio.Queue[Any], stop: asyncio.Event) -> None:
        cfg = self._config
        watcher = self._watcher = None if self._exit_on_eof else FolderWatcher(self._log_extra)
        try:
            # The first scan is complete before anything is read ("ok" says it is done);
            # a backfill scans again while a file changed between its walk and opening.
            for _ in range(3):
                discovery = await self._walk(stop)
                if discovery is None:
                    return
                self._scan(discovery)
                if not (self._exit_on_eof and self._rescan):
                    break
                self._rescan = False
            self._state = "ok"
            next_scan = self._clock.monotonic() + cfg.glob_interval_s
            while not stop.is_set():
                if watcher is not None and watcher.take():
                    self._rescan = True
                walk = self._walking
                if walk is None and not self._exit_on_eof:
                    if self._rescan or self._clock.monotonic() >= next_scan:
                        self._rescan = False
                        self._start_walk()
                elif walk is not None and walk.done():
                    self._walking = None
                    self._scan(walk.result())
                    next_scan = self._clock.monotonic() + cfg.glob_interval_s
                had_data = False
                # Files are tracked in the order they were found, so the copies of one
                # written file come oldest first: a copy is read only once every older
                # copy is read to its end (rows in the order they were written).
                unfinished: set[str] = set()
                for f in list(self._files.values()):
                    if stop.is_set():
                        return
                    if f.chain is not None and f.chain in unfinished:
                        continue
                    chunk, got = self._read(f)
                    had_data = had_data or got
                    if not got:  # at its end: maybe done with it
                        if self._exit_on_eof:
                            chunk = self._finish(f)
                        elif f.rotated:
                            chunk = self._maybe_release(f)
                    if chunk is None and f.records is not None and f.key in self._files:
                        chunk = self._release_due(f)
                    if chunk is not None and not await self._emit(out, chunk, stop):
                        return
                    if f.chain is not None and f.key in self._files:
                        if got or not f.rotated or f.offset < f.size:
                            unfinished.add(f.chain)
                if self._exit_on_eof and not self._files:
                    return
                if had_data:
                    await asyncio.sleep(0)  # let the consumers run between rounds
                else:
                    await self._idle(stop, watcher)
        finally:
            self._abort.set()
            if self._walking is not None:  # stops at its next entry; not waited for long
                await asyncio.wait([self._walking], timeout=WALK_STOP_WAIT_S)
                self._walking = None
            for f in list(self._files.values()):
                self._close(f)
            if watcher is not None:
                watcher.close()
            self._state = "stopped"

    def _start_walk(self) -> asyncio.Future[Discovery]:
        """Walk the globs in a worker thread (`GlobWalk`): a huge or looping tree never
        blocks the loop. What it finds is applied on the loop (`_scan`)."""
        cfg = self._config
        walk = GlobWalk(
            cfg.paths,
            cfg.exclude,
            follow_symlinks=cfg.follow_symlinks,
            rotations=self._rotations,
            abort=self._abort,
            max_entries=MAX_SCAN_ENTRIES,
        )
        future = self._walking = asyncio.ensure_future(asyncio.to_thread(walk.run))
        # Retrieved here too, so a walk abandoned at stop never warns "never retrieved".
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    async def _walk(self, stop: asyncio.Event) -> Discovery | None:
        """A walk of the globs, waited for; None if stop came first."""
        walk = self._start_walk()
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((walk, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not walk.done():
            return None
        self._walking = None
        return walk.result()

    async def _idle(self, stop: asyncio.Event, watcher: FolderWatcher | None) -> None:
        """Until stop, a watched folder changes, a walk is done, or the idle wait is over."""
        changed = watcher.readable() if watcher is not None else None
        stopped = asyncio.ensure_future(stop.wait())
        waits: list[asyncio.Future[Any]] = [stopped] if changed is None else [stopped, changed]
        walk = [] if self._walking is None else [self._walking]  # waited for, not cancelled
        try:
            await asyncio.wait(
                [*waits, *walk], timeout=self._idle_wait(), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for w in waits:
                w.cancel()

    def _idle_wait(self) -> float:
        """poll_interval_s, or less when a held record is due sooner (by the clock)."""
        wait = self._config.poll_interval_s
        if not self._framed:
            return wait
        now = self._clock.monotonic()
        for f in self._files.values():
            due = f.records.next_due() if f.records is not None else None
            if f.carry is not None:
                due = now
            if due is not None and due - now < wait:
                wait = max(0.0, due - now)
        return wait

    async def _emit(self, out: asyncio.Queue[Any], chunk: RawChunk, stop: asyncio.Event) -> bool:
        """Put the chunk; False if stop came first while the queue was full (chunk dropped:
        its position was never committed, so its lines are read again after a restart)."""
        try:
            out.put_nowait(chunk)
        except asyncio.QueueFull:
            put = asyncio.ensure_future(out.put(chunk))
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait((put, stopped), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                if not put.done():
                    put.cancel()
            if not put.done() or put.cancelled():
                return False
        self.lines_read += len(chunk.lines)
        self.lines_truncated += len(chunk.truncated)
        return True

    # -- reading -----------------------------------------------------------------------

    def _read(self, f: _TrackedFile) -> tuple[RawChunk | None, bool]:
        """One read of at most read_budget_bytes: (chunk or None, whether bytes were read)."""
        try:
            st = os.fstat(f.fd)
            f.size = st.st_size
            f.deleted = st.st_nlink == 0
            if st.st_size < f.offset:
                self._truncated(f, f"size {f.size} < offset {f.offset}")
            elif st.st_size > f.offset and self._head_changed(f):
                self._truncated(f, "its first bytes no longer match its fingerprint")
            want = min(f.size - f.offset, self._config.read_budget_bytes)
            if want <= 0:
                return None, False
            base = f.offset
            data = os.pread(f.fd, want, base)
        except OSError as e:
            if not f.read_error:
                f.read_error = True
                log.warning("cannot read %s: %s", f.path, e.strerror, extra=self._log_extra)
            return None, False
        f.read_error = False
        if not data:
            return None, False
        f.offset += len(data)
        self.bytes_read += len(data)
        now = f.last_growth = self._clock.monotonic()
        splitter = f.splitter
        records = f.records
        if records is None:
            lines, truncated = splitter.feed(data)
            if not lines:
                return None, True
            return self._chunk(f, lines, truncated, f.offset - splitter.pending_bytes), True
        first = base + data.find(b"\n") + 1 if splitter.skipping else base - splitter.pending_bytes
        skipping = splitter.skipping
        lines, truncated = splitter.feed(data)
        if not lines:
            return (self._records_chunk(f, None) if f.carry else None), True
        starts = _LineStarts(data, base, first, len(lines), skipping)
        out = records.feed(Records(lines, starts, truncated), now)
        return self._records_chunk(f, out), True

    def _release_due(self, f: _TrackedFile) -> RawChunk | None:
        """A chunk of the records f holds that are due (flush timeout), if any."""
        assert f.records is not None
        now = self._clock.monotonic()
        due = f.records.next_due()
        if due is not None and now >= due:
            return self._records_chunk(f, f.records.flush_due(now))
        return self._records_chunk(f, None) if f.carry is not None else None

    def _finish(self, f: _TrackedFile) -> RawChunk | None:
        """f is read to its end and done with: close it; a chunk of its unfinished line
        (and of every record still held)."""
        start = f.offset - f.splitter.pending_bytes
        rest = f.splitter.flush()
        chunk = None
        if f.records is not None:
            now = self._clock.monotonic()
            out = Records(starts=None)
            if rest is not None:
                line, cut = rest
                out.extend(f.records.feed(Records([line], [start], [0] if cut else []), now))
            out.extend(f.records.flush())
            chunk = self._records_chunk(f, out)
        elif rest is not None:
            line, cut = rest
            chunk = self._chunk(f, [line], [0] if cut else [], f.offset)
        self._close(f)
        return chunk

    def _records_chunk(self, f: _TrackedFile, out: Records | None) -> RawChunk | None:
        """A chunk of released records (after those carried over a truncation), or None.

        Its position is where the oldest record still held starts, else the end of
        the last complete line read: never past a byte of a held record.
        """
        assert f.records is not None
        errors = f.records.take_errors()
        if errors:
            self.decode_errors += errors
            self._warn_once(
                f.path,
                "format",
                "%s has lines that are not %s lines; they are kept whole, flagged "
                "meta.parse_error (counted in decode_errors, logged once per file)",
                f.path,
                self._config.format,
            )
        if f.carry is not None:
            if out:
                f.carry.extend(out)
            out, f.carry = f.carry, None
        if not out:
            return None
        held = f.records.held_start()
        offset = f.offset - f.splitter.pending_bytes if held is None else held
        return self._chunk(f, out.payloads, out.truncated, offset, out.metas, out.times)

    def _chunk(
        self,
        f: _TrackedFile,
        lines: list[bytes],
        truncated: list[int],
        offset: int,
        line_meta: list[Mapping[str, Any] | None] | None = None,
        times: list[Any] | None = None,
    ) -> RawChunk:
        self._refresh_fingerprint(f)
        cfg = self._config
        target = f.target
        return RawChunk(
            source=cfg.name,
            service=cfg.service if target is None else target.service,
            lines=lines,
            position=Position(
                cfg.name, f.key, offset, {"path": f.path, "fp": f.fp, "fp_len": f.fp_len}
            ),
            truncated=frozenset(truncated),
            meta=(target.meta or None) if target is not None else None,
            line_meta=line_meta,
            times=times,
        )

    def _refresh_fingerprint(self, f: _TrackedFile) -> None:
        """Hash the first min(size, fingerprint_bytes) bytes unless already done."""
        want = min(f.size, self._config.fingerprint_bytes)
        if f.fp_len < want:
            # On a read error the old (shorter) fingerprint stays: a resume then starts
            # the file at 0, which repeats lines rather than losing any.
            with contextlib.suppress(OSError):
                f.fp, f.fp_len = _fingerprint(f.fd, want)

    def _head_changed(self, f: _TrackedFile) -> bool:
        """The file grew: were its first fp_len bytes rewritten (truncated, then written
        past our offset before we polled)? Appending never changes them.

        A complete fingerprint (fingerprint_bytes long) is compared at most once per
        glob_interval_s. A shorter one, taken while the file was shorter, is compared on
        every growth and extended in the same read: it would otherwise be extended over
        rewritten bytes unchecked. That happens only while the file is that short.
        """
        if f.fp_len <= 0:
            return False  # nothing recorded yet: the file is read from where it started
        fp_bytes = self._config.fingerprint_bytes
        now = self._clock.monotonic()
        if f.fp_len >= fp_bytes and now - f.fp_checked < self._config.glob_interval_s:
            return False
        f.fp_checked = now
        try:
            head = os.pread(f.fd, max(f.fp_len, min(f.size, fp_bytes)), 0)
        except OSError:
            return False  # the read that follows reports it
        if len(head) < f.fp_len or _sha1(head[: f.fp_len]) != f.fp:
            return True
        if len(head) > f.fp_len:
            f.fp, f.fp_len = _sha1(head), len(head)
        return False

    def _truncated(self, f: _TrackedFile, why: str) -> None:
        log.info(
            "%s was truncated (%s); reading it again from the start",
            f.path,
            why,
            extra=self._log_extra,
        )
        self.truncations_detected += 1
        if f.records is not None:
            # Complete records held from before: emitted with the next chunk (nothing
            # can extend them any more). A held partial line is dropped, as ever.
            freed = f.records.flush()
            if freed:
                if f.carry is None:
                    f.carry = freed
                else:
                    f.carry.extend(freed)
        f.offset = 0
        f.splitter.reset()
        f.fp_len = -1

    # -- discovery and lifetime --------------------------------------------------------

    def _scan(self, discovery: Discovery) -> None:
        """Apply what a walk of the globs found (on the loop): open new files; notice
        rotation (a path naming another file)."""
        first = self._scans == 0
        self._report(discovery)
        if self._watcher is not None:
            # A folder watched only now may have changed after the walk listed it (at
            # the first scan, the next timer scan looks again).
            new_folders = discovery.folders - self._watch_asked
            self._rescan |= not first and self._watcher.available and bool(new_folders)
            self._watch_asked = discovery.folders
            self._watcher.watch(discovery.folders)
        seen: dict[str, str] = {}  # key -> path
        copies: dict[str, str] = {}  # key -> path, of tracked rotated copies
        matched: set[str] = set()  # keys of every regular file matched, opened or not
        for found in discovery.found:
            path, st = found.path, found.st
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                self._warn_once(path, "type", "skipping %s: %s", path, kind)
                continue
            if self._is_own_output(path, st):
                continue
            key = f"{st.st_dev}:{st.st_ino}"
            matched.add(key)
            if key in seen:
                continue  # a second link to a file already matched
            tail_allowed = first
            if self._rotations:
                listing = discovery.copies.get(path, ([], []))
                tail_allowed = self._scan_copies(path, first, copies, matched, listing)
            if key not in self._files:
                chain = path if self._rotations else None
                key = self._open(path, tail_allowed, chain=chain, expect=st)
                if key is None:
                    continue
            seen[key] = path
        for key, f in self._files.items():
            path = seen.get(key)
            if path is None and discovery.capped and self._still_names(f):
                path = f.path  # the walk stopped before it: it is there, unchanged
            if path is not None and path != f.path:
                self.rotations_detected += 1
                log.info("%s was renamed to %s", f.path, path, extra=self._log_extra)
                f.path = path
            if path is not None:
                f.rotated = False
            elif not f.rotated:
                f.rotated = True
                f.last_growth = self._clock.monotonic()
                self.rotations_detected += 1
                log.info(
                    "%s now names another file or none; reading the old one to its end",
                    f.path,
                    extra=self._log_extra,
                )
        for key, path in copies.items():
            f = self._files[key]
            if f.rotated:
                f.path = path  # its name now, for status and the checkpoint's detail
        if first:
            self._recover_rotated(matched)
        if self._watcher is not None:
            self._count_missed(self._watcher.created)
        self._scans += 1

    def _report(self, discovery: Discovery) -> None:
        """Log (once per path) and count what the walk did not follow or could not do."""
        self.scan_entries = discovery.entries
        for path in discovery.symlinks:
            if (path, "symlink") not in self._warned:
                self.symlinks_skipped += 1
            self._warn_once(path, "symlink", SYMLINK_SKIPPED, path)
        for path, above in discovery.loops:
            if (path, "loop") not in self._warned:
                self.symlink_loops += 1
            self._warn_once(
                path,
                "loop",
                "not following %s: it leads back to %s, a folder above it (a loop); "
                "the rest of the tree is scanned",
                path,
                above,
            )
        for path, why in discovery.errors:
            self._warn_once(path, "stat", "cannot stat %s: %s", path, why)
        if discovery.capped:
            self.scans_capped += 1
            self._warn_once(
                "",
                "capped",
                "the globs of this source reach more than %d entries: a scan stops there, "
                "so files beyond it are not found (counted in scans_capped). Narrow paths "
                "or exclude",
                MAX_SCAN_ENTRIES,
            )

    def _still_names(self, f: _TrackedFile) -> bool:
        """Whether f's path still names f (asked of files a capped walk did not reach)."""
        try:
            st = os.stat(f.path) if self._config.follow_symlinks else os.lstat(f.path)
        except OSError:
            return False
        return f"{st.st_dev}:{st.st_ino}" == f.key

    # -- rotated copies ----------------------------------------------------------------

    def _scan_copies(
        self,
        path: str,
        first: bool,
        copies: dict[str, str],
        matched: set[str],
        listing: tuple[list[Found], list[str]],
    ) -> bool:
        """Open the numbered copies of the written file at path not read yet, oldest
        first; return whether the written file may start at its tail (read_from).

        On the first scan, copies are history when nothing of this file was read
        before: read with read_from = "head", skipped with "tail". When something
        was (a checkpoint names it), the copies older than the oldest one read are
        history too, and every newer one was written while the forwarder was down:
        read, as is the written file from its head. While running, every copy not
        seen before is new: read. `listing`: the walk's copies of path (plain ones
        with their stat, and compressed ones).
        """
        plain, compressed = listing
        for gz in compressed:
            self._check_compressed(gz)
        read_before = path in self._chains_read
        history = first and (read_before or self._config.read_from == "tail")
        if history and read_before:
            # Only copies older than one that holds a checkpoint are history; when no
            # such copy is left (all rotated out since), every copy is newer.
            history = any(self._holds_checkpoint(p) for p in [*(c.path for c in plain), path])
        for found in plain:
            copy, st = found.path, found.st
            if not stat.S_ISREG(st.st_mode) or self._is_own_output(copy, st):
                continue
            key = f"{st.st_dev}:{st.st_ino}"
            matched.add(key)
            if key in self._files:
                copies[key] = copy
                continue
            if self._unchanged.get(key) == (st.st_size, st.st_mtime_ns):
                continue
            if history:
                if not self._holds_checkpoint(copy):
                    self._remember_unchanged(key, st)
                    self.history_copies_skipped += 1
                    log.debug("skipping %s: history before the first start", copy,
                              extra=self._log_extra)  # fmt: skip
                    continue
                history = False  # read before: every newer copy is read
            if self._open(copy, False, chain=path, rotated=True, expect=st) is not None:
                self.rotated_copies_opened += 1
        return first and not read_before

    def _holds_checkpoint(self, path: str) -> bool:
        """Whether the file at path is one a checkpoint was taken on (identity and head)."""
        try:
            fd = os.open(path, self._open_flags)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            checkpoint = self._resume.get(f"{st.st_dev}:{st.st_ino}")
            return checkpoint is not None and _is_checkpointed_file(fd, checkpoint, st.st_size)
        except OSError:
            return False
        finally:
            os.close(fd)

    def _check_compressed(self, path: str) -> None:
        """A compressed copy (`x.log.N.gz`) is not read: counted and warned about, once,
        unless it is a file read to its end before it was compressed (its uncompressed
        head and size are those of a file this source finished)."""
        try:
            st = os.stat(path) if self._config.follow_symlinks else os.lstat(path)
        except OSError:
            return
        key = f"{st.st_dev}:{st.st_ino}"
        if key in self._unchanged or not stat.S_ISREG(st.st_mode):
            return
        self._remember_unchanged(key, st)
        try:
            with os.fdopen(os.open(path, self._open_flags), "rb") as raw:
                raw.seek(-4, os.SEEK_END)
                size = int.from_bytes(raw.read(4), "little")  # ISIZE: length mod 2**32
                raw.seek(0)
                with gzip.GzipFile(fileobj=raw) as gz:
                    head = gz.read(min(size, self._config.fingerprint_bytes))
        except (OSError, EOFError):
            head, size = b"", -1
        if self._finished_fps.get((_sha1(head), len(head))) == size:
            return
        self.compressed_copies_unread += 1
        log.warning(
            "not reading %s: compressed rotated copies are not read; the lines in it that "
            "were not read before it was compressed are lost (counted in "
            "compressed_copies_unread). Size max-file and max-size for the longest "
            "outage, or rotate without compression",
            path,
            extra=self._log_extra,
        )

    def _remember_unchanged(self, key: str, st: os.stat_result) -> None:
        self._unchanged.pop(key, None)
        self._unchanged[key] = (st.st_size, st.st_mtime_ns)
        while len(self._unchanged) > MAX_REMEMBERED:
            del self._unchanged[next(iter(self._unchanged))]

    def _remember_finished(self, f: _TrackedFile) -> None:
        """f is read to its end and closed: do not open it again unless it changes."""
        if f.chain is None:
            return
        try:
            self._remember_unchanged(f.key, os.fstat(f.fd))
        except OSError:
            return
        self._finished_fps[(f.fp, f.fp_len)] = f.offset
        while len(self._finished_fps) > MAX_REMEMBERED:
            del self._finished_fps[next(iter(self._finished_fps))]

    def _count_missed(self, created: set[str]) -> None:
        """Files matched by the globs that were created and gone again before they could
        be opened (a `docker run --rm` that ended within milliseconds): counted, warned."""
        for path in created:
            if path in self._opened_paths or not self._watched(path):
                continue
            if os.path.lexists(path):
                continue
            self.files_missed += 1
            log.warning(
                "%s was created and deleted before it could be opened: its lines are lost "
                "(counted in files_missed)",
                path,
                extra=self._log_extra,
            )
        created.clear()

    def _excluded(self, path: str) -> bool:
        return any(fnmatch.fnmatch(path, x) for x in self._config.exclude)

    def _is_own_output(self, path: str, st: os.stat_result) -> bool:
        """Whether the file is the forwarder's own output (reading it would loop); warns once."""
        if (st.st_dev, st.st_ino) not in self._ignore:
            return False
        self._warn_once(
            path,
            "own",
            "skipping %s: it is the forwarder's own output (its stdout or stderr); "
            "reading it would feed the forwarder its own logs",
            path,
        )
        return True

    def _recover_rotated(self, matched: set[str]) -> None:
        """First scan: find files rotated away while the forwarder was down.

        A checkpoint whose file no watched path names is looked up by inode in the
        directory of its recorded path (each such directory is listed once). A file
        found there under another name, that is the checkpointed file (device and
        fingerprint) and has grown past the committed offset, is read from that offset
        to its end like a file rotated while running. Only checkpoints whose recorded
        path is still watched are considered: a file the configuration no longer
        covers is not read again.
        """
        by_dir: dict[str, dict[int, list[tuple[int, Position]]]] = {}
        for key, checkpoint in self._resume.items():
            path = checkpoint.detail.get("path")
            if key in matched or key in self._files or checkpoint.source != self._config.name:
                continue
            if not isinstance(path, str) or not self._watched(path):
                continue
            try:
                dev, ino = (int(n) for n in key.split(":"))
            except ValueError:
                continue
            wanted = by_dir.setdefault(os.path.dirname(path), {})
            wanted.setdefault(ino, []).append((dev, checkpoint))
        for directory, wanted in by_dir.items():
            try:
                with os.scandir(directory or ".") as entries:
                    found = [(e.name, e.inode()) for e in entries if e.inode() in wanted]
            except OSError as e:
                log.debug("cannot list %s: %s", directory, e.strerror, extra=self._log_extra)
                continue
            for name, ino in found:
                path = os.path.join(directory, name)
                for dev, checkpoint in wanted[ino]:
                    if path != checkpoint.detail["path"]:
                        self._open_recovered(path, dev, ino, checkpoint)

    def _watched(self, path: str) -> bool:
        """Whether the configured globs (as patterns) match path and it is not excluded."""
        return any(fnmatch.fnmatch(path, p) for p in self._config.paths) and not (
            self._excluded(path)
        )

    def _open_recovered(self, path: str, dev: int, ino: int, checkpoint: Position) -> None:
        """Track path as an already-rotated file from the checkpoint's offset, if it is
        the checkpointed file and has grown past that offset."""
        target = self._target_of(path)
        if target is False:
            return
        try:
            fd = os.open(path, self._open_flags)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            key = f"{st.st_dev}:{st.st_ino}"
            if (
                not stat.S_ISREG(st.st_mode)
                or (st.st_dev, st.st_ino) != (dev, ino)
                or key in self._files
                or self._is_own_output(path, st)
                or st.st_size <= checkpoint.offset
                or not _is_checkpointed_file(fd, checkpoint, st.st_size)
            ):
                os.close(fd)
                return
        except OSError:
            os.close(fd)
            return
        del self._resume[key]
        self._files[key] = _TrackedFile(
            key=key,
            path=path,
            fd=fd,
            offset=checkpoint.offset,
            size=st.st_size,
            splitter=LineSplitter(self._split_bytes),
            last_growth=self._clock.monotonic(),
            records=self._new_records(),
            rotated=True,
            fp=checkpoint.detail["fp"],
            fp_len=checkpoint.detail["fp_len"],
            target=target,
        )
        self.rotations_detected += 1
        log.info(
            "recovered %s (%s), rotated away from %s while the forwarder was down; "
            "reading it from offset %d to its end",
            path,
            key,
            checkpoint.detail["path"],
            checkpoint.offset,
            extra=self._log_extra,
        )

    def _open(
        self,
        path: str,
        tail_allowed: bool,
        *,
        chain: str | None = None,
        rotated: bool = False,
        expect: os.stat_result | None = None,
    ) -> str | None:
        """Open and start tracking the file at path; its key, or None if it was skipped.

        `tail_allowed`: read_from = "tail" applies (a first scan). `chain`: the written
        file it belongs to (with rotations); `rotated`: it is a rotated copy, read to
        its end and closed (at once when a checkpoint says it was read to its end).

        `expect`: the stat the walk took of path. The file opened must be that file
        (fstat against it): a folder on the way swapped for a symlink between the walk
        and the open (or a rotation meanwhile) names another file, which is not read;
        the next scan, at once, looks again. With follow_symlinks off, O_NOFOLLOW also
        refuses a file itself swapped for a symlink."""
        self._opened_paths[path] = None
        while len(self._opened_paths) > MAX_REMEMBERED:
            del self._opened_paths[next(iter(self._opened_paths))]
        target = self._target_of(path)
        if target is False:
            if rotated and expect is not None:  # a copy never changes: not described
                self._remember_unchanged(f"{expect.st_dev}:{expect.st_ino}", expect)  # again
            return None
        try:
            fd = os.open(path, self._open_flags)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP and not self._config.follow_symlinks:
                self._warn_once(path, "symlink", SYMLINK_SKIPPED, path)  # swapped in
            else:
                self._warn_once(path, "open", "cannot open %s: %s", path, e.strerror)
            return None
        try:
            st = os.fstat(fd)
            key = f"{st.st_dev}:{st.st_ino}"
            if expect is not None and (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino):
                os.close(fd)
                self._rescan = True
                log.debug("%s changed between the scan and its opening; scanning again",
                          path, extra=self._log_extra)  # fmt: skip
                return None
            if not stat.S_ISREG(st.st_mode) or key in self._files or self._is_own_output(path, st):
                os.close(fd)
                return key if key in self._files else None
            checkpoint = self._resume.get(key)
            offset, skip = self._start_offset(fd, key, st.st_size, tail_allowed)
        except OSError as e:
            os.close(fd)
            self._warn_once(path, "open", "cannot read %s: %s", path, e.strerror)
            return None
        self._warned = {w for w in self._warned if w[0] != path}
        f = self._files[key] = _TrackedFile(
            key=key,
            path=path,
            fd=fd,
            offset=offset,
            size=st.st_size,
            splitter=LineSplitter(self._split_bytes, skip_first_line=skip),
            last_growth=self._clock.monotonic(),
            target=target,
            records=self._new_records(),
            chain=chain,
            rotated=rotated,
        )
        if checkpoint is not None and offset > 0:  # verified: its fingerprint holds
            f.fp, f.fp_len = checkpoint.detail["fp"], checkpoint.detail["fp_len"]
        elif offset > 0:  # read_from tail: so that a rewrite before it grows is noticed
            self._refresh_fingerprint(f)
        if rotated and offset >= st.st_size:  # a copy read to its end before
            self._refresh_fingerprint(f)
            self._remember_done(f)
            self._close(f)
            return None
        log.debug("tailing %s (%s) from offset %d", path, key, offset, extra=self._log_extra)
        return key

    def _new_records(self) -> FramedGrouper | None:
        """A file's framer and grouper; None for raw lines with multiline off.

        Grouping runs over the file's records in file order, not per stream: a record
        is complete before the next one starts, so "the start of the oldest held
        record" is one offset and committing it is exact across kill -9. The price: a
        traceback interleaved with lines of the other stream (stdout/stderr of one
        container) is split where those lines fall (its remaining frames still stay one
        record). Likewise a record is never joined across files: a traceback or docker
        piece cut by a rotation becomes two records, one per file.
        """
        if not self._framed:
            return None
        cfg = self._config
        framer = build_framer(cfg.format, cfg.max_line_bytes, cfg.multiline.flush_timeout_s)
        return FramedGrouper(framer, build_grouper(cfg.multiline))

    def _target_of(self, path: str) -> FileTarget | bool | None:
        """describe(path): a FileTarget, None (no describe hook: the configured service)
        or False (describe said to skip the file; logged once per path)."""
        if self._describe is None:
            return None
        target = self._describe(path)
        if target is None:
            if path not in self._undescribed:
                if len(self._undescribed) >= MAX_REMEMBERED:
                    self._undescribed.clear()
                self._undescribed.add(path)
                log.debug("skipping %s: not described", path, extra=self._log_extra)
            return False
        self._undescribed.discard(path)
        return target

    def _start_offset(self, fd: int, key: str, size: int, tail_allowed: bool) -> tuple[int, bool]:
        """Where a newly opened file starts, and whether to skip a partial first line."""
        checkpoint = self._resume.pop(key, None)
        if checkpoint is not None:
            return _verified_offset(fd, checkpoint, size), False
        if tail_allowed and self._config.read_from == "tail" and size > 0:
            # Existing content is skipped; so is the rest of a line being written now.
            return size, os.pread(fd, 1, size - 1) != b"\n"
        return 0, False

    def _maybe_release(self, f: _TrackedFile) -> RawChunk | None:
        """A rotated-away file at its end: close it once deleted, idle for rotate_wait_s, or
        at once for a numbered copy (rotations).

        Nothing will complete its unfinished last line any more, so that is emitted.
        """
        idle = self._clock.monotonic() - f.last_growth
        # A numbered copy (f.chain) is never written again: its writer has moved on to a
        # newer file, and that file waits until this one is finished.
        if not f.deleted and idle < self._config.rotate_wait_s and f.chain is None:
            return None
        log.info("done with rotated %s (%s)", f.path, f.key, extra=self._log_extra)
        if not f.deleted:  # it may show up again under a watched path: resume, not repeat
            self._refresh_fingerprint(f)
            self._remember_done(f)
        return self._finish(f)

    def _remember_done(self, f: _TrackedFile) -> None:
        """f is closed at its end for good: resume it there if it shows up again."""
        self._resume.pop(f.key, None)
        self._resume[f.key] = Position(
            self._config.name, f.key, f.offset, {"path": f.path, "fp": f.fp, "fp_len": f.fp_len}
        )
        while len(self._resume) > MAX_REMEMBERED:
            del self._resume[next(iter(self._resume))]
        self._remember_finished(f)

    def _close(self, f: _TrackedFile) -> None:
        if self._files.get(f.key) is f:
            del self._files[f.key]
        with contextlib.suppress(OSError):
            os.close(f.fd)
        log.debug("closed %s (%s)", f.path, f.key, extra=self._log_extra)

    def _warn_once(self, path: str, reason: str, msg: str, *args: Any) -> None:
        if (path, reason) not in self._warned:
            if len(self._warned) >= 4 * MAX_REMEMBERED:  # bounded: paths made on purpose
                self._warned.clear()
            self._warned.add((path, reason))
            log.warning(msg, *args, extra=self._log_extra)


def own_output_identities() -> frozenset[tuple[int, int]]:
    """(st_dev, st_ino) of this process's stdout and stderr where they are regular files:
    the files a FileSource must not read (`ignore_identities`)."""
    identities = set()
    for fd in (1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue  # closed
        if stat.S_ISREG(st.st_mode):
            identities.add((st.st_dev, st.st_ino))
    return frozenset(identities)


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def _fingerprint(fd: int, length: int) -> tuple[str, int]:
    """(hex sha1 of the first `length` bytes, bytes actually hashed)."""
    data = os.pread(fd, length, 0) if length > 0 else b""
    return _sha1(data), len(data)


def _is_checkpointed_file(fd: int, checkpoint: Position, size: int) -> bool:
    """Whether the open file of `size` bytes is the one the checkpoint was taken on."""
    detail = checkpoint.detail
    fp, fp_len = detail.get("fp"), detail.get("fp_len")
    if not isinstance(fp, str) or not isinstance(fp_len, int) or fp_len < 0:
        return False
    if size < fp_len or size < checkpoint.offset:
        return False  # shorter than when the checkpoint was taken: truncated or replaced
    return _fingerprint(fd, fp_len) == (fp, fp_len)  # else another file reusing the inode


def _verified_offset(fd: int, checkpoint: Position, size: int) -> int:
    """The checkpoint's offset if this is the file it was taken on, else 0 (a new file)."""
    return checkpoint.offset if _is_checkpointed_file(fd, checkpoint, size) else 0


# -- discovery: the glob walk, run in a worker thread ------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    """A path a glob matched and its stat: of the path itself, or of what its symlink
    names when symlinks are followed."""

    path: str
    st: os.stat_result


@dataclass
class Discovery:
    """What one walk of a source's globs found; made in a worker thread, applied on the loop.

    `found`: matched paths, sorted, excluded ones left out; `copies`: with rotations,
    each matched regular file's numbered copies (oldest first) and its compressed ones;
    `folders`: the folders to watch; `symlinks`: links not followed; `loops`: (folder,
    the folder above it that it leads back to); `errors`: (path, why) not stat-able.
    """

    found: list[Found] = field(default_factory=list)
    copies: dict[str, tuple[list[Found], list[str]]] = field(default_factory=dict)
    folders: set[str] = field(default_factory=set)
    symlinks: list[str] = field(default_factory=list)
    loops: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    entries: int = 0  # directory entries examined
    capped: bool = False  # stopped at max_entries: paths beyond it are not in found
    aborted: bool = False  # stopped because the source is stopping


class _WalkStopped(Exception):
    pass


def split_pattern(pattern: str) -> tuple[str, list[str]]:
    """(fixed folder, components below it) of a glob, split where `glob.glob` splits it.

    The fixed folder is the pattern up to the separator before its first wildcard: the
    operator's own choice, which may be a symlink. The file name is always a component.
    split_pattern("/var/log/app/*.log") == ("/var/log/app", ["*.log"]);
    split_pattern("/data/**/x/*.log") == ("/data", ["**", "x", "*.log"]).
    """
    head, tail = os.path.split(pattern)
    parts = [tail]
    while head and _has_magic(head):
        head, tail = os.path.split(head)
        parts.append(tail)
    parts.reverse()
    return head, parts


class GlobWalk:
    """One scan of a source's globs, as `glob.glob(pattern, recursive=True)` matches them
    (`*` and `**` skip names starting with a dot), made safe to run in a worker thread:
    it reads the filesystem and writes only its own `Discovery`.

    Below each glob's fixed folder a symlink (a matched file, a rotated copy, a folder
    a wildcard or `**` would descend into) is not followed unless `follow_symlinks`: it
    is listed in `symlinks` (a link to something other than a folder, met on the way to
    a deeper component, is ignored as glob ignores it). `**` walks each folder once,
    by (st_dev, st_ino): a folder that leads back to one above it is a loop, listed in
    `loops` and not entered; one reached again by another way is skipped. The walk
    examines at most `max_entries` directory entries (`capped`) and stops at the next
    entry once `abort` is set (`aborted`).
    """

    def __init__(
        self,
        patterns: Sequence[str],
        exclude: Sequence[str],
        *,
        follow_symlinks: bool,
        rotations: bool,
        abort: threading.Event,
        max_entries: int,
    ) -> None:
        self._patterns = patterns
        self._exclude = exclude
        self._follow = follow_symlinks
        self._rotations = rotations
        self._abort = abort
        self._max = max_entries
        self._d = Discovery()
        self._seen: set[str] = set()

    def run(self) -> Discovery:
        d = self._d
        try:
            for pattern in self._patterns:
                prefix, parts = split_pattern(pattern)
                d.folders.add(prefix or ".")
                try:
                    st = os.stat(prefix or ".")
                except OSError:
                    continue  # missing: nothing matches yet (waited for)
                self._match(prefix, parts, (((st.st_dev, st.st_ino), prefix),))
            if self._rotations:
                for found in list(d.found):
                    if stat.S_ISREG(found.st.st_mode):
                        self._list_copies(found.path)
        except _WalkStopped:
            pass
        d.found.sort(key=lambda f: f.path)
        return d

    def _count(self) -> None:
        if self._abort.is_set():
            self._d.aborted = True
            raise _WalkStopped
        self._d.entries += 1
        if self._d.entries > self._max:
            self._d.capped = True
            raise _WalkStopped

    def _list(self, folder: str) -> list[os.DirEntry[str]]:
        """The entries of folder, by name (none if it cannot be listed, as for glob)."""
        entries = []
        try:
            with os.scandir(folder or ".") as it:
                for entry in it:
                    self._count()
                    entries.append(entry)
        except OSError:
            return []
        entries.sort(key=lambda e: e.name)
        return entries

    def _match(self, folder: str, parts: list[str], above: tuple[Any, ...]) -> None:
        """Match parts (components) below folder, a folder reached without a symlink not
        followed; `above`: ((st_dev, st_ino), path) of it and the folders above it."""
        comp, rest = parts[0], parts[1:]
        if comp == "**":
            if rest and rest[0] == "**":
                self._match(folder, rest, above)
                return
            for sub, sub_above in self._folders_below(folder, above):
                self._match(sub, rest or ["*"], sub_above)
            return
        if not rest:
            self._d.folders.add(folder or ".")
        if not _has_magic(comp):
            self._count()
            self._visit(folder, comp, None, rest, above)
            return
        hidden_ok = comp.startswith(".")
        for entry in self._list(folder):
            name = entry.name
            if (hidden_ok or not name.startswith(".")) and fnmatch.fnmatchcase(name, comp):
                self._visit(folder, name, entry, rest, above)

    def _visit(
        self,
        folder: str,
        name: str,
        entry: os.DirEntry[str] | None,
        rest: list[str],
        above: tuple[Any, ...],
    ) -> None:
        path = os.path.join(folder, name) if folder else name
        if rest:
            sub = self._folder(path, entry, above)
            if sub is not None:
                self._match(path, rest, sub)
        else:
            self._file(path, entry)

    def _folder(
        self, path: str, entry: os.DirEntry[str] | None, above: tuple[Any, ...]
    ) -> tuple[Any, ...] | None:
        """`above` extended by the folder at path, or None: not a folder, a symlink not
        followed, or a loop."""
        try:
            st = entry.stat(follow_symlinks=False) if entry else os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                if not self._follow:
                    if os.path.isdir(path):
                        self._d.symlinks.append(path)
                    return None
                st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
        ident = (st.st_dev, st.st_ino)
        for seen, where in above:
            if seen == ident:
                self._d.loops.append((path, where))
                return None
        return (*above, (ident, path))

    def _folders_below(
        self, folder: str, above: tuple[Any, ...]
    ) -> Iterator[tuple[str, tuple[Any, ...]]]:
        """folder, then every folder under it (not hidden), depth first by name, each
        (by identity) once. Iterative: a deep tree does not reach the recursion limit."""
        visited = {above[-1][0]}
        stack = [(folder, above)]
        while stack:
            current, current_above = stack.pop()
            yield current, current_above
            children = []
            for entry in self._list(current):
                if entry.name.startswith("."):
                    continue
                if not entry.is_symlink() and not entry.is_dir(follow_symlinks=False):
                    continue  # a file: no stat needed
                path = os.path.join(current, entry.name) if current else entry.name
                sub = self._folder(path, entry, current_above)
                if sub is None or sub[-1][0] in visited:
                    continue
                visited.add(sub[-1][0])
                children.append((path, sub))
            stack.extend(reversed(children))

    def _file(self, path: str, entry: os.DirEntry[str] | None) -> None:
        if path in self._seen or any(fnmatch.fnmatch(path, x) for x in self._exclude):
            return
        st = self._stat(path, entry)
        if st is not None:
            self._seen.add(path)
            self._d.found.append(Found(path, st))

    def _stat(self, path: str, entry: os.DirEntry[str] | None = None) -> os.stat_result | None:
        """lstat of path, or (following symlinks) stat; None if it is a symlink not
        followed (listed) or gone."""
        try:
            st = entry.stat(follow_symlinks=False) if entry else os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                if not self._follow:
                    self._d.symlinks.append(path)
                    return None
                st = os.stat(path)
        except FileNotFoundError:
            return None  # gone, or a dangling symlink
        except OSError as e:
            self._d.errors.append((path, e.strerror or str(e)))
            return None
        return st

    def _list_copies(self, path: str) -> None:
        listing = list_copies(path)
        plain = []
        for copy in listing.plain:
            self._count()
            st = self._stat(copy)
            if st is not None:
                plain.append(Found(copy, st))
        compressed = []
        for gz in listing.compressed:
            self._count()
            if self._stat(gz) is not None:
                compressed.append(gz)
        self._d.copies[path] = (plain, compressed)
