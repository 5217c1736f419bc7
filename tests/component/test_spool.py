"""SpoolWriter + SpoolReader on real files: crashes mid-record, replay after a committed
position, a writer followed while it writes, a writer process killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from forwarder.sinks.spool import (
    START,
    SpoolPosition,
    SpoolReader,
    SpoolRecord,
    SpoolWriter,
    encode_record,
    from_checkpoint,
    list_segments,
    segment_path,
    to_checkpoint,
)

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]  # the repository: `forwarder` imports from here


def rec(i: int, stream: str = "stdout") -> SpoolRecord:
    data = f"seq={i} " + "z" * (i % 7) if i % 5 else b"\xff\xfe seq=%d" % i
    return SpoolRecord(T0, stream, data.encode() if isinstance(data, str) else data)


def seqs(records: list[SpoolRecord]) -> list[int]:
    return [int(r.data.split(b"seq=")[1].split()[0]) for r in records]


def read_all(reader: SpoolReader, after: SpoolPosition | None = None, **kw: object):
    """Every record after `after`, in calls of a few records each; and the end position."""
    records: list[SpoolRecord] = []
    pos = after or START
    while True:
        batch = reader.read(pos, max_records=7, **kw)  # type: ignore[arg-type]
        records += batch.records
        if batch.position == pos and not batch.records:
            return records, pos
        pos = batch.position


def test_crash_at_every_byte_of_the_last_record_loses_only_that_record(tmp_path: Path) -> None:
    """Truncating the newest segment anywhere inside its last record, as a crash
    mid-write leaves it: the records before it are read, the torn one is counted, and
    a writer started afterwards appends after it without harm."""
    source = tmp_path / "original"
    w = SpoolWriter(source, max_bytes=1 << 20)
    w.append([rec(i) for i in range(5)])
    w.close()
    data = segment_path(source, 0).read_bytes()
    last_start = len(data) - len(encode_record(rec(4)))
    for cut in range(last_start, len(data) + 1):
        folder = tmp_path / f"cut{cut}"
        folder.mkdir()
        segment_path(folder, 0).write_bytes(data[:cut])
        reader = SpoolReader(folder)
        records, end = read_all(reader)
        complete = cut == len(data)
        assert seqs(records) == list(range(5 if complete else 4)), cut
        assert reader.torn_records == (0 if complete or cut == last_start else 1), cut
        assert reader.corrupt_records == 0
        assert end == SpoolPosition(0, cut)
        # The restarted writer starts a new segment: the torn bytes stay the end of theirs.
        w = SpoolWriter(folder, max_bytes=1 << 20)
        w.append([rec(10), rec(11)])
        w.close()
        reader = SpoolReader(folder)
        records, _ = read_all(reader)
        assert seqs(records) == [*range(5 if complete else 4), 10, 11], cut


def test_replay_after_a_committed_position_and_acknowledge(tmp_path: Path) -> None:
    w = SpoolWriter(tmp_path, max_bytes=1 << 20, segment_bytes=300)
    try:
        ends = [w.append([rec(i) for i in range(n, n + 4)]) for n in range(0, 40, 4)]
        assert len(list_segments(tmp_path)) > 3
        # The database committed the first 5 appends (checkpoint stored as a Position).
        checkpoint = to_checkpoint("pipe:api", ends[4], w.spool_id)
        committed = from_checkpoint(checkpoint, w.spool_id)
        assert committed == ends[4]
        w.acknowledge(committed)
        # Each append filled a segment: the committed one ends one, so it went too.
        assert list_segments(tmp_path) == [e.segment for e in ends[5:]]
        # A restart replays exactly what follows the committed position.
        records, end = read_all(SpoolReader(tmp_path), committed, until=w.position)
        assert seqs(records) == list(range(20, 40))
        assert end == w.position
    finally:
        w.close()


def test_reader_follows_a_writer_up_to_its_position(tmp_path: Path) -> None:
    """Another thread appends while the reader reads up to `writer.position`: every
    record is read once, in order, and the open segment is never judged torn."""
    w = SpoolWriter(tmp_path, max_bytes=1 << 24, segment_bytes=4096, fsync="never")
    total = 3000

    def write() -> None:
        for n in range(0, total, 3):
            w.append([rec(n), rec(n + 1, "stderr"), rec(n + 2)])

    writer = threading.Thread(target=write)
    writer.start()
    reader = SpoolReader(tmp_path)
    got: list[int] = []
    pos = START
    try:
        while len(got) < total:
            batch = reader.read(pos, w.position, max_records=50)
            got += seqs(batch.records)
            pos = batch.position
            if not batch.records:
                writer.join(0.001)
    finally:
        writer.join()
        w.close()
    assert got == list(range(total))
    assert (reader.torn_records, reader.corrupt_records) == (0, 0)


def test_damaged_bytes_in_an_old_segment_skip_one_record_only(tmp_path: Path) -> None:
    w = SpoolWriter(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    try:
        for i in range(12):
            w.append([rec(i)])
        path = segment_path(tmp_path, 1)
        data = bytearray(path.read_bytes())
        data[20] ^= 0x01  # one bit of the segment's first record
        path.write_bytes(bytes(data))
        reader = SpoolReader(tmp_path)
        records, _ = read_all(reader, until=w.position)
    finally:
        w.close()
    missing = set(range(12)) - set(seqs(records))
    assert len(missing) == 1 and reader.corrupt_records == 1 and reader.torn_records == 0


def test_garbage_without_newlines_is_skipped(tmp_path: Path) -> None:
    """A block of zeros (a machine crash with the size updated, the data not)."""
    segment_path(tmp_path, 0).write_bytes(encode_record(rec(1)) + b"\0" * 50_000)
    segment_path(tmp_path, 1).write_bytes(encode_record(rec(2)))
    reader = SpoolReader(tmp_path)
    records, end = read_all(reader)
    assert seqs(records) == [1, 2]
    assert (reader.torn_records, reader.corrupt_records) == (1, 0)
    assert end == SpoolPosition(1, len(encode_record(rec(2))))


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys
    from datetime import UTC, datetime
    from pathlib import Path
    from forwarder.sinks.spool import SpoolRecord, SpoolWriter

    w = SpoolWriter(Path(sys.argv[1]), max_bytes=1 << 30, segment_bytes=1 << 16, fsync="never")
    n = 0
    while True:
        batch = [SpoolRecord(datetime.now(UTC), "stdout", b"seq=%d " % i + b"p" * (i % 300))
                 for i in range(n, n + 50)]
        w.append(batch)
        n += 50
        if n == 5000:
            print("ready", flush=True)
    """
)


async def test_a_writer_killed_with_sigkill_leaves_a_readable_spool(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        str(folder),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"ready\n"
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    reader = SpoolReader(folder)
    records, _ = read_all(reader)
    got = seqs(records)
    assert len(got) >= 5000
    # Whole appends in order; at most the last one torn.
    assert got == list(range(len(got)))
    assert reader.corrupt_records == 0 and reader.torn_records <= 1
    # And a new writer carries on (the killed one's lock died with it).
    w = SpoolWriter(folder, max_bytes=1 << 30)
    try:
        end = w.append([SpoolRecord(T0, "stdout", b"seq=-1 after")])
        assert end.segment > max(s for s in list_segments(folder) if s != end.segment)
    finally:
        w.close()


@pytest.mark.parametrize("fsync", ["always", "batch"])
def test_fsync_policies_leave_the_same_files(tmp_path: Path, fsync: str) -> None:
    w = SpoolWriter(tmp_path, max_bytes=1 << 20, segment_bytes=256, fsync=fsync)  # type: ignore[arg-type]
    try:
        for i in range(0, 30, 3):
            w.append([rec(i), rec(i + 1), rec(i + 2)])
    finally:
        w.close()
    records, _ = read_all(SpoolReader(tmp_path))
    assert seqs(records) == list(range(30))
    assert all(os.path.getsize(segment_path(tmp_path, s)) > 0 for s in list_segments(tmp_path))
