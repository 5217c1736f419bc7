"""Property tests of the pure stages between a file and a transaction.

Complements test_normalize_properties.py (normalize never raises, always storable) and
test_sample_properties.py (sampler accounting, never_sample levels, and the sliding
windows against a brute-force count, keyed windows against unbounded ones), which
are not repeated here:

* multiline grouping: whatever the lines and however they are batched, the output
  records' lines are the input lines in order, none lost or repeated (except the
  documented blank lines that end a grouped record), within max_lines / max_bytes,
  and the grouper's `held_start` never lets a position pass a line not yet emitted;
* framing decoders (docker json-file, CRI): whatever the split of the file's bytes
  into reads, the same records, with the same starts, in file order;
* the batcher: every event once and in order across batches, and each batch's
  checkpoint per stream is the last position fed for it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from forwarder.config import BatchConfig
from forwarder.event import Event, EventChunk, Level, Position
from forwarder.pipeline.multiline import CustomGrouper, PythonGrouper
from forwarder.sinks.batch import Batcher
from forwarder.sources.file import WRAPPER_LINE_BYTES, LineSplitter, _LineStarts
from forwarder.sources.framing import CriFramer, DockerFramer, Records
from tests.fixtures.container_logs import docker_entry

# --- multiline grouping ---------------------------------------------------------------------

# Line bodies that walk the python grouper through every traceback state.
_BODIES = [
    b"Traceback (most recent call last):",
    b'  File "/app/x.py", line 12, in handler',
    b"    raise ValueError(msg)",
    b"    ^^^^^^^^^^^^^^^^^^^^^",
    b"\tindented with a tab",
    b"ValueError: bad value",
    b"KeyError: 'k'",
    b"ZeroDivisionError",
    b"mymod.CustomError: x: y",
    b"",
    b"...",
    b"During handling of the above exception, another exception occurred:",
    b"The above exception was the direct cause of the following exception:",
    b"  + Exception Group Traceback (most recent call last):",
    b"  | ExceptionGroup: eg (2 sub-exceptions)",
    b"  +-+---------------- 1 ----------------",
    b"ERROR:app.db:connection lost",
    b"INFO start",
    b"2024-06-01 12:00:00,123 WARNING slow",
    b"[2024-06-01 12:00:00] x",
    b'{"level": "error", "message": "json"}',
    b"key=value other=thing",
    b"plain text that is not a traceback",
    b"continued: message line two",
    b"failed: Traceback (most recent call last):",  # a traceback inside a message
    b"\xff\xfe not utf-8",
]
_PREFIXES = [b"api-1  | ", b"2024-06-01 12:00:00 ERROR "]

_STREAMS: list[Mapping[str, Any] | None] = [None, {"stream": "stdout"}, {"stream": "stderr"}]


@st.composite
def _grouper_input(draw: st.DrawFn, prefixed: bool) -> dict[str, Any]:
    n = draw(st.integers(0, 60))
    bodies = draw(st.lists(st.sampled_from(_BODIES), min_size=n, max_size=n))
    if prefixed:
        # A prefix on every line (compose, a logging format), sometimes missing.
        prefix = draw(st.sampled_from(_PREFIXES))
        keep = draw(st.lists(st.booleans() | st.just(True), min_size=n, max_size=n))
        lines = [prefix + b if k else b for b, k in zip(bodies, keep, strict=True)]
    else:
        lines = bodies
    streams = draw(st.sampled_from(["one", "mixed", "none"]))
    if streams == "none":
        metas = None
    elif streams == "one":
        metas = [_STREAMS[1]] * n
    else:
        metas = draw(st.lists(st.sampled_from(_STREAMS[1:]), min_size=n, max_size=n))
    # Lines cut at max_line_bytes (a cut line is long, so never blank).
    cut = draw(st.sets(st.integers(0, max(n - 1, 0)), max_size=3)) if n else set()
    cut = {j for j in cut if bodies[j]}
    # Batch boundaries: a list of sizes, the rest in one last batch.
    sizes = draw(st.lists(st.integers(1, 8), max_size=12))
    max_lines = draw(st.integers(2, 12))
    max_bytes = draw(st.sampled_from([40, 64, 120, 400, 1 << 20]))
    return {
        "lines": lines,
        "metas": metas,
        "cut": cut,
        "sizes": sizes,
        "max_lines": max_lines,
        "max_bytes": max_bytes,
    }


def _batches(n: int, sizes: Sequence[int]) -> list[tuple[int, int]]:
    out, lo = [], 0
    for size in sizes:
        if lo >= n:
            break
        out.append((lo, min(n, lo + size)))
        lo += size
    if lo < n:
        out.append((lo, n))
    return out


def _check_grouping(
    grouper: PythonGrouper | CustomGrouper,
    case: dict[str, Any],
    matches: Any,
    skippable: Any,
) -> None:
    """Feed case's lines in its batches and check the output against the input.

    matches(line, part): whether an output line stands for an input line; skippable(line):
    whether an input line may be dropped at the end of a grouped record.
    """
    lines: list[bytes] = case["lines"]
    metas = case["metas"]
    cut: set[int] = case["cut"]
    n = len(lines)
    starts = [i * 1000 for i in range(n)]  # distinct, ascending offsets
    times = [datetime(2024, 6, 1, tzinfo=UTC) + timedelta(seconds=i) for i in range(n)]
    i = 0  # the next input line not yet matched to an output line
    out_records = 0

    def consume(out: Records) -> None:
        nonlocal i, out_records
        for k, payload in enumerate(out.payloads):
            out_records += 1
            parts = payload.split(b"\n")
            meta = None if out.metas is None else out.metas[k]
            # A record carries the time of its first line: that line is where it starts
            # (the times are distinct). Lines skipped before it must be the blank lines
            # that ended the previous grouped record (dropped by design).
            assert out.times is not None
            first = times.index(out.times[k])
            assert first >= i, "a line came out twice or out of order"
            assert all(skippable(x) for x in lines[i:first]), f"lines lost: {lines[i:first]!r}"
            i = first
            for part in parts:
                assert i < n, f"output line {part!r} beyond the input"
                assert matches(lines[i], part), (lines[i], part, payload)
                i += 1
            span = range(first, i)
            if len(parts) > 1:
                assert len(parts) <= case["max_lines"]
                assert len(payload) <= case["max_bytes"]
                assert meta is not None and meta["multiline"] == len(parts)
                rest = {k2: v for k2, v in meta.items() if k2 != "multiline"}
            else:
                rest = dict(meta or {})
            line_metas = {None if metas is None else _key(metas[j]) for j in span}
            assert line_metas == {_key(rest) if rest else None}, "one stream per record"
            assert (k in out.truncated) == any(j in cut for j in span)

    for lo, hi in _batches(n, case["sizes"]):
        chunk = Records(
            list(lines[lo:hi]),
            starts[lo:hi],
            [j - lo for j in sorted(cut) if lo <= j < hi],
            None if metas is None else list(metas[lo:hi]),
            list(times[lo:hi]),
        )
        consume(grouper.feed(chunk, 0.0))
        held = grouper.held_start()
        # A position never passes a line that has not come out yet.
        if held is None:
            assert all(skippable(x) for x in lines[i:hi]), "a line neither out nor held"
        else:
            j = starts.index(held)
            assert i <= j < hi
            assert all(skippable(x) for x in lines[i:j])
    consume(grouper.flush())
    assert grouper.held_start() is None
    assert all(skippable(x) for x in lines[i:]), f"lines lost: {lines[i:]!r}"
    assert out_records <= n


def _key(meta: Mapping[str, Any] | None) -> Any:
    return None if not meta else tuple(sorted(meta.items()))


@settings(max_examples=600, deadline=None)
@given(case=_grouper_input(prefixed=False))
def test_python_grouping_keeps_every_line_once_in_order(case: dict[str, Any]) -> None:
    grouper = PythonGrouper(case["max_lines"], case["max_bytes"], 1.0)
    _check_grouping(
        grouper,
        case,
        matches=lambda line, part: line == part,
        # Documented: blank lines after a traceback's last line are not kept.
        skippable=lambda line: line == b"",
    )


@settings(max_examples=600, deadline=None)
@given(case=_grouper_input(prefixed=True))
def test_prefixed_python_grouping_keeps_every_line_once_in_order(case: dict[str, Any]) -> None:
    """Lines that carry a prefix: a grouped record keeps it once, on its first line."""
    grouper = PythonGrouper(case["max_lines"], case["max_bytes"], 1.0)

    def matches(line: bytes, part: bytes) -> bool:
        # The line itself, or the line without (part of) the prefix of its traceback.
        if line == part:
            return True
        cut = len(line) - len(part)
        return cut > 0 and line.endswith(part) and any(p.startswith(line[:cut]) for p in _PREFIXES)

    def skippable(line: bytes) -> bool:
        return any(p.startswith(line.rstrip()) or p == line for p in _PREFIXES)

    _check_grouping(grouper, case, matches, skippable)


_CUSTOM_PATTERNS = [
    (r"^\S", None),  # a record starts at an unindented line; the rest continues it
    (None, r"^\s"),  # indented lines continue whatever came before
    (r"^(ERROR|INFO|\d{4}-)", r"^(\s|Traceback|\w+Error)"),
    (r"^Traceback", r"^(  |\w+Error)"),
    (r"^$", None),  # a blank line starts a record
]


@settings(max_examples=500, deadline=None)
@given(case=_grouper_input(prefixed=False), patterns=st.sampled_from(_CUSTOM_PATTERNS))
def test_custom_grouping_keeps_every_line_once_in_order(
    case: dict[str, Any], patterns: tuple[str | None, str | None]
) -> None:
    start, cont = patterns
    grouper = CustomGrouper(start, cont, case["max_lines"], case["max_bytes"], 1.0)
    _check_grouping(
        grouper,
        case,
        matches=lambda line, part: line == part,
        skippable=lambda line: line == b"",  # _Base._release drops trailing blank lines
    )


def _python_records(
    lines: Sequence[bytes],
    metas: Sequence[Mapping[str, Any] | None] | None,
    sizes: Sequence[int],
    max_lines: int = 500,
    max_bytes: int = 1 << 20,
) -> list[tuple[bytes, Any, bool]]:
    g = PythonGrouper(max_lines, max_bytes, 1.0)
    out = Records(starts=None)
    for lo, hi in _batches(len(lines), sizes):
        chunk_metas = None if metas is None else list(metas[lo:hi])
        out.extend(g.feed(Records(list(lines[lo:hi]), list(range(lo, hi)), [], chunk_metas), 0))
    out.extend(g.flush())
    metas_out = out.metas or [None] * len(out)
    return [
        (p, _key(m), k in out.truncated)
        for k, (p, m) in enumerate(zip(out.payloads, metas_out, strict=True))
    ]


@settings(max_examples=300, deadline=None)
@given(case=_grouper_input(prefixed=False) | _grouper_input(prefixed=True))
def test_grouping_does_not_depend_on_the_batching(case: dict[str, Any]) -> None:
    """The same lines fed in other batches give the same records (no timeouts here)."""
    lines, metas = case["lines"], case["metas"]
    bounds = (case["max_lines"], case["max_bytes"])
    whole = _python_records(lines, metas, [], *bounds)
    assert _python_records(lines, metas, case["sizes"], *bounds) == whole
    assert _python_records(lines, metas, [1], *bounds) == whole


_FRAME_LINE = b'  File "/app/x.py", line 12, in handler'


@pytest.mark.parametrize("sizes", [[], [1], [2], [1, 3]])
def test_an_orphan_frame_groups_the_same_whatever_the_batching(sizes: list[int]) -> None:
    """Found by the test above: a frame line that ended a batch without a "Traceback"
    in it was held as a message line, which the next batch's "Traceback" joined. A
    frame line is the rest of an earlier traceback, never a message line."""
    lines = [_FRAME_LINE, b"Traceback (most recent call last):"]
    assert _python_records(lines, None, sizes) == [(line, None, False) for line in lines]
    # A batch without a "Traceback" groups orphan frames as one with one.
    lines = [_FRAME_LINE, b"    raise ValueError(msg)", b"ValueError: bad", b"INFO next"]
    assert [r[0] for r in _python_records(lines, None, sizes)] == [
        b"\n".join(lines[:3]),
        b"INFO next",
    ]


# --- framing decoders -----------------------------------------------------------------------

_T = "2024-06-01T12:00:00.123456789Z"
_TEXT = st.text(alphabet=st.sampled_from(list('ab xyz{}"\\<>&é€\t\r0123456789')), max_size=30)


@st.composite
def _docker_file(draw: st.DrawFn) -> bytes:
    """A json-file log: whole lines, lines split into pieces (per stream, interleaved),
    CRLF endings, and wrapper lines that do not parse."""
    out: list[bytes] = []
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.sampled_from(["line", "line", "piece", "crlf", "junk"]))
        stream = draw(st.sampled_from(["stdout", "stderr"]))
        text = draw(_TEXT)
        if kind == "line":
            out.append(docker_entry(stream, text + "\n", _T))
        elif kind == "crlf":
            out.append(docker_entry(stream, text + "\r\n", _T))
        elif kind == "piece":
            out.append(docker_entry(stream, text, _T))  # no newline: more to come
        else:
            out.append(draw(st.sampled_from([b"not json", b'{"log": 1}', b"", b'{"log":"x"}'])))
    return b"".join(line + b"\n" for line in out) + draw(st.sampled_from([b"", b'{"log":"tail']))


@st.composite
def _cri_file(draw: st.DrawFn) -> bytes:
    out: list[bytes] = []
    for _ in range(draw(st.integers(0, 25))):
        stream = draw(st.sampled_from(["stdout", "stderr"]))
        tag = draw(st.sampled_from(["F", "F", "P", "F:x"]))
        text = draw(_TEXT).replace("\r", "")
        if draw(st.integers(0, 9)) == 0:
            out.append(draw(st.sampled_from([b"garbage", b"", b"2024 stdout F", b"x y Z z"])))
        else:
            out.append(f"{_T} {stream} {tag} {text}".encode())
    return b"".join(line + b"\n" for line in out) + draw(st.sampled_from([b"", _T.encode()]))


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def _read(make: Any, data: bytes, reads: list[bytes]) -> tuple[list[tuple[Any, ...]], int]:
    """What a file source gets from the framer when the file arrives in these reads:
    every record (payload, start, cut, meta, time), and the framer's parse errors."""
    framer = make()
    splitter = LineSplitter(WRAPPER_LINE_BYTES)
    out = Records()
    offset = 0
    for piece in reads:
        base = offset
        offset += len(piece)
        first = base - splitter.pending_bytes
        lines, truncated = splitter.feed(piece)
        if lines:
            starts = _LineStarts(piece, base, first, len(lines), False)
            got = framer.feed(Records(lines, starts, truncated), 0.0)
            out.extend(got)
            held = framer.held_start()
            # Nothing released starts at or after what the framer still holds.
            if held is not None and got.starts:
                assert max(got.starts) < held
    start = offset - splitter.pending_bytes
    rest = splitter.flush()
    if rest is not None:
        line, cut = rest
        out.extend(framer.feed(Records([line], [start], [0] if cut else []), 0.0))
    out.extend(framer.flush())
    assert framer.held_start() is None
    assert offset == len(data)
    n = len(out)
    metas = out.metas or [None] * n
    times = out.times or [None] * n
    assert out.starts is not None
    records = [
        (out.payloads[k], out.starts[k], k in out.truncated, _key(metas[k]), times[k])
        for k in range(n)
    ]
    return records, framer.errors


def _line_starts(data: bytes) -> set[int]:
    return {0} | {m.end() for m in re.finditer(b"\n", data)}


@settings(max_examples=400, deadline=None)
@given(
    data=_docker_file(),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    max_line=st.sampled_from([8, 20, 64, 1 << 20]),
)
def test_docker_decoding_does_not_depend_on_how_the_file_is_read(
    data: bytes, cuts: list[int], max_line: int
) -> None:
    make = lambda: DockerFramer(max_line, 1.0)  # noqa: E731
    whole, errors = _read(make, data, [data] if data else [])
    bytewise, errors_b = _read(make, data, [data[i : i + 1] for i in range(len(data))])
    split, errors_s = _read(make, data, _split(data, cuts))
    assert whole == bytewise == split
    assert errors == errors_b == errors_s
    starts = [r[1] for r in whole]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)  # file order
    assert set(starts) <= _line_starts(data)
    if max_line == 1 << 20:
        assert not any(r[2] for r in whole)
        # Each stream's text comes out whole and in order, however it was pieced.
        for stream in ("stdout", "stderr"):
            pieces = [
                entry["log"] for entry in _docker_entries(data) if entry.get("stream") == stream
            ]
            text = "".join(
                p.removesuffix("\n").removesuffix("\r") if p.endswith("\n") else p for p in pieces
            )
            got = b"".join(r[0] for r in whole if r[3] == (("stream", stream),))
            assert got == text.encode()


def _docker_entries(data: bytes) -> list[dict[str, Any]]:
    import orjson

    out = []
    for line in data.split(b"\n"):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if (
            isinstance(obj, dict)
            and isinstance(obj.get("log"), str)
            and isinstance(obj.get("stream"), str)
        ):
            out.append(obj)
    return out


@settings(max_examples=400, deadline=None)
@given(
    data=_cri_file(),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    max_line=st.sampled_from([8, 20, 64, 1 << 20]),
)
def test_cri_decoding_does_not_depend_on_how_the_file_is_read(
    data: bytes, cuts: list[int], max_line: int
) -> None:
    make = lambda: CriFramer(max_line, 1.0)  # noqa: E731
    whole, errors = _read(make, data, [data] if data else [])
    bytewise, errors_b = _read(make, data, [data[i : i + 1] for i in range(len(data))])
    split, errors_s = _read(make, data, _split(data, cuts))
    assert whole == bytewise == split
    assert errors == errors_b == errors_s
    starts = [r[1] for r in whole]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert set(starts) <= _line_starts(data)
    if max_line == 1 << 20:
        assert not any(r[2] for r in whole)


# --- the batcher ----------------------------------------------------------------------------

_T0 = datetime(2026, 11, 26, 12, tzinfo=UTC)


def _event(i: int) -> Event:
    return Event(_T0, "api", Level.INFO, "e", f"m{i}", {"i": i})


_op = st.one_of(
    st.tuples(
        st.just("add"),
        st.integers(0, 7),  # events in the chunk
        st.lists(  # positions the chunk carries: (source, stream, offset)
            st.tuples(
                st.sampled_from(["a", "b"]),
                st.sampled_from(["s1", "s2", "s3"]),
                st.integers(0, 10**6),
            ),
            max_size=3,
        ),
        st.floats(0, 2, allow_nan=False),  # clock step
    ),
    st.tuples(st.just("take")),
)


@settings(max_examples=500, deadline=None)
@given(ops=st.lists(_op, max_size=40), max_rows=st.integers(1, 10), delay=st.floats(0.01, 1))
def test_batches_carry_every_event_once_and_the_last_position_per_stream(
    ops: list[tuple[Any, ...]], max_rows: int, delay: float
) -> None:
    b = Batcher(BatchConfig(max_rows=max_rows, max_delay_s=delay))
    now = 0.0
    seq = 0
    fed: list[int] = []
    taken: list[int] = []
    expected_positions: dict[tuple[str, str], Position] = {}
    expected_sources: list[str | None] = []
    ops = [*ops, ("take",)]
    for op in ops:
        if op[0] == "add":
            _, k, raw, step = op
            now += step
            events = [_event(seq + j) for j in range(k)]
            fed += range(seq, seq + k)
            seq += k
            positions = tuple(Position(src, stream, off, {}) for src, stream, off in raw)
            b.add(EventChunk(events, positions), now)
            for p in positions:
                expected_positions[(p.source, p.stream)] = p  # the last fed, not the highest
            expected_sources += [positions[0].source if positions else None] * k
            if k or positions:
                assert not b.empty
            if b.rows >= max_rows:
                assert b.due(now) and b.time_until_due(now) == 0.0
        else:
            rows = b.rows
            batch = b.take()
            assert len(batch) == rows
            taken += [int(e.message[1:]) for e in batch.events]
            assert batch.checkpoints == list(expected_positions.values())  # first-seen order
            assert batch.sources == expected_sources
            expected_positions, expected_sources = {}, []
            assert b.empty and b.rows == 0 and not b.due(now + 10**6)
    assert taken == fed  # every event once, in the order fed


@settings(max_examples=200, deadline=None)
@given(
    offsets=st.lists(st.integers(0, 1000), min_size=1, max_size=20),
    takes=st.sets(st.integers(0, 19)),
)
def test_a_stream_truncated_and_reread_commits_its_latest_offset(
    offsets: list[int], takes: set[int]
) -> None:
    """copytruncate: offsets go down; whatever the batching, the committed offset after
    each batch is the one of the last chunk in it."""
    assume(len(offsets) > 1)
    b = Batcher(BatchConfig(max_rows=1000, max_delay_s=1.0))
    committed: int | None = None
    for i, off in enumerate(offsets):
        b.add(EventChunk([_event(i)], (Position("f", "inode", off, {}),)), 0.0)
        if i in takes:
            (committed_pos,) = b.take().checkpoints
            committed = committed_pos.offset
            assert committed == off
    final = b.take().checkpoints
    if final:
        committed = final[0].offset
    assert committed == offsets[-1]
