"""The pure sampler under a fake clock and fixed seeds: exact outcomes."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from forwarder.event import Event, EventChunk, Level, Position
from forwarder.pipeline.sample import SUMMARY_EVENT, Sampler
from tests.support import FakeClock

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def ev(
    clock: FakeClock,
    service: str = "api",
    level: Level = Level.INFO,
    event: str = "request",
    i: int = 0,
) -> Event:
    return Event(clock.now(), service, level, event, f"line {i}", {"i": i})


def feed(
    sampler: Sampler,
    clock: FakeClock,
    n: int,
    seconds: float,
    service: str = "api",
    level: Level = Level.INFO,
    event: str = "request",
) -> list[Event]:
    """n lines evenly over `seconds` (the clock ends `seconds` later); the kept ones."""
    kept = []
    for i in range(n):
        out = sampler.admit(ev(clock, service, level, event, i), clock.monotonic())
        if out is not None:
            kept.append(out)
        clock.advance(seconds / n)
    return kept


def test_at_or_under_the_threshold_every_line_is_kept_as_is() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=500, seed=1)
    lines = [ev(clock, i=i) for i in range(500)]
    out = [s.admit(line, clock.monotonic()) for line in lines]
    assert all(a is b for a, b in zip(out, lines, strict=True))  # same objects: no copy
    assert s.dropped == 0
    assert s.summaries(clock.monotonic(), flush=True) == []


def test_a_flood_at_ten_times_the_threshold_keeps_about_the_threshold_per_minute() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=500, seed=42)
    per_minute = [feed(s, clock, 5000, 60) for _ in range(5)]
    kept = [len(m) for m in per_minute]
    # The first minute also holds the 500 lines kept before the threshold was crossed.
    assert 900 <= kept[0] <= 1000
    assert all(450 <= k <= 550 for k in kept[1:]), kept
    # The rows' sample_rate rebuilds the volume they stand for.
    for minute in per_minute[1:]:
        weight = sum(e.meta.get("sample_rate", 1.0) for e in minute)
        assert 4500 <= weight <= 5500
    assert s.seen == 25_000
    assert s.dropped == 25_000 - sum(kept)


def test_the_same_seed_makes_the_same_decisions() -> None:
    def run(seed: int) -> list[str]:
        clock = FakeClock()
        s = Sampler(threshold_per_min=100, seed=seed)
        return [e.message for _ in range(3) for e in feed(s, clock, 2000, 60)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_warnings_and_errors_are_never_dropped() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=100, seed=3)
    feed(s, clock, 1000, 10)  # the service is far above its threshold
    dropped_before = s.dropped
    for i in range(300):
        for level in (Level.WARNING, Level.ERROR):
            line = ev(clock, level=level, i=i)
            assert s.admit(line, clock.monotonic()) is line
        s.admit(ev(clock, i=i), clock.monotonic())
        clock.advance(0.01)
    assert s.dropped - dropped_before > 250  # INFO lines in between were dropped


def test_never_sample_is_configurable() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=10, never_sample={"ERROR"}, seed=3)
    kept = feed(s, clock, 600, 60, level=Level.WARNING)
    assert len(kept) < 200  # warnings are sampled now
    assert len(feed(s, clock, 600, 60, level=Level.ERROR)) == 600


def test_unknown_levels_in_never_sample_are_refused() -> None:
    with pytest.raises(ValueError, match="WARN"):
        Sampler(never_sample={"WARN"})


def test_the_first_line_of_each_kind_in_a_window_is_kept() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=100, seed=5)
    feed(s, clock, 5000, 30)  # far above the threshold
    for kind in ("cache_miss", "login", "logout"):
        first = ev(clock, event=kind)
        assert s.admit(first, clock.monotonic()) is first  # kept, not weighted
    # Guaranteed once per window: "login", not kept for more than 60 s, is kept as is
    # in a flood of other lines.
    clock.advance(30)
    feed(s, clock, 5000, 59.9, event="other")
    line = ev(clock, event="login")  # kept 89.9 s ago
    assert s.admit(line, clock.monotonic()) is line


def test_sample_rate_is_on_exactly_the_kept_lines_that_stand_for_others() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=500, seed=9)
    before = feed(s, clock, 500, 6)  # under the threshold
    flood = feed(s, clock, 4500, 54)
    errors = feed(s, clock, 50, 1, level=Level.ERROR)
    assert all("sample_rate" not in e.meta for e in before + errors)
    # Even the flood's first kept line is weighted: its kind was kept (under the
    # threshold) less than 60 s before, so it is not a new kind.
    assert len(flood) > 100
    assert all(isinstance(e.meta["sample_rate"], float) for e in flood)
    assert all(e.meta["sample_rate"] > 1.0 for e in flood)
    assert s.weighted == len(flood)
    assert all(e.meta["i"] == int(e.message.split()[1]) for e in flood)  # meta kept


def test_a_weighted_line_is_a_new_event_and_its_input_is_untouched() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=100, seed=1)
    feed(s, clock, 1000, 60)  # 10 times the threshold: one line in 10 kept
    meta = {"user": "u1"}
    out = []
    for _ in range(200):
        line = Event(clock.now(), "api", Level.INFO, "request", "m", meta)
        out.append(s.admit(line, clock.monotonic()))
        clock.advance(0.06)
    weighted = [e for e in out if e is not None]
    assert weighted
    assert all(e.meta["sample_rate"] > 1 and e.meta["user"] == "u1" for e in weighted)
    assert meta == {"user": "u1"}


def test_summary_rows_come_once_per_window_with_exact_dropped_counts() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=100, seed=11)
    counts: Counter[Level] = Counter()
    first_drop = None
    for i in range(3000):  # 30 s: INFO and WARNING floods
        level = Level.INFO if i % 3 else Level.WARNING
        if s.admit(ev(clock, level=level, i=i), clock.monotonic()) is None:
            counts[level] += 1
            first_drop = first_drop or clock.monotonic()
        clock.advance(0.01)
        assert s.summaries(clock.monotonic()) == []
    assert first_drop is not None
    kept_before_close = 3000 - sum(counts.values())
    clock.advance(first_drop + 60 - clock.monotonic() - 0.001)
    assert s.summaries(clock.monotonic()) == []  # not yet: 60 s after the first drop
    clock.advance(0.001)
    (summary,) = s.summaries(clock.monotonic())
    assert summary.service == "api"
    assert summary.level is Level.INFO
    assert summary.event == SUMMARY_EVENT
    assert summary.meta["dropped"] == {"INFO": counts[Level.INFO]}  # WARNING never dropped
    assert counts[Level.WARNING] == 0
    assert summary.meta["window_s"] == 60.0
    # kept: the lines kept from the first drop on (those before it were under the limit)
    assert summary.meta["kept"] == kept_before_close - 100
    assert summary.ts == T0 + timedelta(seconds=29.99)  # the last line it covers
    assert summary.meta["first_ts"] == (T0 + timedelta(seconds=1)).isoformat()
    assert f"dropped INFO {counts[Level.INFO]}" in summary.message
    assert s.summaries(clock.monotonic() + 3600) == []  # nothing dropped since


def test_flush_closes_every_open_summary() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=10, seed=1)
    feed(s, clock, 100, 1, service="a")
    feed(s, clock, 100, 1, service="b")
    rows = s.summaries(clock.monotonic(), flush=True)
    assert [r.service for r in rows] == ["a", "b"]
    assert sum(r.meta["dropped"]["INFO"] for r in rows) == s.dropped


def test_after_a_quiet_minute_everything_is_kept_again() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=500, seed=2)
    assert len(feed(s, clock, 5000, 60)) < 1000
    clock.advance(60)
    assert len(feed(s, clock, 500, 60)) == 500


def test_the_window_slides_rather_than_resets() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=500, seed=2)
    feed(s, clock, 400, 30)  # 400 lines in [1000, 1030)
    assert len(feed(s, clock, 100, 29)) == 100  # 500 in the window: all kept
    kept = feed(s, clock, 100, 1)  # still inside the minute: over the threshold now
    assert len(kept) < 100
    clock.advance(30)  # the first 400 lines have left the window
    assert len(feed(s, clock, 300, 10)) == 300


def test_two_services_are_sampled_independently() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=500, seed=4)
    kept_quiet = 0
    for _ in range(60):
        feed(s, clock, 1000, 0.5, service="noisy")
        kept_quiet += len(feed(s, clock, 8, 0.5, service="quiet"))
    assert kept_quiet == 480
    rows = s.summaries(clock.monotonic(), flush=True)
    assert [r.service for r in rows] == ["noisy"]


def test_sample_chunk_keeps_positions_and_drops_lines() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=10, seed=6)
    positions = (Position("file", "inode-1", 4096, {"path": "/var/log/api.log"}),)
    chunk = EventChunk([ev(clock, i=i) for i in range(200)], positions)
    out = s.sample_chunk(chunk, clock.monotonic())
    assert out.positions == positions
    assert 10 < len(out.events) < 200
    assert len(chunk.events) == 200  # the input chunk is untouched
    assert s.dropped == 200 - len(out.events)
    # A chunk sampled down to nothing still carries its positions.
    s = Sampler(threshold_per_min=1, seed=6)
    s.admit(ev(clock, i=0), clock.monotonic())
    tail = EventChunk([ev(clock, i=1)], positions)
    assert s.sample_chunk(tail, clock.monotonic()) == EventChunk([], positions)


def test_an_untouched_chunk_is_returned_as_is() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=500, seed=6)
    chunk = EventChunk([ev(clock, i=i) for i in range(100)], ())
    assert s.sample_chunk(chunk, clock.monotonic()) is chunk


def test_services_beyond_max_services_evict_the_least_recent_and_are_counted() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=500, seed=1, max_services=3)
    for i in range(10):
        s.admit(ev(clock, service=f"svc-{i}"), clock.monotonic())
    assert len(s._lines) == 3
    assert s.evicted_services == 7


def test_kinds_beyond_max_kinds_are_forgotten_and_counted() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=500, seed=1, max_kinds=100)
    for i in range(1000):
        s.admit(ev(clock, event=f"kind-{i}"), clock.monotonic())
    assert len(s._kinds) == 100
    assert s.evicted_kinds == 900
    clock.advance(60)
    s.summaries(clock.monotonic())  # quiet kinds and windows are forgotten
    assert len(s._kinds) == 0
    assert len(s._lines) == 0


def test_open_summaries_beyond_max_services_close_early() -> None:
    clock = FakeClock()
    s = Sampler(threshold_per_min=1, seed=1, max_services=2)
    for name in ("a", "b", "c"):
        feed(s, clock, 50, 0.1, service=name)
    rows = s.summaries(clock.monotonic())  # "a" closed early to make room for "c"
    assert [r.service for r in rows] == ["a"]
    rows += s.summaries(clock.monotonic(), flush=True)
    assert sum(r.meta["dropped"]["INFO"] for r in rows) == s.dropped


def test_invalid_thresholds_are_refused() -> None:
    with pytest.raises(ValueError):
        Sampler(threshold_per_min=0)
