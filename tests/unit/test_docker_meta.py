"""Pure logic of the docker source: container facts, selection, our own container; and
the api mode's wire decoding (frames, timestamped lines), cursor and retry rules."""

from __future__ import annotations

import io
import json
import logging
import struct
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forwarder.config import DockerSourceConfig, MultilineConfig
from forwarder.event import Position
from forwarder.pipeline.multiline import build_grouper
from forwarder.sources.docker import (
    NOT_IN_A_CONTAINER,
    ContainerInfo,
    ContainerRules,
    ContainerSelector,
    ContainerTarget,
    OwnContainer,
    label_matches,
    own_container_from,
    parse_container,
    service_for,
)
from forwarder.sources.docker_api import (
    GONE,
    PERMANENT,
    TRANSIENT,
    Backoff,
    ContainerCursor,
    ContainerLog,
    FrameDecoder,
    JsonStream,
    LineAssembler,
    LogLine,
    classify_status,
    container_event,
    datetime_of,
    parse_timestamp_ns,
    since_param,
)
from tests.docker_engine import compose_labels, config_v2

CID = "3f4e2b1a9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f"
OTHER = "a" * 64
NS = 1_000_000_000


def info(name: str = "shop-api-1", labels: dict[str, str] | None = None) -> ContainerInfo:
    return ContainerInfo(CID, name, labels or {})


# -- container documents ---------------------------------------------------------------


def test_config_v2_json_gives_id_name_without_slash_labels_state_and_tty() -> None:
    raw = json.dumps(
        config_v2(CID, "shop-api-1", labels=compose_labels("shop", "api"), tty=True)
    ).encode()
    parsed = parse_container(raw)
    assert parsed.id == CID
    assert parsed.name == "shop-api-1"
    assert parsed.labels["com.docker.compose.service"] == "api"
    assert parsed.labels["com.docker.compose.project"] == "shop"
    assert parsed.running is True
    assert parsed.tty is True
    stopped = parse_container(json.dumps(config_v2(CID, "x", running=False)))
    assert (stopped.running, stopped.tty, stopped.labels) == (False, False, {})


def test_engine_inspect_answer_has_the_same_layout_with_id_spelled_id() -> None:
    doc = {
        "Id": CID,
        "Name": "/web",
        "Config": {"Labels": None, "Tty": False},
        "State": {"Status": "running", "Running": True},
    }
    assert parse_container(doc) == ContainerInfo(CID, "web", {}, running=True, tty=False)


@pytest.mark.parametrize(
    "doc",
    [
        b"{not json",
        b"[]",
        json.dumps({"Name": "/x"}).encode(),
        json.dumps({"ID": "abc", "Name": "/x"}).encode(),
        json.dumps({"ID": CID, "Name": "/"}).encode(),
        json.dumps({"ID": CID}).encode(),
    ],
    ids=["not-json", "not-object", "no-id", "short-id", "empty-name", "no-name"],
)
def test_what_is_not_a_container_document_is_refused(doc: bytes) -> None:
    with pytest.raises(ValueError):
        parse_container(doc)


# -- service ---------------------------------------------------------------------------


def test_service_is_looked_up_by_compose_service_then_name_else_either_as_is() -> None:
    compose = {"com.docker.compose.service": "api"}
    assert service_for(info("shop-api-1", compose), {"api": "shop-api"}) == "shop-api"
    assert service_for(info("shop-api-1", compose), {"shop-api-1": "edge"}) == "edge"
    # The compose service's entry wins over the name's.
    assert service_for(info("shop-api-1", compose), {"api": "a", "shop-api-1": "b"}) == "a"
    assert service_for(info("shop-api-1", compose), {}) == "api"
    assert service_for(info("redis"), {}) == "redis"
    assert service_for(info("redis"), {"redis": "cache"}) == "cache"


# -- selection -------------------------------------------------------------------------


def test_labels_match_by_key_or_key_and_value() -> None:
    labels = {"logs": "yes", "tier": ""}
    assert label_matches(labels, "logs")
    assert label_matches(labels, "logs=yes")
    assert not label_matches(labels, "logs=no")
    assert label_matches(labels, "tier=")
    assert not label_matches(labels, "team")


def test_no_rules_read_every_container() -> None:
    assert ContainerSelector().rejects(info("anything")) is None


def test_include_names_are_globs_and_exclusion_wins() -> None:
    rules = ContainerSelector(include_names=("shop-*",), exclude_names=("*-db-*",))
    assert rules.rejects(info("shop-api-1")) is None
    assert "include_containers" in (rules.rejects(info("other-api-1")) or "")
    assert "exclude_containers" in (rules.rejects(info("shop-db-1")) or "")


def test_include_labels_must_all_be_carried_and_any_exclude_label_skips() -> None:
    rules = ContainerSelector(include_labels=("logs", "tier=web"), exclude_labels=("noisy",))
    assert rules.rejects(info(labels={"logs": "1", "tier": "web"})) is None
    assert rules.rejects(info(labels={"logs": "1", "tier": "db"})) is not None
    assert rules.rejects(info(labels={"tier": "web"})) is not None
    assert rules.rejects(info(labels={"logs": "1", "tier": "web", "noisy": ""})) is not None


def test_rules_from_config_give_service_and_meta_or_the_reason_to_skip() -> None:
    cfg = DockerSourceConfig(
        type="docker",
        name="containers",
        services={"api": "shop-api"},
        exclude_labels=["logs=off"],
    )
    rules = ContainerRules.from_config(cfg, OwnContainer(id=OTHER))
    target = rules.decide(info(labels={"com.docker.compose.service": "api"}))
    assert isinstance(target, ContainerTarget)
    assert target.service == "shop-api"
    assert target.meta == {"container_id": CID, "container_name": "shop-api-1"}
    assert isinstance(rules.decide(info(labels={"logs": "off"})), str)
    own = ContainerInfo(OTHER, "forwarder-1", {})
    assert "own container" in str(rules.decide(own))


# -- our own container -----------------------------------------------------------------

# /proc/self/mountinfo of a process in a container (cgroup v2 host): dockerd bind-mounts
# the container's resolv.conf, hostname and hosts from its folder.
_SDA = "rw,relatime - ext4 /dev/sda1 rw"
_DIR = f"/var/lib/docker/containers/{CID}"
MOUNTINFO = "\n".join(
    [
        "1183 1012 0:97 / / rw,relatime master:543 - overlay overlay rw,"
        "lowerdir=/var/lib/docker/overlay2/l/ABC:/var/lib/docker/overlay2/l/DEF,"
        "upperdir=/var/lib/docker/overlay2/1d/diff,workdir=/var/lib/docker/overlay2/1d/work",
        "1184 1183 0:100 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw",
        "1190 1183 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw",
        # files mode: dockerd's containers folder mounted read-only (no id in it)
        "1191 1183 8:1 /var/lib/docker/containers /var/lib/docker/containers ro,relatime"
        " - ext4 /dev/sda1 rw",
        f"1193 1183 8:1 {_DIR}/resolv.conf /etc/resolv.conf {_SDA}",
        f"1194 1183 8:1 {_DIR}/hostname /etc/hostname {_SDA}",
        f"1195 1183 8:1 {_DIR}/hosts /etc/hosts {_SDA}",
        "1013 1184 0:103 /bus /proc/bus ro,nosuid,nodev,noexec,relatime - proc proc rw",
    ]
)


def test_own_container_is_found_in_mountinfo() -> None:
    own = own_container_from(MOUNTINFO, "0::/\n", "deadbeef")
    assert own == OwnContainer(id=CID)
    assert own.matches(CID)
    assert not own.matches(OTHER)


def test_on_the_host_the_shm_mounts_of_containers_are_not_ours() -> None:
    shm = f"/var/lib/docker/containers/{OTHER}/mounts/shm"
    host = f"412 29 0:58 / {shm} rw,nosuid,nodev,noexec,relatime shared:224 - tmpfs shm rw\n"
    assert own_container_from(host, "0::/system.slice/forwarder.service\n", "db-host") == (
        NOT_IN_A_CONTAINER
    )
    # Inside a container that mounts another's folder, only our own mounts count.
    other = f"1200 1183 8:1 /var/lib/docker/containers/{OTHER}/ /mnt/x {_SDA}\n"
    assert own_container_from(other + MOUNTINFO, None, None) == OwnContainer(id=CID)


@pytest.mark.parametrize(
    "cgroup",
    [
        f"12:memory:/docker/{CID}\n11:cpuset:/docker/{CID}\n",
        f"0::/system.slice/docker-{CID}.scope\n",
    ],
    ids=["cgroupfs", "systemd"],
)
def test_own_container_is_found_in_cgroup_when_mountinfo_says_nothing(cgroup: str) -> None:
    assert own_container_from("1 0 0:1 / / rw - overlay overlay rw\n", cgroup, None) == (
        OwnContainer(id=CID)
    )


def test_hostname_of_12_hex_digits_is_the_last_resort() -> None:
    own = own_container_from(None, "0::/\n", CID[:12])
    assert own == OwnContainer(prefix=CID[:12])
    assert own.matches(CID)
    assert not own.matches(OTHER)


def test_outside_a_container_nothing_is_ours() -> None:
    assert own_container_from("", "0::/init.scope\n", "build-host") == NOT_IN_A_CONTAINER
    assert own_container_from(None, None, None) == NOT_IN_A_CONTAINER
    assert not NOT_IN_A_CONTAINER.matches(CID)


# -- api mode: timestamps --------------------------------------------------------------

T0 = 1_795_694_400 * NS  # 2026-11-26T12:00:00Z


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"2026-11-26T12:00:00.000000001Z", T0 + 1),
        (b"2026-11-26T12:00:00.123456789Z", T0 + 123_456_789),
        (b"2026-11-26T12:00:00.5Z", T0 + 500_000_000),
        (b"2026-11-26T12:00:00Z", T0),
        (b"2026-11-26T13:00:00.000000000+01:00", T0),
        (b"2026-11-26T11:30:00.000000000-00:30", T0),
        (b"2026-11-26 12:00:00Z", None),
        (b"2026-13-26T12:00:00Z", None),
        (b"2026-11-26T12:00:00.1234567891Z", None),
        (b"hello", None),
        (b"", None),
    ],
)
def test_rfc3339_nano_timestamps(text: bytes, expected: int | None) -> None:
    assert parse_timestamp_ns(text) == expected


def test_since_is_seconds_dot_nine_digit_nanos_and_times_are_utc() -> None:
    assert since_param(T0 + 1) == "1795694400.000000001"
    assert since_param(T0 + 123_456_789) == "1795694400.123456789"
    assert datetime_of(T0 + 123_456_789) == datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=UTC)


# -- api mode: frames ------------------------------------------------------------------


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def test_frames_come_out_whole_however_the_bytes_are_split() -> None:
    data = frame(1, b"out\n") + frame(2, b"err\n") + frame(1, b"") + frame(3, b"boom\n")
    for size in (1, 3, 8, 9, len(data)):
        decoder = FrameDecoder(1024)
        frames = []
        for i in range(0, len(data), size):
            frames.extend(decoder.feed(data[i : i + size]))
        assert [(f.stream, f.payload, f.cut) for f in frames] == [
            (1, b"out\n", False),
            (2, b"err\n", False),
            (1, b"", False),
            (3, b"boom\n", False),
        ]
        assert not decoder.mid_frame


def test_a_partial_frame_is_held_never_delivered() -> None:
    decoder = FrameDecoder(1024)
    data = frame(1, b"whole\n") + frame(1, b"half of it\n")
    assert [f.payload for f in decoder.feed(data[:-4])] == [b"whole\n"]
    assert decoder.mid_frame
    decoder = FrameDecoder(1024)
    decoder.feed(data[:3])  # inside the first header
    assert decoder.mid_frame


def test_a_payload_over_the_limit_is_cut_and_keeps_its_newline() -> None:
    decoder = FrameDecoder(10)
    frames = decoder.feed(frame(1, b"x" * 100 + b"\n") + frame(1, b"y" * 100))
    assert [(f.payload, f.cut) for f in frames] == [(b"x" * 10 + b"\n", True), (b"y" * 10, True)]


# -- api mode: lines -------------------------------------------------------------------

TS1 = b"2026-11-26T12:00:00.000000001Z"
TS2 = b"2026-11-26T12:00:00.000000002Z"
TS3 = b"2026-11-26T12:00:00.000000003Z"


def test_one_line_per_message_with_its_timestamp_removed() -> None:
    lines = LineAssembler(1024)
    assert lines.feed("stdout", TS1 + b" hello world\n", message_start=True) == [
        LogLine("stdout", b"hello world", T0 + 1)
    ]
    assert lines.feed("stderr", TS2 + b" \n", message_start=True) == [
        LogLine("stderr", b"", T0 + 2)
    ]


def test_16kb_partials_join_and_the_line_takes_the_last_timestamp() -> None:
    lines = LineAssembler(100_000)
    first = b"a" * 16384
    assert lines.feed("stdout", TS1 + b" " + first, message_start=True) == []
    # Interleaved: the other stream's lines are separate.
    assert lines.feed("stderr", TS2 + b" other\n", message_start=True) == [
        LogLine("stderr", b"other", T0 + 2)
    ]
    assert lines.feed("stdout", TS3 + b" end\n", message_start=True) == [
        LogLine("stdout", first + b"end", T0 + 3)
    ]


def test_a_frame_may_hold_several_lines_or_part_of_one() -> None:
    lines = LineAssembler(1024)
    several = TS1 + b" one\n" + TS2 + b" two\n" + TS3 + b" thr"
    assert lines.feed("stdout", several, message_start=True) == [
        LogLine("stdout", b"one", T0 + 1),
        LogLine("stdout", b"two", T0 + 2),
    ]
    # The rest of the message in a frame of its own, without a timestamp.
    assert lines.feed("stdout", b"ee\n", message_start=True) == [
        LogLine("stdout", b"three", T0 + 3)
    ]


def test_tty_bytes_split_anywhere_give_the_same_lines() -> None:
    data = TS1 + b" \x1b[1mbold\x1b[0m\r\n" + TS2 + b" second line\r\n"
    for size in (1, 5, 31, 32, len(data)):
        lines = LineAssembler(1024)
        got = []
        for i in range(0, len(data), size):
            got.extend(lines.feed("stdout", data[i : i + size], message_start=False))
        assert got == [
            LogLine("stdout", b"\x1b[1mbold\x1b[0m", T0 + 1),
            LogLine("stdout", b"second line", T0 + 2),
        ]


def test_tty_partial_is_recognised_after_16kb_by_its_timestamp() -> None:
    lines = LineAssembler(100_000)
    first = b"z" * 16384
    data = TS1 + b" " + first + TS2 + b" rest\r\n"
    assert lines.feed("stdout", data, message_start=False) == [
        LogLine("stdout", first + b"rest", T0 + 2)
    ]


def test_lines_over_the_limit_are_cut_and_flagged() -> None:
    lines = LineAssembler(8)
    got = lines.feed("stdout", TS1 + b" 0123456789abcdef\n", message_start=True)
    assert got == [LogLine("stdout", b"01234567", T0 + 1, truncated=True)]
    assert lines.feed("stdout", TS2 + b" 01234567\r\n", message_start=True) == [
        LogLine("stdout", b"01234567", T0 + 2)
    ]
    assert lines.held_bytes == 0


def test_a_line_without_timestamp_is_kept_as_text_without_time() -> None:
    lines = LineAssembler(1024)
    assert lines.feed("stdout", b"no stamp here\n", message_start=True) == [
        LogLine("stdout", b"no stamp here", None)
    ]
    assert lines.feed("stdout", b"x" * 50 + b"\n", message_start=True) == [
        LogLine("stdout", b"x" * 50, None)
    ]


def test_flush_gives_the_unfinished_lines() -> None:
    lines = LineAssembler(1024)
    lines.feed("stdout", TS1 + b" no newline yet", message_start=True)
    assert lines.flush() == [LogLine("stdout", b"no newline yet", T0 + 1)]
    assert lines.flush() == []


@given(
    st.lists(
        st.tuples(
            st.sampled_from([1, 2]), st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))
        ),
        max_size=20,
    ),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=10),
)
def test_multiplexed_stream_decodes_the_same_however_it_is_read(
    messages: list[tuple[int, bytes]], sizes: list[int]
) -> None:
    data = b"".join(frame(s, TS1 + b" " + text + b"\n") for s, text in messages)
    decoder, lines = FrameDecoder(4096), LineAssembler(4096)
    got: list[LogLine] = []
    i = k = 0
    while i < len(data):
        size = sizes[k % len(sizes)]
        k += 1
        for f in decoder.feed(data[i : i + size]):
            name = "stdout" if f.stream == 1 else "stderr"
            got.extend(lines.feed(name, f.payload, message_start=True))
        i += size
    expected = [
        LogLine("stdout" if s == 1 else "stderr", text.removesuffix(b"\r"), T0 + 1)
        for s, text in messages
    ]
    assert got == expected


# -- api mode: the cursor --------------------------------------------------------------


def test_cursor_skips_what_was_emitted_before_and_counts_lines_at_its_timestamp() -> None:
    cursor = ContainerCursor.from_position(
        Position("c", CID, T0 + 5, {"count_at_ts": 2, "name": "api"})
    )
    assert cursor.since() == "1795694400.000000005"
    cursor.begin()
    # dockerd answers with everything stamped at or after `since`.
    admitted = [cursor.admit(ts) for ts in (T0 + 5, T0 + 5, T0 + 5, T0 + 6, T0 + 6)]
    assert admitted == [False, False, True, True, True]
    assert (cursor.ts_ns, cursor.count) == (T0 + 6, 2)


def test_cursor_keeps_its_highest_timestamp_when_a_line_comes_stamped_earlier() -> None:
    cursor = ContainerCursor()
    assert cursor.since() is None
    cursor.begin()
    assert cursor.admit(T0 + 6)  # stdout
    assert cursor.admit(T0 + 5)  # stderr, stamped a moment before, logged after
    assert (cursor.ts_ns, cursor.count) == (T0 + 6, 1)
    cursor.begin()  # reconnected with since=T0+6: the T0+6 line is the one seen
    assert not cursor.admit(T0 + 6)
    assert cursor.admit(T0 + 6)
    assert cursor.count == 2


def test_cursor_admits_a_line_without_timestamp_and_does_not_move() -> None:
    cursor = ContainerCursor(T0, 1)
    cursor.begin()
    assert cursor.admit(None)
    assert (cursor.ts_ns, cursor.count) == (T0, 1)


def test_a_checkpoint_that_is_not_a_cursor_is_refused() -> None:
    with pytest.raises(ValueError):
        ContainerCursor.from_position(Position("c", CID, 5, {"count_at_ts": "x"}))


# -- api mode: retries and events ------------------------------------------------------


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.5, 3.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5


@pytest.mark.parametrize(
    ("status", "kind"),
    [(404, GONE), (500, TRANSIENT), (503, TRANSIENT), (501, PERMANENT), (400, PERMANENT)],
)
def test_engine_statuses_are_classified(status: int, kind: str) -> None:
    assert classify_status(status) == kind


def test_event_stream_objects_are_decoded_across_reads() -> None:
    start = {"Type": "container", "Action": "start", "Actor": {"ID": CID, "Attributes": {}}}
    die = {"status": "die", "id": OTHER, "Type": "container", "Action": "die"}
    image = {"Type": "image", "Action": "pull", "Actor": {"ID": "sha256:x"}}
    data = (json.dumps(start) + "\n" + json.dumps(die) + "\n" + json.dumps(image)).encode()
    data += (
        b"\n"
        + json.dumps(
            {
                "Type": "container",
                "Action": "start",
                "Actor": {"ID": CID, "Attributes": {"name": "é"}},
            }
        ).encode()
    )
    stream = JsonStream()
    objects = []
    for i in range(0, len(data), 7):
        objects.extend(stream.feed(data[i : i + 7]))
    events = [container_event(o) for o in objects]
    assert events == [("start", CID), ("die", OTHER), None, ("start", CID)]


# -- api mode: grouping and the resume point -------------------------------------------


def logged_exception() -> list[bytes]:
    """What `logger.exception` really prints: its message line, then the traceback."""
    stream = io.StringIO()
    logger = logging.getLogger("tests.docker.payments")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            {}["gateway"]
        except KeyError:
            logger.exception("payment failed")
    finally:
        logger.removeHandler(handler)
    return [line.encode() for line in stream.getvalue().rstrip("\n").split("\n")]


TRACEBACK = logged_exception()


def test_resume_point_stays_before_a_record_the_grouper_holds() -> None:
    log = ContainerLog(ContainerCursor(), build_grouper(MultilineConfig(mode="python")))
    lines = [LogLine("stderr", text, T0 + 10 + i) for i, text in enumerate(TRACEBACK)]
    first = log.feed([LogLine("stdout", b"started", T0 + 1), *lines], now=0.0)
    # "started" is released; the message and its traceback may still grow: held.
    assert first.payloads == [b"started"]
    assert log.resume_point() == (T0 + 1, 1)
    assert log.next_due() == 1.0
    assert log.release_due(0.5).payloads == []
    released = log.release_due(1.0)
    assert released.payloads == [b"\n".join(TRACEBACK)]
    assert released.metas == [{"stream": "stderr", "multiline": len(TRACEBACK)}]
    assert released.times == [datetime_of(T0 + 10)]
    assert log.resume_point() == (T0 + 9 + len(TRACEBACK), 1)


def test_resume_point_counts_lines_at_the_same_timestamp_before_the_held_one() -> None:
    log = ContainerLog(ContainerCursor(), build_grouper(MultilineConfig(mode="python")))
    out = log.feed([LogLine("stdout", b"a", T0), LogLine("stdout", b"b", T0)], now=0.0)
    assert out.payloads == [b"a"]  # "b" is held (a traceback may follow it)
    assert log.resume_point() == (T0, 1)  # since=T0, skip 1: "b" is read again
    assert log.flush().payloads == [b"b"]
    assert log.resume_point() == (T0, 2)


def test_without_grouping_the_resume_point_is_after_the_last_line() -> None:
    log = ContainerLog(ContainerCursor(T0, 1), build_grouper(MultilineConfig(mode="off")))
    log.cursor.begin()
    out = log.feed([LogLine("stdout", b"seen", T0), LogLine("stdout", b"new", T0 + 1)], 0.0)
    assert out.payloads == [b"new"]
    assert log.skipped == 1
    assert log.resume_point() == (T0 + 1, 1)
