"""Property tests: whatever the bytes, normalize returns a storable Event and never raises."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder.event import Event, Level
from forwarder.pipeline.normalize import EVENT_MAX_CHARS, SERVICE_MAX_CHARS, normalize

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def _strings(value: Any) -> list[str]:
    """Every string in a JSON-like value, dict keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def assert_storable(event: Event, *, truncated: bool = False) -> None:
    """What PostgreSQL (text + jsonb + timestamptz) and orjson need from an event."""
    assert isinstance(event, Event)
    assert event.ts.tzinfo is UTC
    assert event.ts.utcoffset() == timedelta(0)
    assert event.level in (Level.INFO, Level.WARNING, Level.ERROR)
    assert isinstance(event.meta, dict)
    for text in (event.service, event.event, event.message, *_strings(event.meta)):
        assert isinstance(text, str)
        assert "\x00" not in text
        text.encode("utf-8")  # no lone surrogates
    assert 0 < len(event.event) <= EVENT_MAX_CHARS
    assert len(event.service) <= SERVICE_MAX_CHARS
    orjson.dumps({"meta": {"meta": event.meta}})  # also when wrapped in an envelope
    if truncated:
        assert event.meta["truncated"] is True


# Pieces that steer random lines into every parser branch.
_FRAGMENTS = st.sampled_from(
    [
        b"{", b"}", b"[", b"]", b'"', b":", b",", b"=", b" ", b"\t", b"\\", b"\\u0000",
        b"\\ud800", b"\x00", b"\xff", b"\xc3", b"\r", b"-", b".", b"Z", b"+02:00",
        b'"ts":', b'"level":', b'"message":', b'"event":', b'"service":', b'"meta":',
        b'"time":', b"null", b"true", b"1e30", b"1719837296789", b"50", b"-1",
        b"2024-07-01T12:34:56", b"2024-07-01 12:34:56,789", b"0000-01-01", b"9999-12-31",
        b"INFO:     ", b"ERROR:", b"WARNING", b"[INFO]", b"level=", b"msg=", b"ts=",
        b" - ", b'"GET / HTTP/1.1" 200', b"app.db", b"x",
    ]
)  # fmt: skip

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)
_SCHEMA_KEYS = st.sampled_from(
    ["ts", "timestamp", "time", "@timestamp", "asctime", "level", "levelname", "severity",
     "lvl", "loglevel", "message", "msg", "log", "event", "service", "meta", "logger"]
)  # fmt: skip


@settings(max_examples=500)
@given(line=st.binary(max_size=300), truncated=st.booleans())
def test_any_bytes_become_a_storable_event(line: bytes, truncated: bool) -> None:
    assert_storable(normalize(line, "svc", NOW, truncated=truncated), truncated=truncated)


@settings(max_examples=500)
@given(parts=st.lists(_FRAGMENTS, max_size=30), truncated=st.booleans())
def test_lines_built_from_format_fragments_become_storable_events(
    parts: list[bytes], truncated: bool
) -> None:
    line = b"".join(parts)
    assert_storable(normalize(line, "svc", NOW, truncated=truncated), truncated=truncated)


@settings(max_examples=300)
@given(obj=st.dictionaries(_SCHEMA_KEYS | st.text(), _json_values, max_size=8))
def test_any_json_object_becomes_a_storable_event(obj: dict[str, Any]) -> None:
    event = normalize(orjson.dumps(obj), "svc", NOW)
    assert_storable(event)
    assert event.event != "raw"


@given(ts=st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
def test_any_timestamp_value_gives_an_aware_utc_ts(ts: Any) -> None:
    line = (
        orjson.dumps({"ts": ts})
        if not isinstance(ts, int) or abs(ts) < 2**63
        else (b'{"ts":' + str(ts).encode() + b"}")
    )
    assert_storable(normalize(line, "svc", NOW))


@given(message=st.text())
def test_a_json_string_message_survives_apart_from_nul(message: str) -> None:
    event = normalize(orjson.dumps({"message": message}), "svc", NOW)
    assert event.message == message.replace("\x00", "\ufffd")


@given(level=_json_values)
def test_any_level_value_maps_to_one_of_three_levels(level: Any) -> None:
    event = normalize(orjson.dumps({"level": level}), "svc", NOW)
    assert_storable(event)
    if level not in ("INFO", "WARNING", "ERROR", None, ""):
        assert "original_level" in event.meta
