"""FileSource with framing and grouping, on real files: records, flush timeout, positions.

The logs are real Python output (tests/fixtures/python_output.py) and container log
files written the way dockerd and containerd write them (tests/fixtures/container_logs.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from forwarder.clock import Clock, SystemClock
from forwarder.config import FileSourceConfig
from forwarder.event import Level, Position, RawChunk
from forwarder.pipeline.normalize import normalize_chunk
from forwarder.sources import file as file_module
from forwarder.sources.file import FileSource
from tests.fixtures.container_logs import Clocked, cri_lines, docker_entry, docker_file
from tests.fixtures.python_output import CASES, generate
from tests.support import FakeClock, RunningSource, wait_until

BIG = "".join(chr(ord("a") + i % 26) for i in range(40_000))  # split by dockerd in 3


def make_config(tmp_path: Path, **overrides: Any) -> FileSourceConfig:
    fields: dict[str, Any] = {
        "type": "file",
        "name": "files",
        "service": "app",
        "paths": [str(tmp_path / "*.log")],
        "poll_interval_s": 0.01,
        "glob_interval_s": 0.05,
        "rotate_wait_s": 1.0,
        "read_budget_bytes": 4096,  # records span reads
    }
    fields.update(overrides)
    return FileSourceConfig(**fields)


def python_log() -> tuple[bytes, list[bytes]]:
    """Every generated case, one after the other: the log and its records."""
    outputs = [generate(case) for case in CASES]
    log = b"".join(o.log for o in outputs)
    return log, [r.encode() for o in outputs for r in o.records]


def container_output(cases: tuple[str, ...] = CASES) -> tuple[list[tuple[str, str]], list[bytes]]:
    """What a container printed, as (stream, line), and the records it makes: every
    case on stderr, separated by a stdout line of 40 000 characters (split by dockerd)
    and a short stdout line."""
    printed: list[tuple[str, str]] = []
    records: list[bytes] = []
    for n, case in enumerate(cases):
        out = generate(case)
        printed += [("stderr", line) for line in out.log.decode().split("\n")[:-1]]
        records += [r.encode() for r in out.records]
        printed += [("stdout", BIG), ("stdout", f"tick {n}")]
        records += [BIG.encode(), f"tick {n}".encode()]
    return printed, records


class Run(RunningSource):
    """A running FileSource and everything it emitted so far."""

    @property
    def records(self) -> list[bytes]:
        return [line for chunk in self.drain() for line in chunk.lines]

    async def wait_records(self, n: int) -> list[bytes]:
        await wait_until(lambda: len(self.records) >= n, what=f"{n} records")
        return self.records

    async def wait_read(self, size: int) -> None:
        await wait_until(lambda: self.source.bytes_read >= size, what=f"{size} bytes read")


@pytest.fixture
async def run() -> AsyncIterator[Callable[..., Run]]:
    """Factory: run(config, checkpoints=..., clock=...) -> Run (already started)."""
    started: list[Run] = []

    def start(
        config: FileSourceConfig,
        *,
        checkpoints: dict[str, Position] | None = None,
        clock: Clock | None = None,
    ) -> Run:
        r = Run(FileSource(config, checkpoints or {}, clock or FakeClock()))
        started.append(r)
        return r

    yield start
    for r in started:
        if not r.task.done():
            await r.close()
        r.task.result()


async def read_to_end(
    config: FileSourceConfig, checkpoints: dict[str, Position] | None = None
) -> list[RawChunk]:
    """Run a source with exit_on_eof (every held record is released at the end)."""
    source = FileSource(config, checkpoints or {}, FakeClock(), exit_on_eof=True)
    queue: asyncio.Queue[RawChunk] = asyncio.Queue()
    await asyncio.wait_for(source.run(queue, asyncio.Event()), 30)
    chunks = []
    while not queue.empty():
        chunks.append(queue.get_nowait())
    return chunks


def payloads(chunks: list[RawChunk]) -> list[bytes]:
    return [line for chunk in chunks for line in chunk.lines]


def records_by_file(chunks: list[RawChunk]) -> dict[str, list[bytes]]:
    """Records per file (stream key), in the order emitted."""
    by_file: dict[str, list[bytes]] = {}
    for chunk in chunks:
        assert chunk.position is not None
        by_file.setdefault(chunk.position.stream, []).extend(chunk.lines)
    return by_file


# -- records ------------------------------------------------------------------------------


async def test_python_tracebacks_in_a_file_become_one_record_each(tmp_path: Path) -> None:
    log, expected = python_log()
    (tmp_path / "app.log").write_bytes(log)
    chunks = await read_to_end(make_config(tmp_path))
    assert payloads(chunks) == expected
    events = [e for c in chunks for e in normalize_chunk(c, FakeClock().now())]
    errors = [e for e in events if e.level == Level.ERROR]
    facts = [f for case in CASES for f in generate(case).facts]
    assert [(e.meta["exc_type"], e.meta["exc_message"]) for e in errors] == facts


async def test_docker_json_file_is_decoded_joined_and_grouped(tmp_path: Path) -> None:
    printed, expected = container_output()
    folder = tmp_path / "containers" / "c0ffee"
    folder.mkdir(parents=True)
    (folder / "c0ffee-json.log").write_bytes(docker_file(printed))
    config = make_config(
        tmp_path, paths=[str(tmp_path / "containers" / "*" / "*-json.log")], format="docker"
    )
    chunks = await read_to_end(config)
    assert payloads(chunks) == expected
    metas = [m for c in chunks for m in (c.line_meta or [None] * len(c.lines))]
    streams = [m["stream"] if m else None for m in metas]
    assert streams == [
        "stdout" if p == BIG.encode() or p.startswith(b"tick ") else "stderr" for p in expected
    ]
    times = [t for c in chunks for t in (c.times or [None] * len(c.lines))]
    assert all(t is not None and t.year == 2024 for t in times)
    events = [e for c in chunks for e in normalize_chunk(c, FakeClock().now())]
    for event, time, line in zip(events, times, expected, strict=True):
        # dockerd's time, unless the line has its own (the "prefixed" case's asctime)
        assert event.ts == time or (line[:1].isdigit() and event.ts.year > 2024)
    assert sum(1 for e in events if "exc_type" in e.meta) == sum(
        len(generate(c).facts) for c in CASES
    )


async def test_docker_streams_interleaved_inside_a_split_line(tmp_path: Path) -> None:
    clock = Clocked()
    pieces = docker_file([("stdout", BIG)], clock).splitlines(keepends=True)
    err = docker_file([("stderr", "while stdout is split")], clock)
    (tmp_path / "c-json.log").write_bytes(pieces[0] + err + b"".join(pieces[1:]))
    chunks = await read_to_end(make_config(tmp_path, paths=[str(tmp_path / "*.log")]))
    # format "raw": the wrappers are the records.
    assert len(payloads(chunks)) == 4
    chunks = await read_to_end(
        make_config(tmp_path, paths=[str(tmp_path / "*.log")], format="docker")
    )
    assert payloads(chunks) == [BIG.encode(), b"while stdout is split"]


async def test_docker_log_rotated_while_written_loses_and_repeats_nothing(
    tmp_path: Path, run: Callable[..., Run]
) -> None:
    printed, expected = container_output()
    folder = tmp_path / "abc123"
    folder.mkdir()
    log = folder / "abc123-json.log"
    data = docker_file(printed)
    lines = data.splitlines(keepends=True)
    # Rotate where a record ends: after the first case and the stdout lines after it.
    first_case = generate(CASES[0])
    cut = sum(map(len, lines[: len(first_case.log.splitlines()) + 4]))
    in_old_file = len(first_case.records) + 2
    clock = FakeClock()
    config = make_config(
        tmp_path, paths=[str(folder / "*-json.log")], format="docker", rotate_wait_s=5.0
    )
    log.write_bytes(data[: cut // 2])
    r = run(config, clock=clock)
    await r.wait_read(cut // 2)
    with log.open("ab") as f:  # dockerd appends, then rotates: rename, new file
        f.write(data[cut // 2 : cut])
    await r.wait_read(cut)
    old_key = f"{log.stat().st_dev}:{log.stat().st_ino}"
    log.rename(folder / "abc123-json.log.1")
    log.write_bytes(data[cut:])
    clock.advance(0.1)  # next scan: the path names a new file
    await r.wait_read(len(data))
    clock.advance(5.0)  # rotate_wait: the old file is closed; flush timeout: all released
    await r.wait_records(len(expected))
    await wait_until(lambda: not r.source.status()["files"][1:], what="rotated file closed")
    # Each file's records in order; the old file's last one is released when it is
    # closed (or after the flush timeout), so it may come after the new file's first.
    by_file = records_by_file(r.chunks)
    assert by_file.pop(old_key) == expected[:in_old_file]
    assert list(by_file.values()) == [expected[in_old_file:]]
    assert r.source.status()["rotations_detected"] >= 1


async def test_traceback_cut_by_a_rotation_keeps_every_line_once(
    tmp_path: Path, run: Callable[..., Run]
) -> None:
    out = generate("chained")
    lines = out.log.decode().split("\n")[:-1]
    at = [i for i, line in enumerate(lines) if line.startswith("  File")][2]
    data = docker_file(("stderr", line) for line in lines)
    entries = data.splitlines(keepends=True)
    log = tmp_path / "x-json.log"
    log.write_bytes(b"".join(entries[:at]))
    clock = FakeClock()
    r = run(make_config(tmp_path, paths=[str(log)], format="docker"), clock=clock)
    await r.wait_read(log.stat().st_size)
    old_key = f"{log.stat().st_dev}:{log.stat().st_ino}"
    log.rename(tmp_path / "x-json.log.1")
    log.write_bytes(b"".join(entries[at:]))
    clock.advance(0.1)
    await r.wait_read(len(data))
    clock.advance(1.0)
    await wait_until(lambda: b"\n".join(r.records).count(b"\n") + 1 == len(lines), what="all")
    # Per-file grouping: the traceback is split where the file was rotated; the old
    # file's part is released when it is closed, maybe after the new file's records.
    by_file = records_by_file(r.chunks)
    assert b"\n".join(by_file.pop(old_key)).decode() == "\n".join(lines[:at])
    assert [b"\n".join(v).decode() for v in by_file.values()] == ["\n".join(lines[at:])]
    assert len(r.records) == len(out.records) + 1


async def test_cri_partial_lines_and_tracebacks(tmp_path: Path) -> None:
    out = generate("logger_exception")
    cri: list[bytes] = []
    for n, line in enumerate(out.log.decode().split("\n")[:-1]):
        time = f"2024-06-01T12:00:{n:02d}.123456789+00:00"
        cri += cri_lines("stderr", line, time, piece=10)
        if n == 0:
            cri += cri_lines("stdout", BIG, time)
    (tmp_path / "pod.log").write_bytes(b"".join(line + b"\n" for line in cri))
    chunks = await read_to_end(make_config(tmp_path, format="cri"))
    expected = [out.records[0].encode(), BIG.encode(), *(r.encode() for r in out.records[1:])]
    assert payloads(chunks) == expected


async def test_malformed_wrapper_lines_are_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = docker_entry("stdout", "fine\n", "2024-06-01T12:00:00Z")
    (tmp_path / "c-json.log").write_bytes(b"garbage 1\n" + good + b"\ngarbage 2\n")
    config = make_config(tmp_path, format="docker")
    source = FileSource(config, {}, FakeClock(), exit_on_eof=True)
    queue: asyncio.Queue[RawChunk] = asyncio.Queue()
    with caplog.at_level(logging.WARNING, logger=file_module.__name__):
        await source.run(queue, asyncio.Event())
    assert source.status()["decode_errors"] == 2
    assert sum("are not docker lines" in r.getMessage() for r in caplog.records) == 1


# -- flush timeout -----------------------------------------------------------------------


async def test_flush_timeout_releases_the_last_record(
    tmp_path: Path, run: Callable[..., Run]
) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"INFO:root:one\nERROR:root:two\n")
    clock = FakeClock()
    r = run(make_config(tmp_path), clock=clock)
    assert await r.wait_records(1) == [b"INFO:root:one"]
    assert r.chunks[0].position is not None
    assert r.chunks[0].position.offset == len(b"INFO:root:one\n")  # not past the held line
    clock.advance(0.9)
    (tmp_path / "other.log").write_bytes(b'{"message": "ping"}\n')  # never held
    await wait_until(lambda: b'{"message": "ping"}' in r.records, what="later rounds ran")
    assert b"ERROR:root:two" not in r.records
    clock.advance(0.1)
    await wait_until(lambda: b"ERROR:root:two" in r.records, what="flush timeout")
    last = next(c for c in r.chunks if b"ERROR:root:two" in c.lines)
    assert last.position is not None and last.position.offset == log.stat().st_size


async def test_idle_source_wakes_up_for_the_flush_timeout(
    tmp_path: Path, run: Callable[..., Run]
) -> None:
    """With a 30 s poll interval, the held record still comes out after ~0.2 s."""
    (tmp_path / "app.log").write_bytes(b"INFO:root:one\nERROR:root:two\n")
    config = make_config(
        tmp_path,
        poll_interval_s=30.0,
        glob_interval_s=30.0,
        multiline={"flush_timeout_s": 0.2},
    )
    r = run(config, clock=SystemClock())
    await wait_until(lambda: len(r.records) == 2, timeout_s=10, what="the held record")


async def test_open_docker_piece_is_released_by_the_flush_timeout(
    tmp_path: Path, run: Callable[..., Run]
) -> None:
    entry = docker_entry(
        "stdout", "progress 99% (no newline, container exited)", "2024-06-01T12:00:00Z"
    )
    log = tmp_path / "c-json.log"
    log.write_bytes(entry + b"\n")
    clock = FakeClock()
    r = run(make_config(tmp_path, format="docker"), clock=clock)
    await r.wait_read(log.stat().st_size)
    clock.advance(1.0)  # the framer lets it go; then the grouper holds it for as long
    await wait_until(lambda: r.source.status()["scans"] >= 2, what="a round")
    clock.advance(1.0)
    assert await r.wait_records(1) == [b"progress 99% (no newline, container exited)"]


# -- releases at the end of a file ----------------------------------------------------------


async def test_exit_on_eof_releases_held_records_at_the_end_of_each_file(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_bytes(b"a1\nERROR:root:a2\n")
    (tmp_path / "b.log").write_bytes(b"b1\nERROR:root:b2")
    chunks = await read_to_end(make_config(tmp_path))
    assert sorted(payloads(chunks)) == [b"ERROR:root:a2", b"ERROR:root:b2", b"a1", b"b1"]
    for name in ("a.log", "b.log"):
        path = tmp_path / name
        key = f"{path.stat().st_dev}:{path.stat().st_ino}"
        last = [c for c in chunks if c.position is not None and c.position.stream == key][-1]
        assert last.position is not None and last.position.offset == path.stat().st_size


async def test_rotated_file_releases_its_held_record_when_closed(
    tmp_path: Path, run: Callable[..., Run]
) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"INFO:root:one\nERROR:root:two\n")
    old_key = f"{log.stat().st_dev}:{log.stat().st_ino}"
    clock = FakeClock()
    r = run(make_config(tmp_path, multiline={"flush_timeout_s": 60}), clock=clock)
    await r.wait_records(1)
    log.rename(tmp_path / "app.log.1")
    log.write_bytes(b'{"message": "new file"}\n')
    clock.advance(0.1)
    await r.wait_records(2)  # the new file's line: the old file was noticed as rotated
    assert b"ERROR:root:two" not in r.records
    clock.advance(1.0)  # rotate_wait_s
    await wait_until(lambda: b"ERROR:root:two" in r.records, what="rotated file closed")
    chunk = next(c for c in r.chunks if b"ERROR:root:two" in c.lines)
    assert chunk.position == Position("files", old_key, 29, chunk.position.detail)


async def test_truncation_releases_held_records_before_the_new_content(
    tmp_path: Path, run: Callable[..., Run]
) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"INFO:root:one\nERROR:root:held\n")
    r = run(make_config(tmp_path, multiline={"flush_timeout_s": 60}))
    await r.wait_records(1)
    log.write_bytes(b"fresh\n")  # shorter than the offset: truncated
    await r.wait_records(2)
    assert r.records == [b"INFO:root:one", b"ERROR:root:held"]
    # "fresh" is held now, from offset 0 of the new content.
    assert r.chunks[-1].position is not None and r.chunks[-1].position.offset == 0


# -- positions: a held record is read again from its start after a restart ------------------


async def restart_at_every_cut(
    tmp_path: Path, config_for: Callable[[Path], FileSourceConfig], data: bytes, cuts: list[int]
) -> None:
    """For each cut: a source reads data[:cut] and is killed (no flush, no release);
    the rest is written; a new source resumes from the last position the first one
    emitted. Together they must emit every record exactly once."""
    whole = tmp_path / "whole"
    whole.mkdir()
    (whole / "x.log").write_bytes(data)
    expected = payloads(await read_to_end(config_for(whole)))
    for cut in cuts:
        folder = tmp_path / f"cut{cut}"
        folder.mkdir()
        path = folder / "x.log"
        path.write_bytes(data[:cut])
        first = Run(FileSource(config_for(folder), {}, FakeClock()))
        await first.wait_read(cut)
        await first.close()
        emitted = payloads(first.drain())
        positions = [c.position for c in first.chunks if c.position is not None]
        assert [p.offset for p in positions] == sorted(p.offset for p in positions)
        with path.open("ab") as f:
            f.write(data[cut:])
        checkpoint = {positions[-1].stream: positions[-1]} if positions else {}
        rest = payloads(await read_to_end(config_for(folder), checkpoint))
        assert emitted + rest == expected, f"cut at {cut}"


async def test_restart_reads_a_held_traceback_again_from_its_start(tmp_path: Path) -> None:
    log, expected = python_log()
    lines = log.splitlines(keepends=True)
    starts = [sum(map(len, lines[:i])) for i in range(len(lines))]
    cuts = sorted({*starts[::3], *(s + 5 for s in starts[1::7]), len(log)})
    await restart_at_every_cut(
        tmp_path, lambda folder: make_config(folder), log, [c for c in cuts if c <= len(log)]
    )
    # The reference run itself is the generated grouping.
    whole = payloads(await read_to_end(make_config(tmp_path / "whole")))
    assert whole == expected


async def test_restart_reads_a_held_docker_piece_again_from_its_start(tmp_path: Path) -> None:
    printed, expected = container_output(("chained", "uncaught", "multiline_message"))
    data = docker_file(printed)
    lines = data.splitlines(keepends=True)
    starts = [sum(map(len, lines[:i])) for i in range(len(lines) + 1)]
    big = [i for i, line in enumerate(lines) if len(line) > 16_000]
    cuts = sorted({*starts[::2], *(starts[i] + 9000 for i in big), *(starts[i] for i in big)})

    def config_for(folder: Path) -> FileSourceConfig:
        return make_config(folder, format="docker")

    await restart_at_every_cut(tmp_path, config_for, data, cuts)
    assert payloads(await read_to_end(config_for(tmp_path / "whole"))) == expected


@pytest.mark.parametrize("tail", [b"", b'Traceback (most recent call last):\r\n  File "x"\n'])
async def test_position_stops_at_the_held_record_after_crlf_and_cut_lines(
    tmp_path: Path, run: Callable[..., Run], tail: bytes
) -> None:
    head = b"a\r\n" + b"x" * 1000 + b"\n" + b"b\r\n"
    log = tmp_path / "app.log"
    log.write_bytes(head + b"ERROR:root:held\r\n" + tail)
    r = run(make_config(tmp_path, max_line_bytes=256))
    await r.wait_records(3)
    assert r.records == [b"a", b"x" * 256, b"b"]
    assert [c.position.offset for c in r.chunks if c.position] == [len(head)]


async def test_position_of_a_held_record_after_a_skipped_partial_line(
    tmp_path: Path, run: Callable[..., Run]
) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"old line\nold partial")
    r = run(make_config(tmp_path, read_from="tail"))
    await r.wait_read(0)
    await wait_until(lambda: r.source.status()["files"], what="file tracked")
    with log.open("ab") as f:
        f.write(b" rest\nERROR:root:x\nINFO:root:y\n")
    assert await r.wait_records(1) == [b"ERROR:root:x"]
    assert r.chunks[0].position is not None
    assert r.chunks[0].position.offset == log.stat().st_size - len(b"INFO:root:y\n")
