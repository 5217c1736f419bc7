"""The pure batcher: decides when the rows gathered so far become one transaction.

No I/O and no clock reads: every method that needs the time takes `now`, monotonic
seconds from the caller's injected clock. A batch is due when it holds `max_rows`
rows or more, or when the oldest thing it holds (a row, or a position that advances
without rows, e.g. a chunk whose lines were all sampled out) has waited `max_delay_s`.
Chunks are never split: a chunk's position is exact only after its last line, so a
batch closes at the first chunk boundary at or after `max_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from forwarder.config import BatchConfig
from forwarder.event import Event, EventChunk, Position


@dataclass(slots=True)
class Batch:
    """What one transaction writes.

    `checkpoints` holds the LAST position seen for each (source, stream), in the order
    the streams first appeared: the last, not the highest, because after a truncation
    (copytruncate) a stream's offsets restart low. `sources[i]` is the source name of
    `events[i]` (from its chunk's positions; None when the chunk had none), kept for
    the dead-letter table.
    """

    events: list[Event] = field(default_factory=list)
    checkpoints: list[Position] = field(default_factory=list)
    sources: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events)


class Batcher:
    def __init__(self, config: BatchConfig) -> None:
        self._max_rows = config.max_rows
        self._max_delay_s = config.max_delay_s
        self._reset()

    def _reset(self) -> None:
        self._events: list[Event] = []
        self._sources: list[str | None] = []
        self._positions: dict[tuple[str, str], Position] = {}
        self._deadline: float | None = None  # when the oldest held item has waited max_delay_s

    @property
    def rows(self) -> int:
        return len(self._events)

    @property
    def empty(self) -> bool:
        """Nothing to write: no rows and no position to commit."""
        return self._deadline is None

    def add(self, chunk: EventChunk, now: float) -> None:
        if not chunk.events and not chunk.positions:
            return
        if self._deadline is None:
            self._deadline = now + self._max_delay_s
        if chunk.events:
            self._events.extend(chunk.events)
            source = chunk.positions[0].source if chunk.positions else None
            self._sources.extend([source] * len(chunk.events))
        for position in chunk.positions:
            self._positions[(position.source, position.stream)] = position

    def due(self, now: float) -> bool:
        # Same comparison as time_until_due, so "not due" always means a positive wait.
        if self._deadline is None:
            return False
        return len(self._events) >= self._max_rows or now >= self._deadline

    def time_until_due(self, now: float) -> float | None:
        """Seconds until `due(now)` becomes true by age; 0.0 if due now; None if empty."""
        if self._deadline is None:
            return None
        if len(self._events) >= self._max_rows:
            return 0.0
        return max(0.0, self._deadline - now)

    def take(self) -> Batch:
        """Hand over everything held (possibly empty) and start a new batch."""
        batch = Batch(
            events=self._events,
            checkpoints=list(self._positions.values()),
            sources=self._sources,
        )
        self._reset()
        return batch
