"""The pure batcher: size or age, chunks never split, last position per stream."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from forwarder.config import BatchConfig
from forwarder.event import Event, EventChunk, Level, Position
from forwarder.sinks.batch import Batcher
from tests.support import FakeClock


def ev(i: int) -> Event:
    return Event(
        ts=datetime(2026, 11, 26, 12, 0, tzinfo=UTC),
        service="api",
        level=Level.INFO,
        event="e",
        message=f"m{i}",
        meta={},
    )


def chunk(n: int, *positions: Position, start: int = 0) -> EventChunk:
    return EventChunk(events=[ev(start + i) for i in range(n)], positions=positions)


def pos(stream: str, offset: int, source: str = "ui") -> Position:
    return Position(source, stream, offset, {"path": f"/var/log/{stream}"})


def test_size_flush_closes_at_the_first_chunk_boundary_at_or_after_max_rows() -> None:
    clock = FakeClock()
    b = Batcher(BatchConfig(max_rows=5, max_delay_s=60))
    b.add(chunk(3, pos("a", 30)), clock.monotonic())
    assert not b.due(clock.monotonic())
    b.add(chunk(4, pos("a", 70), start=3), clock.monotonic())  # 7 rows: the chunk is not split
    assert b.due(clock.monotonic())
    assert b.time_until_due(clock.monotonic()) == 0.0
    batch = b.take()
    assert [e.message for e in batch.events] == [f"m{i}" for i in range(7)]
    assert batch.checkpoints == [pos("a", 70)]
    assert b.empty and b.rows == 0 and not b.due(clock.monotonic())


def test_exactly_max_rows_is_due() -> None:
    b = Batcher(BatchConfig(max_rows=3, max_delay_s=60))
    b.add(chunk(3), 0.0)
    assert b.due(0.0)


def test_age_flush_after_max_delay_measured_from_the_oldest_row() -> None:
    clock = FakeClock()
    b = Batcher(BatchConfig(max_rows=1000, max_delay_s=0.5))
    b.add(chunk(1), clock.monotonic())
    assert b.time_until_due(clock.monotonic()) == 0.5
    clock.advance(0.3)
    b.add(chunk(1, start=1), clock.monotonic())  # a newer row does not restart the wait
    assert not b.due(clock.monotonic())
    assert abs(b.time_until_due(clock.monotonic()) - 0.2) < 1e-9
    clock.advance(0.2)
    assert b.due(clock.monotonic())
    assert b.time_until_due(clock.monotonic()) == 0.0
    assert len(b.take()) == 2


def test_the_next_batch_ages_from_its_own_first_row() -> None:
    clock = FakeClock()
    b = Batcher(BatchConfig(max_rows=1000, max_delay_s=1.0))
    b.add(chunk(1), clock.monotonic())
    clock.advance(5)
    b.take()
    assert b.time_until_due(clock.monotonic()) is None
    b.add(chunk(1), clock.monotonic())
    assert not b.due(clock.monotonic())
    assert b.time_until_due(clock.monotonic()) == 1.0


def test_positions_without_rows_are_flushed_after_max_delay() -> None:
    # e.g. every line of a chunk was sampled out: the offset must still be committed.
    clock = FakeClock()
    b = Batcher(BatchConfig(max_rows=10, max_delay_s=0.5))
    b.add(EventChunk(events=[], positions=(pos("a", 120),)), clock.monotonic())
    assert not b.empty
    assert not b.due(clock.monotonic())
    clock.advance(0.5)
    assert b.due(clock.monotonic())
    batch = b.take()
    assert batch.events == [] and batch.checkpoints == [pos("a", 120)]


def test_an_empty_chunk_changes_nothing() -> None:
    b = Batcher(BatchConfig(max_rows=1, max_delay_s=0.5))
    b.add(EventChunk(events=[]), 0.0)
    assert b.empty
    assert not b.due(1e9)
    assert b.time_until_due(0.0) is None


def test_checkpoints_keep_the_last_position_per_stream_not_the_highest() -> None:
    b = Batcher(BatchConfig(max_rows=100, max_delay_s=1))
    b.add(chunk(1, pos("a", 5000)), 0.0)
    b.add(chunk(1, pos("b", 40)), 0.0)
    b.add(chunk(1, pos("a", 12)), 0.0)  # copytruncate: offsets restart low
    b.add(chunk(1, pos("a", 12, source="other")), 0.0)
    batch = b.take()
    assert batch.checkpoints == [pos("a", 12), pos("b", 40), pos("a", 12, source="other")]


def test_each_row_remembers_its_source() -> None:
    b = Batcher(BatchConfig(max_rows=100, max_delay_s=1))
    b.add(chunk(2, pos("a", 1, source="ui")), 0.0)
    b.add(chunk(1), 0.0)  # a chunk without a position (e.g. HTTP intake)
    b.add(chunk(1, pos("x", 1, source="worker")), 0.0)
    assert b.take().sources == ["ui", "ui", None, "worker"]


@given(
    delay=st.floats(min_value=1e-3, max_value=3600, allow_nan=False),
    start=st.floats(min_value=0, max_value=1e7, allow_nan=False),
    later=st.floats(min_value=0, max_value=1e4, allow_nan=False),
)
def test_due_and_time_until_due_agree(delay: float, start: float, later: float) -> None:
    # "not due" must always mean "a positive wait", or the sink's loop would spin.
    b = Batcher(BatchConfig(max_rows=10, max_delay_s=delay))
    b.add(chunk(1), start)
    now = start + later
    remaining = b.time_until_due(now)
    assert remaining is not None
    assert b.due(now) == (remaining == 0.0)
