"""normalize: one raw line -> one storable Event (DESIGN.md section 2)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from forwarder.event import Event, Level, RawChunk
from forwarder.pipeline.normalize import (
    EVENT_MAX_CHARS,
    MAX_JSON_DEPTH,
    SERVICE_MAX_CHARS,
    normalize,
    normalize_chunk,
)

NOW = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
T0 = datetime(2024, 7, 1, 12, 34, 56, tzinfo=UTC)
R = "\ufffd"


def norm(line: bytes | str, service: str = "cfg", *, truncated: bool = False) -> Event:
    raw = line.encode() if isinstance(line, str) else line
    return normalize(raw, service, NOW, truncated=truncated)


def js(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj)


# -- JSON lines: the schema --------------------------------------------------------------


def test_schema_json_line_maps_every_field() -> None:
    line = (
        b'{"ts":"2024-07-01T12:34:56.789Z","service":"api","level":"WARNING",'
        b'"event":"cache_miss","message":"key not found","meta":{"bot_id":42,"chat_id":"-100"}}'
    )
    assert norm(line) == Event(
        ts=datetime(2024, 7, 1, 12, 34, 56, 789000, tzinfo=UTC),
        service="api",
        level=Level.WARNING,
        event="cache_miss",
        message="key not found",
        meta={"bot_id": 42, "chat_id": "-100"},
    )


def test_json_line_with_only_a_message_gets_defaults() -> None:
    assert norm(b'{"message":"hi"}') == Event(NOW, "cfg", Level.INFO, "log", "hi", {})


def test_empty_json_object_is_an_empty_log_event() -> None:
    assert norm(b"{}") == Event(NOW, "cfg", Level.INFO, "log", "", {})


def test_json_line_with_leading_whitespace_is_parsed_as_json() -> None:
    event = norm(b' \t{"event":"boot","message":"up"}')
    assert (event.event, event.message, event.meta) == ("boot", "up", {})


def test_json_line_ending_in_carriage_return_is_parsed_as_json() -> None:
    assert norm(b'{"event":"boot"}\r').event == "boot"


@pytest.mark.parametrize("value", ["", None, 5, ["x"], {"name": "x"}])
def test_config_service_is_kept_unless_line_service_is_a_non_empty_string(value: Any) -> None:
    event = norm(js({"service": value, "message": "m"}))
    assert event.service == "cfg"
    assert event.meta == {}


def test_line_service_wins_over_config_service() -> None:
    assert norm(js({"service": "worker"})).service == "worker"


def test_service_is_capped_at_its_maximum_length() -> None:
    assert norm(js({"service": "s" * 5000})).service == "s" * SERVICE_MAX_CHARS
    assert norm(b"plain", "c" * 300).service == "c" * SERVICE_MAX_CHARS


@pytest.mark.parametrize("key", ["timestamp", "time", "@timestamp", "asctime"])
def test_timestamp_alias_is_consumed(key: str) -> None:
    event = norm(js({key: "2024-07-01T12:34:56Z", "message": "m"}))
    assert event.ts == T0
    assert event.meta == {}


def test_ts_wins_over_aliases_which_then_stay_in_meta() -> None:
    event = norm(js({"time": "yesterday", "ts": "2024-07-01T12:34:56Z"}))
    assert event.ts == T0
    assert event.meta == {"time": "yesterday"}


def test_first_timestamp_alias_in_order_wins() -> None:
    event = norm(js({"asctime": "x", "@timestamp": "2024-07-01T12:34:56Z", "time": 5}))
    assert event.ts == datetime(1970, 1, 1, 0, 0, 5, tzinfo=UTC)
    assert event.meta == {"asctime": "x", "@timestamp": "2024-07-01T12:34:56Z"}


@pytest.mark.parametrize("key", ["levelname", "severity", "lvl", "loglevel"])
def test_level_alias_is_consumed(key: str) -> None:
    event = norm(js({key: "ERROR"}))
    assert event.level is Level.ERROR
    assert event.meta == {}


def test_level_wins_over_level_aliases_which_then_stay_in_meta() -> None:
    event = norm(js({"severity": "debug", "level": "ERROR"}))
    assert event.level is Level.ERROR
    assert event.meta == {"severity": "debug"}


@pytest.mark.parametrize("key", ["msg", "log"])
def test_message_alias_is_consumed(key: str) -> None:
    event = norm(js({key: "hello"}))
    assert event.message == "hello"
    assert event.meta == {}


def test_message_wins_over_msg_which_then_stays_in_meta() -> None:
    event = norm(js({"msg": "short", "message": "long"}))
    assert event.message == "long"
    assert event.meta == {"msg": "short"}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ({"a": 1, "b": [1, "x"]}, '{"a":1,"b":[1,"x"]}'),
        ([1, 2], "[1,2]"),
        (42, "42"),
        (1.5, "1.5"),
        (True, "true"),
        (None, ""),
    ],
)
def test_non_string_message_is_rendered_as_json(value: Any, text: str) -> None:
    assert norm(js({"message": value})).message == text


@pytest.mark.parametrize("value", [None, ""])
def test_missing_or_empty_event_becomes_log(value: Any) -> None:
    assert norm(js({"event": value})).event == "log"


def test_non_string_event_is_rendered_as_json() -> None:
    assert norm(js({"event": 7})).event == "7"
    assert norm(js({"event": {"k": "v"}})).event == '{"k":"v"}'


def test_event_is_capped_at_its_maximum_length() -> None:
    assert norm(js({"event": "e" * 1000})).event == "e" * EVENT_MAX_CHARS


def test_keys_outside_the_schema_go_to_meta() -> None:
    event = norm(js({"message": "m", "user_id": 7, "logger": "app", "name": "n", "tags": ["a"]}))
    assert event.meta == {"user_id": 7, "logger": "app", "name": "n", "tags": ["a"]}
    assert event.event == "log"


def test_extra_keys_merge_with_the_line_meta_whose_keys_win() -> None:
    event = norm(js({"a": 1, "b": 2, "meta": {"b": 3, "c": {"deep": [1, {"x": None}]}}}))
    assert event.meta == {"a": 1, "b": 3, "c": {"deep": [1, {"x": None}]}}


@pytest.mark.parametrize("value", ["text", 5, [1, 2], None])
def test_non_dict_meta_is_kept_under_the_meta_key(value: Any) -> None:
    event = norm(js({"a": 1, "meta": value}))
    assert event.meta == {"a": 1, "meta": value}


@pytest.mark.parametrize(
    "line", [b"[1, 2]", b'"a string"', b"42", b"null", b"true", b"  [1]"]
)  # fmt: skip
def test_json_value_that_is_not_an_object_is_a_raw_line(line: bytes) -> None:
    assert norm(line) == Event(NOW, "cfg", Level.INFO, "raw", line.decode(), {})


@pytest.mark.parametrize("line", [b"{", b"{not json}", b'{"a":1,}', b'{"a":NaN}', b'{"a":1} x'])
def test_invalid_json_object_is_kept_raw_and_flagged(line: bytes) -> None:
    assert norm(line) == Event(
        NOW, "cfg", Level.INFO, "raw", line.decode(), {"parse_error": "invalid_json"}
    )


def test_lone_surrogate_escape_makes_the_line_raw() -> None:
    line = b'{"message":"bad \\ud800 here"}'
    event = norm(line)
    assert (event.event, event.message) == ("raw", line.decode())
    assert event.meta == {"parse_error": "invalid_json"}


def test_invalid_utf8_inside_a_json_string_is_replaced_and_the_line_still_parses() -> None:
    event = norm(b'{"message":"caf\xe9 \xff","k\xfe":"v"}')
    assert event.message == f"caf{R} {R}"
    assert event.meta == {f"k{R}": "v"}
    assert event.event == "log"


def test_json_nested_deeper_than_the_limit_is_kept_raw() -> None:
    deep = b'{"a":' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}"
    event = norm(deep)
    assert (event.event, event.meta) == ("raw", {"parse_error": "json_too_deep"})


def test_json_nested_up_to_the_limit_is_parsed_and_still_serializable() -> None:
    depth = MAX_JSON_DEPTH - 1
    line = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    event = norm(line)
    assert event.event == "log"
    orjson.dumps({"wrapped": {"meta": event.meta}})


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    event = norm(js({"message": "[" * 5000 + "{" * 5000}))
    assert event.message == "[" * 5000 + "{" * 5000


# -- levels ------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["INFO", "WARNING", "ERROR"])
def test_exact_level_is_kept_without_original(word: str) -> None:
    event = norm(js({"level": word}))
    assert event.level == Level(word)
    assert event.meta == {}


@pytest.mark.parametrize(
    ("word", "level"),
    [
        ("info", Level.INFO),
        ("Information", Level.INFO),
        ("informational", Level.INFO),
        ("NOTICE", Level.INFO),
        ("DEBUG", Level.INFO),
        ("trace", Level.INFO),
        ("Verbose", Level.INFO),
        ("warn", Level.WARNING),
        ("WARN", Level.WARNING),
        ("warning", Level.WARNING),
        ("error", Level.ERROR),
        ("err", Level.ERROR),
        ("Exception", Level.ERROR),
        ("CRITICAL", Level.ERROR),
        ("crit", Level.ERROR),
        ("FATAL", Level.ERROR),
        ("alert", Level.ERROR),
        ("emerg", Level.ERROR),
        ("emergency", Level.ERROR),
        ("panic", Level.ERROR),
        ("SEVERE", Level.ERROR),
        (" warn ", Level.WARNING),
    ],
)
def test_level_word_maps_case_insensitively_keeping_the_original(word: str, level: Level) -> None:
    event = norm(js({"level": word}))
    assert event.level is level
    assert event.meta == {"original_level": word}


@pytest.mark.parametrize("value", ["bogus", "   ", "x" * 1000, True, False, ["ERROR"], {"a": 1}])
def test_unknown_level_is_info_keeping_the_original(value: Any) -> None:
    event = norm(js({"level": value}))
    assert event.level is Level.INFO
    assert event.meta == {"original_level": value}


@pytest.mark.parametrize("value", [None, ""])
def test_missing_level_is_info_without_original(value: Any) -> None:
    assert norm(js({"level": value})).level is Level.INFO
    assert norm(js({"level": value})).meta == {}
    assert norm(js({"message": "no level"})).level is Level.INFO


@pytest.mark.parametrize(
    ("number", "level"),
    [
        # pino / bunyan: 10 trace, 20 debug, 30 info, 40 warn, 50 error, 60 fatal
        (10, Level.INFO),
        (20, Level.INFO),
        (30, Level.INFO),
        (35, Level.INFO),
        (40, Level.WARNING),
        (45, Level.WARNING),
        (50, Level.ERROR),
        (60, Level.ERROR),
        (100, Level.ERROR),
        (30.0, Level.INFO),
        (40.5, Level.WARNING),
        (-1, Level.INFO),
        # syslog severities 0..7
        (0, Level.ERROR),
        (1, Level.ERROR),
        (2, Level.ERROR),
        (3, Level.ERROR),
        (4, Level.WARNING),
        (5, Level.INFO),
        (6, Level.INFO),
        (7, Level.INFO),
        (3.0, Level.ERROR),
        (8, Level.INFO),
    ],
)
def test_numeric_level_follows_syslog_below_8_and_pino_above(number: float, level: Level) -> None:
    event = norm(js({"level": number}))
    assert event.level is level
    assert event.meta == {"original_level": number}


@pytest.mark.parametrize(
    ("text", "level"), [("50", Level.ERROR), ("3", Level.ERROR), ("30", Level.INFO)]
)
def test_numeric_level_string_maps_like_a_number(text: str, level: Level) -> None:
    event = norm(js({"level": text}))
    assert event.level is level
    assert event.meta == {"original_level": text}


# -- timestamps --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-07-01T12:34:56Z", T0),
        ("2024-07-01T12:34:56.789Z", T0.replace(microsecond=789000)),
        ("2024-07-01T14:34:56+02:00", T0),
        ("2024-07-01T14:34:56+0200", T0),
        ("2024-07-01T10:34:56-02:00", T0),
        ("2024-07-01T12:34:56.123456789Z", T0.replace(microsecond=123456)),
        ("2024-07-01T14:34:56.123456789+02:00", T0.replace(microsecond=123456)),
        ("2024-07-01T12:34:56.1Z", T0.replace(microsecond=100000)),
        ("2024-07-01 12:34:56Z", T0),
        ("2024-07-01T12:34:56", T0),
        ("2024-07-01 12:34:56.5", T0.replace(microsecond=500000)),
        ("2024-07-01 12:34:56,789", T0.replace(microsecond=789000)),
        ("2024-07-01T12:34:56.789z", T0.replace(microsecond=789000)),
        ("2024-07-01 12:34:56 UTC", T0),
        ("2024-07-01 14:34:56 +0200", T0),
        ("2024-07-01T12:34:56.1234567890123Z", T0.replace(microsecond=123456)),
        (1719837296, T0),
        (1719837296.25, T0.replace(microsecond=250000)),
        (1719837296789, T0.replace(microsecond=789000)),
        (1719837296789.0, T0.replace(microsecond=789000)),
        (1719837296789123, T0.replace(microsecond=789123)),
        (1719837296789123456, T0.replace(microsecond=789123)),
        ("1719837296", T0),
        ("1719837296.5", T0.replace(microsecond=500000)),
        ("1719837296789", T0.replace(microsecond=789000)),
        (0, datetime(1970, 1, 1, tzinfo=UTC)),
    ],
)
def test_timestamp_forms_become_aware_utc(value: Any, expected: datetime) -> None:
    event = norm(js({"ts": value}))
    assert event.ts == expected
    assert event.ts.utcoffset() == timedelta(0)
    assert event.ts.tzinfo is UTC
    assert event.meta == {}


@pytest.mark.parametrize(
    "value",
    [
        "yesterday",
        "2024-13-01T00:00:00",
        "2024-07-01T25:00:00Z",
        "0000-01-01T00:00:00",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "1" * 40,
        "t" * 100,
        1e30,
        -1e30,
        1e40,
        1.7e308,
        True,
        ["2024-07-01"],
        {"sec": 1},
    ],
)
def test_unusable_timestamp_becomes_now_keeping_the_original(value: Any) -> None:
    event = norm(js({"ts": value, "message": "m"}))
    assert event.ts == NOW
    assert event.meta == {"original_ts": value}


@pytest.mark.parametrize("line", [b'{"message":"m"}', b'{"ts":null}', b'{"ts":""}'])
def test_absent_timestamp_becomes_now_without_original(line: bytes) -> None:
    event = norm(line)
    assert event.ts == NOW
    assert event.meta == {}


def test_offset_timestamp_is_converted_not_relabelled() -> None:
    ts = norm(js({"ts": "2024-07-01T12:34:56-05:30"})).ts
    assert ts == datetime(2024, 7, 1, 12, 34, 56, tzinfo=timezone(timedelta(hours=-5, minutes=-30)))
    assert (ts.hour, ts.minute, ts.tzinfo) == (18, 4, UTC)


# -- lines with exactly the six schema keys (the common form, also the fast path) --------

SCHEMA = {
    "ts": "2024-07-01T12:34:56Z",
    "service": "api",
    "level": "INFO",
    "event": "e",
    "message": "m",
    "meta": {"k": 1},
}


def full(**changes: Any) -> bytes:
    return js({**SCHEMA, **changes})


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, Event(T0, "api", Level.INFO, "e", "m", {"k": 1})),
        ({"ts": "2024-07-01T14:34:56+02:00"}, Event(T0, "api", Level.INFO, "e", "m", {"k": 1})),
        ({"ts": "2024-07-01T12:34:56"}, Event(T0, "api", Level.INFO, "e", "m", {"k": 1})),
        ({"ts": "1719837296"}, Event(T0, "api", Level.INFO, "e", "m", {"k": 1})),
        ({"ts": "20240701"}, Event(  # epoch seconds, not a basic-format ISO date
            datetime(1970, 8, 23, 6, 25, 1, tzinfo=UTC), "api", Level.INFO, "e", "m", {"k": 1}
        )),
        ({"ts": 1719837296}, Event(T0, "api", Level.INFO, "e", "m", {"k": 1})),
        ({"ts": "2024-07-01 12:34:56 UTC"}, Event(T0, "api", Level.INFO, "e", "m", {"k": 1})),
        ({"ts": ""}, Event(NOW, "api", Level.INFO, "e", "m", {"k": 1})),
        ({"ts": None}, Event(NOW, "api", Level.INFO, "e", "m", {"k": 1})),
        ({"ts": "2024-07-01T12:34:56." + "0" * 44 + "Z"}, Event(
            NOW, "api", Level.INFO, "e", "m",
            {"k": 1, "original_ts": "2024-07-01T12:34:56." + "0" * 44 + "Z"},
        )),
        ({"ts": "0001-01-01T00:00:00+01:00"}, Event(
            NOW, "api", Level.INFO, "e", "m", {"k": 1, "original_ts": "0001-01-01T00:00:00+01:00"}
        )),
        ({"level": "WARNING"}, Event(T0, "api", Level.WARNING, "e", "m", {"k": 1})),
        ({"level": "warn"}, Event(
            T0, "api", Level.WARNING, "e", "m", {"k": 1, "original_level": "warn"}
        )),
        ({"level": 50}, Event(T0, "api", Level.ERROR, "e", "m", {"k": 1, "original_level": 50})),
        ({"level": ""}, Event(T0, "api", Level.INFO, "e", "m", {"k": 1})),
        ({"event": ""}, Event(T0, "api", Level.INFO, "log", "m", {"k": 1})),
        ({"event": "x" * 201}, Event(T0, "api", Level.INFO, "x" * 200, "m", {"k": 1})),
        ({"event": 7}, Event(T0, "api", Level.INFO, "7", "m", {"k": 1})),
        ({"service": ""}, Event(T0, "cfg", Level.INFO, "e", "m", {"k": 1})),
        ({"service": "s" * 201}, Event(T0, "s" * 200, Level.INFO, "e", "m", {"k": 1})),
        ({"service": 5}, Event(T0, "cfg", Level.INFO, "e", "m", {"k": 1})),
        ({"message": None}, Event(T0, "api", Level.INFO, "e", "", {"k": 1})),
        ({"message": {"a": 1}}, Event(T0, "api", Level.INFO, "e", '{"a":1}', {"k": 1})),
        ({"meta": {}}, Event(T0, "api", Level.INFO, "e", "m", {})),
        ({"meta": [1]}, Event(T0, "api", Level.INFO, "e", "m", {"meta": [1]})),
        ({"meta": None}, Event(T0, "api", Level.INFO, "e", "m", {"meta": None})),
        ({"message": "a\x00b", "meta": {"k\x00": "v\x00"}}, Event(
            T0, "api", Level.INFO, "e", f"a{R}b", {f"k{R}": f"v{R}"}
        )),
    ],
)  # fmt: skip
def test_full_schema_line(changes: dict[str, Any], expected: Event) -> None:
    event = norm(full(**changes))
    assert event == expected
    assert type(event) is Event
    assert event.ts.tzinfo is UTC


def test_six_keys_other_than_the_schema_keys_follow_the_aliases() -> None:
    line = js({"time": "2024-07-01T12:34:56Z", "service": "api", "levelname": "ERROR",
               "event": "e", "msg": "m", "meta": {"k": 1}})  # fmt: skip
    assert norm(line) == Event(T0, "api", Level.ERROR, "e", "m", {"k": 1})


def test_full_schema_line_truncated_is_flagged() -> None:
    assert norm(full(), truncated=True) == Event(
        T0, "api", Level.INFO, "e", "m", {"k": 1, "truncated": True}
    )


def test_full_schema_lines_do_not_share_their_meta() -> None:
    first, second = norm(full()), norm(full())
    assert first.meta == second.meta
    assert first.meta is not second.meta


# -- text formats ------------------------------------------------------------------------


def test_python_default_format_is_parsed() -> None:
    assert norm("ERROR:app.db:connection lost") == Event(
        NOW, "cfg", Level.ERROR, "log", "connection lost", {"logger": "app.db"}
    )


def test_python_default_format_keeps_colons_in_the_message() -> None:
    assert norm("WARNING:root:retry in 5s: a:b") == Event(
        NOW, "cfg", Level.WARNING, "log", "retry in 5s: a:b", {"logger": "root"}
    )


def test_python_default_format_debug_keeps_the_original_level() -> None:
    assert norm("DEBUG:app:x") == Event(
        NOW, "cfg", Level.INFO, "log", "x", {"logger": "app", "original_level": "DEBUG"}
    )


def test_python_dash_format_is_parsed() -> None:
    assert norm("2024-07-01 12:34:56,789 - app.worker - WARNING - slow cycle") == Event(
        T0.replace(microsecond=789000), "cfg", Level.WARNING, "log", "slow cycle",
        {"logger": "app.worker"},
    )  # fmt: skip


def test_python_space_format_is_parsed() -> None:
    assert norm("2024-07-01 12:34:56,789 CRITICAL app.worker queue is full") == Event(
        T0.replace(microsecond=789000), "cfg", Level.ERROR, "log", "queue is full",
        {"logger": "app.worker", "original_level": "CRITICAL"},
    )  # fmt: skip


def test_python_space_format_accepts_padded_level_and_name_colon() -> None:
    assert norm("2024-07-01T12:34:56Z INFO     app.api: started") == Event(
        T0, "cfg", Level.INFO, "log", "started", {"logger": "app.api"}
    )


def test_python_format_with_unparseable_date_keeps_it_as_original_ts() -> None:
    event = norm("2024-13-45 12:34:56,789 - app - ERROR - boom")
    assert event == Event(
        NOW, "cfg", Level.ERROR, "log", "boom",
        {"logger": "app", "original_ts": "2024-13-45 12:34:56,789"},
    )  # fmt: skip


def test_bracket_format_with_logger_is_parsed() -> None:
    assert norm("[2024-07-01 12:34:56,789] [error] app.db: connection lost") == Event(
        T0.replace(microsecond=789000), "cfg", Level.ERROR, "log", "connection lost",
        {"logger": "app.db", "original_level": "error"},
    )  # fmt: skip


def test_gunicorn_format_is_parsed() -> None:
    assert norm("[2024-07-01 14:34:56 +0200] [17] [INFO] Booting worker with pid: 17") == Event(
        T0, "cfg", Level.INFO, "log", "Booting worker with pid: 17", {"pid": 17}
    )


@pytest.mark.parametrize(
    ("line", "level", "message"),
    [
        ("INFO:     Started server process [1]", Level.INFO, "Started server process [1]"),
        ("ERROR:    Exception in ASGI application", Level.ERROR, "Exception in ASGI application"),
        ("WARNING:  StatReload detected changes", Level.WARNING, "StatReload detected changes"),
        ("CRITICAL: out of file descriptors", Level.ERROR, "out of file descriptors"),
    ],
)
def test_uvicorn_error_log_line_is_parsed(line: str, level: Level, message: str) -> None:
    event = norm(line)
    assert (event.ts, event.level, event.event, event.message) == (NOW, level, "log", message)
    assert event.meta["logger"] == "uvicorn.error"


def test_uvicorn_access_line_is_parsed() -> None:
    line = 'INFO:     127.0.0.1:54321 - "GET /items/5?x=1 HTTP/1.1" 200 OK'
    assert norm(line) == Event(
        NOW, "cfg", Level.INFO, "http.access", "GET /items/5?x=1 HTTP/1.1 200 OK",
        {
            "logger": "uvicorn.access", "client_addr": "127.0.0.1:54321", "method": "GET",
            "path": "/items/5?x=1", "http_version": "1.1", "status_code": 200,
        },
    )  # fmt: skip


def test_uvicorn_access_line_with_server_error_keeps_the_prefix_level() -> None:
    event = norm('INFO:     10.0.0.2:1 - "POST /x HTTP/2" 503')
    assert (event.level, event.message) == (Level.INFO, "POST /x HTTP/2 503")
    assert event.meta["status_code"] == 503
    assert event.meta["http_version"] == "2"


def test_level_word_without_uvicorn_padding_is_a_raw_line_with_that_level() -> None:
    assert norm("ERROR: disk full") == Event(NOW, "cfg", Level.ERROR, "raw", "ERROR: disk full", {})


@pytest.mark.parametrize(
    ("line", "level", "meta"),
    [
        ("[ERROR] something broke", Level.ERROR, {}),
        ("WARN something odd", Level.WARNING, {"original_level": "WARN"}),
        ("FATAL: out of memory", Level.ERROR, {"original_level": "FATAL"}),
        ("error: lower case is not a level prefix", Level.INFO, {}),
        ("INFORMATION is not a level word", Level.INFO, {}),
    ],
)
def test_raw_line_starting_with_a_level_word_takes_that_level(
    line: str, level: Level, meta: dict[str, Any]
) -> None:
    assert norm(line) == Event(NOW, "cfg", level, "raw", line, meta)


def test_logfmt_line_is_parsed_with_quoted_values() -> None:
    line = r'level=warn msg="disk \"/var\" at 91%" user_id=42 ts=2024-07-01T12:34:56Z path=/x'
    assert norm(line) == Event(
        T0, "cfg", Level.WARNING, "log", 'disk "/var" at 91%',
        {"user_id": "42", "path": "/x", "original_level": "warn"},
    )  # fmt: skip


def test_logfmt_maps_aliases_event_and_service() -> None:
    line = 'time=1719837296 severity=ERROR message="a b" event=job.failed service=billing x='
    assert norm(line) == Event(T0, "billing", Level.ERROR, "job.failed", "a b", {"x": ""})


def test_logfmt_escapes_and_bare_keys() -> None:
    line = r'a="tab\there\\ \n \q" b=1 debug'
    event = norm(line)
    assert event.meta == {"a": "tab\there\\ \n \\q", "b": "1", "debug": True}
    assert (event.event, event.message, event.level) == ("log", "", Level.INFO)


def test_logfmt_unclosed_quote_runs_to_the_end_of_the_line() -> None:
    event = norm('level=info msg="cut here', truncated=True)
    assert event.message == "cut here"
    assert event.meta == {"original_level": "info", "truncated": True}


@pytest.mark.parametrize(
    "line", ["key=value only one pair", "hello level=info msg=x", "a=1 b=2 =3", 'a=1 b=x"y']
)
def test_text_that_is_not_logfmt_is_raw(line: str) -> None:
    assert norm(line) == Event(NOW, "cfg", Level.INFO, "raw", line, {})


def test_plain_text_is_a_raw_event() -> None:
    assert norm("something happened") == Event(
        NOW, "cfg", Level.INFO, "raw", "something happened", {}
    )


def test_empty_line_is_an_empty_raw_event() -> None:
    assert norm(b"") == Event(NOW, "cfg", Level.INFO, "raw", "", {})


def test_trailing_carriage_return_is_dropped_from_text() -> None:
    assert norm(b"ERROR:app:boom\r").message == "boom"
    assert norm(b"plain\r").message == "plain"


def test_raw_events_do_not_share_their_meta() -> None:
    assert norm("a").meta is not norm("b").meta


# -- truncated ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [b"plain", b'{"message":"m"}', b"ERROR:a:b", b"a=1 b=2", b'{"message":"cut', b"WARN x"],
)
def test_truncated_flag_is_recorded_in_meta(line: bytes) -> None:
    assert norm(line, truncated=True).meta["truncated"] is True
    assert "truncated" not in norm(line).meta


def test_truncated_json_line_is_raw_flagged_both_ways() -> None:
    event = norm(b'{"message":"cut he', truncated=True)
    assert event == Event(
        NOW, "cfg", Level.INFO, "raw", '{"message":"cut he',
        {"parse_error": "invalid_json", "truncated": True},
    )  # fmt: skip


# -- storable: NUL, invalid UTF-8, huge lines -------------------------------------------


def test_nul_bytes_in_a_text_line_are_replaced() -> None:
    assert norm(b"a\x00b\x00").message == f"a{R}b{R}"
    assert norm(b"ERROR:app\x00x:m\x00").meta == {"logger": f"app{R}x"}


def test_raw_nul_byte_in_a_json_line_makes_it_raw_and_replaced() -> None:
    event = norm(b'{"message":"a\x00b"}')
    assert event.message == f'{{"message":"a{R}b"}}'
    assert event.meta == {"parse_error": "invalid_json"}


def test_escaped_nul_in_json_is_replaced_everywhere_keys_included() -> None:
    line = (
        b'{"message":"m\\u0000","event":"e\\u0000","service":"s\\u0000","level":"x\\u0000",'
        b'"k\\u0000":"v\\u0000","meta":{"n":[{"d\\u0000":"\\u0000"}]},"ts":"\\u0000"}'
    )
    assert norm(line) == Event(
        NOW, f"s{R}", Level.INFO, f"e{R}", f"m{R}",
        {
            f"k{R}": f"v{R}", "n": [{f"d{R}": R}],
            "original_level": f"x{R}", "original_ts": R,
        },
    )  # fmt: skip


def test_escaped_nul_in_a_non_string_message_is_replaced() -> None:
    assert norm(b'{"message":{"a":"\\u0000"}}').message == f'{{"a":"{R}"}}'


def test_escaped_backslash_u0000_text_is_left_alone() -> None:
    assert norm(b'{"message":"\\\\u0000"}').message == "\\u0000"


def test_nul_in_the_configured_service_is_replaced() -> None:
    assert norm(b"x", "a\x00b").service == f"a{R}b"


def test_invalid_utf8_in_text_is_replaced() -> None:
    assert norm(b"caf\xc3 \xff\xfe end").message == f"caf{R} {R}{R} end"


@pytest.mark.parametrize(
    "line",
    [
        b"x" * 10_000_000,
        b"{" + b"x" * 10_000_000,
        b'{"message":"' + b"y" * 10_000_000 + b'"}',
        b"level=info msg=" + b"z" * 10_000_000,
        b"a=b " * 2_500_000,
        b"INFO:     " + b"w" * 10_000_000,
        b"2024-07-01 12:34:56,789 " + b"1" * 10_000_000,
        b"[" * 10_000_000,
        b"\x00\xff" * 5_000_000,
    ],
    ids=[
        "raw",
        "bad-json",
        "json",
        "logfmt",
        "many-pairs",
        "uvicorn",
        "asctime",
        "brackets",
        "nul",
    ],
)
def test_ten_megabyte_line_is_normalized_quickly(line: bytes) -> None:
    started = time.perf_counter()
    event = norm(line)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0
    assert len(event.message) >= 5_000_000
    assert "\x00" not in event.message


# -- normalize_chunk ---------------------------------------------------------------------


def test_normalize_chunk_maps_every_line_in_order_flagging_truncated_ones() -> None:
    lines = [b"first", b'{"message":"second","service":"own"}', b"third"]
    chunk = RawChunk(source="file:a", service="api", lines=lines, truncated=frozenset({1}))
    assert normalize_chunk(chunk, NOW) == [
        Event(NOW, "api", Level.INFO, "raw", "first", {}),
        Event(NOW, "own", Level.INFO, "log", "second", {"truncated": True}),
        Event(NOW, "api", Level.INFO, "raw", "third", {}),
    ]


def test_normalize_chunk_equals_normalize_per_line() -> None:
    lines = [b"ERROR:a:b", b"a=1 b=2", b'{"level":50}', b"\xff"]
    chunk = RawChunk(source="s", service="svc", lines=lines, truncated=frozenset({0, 3}))
    expected = [
        normalize(line, "svc", NOW, truncated=i in chunk.truncated) for i, line in enumerate(lines)
    ]
    assert normalize_chunk(chunk, NOW) == expected


def test_normalize_chunk_of_no_lines_is_empty() -> None:
    assert normalize_chunk(RawChunk(source="s", service="svc", lines=[]), NOW) == []
