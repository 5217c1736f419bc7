"""The stdin source against a real pipe (os.pipe), a real terminal (pty), real files and a
real PostgreSQL: every line read is in the spool before anything else happens, rows
commit exactly once with the spool checkpoint, a crash replays what was read and not
committed, a full spool stops reading (the writer blocks), the end of the input empties
the spool, tracebacks and docker lines are grouped as a file's are."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import termios
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from forwarder.clock import SystemClock
from forwarder.config import Settings, StdinSourceConfig
from forwarder.event import EventChunk, RawChunk
from forwarder.pipeline.stage import END_OF_STREAM, EndOfStream, NormalizeStage
from forwarder.sinks.postgres import PostgresSink
from forwarder.sinks.spool import (
    CHECKPOINT_STREAM,
    SpoolPosition,
    SpoolReader,
    SpoolRecord,
    list_segments,
    segment_path,
)
from forwarder.sources.stdin import StdinSource
from tests.component import test_intake
from tests.component.test_intake import Pipeline, messages
from tests.support import RunningSource, wait_until

NAME = "in"

# The intake's harness serves any spooled source: `env` makes (settings, an open sink),
# `Pipeline` runs source -> normalize -> sink, `messages` reads the rows back.
env = test_intake.env


def stdin_config(**overrides: Any) -> StdinSourceConfig:
    return StdinSourceConfig(type="stdin", name=NAME, service="app", **overrides)


def new_source(
    settings: Settings,
    fd: int,
    sink: PostgresSink | None = None,
    checkpoints: Any = None,
    *,
    config: StdinSourceConfig | None = None,
    **kw: Any,
) -> StdinSource:
    return StdinSource(
        config or stdin_config(),
        settings.database.data_dir,
        SystemClock(),
        checkpoints or {},
        committed=(lambda: sink.load_checkpoints(NAME)) if sink is not None else None,
        fd=fd,
        **kw,
    )


class Pipe:
    """An os.pipe: the source reads `r`, the test writes into `w`."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.w, view) :]

    def close_writer(self) -> None:
        if self.w >= 0:
            os.close(self.w)
            self.w = -1

    def close(self) -> None:
        self.close_writer()
        if self.r >= 0:
            os.close(self.r)
            self.r = -1


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    p.close()


def lines(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def text(messages: list[str]) -> bytes:
    return b"".join(m.encode() + b"\n" for m in messages)


def spooled(folder: Path, after: SpoolPosition | None = None) -> list[bytes]:
    """Every record in the spool after `after`, read as a restarted process would."""
    return [r.data for r in SpoolReader(folder).read(after, max_records=1 << 30).records]


async def test_lines_from_a_pipe_commit_exactly_once_with_the_spool_checkpoint(
    env: Any, pipe: Pipe, pg_conn: asyncpg.Connection
) -> None:
    settings, sink = await env()
    source = new_source(settings, pipe.r, sink)
    assert source.name == NAME
    pipeline = Pipeline(source, sink, SystemClock()).start()
    expected = lines("line ", 1200)
    pipe.write(text(expected[:700]))
    await wait_until(lambda: sink.rows_written == 700, what="the first rows")
    pipe.write(text(expected[700:]))
    pipe.close_writer()  # the end of the input: the source idles (no exit_on_eof)
    await wait_until(lambda: sink.rows_written == 1200, what="every row")
    # What was fed is committed, then the spool is emptied; the source still runs.
    await wait_until(lambda: not list_segments(source.folder), what="the spool emptied")
    status = source.status()
    assert status["state"] == "ok" and status["at_end"] and status["input"] == "pipe"
    assert (status["lines_read"], status["lines_spooled"], status["lines_fed"]) == (1200,) * 3
    assert source.progress() == (status["bytes_read"],) * 2 == (len(text(expected)),) * 2
    assert pipeline.task is not None and not pipeline.task.done()
    await pipeline.drain()
    assert source.status()["state"] == "stopped"
    assert await messages(pg_conn) == expected
    rows = await pg_conn.fetch("SELECT DISTINCT service, event FROM system_logs")
    assert [tuple(r) for r in rows] == [("app", "raw")]
    checkpoint = (await sink.load_checkpoints(NAME))[CHECKPOINT_STREAM]
    assert checkpoint.offset == source.writer.position.offset
    assert checkpoint.detail["spool"] == source.writer.spool_id


async def test_exit_on_eof_returns_once_everything_is_committed_and_the_spool_is_empty(
    env: Any, pipe: Pipe, pg_conn: asyncpg.Connection
) -> None:
    settings, sink = await env()
    source = new_source(settings, pipe.r, sink, exit_on_eof=True)
    pipeline = Pipeline(source, sink, SystemClock()).start()
    pipe.write(text(lines("b", 3000)) + b"no newline at the end")
    pipe.close_writer()
    assert pipeline.task is not None
    async with asyncio.timeout(20):
        await pipeline.task  # returned by itself: no stop was set
    assert not pipeline.stop.is_set()
    assert await messages(pg_conn) == [*lines("b", 3000), "no newline at the end"]
    assert list_segments(source.folder) == []
    assert source.status()["state"] == "stopped"


async def test_every_line_read_is_in_the_spool_before_it_is_committed(env: Any, pipe: Pipe) -> None:
    settings, _ = await env()
    source = new_source(settings, pipe.r)
    running = RunningSource(source)  # nobody commits: the lines exist only in the spool
    try:
        pipe.write(text(lines("s", 50)) + b"half a li")
        await wait_until(lambda: source.lines_spooled == 50, what="50 lines spooled")
        # Read by a second reader, as a restarted process would: already on disk.
        assert spooled(source.folder) == [m.encode() for m in lines("s", 50)]
        pipe.write(b"ne\n")
        await wait_until(lambda: source.lines_spooled == 51, what="the finished line")
        assert spooled(source.folder)[-1] == b"half a line"
    finally:
        await running.close()
    assert running.chunks and all(isinstance(c, RawChunk) for c in running.chunks)


async def test_a_crash_replays_what_was_read_and_not_committed_once(
    env: Any, pg_conn: asyncpg.Connection
) -> None:
    settings, sink = await env()
    first = Pipe()
    try:
        source = new_source(settings, first.r, sink)
        pipeline = Pipeline(source, sink, SystemClock()).start()
        first.write(text(["committed 1", "committed 2"]))
        await wait_until(lambda: sink.rows_written == 2, what="the first rows")
        await pipeline.kill()
        # The process goes on reading, then dies before these lines are committed.
        crashed = new_source(settings, first.r, checkpoints=await sink.load_checkpoints(NAME))
        running = RunningSource(crashed)
        first.write(text(["read 3", "read 4"]))
        await wait_until(lambda: crashed.lines_spooled == 2, what="lines spooled")
        running.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running.task
    finally:
        first.close()
    assert crashed.writer.closed  # a cancelled run still releases the folder

    # Restarted with nothing more on standard input: the spool is replayed once.
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        restarted = new_source(
            settings, devnull, sink, await sink.load_checkpoints(NAME), exit_on_eof=True
        )
        pipeline = Pipeline(restarted, sink, SystemClock()).start()
        assert pipeline.task is not None
        async with asyncio.timeout(20):
            await pipeline.task
    finally:
        os.close(devnull)
    assert restarted.status()["input"] == "device"
    assert await messages(pg_conn) == ["committed 1", "committed 2", "read 3", "read 4"]
    assert list_segments(restarted.folder) == []


async def test_a_record_torn_by_a_crash_is_skipped_and_counted(
    env: Any, pipe: Pipe, pg_conn: asyncpg.Connection
) -> None:
    settings, sink = await env()
    crashed = new_source(settings, pipe.r)
    crashed.writer.append([SpoolRecord(datetime.now(UTC), "stdin", b"whole")])
    segment = crashed.writer.position.segment
    crashed.close()
    with segment_path(crashed.folder, segment).open("ab") as f:
        f.write(b'1234abcd {"t": "2026-')  # a kill -9 in the middle of a write
    pipe.close_writer()
    restarted = new_source(settings, pipe.r, sink, exit_on_eof=True)
    pipeline = Pipeline(restarted, sink, SystemClock()).start()
    assert pipeline.task is not None
    async with asyncio.timeout(20):
        await pipeline.task
    assert await messages(pg_conn) == ["whole"]
    assert restarted.status()["torn_records"] == 1


async def test_a_full_spool_stops_reading_so_the_writer_blocks_and_nothing_is_lost(
    env: Any, pipe: Pipe, pg_conn: asyncpg.Connection
) -> None:
    settings, sink = await env()
    # A small spool (below the configured minimum, for the test) of 16 KiB segments.
    config = stdin_config().model_copy(update={"spool_max_bytes": 256 * 1024})
    source = new_source(settings, pipe.r, sink, config=config, segment_bytes=16 * 1024)
    raw_q: asyncio.Queue[RawChunk | EndOfStream] = asyncio.Queue(1)
    event_q: asyncio.Queue[EventChunk | EndOfStream] = asyncio.Queue(1)
    stop = asyncio.Event()
    reading = asyncio.create_task(source.run(raw_q, stop))
    total = 20_000
    data = text([f"{i:06d} " + "x" * 150 for i in range(total)])
    os.set_blocking(pipe.w, False)
    sent = 0
    try:
        # The database is not taking anything yet: the spool fills, then the pipe.
        while True:
            try:
                sent += os.write(pipe.w, data[sent : sent + 65536])
            except BlockingIOError:
                if source.status()["spool_full"]:
                    break
                await asyncio.sleep(0.01)  # let the source read what is in the pipe
        assert source.status()["state"] == "degraded"
        assert "not read" in source.status()["reason"]
        assert source.bytes_read < sent < len(data)  # the writer is blocked mid-way
        assert source.writer.used_bytes <= 256 * 1024

        # The database catches up: commits make room, reading resumes, all arrives.
        async with asyncio.TaskGroup() as tg:
            tg.create_task(NormalizeStage(SystemClock()).run(raw_q, event_q))
            sinking = tg.create_task(sink.run(event_q))
            while sent < len(data):
                try:
                    sent += os.write(pipe.w, data[sent : sent + 65536])
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            pipe.close_writer()
            await wait_until(lambda: sink.rows_written == total, what="every row")
            stop.set()
            await reading
            await raw_q.put(END_OF_STREAM)
            await sinking
    finally:
        if not reading.done():
            reading.cancel()
    stored = await messages(pg_conn)
    assert [m[:6] for m in stored] == [f"{i:06d}" for i in range(total)]
    assert source.status()["spool_full"] >= 1
    assert source.writer.segments_deleted > 0


async def test_a_traceback_is_one_row_as_in_a_file(
    env: Any, pipe: Pipe, pg_conn: asyncpg.Connection
) -> None:
    settings, sink = await env()
    source = new_source(settings, pipe.r, sink, exit_on_eof=True)
    pipeline = Pipeline(source, sink, SystemClock()).start()
    pipe.write(
        b"ERROR:app.jobs:job 7 failed\n"
        b"Traceback (most recent call last):\n"
        b'  File "/app/jobs.py", line 3, in run\n'
        b"    explode()\n"
        b"ValueError: boom\n"
        b"INFO:app.jobs:job 8 done\n"
    )
    pipe.close_writer()
    assert pipeline.task is not None
    async with asyncio.timeout(20):
        await pipeline.task
    rows = await pg_conn.fetch("SELECT level, message, meta FROM system_logs ORDER BY id")
    assert [r["level"] for r in rows] == ["ERROR", "INFO"]
    assert rows[0]["message"].startswith("job 7 failed\nTraceback")
    assert orjson.loads(rows[0]["meta"])["exc_type"] == "ValueError"


async def test_docker_json_lines_are_framed_as_in_a_file(
    env: Any, pipe: Pipe, pg_conn: asyncpg.Connection
) -> None:
    settings, sink = await env()
    config = stdin_config(format="docker")
    source = new_source(settings, pipe.r, sink, config=config, exit_on_eof=True)
    pipeline = Pipeline(source, sink, SystemClock()).start()
    docker = [
        {"log": "split in ", "stream": "stderr", "time": "2026-11-26T10:00:00.5Z"},
        {"log": "two pieces\n", "stream": "stderr", "time": "2026-11-26T10:00:00.6Z"},
        {"log": "whole\n", "stream": "stdout", "time": "2026-11-26T10:00:01Z"},
    ]
    pipe.write(b"".join(orjson.dumps(d) + b"\n" for d in docker))
    pipe.close_writer()
    assert pipeline.task is not None
    async with asyncio.timeout(20):
        await pipeline.task
    rows = await pg_conn.fetch("SELECT ts, message, meta FROM system_logs ORDER BY id")
    assert [r["message"] for r in rows] == ["split in two pieces", "whole"]
    assert [orjson.loads(r["meta"])["stream"] for r in rows] == ["stderr", "stdout"]
    assert rows[0]["ts"] == datetime(2026, 11, 26, 10, 0, 0, 500000, tzinfo=UTC)


async def test_a_regular_file_as_standard_input_is_read_to_its_end(
    env: Any, tmp_path: Path, pg_conn: asyncpg.Connection
) -> None:
    settings, sink = await env()
    path = tmp_path / "old.log"
    path.write_bytes(text(lines("old ", 2000)))
    with path.open("rb") as f:
        source = new_source(settings, f.fileno(), sink, exit_on_eof=True)
        pipeline = Pipeline(source, sink, SystemClock()).start()
        assert pipeline.task is not None
        async with asyncio.timeout(20):
            await pipeline.task
    assert source.status()["input"] == "file"
    assert source.progress() == (path.stat().st_size, path.stat().st_size)
    assert await messages(pg_conn) == lines("old ", 2000)


async def test_dev_null_or_a_closed_stdin_idles_in_daemon_mode_until_stop(env: Any) -> None:
    settings, _ = await env()
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        for fd, kind in ((devnull, "device"), (_closed_fd(), "closed")):
            source = new_source(settings, fd)
            running = RunningSource(source)
            await wait_until(lambda s=source: s.status()["at_end"], what="the end at once")
            assert source.status()["input"] == kind and source.status()["state"] == "ok"
            assert not running.task.done()  # idles: a daemon source ends only on stop
            await running.close()
            assert running.chunks == [] and source.status()["state"] == "stopped"
    finally:
        os.close(devnull)


async def test_stop_spools_and_feeds_what_was_received_then_returns(
    env: Any, pipe: Pipe, pg_conn: asyncpg.Connection
) -> None:
    settings, sink = await env()
    source = new_source(settings, pipe.r, sink)
    pipeline = Pipeline(source, sink, SystemClock()).start()
    pipe.write(text(lines("d", 10)) + b"unfinished")
    await wait_until(lambda: source.bytes_read == len(text(lines("d", 10))) + 10, what="read")
    await pipeline.drain()  # the writer is still open: stop, not the end of the input
    assert await messages(pg_conn) == [*lines("d", 10), "unfinished"]
    assert not source.status()["at_end"]


async def test_a_terminal_is_read_until_ctrl_d_and_left_in_blocking_mode(
    env: Any, pg_conn: asyncpg.Connection
) -> None:
    settings, sink = await env()
    master, slave = pty.openpty()
    try:
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO  # what is typed is not echoed back to the master
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        source = new_source(settings, slave, sink, exit_on_eof=True)
        pipeline = Pipeline(source, sink, SystemClock()).start()
        os.write(master, b"typed 1\ntyped 2\n")
        await wait_until(lambda: sink.rows_written == 2, what="the typed lines")
        assert source.status()["input"] == "terminal"
        assert not os.get_blocking(slave)  # the loop reads it without blocking
        os.write(master, b"\x04")  # Ctrl-D: the end of the input
        assert pipeline.task is not None
        async with asyncio.timeout(20):
            await pipeline.task
        assert os.get_blocking(slave)  # as the shell expects it back
    finally:
        os.close(master)
        os.close(slave)
    assert await messages(pg_conn) == ["typed 1", "typed 2"]


def _closed_fd() -> int:
    """A descriptor number that is not open (standard input closed at start)."""
    fd = 900
    while True:
        try:
            os.fstat(fd)
        except OSError:
            return fd
        fd += 1
