"""Api mode, pure parts: dockerd's re-sends after a json-file rotation (ResendDetector),
the cursor across the reconnection that follows one, TTY messages, and attrs.

The message shapes are the real engine's (Debian docker.io 20.10.24, API 1.41, read with
curl on its socket): every 16 KB piece of a long line carries the line's first
timestamp; after a rotation the follow stream sends the new file's first messages once
more, right after themselves (one message, or a run of a hundred, or pieces of a line
that is not finished yet); with details=1 every message, each piece too, has the attrs
field and a space after its timestamp ("<ts>  text" when there are none).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forwarder.config import MultilineConfig
from forwarder.event import Position
from forwarder.pipeline.multiline import build_grouper
from forwarder.sources.docker_api import (
    PARTIAL_BYTES,
    ContainerCursor,
    ContainerLog,
    LineAssembler,
    LogLine,
    MessageReader,
    ResendDetector,
    TtyMessages,
    makes_attrs,
    message_ts,
    parse_attrs,
    since_param,
)
from tests.docker_engine import frame, rfc3339_nano

T0 = 1_795_694_400 * 1_000_000_000  # 2026-11-26T12:00:00Z


def msg(ts_ns: int, text: bytes, attrs: bytes | None = None) -> bytes:
    """One message as dockerd sends it: "<ts> [<attrs> ]<text>"."""
    prefix = rfc3339_nano(ts_ns).encode() + b" "
    return prefix + (b"" if attrs is None else attrs + b" ") + text


def long_line(ts_ns: int, body: bytes) -> list[bytes]:
    """The messages of one line longer than 16 KB: pieces of 16 KB, all stamped alike."""
    pieces = [body[i : i + PARTIAL_BYTES] for i in range(0, len(body), PARTIAL_BYTES)]
    return [msg(ts_ns, p + (b"\n" if i == len(pieces) - 1 else b"")) for i, p in enumerate(pieces)]


def first_resent(messages: list[tuple[str, bytes]], detector: ResendDetector) -> int | None:
    """The index of the first message the detector calls a re-send."""
    for i, (stream, payload) in enumerate(messages):
        if detector.resent(stream, payload):
            return i
    return None


# -- ResendDetector ------------------------------------------------------------------


def test_a_rotation_resends_the_new_files_first_messages_right_after_themselves() -> None:
    lines = [("stdout", msg(T0 + i * 1000, b"%d\n" % i)) for i in range(10)]
    # The new file began at line 6; the reader read it to line 9, then from its start.
    stream = lines + lines[6:] + [("stdout", msg(T0 + 10_000, b"10\n"))]
    assert first_resent(stream, ResendDetector()) == 10


def test_a_resend_of_one_message_is_seen() -> None:
    lines = [("stdout", msg(T0 + i, b"line\n")) for i in range(1, 4)]
    assert first_resent([*lines, lines[-1]], ResendDetector()) == 3


def test_genuine_repeats_with_their_own_timestamps_are_not_resends() -> None:
    same_text = [("stdout", msg(T0 + i, b"GET /health 200\n")) for i in range(1, 200)]
    both = [(s, msg(T0 + i, b"tick\n")) for i, s in enumerate(["stdout", "stderr"] * 50)]
    assert first_resent(same_text, ResendDetector()) is None
    assert first_resent(both, ResendDetector()) is None


def test_the_other_stream_stamped_earlier_is_not_a_resend() -> None:
    # Two copier goroutines: a stderr line stamped before the last stdout line is
    # logged after it. Streams are judged apart.
    stream = [
        ("stdout", msg(T0 + 5, b"out 5\n")),
        ("stderr", msg(T0 + 4, b"err 4\n")),
        ("stdout", msg(T0 + 6, b"out 6\n")),
        ("stderr", msg(T0 + 7, b"err 7\n")),
    ]
    assert first_resent(stream, ResendDetector()) is None
    assert first_resent([*stream, stream[1]], ResendDetector()) == 4


def test_a_resend_that_starts_with_a_16kb_piece_of_a_finished_line() -> None:
    body = bytes(range(48, 58)) * 5000  # 50,000 bytes: pieces of 16 KB, 16 KB, 16 KB, 848
    pieces = [("stdout", p) for p in long_line(T0 + 2, body)]
    assert len(pieces) == 4 and message_ts(pieces[3][1]) == T0 + 2
    before = [("stdout", msg(T0 + 1, b"before\n"))]
    # The rotation came between pieces 1 and 2: the new file starts with piece 2.
    stream = before + pieces + pieces[2:] + [("stdout", msg(T0 + 3, b"after\n"))]
    assert first_resent(stream, ResendDetector()) == 5


def test_a_resend_inside_a_line_that_is_not_finished_yet() -> None:
    body = b"".join(b"%05d|" % i for i in range(20_000))  # 120 KB, no two pieces alike
    pieces = [("stdout", p) for p in long_line(T0 + 2, body)]
    # The reader reached the end of the new file (pieces 3..5) before piece 6 was
    # written, and sent 3..5 again: a run inside the open line.
    stream = pieces[:6] + pieces[3:6] + pieces[6:]
    assert first_resent(stream, ResendDetector()) == 6
    # The run may be one piece, the last one read.
    assert first_resent(pieces[:6] + pieces[5:6], ResendDetector()) == 6
    assert first_resent(pieces, ResendDetector()) is None  # the line itself is fine


def test_a_line_of_identical_pieces_is_taken_for_a_resend_once_then_guarded() -> None:
    # Not certain: a line of one repeated pattern looks like a re-send of its own
    # pieces. The source reads again from its cursor; the guard (what the connection
    # before read) keeps the second reading from raising it again.
    pieces = [("stdout", p) for p in long_line(T0 + 2, b"=" * (PARTIAL_BYTES * 3 + 10))]
    first = ResendDetector()
    assert first_resent(pieces, first) == 1
    again = ResendDetector(guard=first.last_ts())
    assert first_resent(pieces, again) is None
    # The guard covers only what was read: the next such line is judged again.
    later = [("stdout", p) for p in long_line(T0 + 9, b"=" * (PARTIAL_BYTES * 2 + 1))]
    assert first_resent(later, again) == 1


def test_an_earlier_stamp_is_a_resend_even_under_the_guard() -> None:
    lines = [("stdout", msg(T0 + i, b"%d\n" % i)) for i in range(1, 6)]
    detector = ResendDetector(guard={"stdout": T0 + 100})
    assert first_resent([*lines, *lines[2:]], detector) == 5


def test_identical_lines_stamped_alike_are_taken_for_a_resend_once() -> None:
    # A clock coarser than a line: two genuine identical lines with one stamp.
    twins = [("stdout", msg(T0 + 1, b"same\n")), ("stdout", msg(T0 + 1, b"same\n"))]
    detector = ResendDetector()
    assert first_resent(twins, detector) == 1
    assert first_resent(twins, ResendDetector(guard=detector.last_ts())) is None
    # Different texts under one stamp are two lines, not a re-send.
    assert first_resent([twins[0], ("stdout", msg(T0 + 1, b"other\n"))], ResendDetector()) is None


def test_a_clock_set_back_is_not_a_resend_and_restarts_the_history() -> None:
    detector = ResendDetector()
    stream = [
        ("stdout", msg(T0 + 50, b"before the step\n")),
        ("stdout", msg(T0 + 10, b"after the step\n")),  # earlier, matches nothing
        ("stdout", msg(T0 + 11, b"on\n")),
    ]
    assert first_resent(stream, detector) is None
    assert detector.resent("stdout", stream[1][1])  # the history goes on from the step
    assert not detector.resent("stdout", msg(T0 + 12, b"new\n"))


def test_a_message_without_timestamp_is_never_a_resend() -> None:
    detector = ResendDetector()
    assert not detector.resent("stdout", b"no stamp\n")
    assert not detector.resent("stdout", b"no stamp\n")


def test_a_resend_older_than_the_window_is_still_seen() -> None:
    detector = ResendDetector(window=8)
    lines = [("stdout", msg(T0 + i, b"%d\n" % i)) for i in range(1, 30)]
    assert first_resent(lines, detector) is None
    assert detector.resent("stdout", lines[0][1])  # forgotten, but stamped before the rest
    assert detector.resent("stdout", lines[-2][1])  # still held


@given(
    st.lists(st.tuples(st.sampled_from(["stdout", "stderr"]), st.integers(1, 4)), max_size=40),
    st.integers(0, 39),
    st.integers(1, 40),
)
def test_a_run_resent_after_itself_is_caught_at_its_first_message_and_never_earlier(
    plan: list[tuple[str, int]], start: int, length: int
) -> None:
    # Lines of one to four pieces on two streams, every stamp later than the one
    # before (within a stream: one copier), no two pieces alike; then the last
    # messages sent once more.
    clock = itertools.count(T0, 1000)
    messages: list[tuple[str, bytes]] = []
    for n, (stream, pieces) in enumerate(plan):
        body = b"".join(b"%02d:%05d|" % (n, i) for i in range(PARTIAL_BYTES * pieces // 9 - 9))
        messages += [(stream, p) for p in long_line(next(clock), body)]
    assert first_resent(messages, ResendDetector()) is None
    if not messages:
        return
    run = messages[min(start, len(messages) - 1) :][:length]
    assert first_resent(messages + run, ResendDetector()) == len(messages)


# -- the cursor across the reconnection after a re-send ------------------------------


class Connection:
    """What the source does with one logs stream: messages -> re-send check -> lines ->
    the container's cursor and grouper; stops at the first re-send."""

    def __init__(self, log: ContainerLog, guard: dict[str, int]) -> None:
        self.log = log
        self.guard = guard
        self.assembler = LineAssembler(1 << 20)
        self.detector = ResendDetector(guard)
        log.cursor.begin()

    def read(self, messages: list[tuple[str, bytes]]) -> tuple[list[bytes], bool]:
        emitted: list[bytes] = []
        resent = False
        for stream, payload in messages:
            if self.detector.resent(stream, payload):
                resent = True
                break
            lines = self.assembler.feed(stream, payload, message_start=True)
            emitted += self.log.feed(lines, 0.0).payloads
        for stream, ts in self.detector.last_ts().items():
            self.guard[stream] = max(ts, self.guard.get(stream, -1))
        return emitted, resent


def off() -> ContainerLog:
    return ContainerLog(ContainerCursor(), build_grouper(MultilineConfig(mode="off")))


def since_filter(messages: list[tuple[str, bytes]], cursor: ContainerCursor):
    """dockerd's answer to since=<cursor>: the messages stamped at or after it."""
    return [(s, p) for s, p in messages if (message_ts(p) or 0) >= cursor.ts_ns]


def test_after_a_resend_the_next_connection_resumes_exactly_from_the_cursor() -> None:
    log, guard = off(), {}
    body = bytes(range(97, 123)) * 2000  # 52 KB: four pieces stamped T0+2
    on_disk = [
        ("stdout", msg(T0 + 1, b"one\n")),
        *[("stdout", p) for p in long_line(T0 + 2, body)],
        ("stderr", msg(T0 + 2, b"err at the same stamp\n")),
        ("stdout", msg(T0 + 3, b"three\n")),
    ]
    # The follow stream: all but the last line, then the new file (pieces 2, 3 and the
    # stderr line) once more.
    first = Connection(log, guard)
    emitted, resent = first.read(on_disk[:-1] + on_disk[3:6])
    assert resent
    assert emitted == [b"one", body, b"err at the same stamp"]
    assert (log.cursor.ts_ns, log.cursor.count) == (T0 + 2, 2)  # two lines at T0+2
    assert log.cursor.since() == since_param(T0 + 2)

    # Reconnected with since=T0+2: dockerd reads its files (no re-send there).
    second = Connection(log, guard)
    emitted, resent = second.read(since_filter(on_disk, log.cursor))
    assert not resent
    assert emitted == [b"three"]  # the two lines at T0+2 skipped, nothing lost
    assert (log.cursor.ts_ns, log.cursor.count) == (T0 + 3, 1)
    assert log.resume_point() == (T0 + 3, 1)


def test_a_resend_cuts_a_line_in_the_making_and_the_next_connection_reads_it_whole() -> None:
    log, guard = off(), {}
    body = b"".join(b"%05d|" % i for i in range(12_000))  # 72 KB, five pieces
    pieces = [("stdout", p) for p in long_line(T0 + 5, body)]
    on_disk = [("stdout", msg(T0 + 4, b"before\n")), *pieces]
    first = Connection(log, guard)
    emitted, resent = first.read(on_disk[:4] + on_disk[2:4])  # re-sent inside the line
    assert resent and emitted == [b"before"]
    second = Connection(log, guard)
    emitted, resent = second.read(since_filter(on_disk, log.cursor))
    assert (emitted, resent) == ([body], False)  # whole, once
    assert (log.cursor.ts_ns, log.cursor.count) == (T0 + 5, 1)


def test_a_restart_from_a_checkpoint_taken_before_a_resend_repeats_nothing() -> None:
    # Pairs of lines share a stamp (a coarse clock): count_at_ts tells them apart.
    lines = [("stdout", msg(T0 + i // 2, b"line %d\n" % i)) for i in range(8)]
    log, guard = off(), {}
    emitted, resent = Connection(log, guard).read(lines[:5] + lines[3:5])
    assert resent and emitted == [b"line %d" % i for i in range(5)]
    ts, count = log.resume_point()
    assert (ts, count) == (T0 + 2, 1)  # lines 4 (line 5 shares its stamp, not read yet)
    checkpoint = Position("c", "x" * 64, ts, {"count_at_ts": count})
    # A new process: a fresh cursor from the checkpoint, no guard, no history.
    restarted = ContainerLog(
        ContainerCursor.from_position(checkpoint), build_grouper(MultilineConfig(mode="off"))
    )
    emitted, _ = Connection(restarted, {}).read(since_filter(lines, restarted.cursor))
    assert emitted == [b"line %d" % i for i in range(5, 8)]


# -- TTY messages ----------------------------------------------------------------------


def tty_stream(details: bool) -> tuple[bytes, list[bytes]]:
    attrs = b"REGION=eu" if details else None
    long_text = b"y" * 20_000 + b"\r\n"
    messages = [
        msg(T0 + 1, b"\x1b[1mbold\x1b[0m\r\n", attrs),
        msg(T0 + 2, long_text[:PARTIAL_BYTES], attrs),  # dockerd's 16 KB cut
        msg(T0 + 2, long_text[PARTIAL_BYTES:], attrs),
        msg(T0 + 3, b"\r\n", attrs),
        msg(T0 + 4, b"prompt$ ", attrs),  # the last bytes, no newline
    ]
    return b"".join(messages), messages


@pytest.mark.parametrize("details", [False, True])
@pytest.mark.parametrize("size", [1, 7, 31, 4096, 1 << 20])
def test_tty_bytes_split_anywhere_give_the_same_messages(details: bool, size: int) -> None:
    data, messages = tty_stream(details)
    reader = TtyMessages(details=details)
    got: list[bytes] = []
    for i in range(0, len(data), size):
        got += reader.feed(data[i : i + size])
    assert got == messages[:-1]
    assert reader.held_bytes == len(messages[-1])  # not whole yet: held, not delivered
    assert reader.flush() == messages[-1]
    assert reader.held_bytes == 0


def test_tty_bytes_without_a_timestamp_end_at_their_newline() -> None:
    reader = TtyMessages()
    assert reader.feed(b"no stamp at all\r\n" + msg(T0, b"ok\r\n")) == [
        b"no stamp at all\r\n",
        msg(T0, b"ok\r\n"),
    ]


def test_the_message_reader_gives_frames_as_messages_and_drops_stdin() -> None:
    reader = MessageReader(False, 1024)
    data = frame("stdout", msg(T0, b"a\n")) + frame("stderr", msg(T0, b"b\n"))
    data += b"\x00\x00\x00\x00\x00\x00\x00\x02x\n" + b"\x03\x00\x00\x00\x00\x00\x00\x05oops\n"
    assert reader.feed(data) == [
        ("stdout", msg(T0, b"a\n")),
        ("stderr", msg(T0, b"b\n")),
        ("system", b"oops\n"),
    ]
    assert not reader.mid_frame and reader.flush() == []
    assert reader.feed(frame("stdout", b"cut")[:9]) == [] and reader.mid_frame


# -- attrs (details=1) ------------------------------------------------------------------

# What dockerd 20.10 sent for `--label com.example.team=shop -e REGION=eu -e "ODD=a b,c=d"
# --log-opt labels=com.example.team,missing --log-opt env=REGION,ODD
# --log-opt tag={{.Name}}/x` (container attrs1), with details=1.
REAL_ATTRS = b"ODD=a+b%2Cc%3Dd,REGION=eu,com.example.team=shop,tag=attrs1%2Fx"


def test_attrs_fields_are_unescaped_into_a_flat_string_map() -> None:
    assert parse_attrs(REAL_ATTRS) == {
        "ODD": "a b,c=d",
        "REGION": "eu",
        "com.example.team": "shop",
        "tag": "attrs1/x",
    }
    assert parse_attrs(b"") == {}


def test_the_assembler_takes_the_attrs_field_off_every_piece() -> None:
    lines = LineAssembler(100_000, details=True)
    first = b"x" * PARTIAL_BYTES
    assert lines.feed("stdout", msg(T0 + 1, first, REAL_ATTRS), message_start=True) == []
    assert lines.feed("stdout", msg(T0 + 1, b"end\n", REAL_ATTRS), message_start=True) == [
        LogLine("stdout", first + b"end", T0 + 1, attrs=REAL_ATTRS)
    ]
    # No attrs: dockerd still writes the (empty) field and its space.
    assert lines.feed("stderr", msg(T0 + 2, b" indented\n", b""), message_start=True) == [
        LogLine("stderr", b" indented", T0 + 2)
    ]


def test_an_attrs_field_that_is_not_one_is_kept_as_text() -> None:
    lines = LineAssembler(1024, details=True)
    # A newline before the space that would end the field: the field is the text.
    assert lines.feed("stdout", msg(T0 + 1, b"lonely\n"), message_start=True) == [
        LogLine("stdout", b"lonely", T0 + 1)
    ]


def test_lines_with_attrs_carry_them_in_their_meta_shared_by_the_container() -> None:
    log = off()
    lines = [
        LogLine("stdout", b"a", T0 + 1, attrs=REAL_ATTRS),
        LogLine("stdout", b"b", T0 + 2, attrs=REAL_ATTRS),
        LogLine("stderr", b"c", T0 + 3, attrs=REAL_ATTRS),
        LogLine("stdout", b"d", T0 + 4),
    ]
    log.cursor.begin()
    records = log.feed(lines, 0.0)
    assert records.metas is not None
    attrs = parse_attrs(REAL_ATTRS)
    assert records.metas == [
        {"stream": "stdout", "attrs": attrs},
        {"stream": "stdout", "attrs": attrs},
        {"stream": "stderr", "attrs": attrs},
        {"stream": "stdout"},
    ]
    assert records.metas[0] is records.metas[1]  # one object for a container's lines


def test_only_containers_whose_log_options_make_attrs_are_asked_for_details() -> None:
    def inspect(config: dict[str, str]) -> dict:
        return {"HostConfig": {"LogConfig": {"Type": "json-file", "Config": config}}}

    assert makes_attrs(inspect({"labels": "com.example.team"}))
    assert makes_attrs(inspect({"env": "REGION", "max-size": "50k"}))
    assert makes_attrs(inspect({"tag": "{{.Name}}"}))
    assert makes_attrs(inspect({"env-regex": "^R"}))
    assert not makes_attrs(inspect({"max-size": "50k", "max-file": "10"}))
    assert not makes_attrs(inspect({}))
    assert not makes_attrs({"HostConfig": None})
    assert not makes_attrs(b"not json")
