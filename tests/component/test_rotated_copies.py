"""FileSource with `rotations`: numbered copies (x.log.1 ... x.log.N) are read, oldest first.

The producer is the real one for this naming: the stdlib's RotatingFileHandler (the
scheme of dockerd's json-file driver too: rename .N-1 to .N, the written file to .1,
a new file; the oldest beyond the count is deleted). The glob interval is set far
beyond the test, so only the folder watch (inotify) can find what is rotated while the
source runs. The real dockerd runs in tests/integration/test_docker_files_real.py.
"""

from __future__ import annotations

import gzip
import logging
import logging.handlers
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forwarder.config import FileSourceConfig
from forwarder.event import Position, RawChunk
from forwarder.sources.watch import Inotify
from tests.component.test_file_source import make_config, numbers

pytestmark = pytest.mark.skipif(Inotify is None, reason="inotify is Linux only")

LINE_BYTES = len("line 000000\n")


NO_TIMER = 3600.0  # glob_interval_s beyond the test: only the folder watch finds files


def config(tmp_path: Path, **overrides: Any) -> FileSourceConfig:
    """app.log only: its copies come through rotations."""
    fields: dict[str, Any] = {"paths": [str(tmp_path / "app.log")]}
    fields.update(overrides)
    return make_config(tmp_path, **fields)


class Writer:
    """A RotatingFileHandler of the stdlib writing numbered lines into app.log."""

    def __init__(self, folder: Path, *, lines_per_file: int, backups: int) -> None:
        self.handler = logging.handlers.RotatingFileHandler(
            # It rolls over when the next line would reach maxBytes: + 1 fits them all.
            folder / "app.log",
            maxBytes=lines_per_file * LINE_BYTES + 1,
            backupCount=backups,
        )
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger = logging.Logger(f"writer-{id(self)}")
        self.logger.addHandler(self.handler)
        self.next = 0

    def write(self, n: int) -> range:
        written = range(self.next, self.next + n)
        for i in written:
            self.logger.info("line %06d", i)
        self.next += n
        return written

    def close(self) -> None:
        self.handler.close()


@pytest.fixture
def make_writer(tmp_path: Path) -> Iterator[Callable[..., Writer]]:
    """Factory: writer(lines_per_file=, backups=) -> a Writer on tmp_path, closed after."""
    made: list[Writer] = []

    def make(*, lines_per_file: int, backups: int) -> Writer:
        made.append(Writer(tmp_path, lines_per_file=lines_per_file, backups=backups))
        return made[-1]

    yield make
    for w in made:
        w.close()


def compress(path: Path) -> None:
    """What dockerd's compress=true does to a rotated copy: path.gz, then path deleted."""
    with path.open("rb") as src, gzip.open(f"{path}.gz", "wb") as gz:
        shutil.copyfileobj(src, gz)
    path.unlink()


def committed(chunks: list[RawChunk]) -> dict[str, Position]:
    """What a sink would have committed after all of these: the last position per file."""
    return {c.position.stream: c.position for c in chunks}


async def test_copies_rotated_away_between_scans_are_read_in_order(
    tmp_path: Path, tail: Callable[..., Any], make_writer: Callable[..., Writer]
) -> None:
    writer = make_writer(lines_per_file=50, backups=40)
    t = await tail(config(tmp_path, glob_interval_s=NO_TIMER), rotations=True)
    written = list(writer.write(10))
    await t.wait_lines(10)
    # 1,000 lines in one go, no await: twenty rotations happen before the source runs
    # again, and it has never seen any of the copies they made.
    written += writer.write(1000)
    lines = await t.wait_lines(len(written))
    assert numbers(lines) == written  # each once, in the order written
    assert t.source.status()["rotated_copies_opened"] >= 19


async def test_first_start_reads_history_oldest_first_with_read_from_head(
    tmp_path: Path, tail: Callable[..., Any], make_writer: Callable[..., Writer]
) -> None:
    writer = make_writer(lines_per_file=20, backups=5)
    written = list(writer.write(95))  # app.log.4 ... app.log.1, app.log
    t = await tail(config(tmp_path, read_from="head"), rotations=True)
    assert numbers(await t.wait_lines(95)) == written


async def test_first_start_skips_history_with_read_from_tail(
    tmp_path: Path, tail: Callable[..., Any], make_writer: Callable[..., Writer]
) -> None:
    writer = make_writer(lines_per_file=20, backups=5)
    writer.write(95)
    t = await tail(config(tmp_path, read_from="tail"), rotations=True)
    assert t.source.status()["history_copies_skipped"] == 4
    new = list(writer.write(50))  # two more rotations: the skipped copies move on
    assert numbers(await t.wait_lines(50)) == new
    await t.wait_scans(2)
    assert numbers(t.lines) == new  # history is never read later, under any name


@pytest.mark.parametrize("read_from", ["head", "tail"])
async def test_copies_written_while_down_are_read_after_restart(
    tmp_path: Path,
    tail: Callable[..., Any],
    make_writer: Callable[..., Writer],
    read_from: str,
) -> None:
    writer = make_writer(lines_per_file=20, backups=30)
    first = await tail(config(tmp_path, read_from=read_from), rotations=True)
    before = list(writer.write(30))
    assert numbers(await first.wait_lines(30)) == before
    await first.close()
    down = list(writer.write(200))  # ten rotations while the forwarder is down
    second = await tail(
        config(tmp_path, read_from=read_from), checkpoints=committed(first.chunks), rotations=True
    )
    assert numbers(await second.wait_lines(200)) == down
    await second.wait_scans(2)
    assert numbers(second.lines) == down


async def test_a_restart_after_every_copy_read_before_was_deleted_reads_all(
    tmp_path: Path, tail: Callable[..., Any], make_writer: Callable[..., Writer]
) -> None:
    writer = make_writer(lines_per_file=20, backups=3)
    first = await tail(config(tmp_path, read_from="tail"), rotations=True)
    before = list(writer.write(10))
    assert numbers(await first.wait_lines(10)) == before
    await first.close()
    writer.write(80)  # lines 10-89: the file read before (0-19) is rotated out, deleted
    second = await tail(
        config(tmp_path, read_from="tail"), checkpoints=committed(first.chunks), rotations=True
    )
    on_disk = list(range(20, 90))  # app.log.3 .. .1 and app.log; 10-19 were lost
    assert numbers(await second.wait_lines(len(on_disk))) == on_disk


async def test_compressed_copies_are_counted_unless_read_before(
    tmp_path: Path, tail: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "app.log").write_bytes(b"line 000009\n")
    with gzip.open(tmp_path / "app.log.1.gz", "wb") as gz:
        gz.write(b"line 000000\nline 000001\n")
    with caplog.at_level(logging.WARNING):
        t = await tail(config(tmp_path), rotations=True)
        assert numbers(await t.wait_lines(1)) == [9]
    assert t.source.status()["compressed_copies_unread"] == 1
    assert "app.log.1.gz" in caplog.text and "lost" in caplog.text
    await t.wait_scans(2)
    assert t.source.status()["compressed_copies_unread"] == 1  # counted once


async def test_a_copy_read_to_its_end_then_compressed_is_not_counted(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    log_path = tmp_path / "app.log"
    log_path.write_bytes(b"line 000000\nline 000001\n")
    t = await tail(config(tmp_path), rotations=True)
    await t.wait_lines(2)
    os.rename(log_path, tmp_path / "app.log.1")  # dockerd with compress=true: rotate,
    log_path.write_bytes(b"line 000002\n")  # then compress the copy and delete it
    await t.wait_lines(3)
    compress(tmp_path / "app.log.1")
    await t.wait_scans(2)
    assert t.source.status()["compressed_copies_unread"] == 0
    assert numbers(t.lines) == [0, 1, 2]


async def test_a_file_created_and_deleted_before_it_is_opened_is_counted(
    tmp_path: Path, tail: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config(tmp_path, glob_interval_s=NO_TIMER)  # every *.log
    t = await tail(cfg, rotations=True)
    with caplog.at_level(logging.WARNING):
        # No await between the two: the source cannot open it (a --rm container
        # that ended within a millisecond).
        (tmp_path / "brief.log").write_bytes(b"gone\n")
        os.unlink(tmp_path / "brief.log")
        (tmp_path / "kept.log").write_bytes(b"here\n")
        assert await t.wait_lines(1) == [b"here"]
    assert t.source.status()["files_missed"] == 1
    assert "brief.log was created and deleted before it could be opened" in caplog.text
