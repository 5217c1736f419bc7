"""The intake's pure parts: body parsing and record validation, the rate limiter, the
[http] config model. No I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from forwarder.event import Level, RawChunk
from forwarder.http_config import HttpConfig, TokenError, parse_listen
from forwarder.intake import (
    MAX_META_DEPTH,
    IntakeError,
    RateLimiter,
    UnsupportedMediaType,
    media_kind,
    parse_body,
)
from forwarder.pipeline.normalize import normalize_chunk

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def lines_of(body: object, kind: str = "json", **kw: object) -> list[dict]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return [orjson.loads(line) for line in parse_body(data, kind, **kw)]  # type: ignore[arg-type]


def error_of(body: object, kind: str = "json") -> IntakeError:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    with pytest.raises(IntakeError) as caught:
        parse_body(data, kind)
    return caught.value


def events_of(lines: list[bytes], service: str = "ui"):
    return normalize_chunk(
        RawChunk("http", service, lines, times=[NOW] * len(lines)), datetime(2030, 1, 1, tzinfo=UTC)
    )


# --- the three body forms ---------------------------------------------------------------------


def test_one_object_is_one_record() -> None:
    assert lines_of({"message": "boom", "level": "error"}) == [
        {"level": "ERROR", "message": "boom"}
    ]


def test_an_array_gives_one_record_per_object_in_order() -> None:
    body = [{"message": f"m{i}", "level": "info"} for i in range(3)]
    assert [r["message"] for r in lines_of(body)] == ["m0", "m1", "m2"]


def test_ndjson_skips_blank_lines_and_reads_crlf() -> None:
    body = b'{"message":"a","level":"warn"}\r\n\n  \n{"message":"b","level":"ERROR"}\n'
    assert lines_of(body, "ndjson") == [
        {"level": "WARNING", "message": "a"},
        {"level": "ERROR", "message": "b"},
    ]


def test_text_plain_is_sniffed_as_json_or_ndjson() -> None:
    one = b'{"message":"a","level":"info"}'
    many = b'[{"message":"a","level":"info"},{"message":"b","level":"info"}]'
    nd = b'{"message":"a","level":"info"}\n{"message":"b","level":"info"}'
    assert len(lines_of(one, "sniff")) == 1
    assert len(lines_of(many, "sniff")) == 2
    assert len(lines_of(nd, "sniff")) == 2


def test_empty_array_and_empty_ndjson_are_zero_records() -> None:
    assert parse_body(b"[]", "json") == []
    assert parse_body(b"\n\n", "ndjson") == []


# --- fields ----------------------------------------------------------------------------------


def test_optional_fields_are_kept_and_extra_keys_go_to_meta_where_meta_wins() -> None:
    (rec,) = lines_of(
        {
            "message": "TypeError: x is undefined",
            "level": "ERROR",
            "event": "ui.error",
            "ts": "2026-11-26T11:59:00.123+01:00",
            "url": "https://panel/x",
            "stack": "at f (app.js:1:2)",
            "meta": {"user_id": "u1", "url": "https://panel/y"},
        }
    )
    assert rec == {
        "ts": "2026-11-26T10:59:00.123000Z",
        "level": "ERROR",
        "message": "TypeError: x is undefined",
        "event": "ui.error",
        "meta": {"url": "https://panel/y", "stack": "at f (app.js:1:2)", "user_id": "u1"},
    }


def test_the_clients_service_is_never_used() -> None:
    lines = parse_body(orjson.dumps({"message": "m", "level": "info", "service": "api"}), "json")
    assert b"service" not in lines[0]
    (event,) = events_of(lines, service="ui")
    assert event.service == "ui"


@pytest.mark.parametrize(
    ("given", "level"),
    [
        ("INFO", "INFO"),
        ("info", "INFO"),
        ("debug", "INFO"),
        ("log", "INFO"),
        (" Warn ", "WARNING"),
        ("warning", "WARNING"),
        ("error", "ERROR"),
        ("fatal", "ERROR"),
        ("CRITICAL", "ERROR"),
    ],
)
def test_level_words_map_to_the_three_levels(given: str, level: str) -> None:
    assert lines_of({"message": "m", "level": given})[0]["level"] == level


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-11-26T12:00:00Z", "2026-11-26T12:00:00Z"),
        ("2026-11-26T12:00:00", "2026-11-26T12:00:00Z"),  # naive means UTC
        (1795694400, "2026-11-26T12:00:00Z"),  # epoch seconds
        (1795694400123, "2026-11-26T12:00:00.123000Z"),  # Date.now(): milliseconds
        (1795694400.5, "2026-11-26T12:00:00.500000Z"),
    ],
)
def test_timestamps_in_iso_or_epoch_seconds_or_ms(ts: object, expected: str) -> None:
    assert lines_of({"message": "m", "level": "info", "ts": ts})[0]["ts"] == expected


def test_null_optional_fields_are_absent() -> None:
    assert lines_of({"message": "m", "level": "info", "ts": None, "event": None, "meta": None}) == [
        {"level": "INFO", "message": "m"}
    ]


def test_user_agent_fills_meta_unless_the_record_has_one() -> None:
    recs = lines_of(
        [{"message": "a", "level": "info"}, {"message": "b", "level": "info", "user_agent": "x"}],
        user_agent="Mozilla/5.0",
    )
    assert recs[0]["meta"] == {"user_agent": "Mozilla/5.0"}
    assert recs[1]["meta"] == {"user_agent": "x"}


def test_a_validated_line_normalizes_to_exactly_its_fields() -> None:
    lines = parse_body(
        orjson.dumps(
            {
                "message": "boom",
                "level": "warn",
                "event": "ui.x",
                "ts": 1795694400,
                "meta": {"a": 1},
            }
        ),
        "json",
    )
    (event,) = events_of(lines)
    assert event.ts == NOW
    assert (event.service, event.level, event.event, event.message) == (
        "ui",
        Level.WARNING,
        "ui.x",
        "boom",
    )
    assert event.meta == {"a": 1}


def test_without_ts_the_time_of_receipt_is_the_events_time() -> None:
    (event,) = events_of(parse_body(b'{"message":"m","level":"info"}', "json"))
    assert event.ts == NOW


# --- refusals name the record and the field ------------------------------------------------


@pytest.mark.parametrize(
    ("record", "field", "text"),
    [
        ({"level": "info"}, "message", "is required"),
        ({"message": 5, "level": "info"}, "message", "must be a string, not a number"),
        ({"message": None, "level": "info"}, "message", "must be a string, not null"),
        ({"message": "m"}, "level", "is required"),
        ({"message": "m", "level": 40}, "level", "must be a string, not a number"),
        ({"message": "m", "level": "loud"}, "level", "must be INFO, WARNING or ERROR"),
        ({"message": "m", "level": "info", "event": 1}, "event", "must be a string"),
        ({"message": "m", "level": "info", "event": ""}, "event", "1 to 200 characters"),
        ({"message": "m", "level": "info", "event": "e" * 201}, "event", "1 to 200"),
        ({"message": "m", "level": "info", "ts": "yesterday"}, "ts", "ISO 8601"),
        ({"message": "m", "level": "info", "ts": True}, "ts", "ISO 8601"),
        ({"message": "m", "level": "info", "ts": [1]}, "ts", "ISO 8601"),
        ({"message": "m", "level": "info", "ts": 0}, "ts", "outside 2000..2099"),
        ({"message": "m", "level": "info", "ts": 1e300}, "ts", "ISO 8601"),
        ({"message": "m", "level": "info", "ts": "9999-01-01T00:00:00Z"}, "ts", "outside"),
        ({"message": "m", "level": "info", "meta": [1]}, "meta", "must be an object"),
        ({"message": "m", "level": "info", "meta": "x"}, "meta", "must be an object"),
    ],
)
def test_a_bad_field_names_index_and_field(record: dict, field: str, text: str) -> None:
    good = {"message": "ok", "level": "info"}
    err = error_of([good, good, record])
    assert (err.index, err.field) == (2, field)
    assert text in str(err)
    assert str(err).startswith(f"record 2, field {field!r}: ")
    assert err.as_json() == {"error": str(err), "index": 2, "field": field}


@pytest.mark.parametrize("item", [1, "x", None, [], True])
def test_a_record_that_is_not_an_object_is_refused(item: object) -> None:
    err = error_of([{"message": "ok", "level": "info"}, item])
    assert (err.index, err.field) == (1, None)
    assert "must be a JSON object" in str(err)


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b'{"message": "m", "level": "info"', b"\xff\xfe{}", b'"\\ud800"', b"NaN"],
)
def test_malformed_json_is_refused_without_an_index(body: bytes) -> None:
    err = error_of(body)
    assert err.index is None
    assert "malformed JSON" in str(err)


def test_a_malformed_ndjson_line_names_its_record_and_line() -> None:
    body = b'{"message":"a","level":"info"}\n\n{"message":\n'
    err = error_of(body, "ndjson")
    assert err.index == 1
    assert "line 3: malformed JSON" in str(err)


def test_deep_nesting_is_refused_by_the_parser_or_the_depth_limit() -> None:
    deep_body = b"[" * 5000 + b"]" * 5000
    assert "malformed JSON" in str(error_of(deep_body))
    nested: object = "leaf"
    for _ in range(MAX_META_DEPTH + 1):
        nested = {"k": nested}
    err = error_of({"message": "m", "level": "info", "meta": nested})
    assert (err.index, err.field) == (0, "meta")
    err = error_of({"message": "m", "level": "info", "extra": [[[[nested]]]]})
    assert (err.index, err.field) == (0, "extra")


def test_meta_at_the_depth_limit_is_accepted() -> None:
    nested: object = 1
    for _ in range(MAX_META_DEPTH - 1):
        nested = {"k": nested}
    assert lines_of({"message": "m", "level": "info", "meta": nested})[0]["meta"] == nested


def test_nul_bytes_are_accepted_and_normalize_makes_them_storable() -> None:
    lines = parse_body(
        orjson.dumps({"message": "a\x00b", "level": "error", "meta": {"k\x00": "v\x00"}}), "json"
    )
    (event,) = events_of(lines)
    assert "\x00" not in event.message
    assert event.message.startswith("a") and event.message.endswith("b")
    assert orjson.dumps(event.meta)


# --- any JSON value: a clean refusal or lines normalize accepts ------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["message", "level", "event", "ts", "meta", "service", "x"])
            | st.text(max_size=5),
            children,
            max_size=6,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_body_is_refused_cleanly_or_normalizes(value: object) -> None:
    try:
        data = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return  # not representable as a body
    try:
        lines = parse_body(data, "json")
    except IntakeError:
        return
    events = events_of(lines)
    assert len(events) == len(lines)
    for event in events:
        assert event.service == "ui"
        assert event.level in (Level.INFO, Level.WARNING, Level.ERROR)


# --- content types ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ctype", "charset", "kind"),
    [
        ("application/json", None, "json"),
        ("application/json", "UTF-8", "json"),
        ("application/reports+json", None, "json"),
        ("application/x-ndjson", None, "ndjson"),
        ("application/jsonlines", None, "ndjson"),
        ("text/plain", "utf-8", "sniff"),
    ],
)
def test_accepted_media_types(ctype: str, charset: str | None, kind: str) -> None:
    assert media_kind(ctype, charset) == kind


@pytest.mark.parametrize(
    ("ctype", "charset"),
    [
        ("application/x-www-form-urlencoded", None),
        ("multipart/form-data", None),
        ("application/octet-stream", None),  # what aiohttp reports without a header
        ("text/html", None),
        ("application/json", "latin-1"),
    ],
)
def test_other_media_types_are_refused(ctype: str, charset: str | None) -> None:
    with pytest.raises(UnsupportedMediaType):
        media_kind(ctype, charset)


# --- the rate limit --------------------------------------------------------------------------


def test_a_burst_up_to_the_rate_then_one_per_interval() -> None:
    limiter = RateLimiter(60)  # one a second, bursts of 60
    assert all(limiter.admit("a", 0.0) == 0.0 for _ in range(60))
    assert limiter.admit("a", 0.0) == pytest.approx(1.0)
    assert limiter.admit("a", 0.5) == pytest.approx(0.5)
    assert limiter.admit("a", 1.0) == 0.0
    assert limiter.admit("a", 1.0) == pytest.approx(1.0)
    assert limiter.refused == 3


def test_clients_are_limited_apart() -> None:
    limiter = RateLimiter(2)
    assert limiter.admit("a", 0.0) == limiter.admit("a", 0.0) == 0.0
    assert limiter.admit("a", 0.0) == pytest.approx(30.0)
    assert limiter.admit("b", 0.0) == 0.0


def test_refusals_do_not_consume_tokens() -> None:
    limiter = RateLimiter(1)
    assert limiter.admit("a", 0.0) == 0.0
    for t in range(0, 60, 10):
        assert limiter.admit("a", float(t)) > 0
    assert limiter.admit("a", 60.0) == 0.0


def test_the_least_recently_seen_clients_are_forgotten() -> None:
    limiter = RateLimiter(1, max_keys=3)
    for key in "abcd":
        limiter.admit(key, 0.0)
    assert len(limiter) == 3
    assert limiter.admit("a", 0.0) == 0.0  # forgotten: a full bucket again
    assert limiter.admit("d", 0.0) > 0


# --- the [http] config ---------------------------------------------------------------------


def test_defaults() -> None:
    cfg = HttpConfig()
    assert (cfg.enabled, cfg.listen, cfg.service, cfg.max_body_bytes) == (
        False,
        "127.0.0.1:8686",
        "ui",
        262_144,
    )
    assert cfg.host_port == ("127.0.0.1", 8686)
    for name, field in HttpConfig.model_fields.items():
        assert field.description, name


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:8686", ("127.0.0.1", 8686)),
        ("[::1]:9000", ("::1", 9000)),
        (":8686", ("0.0.0.0", 8686)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_listen_forms(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["8686", "host:", "host:99999", "[zz]:80"])
def test_bad_listen_is_a_config_error(listen: str) -> None:
    with pytest.raises(ValidationError):
        HttpConfig(listen=listen)


def test_bad_bounds_and_origins_are_config_errors() -> None:
    with pytest.raises(ValidationError, match="4 times"):
        HttpConfig(max_body_bytes=1024 * 1024, spool_max_bytes=2 * 1024 * 1024)
    with pytest.raises(ValidationError, match="origin"):
        HttpConfig(cors_origins=["https://panel.example.com/"])
    with pytest.raises(ValidationError, match="only one"):
        HttpConfig(tokens_env="X", tokens_file=Path("/t"))


def test_tokens_from_the_environment_or_a_file(tmp_path: Path) -> None:
    good, other = "a" * 20, "b" * 24
    assert HttpConfig().load_tokens({}) == frozenset()
    assert HttpConfig().load_tokens({"FORWARDER_HTTP_TOKENS": f" {good} ,{other},"}) == {
        good,
        other,
    }
    path = tmp_path / "tokens"
    path.write_text(f"{good}\n{other}\n")
    assert HttpConfig(tokens_file=path).load_tokens({}) == {good, other}
    with pytest.raises(TokenError, match="cannot read"):
        HttpConfig(tokens_file=tmp_path / "missing").load_tokens({})
    with pytest.raises(TokenError, match="shorter than 16") as caught:
        HttpConfig().load_tokens({"FORWARDER_HTTP_TOKENS": "short"})
    assert "short" not in str(caught.value).replace("shorter", "")
