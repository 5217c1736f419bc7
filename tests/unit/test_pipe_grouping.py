"""`forwarder pipe`'s grouping over the spool (`pipe.SpoolGrouping`), on tmp_path, no
database: records grouped as the file source groups them, and every chunk position
exact, so that a crash after any chunk, then a run from its position, forwards every
record once and whole.

The logs are real Python output (tests/fixtures/python_output.py runs Python).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from forwarder.config import MultilineConfig
from forwarder.pipe import SpoolGrouping
from forwarder.pipeline.multiline import build_grouper
from forwarder.sinks.spool import (
    START,
    SpoolPosition,
    SpoolReader,
    SpoolRecord,
    SpoolWriter,
    encode_record,
    segment_path,
)
from tests.fixtures.python_output import CASES, generate

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
_METAS = {s: MappingProxyType({"stream": s}) for s in ("stdout", "stderr")}

Row = tuple[str, dict[str, Any]]  # a released record: its text and its meta


def meta_of(stream: str) -> Mapping[str, Any]:
    return _METAS[stream]


def grouping(
    folder: Path, start: SpoolPosition = START, *, max_records: int = 500, timeout: float = 1.0
) -> SpoolGrouping:
    grouper = build_grouper(MultilineConfig(flush_timeout_s=timeout))
    return SpoolGrouping(grouper, SpoolReader(folder), start, meta_of, max_records=max_records)


def rows_of(released: Any) -> list[Row]:
    metas = released.metas or [None] * len(released)
    return [(p.decode(), dict(m or {})) for p, m in zip(released.payloads, metas, strict=True)]


def run(
    folder: Path, start: SpoolPosition = START, *, max_records: int = 500
) -> tuple[list[Row], list[tuple[list[Row], SpoolPosition]], SpoolGrouping]:
    """Everything from `start` to the end, then the end's flush: all rows, and the rows
    and position of every chunk (the last one the flush's)."""
    g = grouping(folder, start, max_records=max_records)
    chunks = []
    while (step := g.step(SpoolPosition(1 << 20, 0), 0.0)) is not None:
        chunks.append((rows_of(step[0]), step[1]))
    released, end = g.flush()
    chunks.append((rows_of(released), end))
    return [row for rows, _ in chunks for row in rows], chunks, g


def spool(
    folder: Path,
    lines: Sequence[tuple[str, bytes]],
    *,
    segment_bytes: int = 1 << 20,
    seed: int = 0,
) -> None:
    """(stream, line) records appended a few at a time (one append: one segment)."""
    rng = random.Random(seed)
    writer = SpoolWriter(folder, max_bytes=1 << 30, segment_bytes=segment_bytes, fsync="never")
    try:
        i = 0
        while i < len(lines):
            n = rng.randint(1, 6)
            writer.append([SpoolRecord(T0, s, data) for s, data in lines[i : i + n]])
            i += n
        writer.seal()
    finally:
        writer.close()


def python_log(rng: random.Random) -> tuple[list[tuple[str, bytes]], list[Row]]:
    """Every case's stderr, each record of it maybe followed by a line on stdout; and
    the rows a correct grouping makes of it."""
    lines: list[tuple[str, bytes]] = []
    rows: list[Row] = []
    for case in CASES:
        out = generate(case)
        log_lines = out.log.decode().split("\n")
        assert log_lines.pop() == ""
        at = 0
        for record in out.records:
            n = record.count("\n") + 1
            got = log_lines[at : at + n]
            at += n
            lines.extend(("stderr", line.encode()) for line in got)
            meta: dict[str, Any] = {"stream": "stderr"}
            if n > 1:
                meta["multiline"] = n
            rows.append((record, meta))
            if rng.random() < 0.3:
                text = f"stdout line {len(lines)}"
                lines.append(("stdout", text.encode()))
                rows.append((text, {"stream": "stdout"}))
        assert at == len(log_lines)
    return lines, rows


# 300 bytes: every append starts a segment, so batches span segments (and the held
# record is then sometimes found by reading the records again).
@pytest.mark.parametrize("segment_bytes", [1 << 20, 300])
@pytest.mark.parametrize("max_records", [1, 5, 500])
def test_a_crash_after_any_chunk_then_a_run_from_its_position_forwards_each_record_once(
    tmp_path: Path, max_records: int, segment_bytes: int
) -> None:
    rng = random.Random(max_records * 7 + segment_bytes)
    lines, expected = python_log(rng)
    spool(tmp_path, lines, segment_bytes=segment_bytes, seed=max_records)
    rows, chunks, _ = run(tmp_path, max_records=max_records)
    assert [r[0] for r in rows] == [r[0] for r in expected]
    assert rows == expected
    positions = [p for _, p in chunks]
    assert positions == sorted(positions)
    committed: list[Row] = []
    for chunk_rows, position in chunks:
        committed += chunk_rows
        replayed, _, _ = run(tmp_path, position, max_records=max_records)
        assert committed + replayed == expected, position


def test_the_usual_position_is_found_without_reading_records_again(tmp_path: Path) -> None:
    """A batch's last line is held (a traceback may follow): its position comes from
    the segment's bytes; the records are not decoded a second time."""
    out = generate("logger_exception")
    lines = [("stderr", line) for line in out.log.split(b"\n")[:-1]]
    plain = [("stdout", b"plain %d" % i) for i in range(20)]
    spool(tmp_path, plain + lines + plain)
    rows, chunks, g = run(tmp_path, max_records=7)
    assert [r[0] for r in rows] == [f"plain {i}" for i in range(20)] + out.records + [
        f"plain {i}" for i in range(20)
    ]
    assert g.rereads == 0
    assert len(chunks) > 5


def test_positions_stay_exact_past_a_corrupt_record(tmp_path: Path) -> None:
    """A bad record in the batch: the line count no longer says where records start,
    so the records are read again (and the bad one skipped again)."""
    out = generate("logger_exception")
    records = [SpoolRecord(T0, "stderr", line) for line in out.log.split(b"\n")[:-1]]
    encoded = [encode_record(r) for r in records]
    encoded.insert(2, b"0badc0de not a record\n")
    segment_path(tmp_path, 0).write_bytes(b"".join(encoded))
    rows, chunks, g = run(tmp_path, max_records=500)
    assert [r[0] for r in rows] == out.records
    assert g.rereads > 0
    committed: list[Row] = []
    for chunk_rows, position in chunks:
        committed += chunk_rows
        assert committed + run(tmp_path, position)[0] == rows


def test_the_held_record_is_released_after_the_flush_timeout(tmp_path: Path) -> None:
    out = generate("logger_exception")
    lines = out.log.split(b"\n")[:-1]
    cut = len(lines) - 1  # up to the exception line: "INFO:root:next request" never comes
    spool(tmp_path, [("stderr", line) for line in lines[:cut]])
    g = grouping(tmp_path, timeout=1.0)
    released, held_at = g.step(SpoolPosition(1 << 20, 0), 100.0)  # type: ignore[misc]
    # Released: the lines before the message line; the message and its traceback wait.
    assert [r[0] for r in rows_of(released)] == out.records[:1]
    first = SpoolReader(tmp_path).read(held_at, max_records=1).records
    assert first[0].data == lines[1]  # the position is just before the held record
    assert g.next_due() == 101.0
    nothing, same = g.release_due(100.9)
    assert not nothing and same == held_at
    released, end = g.release_due(101.0)
    (row,) = rows_of(released)
    assert row == (
        out.records[1],
        {"stream": "stderr", "multiline": out.records[1].count("\n") + 1},
    )
    assert end == g.end and end > held_at
    assert g.next_due() is None
    assert g.step(SpoolPosition(1 << 20, 0), 102.0) is None


def test_a_line_of_the_other_stream_inside_a_traceback_splits_it(tmp_path: Path) -> None:
    """Sequential, as the file source: the price of exact positions (documented)."""
    out = generate("logger_exception")
    lines = [("stderr", line) for line in out.log.split(b"\n")[:-1]]
    at = next(i for i, (_, line) in enumerate(lines) if line.startswith(b"  File"))
    lines.insert(at, ("stdout", b"from stdout"))
    spool(tmp_path, lines)
    rows, _, _ = run(tmp_path)
    texts = [r[0] for r in rows]
    assert texts[1] == "ERROR:root:request failed\nTraceback (most recent call last):"
    assert rows[2] == ("from stdout", {"stream": "stdout"})
    # the frames up to the exception line still make one record
    assert texts[3] == "\n".join(line.decode() for _, line in lines[at + 1 : -1])
