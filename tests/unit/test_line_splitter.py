"""LineSplitter: bytes in, complete lines out, bounded memory for over-long lines."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from forwarder.sources.file import LineSplitter


def feed_all(splitter: LineSplitter, *pieces: bytes) -> tuple[list[bytes], list[int]]:
    lines: list[bytes] = []
    truncated: list[int] = []
    for piece in pieces:
        new, cut = splitter.feed(piece)
        truncated.extend(len(lines) + i for i in cut)
        lines.extend(new)
    return lines, truncated


def expected(data: bytes, max_line_bytes: int) -> tuple[list[bytes], list[int], bytes]:
    """The reference: split on \\n, drop one \\r before it, cut at max_line_bytes."""
    *complete, rest = data.split(b"\n")
    lines: list[bytes] = []
    truncated: list[int] = []
    for i, line in enumerate(complete):
        line = line.removesuffix(b"\r")
        if len(line) > max_line_bytes:
            line = line[:max_line_bytes]
            truncated.append(i)
        lines.append(line)
    return lines, truncated, rest


def test_complete_lines_are_returned_without_terminator() -> None:
    s = LineSplitter(100)
    assert s.feed(b"a\nbb\n\nccc\n") == ([b"a", b"bb", b"", b"ccc"], [])
    assert s.pending_bytes == 0


def test_partial_line_is_held_until_its_newline() -> None:
    s = LineSplitter(100)
    assert s.feed(b"one\ntw") == ([b"one"], [])
    assert s.pending_bytes == 2
    assert s.feed(b"o") == ([], [])
    assert s.pending_bytes == 3
    assert s.feed(b"\nthree") == ([b"two"], [])
    assert s.pending_bytes == 5


def test_crlf_loses_its_cr_even_when_split_across_feeds() -> None:
    s = LineSplitter(100)
    assert s.feed(b"a\r\nb\r\nc\r") == ([b"a", b"b"], [])
    assert s.feed(b"\nd\r\r\n") == ([b"c", b"d\r"], [])


def test_a_lone_cr_inside_a_line_is_kept() -> None:
    assert LineSplitter(100).feed(b"a\rb\n") == ([b"a\rb"], [])


def test_long_line_inside_one_feed_is_cut_and_flagged() -> None:
    s = LineSplitter(4)
    assert s.feed(b"ab\nabcdefgh\ncd\n") == ([b"ab", b"abcd", b"cd"], [1])


def test_line_of_exactly_max_bytes_with_crlf_is_not_truncated() -> None:
    s = LineSplitter(4)
    assert s.feed(b"abcd\r\n") == ([b"abcd"], [])
    assert s.feed(b"x\nab") == ([b"x"], [])
    assert s.feed(b"cd\r") == ([], [])
    assert s.feed(b"\n") == ([b"abcd"], [])


def test_huge_line_fed_in_pieces_is_never_buffered() -> None:
    max_line = 1024
    s = LineSplitter(max_line)
    assert s.feed(b"first\n" + b"x" * 10_000) == ([b"first"], [])
    for _ in range(1000):  # 10 MB more of the same line
        assert s.feed(b"y" * 10_000) == ([], [])
        assert s.held_bytes <= max_line + 1
    lines, cut = s.feed(b"z\nafter\n")
    assert lines == [b"x" * max_line, b"after"]
    assert cut == [0]
    assert s.held_bytes == 0
    assert s.pending_bytes == 0


def test_pending_bytes_count_the_discarded_part_of_a_long_line() -> None:
    s = LineSplitter(256)
    s.feed(b"a\n" + b"x" * 1000)
    assert s.pending_bytes == 1000
    s.feed(b"x" * 500)
    assert s.pending_bytes == 1500
    assert s.held_bytes == 256


def test_flush_returns_the_unfinished_line() -> None:
    s = LineSplitter(4)
    s.feed(b"a\nbc\r")
    assert s.flush() == (b"bc", False)
    assert s.flush() is None
    s.feed(b"abcdefg")
    assert s.flush() == (b"abcd", True)
    assert s.pending_bytes == 0


def test_skip_first_line_drops_everything_up_to_the_first_newline() -> None:
    s = LineSplitter(4, skip_first_line=True)
    assert s.feed(b"tail of an old line") == ([], [])
    assert s.flush() is None
    s = LineSplitter(4, skip_first_line=True)
    assert s.feed(b"old") == ([], [])
    assert s.pending_bytes == 3
    assert s.feed(b"er\nnew\n") == ([b"new"], [])
    assert s.pending_bytes == 0


def test_reset_forgets_the_unfinished_line() -> None:
    s = LineSplitter(100)
    s.feed(b"partial")
    s.reset()
    assert s.pending_bytes == 0
    assert s.feed(b"x\n") == ([b"x"], [])


@given(
    data=st.binary(max_size=400).map(lambda b: b.replace(b"\x00", b"\n").replace(b"\x01", b"\r")),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    max_line_bytes=st.integers(min_value=1, max_value=40),
)
def test_any_split_of_the_input_gives_the_reference_result(
    data: bytes, cuts: list[int], max_line_bytes: int
) -> None:
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    s = LineSplitter(max_line_bytes)
    lines: list[bytes] = []
    truncated: list[int] = []
    for piece in pieces:
        new, cut = s.feed(piece)
        truncated.extend(len(lines) + i for i in cut)
        lines.extend(new)
        assert s.held_bytes <= max_line_bytes + 1
    want_lines, want_truncated, rest = expected(data, max_line_bytes)
    assert lines == want_lines
    assert truncated == want_truncated
    assert s.pending_bytes == len(rest)
    flushed = s.flush()
    if rest:
        tail_lines, tail_cut, _ = expected(rest + b"\n", max_line_bytes)
        assert flushed == (tail_lines[0], bool(tail_cut))
    else:
        assert flushed is None


def test_feed_all_helper_matches_reference() -> None:
    data = b"abc\r\n" + b"z" * 50 + b"\nend"
    lines, truncated = feed_all(LineSplitter(10), data[:7], data[7:30], data[30:])
    assert (lines, truncated) == expected(data, 10)[:2]
