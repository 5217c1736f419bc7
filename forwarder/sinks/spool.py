"""The disk spool: durable records for sources that cannot replay (a pipe, HTTP, Docker API).

A source that cannot read its input again after a restart appends every line here
first and hands the pipeline only what is durable; the pipeline's checkpoint (committed
in the same transaction as the rows) says how far the spool has been written, and the
segments entirely before it are deleted.

Layout of one spool folder::

    spool.id             random id, written once: a checkpoint names the spool it is about
    next_segment         the lowest segment number never used: numbers are never reused,
                         also after every segment was acknowledged and deleted
    lock                 flock(2) held by the one writer of the folder
    000000000000.spool   append-only segments, numbered upwards; never rewritten

A record is one line: ``<crc32 of the json, 8 lower-case hex> <json>\\n``, the json being
``{"t": time of receipt (ISO 8601, UTC), "s": stream (stdout|stderr|...),
"l": the line as UTF-8 text | "b": the line in base64 when it is not valid UTF-8,
"x": true when the line was cut at max_line_bytes (optional), "m": {per-record facts,
e.g. a container id} (optional)}``. Readers ignore keys they do not know, so a newer
writer can add some.

Crash safety: a writer appends whole records with one write, fsyncs (per policy) and
only then reports the new end position; a writer never appends to a segment written
before it started, so a record torn by a crash mid-write is always the last bytes of
its segment. The reader skips and counts such a torn tail; a bad record followed by
good ones (a damaged disk block) is skipped, counted and logged. Neither is fatal.

Later requirements designed for (issue 6): the size bound pushes back without blocking
(`SpoolFull`, so the HTTP intake can answer 503) or blocks for a while (`timeout=`);
`(spool id, segment, byte)` names every record uniquely, the idempotency key a row
from the spool can carry.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import logging
import os
import re
import secrets
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import orjson

from forwarder.event import Position

__all__ = [
    "CHECKPOINT_STREAM",
    "MAX_RECORD_BYTES",
    "START",
    "BadRecord",
    "FsyncMode",
    "RecordTooLarge",
    "SpoolBatch",
    "SpoolClosed",
    "SpoolError",
    "SpoolFull",
    "SpoolLocked",
    "SpoolPosition",
    "SpoolReader",
    "SpoolRecord",
    "SpoolWriter",
    "decode_record",
    "encode_record",
    "from_checkpoint",
    "list_segments",
    "segment_path",
    "to_checkpoint",
]

log = logging.getLogger(__name__)

COMPONENT = "sink.spool"
FsyncMode = Literal["always", "batch", "never"]
SEGMENT_SUFFIX: Final = ".spool"
ID_FILE: Final = "spool.id"
NEXT_SEGMENT_FILE: Final = "next_segment"
LOCK_FILE: Final = "lock"
CHECKPOINT_STREAM: Final = "spool"  # Position.stream of every spool checkpoint
OFFSET_BITS: Final = 40  # Position.offset = segment * 2**40 + byte: one monotonic bigint
MAX_SEGMENT: Final = 2 ** (63 - OFFSET_BITS) - 1
# One encoded record at most (a 1 MiB line of control characters is ~6 MiB of JSON).
MAX_RECORD_BYTES: Final = 8 * 1024 * 1024
CORRUPT_LOG_FIRST: Final = 10  # corrupt records logged one by one; then every 1000th

_SEGMENT_RE: Final = re.compile(r"^(\d{12})\.spool$")
_HEX: Final = frozenset(b"0123456789abcdef")


class SpoolError(Exception):
    """The spool cannot be used (folder, lock, id); the message says what to fix."""


class SpoolLocked(SpoolError):
    """Another writer (another process) holds the folder."""


class SpoolClosed(SpoolError):
    """The writer was closed while an append waited or was attempted."""


class SpoolFull(Exception):
    """The folder holds max_bytes: nothing was written. Retry after an acknowledge.

    Push back on the producer (HTTP: 503 with Retry-After), or call `append` with a
    `timeout` to wait for room.
    """

    def __init__(self, needed: int, free: int, max_bytes: int) -> None:
        self.needed, self.free, self.max_bytes = needed, free, max_bytes
        super().__init__(f"spool full: {needed} bytes to append, {free} of {max_bytes} free")


class RecordTooLarge(ValueError):
    """One append (or one record) that can never fit: larger than max_bytes or MAX_RECORD_BYTES."""


class BadRecord(ValueError):
    """A spool line that is not a valid record (torn, damaged, or not ours)."""


@dataclass(frozen=True, slots=True, order=True)
class SpoolPosition:
    """A place in a spool: segment number and byte offset inside it (after a record)."""

    segment: int
    byte: int

    @property
    def offset(self) -> int:
        """One monotonically increasing integer, as the checkpoint table stores it."""
        return (self.segment << OFFSET_BITS) | self.byte

    @classmethod
    def from_offset(cls, offset: int) -> SpoolPosition:
        return cls(offset >> OFFSET_BITS, offset & ((1 << OFFSET_BITS) - 1))


START: Final = SpoolPosition(0, 0)


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One line as received: when, on which stream, its bytes (no terminator)."""

    time: datetime  # aware UTC
    stream: str
    data: bytes
    truncated: bool = False
    meta: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SpoolBatch:
    """What one `SpoolReader.read` returned: records, and where the next read continues.

    `position` also moves past skipped bad records, so a batch may hold no record and
    still advance (commit it, or the bad bytes are read and counted again next time).
    """

    records: list[SpoolRecord]
    position: SpoolPosition


# --- records (pure) ---------------------------------------------------------------------------


def encode_record(record: SpoolRecord) -> bytes:
    """The record as one spool line, newline included."""
    if record.time.tzinfo is None:
        raise ValueError("SpoolRecord.time must be timezone-aware")
    body: dict[str, Any] = {"t": record.time.astimezone(UTC), "s": record.stream}
    try:
        body["l"] = record.data.decode("utf-8")
    except UnicodeDecodeError:
        body["b"] = base64.b64encode(record.data).decode("ascii")
    if record.truncated:
        body["x"] = True
    if record.meta:
        body["m"] = dict(record.meta)
    data = orjson.dumps(body, option=orjson.OPT_UTC_Z)
    return b"%08x %b\n" % (zlib.crc32(data), data)


def decode_record(line: bytes) -> SpoolRecord:
    """One spool line (its newline optional) back into a record; BadRecord if it is not one."""
    if line.endswith(b"\n"):
        line = line[:-1]
    if len(line) < 11 or line[8:9] != b" " or not _HEX.issuperset(line[:8]):
        raise BadRecord("not a spool record (no checksum)")
    data = line[9:]
    if b"%08x" % zlib.crc32(data) != line[:8]:
        raise BadRecord("checksum mismatch")
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise BadRecord(f"invalid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRecord("not a JSON object")
    t, stream = body.get("t"), body.get("s")
    if not isinstance(t, str) or not isinstance(stream, str):
        raise BadRecord('"t" and "s" must be strings')
    try:
        when = datetime.fromisoformat(t)
    except ValueError:
        raise BadRecord(f'"t" is not an ISO 8601 time: {t!r}') from None
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    text, b64 = body.get("l"), body.get("b")
    if isinstance(text, str) and b64 is None:
        raw = text.encode("utf-8")
    elif isinstance(b64, str) and text is None:
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise BadRecord('"b" is not base64') from None
    else:
        raise BadRecord('exactly one of "l" and "b" must be a string')
    meta = body.get("m")
    if meta is not None and not isinstance(meta, dict):
        raise BadRecord('"m" must be an object')
    return SpoolRecord(when, stream, raw, body.get("x") is True, meta)


# --- checkpoints ------------------------------------------------------------------------------


def to_checkpoint(source: str, position: SpoolPosition, spool_id: str) -> Position:
    """The pipeline Position of a spool position (committed with the rows it covers)."""
    return Position(
        source,
        CHECKPOINT_STREAM,
        position.offset,
        {"segment": position.segment, "byte": position.byte, "spool": spool_id},
    )


def from_checkpoint(checkpoint: Position | None, spool_id: str) -> SpoolPosition | None:
    """Where to resume reading this spool, or None (from its start).

    A checkpoint about another spool (the folder was deleted and made anew) is ignored:
    its segment numbers mean nothing here.
    """
    if checkpoint is None:
        return None
    detail = checkpoint.detail or {}
    if detail.get("spool") != spool_id:
        log.warning(
            "checkpoint of %s is about spool %s, not this one (%s): reading it from its start",
            checkpoint.source,
            detail.get("spool"),
            spool_id,
            extra={"component": COMPONENT},
        )
        return None
    return SpoolPosition.from_offset(checkpoint.offset)


# --- the folder -------------------------------------------------------------------------------


def segment_path(folder: Path, segment: int) -> Path:
    return folder / f"{segment:012d}{SEGMENT_SUFFIX}"


def list_segments(folder: Path) -> list[int]:
    """Segment numbers present in `folder`, ascending."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = [int(m.group(1)) for name in names if (m := _SEGMENT_RE.match(name))]
    return sorted(found)


def read_spool_id(folder: Path) -> str | None:
    try:
        text = (folder / ID_FILE).read_text("ascii").strip()
    except FileNotFoundError:
        return None
    return text or None


def _create_spool_id(folder: Path) -> str:
    spool_id = secrets.token_hex(8)
    _replace_file(folder, ID_FILE, spool_id, durable=True)
    return spool_id


def _read_next_segment(folder: Path) -> int:
    try:
        return int((folder / NEXT_SEGMENT_FILE).read_text("ascii").strip())
    except (FileNotFoundError, ValueError):
        return 0


def _replace_file(folder: Path, name: str, text: str, *, durable: bool) -> None:
    """Write `text` to folder/name atomically (a reader sees the old or the new content)."""
    tmp = folder / f"{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, text.encode() + b"\n")
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, folder / name)
    if durable:
        _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# --- the writer -------------------------------------------------------------------------------


class SpoolWriter:
    """Appends records to one spool folder; the only writer of it (an flock says so).

    Thread-safe: `append` may run in a worker thread (it does file I/O and fsync) while
    `acknowledge` runs in another. One `append` is all or nothing and lands in ONE
    segment: a new segment starts before an append that would take the current one
    past `segment_bytes`, so a segment can exceed it by one append.

    fsync: "always" after every record, "batch" once per `append` (the default), "never"
    leaves it to the OS (survives a crash of the process, not of the machine). A new
    segment's folder entry is fsynced too unless "never".
    """

    def __init__(
        self,
        folder: Path,
        *,
        max_bytes: int,
        segment_bytes: int = 8 * 1024 * 1024,
        fsync: FsyncMode = "batch",
    ) -> None:
        if fsync not in ("always", "batch", "never"):
            raise ValueError(f"fsync must be always, batch or never, not {fsync!r}")
        if not 1 <= segment_bytes < 1 << OFFSET_BITS:
            raise ValueError(f"segment_bytes must be in 1..2**{OFFSET_BITS} - 1")
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.folder = folder
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync: FsyncMode = fsync
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"cannot create the spool folder {folder}: {e.strerror}") from None
        self._lock_fd = _lock_folder(folder)
        try:
            self.spool_id = read_spool_id(folder) or _create_spool_id(folder)
            self._sizes: dict[int, int] = {}
            for seg in list_segments(folder):
                with contextlib.suppress(FileNotFoundError):
                    self._sizes[seg] = segment_path(folder, seg).stat().st_size
            # Never append to a segment written before us (its tail may be torn), and never
            # reuse a number: a checkpoint may name a segment acknowledged long ago.
            self._segment = max(max(self._sizes, default=-1) + 1, _read_next_segment(folder))
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.first_segment = self._segment  # the first this writer may create
        self._used = sum(self._sizes.values())
        self._offset = 0
        self._end = SpoolPosition(self._segment, 0)  # published after each append
        self._fd: int | None = None  # the open segment; None until the first append
        self._sealed = False  # the segment at the position is finished: append to the next
        self._cond = threading.Condition()
        self._closed = False
        # counters
        self.records_appended = 0
        self.bytes_appended = 0
        self.segments_deleted = 0

    def __repr__(self) -> str:
        return f"SpoolWriter({str(self.folder)!r})"

    # -- reading the state (any thread) --

    @property
    def position(self) -> SpoolPosition:
        """The end of everything appended (and synced per policy): read up to here.

        Lock-free (one attribute, replaced whole), so an event loop asking for it never
        waits for an fsync in progress.
        """
        return self._end

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return max(0, self.max_bytes - self._used)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- writing --

    def append(self, records: Sequence[SpoolRecord], *, timeout: float = 0.0) -> SpoolPosition:
        """Write `records` durably (per the fsync policy); return the position after them.

        All or nothing. Without room for all of them: raise SpoolFull at once (timeout
        0), or wait up to `timeout` seconds (None: forever) for an `acknowledge` to make
        room. RecordTooLarge when they could never fit; SpoolClosed once closed; an
        OSError (disk full, I/O error) leaves the spool as it was before the call.
        """
        if not records:
            return self.position
        encoded = [encode_record(r) for r in records]
        biggest = max(map(len, encoded))
        if biggest > MAX_RECORD_BYTES:
            raise RecordTooLarge(f"a record of {biggest} bytes (at most {MAX_RECORD_BYTES})")
        data = b"".join(encoded)
        total = len(data)
        if total > self.max_bytes:
            raise RecordTooLarge(f"{total} bytes can never fit a spool of {self.max_bytes}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise SpoolClosed(f"{self!r} is closed")
                if self._used + total <= self.max_bytes:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise SpoolFull(total, self.free_bytes, self.max_bytes)
                self._cond.wait(remaining)
            self._write(encoded, data)
            self.records_appended += len(records)
            self.bytes_appended += total
            self._end = end = SpoolPosition(self._segment, self._offset)
            return end

    def _write(self, encoded: list[bytes], data: bytes) -> None:
        if self._fd is not None and self._offset and self._offset + len(data) > self.segment_bytes:
            self._seal()
        if self._fd is None:
            self._open_segment()
        fd = self._fd
        assert fd is not None
        start = self._offset
        try:
            if self.fsync == "always":
                for record in encoded:
                    _write_all(fd, record)
                    os.fsync(fd)
            else:
                _write_all(fd, data)
                if self.fsync == "batch":
                    os.fsync(fd)
        except OSError:
            self._undo(start)
            raise
        self._offset += len(data)
        self._sizes[self._segment] = self._offset
        self._used += len(data)

    def _undo(self, start: int) -> None:
        """After a failed write: cut the segment back to `start`, else never use it again."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, start)
            if self.fsync != "never":
                os.fsync(self._fd)
        except OSError:
            # The partial record stays as a torn tail (the reader skips it); the next
            # append starts a new segment.
            with contextlib.suppress(OSError):
                size = os.fstat(self._fd).st_size
                self._used += size - self._sizes[self._segment]
                self._sizes[self._segment] = size
            with contextlib.suppress(OSError):
                self._seal()

    def _open_segment(self) -> None:
        if self._sealed:
            self._segment, self._offset, self._sealed = self._segment + 1, 0, False
        if self._segment > MAX_SEGMENT:
            raise SpoolError(f"segment numbers exhausted in {self.folder}")
        # The mark first: after a crash, a segment that exists is below it.
        _replace_file(
            self.folder, NEXT_SEGMENT_FILE, str(self._segment + 1), durable=self.fsync != "never"
        )
        path = segment_path(self.folder, self._segment)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o644)
        self._sizes[self._segment] = 0
        if self.fsync != "never":
            _fsync_dir(self.folder)

    def _seal(self) -> None:
        """Close the open segment: the position stays at its end, the next append starts
        the next segment."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        self._sealed = True
        try:
            if self.fsync != "never":
                os.fsync(fd)
        finally:
            os.close(fd)

    def seal(self) -> None:
        """No more appends into the open segment, so that an `acknowledge` of its end can
        delete it (the open segment is never deleted). The next append starts a new one."""
        with self._cond:
            self._seal()

    # -- acknowledging --

    def acknowledge(self, position: SpoolPosition | None) -> int:
        """Delete every segment entirely before `position` (committed); return how many.

        The open segment is never deleted. Wakes appends that wait for room.
        """
        if position is None:
            return 0
        deleted = 0
        with self._cond:
            for seg in sorted(self._sizes):
                if self._fd is not None and seg == self._segment:
                    break  # the open segment
                size = self._sizes[seg]
                covered = seg < position.segment or (
                    seg == position.segment and position.byte >= size
                )
                if not covered:
                    break
                with contextlib.suppress(FileNotFoundError):
                    segment_path(self.folder, seg).unlink()
                del self._sizes[seg]
                self._used -= size
                deleted += 1
            self.segments_deleted += deleted
            if deleted:
                self._cond.notify_all()
        return deleted

    def close(self) -> None:
        """Close the open segment and release the folder. Idempotent; wakes waiting appends."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            try:
                if self._fd is not None:
                    fd, self._fd = self._fd, None
                    try:
                        if self.fsync != "never":
                            os.fsync(fd)
                    finally:
                        os.close(fd)
            finally:
                os.close(self._lock_fd)
                self._cond.notify_all()


def _lock_folder(folder: Path) -> int:
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolLocked(f"another process is writing to the spool {folder}") from None
    except OSError:
        os.close(fd)
        raise
    return fd


# --- the reader -------------------------------------------------------------------------------


class SpoolReader:
    """Reads records back in order, validating each checksum; never fails on bad bytes.

    A record that is bad and is the last thing in its segment file is *torn* (a crash
    mid-write; counted in `torn_records`); a bad record with more data after it is
    *corrupt* (counted in `corrupt_records` and logged). Both are skipped.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.records_read = 0
        self.torn_records = 0
        self.corrupt_records = 0

    def read(
        self,
        after: SpoolPosition | None,
        until: SpoolPosition | None = None,
        *,
        max_records: int = 1000,
        max_bytes: int = 1024 * 1024,
    ) -> SpoolBatch:
        """Records after `after` (None: the start), not past `until` (None: every segment
        to its end), at most `max_records` of them and about `max_bytes`.

        Pass the writer's `position` as `until` while it writes: the open segment is
        then read only up to what was fully appended.
        """
        pos = after or START
        records: list[SpoolRecord] = []
        budget = max_bytes
        for seg in list_segments(self.folder):
            if seg < pos.segment:
                continue
            if until is not None and seg > until.segment:
                break
            begin = pos.byte if seg == pos.segment else 0
            limit = until.byte if until is not None and seg == until.segment else None
            try:
                end, budget = self._read_segment(seg, begin, limit, records, max_records, budget)
            except FileNotFoundError:
                continue  # acknowledged meanwhile
            pos = SpoolPosition(seg, end)
            if len(records) >= max_records or budget <= 0:
                break
            if limit is not None and end < limit:
                break  # the region ends inside an incomplete record: wait for the writer
        return SpoolBatch(records, pos)

    def _read_segment(
        self,
        seg: int,
        begin: int,
        limit: int | None,
        records: list[SpoolRecord],
        max_records: int,
        budget: int,
    ) -> tuple[int, int]:
        """Append the segment's records from `begin` to `records`; return (end, budget)."""
        path = segment_path(self.folder, seg)
        with path.open("rb", buffering=256 * 1024) as f:
            size = os.fstat(f.fileno()).st_size
            end = size if limit is None else min(limit, size)
            if begin >= end:
                return begin, budget
            f.seek(begin)
            at = begin
            while at < end and len(records) < max_records and budget > 0:
                line = f.readline(min(end - at, MAX_RECORD_BYTES + 1))
                start, at = at, at + len(line)
                if not line.endswith(b"\n"):
                    if at >= size:
                        self._torn(seg, start, "no newline at the end of the segment")
                    elif at >= end:
                        return start, budget  # the region stops mid-record: not ours to judge
                    else:  # longer than any record: skip up to the next newline
                        at = _skip_line(f, at, end)
                        self._corrupt(seg, start, "longer than any record")
                    continue
                try:
                    records.append(decode_record(line))
                except BadRecord as e:
                    if at >= size:
                        self._torn(seg, start, str(e))
                    else:
                        self._corrupt(seg, start, str(e))
                    continue
                self.records_read += 1
                budget -= len(line)
            return at, budget

    def _torn(self, seg: int, byte: int, why: str) -> None:
        self.torn_records += 1
        log.info(
            "spool %s: torn record at segment %d byte %d skipped (%s)",
            self.folder,
            seg,
            byte,
            why,
            extra={"component": COMPONENT, "event": "spool.torn_record"},
        )

    def _corrupt(self, seg: int, byte: int, why: str) -> None:
        self.corrupt_records += 1
        n = self.corrupt_records
        if n <= CORRUPT_LOG_FIRST or n % 1000 == 0:
            log.warning(
                "spool %s: corrupt record at segment %d byte %d skipped (%s); %d so far",
                self.folder,
                seg,
                byte,
                why,
                n,
                extra={"component": COMPONENT, "event": "spool.corrupt_record"},
            )


def _skip_line(f: Any, at: int, end: int) -> int:
    """Read past the next newline (or to `end`); return the offset reached."""
    while at < end:
        chunk = f.read(min(end - at, 1024 * 1024))
        if not chunk:
            return at
        nl = chunk.find(b"\n")
        if nl >= 0:
            at += nl + 1
            f.seek(at)
            return at
        at += len(chunk)
    return at
