"""dockerd's json-file `attrs` (labels, env, tag log options) reach each row's meta.

Every line here is read from files a real dockerd 20.10.24 wrote (tests/fixtures/dockerd,
which says how each was made), fed through the framer the way the file source feeds
it, then through the multiline grouper and normalize where the row's meta is made.
"""

from __future__ import annotations

from datetime import UTC, datetime

from forwarder.event import RawChunk
from forwarder.pipeline.multiline import PythonGrouper
from forwarder.pipeline.normalize import normalize_chunk
from forwarder.sources.framing import DockerFramer, Records
from forwarder.sources.spooled import FramedGrouper
from tests.fixtures import dockerd

NOW = datetime(2026, 12, 3, 15, 0, tzinfo=UTC)
ATTRS = {  # what dockerd wrote on every line of json-file-attrs.log
    "APP_ENV": "prod",
    "com.example.team": "shop",
    "tag": "attrs-demo/bb:1",
    "tier": "web",
}


def framed(lines: list[bytes], framer: DockerFramer | FramedGrouper | None = None) -> Records:
    framer = framer or DockerFramer(1 << 20, 1.0)
    starts, offset = [], 0
    for line in lines:
        starts.append(offset)
        offset += len(line) + 1
    out = framer.feed(Records(list(lines), starts), 0.0)
    out.extend(framer.flush())
    return out


def rows(records: Records) -> list[dict[str, object]]:
    chunk = RawChunk(
        "containers", "api", records.payloads, line_meta=records.metas, times=records.times
    )
    return [dict(e.meta) for e in normalize_chunk(chunk, NOW)]


def test_attrs_of_real_lines_reach_meta_on_both_streams_and_a_line_split_in_pieces() -> None:
    lines = dockerd.lines("json-file-attrs.log")
    assert len(lines) == 6  # 2 short lines, 3 pieces of the 40,000-byte line, 1 short
    got = framed(lines)
    assert [len(p) for p in got.payloads] == [17, 14, 40_000, 19]
    assert got.payloads[2] == b"a" * 30_000 + b"b" * 10_000
    assert got.metas == [
        {"stream": "stdout", "attrs": ATTRS},
        {"stream": "stderr", "attrs": ATTRS},
        {"stream": "stdout", "attrs": ATTRS},
        {"stream": "stdout", "attrs": ATTRS},
    ]
    assert got.times is not None  # the joined line has its first piece's time
    assert got.times[2] == datetime(2026, 12, 3, 14, 7, 36, 403549, tzinfo=UTC)
    metas = rows(got)
    assert [m["attrs"] for m in metas] == [ATTRS] * 4
    assert [m["stream"] for m in metas] == ["stdout", "stderr", "stdout", "stdout"]


def test_lines_of_one_stream_share_one_meta_object() -> None:
    got = framed(dockerd.lines("json-file-attrs.log"))
    assert got.metas is not None
    first, _, long, last = got.metas
    assert first is long is last  # cheap for the grouper's comparison, built once


def test_lines_without_attrs_keep_the_plain_stream_meta() -> None:
    plain = framed(dockerd.lines("json-file-plain.log"))
    assert plain.payloads == [b"plain line", b"plain err"]
    assert plain.metas == [{"stream": "stdout"}, {"stream": "stderr"}]
    # --log-opt labels=<a label the container lacks>: dockerd writes no attrs at all
    missing = framed(dockerd.lines("json-file-label-missing.log"))
    assert missing.metas == [{"stream": "stdout"}]
    assert rows(missing) == [{"stream": "stdout"}]


def test_a_tag_alone_is_an_attrs_of_one_key() -> None:
    got = framed(dockerd.lines("json-file-tag-only.log"))
    assert rows(got) == [{"stream": "stdout", "attrs": {"tag": "shop"}}]


def test_a_traceback_with_attrs_is_grouped_and_keeps_them() -> None:
    lines = dockerd.lines("json-file-traceback-attrs.log")
    grouped = framed(
        lines, FramedGrouper(DockerFramer(1 << 20, 1.0), PythonGrouper(500, 1 << 20, 1.0))
    )
    assert len(grouped) == 2
    tb, ok = normalize_chunk(
        RawChunk("c", "worker", grouped.payloads, line_meta=grouped.metas, times=grouped.times),
        NOW,
    )
    attrs = {"tag": "worker", "tier": "worker"}
    assert tb.level == "ERROR" and tb.message.startswith("cycle failed\nTraceback")
    assert tb.meta["exc_type"] == "ValueError" and tb.meta["attrs"] == attrs
    assert tb.meta["stream"] == "stderr" and tb.meta["multiline"] == 5
    assert ok.message == "next cycle ok" and ok.meta == {"stream": "stdout", "attrs": attrs}


def test_attrs_win_over_a_key_of_the_same_name_in_the_line() -> None:
    # The excerpt's wrapper is dockerd's (json-file-tag-only.log); its log is a JSON
    # line of the application that has an "attrs" key of its own.
    line = (
        b'{"log":"{\\"message\\": \\"m\\", \\"attrs\\": \\"mine\\"}\\n","stream":"stdout",'
        b'"attrs":{"tag":"shop"},"time":"2026-12-03T14:07:49.479341344Z"}'
    )
    (meta,) = rows(framed([line]))
    assert meta["attrs"] == {"tag": "shop"}


def test_attrs_that_are_not_a_flat_string_map_are_made_one() -> None:
    # dockerd writes map[string]string; a hand-made "docker" file may not.
    base = b'{"log":"x\\n","stream":"stdout","time":"2026-12-03T14:07:49.479341344Z"'
    nested = framed([base + b',"attrs":{"n":1,"o":{"k":"v"},"s":"t"}}'])
    assert nested.metas == [{"stream": "stdout", "attrs": {"n": "1", "o": '{"k":"v"}', "s": "t"}}]
    for odd in (b'"just text"', b"[]", b"{}", b"null"):
        got = framed([base + b',"attrs":' + odd + b"}"])
        assert got.metas == [{"stream": "stdout"}], odd
