"""Line framing of log files: pure, per-file decoders from file lines to records.

A file source splits a file into lines (`LineSplitter`), then a framer chosen by
`FileSourceConfig.format` turns those lines into records:

* ``raw``: every line is a record (identity).
* ``docker``: dockerd's json-file lines, ``{"log": "...\\n", "stream": "stdout",
  "time": "2024-...Z"}``. The record is `log` without its trailing newline; a `log`
  without one is a piece of a longer line that dockerd split at 16 KiB, joined with the
  next pieces of the same stream up to the piece that ends with a newline. With
  ``--log-opt labels=..``, ``env=..``, ``labels-regex``/``env-regex`` or ``tag=..``
  dockerd adds ``"attrs": {"<label or env name>": "<value>", "tag": "<tag>"}`` to every
  line (all pieces of a long line alike); it reaches the record's meta as ``attrs``, a
  flat {str: str} object (non-string values, which dockerd never writes, as JSON text;
  an ``attrs`` that is not an object is ignored).
* ``cri``: containerd / CRI-O lines, ``<RFC3339Nano time> <stdout|stderr> <P|F> <log>``;
  ``P`` pieces are joined up to the ``F`` piece of the same stream.

Each record keeps the file offset where its first line started (`Records.starts`): the
source never commits a position past the start of a record that is still held, so a
record held across a restart is read again whole. For that, records leave a framer in
the order of their starts: while a piece of one stream waits for its end, complete
records of the other stream that follow it in the file wait behind it (bounded by
`max_line_bytes` and by the flush timeout of the waiting piece).

A joined record is cut at `max_line_bytes` (flagged truncated, like a long line). A
wrapper line that does not parse is kept whole as a raw record with
``parse_error`` in its meta ("docker_json" or "cri") and counted in `errors`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol

import orjson

from forwarder.clock import as_utc

__all__ = [
    "CriFramer",
    "DockerFramer",
    "Framer",
    "RawFramer",
    "Records",
    "build_framer",
]

# A record not completed after this many records of other streams wait behind it
# is released as it is (its next pieces then start a record of their own).
MAX_WAITING_RECORDS: Final = 10_000

# Shared by every record they describe: never mutated (consumers copy them into meta).
_STREAM_META: Final[dict[str, Mapping[str, Any]]] = {
    name: {"stream": name} for name in ("stdout", "stderr")
}
_DOCKER_ERROR: Final[Mapping[str, Any]] = {"parse_error": "docker_json"}
_CRI_ERROR: Final[Mapping[str, Any]] = {"parse_error": "cri"}


@dataclass(slots=True)
class Records:
    """Records in file order, as parallel lists (cheap to pass through in bulk).

    `starts[i]` is the file offset where record i's first line started (None: not
    tracked, for records that leave the last stage); `truncated` holds indices
    (ascending); `metas` and `times` are None while no record has one.
    """

    payloads: list[bytes] = field(default_factory=list)
    starts: Sequence[int] | None = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)
    metas: list[Mapping[str, Any] | None] | None = None
    times: list[datetime | None] | None = None

    def __len__(self) -> int:
        return len(self.payloads)

    def append(
        self,
        payload: bytes,
        start: int,
        cut: bool = False,
        meta: Mapping[str, Any] | None = None,
        time: datetime | None = None,
    ) -> None:
        i = len(self.payloads)
        self.payloads.append(payload)
        starts = self.starts
        if starts is not None:
            assert isinstance(starts, list)
            starts.append(start)
        if cut:
            self.truncated.append(i)
        if meta is not None:
            if self.metas is None:
                self.metas = [None] * i
            self.metas.append(meta)
        elif self.metas is not None:
            self.metas.append(None)
        if time is not None:
            if self.times is None:
                self.times = [None] * i
            self.times.append(time)
        elif self.times is not None:
            self.times.append(None)

    def extend(self, other: Records, lo: int = 0, hi: int | None = None) -> None:
        """Append other's records lo..hi (all by default)."""
        hi = len(other.payloads) if hi is None else hi
        if hi <= lo:
            return
        base = len(self.payloads) - lo
        self.payloads.extend(other.payloads[lo:hi])
        starts = self.starts
        if starts is not None:
            assert isinstance(starts, list) and other.starts is not None
            starts.extend(other.starts[i] for i in range(lo, hi))
        if other.truncated:
            self.truncated.extend(i + base for i in other.truncated if lo <= i < hi)
        n = hi - lo
        if other.metas is not None:
            if self.metas is None:
                self.metas = [None] * (len(self.payloads) - n)
            self.metas.extend(other.metas[lo:hi])
        elif self.metas is not None:
            self.metas.extend([None] * n)
        if other.times is not None:
            if self.times is None:
                self.times = [None] * (len(self.payloads) - n)
            self.times.extend(other.times[lo:hi])
        elif self.times is not None:
            self.times.extend([None] * n)


class Framer(Protocol):
    """Lines of one file in, records out, in file order; holds unfinished records."""

    errors: int  # wrapper lines that did not parse (kept as raw records)

    def feed(self, lines: Records, now: float) -> Records:
        """The records completed by these lines; `now` is monotonic seconds."""

    def held_start(self) -> int | None:
        """File offset where the oldest held record starts, or None if none is held."""

    def next_due(self) -> float | None:
        """Monotonic time at which `flush_due` releases something, or None."""

    def flush_due(self, now: float) -> Records:
        """Release held records whose stream had no line for the flush timeout."""

    def flush(self) -> Records:
        """Release everything held (end of the file)."""


class RawFramer:
    """Every line is a record."""

    errors = 0

    def feed(self, lines: Records, now: float) -> Records:
        return lines

    def held_start(self) -> int | None:
        return None

    def next_due(self) -> float | None:
        return None

    def flush_due(self, now: float) -> Records:
        return Records()

    def flush(self) -> Records:
        return Records()


@dataclass(slots=True, eq=False)
class _Partial:
    """Pieces of one stream's line waiting for its end."""

    start: int
    meta: Mapping[str, Any] | None
    time: datetime | None
    last: float  # monotonic time its last piece arrived
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    cut: bool = False

    def add(self, piece: bytes, cut: bool, limit: int) -> None:
        if cut:
            self.cut = True
        if self.size >= limit:
            if piece:
                self.cut = True
            return
        if self.size + len(piece) > limit:
            piece = piece[: limit - self.size]
            self.cut = True
        self.parts.append(piece)
        self.size += len(piece)

    def payload(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


_Done = tuple[int, bytes, bool, "Mapping[str, Any] | None", "datetime | None"]


class _Joiner:
    """Joins pieces per stream; releases records in the order of their starts."""

    def __init__(self, max_line_bytes: int, flush_timeout_s: float) -> None:
        self._max = max_line_bytes
        self._timeout = flush_timeout_s
        self._open: dict[str, _Partial] = {}
        self._waiting: list[_Done] = []  # complete, behind an open partial
        self._waiting_bytes = 0
        self.errors = 0

    def held_start(self) -> int | None:
        if not self._open:
            return self._waiting[0][0] if self._waiting else None
        return min(p.start for p in self._open.values())

    def next_due(self) -> float | None:
        if not self._open:
            return None
        return min(p.last for p in self._open.values()) + self._timeout

    def flush_due(self, now: float) -> Records:
        out = Records()
        if self._open:
            for stream, p in list(self._open.items()):
                if now >= p.last + self._timeout:  # the same sum as next_due
                    del self._open[stream]
                    self._done(out, p.start, p.payload(), p.cut, p.meta, p.time)
            self._release(out)
        return out

    def flush(self) -> Records:
        out = Records()
        for p in self._open.values():
            self._waiting.append((p.start, p.payload(), p.cut, p.meta, p.time))
        self._open.clear()
        self._release(out)
        return out

    def _piece(
        self,
        out: Records,
        stream: str,
        meta: Mapping[str, Any] | None,
        piece: bytes,
        final: bool,
        start: int,
        time: datetime | None,
        cut: bool,
        now: float,
    ) -> None:
        p = self._open.get(stream)
        if p is None:
            if final:
                if len(piece) > self._max:
                    piece, cut = piece[: self._max], True
                self._done(out, start, piece, cut, meta, time)
                return
            p = self._open[stream] = _Partial(start, meta, time, now)
        p.add(piece, cut, self._max)
        p.last = now
        if final:
            del self._open[stream]
            self._done(out, p.start, p.payload(), p.cut, p.meta, p.time)

    def _done(
        self,
        out: Records,
        start: int,
        payload: bytes,
        cut: bool,
        meta: Mapping[str, Any] | None,
        time: datetime | None,
    ) -> None:
        """A complete record: out now, or behind the open partials that start before it."""
        if not self._open and not self._waiting:
            out.append(payload, start, cut, meta, time)
            return
        self._waiting.append((start, payload, cut, meta, time))
        self._waiting_bytes += len(payload)
        too_much = len(self._waiting) > MAX_WAITING_RECORDS or self._waiting_bytes > self._max
        if too_much and self._open:
            # Too much waits behind the oldest open piece: give it up as it is.
            stream, p = min(self._open.items(), key=lambda item: item[1].start)
            del self._open[stream]
            self._waiting.append((p.start, p.payload(), p.cut, p.meta, p.time))
        self._release(out)

    def _release(self, out: Records) -> None:
        waiting = self._waiting
        if not waiting:
            return
        waiting.sort(key=_start_of)
        limit = min((p.start for p in self._open.values()), default=None)
        k, n = 0, len(waiting)
        while k < n and (limit is None or waiting[k][0] < limit):
            start, payload, cut, meta, time = waiting[k]
            out.append(payload, start, cut, meta, time)
            self._waiting_bytes -= len(payload)
            k += 1
        del waiting[:k]
        if not waiting:
            self._waiting_bytes = 0


def _start_of(done: _Done) -> int:
    return done[0]


class DockerFramer(_Joiner):
    """dockerd's json-file lines; pieces split at 16 KiB joined per stream."""

    def __init__(self, max_line_bytes: int, flush_timeout_s: float) -> None:
        super().__init__(max_line_bytes, flush_timeout_s)
        # Per stream, the last line's attrs and the meta made of them: one container
        # writes the same attrs on every line, so its records share one meta object
        # (cheap to compare when grouping, never mutated).
        self._attrs_meta: dict[str, tuple[Any, Mapping[str, Any]]] = {}

    def _meta_with(self, stream: str, attrs: Any) -> Mapping[str, Any]:
        """The meta of a line of `stream` that carries `attrs`."""
        seen = self._attrs_meta.get(stream)
        if seen is not None and seen[0] == attrs:
            return seen[1]
        base = _STREAM_META.get(stream) or {"stream": stream}
        if attrs.__class__ is not dict or not attrs:
            meta = base
        else:
            dumps = orjson.dumps
            flat = {k: v if v.__class__ is str else dumps(v).decode() for k, v in attrs.items()}
            meta = {**base, "attrs": flat}
        self._attrs_meta[stream] = (attrs, meta)
        return meta

    def feed(self, lines: Records, now: float) -> Records:
        payloads, starts = lines.payloads, lines.starts
        assert starts is not None
        out = Records([], [], [], [], [])
        # The common case inline: a whole line while no piece is open.
        out_payloads, out_starts, out_metas, out_times = (
            out.payloads,
            out.starts,
            out.metas,
            out.times,
        )
        assert isinstance(out_starts, list) and out_metas is not None and out_times is not None
        cut_lines = set(lines.truncated) if lines.truncated else ()
        loads, stream_meta, max_bytes = orjson.loads, _STREAM_META, self._max
        for i, line in enumerate(payloads):
            cut = i in cut_lines
            try:
                obj = loads(line)
            except orjson.JSONDecodeError:
                obj = None
            log = obj.get("log") if obj.__class__ is dict else None
            stream = obj.get("stream") if log.__class__ is str else None  # type: ignore[union-attr]
            if stream.__class__ is not str:
                self.errors += 1
                self._done(out, starts[i], line, cut, _DOCKER_ERROR, None)
                continue
            final = log.endswith("\n")
            piece = (log[:-1] if final else log).encode()
            if final and piece[-1:] == b"\r":
                piece = piece[:-1]
            attrs = obj.get("attrs")
            if attrs is None:
                meta = stream_meta.get(stream) or {"stream": stream}
            else:
                meta = self._meta_with(stream, attrs)
            time = _parse_time(obj.get("time"))
            if final and not self._open and len(piece) <= max_bytes and not cut:
                out_payloads.append(piece)
                out_starts.append(starts[i])
                out_metas.append(meta)
                out_times.append(time)
                continue
            self._piece(out, stream, meta, piece, final, starts[i], time, cut, now)
        if out.times is not None and not any(out.times):
            out.times = None
        return out


class CriFramer(_Joiner):
    """CRI lines (containerd, CRI-O): ``<time> <stream> <P|F>[:tags] <log>``."""

    def feed(self, lines: Records, now: float) -> Records:
        out = Records()
        payloads, starts = lines.payloads, lines.starts
        cut_lines = set(lines.truncated) if lines.truncated else ()
        for i, line in enumerate(payloads):
            cut = i in cut_lines
            parts = line.split(b" ", 3)
            time = _parse_time(parts[0].decode("ascii", "replace")) if len(parts) >= 3 else None
            tag = parts[2].split(b":", 1)[0] if time is not None else b""
            stream = parts[1] if time is not None else b""
            if tag not in (b"P", b"F") or stream not in (b"stdout", b"stderr"):
                self.errors += 1
                self._done(out, starts[i], line, cut, _CRI_ERROR, None)
                continue
            name = stream.decode()
            piece = parts[3] if len(parts) == 4 else b""
            self._piece(
                out, name, _STREAM_META[name], piece, tag == b"F", starts[i], time, cut, now
            )
        return out


def _parse_time(value: Any) -> datetime | None:
    """RFC 3339 with up to nanoseconds (cut to microseconds) as aware UTC, else None."""
    if value.__class__ is not str or not 19 <= len(value) <= 40:
        return None
    try:
        return as_utc(datetime.fromisoformat(value))
    except ValueError:
        return None


def build_framer(format: str, max_line_bytes: int, flush_timeout_s: float) -> Framer:
    """The framer for `FileSourceConfig.format` ("raw", "docker" or "cri")."""
    if format == "docker":
        return DockerFramer(max_line_bytes, flush_timeout_s)
    if format == "cri":
        return CriFramer(max_line_bytes, flush_timeout_s)
    if format == "raw":
        return RawFramer()
    raise ValueError(f"unknown format {format!r}")
