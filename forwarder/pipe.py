"""`forwarder pipe`: run a command (or read stdin), show its output unchanged, forward every line.

The developer's program comes first: its output reaches the terminal whatever happens
to the database or the spool, and we exit with its status. Every line goes through
the disk spool (`sinks/spool.py`) before the pipeline sees it, so lines that cannot be
written now (database down, or still starting) are written by a later run.

Who does what::

    pump threads (one per child pipe, or stdin)
        os.read -> os.write to our stdout/stderr as the bytes arrive (never waits for the
        spool or the event loop) -> LineSplitter -> SpoolFeed (bounded: over its capacity
        lines are dropped, counted, warned about once)
    spooler task      SpoolFeed -> SpoolWriter.append (worker thread, fsync) -> wakes the feeder
    forward task      the database side, in the background, retried until the server answers:
        PostgresSink.open/migrate/load_checkpoints -> acknowledge the committed position ->
        feeder (`SpoolFeeder`, sources/spooled.py: from there up to the writer's end, old
        runs' lines first) -> grouper (tracebacks, `SpoolGrouping`) -> NormalizeStage ->
        PostgresSink.run (rows + spool position, one transaction);
        acker: committed position -> SpoolWriter.acknowledge (deletes whole segments)
    main              forwards SIGINT/SIGTERM to the child; after it exits: the pumps reach
        EOF, the spooler drains, the feeder sends END_OF_STREAM once it has read the whole
        spool, the sink commits; all of it within --flush-timeout, else the rest stays in
        the spool (data_dir/spool/pipe-<service>/).

Records: the spooled lines go through a grouper (`pipeline/multiline.py`, the file
source's: `PipeOptions.multiline`, python mode by default), so a `logger.exception`
message and its traceback become one ERROR row. Grouping is sequential over the
spool, as the file source groups a file, never per stream: a line continues the held
record only if it comes from the same stream, and a line that does not continue it
releases it. So a line of the other stream that the child prints in the middle of a
traceback (its stdout while the traceback goes to stderr) splits the traceback there.
A chunk's position never passes the first line of the record the grouper holds: a
crash (kill -9) reads that record again whole from the spool, and only segments
entirely before the committed position are deleted. The held record is released
after `flush_timeout_s` without a line (by the injected clock) and at the end.

Signals: this is the pipe command's runtime, so it installs its own handlers (the
daemon's are in runtime.py). SIGTERM is always forwarded; SIGINT too, unless the child
is in the terminal's foreground process group: a Ctrl-C has then reached it already,
and a second copy would make many programs (uvicorn, a REPL) exit hard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import select
import signal
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from forwarder.clock import Clock, SystemClock
from forwarder.config import EMBEDDED_DSN, MultilineConfig, Settings
from forwarder.event import EventChunk, RawChunk
from forwarder.logs import daemon_formatter
from forwarder.pipeline.multiline import build_grouper
from forwarder.pipeline.stage import END_OF_STREAM, Marker, NormalizeStage
from forwarder.runtime import Database, open_database
from forwarder.sinks.postgres import PostgresSink, error_text
from forwarder.sinks.spool import (
    START,
    FsyncMode,
    SpoolFull,
    SpoolRecord,
    SpoolWriter,
)
from forwarder.sources.file import LineSplitter
from forwarder.sources.spooled import (
    SpoolFeeder,
    SpoolGrouping,
    append_durably,
    resume_position,
)

__all__ = [
    "LineGate",
    "PipeOptions",
    "PipeRun",
    "SpoolGrouping",
    "install_logging",
    "pipe_source",
    "run_pipe",
    "spool_folder",
    "validate_service",
]

log = logging.getLogger(__name__)

COMPONENT = "pipe"
EXIT_NOT_EXECUTABLE: Final = 126  # what a shell answers for a command it cannot run
EXIT_NOT_FOUND: Final = 127
READ_BYTES: Final = 64 * 1024
ACK_INTERVAL_S: Final = 1.0  # how often committed positions are turned into deletions
SINK_CLOSE_TIMEOUT_S: Final = 1.0
RECORD_OVERHEAD_BYTES: Final = 96  # what a record costs beyond its line, for the feed's bound
LOG_HOLD_S: Final = 1.0  # our log line waits this long for the child to finish its line
LOG_PENDING_MAX: Final = 1000

_SERVICE_RE: Final = re.compile(r"^[A-Za-z0-9_.\-]{1,63}$")


def validate_service(name: str) -> str:
    """A service name usable as a folder name and a checkpoint key; ValueError otherwise."""
    if not _SERVICE_RE.match(name) or name in (".", ".."):
        raise ValueError(
            f"{name!r}: use 1-63 letters, digits, '.', '_' or '-' (it names the spool folder)"
        )
    return name


def spool_folder(data_dir: Path, service: str) -> Path:
    return data_dir / "spool" / f"pipe-{service}"


def pipe_source(service: str) -> str:
    """The source name of the pipe's checkpoint (stream: "spool")."""
    return f"pipe:{service}"


@dataclass(frozen=True)
class PipeOptions:
    service: str
    command: Sequence[str] = ()  # empty: forward stdin
    flush_timeout_s: float = 5.0  # after the child exits (or stdin ends)
    # TODO(config): a [spool] section in config.py should carry these three.
    spool_max_bytes: int = 256 * 1024 * 1024
    spool_segment_bytes: int = 8 * 1024 * 1024
    spool_fsync: FsyncMode = "batch"
    buffer_bytes: int = 8 * 1024 * 1024  # lines read but not yet spooled, at most
    max_line_bytes: int = 1024 * 1024  # longer lines are cut and flagged meta.truncated
    stdin_fd: int = 0
    stdout_fd: int = 1
    stderr_fd: int = 2
    # Grouping of tracebacks: the file source's defaults (there is no [pipe] section in
    # the configuration; the CLI passes none).
    multiline: MultilineConfig = field(default_factory=MultilineConfig)

    def __post_init__(self) -> None:
        validate_service(self.service)
        if self.flush_timeout_s < 0:
            raise ValueError("flush_timeout_s must not be negative")
        if self.spool_segment_bytes * 4 > self.spool_max_bytes:
            # The open segment cannot be deleted: a segment must be a small part of the
            # bound, or a full spool could never make room.
            raise ValueError("spool_segment_bytes must be at most a quarter of spool_max_bytes")


# --- our own log lines beside the child's stderr ----------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    """All of `data`, also to a descriptor someone else made non-blocking."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


def _read(fd: int) -> bytes:
    while True:
        try:
            return os.read(fd, READ_BYTES)
        except BlockingIOError:
            select.select([fd], [], [])


class LineGate:
    """One file descriptor shared by the child's bytes and our own log lines.

    The child's bytes are written at once, as they come. Our lines are written whole and
    only at a line start: while the child is in the middle of a line (a progress bar),
    they wait up to LOG_HOLD_S for its newline, then are written after a newline of ours.
    """

    def __init__(self, fd: int, *, hold_s: float = LOG_HOLD_S) -> None:
        self.fd = fd
        self._hold_s = hold_s
        self._lock = threading.Lock()
        self._at_line_start = True
        self._pending: deque[bytes] = deque(maxlen=LOG_PENDING_MAX)
        self._timer: threading.Timer | None = None

    def passthrough(self, data: bytes) -> None:
        """The child's bytes, unchanged (an OSError such as EPIPE is the caller's)."""
        with self._lock:
            _write_all(self.fd, data)
            self._at_line_start = data.endswith(b"\n")
            if self._pending and self._at_line_start:
                self._flush_pending()

    def log_line(self, line: bytes) -> None:
        """One whole line of ours (newline included); never raises."""
        with self._lock:
            if self._at_line_start and not self._pending:
                with contextlib.suppress(OSError):
                    _write_all(self.fd, line)
                return
            self._pending.append(line)
            if self._timer is None:
                self._timer = threading.Timer(self._hold_s, self._on_timer)
                self._timer.daemon = True
                self._timer.start()

    def close(self) -> None:
        """Write what still waits (after a newline if the child left its line open)."""
        with self._lock:
            self._force()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            self._force()

    def _force(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        if not self._at_line_start:
            with contextlib.suppress(OSError):
                _write_all(self.fd, b"\n")
            self._at_line_start = True
        self._flush_pending()

    def _flush_pending(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(OSError):
            _write_all(self.fd, data)


class _GateHandler(logging.Handler):
    def __init__(self, gate: LineGate) -> None:
        super().__init__()
        self.gate = gate

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode("utf-8", "replace") + b"\n"
        except Exception:
            self.handleError(record)
            return
        self.gate.log_line(line)


def install_logging(gate: LineGate, configured_level: str = "INFO") -> None:
    """Route this process's logs to `gate` as JSON lines: warnings and errors only."""
    handler = _GateHandler(gate)
    handler.setFormatter(daemon_formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel("ERROR" if configured_level == "ERROR" else "WARNING")


# --- lines read, waiting for the spool ---------------------------------------------------------


class SpoolFeed:
    """Lines between the pump threads and the spooler task, bounded in bytes.

    `put` never blocks (the passthrough must not wait for the spool): over capacity the
    lines are dropped and counted, with one warning. The lossy edge, made explicit.
    """

    def __init__(self, capacity_bytes: int, loop: asyncio.AbstractEventLoop) -> None:
        self._capacity = capacity_bytes
        self._loop = loop
        self._lock = threading.Lock()
        self._items: deque[SpoolRecord] = deque()
        self._bytes = 0
        self._closed = False
        self.ready = asyncio.Event()  # set (from any thread) when items or the end arrive
        self.dropped = 0

    def put(self, records: Sequence[SpoolRecord]) -> None:
        """Called from pump threads."""
        first_drop = False
        with self._lock:
            if self._closed:
                return
            was_empty = not self._items
            for record in records:
                size = len(record.data) + RECORD_OVERHEAD_BYTES
                if self._bytes + size > self._capacity:
                    first_drop = first_drop or self.dropped == 0
                    self.dropped += 1
                    continue
                self._items.append(record)
                self._bytes += size
            wake = was_empty and bool(self._items)
        if first_drop:
            log.warning(
                "lines are arriving faster than the spool takes them (it is full, or the "
                "disk is slow): lines not spooled are dropped and counted; the output "
                "still shows every line",
                extra={"component": COMPONENT, "event": "pipe.lines_dropped"},
            )
        if wake:
            self._wake()

    def close(self) -> None:
        """No more lines: the spooler finishes once it has taken what is here."""
        with self._lock:
            self._closed = True
        self._wake()

    def take(self, max_bytes: int) -> list[SpoolRecord]:
        """At least one record if any, then up to about `max_bytes`."""
        out: list[SpoolRecord] = []
        taken = 0
        with self._lock:
            while self._items and (not out or taken < max_bytes):
                record = self._items.popleft()
                size = len(record.data) + RECORD_OVERHEAD_BYTES
                self._bytes -= size
                taken += size
                out.append(record)
        return out

    def discard(self) -> int:
        """Forget what still waits (we are exiting); return how many lines that was."""
        with self._lock:
            n = len(self._items)
            self._items.clear()
            self._bytes = 0
            self._closed = True
        return n

    @property
    def finished(self) -> bool:
        with self._lock:
            return self._closed and not self._items

    @property
    def empty(self) -> bool:
        with self._lock:
            return not self._items

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: we are exiting
            self._loop.call_soon_threadsafe(self.ready.set)


class _Pump(threading.Thread):
    """Read one fd to EOF: pass the bytes through as they come, spool the lines."""

    def __init__(
        self,
        src_fd: int,
        out: Callable[[bytes], None] | None,
        stream: str,
        run: PipeRun,
        *,
        close_src: bool,
    ) -> None:
        super().__init__(name=f"pipe-{stream}", daemon=True)
        self.src_fd = src_fd
        self.out = out
        self.stream = stream
        self._run = run
        self._close_src = close_src
        self.bytes_read = 0

    def run(self) -> None:
        run = self._run
        splitter = LineSplitter(run.options.max_line_bytes)
        out = self.out
        try:
            while True:
                try:
                    data = _read(self.src_fd)
                except OSError:
                    break
                if not data:
                    break
                self.bytes_read += len(data)
                if out is not None:
                    try:
                        out(data)
                    except OSError as e:
                        out = None
                        log.warning(
                            "cannot pass %s through any more (%s); its lines are still forwarded",
                            self.stream,
                            e.strerror,
                            extra={"component": COMPONENT},
                        )
                lines, cut = splitter.feed(data)
                if lines:
                    self._put(lines, cut)
            last = splitter.flush()  # a last line without its newline is still a line
            if last is not None:
                self._put([last[0]], [0] if last[1] else [])
        finally:
            if self._close_src:
                with contextlib.suppress(OSError):
                    os.close(self.src_fd)
            run.pump_finished()

    def _put(self, lines: list[bytes], cut: list[int]) -> None:
        now = self._run.clock.now()
        stream = self.stream
        cut_set = set(cut)
        self._run.feed.put(
            [SpoolRecord(now, stream, line, i in cut_set) for i, line in enumerate(lines)]
        )


# --- the run ----------------------------------------------------------------------------------


async def run_pipe(
    settings: Settings,
    options: PipeOptions,
    *,
    stderr_gate: LineGate | None = None,
    clock: Clock | None = None,
) -> int:
    """Run `forwarder pipe`; return the exit status (the child's, 128+N if killed by N).

    Raises StartupError (an empty DSN) or SpoolError (folder unusable, or another
    `forwarder pipe` of the same service runs) before the child is started.
    """
    db = settings.database
    database: Database | None = None
    if db.dsn.get_secret_value().strip() != EMBEDDED_DSN:
        database = await open_database(db)  # no I/O; raises StartupError on an empty DSN
    folder = spool_folder(db.data_dir, options.service)
    writer = await asyncio.to_thread(
        SpoolWriter,
        folder,
        max_bytes=options.spool_max_bytes,
        segment_bytes=options.spool_segment_bytes,
        fsync=options.spool_fsync,
    )
    gate = stderr_gate or LineGate(options.stderr_fd)
    try:
        run = PipeRun(settings, options, writer, database, gate, clock or SystemClock())
        return await run.run()
    finally:
        writer.close()
        gate.close()


class PipeRun:
    """One `forwarder pipe` invocation: the child (or stdin), the spool, the database side."""

    def __init__(
        self,
        settings: Settings,
        options: PipeOptions,
        writer: SpoolWriter,
        database: Database | None,
        gate: LineGate,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.options = options
        self.writer = writer
        self.database = database  # None: "embedded", started by the forward task
        self.gate = gate
        self.clock = clock
        self.source = pipe_source(options.service)
        # The spool -> the pipeline: from the committed position, set once it is read.
        self.feeder = SpoolFeeder(
            self.source,
            options.service,
            writer,
            build_grouper(options.multiline),
            START,
            clock,
            meta_of=self._meta_of,
        )
        self._loop = asyncio.get_running_loop()  # built inside the running loop
        self.feed = SpoolFeed(options.buffer_bytes, self._loop)
        self.proc: asyncio.subprocess.Process | None = None
        # outcome and counters
        self.flushed = False  # the sink committed everything spooled
        self.forward_error: str | None = None
        self.lines_spooled = 0
        self.lines_too_large = 0
        self._append_bytes = max(1, min(1024 * 1024, options.spool_max_bytes // 8))
        self._pumps_running = 0
        self._pumps_done = asyncio.Event()
        self._stopping = asyncio.Event()  # no more input: child exited, stdin ended, signal
        self._interrupt = asyncio.Event()  # a signal while flushing: exit now
        self._stop_signal: int | None = None
        self._deadline: float | None = None  # loop time when the flush budget ends
        self._sink: PostgresSink | None = None
        self._stream_meta: dict[str, Mapping[str, Any]] = {}
        self._warned_full = False
        self._warned_spool_error = False
        self._holding = 0
        self._early_signals: list[int] = []

    # -- the whole run --

    async def run(self) -> int:
        loop = self._loop
        forward = asyncio.create_task(self._forward(), name="pipe.forward")
        spooler = asyncio.create_task(self._spool(), name="pipe.spool")
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            if self.options.command:
                status = await self._run_child()
            else:
                status = await self._run_stdin()
            self._stop_input()
            await self._flush(forward, spooler)
            return status
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            for task in (forward, spooler):
                task.cancel()
            for result in await asyncio.gather(forward, spooler, return_exceptions=True):
                if isinstance(result, Exception):
                    log.error(
                        "pipe failed: %s", _error_text(result), extra={"component": COMPONENT}
                    )
            self._report()

    def _stop_input(self) -> None:
        """No more input: the flush budget starts now."""
        if self._deadline is None:
            self._deadline = self._loop.time() + self.options.flush_timeout_s
        self._stopping.set()

    async def _run_child(self) -> int:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.options.command, stdout=out_w, stderr=err_w, env=_child_env()
            )
        except OSError as e:
            os.close(out_r)
            os.close(err_r)
            self.feed.close()
            status = EXIT_NOT_FOUND if isinstance(e, FileNotFoundError) else EXIT_NOT_EXECUTABLE
            reason = "command not found" if status == EXIT_NOT_FOUND else e.strerror
            self.gate.log_line(f"forwarder pipe: {self.options.command[0]}: {reason}\n".encode())
            return status
        finally:
            os.close(out_w)
            os.close(err_w)
        stdout_fd = self.options.stdout_fd
        self._start_pumps(
            _Pump(out_r, lambda data: _write_all(stdout_fd, data), "stdout", self, close_src=True),
            _Pump(err_r, self.gate.passthrough, "stderr", self, close_src=True),
        )
        for signum in self._early_signals:  # came while the child was being started
            self._on_signal(signum)
        returncode = await self.proc.wait()
        self._stop_input()
        # Its pipes end when the last process holding them exits (a background grandchild
        # may keep them open): wait for that within the flush budget, no longer.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(self._deadline):
                await self._wait_or_interrupt(self._pumps_done.wait())
        self.feed.close()
        return 128 - returncode if returncode < 0 else returncode

    async def _run_stdin(self) -> int:
        stdout_fd = self.options.stdout_fd
        self._start_pumps(
            _Pump(
                self.options.stdin_fd,
                lambda data: _write_all(stdout_fd, data),
                "stdin",
                self,
                close_src=False,
            )
        )
        await self._wait_or_interrupt(self._pumps_done.wait(), self._stopping.wait())
        self.feed.close()
        return 0 if self._stop_signal is None else 128 + self._stop_signal

    def _start_pumps(self, *pumps: _Pump) -> None:
        self._pumps_running = len(pumps)
        for pump in pumps:
            pump.start()

    def pump_finished(self) -> None:
        """Called by each pump thread when its input ended."""

        def done() -> None:
            self._pumps_running -= 1
            if self._pumps_running <= 0:
                self._pumps_done.set()
                self.feed.close()

        with contextlib.suppress(RuntimeError):  # the loop is gone: we are exiting
            self._loop.call_soon_threadsafe(done)

    def _on_signal(self, signum: int) -> None:
        proc = self.proc
        if proc is None and self.options.command and not self._stopping.is_set():
            self._early_signals.append(signum)  # for the child, once it exists
            return
        if proc is not None and proc.returncode is None:
            if signum == signal.SIGINT and _terminal_sent_sigint(proc.pid):
                return  # the terminal sent it to the child's process group too
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)
            return
        if not self._stopping.is_set():  # stdin mode: stop reading, flush, exit 128+N
            self._stop_signal = signum
            self._stop_input()
            return
        self._interrupt.set()  # flushing: stop waiting, leave the rest in the spool

    async def _wait_or_interrupt(self, *aws: Any) -> None:
        """Until the first of `aws` completes, or a signal interrupts the flush."""
        tasks = [asyncio.ensure_future(a) for a in aws]
        tasks.append(asyncio.ensure_future(self._interrupt.wait()))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _flush(self, forward: asyncio.Task[None], spooler: asyncio.Task[None]) -> None:
        """Wait until the spooled lines are committed, at most flush_timeout_s."""

        async def flushed() -> None:
            await asyncio.wait([spooler])
            await asyncio.wait([forward])

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(self._deadline):
                await self._wait_or_interrupt(flushed())

    def _report(self) -> None:
        extra = {"component": COMPONENT, "spool": str(self.writer.folder)}
        left = self.feed.discard() + self._holding
        lost = self.feed.dropped + left + self.lines_too_large
        if lost:
            log.warning(
                "%d lines were shown but not forwarded: %d came while the spool (at most %d "
                "bytes) was full or slower than them and its buffer (%d bytes) was full, "
                "%d still waited for room at exit, %d were too large for a spool record",
                lost,
                self.feed.dropped,
                self.options.spool_max_bytes,
                self.options.buffer_bytes,
                left,
                self.lines_too_large,
                extra={**extra, "event": "pipe.lines_dropped", "lines": lost},
            )
        if self.feeder.reader.corrupt_records:
            log.warning(
                "%d corrupt spool records were skipped",
                self.feeder.reader.corrupt_records,
                extra=extra,
            )
        if self.flushed or not self.writer.used_bytes:
            return  # nothing waits in the spool
        sink = self._sink
        reason = (
            self.forward_error
            or (sink.status()["reason"] if sink is not None else None)
            or "the database did not answer"
        )
        log.warning(
            "not everything reached the database within %.1fs (%s): %d bytes stay in %s; "
            "the next `forwarder pipe --service %s` writes them first",
            self.options.flush_timeout_s,
            reason,
            self.writer.used_bytes,
            self.writer.folder,
            self.options.service,
            extra={**extra, "event": "pipe.left_in_spool"},
        )

    # -- spooling --

    async def _spool(self) -> None:
        feed = self.feed
        while True:
            records = feed.take(self._append_bytes)
            if not records:
                if feed.finished:
                    break
                feed.ready.clear()
                if feed.empty and not feed.finished:
                    await feed.ready.wait()
                continue
            self._holding = len(records)  # taken from the feed, not yet in the spool
            await self._append(records)
            self._holding = 0
            self.feeder.appended()
        await asyncio.to_thread(self.writer.seal)
        self.feeder.finish()  # the feed is closed and all of it is spooled

    async def _append(self, records: list[SpoolRecord]) -> None:
        """Append, waiting while the spool is full (meanwhile the feed fills, then drops)."""
        await append_durably(
            self.writer,
            records,
            appended=self._spooled,
            full=self._spool_is_full,
            failed=self._spool_failed,
            too_large=self._too_large,
        )

    def _spool_is_full(self, e: SpoolFull) -> None:
        if not self._warned_full:
            self._warned_full = True
            log.warning(
                "the spool %s is full (%d bytes) until the database takes its lines; "
                "the output still shows",
                self.writer.folder,
                e.max_bytes,
                extra={"component": COMPONENT, "event": "pipe.spool_full"},
            )

    def _spool_failed(self, e: OSError) -> None:
        if not self._warned_spool_error:
            self._warned_spool_error = True
            log.error(
                "cannot write to the spool %s (%s); retrying",
                self.writer.folder,
                e.strerror,
                extra={"component": COMPONENT},
            )

    def _too_large(self) -> None:
        self.lines_too_large += 1

    def _spooled(self, n: int) -> None:
        self.lines_spooled += n

    # -- the database side --

    async def _forward(self) -> None:
        settings = self.settings
        database = self.database
        try:
            if database is None:
                database = await open_database(settings.database)  # embedded: may take a while
            sink = self._sink = PostgresSink(
                settings.database, settings.batch, database.dsn, self.clock
            )
            try:
                await sink.open()  # retried while the server is unreachable
                await sink.migrate(self.clock.now().date())
                checkpoints = await sink.load_checkpoints(self.source)
                start = resume_position(checkpoints, self.writer)
                await asyncio.to_thread(self.writer.acknowledge, start)
                size = settings.pipeline.queue_chunks
                raw_q: asyncio.Queue[RawChunk | Marker] = asyncio.Queue(size)
                event_q: asyncio.Queue[EventChunk | Marker] = asyncio.Queue(size)
                self.feeder.fed_to = start
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._feed(raw_q), name="pipe.feed")
                    tg.create_task(NormalizeStage(self.clock).run(raw_q, event_q), name="normalize")
                    written = tg.create_task(sink.run(event_q), name="sink")
                    tg.create_task(
                        self.feeder.follow_commits(
                            written,
                            lambda: sink.load_checkpoints(self.source),
                            interval_s=ACK_INTERVAL_S,
                            new_commits=_batches_written(sink, written),
                        ),
                        name="pipe.ack",
                    )
                # sink.run returned after END_OF_STREAM: all that was fed is committed.
                await self.feeder.acknowledge(self.feeder.fed_to)
                self.flushed = True
            finally:
                await sink.aclose(SINK_CLOSE_TIMEOUT_S)
        except Exception as exc:
            self.forward_error = _error_text(exc)
            log.error(
                "cannot forward to the database: %s; lines stay in the spool %s",
                self.forward_error,
                self.writer.folder,
                extra={"component": COMPONENT},
            )
        finally:
            if database is not None and self.database is None:
                database.close()  # the embedded server we started

    async def _feed(self, out: asyncio.Queue[RawChunk | Marker]) -> None:
        """Read the spool from the committed position to the writer's end, following
        it, grouped into records; then END_OF_STREAM."""
        await self.feeder.feed(out)
        await out.put(END_OF_STREAM)

    def _meta_of(self, stream: str) -> Mapping[str, Any]:
        meta = self._stream_meta.get(stream)
        if meta is None:
            meta = self._stream_meta[stream] = MappingProxyType({"stream": stream})
        return meta


def _batches_written(sink: PostgresSink, written: asyncio.Task[None]) -> Callable[[], bool]:
    """Whether the sink committed a batch since the last call (while it runs): only
    then can its committed position have moved."""
    seen = 0

    def new_commits() -> bool:
        nonlocal seen
        if written.done() or sink.batches_written == seen:
            return False
        seen = sink.batches_written
        return True

    return new_commits


def _error_text(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]  # a TaskGroup's: the first component's error says it
    return error_text(exc)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # A Python child writing to a pipe would buffer its stdout in 8 KiB blocks; in a
    # terminal it writes each line. Keep the terminal's behaviour unless told otherwise.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _terminal_sent_sigint(pid: int) -> bool:
    """Is `pid` in the foreground process group of our controlling terminal?

    Then a Ctrl-C reached it with ours. (A `kill -INT` of us alone cannot be told apart
    in that case and is not forwarded; it is the rare one.)
    """
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False  # no controlling terminal
    try:
        return os.tcgetpgrp(fd) == os.getpgid(pid)
    except OSError:
        return False
    finally:
        os.close(fd)
