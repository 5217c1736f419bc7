"""FileSource against real files in tmp_path: real appends, renames, truncates; no mocks."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forwarder.clock import SystemClock
from forwarder.config import FileSourceConfig
from forwarder.event import Position, RawChunk
from forwarder.sources import file as file_module
from forwarder.sources.file import FileSource, FileTarget, own_output_identities
from tests.support import FakeClock, wait_until


def make_config(tmp_path: Path, **overrides: Any) -> FileSourceConfig:
    """Raw lines, no grouping: these tests are about following files. (With the default
    multiline mode every last line would wait for a traceback that may follow it;
    grouping, and positions while records are held, are tested in test_file_records.)"""
    fields: dict[str, Any] = {
        "type": "file",
        "name": "files",
        "service": "app",
        "paths": [str(tmp_path / "*.log")],
        "poll_interval_s": 0.01,
        "glob_interval_s": 0.05,
        "rotate_wait_s": 1.0,
        "multiline": {"mode": "off"},
    }
    fields.update(overrides)
    return FileSourceConfig(**fields)


def stream_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}"


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def numbered(start: int, stop: int) -> bytes:
    return b"".join(b"line %06d\n" % i for i in range(start, stop))


def numbers(lines: list[bytes]) -> list[int]:
    return [int(line.split()[1]) for line in lines]


async def test_appended_lines_are_read(tmp_path: Path, tail: Callable[..., Any]) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"one\ntwo\n")
    t = await tail(make_config(tmp_path))
    assert await t.wait_lines(2) == [b"one", b"two"]
    append(log, b"three\n")
    assert await t.wait_lines(3) == [b"one", b"two", b"three"]
    chunk = t.chunks[-1]
    assert (chunk.source, chunk.service, chunk.truncated) == ("files", "app", frozenset())
    assert t.source.lines_read == 3
    assert t.source.bytes_read == log.stat().st_size


async def test_file_created_after_start_is_read_from_head(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    (tmp_path / "old.log").write_bytes(b"existing\n")
    t = await tail(make_config(tmp_path, read_from="tail"))
    (tmp_path / "new.log").write_bytes(b"first\nsecond\n")
    assert await t.wait_lines(2) == [b"first", b"second"]


async def test_read_from_tail_skips_existing_content(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"old 1\nold 2\n")
    t = await tail(make_config(tmp_path, read_from="tail"))
    assert t.source.status()["files"][0]["offset"] == log.stat().st_size
    append(log, b"new 1\n")
    assert await t.wait_lines(1) == [b"new 1"]
    assert t.chunks[0].position is not None
    assert t.chunks[0].position.offset == log.stat().st_size


async def test_read_from_tail_skips_the_rest_of_a_line_being_written(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"old 1\nold 2 is being wri")
    t = await tail(make_config(tmp_path, read_from="tail"))
    append(log, b"tten\nnew 1\n")
    assert await t.wait_lines(1) == [b"new 1"]
    assert t.chunks[0].position is not None
    assert t.chunks[0].position.offset == log.stat().st_size


async def test_restart_from_checkpoint_repeats_no_line(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(numbered(0, 2000))
    config = make_config(tmp_path, read_budget_bytes=4096)
    first = await tail(config)
    await first.wait_lines(2000)
    await first.close()
    # Resume from a checkpoint in the middle, as if only the first chunks were committed.
    checkpoint = first.chunks[2].position
    assert checkpoint is not None
    done = sum(len(c.lines) for c in first.chunks[:3])
    append(log, numbered(2000, 2100))
    second = await tail(config, checkpoints={checkpoint.stream: checkpoint})
    lines = await second.wait_lines(2100 - done)
    assert numbers(lines) == list(range(done, 2100))


async def test_checkpoint_of_another_file_with_the_same_inode_starts_at_zero(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"new file 1\nnew file 2\n")
    other = b"an older file that had this inode\n"
    checkpoint = Position(
        "files",
        stream_key(log),
        11,
        {"path": str(log), "fp": hashlib.sha1(other).hexdigest(), "fp_len": len(other) - 12},
    )
    t = await tail(make_config(tmp_path), checkpoints={checkpoint.stream: checkpoint})
    assert await t.wait_lines(2) == [b"new file 1", b"new file 2"]


async def test_checkpoint_on_a_file_now_shorter_than_its_fingerprint_starts_at_zero(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"a\nb\n")
    old = b"a\nb\nc\nd\n"
    checkpoint = Position(
        "files",
        stream_key(log),
        4,
        {"path": str(log), "fp": hashlib.sha1(old).hexdigest(), "fp_len": len(old)},
    )
    t = await tail(make_config(tmp_path), checkpoints={checkpoint.stream: checkpoint})
    assert await t.wait_lines(2) == [b"a", b"b"]


async def test_positions_are_exact(tmp_path: Path, tail: Callable[..., Any]) -> None:
    log = tmp_path / "app.log"
    body = b"".join(b"%d %s\n" % (i, b"x" * (i % 97)) for i in range(3000))
    log.write_bytes(body + b"unfinished")
    config = make_config(tmp_path, read_budget_bytes=4096, fingerprint_bytes=64)
    t = await tail(config)
    await t.wait_lines(3000)
    consumed = 0
    key = stream_key(log)
    for chunk in t.chunks:
        consumed += sum(len(line) + 1 for line in chunk.lines)
        assert chunk.position == Position(
            "files",
            key,
            consumed,
            {"path": str(log), "fp": hashlib.sha1(body[:64]).hexdigest(), "fp_len": 64},
        )
    assert consumed == len(body)


async def test_fingerprint_covers_a_small_file_whole(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"a\r\nbb\n\nccc")
    t = await tail(make_config(tmp_path))
    assert await t.wait_lines(3) == [b"a", b"bb", b""]
    position = t.chunks[-1].position
    assert position is not None
    assert position.offset == 7
    content = log.read_bytes()
    assert position.detail == {
        "path": str(log),
        "fp": hashlib.sha1(content).hexdigest(),
        "fp_len": len(content),
    }


async def test_crlf_lines_lose_their_cr(tmp_path: Path, tail: Callable[..., Any]) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"one\r\ntwo\r\n")
    t = await tail(make_config(tmp_path))
    assert await t.wait_lines(2) == [b"one", b"two"]
    assert t.chunks[-1].position is not None
    assert t.chunks[-1].position.offset == 10


async def test_partial_last_line_is_held_until_completed(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"one\ntw")
    t = await tail(make_config(tmp_path))
    await wait_until(lambda: t.source.bytes_read == 6, what="partial line read")
    assert t.lines == [b"one"]
    append(log, b"o\nthr")
    assert await t.wait_lines(2) == [b"one", b"two"]
    await t.close()
    # Stopping does not emit the unfinished "thr": it is re-read after a restart.
    assert t.lines == [b"one", b"two"]
    assert t.chunks[-1].position is not None
    assert t.chunks[-1].position.offset == 8


async def test_exit_on_eof_emits_the_partial_line_and_returns(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_bytes(numbered(0, 500) + b"last without newline")
    b.write_bytes(b"b1\n")
    config = make_config(tmp_path, read_budget_bytes=4096)
    source = FileSource(config, {}, SystemClock(), exit_on_eof=True)
    assert source.progress() == (0, 0)
    queue: asyncio.Queue[RawChunk] = asyncio.Queue()
    await asyncio.wait_for(source.run(queue, asyncio.Event()), 10)
    chunks = [queue.get_nowait() for _ in range(queue.qsize())]
    of_a = [c for c in chunks if c.position and c.position.stream == stream_key(a)]
    of_b = [c for c in chunks if c.position and c.position.stream == stream_key(b)]
    assert len(of_a) + len(of_b) == len(chunks)
    lines_a = [line for c in of_a for line in c.lines]
    assert numbers(lines_a[:-1]) == list(range(500))
    assert lines_a[-1] == b"last without newline"
    assert [line for c in of_b for line in c.lines] == [b"b1"]
    assert of_a[-1].position is not None
    assert of_a[-1].position.offset == a.stat().st_size
    total = a.stat().st_size + b.stat().st_size
    assert source.progress() == (total, total)
    assert source.status()["state"] == "stopped"
    assert source.status()["files"] == []


async def test_ten_megabyte_line_is_cut_and_flagged(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"first\n" + b"x" * 10_000_000 + b"\nafter 1\nafter 2\n")
    t = await tail(make_config(tmp_path, max_line_bytes=1024))
    await t.wait_lines(4)
    assert t.flagged() == [
        (b"first", False),
        (b"x" * 1024, True),
        (b"after 1", False),
        (b"after 2", False),
    ]
    assert t.source.lines_truncated == 1
    assert t.chunks[-1].position is not None
    assert t.chunks[-1].position.offset == log.stat().st_size


class Writer:
    """Appends numbered lines like a logger holding its file open (O_APPEND)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.next = 0
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, count: int = 1) -> None:
        os.write(self.fd, numbered(self.next, self.next + count))
        self.next += count

    def reopen(self) -> None:
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        os.close(self.fd)


async def test_rename_and_create_rotation_while_writing_loses_nothing(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    log = tmp_path / "app.log"
    writer = Writer(log)
    writer.write(10)
    config = make_config(tmp_path, paths=[str(log)], read_budget_bytes=4096)
    t = await tail(config)
    total = 3000
    rotate_at = [1000, 2000]
    try:
        while writer.next < total:
            writer.write(7)
            if rotate_at and writer.next >= rotate_at[0]:
                rotate_at.pop(0)
                # Rename; the writer keeps its fd and writes on until the source has seen
                # the rename (and a bit more), then reopens the path, creating a new file.
                os.rename(log, tmp_path / f"app.log.{writer.next}")
                seen = t.source.rotations_detected
                while t.source.rotations_detected == seen:
                    writer.write(7)
                    await asyncio.sleep(0.001)
                writer.write(30)
                writer.reopen()
            await asyncio.sleep(0.001)
    finally:
        writer.close()
    lines = await t.wait_lines(writer.next)
    assert sorted(numbers(lines)) == list(range(writer.next))
    assert len(lines) == writer.next  # none duplicated
    # Within one file, lines come in order.
    for key in {c.position.stream for c in t.chunks if c.position}:
        of_file = [
            n for c in t.chunks if c.position and c.position.stream == key for n in numbers(c.lines)
        ]
        assert of_file == sorted(of_file)
    assert t.source.rotations_detected == 2


async def test_rotated_file_is_read_until_rotate_wait_then_closed(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    clock = FakeClock()
    log, rotated = tmp_path / "app.log", tmp_path / "app.log.1"
    log.write_bytes(b"old 1\n")
    config = make_config(tmp_path, paths=[str(log)], glob_interval_s=1.0, rotate_wait_s=5.0)
    t = await tail(config, clock=clock)
    await t.wait_lines(1)
    old_key = stream_key(log)
    os.rename(log, rotated)
    log.write_bytes(b"new 1\n")
    clock.advance(1.0)
    await t.wait_lines(2)
    assert t.source.rotations_detected == 1
    files = {f["stream"]: f["rotated"] for f in t.source.status()["files"]}
    assert files == {old_key: True, stream_key(log): False}
    # The old file is still read while the writer has not let go of it yet.
    append(rotated, b"old 2\nold 3 unfinished")
    await t.wait_lines(3)
    clock.advance(4.9)
    await t.wait_scans()
    assert len(t.source.status()["files"]) == 2
    clock.advance(0.2)
    await wait_until(lambda: len(t.source.status()["files"]) == 1, what="old file closed")
    # Nothing will complete the old file's last line any more: it is emitted on closing.
    assert t.lines == [b"old 1", b"new 1", b"old 2", b"old 3 unfinished"]
    assert t.chunks[-1].position is not None
    assert t.chunks[-1].position.offset == rotated.stat().st_size


async def test_rotated_file_that_is_deleted_is_read_to_its_end_and_closed(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    clock = FakeClock()
    log, rotated = tmp_path / "app.log", tmp_path / "app.log.1"
    log.write_bytes(b"old 1\n")
    config = make_config(tmp_path, paths=[str(log)], glob_interval_s=1.0, rotate_wait_s=60.0)
    t = await tail(config, clock=clock)
    await t.wait_lines(1)
    os.rename(log, rotated)
    log.write_bytes(b"new 1\n")
    append(rotated, b"old 2\n")
    rotated.unlink()
    new_key = stream_key(log)
    clock.advance(1.0)
    await t.wait_lines(3)
    await wait_until(
        lambda: [f["stream"] for f in t.source.status()["files"]] == [new_key],
        what="deleted file closed",
    )
    assert sorted(t.lines) == [b"new 1", b"old 1", b"old 2"]


async def test_rotated_file_that_comes_back_resumes_where_it_was(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    clock = FakeClock()
    log, rotated = tmp_path / "app.log", tmp_path / "app.log.1"
    log.write_bytes(numbered(0, 10))
    config = make_config(tmp_path, paths=[str(log)], glob_interval_s=1.0, rotate_wait_s=5.0)
    t = await tail(config, clock=clock)
    await t.wait_lines(10)
    os.rename(log, rotated)
    clock.advance(1.0)
    await t.wait_scans()
    clock.advance(5.0)
    await wait_until(lambda: t.source.status()["files"] == [], what="rotated file closed")
    os.rename(rotated, log)
    append(log, numbered(10, 12))
    clock.advance(1.0)
    lines = await t.wait_lines(12)
    assert numbers(lines) == list(range(12))


async def test_copytruncate_restarts_at_zero(tmp_path: Path, tail: Callable[..., Any]) -> None:
    log = tmp_path / "app.log"
    writer = Writer(log)
    config = make_config(tmp_path, paths=[str(log)])
    t = await tail(config)
    writing = asyncio.Event()
    writing.set()

    async def write_lines(total: int) -> None:
        while writer.next < total:
            await writing.wait()
            writer.write(5)
            await asyncio.sleep(0.001)

    task = asyncio.create_task(write_lines(1000))
    try:
        await wait_until(lambda: writer.next >= 500, what="first half written")
        writing.clear()  # the writer pauses after at most the line it is on
        await asyncio.sleep(0)
        written = writer.next
        await t.wait_lines(written)
        shutil.copyfile(log, tmp_path / "app.log.1")
        os.truncate(log, 0)
        await wait_until(lambda: t.source.truncations_detected == 1, what="truncation noticed")
        writing.set()
        await asyncio.wait_for(task, 20)
    finally:
        task.cancel()
        writer.close()
    lines = await t.wait_lines(1000)
    assert numbers(lines) == list(range(1000))
    last = t.chunks[-1].position
    assert last is not None
    assert last.offset == log.stat().st_size


async def test_flooded_file_does_not_starve_another(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    big, small = tmp_path / "a.log", tmp_path / "b.log"
    big.write_bytes(numbered(0, 400_000))  # ~4.8 MB
    small.write_bytes(b"small 1\nsmall 2\n")
    t = await tail(make_config(tmp_path, read_budget_bytes=65536), queue_size=0)
    await wait_until(lambda: b"small 2" in t.lines, what="small file read")
    streams = [c.position.stream for c in t.drain() if c.position]
    first_small = streams.index(stream_key(small))
    assert first_small <= 1  # within the first round
    # ...and before it, at most one read budget of the big file.
    assert sum(len(line) + 1 for c in t.chunks[:first_small] for line in c.lines) <= 65536
    await t.wait_lines(400_002)


async def test_missing_path_is_waited_for(tmp_path: Path, tail: Callable[..., Any]) -> None:
    later = tmp_path / "sub" / "later.log"
    t = await tail(make_config(tmp_path, paths=[str(later)], read_from="tail"))
    assert t.source.status()["files"] == []
    await t.wait_scans(2)
    later.parent.mkdir()
    later.write_bytes(b"hello\n")
    assert await t.wait_lines(1) == [b"hello"]


async def test_excluded_paths_are_not_read(tmp_path: Path, tail: Callable[..., Any]) -> None:
    (tmp_path / "app.log").write_bytes(b"kept\n")
    (tmp_path / "debug.log").write_bytes(b"excluded\n")
    t = await tail(make_config(tmp_path, exclude=["*/debug*"]))
    await t.wait_lines(1)
    await t.wait_scans(2)
    assert t.lines == [b"kept"]


async def test_directories_and_fifos_are_skipped_with_one_warning_each(
    tmp_path: Path, tail: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "dir.log").mkdir()
    os.mkfifo(tmp_path / "fifo.log")  # opening it for reading must not block the source
    (tmp_path / "app.log").write_bytes(b"a\n")
    caplog.set_level(logging.WARNING, logger="forwarder.sources.file")
    t = await tail(make_config(tmp_path))
    await t.wait_lines(1)
    await t.wait_scans(3)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(r.getMessage().split(":")[0] for r in warnings) == [
        f"skipping {tmp_path / 'dir.log'}",
        f"skipping {tmp_path / 'fifo.log'}",
    ]
    for record in warnings:
        assert getattr(record, "component", None) == "source.file"
        assert getattr(record, "source", None) == "files"
    assert t.source.status()["state"] == "ok"


async def test_stop_returns_promptly_when_idle(tmp_path: Path, tail: Callable[..., Any]) -> None:
    (tmp_path / "app.log").write_bytes(b"a\n")
    t = await tail(make_config(tmp_path, poll_interval_s=60.0, glob_interval_s=60.0))
    await t.wait_lines(1)
    t.stop.set()
    await asyncio.wait_for(t.task, 1.0)
    assert t.source.status()["state"] == "stopped"


async def test_stop_returns_promptly_when_the_queue_is_full(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    (tmp_path / "app.log").write_bytes(numbered(0, 10_000))
    t = await tail(make_config(tmp_path, read_budget_bytes=4096), queue_size=1)
    await wait_until(t.queue.full, what="queue full")
    t.stop.set()
    await asyncio.wait_for(t.task, 1.0)
    assert t.source.lines_read == len(t.queue.get_nowait().lines)


async def test_truncation_drops_the_held_partial_line(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"one\nunfinished")
    t = await tail(make_config(tmp_path))
    await wait_until(lambda: t.source.bytes_read == 14, what="partial line read")
    os.truncate(log, 0)
    await wait_until(lambda: t.source.truncations_detected == 1, what="truncation noticed")
    append(log, b"two\n")
    assert await t.wait_lines(2) == [b"one", b"two"]
    assert t.chunks[-1].position is not None
    assert t.chunks[-1].position.offset == 4


def identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def lines_of(chunks: list[RawChunk], key: str) -> list[bytes]:
    return [line for c in chunks if c.position and c.position.stream == key for line in c.lines]


async def rotate_while_down(
    tmp_path: Path, tail: Callable[..., Any], config: FileSourceConfig
) -> tuple[Position, str]:
    """Read app.log (lines 0-9) and stop; then, while down, the writer appends lines 10-14
    and an unfinished line, and logrotate renames app.log to app.log.1 and creates a new
    app.log (lines 100-102). Returns the last committed position and the old file's key."""
    log = tmp_path / "app.log"
    log.write_bytes(numbered(0, 10))
    first = await tail(config)
    await first.wait_lines(10)
    await first.close()
    checkpoint = first.chunks[-1].position
    assert checkpoint is not None
    append(log, numbered(10, 15) + b"unfinished")
    old_key = stream_key(log)
    os.rename(log, tmp_path / "app.log.1")
    log.write_bytes(numbered(100, 103))
    return checkpoint, old_key


async def test_file_rotated_while_down_is_read_from_its_checkpoint(
    tmp_path: Path, tail: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    log, rotated = tmp_path / "app.log", tmp_path / "app.log.1"
    config = make_config(tmp_path, paths=[str(log)], glob_interval_s=1.0, rotate_wait_s=5.0)
    checkpoint, old_key = await rotate_while_down(tmp_path, tail, config)
    caplog.set_level(logging.INFO, logger="forwarder.sources.file")
    t = await tail(config, checkpoints={checkpoint.stream: checkpoint}, clock=clock)
    files = {f["stream"]: (f["path"], f["rotated"]) for f in t.source.status()["files"]}
    assert files == {old_key: (str(rotated), True), stream_key(log): (str(log), False)}
    recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert len(recovered) == 1
    assert str(rotated) in recovered[0]
    assert f"offset {checkpoint.offset}" in recovered[0]
    await t.wait_lines(8)
    # Read to its end, then closed after rotate_wait_s without growth like any rotated
    # file; nothing completes its unfinished last line any more, so that is emitted.
    clock.advance(5.0)
    await wait_until(lambda: len(t.source.status()["files"]) == 1, what="old file closed")
    assert numbers(lines_of(t.drain(), stream_key(log))) == [100, 101, 102]
    old_lines = lines_of(t.drain(), old_key)
    assert numbers(old_lines[:-1]) == list(range(10, 15))
    assert old_lines[-1] == b"unfinished"
    last = [c.position for c in t.chunks if c.position and c.position.stream == old_key][-1]
    assert last is not None
    assert (last.offset, last.detail["path"]) == (rotated.stat().st_size, str(rotated))


async def test_file_rotated_while_down_is_read_to_its_end_with_exit_on_eof(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    log = tmp_path / "app.log"
    config = make_config(tmp_path, paths=[str(log)])
    checkpoint, old_key = await rotate_while_down(tmp_path, tail, config)
    source = FileSource(config, {checkpoint.stream: checkpoint}, SystemClock(), exit_on_eof=True)
    queue: asyncio.Queue[RawChunk] = asyncio.Queue()
    await asyncio.wait_for(source.run(queue, asyncio.Event()), 10)
    chunks = [queue.get_nowait() for _ in range(queue.qsize())]
    assert numbers(lines_of(chunks, stream_key(log))) == [100, 101, 102]
    old_lines = lines_of(chunks, old_key)
    assert numbers(old_lines[:-1]) == list(range(10, 15))
    assert old_lines[-1] == b"unfinished"


@pytest.mark.parametrize("case", ["nothing new", "another file", "path not watched any more"])
async def test_file_rotated_while_down_is_left_alone_unless_it_is_ours_and_grew(
    tmp_path: Path, tail: Callable[..., Any], case: str
) -> None:
    log, rotated = tmp_path / "app.log", tmp_path / "app.log.1"
    config = make_config(tmp_path, paths=[str(log)])
    log.write_bytes(numbered(0, 10))
    first = await tail(config)
    await first.wait_lines(10)
    await first.close()
    checkpoint = first.chunks[-1].position
    assert checkpoint is not None
    if case != "nothing new":
        append(log, numbered(10, 15))
    os.rename(log, rotated)
    log.write_bytes(numbered(100, 103))
    if case == "another file":  # same inode, other content: the inode was reused
        other = numbered(50, 60)
        detail = {**checkpoint.detail, "fp": hashlib.sha1(other).hexdigest()}
        checkpoint = Position(checkpoint.source, checkpoint.stream, checkpoint.offset, detail)
    if case == "path not watched any more":
        config = make_config(tmp_path, paths=[str(tmp_path / "new.log")])
        log.rename(tmp_path / "new.log")
        log = tmp_path / "new.log"
    t = await tail(config, checkpoints={checkpoint.stream: checkpoint})
    assert [f["stream"] for f in t.source.status()["files"]] == [stream_key(log)]
    await t.wait_lines(3)
    await t.wait_scans(2)
    assert numbers(t.lines) == [100, 101, 102]


async def test_copytruncate_rewritten_past_the_offset_between_polls_restarts_at_zero(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    clock = FakeClock()
    log = tmp_path / "app.log"
    log.write_bytes(numbered(0, 10))
    config = make_config(tmp_path, paths=[str(log)], glob_interval_s=1.0, fingerprint_bytes=16)
    t = await tail(config, clock=clock)
    await t.wait_lines(10)
    append(log, numbered(10, 20))  # growth: the head is compared (it matches)
    await t.wait_lines(20)
    # copytruncate, then the writer writes past the old offset (240) before the source
    # polls again: nothing here awaits, so the source cannot run in between.
    shutil.copyfile(log, tmp_path / "app.log.1")
    os.truncate(log, 0)
    rewritten = [b"rewritten %06d" % i for i in range(30)]
    append(log, b"".join(line + b"\n" for line in rewritten))
    assert log.stat().st_size > 240
    clock.advance(1.0)  # the head was compared at the last growth: once per glob_interval_s
    await t.wait_lines(50)
    clock.advance(1.0)
    await t.wait_scans()  # and a round after it: nothing more
    assert t.lines == [b"line %06d" % i for i in range(20)] + rewritten
    assert t.source.truncations_detected == 1
    assert t.chunks[-1].position is not None
    assert t.chunks[-1].position.offset == log.stat().st_size


async def test_short_fingerprint_is_compared_at_every_growth(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    """A fingerprint shorter than fingerprint_bytes (the file was shorter) is compared and
    extended at each growth, not once per glob_interval_s: extending it over rewritten
    bytes unchecked would hide the rewrite for good."""
    clock = FakeClock()
    log = tmp_path / "app.log"
    log.write_bytes(numbered(0, 5))
    config = make_config(tmp_path, paths=[str(log)], glob_interval_s=1.0)
    t = await tail(config, clock=clock)
    await t.wait_lines(5)
    append(log, numbered(5, 10))
    await t.wait_lines(10)
    os.truncate(log, 0)
    rewritten = [b"rewritten %06d" % i for i in range(10)]
    append(log, b"".join(line + b"\n" for line in rewritten))  # 170 > 120 bytes
    await t.wait_lines(20)
    clock.advance(1.0)
    await t.wait_scans()  # and a round after it: nothing more
    assert t.lines == [b"line %06d" % i for i in range(10)] + rewritten
    assert t.source.truncations_detected == 1


async def test_head_is_compared_at_most_once_per_glob_interval(
    tmp_path: Path, tail: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    hashes: list[bytes] = []
    real_sha1 = file_module._sha1

    def counting_sha1(data: bytes) -> str:
        hashes.append(data)
        return real_sha1(data)

    monkeypatch.setattr(file_module, "_sha1", counting_sha1)
    clock = FakeClock()
    log = tmp_path / "app.log"
    log.write_bytes(numbered(0, 10))
    config = make_config(tmp_path, paths=[str(log)], glob_interval_s=1.0, fingerprint_bytes=16)
    t = await tail(config, clock=clock)
    await t.wait_lines(10)
    assert len(hashes) == 1  # the fingerprint, taken with the first chunk
    for i in range(10, 14):  # four growths within one glob_interval_s: one comparison
        append(log, numbered(i, i + 1))
        await t.wait_lines(i + 1)
    assert len(hashes) == 2
    clock.advance(1.0)
    append(log, numbered(14, 15))
    await t.wait_lines(15)
    assert len(hashes) == 3
    assert hashes[1:] == [log.read_bytes()[:16]] * 2


async def test_own_output_is_skipped_with_one_warning(
    tmp_path: Path, tail: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "app.log").write_bytes(b"a\n")
    own = tmp_path / "forwarder.log"
    own.write_bytes(b"our own log line\n")
    caplog.set_level(logging.WARNING, logger="forwarder.sources.file")
    t = await tail(make_config(tmp_path), ignore_identities=frozenset({identity(own)}))
    await t.wait_lines(1)
    append(own, b"another of our lines\n")
    await t.wait_scans(3)
    # By identity, not by name.
    renamed = tmp_path / "forwarder-1.log"
    own.rename(renamed)
    await t.wait_scans(3)
    assert t.lines == [b"a"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"skipping {path}: it is the forwarder's own output (its stdout or stderr); "
        "reading it would feed the forwarder its own logs"
        for path in (own, renamed)
    ]


def test_own_output_identities_are_the_regular_files_on_stdout_and_stderr(
    tmp_path: Path,
) -> None:
    script = (
        "import json\n"
        "from forwarder.sources.file import own_output_identities\n"
        "print(json.dumps(sorted(own_output_identities())), flush=True)\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    err, out = tmp_path / "forwarder.log", tmp_path / "out.txt"

    def run(stdout: Any, stderr: Any) -> subprocess.CompletedProcess[bytes]:
        cmd = [sys.executable, "-c", script]
        return subprocess.run(cmd, stdout=stdout, stderr=stderr, env=env, check=True, timeout=60)

    with err.open("ab") as e:  # stdout a pipe: only stderr counts
        result = run(subprocess.PIPE, e)
    assert json.loads(result.stdout) == [list(identity(err))]
    with err.open("ab") as e, out.open("wb") as o:
        run(o, e)
    assert json.loads(out.read_bytes()) == sorted([list(identity(err)), list(identity(out))])
    with err.open("ab") as e:  # both on one file: one identity
        run(e, subprocess.STDOUT)
    assert json.loads(err.read_bytes().splitlines()[-1]) == [list(identity(err))]
    # And in this process (stdout and stderr are whatever pytest made them).
    assert all(len(i) == 2 for i in own_output_identities())


async def test_describe_names_the_service_and_meta_of_each_file_or_skips_it(
    tmp_path: Path, tail: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "api.log").write_bytes(b"from api\n")
    (tmp_path / "skip.log").write_bytes(b"never read\n")
    asked: list[str] = []

    def describe(path: str) -> FileTarget | None:
        asked.append(path)
        name = Path(path).stem
        if name == "skip":
            return None
        return FileTarget(service=f"svc-{name}", meta={"container_name": name})

    caplog.set_level(logging.DEBUG, logger=file_module.__name__)
    t = await tail(make_config(tmp_path), describe=describe)
    (tmp_path / "worker.log").write_bytes(b"from worker\n")
    await t.wait_lines(2)
    await t.wait_scans(2)
    by_line = {c.lines[0]: c for c in t.drain()}
    assert set(by_line) == {b"from api", b"from worker"}
    assert (by_line[b"from api"].service, by_line[b"from api"].meta) == (
        "svc-api",
        {"container_name": "api"},
    )
    assert by_line[b"from worker"].service == "svc-worker"
    assert by_line[b"from worker"].meta == {"container_name": "worker"}
    # The skipped file is asked about again at every scan (its container may be
    # described later), logged once, and never tracked.
    skip = str(tmp_path / "skip.log")
    assert asked.count(skip) >= 3
    assert asked.count(str(tmp_path / "api.log")) == 1
    assert [r.getMessage() for r in caplog.records].count(f"skipping {skip}: not described") == 1
    assert skip not in [f["path"] for f in t.source.status()["files"]]


async def test_without_describe_chunks_carry_the_configured_service_and_no_meta(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    (tmp_path / "app.log").write_bytes(b"x\n")
    t = await tail(make_config(tmp_path))
    await t.wait_lines(1)
    assert (t.chunks[0].service, t.chunks[0].meta) == ("app", None)
