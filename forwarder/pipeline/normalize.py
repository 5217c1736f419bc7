"""Turn one raw log line into the one `Event` type (DESIGN.md section 2).

Pure functions: no I/O, no clock reads (`now` is a parameter), never raise on any
input bytes. The result is always storable: `ts` is an aware UTC datetime, every
string is free of NUL characters, `event` and `service` are at most 200 characters,
and `meta` is a plain dict that `orjson.dumps` accepts (also wrapped one level deeper).

Input forms, tried in this order:

* JSON object lines (first non-space byte ``{``): the schema keys plus aliases
  (``_TS_KEYS``, ``_LEVEL_KEYS``, ``_MESSAGE_KEYS``); every other key goes to `meta`,
  merged with the line's own ``"meta"`` object (whose keys win on a clash).
  A line that starts with ``{`` but does not parse, or nests deeper than
  ``MAX_JSON_DEPTH``, becomes a raw event with ``meta.parse_error``.
* Text formats: uvicorn error and access lines, Python logging's default
  ``LEVEL:name:message``, ``asctime LEVEL name message``,
  ``asctime - name - LEVEL - message``, ``[asctime] [pid] [LEVEL] name: message``
  (gunicorn), and logfmt (same keys and aliases as JSON; other values are strings).
* Anything else: ``event = "raw"`` with the whole line as message; a level word at
  the start of the line (``WARNING: ...``, ``[ERROR] ...``) still sets the level.

Levels: strings map case-insensitively (``_LEVEL_WORDS``); numbers 0..7 are syslog
severities and larger numbers follow pino/bunyan (10 trace ... 60 fatal: >= 50 is
ERROR, >= 40 WARNING, else INFO). A level that is not exactly INFO, WARNING or ERROR
is kept in ``meta.original_level`` as written. Timestamps: ISO 8601 in its usual
forms (naive means UTC), Python's ``asctime``, epoch numbers or digit strings in s, ms,
us or ns (by magnitude); anything unparseable becomes `now` plus ``meta.original_ts``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

import orjson

from forwarder.clock import as_utc
from forwarder.event import Event, Level, RawChunk
from forwarder.pipeline.multiline import traceback_facts

__all__ = [
    "EVENT_MAX_CHARS",
    "MAX_JSON_DEPTH",
    "SERVICE_MAX_CHARS",
    "normalize",
    "normalize_chunk",
]

EVENT_MAX_CHARS: Final = 200
SERVICE_MAX_CHARS: Final = 200
# orjson.dumps refuses more than 254 levels; keep a margin so meta still serializes
# when a later stage wraps the event in an envelope.
MAX_JSON_DEPTH: Final = 200
LOGFMT_MAX_PAIRS: Final = 256

_INFO: Final = Level.INFO
_WARNING: Final = Level.WARNING
_ERROR: Final = Level.ERROR

_MISSING: Final[Any] = object()
_TRACEBACK: Final = "Traceback (most recent call last):"
_REPLACEMENT: Final = "\ufffd"
_SPACE_BYTES: Final = b" \t\r\n\f\v"

_TS_KEYS: Final = ("timestamp", "time", "@timestamp", "asctime")  # after "ts"
_LEVEL_KEYS: Final = ("levelname", "severity", "lvl", "loglevel")  # after "level"
_MESSAGE_KEYS: Final = ("msg", "log")  # after "message"

_EXACT_LEVELS: Final[dict[str, Level]] = {"INFO": _INFO, "WARNING": _WARNING, "ERROR": _ERROR}
_LEVEL_WORDS: Final[dict[str, Level]] = {
    **dict.fromkeys(
        ("info", "information", "informational", "notice", "debug", "trace", "verbose"), _INFO
    ),
    **dict.fromkeys(("warn", "warning"), _WARNING),
    **dict.fromkeys(
        (
            "error", "err", "exception", "critical", "crit", "fatal",
            "alert", "emerg", "emergency", "panic", "severe",
        ),
        _ERROR,
    ),
}  # fmt: skip
_LEVEL_WORD_MAX_CHARS: Final = max(map(len, _LEVEL_WORDS)) + 2
# syslog severities 0..7: emerg, alert, crit, err, warning, notice, info, debug
_SYSLOG_LEVELS: Final = (_ERROR, _ERROR, _ERROR, _ERROR, _WARNING, _INFO, _INFO, _INFO)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_TS_MAX_CHARS: Final = 64  # a longer string is no timestamp (meta.original_ts)

# Hot-path names bound once (module globals, not attribute lookups per line).
_loads: Final = orjson.loads
_JSONDecodeError: Final = orjson.JSONDecodeError
_fromisoformat: Final = datetime.fromisoformat
# Event(...) without the Python-level NamedTuple __new__ frame: the same tuple.
_new_event: Final = tuple.__new__
_SCHEMA_KEY_COUNT: Final = 6  # ts, service, level, event, message, meta
_DEPTH_CHECK_BYTES: Final = 2 * MAX_JSON_DEPTH  # a shorter line cannot nest deeper

# Fallbacks for strings datetime.fromisoformat (3.11) rejects: decimal epoch strings
# ("1719837296.5"), then ISO forms with a lower-case "t"/"z" or a "UTC"/"GMT" suffix.
_DECIMAL_RE: Final = re.compile(r"[+-]?\d+(?:\.\d*)?")
_ISO_RE: Final = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d)(?::(\d\d)(?:[.,](\d+))?)?"
    r" ?(?:([Zz]|UTC|GMT)|([+-])(\d\d)(?::?(\d\d))?)?"
)

# -- text formats --------------------------------------------------------------------
_TS_PART: Final = (
    r"(?P<ts>\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?"
    r"(?: ?(?:[Zz]|UTC|GMT|[+-]\d\d:?\d\d))?)"
)
_ANY_LEVEL: Final = (
    r"(?P<level>(?i:DEBUG|INFO|NOTICE|WARNING|WARN|ERROR|ERR|CRITICAL|CRIT|FATAL|TRACE))"
)
# %(asctime)s - %(name)s - %(levelname)s - %(message)s
_ASCTIME_DASH_RE: Final = re.compile(
    _TS_PART + r" - (?P<name>\S+) - " + _ANY_LEVEL + r" *(?: - (?P<msg>.*))?", re.S
)
# %(asctime)s %(levelname)s %(name)s %(message)s   (also "name:" and padded levels)
_ASCTIME_SPACE_RE: Final = re.compile(
    _TS_PART + r" +" + _ANY_LEVEL + r" +(?P<name>[^\s:]+):?(?: (?P<msg>.*))?", re.S
)
# [asctime] [LEVEL] name: msg, and gunicorn's [asctime] [pid] [LEVEL] msg
_BRACKET_RE: Final = re.compile(
    r"\[" + _TS_PART + r"\] +(?:\[(?P<pid>\d+)\] +)?\[" + _ANY_LEVEL
    + r"\] *(?:(?P<name>[^\s:\[\]]+): )?(?P<msg>.*)",
    re.S,
)  # fmt: skip
# uvicorn's level prefix pads "LEVEL:" to 10 columns before the message.
_UVICORN_RE: Final = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL|TRACE):( +)(.*)", re.S)
_UVICORN_ACCESS_RE: Final = re.compile(
    r'(?P<client>\S+) - "(?P<method>[A-Za-z]+) (?P<path>\S+) HTTP/(?P<version>[\d.]+)" '
    r"(?P<status>\d{3})(?P<phrase> .*)?",
    re.S,
)
# %(levelname)s:%(name)s:%(message)s
_PY_DEFAULT_RE: Final = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL):([^:\s]+):(.*)", re.S)
# a bare level word at the start of an otherwise unknown line: "WARN: x", "[ERROR] x"
_LEVEL_PREFIX_RE: Final = re.compile(
    r"\[?(DEBUG|INFO|NOTICE|WARNING|WARN|ERROR|CRITICAL|FATAL|TRACE)\]?[:\s]"
)
# logfmt: key, key=value, key="quoted \" value" (an unclosed quote runs to the end)
_LOGFMT_PAIR_RE: Final = re.compile(
    r'([^\s="]+)(?:(=)(?:"([^"\\]*(?:\\.[^"\\]*)*)"?|([^\s"]*)))?(?:[ \t]+|$)', re.S
)
_LOGFMT_ESCAPE_RE: Final = re.compile(r"\\(.)", re.S)
_LOGFMT_ESCAPES: Final = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


def normalize(line: bytes, service: str, now: datetime, *, truncated: bool = False) -> Event:
    """One raw line (no terminator) as an `Event`; never raises.

    `service` is the source's configured service (a JSON or logfmt line's own non-empty
    "service" string wins); `now` (aware UTC) stands in for a missing timestamp;
    `truncated` marks a line the source cut at max_line_bytes (meta.truncated).
    """
    return _normalize(line, _clean_service(service), now, truncated)


def normalize_chunk(chunk: RawChunk, now: datetime) -> list[Event]:
    """`normalize` over every line of a chunk, in order, flagging its truncated lines.

    With transport facts (`chunk.meta`, `line_meta`, `times`, see `RawChunk`): a line's
    recorded time stands in for a timestamp the line does not carry (instead of `now`),
    and the facts are merged into meta, winning over the line's own keys. A grouped
    record (line_meta "multiline") is normalized by its first line, the other lines
    following in the message; if it holds a Python traceback, the event is an ERROR
    with meta.exc_type and meta.exc_message, and its event is "exception" where the
    first line alone would have been "raw" (a traceback that stands alone).
    """
    service = _clean_service(chunk.service)
    if chunk.line_meta is not None or chunk.times is not None or chunk.meta is not None:
        return _normalize_with_facts(chunk, service, now)
    one = _normalize
    cut = chunk.truncated
    if not cut:
        return [one(line, service, now, False) for line in chunk.lines]
    return [one(line, service, now, i in cut) for i, line in enumerate(chunk.lines)]


def _normalize_with_facts(chunk: RawChunk, service: str, now: datetime) -> list[Event]:
    cut = chunk.truncated
    chunk_meta = chunk.meta
    line_meta = chunk.line_meta
    times = chunk.times
    events: list[Event] = []
    for i, line in enumerate(chunk.lines):
        facts = None if line_meta is None else line_meta[i]
        when = now
        if times is not None:
            recorded = times[i]
            if recorded is not None:
                when = recorded if recorded.tzinfo is UTC else (as_utc(recorded) or now)
        if facts is not None and "multiline" in facts and b"\n" in line:
            event = _grouped(line, service, when, i in cut)
        else:
            event = _normalize(line, service, when, i in cut)
        meta = event.meta  # a dict made for this event: filled in place
        if chunk_meta:
            meta.update(chunk_meta)  # type: ignore[attr-defined]
        if facts:
            meta.update(facts)  # type: ignore[attr-defined]
        events.append(event)
    return events


def _grouped(line: bytes, service: str, now: datetime, truncated: bool) -> Event:
    """A grouped record: its first line makes the event, the rest extends the message."""
    nl = line.find(b"\n")
    event = _normalize(line[:nl], service, now, truncated)
    rest = _decode(line[nl + 1 :])
    message = f"{event.message}\n{rest}" if event.message else rest
    level, name, meta = event.level, event.event, event.meta
    if _TRACEBACK in message:
        exc = traceback_facts(message)
        level = _ERROR
        if name == "raw":
            name = "exception"
        if exc is not None:
            meta["exc_type"], meta["exc_message"] = exc  # type: ignore[index]
    return Event(event.ts, event.service, level, name, message, meta)


def _normalize(line: bytes, service: str, now: datetime, truncated: bool) -> Event:
    head = line[:1]
    if head == b"{" or (head in _SPACE_BYTES and line.lstrip()[:1] == b"{"):
        try:
            obj = _loads(line)
        except _JSONDecodeError:
            obj = _loads_replacing_bad_utf8(line)
            if obj is None:
                return _raw(line, service, now, truncated, "invalid_json")
        if len(line) > _DEPTH_CHECK_BYTES and _deeper_than(obj, MAX_JSON_DEPTH, line):
            return _raw(line, service, now, truncated, "json_too_deep")
        # 92 is the backslash: `int in bytes` is one memchr, several times faster than
        # `b"\\" in line`; only an escaped NUL needs the (rare) scrub.
        if 92 in line and b"\\u0000" in line:
            obj = _scrub(obj)
        if len(obj) == _SCHEMA_KEY_COUNT and not truncated:
            # Fast path, the common line: exactly the six schema keys with plain values
            # ("ts" an ISO 8601 string in UTC, "level" exactly INFO, WARNING or ERROR,
            # "event" and "service" non-empty strings within their caps, "message" a
            # string, "meta" an object). It makes the Event `_from_fields` makes of such
            # an object (tests/unit/test_normalize_properties.py checks they agree) at
            # about half the cost; anything else falls through with `obj` untouched.
            try:
                raw_ts = obj["ts"]
                raw_level = obj["level"]
                message = obj["message"]
                event = obj["event"]
                line_service = obj["service"]
                meta = obj["meta"]
            except KeyError:  # six keys, not these six
                pass
            else:
                if (
                    raw_ts.__class__ is str
                    and raw_level.__class__ is str
                    and message.__class__ is str
                    and event.__class__ is str
                    and line_service.__class__ is str
                    and meta.__class__ is dict
                    and len(raw_ts) <= _TS_MAX_CHARS
                    and 0 < len(event) <= EVENT_MAX_CHARS
                    and 0 < len(line_service) <= SERVICE_MAX_CHARS
                ):
                    level = _EXACT_LEVELS.get(raw_level)
                    if level is not None:
                        try:
                            ts = _fromisoformat(raw_ts)
                        except ValueError:
                            ts = None
                        # An all-digit string parses too, as a naive date: requiring
                        # UTC also leaves the epoch strings to `_parse_ts`.
                        if ts is not None and ts.tzinfo is UTC:
                            return _new_event(
                                Event, (ts, line_service, level, event, message, meta)
                            )
        return _from_fields(obj, service, now, truncated)
    return _from_text(line, service, now, truncated)


# -- JSON and logfmt: a dict of fields -------------------------------------------------


def _from_fields(obj: dict[str, Any], service: str, now: datetime, truncated: bool) -> Event:
    """Build the event from a parsed mapping; `obj` is consumed and becomes meta."""
    pop = obj.pop
    raw_ts = pop("ts", _MISSING)
    if raw_ts is _MISSING:
        raw_ts = _pop_first(obj, _TS_KEYS)
    raw_level = pop("level", _MISSING)
    if raw_level is _MISSING:
        raw_level = _pop_first(obj, _LEVEL_KEYS)
    message = pop("message", _MISSING)
    if message is _MISSING:
        message = _pop_first(obj, _MESSAGE_KEYS)
    event = pop("event", None)
    line_service = pop("service", None)
    inner = pop("meta", _MISSING)

    if inner.__class__ is dict:
        if obj:
            obj.update(inner)
            meta = obj
        else:
            meta = inner
    else:
        if inner is not _MISSING:
            obj["meta"] = inner
        meta = obj

    if raw_ts is _MISSING or raw_ts is None or raw_ts == "":
        ts = now
    else:
        ts = _parse_ts(raw_ts)
        if ts is None:
            meta["original_ts"] = raw_ts
            ts = now

    level = _EXACT_LEVELS.get(raw_level) if raw_level.__class__ is str else None
    if level is None:
        level = _level_of(raw_level, meta)

    if message.__class__ is not str:
        message = "" if message is None or message is _MISSING else _render(message)

    if event.__class__ is not str:
        event = "log" if event is None else _render(event)
    if not event:
        event = "log"
    elif len(event) > EVENT_MAX_CHARS:
        event = event[:EVENT_MAX_CHARS]

    if line_service.__class__ is str and line_service:
        service = line_service[:SERVICE_MAX_CHARS]

    if truncated:
        meta["truncated"] = True
    return _new_event(Event, (ts, service, level, event, message, meta))


def _pop_first(obj: dict[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if key in obj:
            return obj.pop(key)
    return _MISSING


def _render(value: Any) -> str:
    return orjson.dumps(value).decode()


def _loads_replacing_bad_utf8(line: bytes) -> Any:
    """Second chance for a JSON line that failed only because of invalid UTF-8."""
    try:
        line.decode()
    except UnicodeDecodeError:
        try:
            obj = orjson.loads(line.decode("utf-8", "replace"))
        except orjson.JSONDecodeError:
            return None
        return obj if obj.__class__ is dict else None
    return None


def _deeper_than(obj: Any, limit: int, line: bytes) -> bool:
    if line.count(b"[") + line.count(b"{") <= limit:
        return False
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if value.__class__ is dict else value
        for child in children:
            if child.__class__ is dict or child.__class__ is list:
                stack.append((child, depth + 1))
    return False


def _scrub(value: Any) -> Any:
    """Replace NUL characters in every string of a parsed JSON value, keys included."""
    cls = value.__class__
    if cls is str:
        return value.replace("\x00", _REPLACEMENT) if "\x00" in value else value
    if cls is dict:
        return {
            (k.replace("\x00", _REPLACEMENT) if "\x00" in k else k): _scrub(v)
            for k, v in value.items()
        }
    if cls is list:
        return [_scrub(v) for v in value]
    return value


def _clean_service(service: str) -> str:
    if "\x00" in service:
        service = service.replace("\x00", _REPLACEMENT)
    return service[:SERVICE_MAX_CHARS]


# -- levels ----------------------------------------------------------------------------


def _level_of(value: Any, meta: dict[str, Any]) -> Level:
    """Level of a non-exact value; records the original in meta when there is one."""
    if value is _MISSING or value is None or value == "":
        return _INFO
    meta["original_level"] = value
    cls = value.__class__
    if cls is str:
        return _level_word(value)
    if cls is int or cls is float:
        return _level_number(value)
    return _INFO  # bool, list, dict: unknown


def _level_word(word: str) -> Level:
    if len(word) > _LEVEL_WORD_MAX_CHARS:
        return _INFO
    key = word.strip().lower()
    level = _LEVEL_WORDS.get(key)
    if level is not None:
        return level
    if key.isascii() and key.isdigit():
        return _level_number(int(key))
    return _INFO


def _level_number(number: float) -> Level:
    if 0 <= number <= 7 and number == int(number):
        return _SYSLOG_LEVELS[int(number)]
    if number >= 50:
        return _ERROR
    if number >= 40:
        return _WARNING
    return _INFO


# -- timestamps ------------------------------------------------------------------------


def _parse_ts(value: Any) -> datetime | None:
    """An aware UTC datetime from a timestamp value, or None when it is not one."""
    cls = value.__class__
    if cls is str:
        if len(value) > _TS_MAX_CHARS:
            return None
        if value.isdigit():
            try:
                return _from_epoch(int(value))
            except ValueError:  # non-ASCII digits such as "²"
                return None
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            return _parse_ts_fallback(value)
        return dt if dt.tzinfo is UTC else as_utc(dt)
    if cls is int or cls is float:
        return _from_epoch(value)
    return None


def _parse_ts_fallback(text: str) -> datetime | None:
    if _DECIMAL_RE.fullmatch(text):
        return _from_epoch(float(text) if "." in text else int(text))
    m = _ISO_RE.fullmatch(text.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second, fraction, utc, sign, off_h, off_m = m.groups()
    try:
        if utc or not sign:
            tz = UTC
        else:
            offset = timedelta(hours=int(off_h), minutes=int(off_m or 0))
            tz = timezone(-offset if sign == "-" else offset)
        dt = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second or 0),
            int((fraction or "0")[:6].ljust(6, "0")), tz,
        )  # fmt: skip
    except ValueError:
        return None
    return as_utc(dt)


def _from_epoch(number: float) -> datetime | None:
    """Epoch seconds, or ms / us / ns when above 1e11 / 1e14 / 1e17."""
    try:
        if number.__class__ is int:
            size = abs(number)
            if size > 10**17:
                unit = 1_000_000_000
            elif size > 10**14:
                unit = 1_000_000
            elif size > 10**11:
                unit = 1_000
            else:
                return _EPOCH + timedelta(seconds=number)
            seconds, rest = divmod(number, unit)
            return _EPOCH + timedelta(seconds=seconds, microseconds=rest * 1_000_000 // unit)
        size = abs(number)
        if size > 1e17:
            number /= 1e9
        elif size > 1e14:
            number /= 1e6
        elif size > 1e11:
            number /= 1e3
        return _EPOCH + timedelta(seconds=number)
    except (OverflowError, ValueError):
        return None


def _ts_or_now(raw: str, now: datetime, meta: dict[str, Any]) -> datetime:
    ts = _parse_ts(raw)
    if ts is None:
        meta["original_ts"] = raw
        return now
    return ts


# -- text lines ------------------------------------------------------------------------


def _decode(line: bytes) -> str:
    text = line.decode("utf-8", "replace")
    if b"\x00" in line:
        text = text.replace("\x00", _REPLACEMENT)
    if text.endswith("\r"):
        text = text[:-1]
    return text


def _raw(line: bytes, service: str, now: datetime, truncated: bool, error: str) -> Event:
    """A line that looked like JSON but is not usable: kept whole, flagged."""
    meta: dict[str, Any] = {"parse_error": error}
    if truncated:
        meta["truncated"] = True
    return Event(now, service, _INFO, "raw", _decode(line), meta)


def _from_text(line: bytes, service: str, now: datetime, truncated: bool) -> Event:
    text = _decode(line)
    first = text[:1]
    meta: dict[str, Any] = {"truncated": True} if truncated else {}
    event: Event | None = None
    if "0" <= first <= "9":
        event = _asctime_line(text, service, now, meta)
    elif first == "[":
        event = _bracket_line(text, service, now, meta)
    elif "A" <= first <= "Z":
        event = _level_prefixed_line(text, service, now, meta)
    if event is None and (first.isalpha() or first == "_"):
        event = _logfmt_line(text, service, now, truncated)
    if event is not None:
        return event
    level = _INFO
    if first == "[" or "A" <= first <= "Z":
        m = _LEVEL_PREFIX_RE.match(text)
        if m is not None:
            level = _text_level(m[1], meta)
    return Event(now, service, level, "raw", text, meta)


def _text_level(word: str, meta: dict[str, Any]) -> Level:
    level = _EXACT_LEVELS.get(word)
    if level is None:
        meta["original_level"] = word
        level = _LEVEL_WORDS.get(word.lower(), _INFO)
    return level


# Each text-format parser fills `meta` only once its pattern has matched.


def _asctime_line(text: str, service: str, now: datetime, meta: dict[str, Any]) -> Event | None:
    m = _ASCTIME_DASH_RE.fullmatch(text) or _ASCTIME_SPACE_RE.fullmatch(text)
    if m is None:
        return None
    ts, level_word, name, message = m.group("ts", "level", "name", "msg")
    meta["logger"] = name
    return Event(
        _ts_or_now(ts, now, meta), service, _text_level(level_word, meta), "log",
        message or "", meta,
    )  # fmt: skip


def _bracket_line(text: str, service: str, now: datetime, meta: dict[str, Any]) -> Event | None:
    m = _BRACKET_RE.fullmatch(text)
    if m is None:
        return None
    ts, pid, level_word, name, message = m.group("ts", "pid", "level", "name", "msg")
    if name is not None:
        meta["logger"] = name
    if pid is not None:
        meta["pid"] = int(pid)
    return Event(
        _ts_or_now(ts, now, meta), service, _text_level(level_word, meta), "log", message, meta
    )


def _level_prefixed_line(
    text: str, service: str, now: datetime, meta: dict[str, Any]
) -> Event | None:
    m = _UVICORN_RE.match(text)
    if m is not None:
        level_word, pad, message = m.groups()
        if len(level_word) + 1 + len(pad) != 10:
            return None
        level = _text_level(level_word, meta)
        access = _UVICORN_ACCESS_RE.fullmatch(message)
        if access is None:
            meta["logger"] = "uvicorn.error"
            return Event(now, service, level, "log", message, meta)
        client, method, path, version, status, phrase = access.groups()
        meta["logger"] = "uvicorn.access"
        meta["client_addr"] = client
        meta["method"] = method
        meta["path"] = path
        meta["http_version"] = version
        meta["status_code"] = int(status)
        message = f"{method} {path} HTTP/{version} {status}{phrase or ''}"
        return Event(now, service, level, "http.access", message, meta)
    m = _PY_DEFAULT_RE.fullmatch(text)
    if m is None:
        return None
    level_word, name, message = m.groups()
    meta["logger"] = name
    return Event(now, service, _text_level(level_word, meta), "log", message, meta)


def _logfmt_line(text: str, service: str, now: datetime, truncated: bool) -> Event | None:
    match = _LOGFMT_PAIR_RE.match
    fields: dict[str, Any] = {}
    pairs = 0
    pos = 0
    end = len(text)
    if text.find("=", 0, 256) < 1:
        return None  # must start with key=; do not scan a huge blob for pairs
    while pos < end:
        m = match(text, pos)
        if m is None:
            return None
        key, eq, quoted, plain = m.groups()
        if eq is None:
            if pos == 0:
                return None  # must start with key=
            fields[key] = True
        else:
            pairs += 1
            if pairs > LOGFMT_MAX_PAIRS:
                return None
            if quoted is None:
                fields[key] = plain
            elif "\\" in quoted:
                fields[key] = _LOGFMT_ESCAPE_RE.sub(_logfmt_unescape, quoted)
            else:
                fields[key] = quoted
        pos = m.end()
    if pairs < 2:
        return None
    return _from_fields(fields, service, now, truncated)


def _logfmt_unescape(m: re.Match[str]) -> str:
    return _LOGFMT_ESCAPES.get(m[1], m[0])
