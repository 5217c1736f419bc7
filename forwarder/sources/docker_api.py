"""The docker source in api mode: container logs from the Engine API over its unix socket.

For hosts where dockerd's log files cannot be mounted (Docker Desktop). One aiohttp
`ClientSession` on a `UnixConnector`, owned by `DockerApiSource.run` and closed when
it returns:

- `GET /events?filters={"type":["container"],"event":["start","die"]}`: a stream of
  JSON objects; a "start" begins following that container. The list of containers
  is taken once the event stream is open (and again after every reconnect), so no
  start falls between the two.
- `GET /containers/json?all=1`: running containers are followed; stopped ones only
  when we hold a cursor for them (to read what they wrote after it).
- `GET /containers/{id}/json`: name, labels, Config.Tty and HostConfig.LogConfig.
- `GET /containers/{id}/logs?follow=1&stdout=1&stderr=1&timestamps=1&since=...`: the
  log stream (API 1.41 sends it with no Content-Type: the TTY flag of the inspect
  answer says which form it has). Without a TTY it is multiplexed: frames of an
  8-byte header (stream type 1 stdout, 2 stderr, 3 the daemon's own error; 3 zero
  bytes; big-endian uint32 payload length) and a payload, one message a frame; with a
  TTY it is the bare byte stream. Every message starts with its RFC3339Nano timestamp
  and a space; dockerd splits lines longer than 16 KB into several messages of 16 KB
  (one frame each), all stamped with the line's first timestamp.

Attrs: with `--log-opt labels=..`, `env=..` (or their `-regex` forms) or `tag=..`,
json-file keeps an attrs map on every message. For such a container (its LogConfig
says so: `makes_attrs`) the logs are asked with `details=1`, and every message, each
16 KB piece too, has "<k=v,k2=v2> " after its timestamp (sorted, query-escaped:
`parse_attrs`). The rows get it as `meta.attrs`, a flat {str: str} object (the same
key files mode uses), e.g. `{"stream": "stdout", "attrs": {"REGION": "eu", "tag":
"api/1"}}`; a container without attrs options has no `attrs` key.

The pure parts: `FrameDecoder` (bytes -> complete frames), `TtyMessages` (TTY bytes ->
complete messages), `MessageReader` (either), `ResendDetector` (what dockerd sends a
second time), `LineAssembler` (messages -> complete lines with their timestamp and
attrs), `ContainerCursor` (which lines of a (re)connection are new), `ContainerLog`
(cursor, then the multiline grouper of `cfg.multiline`, and the resume point of what
it released), `Backoff`, `classify_status`. A chunk is the records completed by one
read of the stream.

Cursor and exactly-once: per container, `Position(source, stream=<container id>,
offset=<ns timestamp>, detail={"count_at_ts": n, "name": ...})`: the highest line
timestamp emitted and how many lines carried exactly it. A (re)connection asks for
`since=<that second>.<nanos>` (dockerd returns the messages at or after it, in log
order) and drops the first `count_at_ts` lines at that timestamp, which were emitted
before. A stream that breaks mid-frame or mid-message is resumed from the cursor of
the last complete line: the partial text is discarded, never emitted. While the
grouper holds a record (a traceback may still grow), the committed position is the
cursor before its first line, so a restart reads it again whole.

Rotation: dockerd 20.10's follow reader, after a json-file rotation
(`--log-opt max-size`), sends the new file's first messages a second time (it takes
the new, smaller file for a truncated one and reads it again from its start): one
message or a run of hundreds, whole lines or 16 KB pieces of a line not finished yet.
When it falls behind by more than a file (a burst over max-size, or the forwarder
slowed by its database) it skips the files in between. So the first re-sent message
(`ResendDetector`) ends that stream, and the next request reads from the cursor
again: dockerd answers a new request from its files on disk, whole (what is still
kept: max-file x max-size), and the cursor drops what was emitted. Nothing re-sent
is emitted, and what the follow reader skipped is read then.

Known limits. Inherent in a timestamp cursor: dockerd stamps stdout and stderr in two
goroutines, so a line can be logged after one with a later timestamp; a reconnection
whose cursor falls exactly between the two loses the earlier-stamped line (dockerd's
`since` filter drops it); measured, 13 such pairs in 40,000 lines written as fast as
busybox can to both streams. dockerd's follow reader cannot keep up with lines much
longer than max-size (a 229 KB line with max-size=50k spans five files written in a
millisecond): it skips and repeats pieces before any re-send shows, and such lines
come out cut or joined wrongly. Files mode has neither limit.
"""

from __future__ import annotations

import asyncio
import calendar
import codecs
import json
import logging
import re
import struct
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any, Final
from urllib.parse import unquote_plus

import aiohttp

from forwarder.clock import Clock
from forwarder.config import DockerSourceConfig
from forwarder.event import Position, RawChunk
from forwarder.pipeline.multiline import Grouper, build_grouper
from forwarder.sources.docker import (
    ContainerRules,
    ContainerTarget,
    OwnContainer,
    detect_own_container,
    parse_container,
)
from forwarder.sources.framing import Records

log = logging.getLogger(__name__)

COMPONENT = "source.docker"
EVENT_FILTERS: Final = json.dumps({"type": ["container"], "event": ["start", "die"]})
HEADER: Final = struct.Struct(">BxxxL")
STREAMS: Final = {0: "stdin", 1: "stdout", 2: "stderr", 3: "system"}
# line_meta entries, shared by every line they describe: never mutated.
_STREAM_META: Final[dict[str, Mapping[str, Any]]] = {
    name: {"stream": name} for name in ("stdout", "stderr")
}
# dockerd's json-file copier cuts lines into messages of this many bytes (TTY streams
# have no frames, so a continuation message is recognised by its length).
PARTIAL_BYTES: Final = 16 * 1024
MAX_PREFIX: Final = 40  # "2006-01-02T15:04:05.000000000+07:00" is 35 bytes
MAX_ATTRS: Final = 64 * 1024  # the attrs field of details=1 (labels, env, tag), escaped
NS: Final = 1_000_000_000
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
RECONNECT_INITIAL_S = 0.5
RECONNECT_MAX_S = 30.0

_RFC3339 = re.compile(
    rb"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)"
)
_FULL_ID = re.compile(r"^[0-9a-f]{64}$")


# -- timestamps ------------------------------------------------------------------------


def parse_timestamp_ns(text: bytes) -> int | None:
    """RFC 3339 with up to nanoseconds ("2024-05-01T10:00:00.123456789Z") -> ns since
    the epoch, or None when `text` is not exactly one."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    try:
        datetime(year, month, day, hour, minute, second)  # range check
    except ValueError:
        return None
    seconds = calendar.timegm((year, month, day, hour, minute, second))
    zone = m[8]
    if zone != b"Z":
        sign = -1 if zone[0:1] == b"+" else 1
        seconds += sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    frac = m[7] or b""
    return seconds * NS + int(frac.ljust(9, b"0") or b"0")


def since_param(ts_ns: int) -> str:
    """dockerd's `since` query value for a ns timestamp: "<seconds>.<9-digit nanos>"."""
    return f"{ts_ns // NS}.{ts_ns % NS:09d}"


def datetime_of(ts_ns: int) -> datetime:
    """Aware UTC datetime (microsecond precision) of a ns timestamp."""
    return EPOCH + timedelta(microseconds=ts_ns // 1000)


# -- framing ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    stream: int  # 0 stdin, 1 stdout, 2 stderr, 3 the daemon's error
    payload: bytes  # at most max_payload bytes
    cut: bool = False  # the payload was longer; the rest was dropped


class FrameDecoder:
    """Multiplexed log stream bytes in, complete frames out; bounded memory.

    A frame is returned only once all its bytes have arrived: a stream that breaks
    mid-frame leaves it here (`mid_frame`), never half-delivered. Of a payload longer
    than `max_payload` only the first `max_payload` bytes are kept, plus its final
    newline if it had one (dockerd writes one log message per frame, so this only cuts
    a line that is cut at max_line_bytes anyway, and keeps where it ends).
    """

    __slots__ = ("_cut", "_head", "_last", "_max", "_payload", "_remaining", "_stream")

    def __init__(self, max_payload: int) -> None:
        self._max = max_payload
        self._head = bytearray()
        self._stream = -1  # -1: reading a header
        self._remaining = 0
        self._payload = bytearray()
        self._cut = False
        self._last = 0  # the last payload byte seen

    @property
    def mid_frame(self) -> bool:
        return bool(self._head) or self._stream >= 0

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        i, n = 0, len(data)
        while i < n:
            if self._stream < 0:
                take = min(HEADER.size - len(self._head), n - i)
                self._head += data[i : i + take]
                i += take
                if len(self._head) < HEADER.size:
                    break
                self._stream, self._remaining = HEADER.unpack(self._head)
                self._head.clear()
                self._payload = bytearray()
                self._cut = False
            take = min(self._remaining, n - i)
            room = self._max - len(self._payload)
            if take > room:
                self._payload += data[i : i + max(room, 0)]
                self._cut = True
            else:
                self._payload += data[i : i + take]
            if take:
                self._last = data[i + take - 1]
            i += take
            self._remaining -= take
            if self._remaining == 0:
                if self._cut and self._last == 0x0A:
                    self._payload += b"\n"
                frames.append(Frame(self._stream, bytes(self._payload), self._cut))
                self._stream = -1
                self._payload = bytearray()
        return frames


# -- lines -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogLine:
    stream: str  # "stdout" | "stderr"
    text: bytes  # without the timestamp prefix and the line end
    ts_ns: int | None  # timestamp of its last message; None if it came without one
    truncated: bool = False
    attrs: bytes = b""  # with details=1: the "k=v,k2=v2" field of its last message


class _Expect(Enum):
    PREFIX = 1  # a line starts: its timestamp and a space come next
    CONTINUATION = 2  # a message continues the unfinished line: maybe a timestamp first
    ATTRS = 3  # details=1: after the timestamp, the attrs field and a space
    TEXT = 4


@dataclass(slots=True)
class _StreamState:
    expect: _Expect = _Expect.PREFIX
    prefix: bytearray = field(default_factory=bytearray)
    text: bytearray = field(default_factory=bytearray)
    cut: bool = False
    ts_ns: int | None = None
    attrs: bytes = b""
    message_bytes: int = 0  # text bytes of the current message


class LineAssembler:
    """Log message bytes in, complete lines (with their timestamps) out.

    `feed(stream, data, message_start)`: `message_start` says `data` is a whole frame
    (multiplexed streams: one message per frame); False for the bytes of a TTY stream.
    Each line starts with "<RFC3339Nano> "; a message that continues an unfinished
    line (dockerd's 16 KB partials) starts with its own timestamp, which is removed
    and becomes the line's. For a TTY stream a continuation is recognised after
    exactly PARTIAL_BYTES of a message. Bytes where a timestamp was expected but none
    is are kept as text. Lines are cut at `max_line_bytes` (the rest dropped as it
    comes, `truncated` set); a final "\\r" (TTY line ends) is removed.

    `details`: the stream was asked with details=1, so every message (each 16 KB piece
    too) has its attrs field and a space after the timestamp (`parse_attrs`); the line
    keeps it as `attrs`. A field that does not end in a space within MAX_ATTRS bytes is
    kept as text.
    """

    def __init__(self, max_line_bytes: int, *, details: bool = False) -> None:
        self._max = max_line_bytes
        self._details = details
        self._streams: dict[str, _StreamState] = {}

    @property
    def held_bytes(self) -> int:
        return sum(len(s.text) + len(s.prefix) for s in self._streams.values())

    def feed(self, stream: str, data: bytes, *, message_start: bool) -> list[LogLine]:
        st = self._streams.get(stream)
        if st is None:
            st = self._streams[stream] = _StreamState()
        if message_start and st.expect is _Expect.TEXT:
            st.expect = _Expect.CONTINUATION  # a new message in the middle of a line
        lines: list[LogLine] = []
        pos, n = 0, len(data)
        while pos < n:
            if st.expect is _Expect.ATTRS:
                pos = self._attrs(st, data, pos)
                continue
            if st.expect is not _Expect.TEXT:
                pos = self._prefix(st, data, pos)
                continue
            end = n
            if not message_start:  # TTY: stop where a 16 KB message would end
                end = min(n, pos + PARTIAL_BYTES - st.message_bytes)
            nl = data.find(b"\n", pos, end)
            if nl < 0:
                self._append(st, data[pos:end])
                pos = end
                if not message_start and st.message_bytes == PARTIAL_BYTES:
                    st.expect = _Expect.CONTINUATION
                continue
            self._append(st, data[pos:nl])
            lines.append(self._complete(stream, st))
            pos = nl + 1
        return lines

    def flush(self) -> list[LogLine]:
        """End of the log: every unfinished line, as if its newline followed."""
        lines = []
        for stream, st in list(self._streams.items()):
            if st.prefix:
                self._not_a_prefix(st, 0)
            if st.text or st.cut:
                lines.append(self._complete(stream, st))
        return lines

    def _prefix(self, st: _StreamState, data: bytes, pos: int) -> int:
        """Consume the bytes of an expected timestamp prefix; the new position."""
        end = min(len(data), pos + MAX_PREFIX - len(st.prefix))
        stops = [i for i in (data.find(b" ", pos, end), data.find(b"\n", pos, end)) if i >= 0]
        if not stops:
            st.prefix += data[pos:end]
            if len(st.prefix) < MAX_PREFIX:
                return end  # wait for the rest of it
            return self._not_a_prefix(st, end)
        stop = min(stops)
        st.prefix += data[pos:stop]
        if data[stop] == 0x20:
            ts = parse_timestamp_ns(bytes(st.prefix))
            if ts is not None:
                st.ts_ns = ts
                st.prefix.clear()
                st.expect = _Expect.ATTRS if self._details else _Expect.TEXT
                st.message_bytes = 0
                return stop + 1
        return self._not_a_prefix(st, stop)

    def _attrs(self, st: _StreamState, data: bytes, pos: int) -> int:
        """Consume the attrs field after a timestamp (details=1); the new position."""
        end = min(len(data), pos + MAX_ATTRS - len(st.prefix))
        space, newline = data.find(b" ", pos, end), data.find(b"\n", pos, end)
        if space >= 0 and (newline < 0 or space < newline):
            st.prefix += data[pos:space]
            st.attrs = bytes(st.prefix)
            st.prefix.clear()
            st.expect = _Expect.TEXT
            st.message_bytes = 0
            return space + 1
        if newline < 0:
            st.prefix += data[pos:end]
            if len(st.prefix) < MAX_ATTRS:
                return end  # wait for the rest of it
            return self._not_a_prefix(st, end)
        st.prefix += data[pos:newline]
        return self._not_a_prefix(st, newline)

    def _not_a_prefix(self, st: _StreamState, pos: int) -> int:
        """What was taken for a timestamp (or attrs) is text; read text on at pos."""
        if st.expect is _Expect.PREFIX:
            st.ts_ns = None
        st.expect = _Expect.TEXT
        st.message_bytes = 0
        text = bytes(st.prefix)
        st.prefix.clear()
        self._append(st, text)
        return pos

    def _append(self, st: _StreamState, piece: bytes) -> None:
        st.message_bytes += len(piece)
        room = self._max + 1 - len(st.text)  # + 1: a final \r that is removed
        if room >= len(piece):
            st.text += piece
        else:
            st.text += piece[: max(room, 0)]
            st.cut = True

    def _complete(self, stream: str, st: _StreamState) -> LogLine:
        text = bytes(st.text)
        cut = st.cut
        if text.endswith(b"\r") and not cut:
            text = text[:-1]
        if len(text) > self._max:
            text, cut = text[: self._max], True
        line = LogLine(stream, text, st.ts_ns, cut, st.attrs)
        st.expect = _Expect.PREFIX
        st.text = bytearray()
        st.cut = False
        st.ts_ns = None
        st.attrs = b""
        st.message_bytes = 0
        return line


class TtyMessages:
    """The bare bytes of a TTY container's log stream in, its messages out, whole.

    A multiplexed stream brings one message per frame; a TTY stream has no frames, so
    a message is told by its shape: "<timestamp> " (then "<attrs> " with details=1),
    then text up to and including "\\n", or exactly PARTIAL_BYTES of text where dockerd
    cut a longer line. A message is returned only once whole: the bytes of an unfinished
    one wait here (at most one message), so a stream that breaks inside one never
    delivers part of it. Bytes that do not start with a timestamp end at their newline
    or after PARTIAL_BYTES (the line assembler keeps them as text).
    """

    __slots__ = ("_buf", "_details", "_scanned", "_text_at")

    def __init__(self, *, details: bool = False) -> None:
        self._details = details
        self._buf = bytearray()
        self._text_at = -1  # where the text of the held message starts, once known
        self._scanned = 0  # how far its text was searched for a newline

    @property
    def held_bytes(self) -> int:
        return len(self._buf)

    def flush(self) -> bytes:
        """The end of the stream: what is held, as the last message."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._text_at, self._scanned = -1, 0
        return rest

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        messages: list[bytes] = []
        while self._buf:
            end = self._end()
            if end is None:
                break
            messages.append(bytes(self._buf[:end]))
            del self._buf[:end]
            self._text_at, self._scanned = -1, 0
        return messages

    def _end(self) -> int | None:
        """Where the message at the start of the buffer ends, or None: not there yet."""
        buf = self._buf
        if self._text_at < 0:
            start = self._text_start()
            if start is None:
                return None
            self._text_at = self._scanned = start
        limit = self._text_at + PARTIAL_BYTES
        newline = buf.find(b"\n", self._scanned, limit)
        if newline >= 0:
            return newline + 1
        if len(buf) >= limit:
            return limit
        self._scanned = len(buf)
        return None

    def _text_start(self) -> int | None:
        buf = self._buf
        start = _field_end(buf, 0, MAX_PREFIX)
        if start is None:
            return None
        if start == 0 or parse_timestamp_ns(bytes(buf[: start - 1])) is None:
            return 0  # no timestamp: all of it is text
        if not self._details:
            return start
        text_at = _field_end(buf, start, MAX_ATTRS)
        return None if text_at is None else (text_at or start)


def _field_end(buf: bytearray, start: int, limit: int) -> int | None:
    """After the space that ends the field at `start` (within `limit` bytes); 0 when
    the field is not one (a newline first, or no space in `limit` bytes); None while
    the buffer does not tell yet."""
    end = start + limit
    space, newline = buf.find(b" ", start, end), buf.find(b"\n", start, end)
    if space >= 0 and (newline < 0 or space < newline):
        return space + 1
    if newline >= 0 or len(buf) >= end:
        return 0
    return None


def parse_attrs(field: bytes) -> dict[str, str]:
    """The attrs field of a details=1 message -> {key: value}.

    dockerd writes the log driver's attrs (`--log-opt labels=..`, `env=..`, `tag=..`) as
    "k=v" pairs sorted by key, joined by ",", each key and value query-escaped (a space
    is "+", "," is "%2C", "=" is "%3D"); no attrs: an empty field.
    """
    attrs: dict[str, str] = {}
    if not field:
        return attrs
    for pair in field.decode("utf-8", "replace").split(","):
        key, _, value = pair.partition("=")
        attrs[unquote_plus(key)] = unquote_plus(value)
    return attrs


class MessageReader:
    """A logs stream's bytes in, its messages out: (stream name, payload) pairs.

    Multiplexed (no TTY): a frame is a message (`FrameDecoder`), stream "stdout",
    "stderr" or "system" (the daemon's own error); stdin and unknown types are dropped.
    TTY: the bare bytes cut into messages by `TtyMessages`, all "stdout". Either way a
    message comes out only once whole; `flush` gives the end of a TTY stream that did
    not end in a newline (a multiplexed stream that ends inside a frame is cut).
    """

    __slots__ = ("_frames", "_tty")

    def __init__(self, tty: bool, max_payload: int, *, details: bool = False) -> None:
        self._frames = None if tty else FrameDecoder(max_payload)
        self._tty = TtyMessages(details=details) if tty else None

    @property
    def mid_frame(self) -> bool:
        return self._frames is not None and self._frames.mid_frame

    def flush(self) -> list[tuple[str, bytes]]:
        return [("stdout", self._tty.flush())] if self._tty and self._tty.held_bytes else []

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        if self._tty is not None:
            return [("stdout", m) for m in self._tty.feed(data)]
        assert self._frames is not None
        messages = []
        for frame in self._frames.feed(data):
            stream = STREAMS.get(frame.stream)
            if stream is not None and stream != "stdin":
                messages.append((stream, frame.payload))
        return messages


# The json-file (and local) log options that make dockerd add attrs to every message.
ATTRS_OPTIONS: Final = frozenset({"labels", "labels-regex", "env", "env-regex", "tag"})


def makes_attrs(inspected: bytes | Mapping[str, Any]) -> bool:
    """Whether a container's inspect answer sets a log option that makes attrs
    (HostConfig.LogConfig.Config: labels, env, their -regex forms, tag); only then are
    its logs asked with details=1."""
    doc: Any = inspected
    if isinstance(inspected, bytes):
        try:
            doc = json.loads(inspected)
        except ValueError:
            return False
    host = doc.get("HostConfig") if isinstance(doc, Mapping) else None
    config = host.get("LogConfig") if isinstance(host, Mapping) else None
    options = config.get("Config") if isinstance(config, Mapping) else None
    if not isinstance(options, Mapping):
        return False
    return any(options.get(k) for k in ATTRS_OPTIONS)


# -- dockerd's re-sends ----------------------------------------------------------------


def message_ts(payload: bytes) -> int | None:
    """The timestamp a log message starts with, or None."""
    space = payload.find(b" ", 0, MAX_PREFIX)
    return None if space < 0 else parse_timestamp_ns(payload[:space])


@dataclass(slots=True)
class _Sent:
    """The messages of one stream passed on a connection: timestamps (ascending) and
    their hashes, side by side; and the line still open (its pieces so far)."""

    ts: array[int] = field(default_factory=lambda: array("q"))
    hashes: array[int] = field(default_factory=lambda: array("q"))
    last_ts: int = -1
    trimmed: bool = False  # older messages were dropped from the arrays
    open_ts: int = -1  # the timestamp of the unfinished line (-1: none)
    open_hashes: set[int] = field(default_factory=set)

    def has(self, ts: int, digest: int) -> bool:
        lo = bisect_left(self.ts, ts)
        hi = bisect_right(self.ts, ts, lo)
        return digest in self.hashes[lo:hi]

    def add(self, ts: int, digest: int, ends_line: bool, window: int) -> None:
        if ts != self.open_ts:
            self.open_hashes = set()
        if len(self.ts) >= window:
            del self.ts[: window // 2]
            del self.hashes[: window // 2]
            self.trimmed = True
        self.ts.append(ts)
        self.hashes.append(digest)
        self.last_ts = ts
        if ends_line:
            self.open_ts, self.open_hashes = -1, set()
        else:
            self.open_ts = ts
            self.open_hashes.add(digest)


class ResendDetector:
    """Tells the messages one logs connection brings a second time. Pure.

    dockerd 20.10's follow reader, after a json-file rotation, reads the new file to its
    end and then once more from its start (it takes the new file being smaller than the
    old one for a truncation): the messages of the new file read so far come again,
    identical (timestamp, stream, text), right after themselves. A run may start in the
    middle of a long line (its 16 KB pieces) and it may hold any number of messages.

    What makes a re-send certain: within one stream dockerd stamps every line later than
    the one before (one copier goroutine; the 16 KB pieces of a line all carry the
    line's first stamp). So a message of stream S is sent again when it is identical to
    one passed on this connection and either stamped before S's last message, or
    stamped like S's last line once that line is complete, or identical to a piece of
    S's line still open. A message stamped earlier that matches nothing is a genuine one
    (the clock was set back): the history of S starts again from it. Genuine repeats
    (same text, their own timestamps) never match.

    Two cases are not certain: a long line whose 16 KB pieces repeat exactly (a line of
    one repeated pattern) looks like a re-send of its own pieces, and two identical
    lines stamped alike (a clock coarser than a line) like a re-send of the first. The
    caller reads again from its cursor on every re-send (dockerd's files, not the follow
    reader), so a false alarm costs a reconnection, not a line; `guard` (per stream, the
    last timestamp the connections before read) stops it from being raised twice on the
    same messages: these two cases are not looked for at or before it.

    The history keeps the last `window` messages of each stream (16 bytes each); a
    message stamped before what it still holds is taken for a re-send too.
    """

    def __init__(self, guard: Mapping[str, int] | None = None, window: int = 1 << 18) -> None:
        self._guard = dict(guard or {})
        self._window = window
        self._streams: dict[str, _Sent] = {}
        self.first_ts: int | None = None  # the earliest timestamp passed

    def resent(self, stream: str, payload: bytes) -> bool:
        """Whether this message (a frame's payload, or a TTY message) was sent before on
        this connection; if not, it is remembered."""
        ts = message_ts(payload)
        if ts is None:
            return False  # cannot be placed: never taken for a re-send
        sent = self._streams.get(stream)
        if sent is None:
            sent = self._streams[stream] = _Sent()
        digest = hash(payload)
        if ts < sent.last_ts:
            if sent.has(ts, digest) or (sent.trimmed and ts < sent.ts[0]):
                return True
            self._streams[stream] = sent = _Sent()  # the clock went back: start again
        elif ts > self._guard.get(stream, -1):  # the two cases a false alarm can be
            if ts == sent.last_ts and sent.open_ts != ts and sent.has(ts, digest):
                return True
            if ts == sent.open_ts and digest in sent.open_hashes:
                return True
        sent.add(ts, digest, payload.endswith(b"\n"), self._window)
        if self.first_ts is None or ts < self.first_ts:
            self.first_ts = ts
        return False

    def last_ts(self) -> dict[str, int]:
        """Per stream, the timestamp of the last message passed: the next connection's
        guard."""
        return {name: s.last_ts for name, s in self._streams.items() if s.last_ts >= 0}


# -- the cursor ------------------------------------------------------------------------


class ContainerCursor:
    """Which lines of a container's log are new, and where to resume after them.

    State: `ts_ns`, the highest timestamp of a line emitted (0: none yet), and
    `count`, how many emitted lines carry exactly it. `begin()` at every (re)connection
    (asked with `since=ts_ns`) arms the skip: lines stamped before `ts_ns` and the first
    `count` lines stamped `ts_ns` were emitted before. `admit(ts)` says whether a line
    is new and, if so, moves the cursor past it.
    """

    __slots__ = ("_skip_left", "_skip_ts", "count", "ts_ns")

    def __init__(self, ts_ns: int = 0, count: int = 0) -> None:
        self.ts_ns = ts_ns
        self.count = count
        self._skip_ts = 0
        self._skip_left = 0

    @classmethod
    def from_position(cls, position: Position) -> ContainerCursor:
        count = position.detail.get("count_at_ts", 0)
        if not isinstance(count, int) or count < 0 or position.offset < 0:
            raise ValueError(f"not a docker api cursor: {position!r}")
        return cls(position.offset, count)

    @property
    def started(self) -> bool:
        return self.ts_ns > 0

    def since(self) -> str | None:
        """The `since` of the next request, or None to read from the start."""
        return since_param(self.ts_ns) if self.started else None

    def begin(self) -> None:
        self._skip_ts = self.ts_ns
        self._skip_left = self.count

    def admit(self, ts_ns: int | None) -> bool:
        if ts_ns is None:
            return True  # no timestamp: cannot be placed, so never dropped
        if ts_ns < self._skip_ts:
            return False
        if ts_ns == self._skip_ts and self._skip_left > 0:
            self._skip_left -= 1
            return False
        if ts_ns > self.ts_ns:
            self.ts_ns, self.count = ts_ns, 1
        elif ts_ns == self.ts_ns:
            self.count += 1
        return True


class ContainerLog:
    """One container's lines -> the new ones (`ContainerCursor`) -> records grouped by
    the multiline grouper, and the resume point to commit with the records released
    so far: before the first line of a record the grouper still holds (a restart reads
    it again whole), else after the last line. Pure: `now` is monotonic seconds.
    """

    def __init__(self, cursor: ContainerCursor, grouper: Grouper) -> None:
        self.cursor = cursor
        self._grouper = grouper
        self._serial = 0  # numbers the admitted lines: the grouper's "starts"
        self._marks: deque[tuple[int, int, int]] = deque()  # (serial, cursor before it)
        self.skipped = 0
        # (stream, attrs field) -> the line meta: a container's lines share a few.
        self._metas: dict[tuple[str, bytes], Mapping[str, Any]] = {}

    def feed(self, lines: list[LogLine], now: float) -> Records:
        records = Records()
        for line in lines:
            ts, count = self.cursor.ts_ns, self.cursor.count
            if not self.cursor.admit(line.ts_ns):
                self.skipped += 1
                continue
            self._serial += 1
            self._marks.append((self._serial, ts, count))
            time = None if line.ts_ns is None else datetime_of(line.ts_ns)
            meta = self._meta(line) if line.attrs else _STREAM_META[line.stream]
            records.append(line.text, self._serial, line.truncated, meta, time)
        return self._grouper.feed(records, now)

    def _meta(self, line: LogLine) -> Mapping[str, Any]:
        """{"stream": .., "attrs": {..}} of a line with an attrs field (never mutated)."""
        key = (line.stream, line.attrs)
        meta = self._metas.get(key)
        if meta is None:
            attrs = parse_attrs(line.attrs)
            meta = {"stream": line.stream, "attrs": attrs} if attrs else _STREAM_META[line.stream]
            if len(self._metas) >= 64:
                self._metas.clear()
            self._metas[key] = meta
        return meta

    def next_due(self) -> float | None:
        """When `release_due` would release the held record (monotonic), if one is held."""
        return self._grouper.next_due()

    def release_due(self, now: float) -> Records:
        return self._grouper.flush_due(now)

    def flush(self) -> Records:
        """The end of the log: release what is held."""
        return self._grouper.flush()

    def resume_point(self) -> tuple[int, int]:
        """(ts_ns, count_at_ts) to commit with everything released so far."""
        held = self._grouper.held_start()
        marks = self._marks
        if held is None:
            marks.clear()
            return self.cursor.ts_ns, self.cursor.count
        while marks and marks[0][0] < held:
            marks.popleft()
        _, ts, count = marks[0]
        return ts, count


# -- errors and retries ----------------------------------------------------------------


class Backoff:
    """Capped exponential delays: initial, 2x, 4x, ... up to max; `reset` after success."""

    __slots__ = ("_initial", "_max", "_next")

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._initial = initial_s
        self._max = max_s
        self._next = initial_s

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._max)
        return delay

    def reset(self) -> None:
        self._next = self._initial


GONE: Final = "gone"  # the container no longer exists: stop following it
TRANSIENT: Final = "transient"  # back off and try again
PERMANENT: Final = "permanent"  # this request will never work: give up on it, loudly


def classify_status(status: int) -> str:
    """An Engine API answer's HTTP status -> GONE, TRANSIENT or PERMANENT.

    404: no such container. 5xx other than 501: the daemon is busy or restarting.
    501 (a logging driver that cannot be read back, e.g. "none" or "syslog") and the
    other 4xx: retrying cannot help. Connection errors are always TRANSIENT.
    """
    if status == 404:
        return GONE
    if status >= 500 and status != 501:
        return TRANSIENT
    return PERMANENT


class EngineError(Exception):
    """The Engine API answered with an error status."""

    def __init__(self, what: str, status: int, body: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body.strip()[:200]}")
        self.status = status
        self.kind = classify_status(status)


TRANSPORT_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)

# What one logs request came to (DockerApiSource._read_logs).
ENDED: Final = "ended"
RUNNING: Final = "running"
RESENT: Final = "resent"


# -- events ----------------------------------------------------------------------------


class JsonStream:
    """A stream of concatenated JSON objects in, the objects out (bounded buffer)."""

    def __init__(self, max_bytes: int = 1 << 20) -> None:
        self._buf = ""
        self._max = max_bytes
        self._json = json.JSONDecoder()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> list[Any]:
        text = self._utf8.decode(data)  # holds a character split between reads
        self._buf += text
        objects = []
        while True:
            s = self._buf.lstrip()
            if not s:
                self._buf = ""
                break
            try:
                obj, end = self._json.raw_decode(s)
            except ValueError:
                self._buf = s
                if len(s) > self._max:
                    raise ValueError("event stream: an object over the size limit") from None
                break
            objects.append(obj)
            self._buf = s[end:]
        return objects


def container_event(obj: Any) -> tuple[str, str] | None:
    """(action, container id) of a container start/die event, else None."""
    if not isinstance(obj, Mapping) or obj.get("Type", "container") != "container":
        return None
    action = obj.get("Action", obj.get("status"))
    actor = obj.get("Actor")
    cid = actor.get("ID") if isinstance(actor, Mapping) else None
    cid = cid or obj.get("id")
    if not isinstance(action, str) or not isinstance(cid, str) or not _FULL_ID.match(cid):
        return None
    return action, cid


# -- the source ------------------------------------------------------------------------


@dataclass(eq=False)
class _Follower:
    target: ContainerTarget
    log: ContainerLog
    task: asyncio.Task[None] | None = None
    connected: bool = False
    # A start event came while this follower ran: do not end at the end of the stream.
    restarted: bool = False
    failing: bool = False  # the last attempt failed (to log an outage once)
    details: bool = False  # ask details=1: its log options make attrs
    # Per stream, the last timestamp read by the connections before (ResendDetector).
    guard: dict[str, int] = field(default_factory=dict)
    lines: int = 0
    reconnects: int = 0
    resends: int = 0  # the connections ended by a re-send of dockerd's

    @property
    def id(self) -> str:
        return self.target.info.id

    @property
    def cursor(self) -> ContainerCursor:
        return self.log.cursor


class DockerApiSource:
    """Follows container logs through the Engine API; one resumable stream per container."""

    def __init__(
        self,
        cfg: DockerSourceConfig,
        checkpoints: Mapping[str, Position],
        clock: Clock,
        *,
        exit_on_eof: bool = False,
        own_container: OwnContainer | None = None,
        reconnect_initial_s: float = RECONNECT_INITIAL_S,
        reconnect_max_s: float = RECONNECT_MAX_S,
    ) -> None:
        self.name = cfg.name  # the source's name, for status
        self._cfg = cfg
        self._clock = clock
        self._exit_on_eof = exit_on_eof
        own = detect_own_container() if own_container is None else own_container
        self._rules = ContainerRules.from_config(cfg, own)
        self._reconnect = (reconnect_initial_s, reconnect_max_s)
        self._log_extra = {"component": COMPONENT, "source": cfg.name}
        self._cursors: dict[str, ContainerCursor] = {}
        for stream, position in checkpoints.items():
            if position.source != cfg.name or not _FULL_ID.match(stream):
                continue  # e.g. a files-mode checkpoint of the same source name
            try:
                self._cursors[stream] = ContainerCursor.from_position(position)
            except ValueError as e:
                log.warning("ignoring checkpoint %s: %s", stream, e, extra=self._log_extra)
        self._followers: dict[str, _Follower] = {}
        self._skipped: dict[str, str] = {}
        self._first_list = True
        self._state = "starting"
        self._reason: str | None = None
        self.lines_read = 0
        self.bytes_read = 0
        self.lines_truncated = 0
        self.lines_skipped = 0
        self.reconnects = 0
        self.resends = 0

    # -- reporting ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "state": self._state,
            "reason": self._reason,
            "mode": "api",
            "containers": [
                {
                    "id": f.id,
                    "name": f.target.info.name,
                    "service": f.target.service,
                    "tty": f.target.info.tty,
                    "connected": f.connected,
                    "following": f.task is not None and not f.task.done(),
                    "cursor_ns": f.cursor.ts_ns,
                    "count_at_ts": f.cursor.count,
                    "lines": f.lines,
                    "reconnects": f.reconnects,
                    "resends": f.resends,
                }
                for f in self._followers.values()
            ],
            "skipped": dict(self._skipped),
            "lines_read": self.lines_read,
            "bytes_read": self.bytes_read,
            "lines_truncated": self.lines_truncated,
            "lines_skipped": self.lines_skipped,
            "reconnects": self.reconnects,
            "resends": self.resends,
        }

    def progress(self) -> tuple[int, int]:
        """(bytes read, bytes read): the API does not say how much is left."""
        return self.bytes_read, self.bytes_read

    # -- the loop ----------------------------------------------------------------------

    async def run(self, out: asyncio.Queue[Any], stop: asyncio.Event) -> None:
        """Until `stop` (or, with exit_on_eof, until every container is read to its end).

        The followers run as tasks of a TaskGroup local to this call: they all end
        when it returns, and an unexpected error in one ends the source.
        """
        connector = aiohttp.UnixConnector(path=str(self._cfg.socket), limit=0)
        session = aiohttp.ClientSession(connector=connector, base_url="http://docker")
        try:
            async with asyncio.TaskGroup() as tg:
                main = tg.create_task(self._main(session, tg, out), name="docker-api:main")
                stopped = tg.create_task(stop.wait(), name="docker-api:stop")
                await asyncio.wait((main, stopped), return_when=asyncio.FIRST_COMPLETED)
                self._state = "stopping"
                stopped.cancel()
                main.cancel()
                for f in self._followers.values():
                    if f.task is not None:
                        f.task.cancel()
        finally:
            await session.close()
            self._state = "stopped"

    async def _main(
        self, session: aiohttp.ClientSession, tg: asyncio.TaskGroup, out: asyncio.Queue[Any]
    ) -> None:
        backoff = Backoff(*self._reconnect)
        while True:
            try:
                if self._exit_on_eof:
                    await self._list(session, tg, out)
                    self._ok()
                    await self._wait_followers()
                    return
                await self._watch_events(session, tg, out, backoff)
                why = "the event stream ended"
            except TRANSPORT_ERRORS as e:
                why = f"{type(e).__name__}: {e}"
            except EngineError as e:
                if e.kind is not TRANSIENT:
                    raise  # e.g. the socket is not an Engine API: a configuration error
                why = str(e)
            except ValueError as e:  # an answer that is not what the API documents
                why = f"unexpected answer: {e}"
            delay = backoff.next()
            self._degraded(f"Engine API at {self._cfg.socket}: {why}; retrying in {delay:.1f}s")
            self.reconnects += 1
            await asyncio.sleep(delay)

    async def _wait_followers(self) -> None:
        tasks = [f.task for f in self._followers.values() if f.task is not None]
        if tasks:
            await asyncio.wait(tasks)

    async def _watch_events(
        self,
        session: aiohttp.ClientSession,
        tg: asyncio.TaskGroup,
        out: asyncio.Queue[Any],
        backoff: Backoff,
    ) -> None:
        """Follow start events; list the containers once the stream is open."""
        params = {"filters": EVENT_FILTERS}
        async with session.get("/events", params=params, timeout=STREAM_TIMEOUT) as resp:
            await _check(resp, "GET /events")
            await self._list(session, tg, out)
            self._ok()
            backoff.reset()
            events = JsonStream()
            async for data in resp.content.iter_any():
                for obj in events.feed(data):
                    event = container_event(obj)
                    if event is not None and event[0] == "start":
                        await self._start(session, tg, out, event[1])

    async def _list(
        self, session: aiohttp.ClientSession, tg: asyncio.TaskGroup, out: asyncio.Queue[Any]
    ) -> None:
        """Follow the running containers, and the stopped ones we hold a cursor for."""
        async with session.get(
            "/containers/json", params={"all": "1"}, timeout=REQUEST_TIMEOUT
        ) as resp:
            await _check(resp, "GET /containers/json")
            listed = json.loads(await resp.read())
        for item in listed if isinstance(listed, list) else []:
            cid = item.get("Id") if isinstance(item, Mapping) else None
            if not isinstance(cid, str) or not _FULL_ID.match(cid):
                continue
            running = item.get("State") == "running"
            if running or cid in self._cursors:
                await self._start(session, tg, out, cid, existing=self._first_list)
        self._first_list = False

    async def _start(
        self,
        session: aiohttp.ClientSession,
        tg: asyncio.TaskGroup,
        out: asyncio.Queue[Any],
        cid: str,
        *,
        existing: bool = False,
    ) -> None:
        """Follow container `cid` unless already following it or it is not to be read.

        `existing`: it was there at our first start (read_from applies when it has no
        cursor). Its description is asked afresh every time: names and labels change.
        """
        follower = self._followers.get(cid)
        if follower is not None and follower.task is not None and not follower.task.done():
            follower.restarted = True
            return
        try:
            async with session.get(f"/containers/{cid}/json", timeout=REQUEST_TIMEOUT) as resp:
                await _check(resp, f"GET /containers/{cid[:12]}/json")
                inspected = await resp.read()
            info = parse_container(inspected)
        except EngineError as e:
            if e.kind is TRANSIENT:
                raise
            self._skip(cid, str(e))
            return
        except ValueError as e:
            self._skip(cid, f"unexpected inspect answer: {e}")
            return
        decision = self._rules.decide(info)
        if isinstance(decision, str):
            self._skip(cid, f"container {info.name} ({cid[:12]}): {decision}")
            return
        self._skipped.pop(cid, None)
        cursor = self._cursors.setdefault(cid, ContainerCursor())
        tail = existing and not cursor.started and self._cfg.read_from == "tail" and info.running
        container_log = ContainerLog(cursor, build_grouper(self._cfg.multiline))
        follower = self._followers[cid] = _Follower(decision, container_log)
        follower.details = makes_attrs(inspected)
        follower.task = tg.create_task(
            self._follow(session, out, follower, tail), name=f"docker-api:{info.name}"
        )
        log.info(
            "following container %s (%s) as service %s%s",
            info.name,
            cid[:12],
            decision.service,
            f" from {cursor.since()}" if cursor.started else "",
            extra=self._log_extra,
        )

    async def _follow(
        self,
        session: aiohttp.ClientSession,
        out: asyncio.Queue[Any],
        f: _Follower,
        tail: bool,
    ) -> None:
        """Read one container's logs until it has stopped and its stream has ended."""
        await self._follow_logs(session, out, f, tail)
        # Done with it (not on stop: there a held record is read again after a restart).
        await self._emit(out, f, f.log.flush())

    async def _follow_logs(
        self,
        session: aiohttp.ClientSession,
        out: asyncio.Queue[Any],
        f: _Follower,
        tail: bool,
    ) -> None:
        backoff = Backoff(*self._reconnect)
        info = f.target.info
        while True:
            try:
                outcome = await self._read_logs(session, out, f, tail)
                if outcome is RESENT:
                    tail = False  # the cursor (or the first line read) is where to resume
                    continue  # at once: read again from the cursor
                ended = outcome is ENDED
                if self._exit_on_eof or (ended and not f.restarted):
                    return
                if ended:
                    continue  # it was started again meanwhile: read on from the cursor
                why = "its log stream ended while it runs"
            except TRANSPORT_ERRORS as e:
                why = f"{type(e).__name__}: {e}"
            except EngineError as e:
                if e.kind is GONE:
                    log.info("container %s is gone", info.name, extra=self._log_extra)
                    self._cursors.pop(f.id, None)  # removed: nothing will resume it
                    return
                if e.kind is PERMANENT:
                    log.error(
                        "cannot read the logs of container %s: %s",
                        info.name,
                        e,
                        extra=self._log_extra,
                    )
                    return
                why = str(e)
            finally:
                f.connected = False
            if f.cursor.started:
                tail = False  # resume from the cursor, not from "now"
            delay = backoff.next()
            f.reconnects += 1
            self.reconnects += 1
            # Warn once per outage; the retries of a daemon that is away are debug.
            level = logging.DEBUG if f.failing else logging.WARNING
            f.failing = True
            log.log(
                level,
                "logs of container %s: %s; resuming from %s in %.1fs",
                info.name,
                why,
                f.cursor.since() or ("now" if tail else "the start"),
                delay,
                extra=self._log_extra,
            )
            await asyncio.sleep(delay)

    async def _read_logs(
        self,
        session: aiohttp.ClientSession,
        out: asyncio.Queue[Any],
        f: _Follower,
        tail: bool,
    ) -> str:
        """One logs request: ENDED (the container has stopped and all is read), RUNNING
        (the stream ended while it runs) or RESENT (dockerd sent messages a second time:
        the rest of this stream is not used, the next request reads from the cursor)."""
        info = f.target.info
        params = {
            "follow": "0" if self._exit_on_eof else "1",
            "stdout": "1",
            "stderr": "1",
            "timestamps": "1",
        }
        if f.details:
            params["details"] = "1"
        since = f.cursor.since()
        if since is not None:
            params["since"] = since
        elif tail:
            params["tail"] = "0"
        f.cursor.begin()
        f.restarted = False
        extra = MAX_ATTRS + 1 if f.details else 0
        max_payload = self._cfg.max_line_bytes + MAX_PREFIX + extra + 2
        reader = MessageReader(info.tty, max_payload, details=f.details)
        lines = LineAssembler(self._cfg.max_line_bytes, details=f.details)
        resends = ResendDetector(f.guard)
        url = f"/containers/{info.id}/logs"
        try:
            async with session.get(url, params=params, timeout=STREAM_TIMEOUT) as resp:
                await _check(resp, f"GET /containers/{info.id[:12]}/logs")
                f.connected = True
                if f.failing:
                    f.failing = False
                    log.info(
                        "logs of container %s: reading again", info.name, extra=self._log_extra
                    )
                while True:
                    data = await self._read_some(resp.content, f)
                    if data is None:  # no line for flush_timeout_s: release the held record
                        await self._emit(out, f, f.log.release_due(self._clock.monotonic()))
                        continue
                    if not data:
                        break
                    self.bytes_read += len(data)
                    read, resent = self._lines(f, reader, resends, lines, data)
                    await self._emit_lines(out, f, read)
                    if resent:
                        self._resent(f, resends, tail)
                        return RESENT
        finally:
            for stream, ts in resends.last_ts().items():
                f.guard[stream] = max(ts, f.guard.get(stream, -1))
        if reader.mid_frame:
            raise aiohttp.ClientPayloadError("the log stream ended in the middle of a frame")
        if not self._exit_on_eof and await self._running(session, info.id):
            return RUNNING
        # It has stopped (or this is a backfill): nothing completes an unfinished line.
        last = [
            line
            for stream, payload in reader.flush()
            if not resends.resent(stream, payload)
            for line in lines.feed(stream, payload, message_start=True)
        ]
        await self._emit_lines(out, f, last + lines.flush())
        return ENDED

    def _resent(self, f: _Follower, resends: ResendDetector, tail: bool) -> None:
        """Count a re-send; with nothing emitted yet from a stream that began at its
        tail, resume at the first message it brought (not at the tail again)."""
        f.resends += 1
        self.resends += 1
        if not f.cursor.started and tail and resends.first_ts is not None:
            f.cursor.ts_ns, f.cursor.count = resends.first_ts - 1, 0
        log.debug(
            "logs of container %s: dockerd sent messages again (a rotation); reading again from %s",
            f.target.info.name,
            f.cursor.since() or "the start",
            extra=self._log_extra,
        )

    async def _read_some(self, content: aiohttp.StreamReader, f: _Follower) -> bytes | None:
        """The next bytes of the stream (b"" at its end), or None when the multiline
        grouper's held record is due before any arrive."""
        due = f.log.next_due()
        if due is None:
            return await content.readany()
        try:
            async with asyncio.timeout(max(0.0, due - self._clock.monotonic())) as timer:
                return await content.readany()
        except TimeoutError:
            if timer.expired():
                return None
            raise

    async def _emit_lines(
        self, out: asyncio.Queue[Any], f: _Follower, lines: list[LogLine]
    ) -> None:
        skipped = f.log.skipped
        records = f.log.feed(lines, self._clock.monotonic())
        self.lines_skipped += f.log.skipped - skipped
        await self._emit(out, f, records)

    async def _emit(self, out: asyncio.Queue[Any], f: _Follower, records: Records) -> None:
        chunk = self._chunk(f, records)
        if chunk is not None:
            await out.put(chunk)  # the backpressure; cancelled by stop
            self.lines_read += len(chunk.lines)
            self.lines_truncated += len(chunk.truncated)
            f.lines += len(chunk.lines)

    def _lines(
        self,
        f: _Follower,
        reader: MessageReader,
        resends: ResendDetector,
        assembler: LineAssembler,
        data: bytes,
    ) -> tuple[list[LogLine], bool]:
        """The lines completed by `data`, and whether it brought a re-sent message (the
        lines are those completed before it; what follows it is not read)."""
        lines: list[LogLine] = []
        for stream, payload in reader.feed(data):
            if stream == "system":
                log.warning(
                    "the daemon reports for container %s: %s",
                    f.target.info.name,
                    payload.decode(errors="replace").strip(),
                    extra=self._log_extra,
                )
                continue
            if resends.resent(stream, payload):
                return lines, True
            lines.extend(assembler.feed(stream, payload, message_start=True))
        return lines, False

    def _chunk(self, f: _Follower, records: Records) -> RawChunk | None:
        """Released records as one chunk, positioned at the container's resume point."""
        if not records.payloads:
            return None
        ts, count = f.log.resume_point()
        info = f.target.info
        return RawChunk(
            source=self._cfg.name,
            service=f.target.service,
            lines=records.payloads,
            position=Position(
                self._cfg.name, info.id, ts, {"count_at_ts": count, "name": info.name}
            ),
            truncated=frozenset(records.truncated),
            meta=f.target.meta,
            line_meta=records.metas,
            times=records.times,
        )

    async def _running(self, session: aiohttp.ClientSession, cid: str) -> bool:
        """Whether the container still runs (False when it is gone)."""
        async with session.get(f"/containers/{cid}/json", timeout=REQUEST_TIMEOUT) as resp:
            if resp.status == 404:
                return False
            await _check(resp, f"GET /containers/{cid[:12]}/json")
            return parse_container(await resp.read()).running

    # -- state -------------------------------------------------------------------------

    def _ok(self) -> None:
        if self._state != "ok" and self._reason is not None:
            log.info("Engine API reachable again", extra=self._log_extra)
        self._state, self._reason = "ok", None

    def _degraded(self, reason: str) -> None:
        if self._state != "degraded":
            log.warning("%s", reason, extra=self._log_extra)
        self._state, self._reason = "degraded", reason

    def _skip(self, cid: str, reason: str) -> None:
        if self._skipped.get(cid) != reason:
            self._skipped[cid] = reason
            log.info("not following %s: %s", cid[:12], reason, extra=self._log_extra)


async def _check(resp: aiohttp.ClientResponse, what: str) -> None:
    if resp.status >= 300:
        raise EngineError(what, resp.status, await resp.text(errors="replace"))
