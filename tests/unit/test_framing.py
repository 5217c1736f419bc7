"""Framers: docker json-file and CRI lines to records; pure, driven line by line."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from forwarder.event import RawChunk
from forwarder.pipeline.normalize import normalize_chunk
from forwarder.sources.framing import (
    CriFramer,
    DockerFramer,
    RawFramer,
    Records,
    build_framer,
)
from tests.fixtures import container_logs
from tests.fixtures.container_logs import DOCKERD_PIECE

T0 = "2024-06-01T12:00:00.123456789Z"


def docker_entry(stream: str, log: str, time: str = T0) -> bytes:
    return container_logs.docker_entry(stream, log, time)


def dockerd_lines(stream: str, payload: str, time: str = T0) -> list[bytes]:
    return container_logs.dockerd_lines(stream, payload, time)


class Feeder:
    """Feeds lines to a framer one at a time, tracking file offsets like the source."""

    def __init__(self, framer: DockerFramer | CriFramer) -> None:
        self.framer = framer
        self.offset = 0
        self.starts: list[int] = []  # offset of every line fed
        self.out = Records()

    def feed(self, lines: list[bytes], now: float = 0.0, cut: tuple[int, ...] = ()) -> Records:
        starts = []
        for line in lines:
            starts.append(self.offset)
            self.offset += len(line) + 1
        self.starts += starts
        got = self.framer.feed(Records(list(lines), starts, list(cut)), now)
        self.out.extend(got)
        return got


def test_docker_whole_line_is_its_log_without_newline_with_stream_and_time() -> None:
    f = Feeder(DockerFramer(1 << 20, 1.0))
    got = f.feed([docker_entry("stdout", "hello <world> & co\n")])
    assert got.payloads == [b"hello <world> & co"]
    assert got.starts == [0]
    assert got.metas == [{"stream": "stdout"}]
    assert got.times == [datetime(2024, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)]
    assert f.framer.held_start() is None


def test_docker_crlf_log_loses_its_cr() -> None:
    got = Feeder(DockerFramer(1 << 20, 1.0)).feed([docker_entry("stdout", "dos\r\n")])
    assert got.payloads == [b"dos"]


def test_docker_line_split_at_16k_is_joined() -> None:
    payload = "".join(chr(ord("a") + i % 26) for i in range(40_000))
    lines = dockerd_lines("stdout", payload)
    assert len(lines) == 3 and all(b'\\n"' not in line for line in lines[:2])
    f = Feeder(DockerFramer(1 << 20, 1.0))
    assert f.feed(lines[:2]).payloads == []
    assert f.framer.held_start() == 0  # the first piece's line
    got = f.feed(lines[2:])
    assert got.payloads == [payload.encode()]
    assert got.starts == [0]
    assert got.truncated == []
    assert f.framer.held_start() is None


def test_docker_split_line_exactly_16k_long_is_two_pieces() -> None:
    payload = "y" * DOCKERD_PIECE  # with its newline: one full piece and one "\n" piece
    lines = dockerd_lines("stderr", payload)
    assert len(lines) == 2
    got = Feeder(DockerFramer(1 << 20, 1.0)).feed(lines)
    assert got.payloads == [payload.encode()]


def test_docker_interleaved_streams_are_joined_per_stream_and_released_in_file_order() -> None:
    big = "o" * 20_000
    out_pieces = dockerd_lines("stdout", big)
    f = Feeder(DockerFramer(1 << 20, 1.0))
    got = f.feed(
        [
            docker_entry("stderr", "before\n"),
            out_pieces[0],
            docker_entry("stderr", "during 1\n"),
            docker_entry("stderr", "during 2\n"),
        ]
    )
    # The stderr lines after the open stdout piece wait behind it: a position past
    # them would pass the start of the held stdout line.
    assert got.payloads == [b"before"]
    assert f.framer.held_start() == f.starts[1]
    got = f.feed([out_pieces[1], docker_entry("stdout", "after\n")])
    assert got.payloads == [big.encode(), b"during 1", b"during 2", b"after"]
    assert got.starts == [f.starts[1], f.starts[2], f.starts[3], f.starts[5]]
    assert got.metas == [{"stream": s} for s in ("stdout", "stderr", "stderr", "stdout")]
    assert f.framer.held_start() is None


def test_docker_both_streams_split_at_once() -> None:
    a, b = "a" * 17_000, "b" * 17_000
    pa, pb = dockerd_lines("stdout", a), dockerd_lines("stderr", b)
    f = Feeder(DockerFramer(1 << 20, 1.0))
    f.feed([pa[0], pb[0], pb[1], pa[1]])
    assert f.out.payloads == [a.encode(), b.encode()]
    assert f.out.starts == [f.starts[0], f.starts[1]]


def test_docker_joined_line_over_max_line_bytes_is_cut_and_flagged() -> None:
    payload = "z" * 50_000
    f = Feeder(DockerFramer(20_000, 1.0))
    f.feed([*dockerd_lines("stdout", payload), docker_entry("stdout", "next\n")])
    assert f.out.payloads == [b"z" * 20_000, b"next"]
    assert f.out.truncated == [0]


def test_docker_malformed_wrapper_is_kept_raw_flagged_and_counted() -> None:
    f = Feeder(DockerFramer(1 << 20, 1.0))
    bad = [b"not json at all", b'{"log": 3, "stream": "stdout"}', b'["log"]', b'{"log":"x\\n"}']
    f.feed([docker_entry("stdout", "ok\n"), *bad])
    assert f.out.payloads == [b"ok", *bad]
    assert f.out.metas == [{"stream": "stdout"}] + [{"parse_error": "docker_json"}] * 4
    assert f.framer.errors == 4


def test_docker_wrapper_cut_by_the_splitter_is_kept_raw_and_truncated() -> None:
    f = Feeder(DockerFramer(1 << 20, 1.0))
    f.feed([docker_entry("stdout", "x" * 100 + "\n")[:50]], cut=(0,))
    assert f.out.truncated == [0]
    assert f.out.metas == [{"parse_error": "docker_json"}]


def test_docker_unparseable_time_gives_no_time() -> None:
    got = Feeder(DockerFramer(1 << 20, 1.0)).feed([docker_entry("stdout", "x\n", "yesterday")])
    assert got.payloads == [b"x"]
    assert got.times is None


def test_open_piece_is_released_after_the_flush_timeout_of_its_stream() -> None:
    framer = DockerFramer(1 << 20, 1.0)
    f = Feeder(framer)
    f.feed([docker_entry("stdout", "no newline at exit")], now=10.0)
    assert framer.next_due() == 11.0
    # The other stream goes on: its lines wait, and do not delay the timeout.
    f.feed([docker_entry("stderr", "e1\n")], now=10.5)
    assert framer.flush_due(10.9).payloads == []
    got = framer.flush_due(11.0)
    assert got.payloads == [b"no newline at exit", b"e1"]
    assert framer.held_start() is None and framer.next_due() is None


def test_flush_releases_everything_in_file_order() -> None:
    framer = DockerFramer(1 << 20, 1.0)
    f = Feeder(framer)
    f.feed(
        [
            docker_entry("stdout", "out piece"),
            docker_entry("stderr", "err piece"),
            docker_entry("stderr", " more"),
        ]
    )
    got = framer.flush()
    assert got.payloads == [b"out piece", b"err piece more"]
    assert got.starts == [f.starts[0], f.starts[1]]


def test_too_much_waiting_behind_an_open_piece_releases_it() -> None:
    framer = DockerFramer(1000, 60.0)
    f = Feeder(framer)
    f.feed([docker_entry("stdout", "open")])
    lines = [docker_entry("stderr", f"{i:099d}\n") for i in range(20)]
    f.feed(lines)
    # Over max_line_bytes of complete records waited: the open piece gave up waiting.
    assert f.out.payloads[0] == b"open"
    assert len(f.out.payloads) == 21
    assert framer.held_start() is None


def test_cri_partial_lines_are_joined_until_f() -> None:
    f = Feeder(CriFramer(1 << 20, 1.0))
    f.feed(
        [
            b"2024-06-01T12:00:00.000000001Z stdout P first ",
            b"2024-06-01T12:00:00.5+02:00 stderr F an error",
            b"2024-06-01T12:00:00.000000002Z stdout P second ",
            b"2024-06-01T12:00:00.000000003Z stdout F third",
            b"2024-06-01T12:00:01Z stdout F ",
            b"2024-06-01T12:00:02Z stdout F",
            b"2024-06-01T12:00:03Z stdout F:x has  two  spaces ",
        ]
    )
    assert f.out.payloads == [
        b"first second third",
        b"an error",
        b"",
        b"",
        b"has  two  spaces ",
    ]
    assert f.out.starts == [f.starts[0], f.starts[1], f.starts[4], f.starts[5], f.starts[6]]
    assert f.out.metas == [
        {"stream": s} for s in ("stdout", "stderr", "stdout", "stdout", "stdout")
    ]
    assert f.out.times is not None
    assert f.out.times[0] == datetime(2024, 6, 1, 12, 0, 0, 0, tzinfo=UTC)
    assert f.out.times[1] == datetime(2024, 6, 1, 10, 0, 0, 500000, tzinfo=UTC)


@pytest.mark.parametrize(
    "line",
    [
        b"plain text",
        b"2024-06-01T12:00:00Z stdout",
        b"2024-06-01T12:00:00Z stdin F x",
        b"2024-06-01T12:00:00Z stdout X x",
        b"yesterday stdout F x",
    ],
)
def test_cri_malformed_line_is_kept_raw_and_counted(line: bytes) -> None:
    f = Feeder(CriFramer(1 << 20, 1.0))
    f.feed([line])
    assert f.out.payloads == [line]
    assert f.out.metas == [{"parse_error": "cri"}]
    assert f.framer.errors == 1


def test_cri_partial_over_max_line_bytes_is_cut() -> None:
    f = Feeder(CriFramer(300, 1.0))
    piece = b"p" * 200
    f.feed([b"2024-06-01T12:00:00Z stdout P " + piece] * 3 + [b"2024-06-01T12:00:00Z stdout F end"])
    assert f.out.payloads == [b"p" * 300]
    assert f.out.truncated == [0]


def test_raw_framer_is_the_identity() -> None:
    lines = Records([b"a", b"b"], [0, 2], [1])
    assert RawFramer().feed(lines, 0.0) is lines
    assert isinstance(build_framer("raw", 1000, 1.0), RawFramer)
    assert isinstance(build_framer("docker", 1000, 1.0), DockerFramer)
    assert isinstance(build_framer("cri", 1000, 1.0), CriFramer)


# -- what normalize makes of the transport facts -------------------------------------------

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
RECORDED = datetime(2024, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)


def test_recorded_time_stands_in_only_for_a_line_without_its_own() -> None:
    chunk = RawChunk(
        "s",
        "api",
        [b"no time here", b'{"ts": "2025-01-01T00:00:00Z", "message": "own"}', b"x"],
        times=[RECORDED, RECORDED, None],
    )
    events = normalize_chunk(chunk, NOW)
    assert [e.ts for e in events] == [RECORDED, datetime(2025, 1, 1, tzinfo=UTC), NOW]


def test_transport_facts_are_merged_into_meta_and_win() -> None:
    chunk = RawChunk(
        "s",
        "api",
        [b'{"message": "m", "stream": "mine", "container_id": "mine", "k": 1}', b"plain"],
        meta={"container_id": "abc", "container_name": "api-1"},
        line_meta=[{"stream": "stderr"}, None],
    )
    first, second = normalize_chunk(chunk, NOW)
    assert first.meta == {
        "k": 1,
        "stream": "stderr",
        "container_id": "abc",
        "container_name": "api-1",
    }
    assert second.meta == {"container_id": "abc", "container_name": "api-1"}
    assert chunk.meta == {"container_id": "abc", "container_name": "api-1"}  # not mutated


def test_a_malformed_wrapper_event_carries_the_framers_parse_error() -> None:
    chunk = RawChunk("s", "api", [b"{oops"], line_meta=[{"parse_error": "docker_json"}])
    (event,) = normalize_chunk(chunk, NOW)
    assert (event.event, event.message) == ("raw", "{oops")
    assert event.meta == {"parse_error": "docker_json"}  # wins over normalize's own
