"""HTTP intake: browser errors (and any client's events) into the pipeline, durably.

Three parts:

* `parse_body` (pure): a JSON object, a JSON array of objects, or NDJSON into clean
  JSON lines, one per record. Each record needs `message` (a string) and `level` (a
  level word, case-insensitive); `event`, `ts` and `meta` are optional; any other key
  goes into meta (meta's own keys win). The service is never the client's: a
  `service` key is dropped and the configured one written. The first bad record makes
  the whole body an `IntakeError` naming its index and field, so nothing from that
  request is stored.
* `RateLimiter` (pure): a token bucket per client, `now` passed in.
* `Intake`: the component. `accept` appends the lines to a disk spool
  (`sinks/spool.py`, data_dir/spool/http-<source_name>) and returns once they are
  durable (the 202); `run` is a `Source` for the runtime: it reads the spool from the
  committed position (`SpoolFeeder`, sources/spooled.py) and puts RawChunks carrying
  the spool position on the raw queue, so the sink commits the rows and the spool
  checkpoint in one transaction.
  After a restart the spool is replayed from that checkpoint; committed segments are
  deleted. On stop, new requests are refused (503), appends in flight finish, the
  rest of the spool is fed, and `run` returns.

User identifiers (meta.user_id) are pseudonymized by the normalize stage like every
other source's; until a batch commits, the spool on disk holds them as received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from forwarder.clock import Clock
from forwarder.event import Position
from forwarder.http_config import HttpConfig
from forwarder.pipeline.multiline import PassThrough
from forwarder.sinks.spool import (
    FsyncMode,
    SpoolFull,
    SpoolPosition,
    SpoolRecord,
)
from forwarder.sources.spooled import CommittedReader, SpoolFeeder, open_spool, resume_position

__all__ = [
    "MAX_META_DEPTH",
    "Intake",
    "IntakeClosed",
    "IntakeError",
    "RateLimiter",
    "UnsupportedMediaType",
    "media_kind",
    "parse_body",
    "spool_folder",
    "validate_record",
]

log = logging.getLogger(__name__)

COMPONENT = "intake"
STREAM: Final = "http"  # SpoolRecord.stream of every intake record
MAX_META_DEPTH: Final = 32  # nesting of meta (and of extra keys folded into it)
EVENT_MAX_CHARS: Final = 200
USER_AGENT_MAX_CHARS: Final = 512
# Timestamps outside these bounds are a client bug (a clock at 0, ms taken for s...).
TS_MIN: Final = datetime(2000, 1, 1, tzinfo=UTC)
TS_MAX: Final = datetime(2100, 1, 1, tzinfo=UTC)

_LEVELS: Final[dict[str, str]] = {
    **dict.fromkeys(("info", "information", "log", "notice", "debug", "trace"), "INFO"),
    **dict.fromkeys(("warn", "warning"), "WARNING"),
    **dict.fromkeys(("error", "err", "exception", "critical", "fatal"), "ERROR"),
}
_JSON_TYPES: Final = frozenset({"application/json"})
_NDJSON_TYPES: Final = frozenset(
    {
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonlines",
        "application/x-jsonlines",
        "application/jsonl",
    }
)
# sendBeacon can only send a CORS-safelisted type without a preflight: text/plain.
_SNIFF_TYPES: Final = frozenset({"text/plain"})
_RESERVED: Final = frozenset({"message", "level", "event", "ts", "meta", "service"})


# --- parsing and validation (pure) ----------------------------------------------------------


class IntakeError(ValueError):
    """A body that cannot be accepted: the message says what is wrong, and where."""

    def __init__(self, message: str, *, index: int | None = None, field: str | None = None):
        self.index = index
        self.field = field
        where = ""
        if index is not None:
            where = f"record {index}" + (f", field {field!r}" if field else "") + ": "
        super().__init__(where + message)

    def as_json(self) -> dict[str, Any]:
        return {"error": str(self), "index": self.index, "field": self.field}


class UnsupportedMediaType(ValueError):
    """A Content-Type the intake does not read (HTTP 415)."""


def media_kind(content_type: str, charset: str | None) -> str:
    """ "json", "ndjson" or "sniff" for a request's media type; UnsupportedMediaType else."""
    if charset is not None and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"charset {charset!r}: send UTF-8")
    ctype = content_type.lower()
    if ctype in _JSON_TYPES or (ctype.startswith("application/") and ctype.endswith("+json")):
        return "json"
    if ctype in _NDJSON_TYPES:
        return "ndjson"
    if ctype in _SNIFF_TYPES:
        return "sniff"
    accepted = ", ".join(sorted(_JSON_TYPES | _NDJSON_TYPES | _SNIFF_TYPES))
    raise UnsupportedMediaType(
        f"content type {content_type or '(none)'!r} is not accepted; use one of {accepted}"
    )


def parse_body(body: bytes, kind: str, *, user_agent: str | None = None) -> list[bytes]:
    """The body's records as clean JSON lines (the form the normalize stage reads).

    `kind` comes from `media_kind`; "sniff" reads a body starting with `[` or holding
    one JSON value as JSON, anything else as NDJSON. `user_agent` becomes
    meta.user_agent of records that do not carry one.
    """
    if kind == "sniff":
        kind = _sniff(body)
    if kind == "json":
        value = _loads(body, None)
        items = value if isinstance(value, list) else [value]
    elif kind == "ndjson":
        items = []
        for line_no, line in enumerate(body.split(b"\n"), start=1):
            if line.strip():
                items.append(_loads(line, len(items), line_no))
    else:
        raise ValueError(f"unknown body kind {kind!r}")
    if user_agent is not None:
        user_agent = user_agent[:USER_AGENT_MAX_CHARS]
    return [
        orjson.dumps(validate_record(item, i, user_agent=user_agent))
        for i, item in enumerate(items)
    ]


def _sniff(body: bytes) -> str:
    head = body.lstrip()[:1]
    if head == b"[":
        return "json"
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return "ndjson"
    return "json"


def _loads(data: bytes, index: int | None, line: int | None = None) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        where = "" if line is None else f"line {line}: "
        # orjson's message says what and where (position), never echoes the body.
        raise IntakeError(f"{where}malformed JSON ({e})", index=index) from None


def validate_record(item: Any, index: int, *, user_agent: str | None = None) -> dict[str, Any]:
    """One record as the line to spool: {ts?, level, message, event?, meta?}."""
    if not isinstance(item, dict):
        raise IntakeError(f"must be a JSON object, not {_kind(item)}", index=index)
    out: dict[str, Any] = {}

    if "message" not in item:
        raise IntakeError("is required", index=index, field="message")
    message = item["message"]
    if not isinstance(message, str):
        raise IntakeError(f"must be a string, not {_kind(message)}", index=index, field="message")

    if "level" not in item:
        raise IntakeError("is required", index=index, field="level")
    level = item["level"]
    if not isinstance(level, str):
        raise IntakeError(f"must be a string, not {_kind(level)}", index=index, field="level")
    canonical = _LEVELS.get(level.strip().lower())
    if canonical is None:
        raise IntakeError(
            "must be INFO, WARNING or ERROR (or info, warn, error, debug, log, fatal ...), "
            f"not {level[:40]!r}",
            index=index,
            field="level",
        )

    ts = item.get("ts")
    if ts is not None:
        out["ts"] = _timestamp(ts, index).isoformat().replace("+00:00", "Z")
    out["level"] = canonical
    out["message"] = message

    event = item.get("event")
    if event is not None:
        if not isinstance(event, str):
            raise IntakeError(f"must be a string, not {_kind(event)}", index=index, field="event")
        if not event.strip() or len(event) > EVENT_MAX_CHARS:
            raise IntakeError(
                f"must be 1 to {EVENT_MAX_CHARS} characters", index=index, field="event"
            )
        out["event"] = event

    meta: dict[str, Any] = {}
    for key, value in item.items():
        if key not in _RESERVED:
            _check_depth(value, index, key)
            meta[key] = value
    inner = item.get("meta")
    if inner is not None:
        if not isinstance(inner, dict):
            raise IntakeError(f"must be an object, not {_kind(inner)}", index=index, field="meta")
        _check_depth(inner, index, "meta")
        meta.update(inner)
    if user_agent and "user_agent" not in meta:
        meta["user_agent"] = user_agent
    if meta:
        out["meta"] = meta
    return out


def _timestamp(value: Any, index: int) -> datetime:
    when: datetime | None = None
    if isinstance(value, bool):
        when = None
    elif isinstance(value, int | float):
        if math.isfinite(value):
            seconds = value / 1000 if abs(value) >= 1e11 else value  # Date.now() is ms
            with contextlib.suppress(OverflowError, ValueError, OSError):
                when = datetime.fromtimestamp(seconds, UTC)
    elif isinstance(value, str) and len(value) <= 64:
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            parsed = None
        if parsed is not None:
            with contextlib.suppress(OverflowError, ValueError):
                when = (
                    parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
                )
    if when is None:
        raise IntakeError(
            "must be an ISO 8601 time (2026-11-26T12:00:00Z) or epoch seconds or "
            f"milliseconds, not {_kind(value)} {str(value)[:40]!r}",
            index=index,
            field="ts",
        )
    if not TS_MIN <= when < TS_MAX:
        raise IntakeError(
            f"{when.isoformat()} is outside {TS_MIN.year}..{TS_MAX.year - 1}",
            index=index,
            field="ts",
        )
    return when


def _check_depth(value: Any, index: int, field: str) -> None:
    """Refuse meta nested deeper than MAX_META_DEPTH (iterative: no recursion limit)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node  # type: ignore[assignment]
        else:
            continue
        if depth > MAX_META_DEPTH:
            raise IntakeError(
                f"nests deeper than {MAX_META_DEPTH} levels", index=index, field=field
            )
        stack.extend((child, depth + 1) for child in children)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# --- the rate limit (pure) --------------------------------------------------------------------


class RateLimiter:
    """A token bucket per key: `rate_per_min` a minute, bursts up to the same number.

    `admit(key, now)` takes one token and returns 0.0, or returns the seconds until a
    token is free (the Retry-After) and takes nothing. At most `max_keys` buckets are
    kept; the least recently seen go first (a forgotten key starts with a full bucket,
    so eviction can only be generous).
    """

    def __init__(self, rate_per_min: int, *, max_keys: int = 10_000) -> None:
        if rate_per_min < 1:
            raise ValueError("rate_per_min must be at least 1")
        self.capacity = float(rate_per_min)
        self.per_s = rate_per_min / 60.0
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self.refused = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + max(0.0, now - at) * self.per_s)
        if tokens >= 1.0 - 1e-9:  # float refills are not exact
            self._put(key, max(0.0, tokens - 1.0), now)
            return 0.0
        self._put(key, tokens, now)
        self.refused += 1
        return (1.0 - tokens) / self.per_s

    def _put(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


# --- the component ----------------------------------------------------------------------------


class IntakeClosed(Exception):
    """The intake is stopping (or stopped): the request may be retried later."""


def spool_folder(data_dir: Path, source_name: str) -> Path:
    return data_dir / "spool" / f"http-{source_name}"


@dataclass(frozen=True, slots=True)
class Accepted:
    records: int
    position: SpoolPosition


class Intake:
    """The HTTP intake's spool and its feed into the pipeline (a `Source`).

    `checkpoints` are the committed positions of `config.source_name` (as the sink's
    `load_checkpoints` returns them): feeding resumes there. `committed`, when given,
    is asked now and then for them again, so committed spool segments are deleted
    while running (without it, they are deleted at the next start).
    """

    def __init__(
        self,
        config: HttpConfig,
        data_dir: Path,
        clock: Clock,
        checkpoints: Mapping[str, Position] | None = None,
        *,
        committed: CommittedReader | None = None,
        fsync: FsyncMode = "batch",
        segment_bytes: int | None = None,
    ) -> None:
        self.config = config
        self.name = config.source_name
        self.service = config.service
        self._clock = clock
        self.folder = spool_folder(data_dir, self.name)
        self.writer = open_spool(self.folder, config.spool_max_bytes, fsync, segment_bytes)
        self._start = resume_position(checkpoints or {}, self.writer)
        # The records as accepted: one a line, nothing to group.
        self.feeder = SpoolFeeder(
            self.name,
            self.service,
            self.writer,
            PassThrough(),
            self._start,
            clock,
            committed=committed,
        )
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._state = "starting"
        self._reason: str | None = None
        # counters
        self.requests_accepted = 0
        self.events_accepted = 0
        self.spool_full = 0

    def __repr__(self) -> str:
        return f"Intake({self.name!r})"

    # -- the HTTP side --

    @property
    def closed(self) -> bool:
        return self._closing

    async def accept(self, lines: list[bytes]) -> Accepted:
        """Append `lines` (from `parse_body`) to the spool; return once durable.

        Raises IntakeClosed when stopping, SpoolFull when the spool has no room (nothing
        was written), RecordTooLarge, or OSError (disk): nothing was written either.
        """
        if self._closing:
            raise IntakeClosed("the forwarder is stopping")
        if not lines:
            return Accepted(0, self.writer.position)
        now = self._clock.now()
        records = [SpoolRecord(now, STREAM, line) for line in lines]
        self._in_flight += 1
        self._idle.clear()
        try:
            try:
                end = await asyncio.to_thread(self.writer.append, records, timeout=0.0)
            except SpoolFull:
                self.spool_full += 1
                raise
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        self.requests_accepted += 1
        self.events_accepted += len(lines)
        self.feeder.appended()
        return Accepted(len(lines), end)

    # -- the Source side --

    async def run(self, out: asyncio.Queue[Any], stop: asyncio.Event) -> None:
        """Feed the spool into `out` from the committed position; return after `stop`
        once everything appended is fed (the runtime ends the stream)."""
        await asyncio.to_thread(self.writer.acknowledge, self._start)
        self._state = "ok"
        try:
            async with asyncio.TaskGroup() as tg:
                feeding = tg.create_task(self.feeder.run(out), name=f"{self.name}.feeder")
                tg.create_task(self._finish(stop, feeding), name=f"{self.name}.finish")
        finally:
            self._closing = True
            self._state = "stopped"

    async def _finish(self, stop: asyncio.Event, feeding: asyncio.Task[None]) -> None:
        """After `stop`, once the feed has caught up: refuse new requests, let those in
        flight land, then let the feed end (also ended by `close`)."""
        for event in (stop, self.feeder.caught_up):
            waiting = asyncio.ensure_future(event.wait())
            try:
                await asyncio.wait([waiting, feeding], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()
            if feeding.done():
                return
        self._closing = True
        self._state = "stopping"
        await self._idle.wait()
        self.feeder.finish()

    def status(self) -> dict[str, Any]:
        state, reason = self._state, self._reason
        used, limit = self.writer.used_bytes, self.writer.max_bytes
        if state == "ok" and used >= limit * 0.9:
            state, reason = "degraded", f"spool {used} of {limit} bytes: the database is behind"
        return {
            "state": state,
            "reason": reason,
            "service": self.service,
            "spool": str(self.folder),
            "spool_bytes": used,
            "spool_max_bytes": limit,
            "lag_bytes": self.feeder.unfed_bytes,
            "requests_accepted": self.requests_accepted,
            "events_accepted": self.events_accepted,
            "lines_read": self.events_accepted,
            "lines_fed": self.feeder.records_fed,
            "spool_full": self.spool_full,
        }

    def progress(self) -> tuple[int, int]:
        return 0, 0  # a live intake has no end to show a backfill bar for

    def close(self) -> None:
        """Release the spool folder. Idempotent."""
        self._closing = True
        self.feeder.finish()
        self.writer.close()
