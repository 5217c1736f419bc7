"""The record types that flow through the pipeline.

Sources produce `RawChunk`s (raw lines plus the position after the last of them);
`pipeline.normalize` turns each line into the one `Event` type; the sink writes
events and commits the chunk positions in the same transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple


class Level(StrEnum):
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


@dataclass(frozen=True, slots=True)
class Position:
    """Where a source resumes after a restart; committed with the rows it covers.

    `stream` is one resumable stream inside a source (for files: the file identity),
    `offset` is where reading resumes (for files: the byte after the last newline),
    `detail` is source-specific JSON stored beside it (path, fingerprint, ...).
    """

    source: str
    stream: str
    offset: int
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RawChunk:
    """Complete records read in one go from one stream of one source.

    `lines` hold no line terminator (a grouped record, e.g. a message and its traceback,
    is one entry with inner newlines). `truncated` holds the indices of lines that were
    cut at max_line_bytes. `position` is where to resume after the last line; a chunk
    is never split across two database transactions, so that position is exact.
    """

    source: str
    service: str
    lines: list[bytes]
    position: Position | None = None
    truncated: frozenset[int] = frozenset()
    # Facts about where the lines came from (container id and name, ...): added to the
    # meta of every event of the chunk, winning over keys of the same name in the line.
    meta: Mapping[str, Any] | None = None
    # Per line, facts the transport recorded (stream: stdout|stderr, ...), added likewise.
    line_meta: list[Mapping[str, Any] | None] | None = None
    # Per line, when the runtime recorded it (Docker's and CRI's time): the event's ts
    # when the line itself carries none (instead of the time of reading).
    times: list[datetime | None] | None = None


class Event(NamedTuple):
    """One log record in the schema: ts, service, level, event, message, meta.

    Created only by `pipeline.normalize`; stages derive new events (`_replace`), never
    mutate one (meta included). `ts` is an aware UTC datetime; meta is JSON-serializable.

    A NamedTuple rather than a frozen dataclass, measured: it is built three times
    faster (this is the hot path, once per line), and its field order is the log
    table's column order, so a batch of events is handed to binary COPY as it is.
    """

    ts: datetime
    service: str
    level: Level
    event: str
    message: str
    meta: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class EventChunk:
    """The events made from one RawChunk, with the positions they cover.

    `events` may be shorter than the raw lines (filtered or sampled out); the
    positions still advance so dropped lines are not read again after a restart.
    """

    events: list[Event]
    positions: tuple[Position, ...] = ()
