"""Multiline grouping: consecutive records of one file joined into one record.

Pure: no I/O, no clock reads; `now` is monotonic seconds passed in. A grouper takes
the records a framer produced (`forwarder.sources.framing.Records`, in file order) and
returns grouped records; it holds the record it may still extend, and tells where that
record starts in the file (`held_start`) so the source never commits past it.

Modes (`MultilineConfig.mode`):

* ``python``: a line ``Traceback (most recent call last):`` starts a traceback. It
  joins the record held just before it (``logger.exception`` prints the message line,
  then the traceback), otherwise it stands alone. It goes on over indented lines
  (frames, code, carets, exception-group ``|`` lines), ``...``, the chained-exception
  separators with the blank lines around them and the ``Traceback`` after them, up to
  the ``ExcType: message`` line; the lines right after that line continue it while
  they do not look like the start of another record (a several-line exception
  message). A frame line (``  File "...``) outside a traceback is the rest of one
  whose start is elsewhere (cut by a line of the other stream, a rotation): it starts
  a record that goes on as that traceback's frames, and it is never the message line
  a traceback joins. Lines that all carry a prefix (a timestamp and a level, ``api-1  | ``)
  are matched without it: the prefix is what precedes ``Traceback`` on its line,
  and the grouped record keeps it once, on its first line. A JSON object line is a
  complete record and is never held for a traceback (a JSON formatter puts
  ``exc_info`` inside the object).
* ``custom``: Fluent Bit's regex multiline semantics: a held record is extended by a
  line matching `continue_pattern`; a line matching `start_pattern` starts a new one;
  any other line is released as it is. With only `start_pattern`, every line that
  does not start a record continues the held one; with only `continue_pattern`,
  every other line starts one.
* ``off``: records pass through.

Grouping is sequential per file, never per stream: a line continues the held record
only when its transport meta (stdout/stderr) is the same, and any line that does not
continue it releases it. A record is then always complete before the next one starts,
which keeps the source's positions exact (a restart re-reads a held record from its
start); the price is that a traceback interleaved with lines of the other stream is
split where the other stream's line falls.

Bounds: a record stops at `max_lines` lines or `max_bytes` bytes (the next line
starts a new record, in the same traceback state); a held record is released once no
line arrived for `flush_timeout_s` (`flush_due`). A grouped record is one payload with
``\\n`` between its lines and ``{"multiline": <lines>}`` in its meta.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

from forwarder.config import MultilineConfig
from forwarder.sources.framing import Records

__all__ = [
    "TRACEBACK_HEADER",
    "CustomGrouper",
    "Grouper",
    "PassThrough",
    "PythonGrouper",
    "build_grouper",
    "traceback_facts",
]

TRACEBACK_HEADER: Final = b"Traceback (most recent call last):"
_GROUP_HEADER: Final = b"  + Exception Group Traceback (most recent call last):"
_GROUP_LEAD: Final = b"  + Exception Group "
_SEPARATORS: Final = frozenset(
    (
        b"During handling of the above exception, another exception occurred:",
        b"The above exception was the direct cause of the following exception:",
    )
)
_INDENT: Final = (b" ", b"\t")
_FRAME: Final = b'  File "'

# The "ExcType: message" line that ends the frames of a traceback.
_EXC_LINE: Final = re.compile(
    rb"[A-Za-z_][\w.<>]*(?:(?:Error|Exception|Exit|Interrupt|Warning|Iteration)\b|:(?: |$)|$)"
)
# What the first line of another log record looks like (after an exception line, such a
# line ends the traceback; anything else continues a several-line exception message).
_LEVEL: Final = rb"(?:DEBUG|INFO|NOTICE|WARNING|WARN|ERROR|CRITICAL|FATAL|TRACE)"
_RECORD_START: Final = re.compile(
    rb"\{|\[\d|\[" + _LEVEL + rb"\]|\d{4}-\d\d-\d\d|\d\d:\d\d:\d\d|" + _LEVEL
    + rb"\b|Traceback \(most recent call last\):"
    + rb"|(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ \d]\d "
    + rb"|[A-Za-z_][\w.\-]*="
)  # fmt: skip

# Traceback states of a held record.
_CANDIDATE: Final = 0  # a plain line that a traceback may still join
_FRAMES: Final = 1  # after a "Traceback" line: frames until the exception line
_AFTER_EXC: Final = 2  # after the exception line: its message, or a separator
_SEPARATOR: Final = 3  # after "During handling..." / "The above exception...": blanks
_GROUP: Final = 4  # inside an exception-group traceback: all its lines are indented


class Grouper(Protocol):
    def feed(self, records: Records, now: float) -> Records:
        """Records in (file order), grouped records out; the output keeps no starts."""

    def held_start(self) -> int | None:
        """File offset where the held record starts, or None if none is held."""

    def next_due(self) -> float | None:
        """Monotonic time at which `flush_due` would release the held record."""

    def flush_due(self, now: float) -> Records:
        """Release the held record if no line arrived for the flush timeout."""

    def flush(self) -> Records:
        """Release the held record (end of the file)."""


def build_grouper(config: MultilineConfig) -> Grouper:
    if config.mode == "python":
        return PythonGrouper(config.max_lines, config.max_bytes, config.flush_timeout_s)
    if config.mode == "custom":
        return CustomGrouper(
            config.start_pattern,
            config.continue_pattern,
            config.max_lines,
            config.max_bytes,
            config.flush_timeout_s,
        )
    return PassThrough()


class PassThrough:
    """Mode "off"."""

    def feed(self, records: Records, now: float) -> Records:
        return Records(records.payloads, None, records.truncated, records.metas, records.times)

    def held_start(self) -> int | None:
        return None

    def next_due(self) -> float | None:
        return None

    def flush_due(self, now: float) -> Records:
        return Records(starts=None)

    def flush(self) -> Records:
        return Records(starts=None)


@dataclass(slots=True, eq=False)
class _Held:
    parts: list[bytes]
    start: int
    cut: bool
    meta: Mapping[str, Any] | None
    time: datetime | None
    state: int = _CANDIDATE
    size: int = 0
    prefix: bytes = b""
    bare_prefix: bytes = b""  # the prefix without trailing spaces: a blank prefixed line
    decided: bool = True  # whether the prefix is known to be on every line
    frames: bool = False  # a frame line was seen since the last "Traceback" line
    blanks: int = 0  # blank lines since the exception line
    # A traceback joined to the line before it while its prefix is undecided: if the
    # next line lacks the prefix, the "Traceback" was inside that line's message and
    # the two are split again.
    join_at: int = 0
    join_start: int = 0
    join_line: bytes = b""
    join_time: datetime | None = None
    head_cut: bool = False  # whether parts[:join_at] were cut

    def add(self, line: bytes, cut: bool) -> None:
        self.parts.append(line)
        self.size += 1 + len(line)
        if cut:
            self.cut = True


class _Base:
    def __init__(self, max_lines: int, max_bytes: int, flush_timeout_s: float) -> None:
        self._max_lines = max_lines
        self._max_bytes = max_bytes
        self._timeout = flush_timeout_s
        self._held: _Held | None = None
        self._last = 0.0  # monotonic time of the last line fed

    def held_start(self) -> int | None:
        held = self._held
        return None if held is None else held.start

    def next_due(self) -> float | None:
        return None if self._held is None else self._last + self._timeout

    def flush_due(self, now: float) -> Records:
        out = Records(starts=None)
        if self._held is not None and now >= self._last + self._timeout:  # as next_due
            self._release(out)
        return out

    def flush(self) -> Records:
        out = Records(starts=None)
        if self._held is not None:
            self._release(out)
        return out

    def _fits(self, held: _Held, line: bytes) -> bool:
        return len(held.parts) < self._max_lines and held.size + 1 + len(line) <= self._max_bytes

    def _release(self, out: Records) -> None:
        held = self._held
        assert held is not None
        self._held = None
        parts = held.parts
        while len(parts) > 1 and not parts[-1]:
            parts.pop()  # blank lines after the last exception line
        n = len(parts)
        if n == 1:
            out.append(parts[0], 0, held.cut or held.head_cut, held.meta, held.time)
            return
        meta = {**held.meta, "multiline": n} if held.meta else {"multiline": n}
        out.append(b"\n".join(parts), 0, held.cut or held.head_cut, meta, held.time)


class PythonGrouper(_Base):
    """Mode "python": tracebacks joined to the message line before them, or alone."""

    def feed(self, records: Records, now: float) -> Records:
        payloads = records.payloads
        n = len(payloads)
        if n == 0:
            return Records(starts=None)
        self._last = now
        held = self._held
        if held is None or held.state == _CANDIDATE:
            joined = b"\n".join(payloads)
            if TRACEBACK_HEADER not in joined and _FRAME not in joined:
                return self._no_traceback(records, n)
        out = Records(starts=None)
        metas, times, starts = records.metas, records.times, records.starts
        cut_lines = set(records.truncated) if records.truncated else ()
        for i, line in enumerate(payloads):
            meta = None if metas is None else metas[i]
            time = None if times is None else times[i]
            self._line(out, line, starts, i, i in cut_lines, meta, time)
        return out

    def _no_traceback(self, records: Records, n: int) -> Records:
        """No "Traceback" or frame line in the batch and no traceback in progress: what
        `_line` does line by line (each line releases the one held before it), at once:
        release all but the last line, which a traceback in the next batch may still
        join. A frame line goes through `_line` (it starts a record of orphan frames),
        so the records do not depend on where the batches end."""
        held = self._held
        last = n - 1
        line = records.payloads[last]
        keep = _holdable(line)
        if held is None and not keep:
            return Records(records.payloads, None, records.truncated, records.metas, records.times)
        out = Records(starts=None)
        if held is not None:
            self._release(out)
        out.extend(records, 0, last if keep else n)
        if keep:
            self._held = _Held(
                [line],
                records.starts[last],
                last in records.truncated,
                None if records.metas is None else records.metas[last],
                None if records.times is None else records.times[last],
                size=len(line),
            )
        return out

    def _line(
        self,
        out: Records,
        line: bytes,
        starts: Any,
        i: int,
        cut: bool,
        meta: Mapping[str, Any] | None,
        time: datetime | None,
    ) -> None:
        held = self._held
        if held is not None and held.state != _CANDIDATE:
            if self._continue(out, held, line, starts, i, cut, meta, time):
                return
            self._release(out)
            held = None
        header = _header(line)
        if header is not None:
            prefix, group = header
            state = _GROUP if group else _FRAMES
            if (
                held is not None
                and _same(held.meta, meta)
                and (not prefix or _joinable(held.parts[0], prefix))
                and self._fits(held, line)
            ):
                if prefix:
                    held.join_at = len(held.parts)
                    held.join_start = starts[i]
                    held.join_line = line
                    held.join_time = time
                    held.head_cut = held.cut
                    held.cut = False
                    held.decided = False
                    held.add(line[len(prefix) :], cut)
                else:
                    held.add(line, cut)
                held.state = state
                held.prefix = prefix
                held.bare_prefix = prefix.rstrip()
                return
            if held is not None:
                self._release(out)
            self._held = _Held(
                [line],
                starts[i],
                cut,
                meta,
                time,
                state=state,
                size=len(line),
                prefix=prefix,
                bare_prefix=prefix.rstrip(),
                decided=not prefix,
            )
            return
        if held is not None:
            self._release(out)
        if line.startswith(_FRAME):
            # The rest of a traceback whose start is elsewhere (cut by a line of the
            # other stream, a rotation, max_lines): its frames stay one record.
            self._held = _Held(
                [line], starts[i], cut, meta, time, state=_FRAMES, size=len(line), frames=True
            )
        elif _holdable(line):
            self._held = _Held([line], starts[i], cut, meta, time, size=len(line))
        else:
            out.append(line, 0, cut, meta, time)

    def _continue(
        self,
        out: Records,
        held: _Held,
        line: bytes,
        starts: Any,
        i: int,
        cut: bool,
        meta: Mapping[str, Any] | None,
        time: datetime | None,
    ) -> bool:
        """Whether line continues the held traceback (then it is added)."""
        if not _same(held.meta, meta):
            return False
        prefix = held.prefix
        text = line
        if prefix:
            if line.startswith(prefix):
                text = line[len(prefix) :]
                held.decided = True
            elif line == held.bare_prefix:
                text = b""
                held.decided = True
            elif not held.decided:
                # Not all of it is on this line: the "Traceback" was inside a message
                # (logging.error("failed: %s", format_exc())), after the part of the
                # prefix this line shares, if any (a container or timestamp prefix).
                header = held.join_line if held.join_at else held.parts[0]
                prefix = _common_prefix(header, line)
                held.prefix, held.bare_prefix = prefix, prefix.rstrip()
                held.decided = True
                if held.join_at:
                    self._split(out, held)
                text = line[len(prefix) :]
            else:
                return False
        if not _advance(held, text):
            return False
        if not self._fits(held, text):
            self._release(out)
            self._held = _Held(
                [line],
                starts[i],
                cut,
                meta,
                time,
                state=held.state,
                size=len(line),
                prefix=held.prefix,
                bare_prefix=held.bare_prefix,
                frames=held.frames,
                blanks=held.blanks,
            )
            return True
        held.add(text, cut)
        return True

    def _release(self, out: Records) -> None:
        held = self._held
        if held is not None and not held.decided and held.join_at:
            self._split(out, held)  # nothing confirmed that the prefix is on every line
        super()._release(out)

    def _split(self, out: Records, held: _Held) -> None:
        """Undo a join: release the lines before the traceback, keep the traceback."""
        head = held.parts[: held.join_at]
        n = len(head)
        payload = head[0] if n == 1 else b"\n".join(head)
        meta = held.meta if n == 1 else {**(held.meta or {}), "multiline": n}
        out.append(payload, 0, held.head_cut, meta, held.time)
        held.parts = [held.join_line, *held.parts[held.join_at + 1 :]]
        held.size = sum(map(len, held.parts)) + len(held.parts) - 1
        held.start = held.join_start
        held.time = held.join_time
        held.head_cut = False
        held.join_at = 0
        held.join_line = b""


def _advance(held: _Held, text: bytes) -> bool:
    """Move the traceback state machine over one line (prefix already stripped);
    False if the line does not belong to the traceback."""
    state = held.state
    first = text[:1]
    if state == _FRAMES:
        if first in _INDENT:
            held.frames = True
            return True
        if not text:
            held.state, held.blanks = _AFTER_EXC, 1
            return True
        if text == b"...":
            return True
        if held.frames and _EXC_LINE.match(text):
            held.state, held.blanks = _AFTER_EXC, 0
            return True
        return False
    if state == _AFTER_EXC:
        if not text:
            held.blanks += 1
            return True
        if text in _SEPARATORS:
            held.state, held.blanks = _SEPARATOR, 0
            return True
        if held.blanks:
            return False
        if first in _INDENT:
            return True
        return _RECORD_START.match(text) is None
    if state == _SEPARATOR:
        if not text:
            return True
        if text == TRACEBACK_HEADER:
            held.state, held.frames = _FRAMES, False
            return True
        if text == _GROUP_HEADER:
            held.state = _GROUP
            return True
        return False
    if state == _GROUP:
        if first in _INDENT:
            return True
        if not text:
            held.state, held.blanks = _AFTER_EXC, 1
            return True
        return False
    return False


def _header(line: bytes) -> tuple[bytes, bool] | None:
    """(prefix, is an exception group) if line is a "Traceback" line, else None."""
    if not line.endswith(TRACEBACK_HEADER):
        return None
    before = line[: -len(TRACEBACK_HEADER)]
    if before.endswith(_GROUP_LEAD):
        return before[: -len(_GROUP_LEAD)], True
    return before, False


def _holdable(line: bytes) -> bool:
    """Whether a traceback may follow this line as its message line: not a blank line,
    not a JSON object (a JSON formatter puts the traceback inside it), not a frame line
    (the rest of an earlier traceback)."""
    if not line or line.startswith(_FRAME):
        return False
    return not (line[:1] == b"{" and line.rstrip()[-1:] == b"}")


def _joinable(line: bytes, prefix: bytes) -> bool:
    """Whether a traceback whose lines carry prefix may join line as its message line."""
    return line.startswith(prefix) and _holdable(line[len(prefix) :])


def _common_prefix(a: bytes, b: bytes) -> bytes:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return a[:i]


def _same(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    return a is b or a == b


class CustomGrouper(_Base):
    """Mode "custom": start_pattern / continue_pattern (Fluent Bit's regex rules)."""

    def __init__(
        self,
        start_pattern: str | None,
        continue_pattern: str | None,
        max_lines: int,
        max_bytes: int,
        flush_timeout_s: float,
    ) -> None:
        if not (start_pattern or continue_pattern):
            raise ValueError("custom multiline needs start_pattern or continue_pattern")
        super().__init__(max_lines, max_bytes, flush_timeout_s)
        self._start = re.compile(start_pattern) if start_pattern else None
        self._cont = re.compile(continue_pattern) if continue_pattern else None

    def feed(self, records: Records, now: float) -> Records:
        payloads = records.payloads
        out = Records(starts=None)
        if not payloads:
            return out
        self._last = now
        metas, times, starts = records.metas, records.times, records.starts
        cut_lines = set(records.truncated) if records.truncated else ()
        for i, line in enumerate(payloads):
            meta = None if metas is None else metas[i]
            time = None if times is None else times[i]
            cut = i in cut_lines
            text = line.decode("utf-8", "replace")
            held = self._held
            if held is not None and _same(held.meta, meta) and self._continues(text):
                if self._fits(held, line):
                    held.add(line, cut)
                    continue
                self._release(out)
                self._held = _Held([line], starts[i], cut, meta, time, size=len(line))
                continue
            if held is not None:
                self._release(out)
            if self._starts(text):
                self._held = _Held([line], starts[i], cut, meta, time, size=len(line))
            else:
                out.append(line, 0, cut, meta, time)
        return out

    def _continues(self, text: str) -> bool:
        if self._cont is not None:
            return self._cont.search(text) is not None
        assert self._start is not None
        return self._start.search(text) is None

    def _starts(self, text: str) -> bool:
        return self._start is None or self._start.search(text) is not None


# -- facts of a traceback --------------------------------------------------------------

_HEADER_TEXT: Final = "Traceback (most recent call last):"
_GROUP_TAIL_TEXT: Final = "+ Exception Group Traceback (most recent call last):"
_SEPARATOR_TEXTS: Final = frozenset(s.decode() for s in _SEPARATORS)
_EXC_TEXT: Final = re.compile(r"([A-Za-z_][\w.<>]*)(?::(?: ?)(.*))?")


def traceback_facts(text: str) -> tuple[str, str] | None:
    """(exception type, exception message) of the last exception of the last top-level
    Python traceback in text (for an exception group: the group), or None.

    The message keeps the lines after the exception line (a several-line message,
    notes) up to a chained-exception separator.
    """
    if _HEADER_TEXT not in text:
        return None
    lines = text.split("\n")
    n = len(lines)
    facts: tuple[str, str] | None = None
    i = 0
    while i < n:
        line = lines[i]
        i += 1
        if not line.endswith(_HEADER_TEXT):
            continue
        if line.endswith(_GROUP_TAIL_TEXT):
            found, i = _group_facts(lines, i)
        else:
            found, i = _plain_facts(lines, i)
        if found is not None:
            facts = found
    return facts


def _plain_facts(lines: list[str], i: int) -> tuple[tuple[str, str] | None, int]:
    n = len(lines)
    while i < n and (lines[i][:1] in (" ", "\t") or lines[i] == "..."):
        i += 1  # frames
    if i >= n or not lines[i].strip():
        return None, i
    exc = lines[i]
    i += 1
    rest: list[str] = []
    while i < n:
        line = lines[i]
        if line in _SEPARATOR_TEXTS or line.endswith(_HEADER_TEXT):
            break
        if not line.strip() and _separator_follows(lines, i):
            break
        rest.append(line)
        i += 1
    return _exc_facts(exc, rest), i


def _group_facts(lines: list[str], i: int) -> tuple[tuple[str, str] | None, int]:
    """The group's own exception line: the first `| X` line at the bar column of the
    group's first body line (deeper bars belong to its sub-exceptions)."""
    n = len(lines)
    column = -1
    found: tuple[str, str] | None = None
    while i < n and lines[i][:1] in (" ", "\t"):
        body = lines[i]
        i += 1
        if found is not None:
            continue
        if column < 0:
            column = body.find("|")
            if column < 0:
                continue
        if body[column : column + 2] == "| " and not body[:column].strip():
            content = body[column + 2 :]
            if content[:1] not in ("", " ", "\t"):
                found = _exc_facts(content, [])
    return found, i


def _separator_follows(lines: list[str], i: int) -> bool:
    for line in lines[i:]:
        if line.strip():
            return line in _SEPARATOR_TEXTS
    return False


def _exc_facts(line: str, rest: list[str]) -> tuple[str, str] | None:
    m = _EXC_TEXT.fullmatch(line.rstrip())
    if m is None:
        return None
    message = m.group(2) or ""
    if rest:
        message = "\n".join([message, *rest]).strip("\n")
    return m.group(1), message
