"""Property tests: whatever the bytes, normalize returns a storable Event and never raises."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder.event import Event, Level, RawChunk
from forwarder.pipeline.normalize import (
    EVENT_MAX_CHARS,
    SERVICE_MAX_CHARS,
    _from_fields,
    _scrub,
    normalize,
    normalize_chunk,
)

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


# -- lines with exactly the six schema keys: the fast path -----------------------------
# `_normalize` answers such a line itself, without `_from_fields`, when every value is
# plain: "ts" an ISO 8601 string in UTC of at most 64 characters, "level" exactly INFO,
# WARNING or ERROR, "event" and "service" non-empty strings within their caps, "message"
# a string, "meta" an object. The objects below hold plain values except for up to two
# keys, whose values sit on the other side of those conditions (or are anything at all).

_offsets = st.builds(
    timezone,
    st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23)),
)


@st.composite
def _iso_timestamps(draw: st.DrawFn) -> str:
    dt = draw(st.datetimes(timezones=st.none() | st.just(UTC) | _offsets))
    spec = draw(st.sampled_from(["auto", "minutes", "seconds", "milliseconds", "microseconds"]))
    text = dt.isoformat(sep=draw(st.sampled_from("T t")), timespec=spec)
    zone = draw(st.sampled_from([None, "Z", "z", " UTC", "-00:00", "+0000"]))
    if zone is not None:
        text = text.replace("+00:00", zone)
    digits = draw(st.sampled_from(["", "0", "000", "0" * 50]))  # long fractions, > 64 chars
    return text.replace(".", "." + digits, 1) if "." in text else text


def _zulu(dt: datetime, pad: int) -> str:
    """The benchmark's (and most loggers') form; `pad` zeros lengthen the fraction."""
    text = dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")  # 24 characters
    return text.replace(".", "." + "0" * pad)


_KEYS = ("ts", "service", "level", "event", "message", "meta")
_PLAIN_VALUES = {  # what the fast path takes (ts: up to 64 characters)
    "ts": st.builds(_zulu, st.datetimes(timezones=st.just(UTC)), st.sampled_from([0, 3, 40, 41])),
    "service": st.text(min_size=1, max_size=10) | st.just("s" * SERVICE_MAX_CHARS),
    "level": st.sampled_from(["INFO", "WARNING", "ERROR"]),
    "event": st.text(min_size=1, max_size=10) | st.just("e" * EVENT_MAX_CHARS),
    "message": st.text(),
    "meta": st.dictionaries(st.text(max_size=8), _json_values, max_size=4),
}
_odd_names = st.sampled_from(["", "e" * 201, "\u00e9" * 300]) | _json_values
_ANY_VALUES = {  # what it leaves to `_from_fields`, mostly (some ISO forms are in UTC)
    "ts": (
        _iso_timestamps()
        | st.from_regex(r"[0-9]{1,20}(\.[0-9]{0,3})?", fullmatch=True)  # epoch strings
        | st.sampled_from(["", "20240701", "20240701T123456Z", "2024-07-01", "0000-01-01"])
        | st.text(max_size=70)
        | _json_values
    ),
    "service": _odd_names,
    "level": st.sampled_from(["info", "Warn", "ERROR ", "FATAL", "50", ""]) | _json_values,
    "event": _odd_names,
    "message": _json_values,
    "meta": _json_values,
}


@st.composite
def _schema_objects(draw: st.DrawFn) -> dict[str, Any]:
    """The six schema keys in any order; a few of them (often none) with any value."""
    odd = draw(st.sets(st.sampled_from(_KEYS), max_size=2))
    values = {key: draw((_ANY_VALUES if key in odd else _PLAIN_VALUES)[key]) for key in _KEYS}
    return {key: values[key] for key in draw(st.permutations(_KEYS))}


@settings(max_examples=1000)
@given(obj=_schema_objects(), truncated=st.booleans())
def test_a_six_key_schema_line_is_what_the_general_path_makes_of_it(
    obj: dict[str, Any], truncated: bool
) -> None:
    line = orjson.dumps(obj)
    event = normalize(line, "svc", NOW, truncated=truncated)
    # The general path, without the fast path: what every JSON object line went through.
    expected = _from_fields(_scrub(orjson.loads(line)), "svc", NOW, truncated)
    assert event == expected
    assert list(event.meta) == list(expected.meta)  # the same keys in the same order
    assert event.ts.tzinfo is UTC
    assert_storable(event, truncated=truncated)


@given(objs=st.lists(_schema_objects(), max_size=5), cut=st.sets(st.integers(0, 4)))
def test_normalize_chunk_is_normalize_per_line(objs: list[dict[str, Any]], cut: set[int]) -> None:
    lines = [orjson.dumps(obj) for obj in objs]
    chunk = RawChunk(source="s", service="svc", lines=lines, truncated=frozenset(cut))
    assert normalize_chunk(chunk, NOW) == [
        normalize(line, "svc", NOW, truncated=i in cut) for i, line in enumerate(lines)
    ]
