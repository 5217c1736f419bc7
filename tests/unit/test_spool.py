"""The spool's record format, positions and checkpoints (pure), and the writer's rules:
segments, acknowledgement, the size bound (on tmp_path, no database)."""

from __future__ import annotations

import base64
import logging
import os
import threading
import zlib
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest

from forwarder.event import Position
from forwarder.sinks.spool import (
    MAX_RECORD_BYTES,
    BadRecord,
    RecordTooLarge,
    SpoolClosed,
    SpoolFull,
    SpoolLocked,
    SpoolPosition,
    SpoolReader,
    SpoolRecord,
    SpoolWriter,
    decode_record,
    encode_record,
    from_checkpoint,
    list_segments,
    to_checkpoint,
)

T0 = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=UTC)


def rec(data: bytes | str, stream: str = "stdout", **kw: object) -> SpoolRecord:
    raw = data.encode() if isinstance(data, str) else data
    return SpoolRecord(T0, stream, raw, **kw)  # type: ignore[arg-type]


def line_with(body: dict[str, object] | bytes) -> bytes:
    """A record line with a correct checksum over any JSON body."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return b"%08x %b\n" % (zlib.crc32(data), data)


# --- the record format ---------------------------------------------------------------------


def test_record_is_one_line_of_crc_space_json() -> None:
    line = encode_record(rec('GET /health 200 "ok"'))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    crc, _, body = line[:-1].partition(b" ")
    assert crc == b"%08x" % zlib.crc32(body)
    assert orjson.loads(body) == {
        "t": "2026-11-26T12:00:00.123456Z",
        "s": "stdout",
        "l": 'GET /health 200 "ok"',
    }


def test_utf8_line_round_trips() -> None:
    original = rec("naïve — 日本語 \x00 tab\tend", stream="stderr")
    assert decode_record(encode_record(original)) == original


def test_invalid_utf8_is_stored_as_base64_and_round_trips_exactly() -> None:
    data = b"\xff\xfe half a char \xe2\x82 end"
    line = encode_record(rec(data))
    body = orjson.loads(line[9:])
    assert "l" not in body and base64.b64decode(body["b"]) == data
    assert decode_record(line).data == data


def test_truncated_flag_and_record_meta_round_trip() -> None:
    original = rec("cut", truncated=True, meta={"container": "abc123", "n": 1})
    body = orjson.loads(encode_record(original)[9:])
    assert body["x"] is True and body["m"] == {"container": "abc123", "n": 1}
    assert decode_record(encode_record(original)) == original


def test_time_is_stored_in_utc() -> None:
    local = datetime(2026, 11, 26, 15, 0, tzinfo=timezone(timedelta(hours=3)))
    decoded = decode_record(encode_record(SpoolRecord(local, "stdout", b"x")))
    assert decoded.time == datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert decoded.time.tzinfo == UTC


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        encode_record(SpoolRecord(datetime(2026, 1, 1), "stdout", b"x"))


def test_one_flipped_byte_fails_the_checksum() -> None:
    line = bytearray(encode_record(rec("the line")))
    line[line.index(b"the")] = ord("T")
    with pytest.raises(BadRecord, match="checksum"):
        decode_record(bytes(line))


def test_unknown_keys_are_ignored_so_newer_writers_can_add_some() -> None:
    line = line_with({"t": "2026-11-26T12:00:00Z", "s": "stdout", "l": "x", "k": "new key"})
    assert decode_record(line).data == b"x"


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"short\n",
        b"0000000 {}\n",  # 7 hex digits
        b"0000000g {}\n",  # not hex
        b"0000000A " + b"{}" * 4 + b"\n",  # upper case: not what we write
        b"00000000_{}\n",  # no space
        line_with(b"[1, 2]"),
        line_with(b"{not json"),
        line_with({"t": "2026-11-26T12:00:00Z", "s": "stdout"}),  # neither l nor b
        line_with({"t": "2026-11-26T12:00:00Z", "s": "stdout", "l": "x", "b": "eA=="}),
        line_with({"t": "2026-11-26T12:00:00Z", "s": "stdout", "b": "not base64!"}),
        line_with({"t": "yesterday", "s": "stdout", "l": "x"}),
        line_with({"t": "2026-11-26T12:00:00Z", "s": 1, "l": "x"}),
        line_with({"t": "2026-11-26T12:00:00Z", "s": "stdout", "l": "x", "m": [1]}),
    ],
)
def test_anything_else_is_a_bad_record(line: bytes) -> None:
    with pytest.raises(BadRecord):
        decode_record(line)


# --- positions and checkpoints -------------------------------------------------------------


def test_position_offset_is_one_monotonic_integer() -> None:
    positions = [SpoolPosition(0, 0), SpoolPosition(0, 2**40 - 1), SpoolPosition(1, 0)]
    positions += [SpoolPosition(7, 12345), SpoolPosition(2**23 - 1, 2**40 - 1)]
    offsets = [p.offset for p in positions]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert offsets[-1] < 2**63  # fits the checkpoint table's bigint
    assert [SpoolPosition.from_offset(o) for o in offsets] == positions
    assert sorted(reversed(positions)) == positions


def test_checkpoint_names_source_stream_offset_and_the_spool() -> None:
    checkpoint = to_checkpoint("pipe:api", SpoolPosition(3, 1500), "abc")
    assert checkpoint == Position(
        "pipe:api", "spool", 3 * 2**40 + 1500, {"segment": 3, "byte": 1500, "spool": "abc"}
    )
    assert from_checkpoint(checkpoint, "abc") == SpoolPosition(3, 1500)
    assert from_checkpoint(None, "abc") is None


def test_checkpoint_of_another_spool_means_read_from_the_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    checkpoint = to_checkpoint("pipe:api", SpoolPosition(3, 1500), "old-folder")
    with caplog.at_level(logging.WARNING):
        assert from_checkpoint(checkpoint, "new-folder") is None
    assert "not this one" in caplog.text


# --- the writer's rules ----------------------------------------------------------------------


def test_append_returns_the_position_after_its_last_record(tmp_path: Path) -> None:
    with_close = SpoolWriter(tmp_path / "s", max_bytes=1 << 20)
    try:
        first = encode_record(rec("one"))
        p1 = with_close.append([rec("one")])
        p2 = with_close.append([rec("two"), rec("three")])
        assert p1 == SpoolPosition(0, len(first))
        assert p2 == with_close.position and p2.segment == 0
        assert p2.byte == (tmp_path / "s" / "000000000000.spool").stat().st_size
        assert with_close.append([]) == p2
    finally:
        with_close.close()


def test_segments_roll_over_and_one_append_never_spans_two(tmp_path: Path) -> None:
    w = SpoolWriter(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    try:
        for i in range(10):
            w.append([rec(f"line {i:03d} " + "x" * 40) for _ in range(2)])
    finally:
        w.close()
    segments = list_segments(tmp_path)
    assert len(segments) > 3
    reader = SpoolReader(tmp_path)
    assert len(reader.read(None, max_records=100).records) == 20
    for seg in segments:  # each segment holds whole appends: 2 records each
        data = (tmp_path / f"{seg:012d}.spool").read_bytes()
        assert data.count(b"\n") % 2 == 0


@pytest.mark.parametrize("fsync", ["always", "batch", "never"])
def test_every_fsync_mode_writes_the_same_records(tmp_path: Path, fsync: str) -> None:
    w = SpoolWriter(tmp_path, max_bytes=1 << 20, fsync=fsync)  # type: ignore[arg-type]
    try:
        w.append([rec("a"), rec(b"\xff", stream="stderr")])
    finally:
        w.close()
    records = SpoolReader(tmp_path).read(None).records
    assert [(r.stream, r.data) for r in records] == [("stdout", b"a"), ("stderr", b"\xff")]


def test_acknowledge_deletes_only_segments_entirely_before_the_position(
    tmp_path: Path,
) -> None:
    w = SpoolWriter(tmp_path, max_bytes=1 << 20, segment_bytes=100)
    try:
        ends = [w.append([rec(f"record {i} " + "y" * 60)]) for i in range(5)]
        assert [p.segment for p in ends] == [0, 1, 2, 3, 4]
        used = w.used_bytes
        # In the middle of segment 2: 0 and 1 are entirely before it.
        assert w.acknowledge(SpoolPosition(2, 10)) == 2
        assert list_segments(tmp_path) == [2, 3, 4]
        assert w.used_bytes == used - 2 * ends[0].byte
        # At the end of segment 2: it is entirely before the position too.
        assert w.acknowledge(ends[2]) == 1
        assert list_segments(tmp_path) == [3, 4]
        assert w.acknowledge(None) == 0
        # The open segment (4) stays even when the position is past its end...
        assert w.acknowledge(SpoolPosition(9, 0)) == 1
        assert list_segments(tmp_path) == [4]
        # ... until it is sealed.
        w.seal()
        assert w.acknowledge(w.position) == 1
        assert list_segments(tmp_path) == [] and w.used_bytes == 0
        assert w.append([rec("after the seal")]).segment == 5
    finally:
        w.close()


def test_segment_numbers_are_never_reused_after_everything_was_deleted(tmp_path: Path) -> None:
    """A committed checkpoint (segment 0, byte N) must not hide records of a later run."""
    w = SpoolWriter(tmp_path, max_bytes=1 << 20)
    committed = w.append([rec("first run")])
    w.seal()
    w.acknowledge(committed)
    w.close()
    assert list_segments(tmp_path) == []
    w = SpoolWriter(tmp_path, max_bytes=1 << 20)
    try:
        end = w.append([rec("second run")])
        assert end.segment > committed.segment
        batch = SpoolReader(tmp_path).read(committed, end)
        assert [r.data for r in batch.records] == [b"second run"]
    finally:
        w.close()


def test_a_new_writer_never_appends_to_an_earlier_segment(tmp_path: Path) -> None:
    w = SpoolWriter(tmp_path, max_bytes=1 << 20)
    w.append([rec("a")])
    w.close()
    w = SpoolWriter(tmp_path, max_bytes=1 << 20)
    try:
        assert w.append([rec("b")]).segment == 1
        assert w.spool_id == (tmp_path / "spool.id").read_text().strip()
    finally:
        w.close()


def test_full_spool_refuses_the_whole_append_and_writes_nothing(tmp_path: Path) -> None:
    one = len(encode_record(rec("0123456789")))
    w = SpoolWriter(tmp_path, max_bytes=3 * one, segment_bytes=one)
    try:
        w.append([rec("0123456789"), rec("0123456789")])
        before = w.position
        with pytest.raises(SpoolFull) as full:
            w.append([rec("0123456789"), rec("0123456789")])
        assert (full.value.needed, full.value.free, full.value.max_bytes) == (2 * one, one, 3 * one)
        assert w.position == before and w.used_bytes == 2 * one
        w.append([rec("0123456789")])  # exactly fills it
        with pytest.raises(SpoolFull):
            w.append([rec("0123456789")])
        # An acknowledgement makes room.
        w.acknowledge(before)
        w.append([rec("0123456789")])
    finally:
        w.close()


def test_append_with_a_timeout_waits_for_an_acknowledge(tmp_path: Path) -> None:
    one = len(encode_record(rec("0123456789")))
    w = SpoolWriter(tmp_path, max_bytes=2 * one, segment_bytes=one)
    try:
        first = w.append([rec("0123456789")])
        w.append([rec("0123456789")])
        with pytest.raises(SpoolFull):
            w.append([rec("0123456789")], timeout=0.05)
        result: list[object] = []
        waiter = threading.Thread(
            target=lambda: result.append(w.append([rec("0123456789")], timeout=30))
        )
        waiter.start()
        w.acknowledge(first)  # segment 0 is sealed (segment 1 is open): room for one
        waiter.join(30)
        assert result and isinstance(result[0], SpoolPosition)
    finally:
        w.close()


def test_close_wakes_a_waiting_append(tmp_path: Path) -> None:
    one = len(encode_record(rec("x")))
    w = SpoolWriter(tmp_path, max_bytes=one, segment_bytes=1)
    w.append([rec("x")])
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            w.append([rec("x")], timeout=None)
        except BaseException as e:
            errors.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    w.close()
    waiter.join(30)
    assert errors and isinstance(errors[0], SpoolClosed)


def test_what_can_never_fit_is_refused_as_too_large(tmp_path: Path) -> None:
    w = SpoolWriter(tmp_path, max_bytes=100)
    try:
        with pytest.raises(RecordTooLarge):
            w.append([rec("x" * 200)])
        with pytest.raises(RecordTooLarge):
            w.append([rec(b"\x01" * (MAX_RECORD_BYTES // 6 + 1))])  # escapes: 6 bytes each
        assert w.used_bytes == 0
    finally:
        w.close()


def test_one_writer_per_folder(tmp_path: Path) -> None:
    w = SpoolWriter(tmp_path, max_bytes=1000)
    with pytest.raises(SpoolLocked):
        SpoolWriter(tmp_path, max_bytes=1000)
    w.close()
    w.close()  # idempotent
    SpoolWriter(tmp_path, max_bytes=1000).close()


def test_reader_skips_a_torn_last_record_and_counts_it(tmp_path: Path) -> None:
    good = encode_record(rec("good"))
    torn = encode_record(rec("torn by a crash"))[:-7]
    (tmp_path / "000000000000.spool").write_bytes(good + torn)
    reader = SpoolReader(tmp_path)
    batch = reader.read(None)
    assert [r.data for r in batch.records] == [b"good"]
    assert (reader.torn_records, reader.corrupt_records) == (1, 0)
    assert batch.position == SpoolPosition(0, len(good) + len(torn))


def test_reader_skips_a_bad_record_in_the_middle_counts_and_logs_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b, c = (encode_record(rec(x)) for x in ("a", "b", "c"))
    damaged = b.replace(b'"b"', b'"B"')
    (tmp_path / "000000000000.spool").write_bytes(a + damaged + c)
    reader = SpoolReader(tmp_path)
    with caplog.at_level(logging.WARNING):
        batch = reader.read(None)
    assert [r.data for r in batch.records] == [b"a", b"c"]
    assert (reader.torn_records, reader.corrupt_records) == (0, 1)
    assert f"segment 0 byte {len(a)}" in caplog.text and "checksum" in caplog.text


def test_spool_id_and_next_segment_survive(tmp_path: Path) -> None:
    w = SpoolWriter(tmp_path, max_bytes=1000)
    spool_id = w.spool_id
    w.append([rec("x")])
    w.close()
    assert len(spool_id) == 16
    assert (tmp_path / "next_segment").read_text().strip() == "1"
    assert sorted(os.listdir(tmp_path)) == [
        "000000000000.spool",
        "lock",
        "next_segment",
        "spool.id",
    ]
