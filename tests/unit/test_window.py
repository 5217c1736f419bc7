"""The pure sliding windows: pane-granular totals, rates, and the bounded keyed map."""

from __future__ import annotations

import pytest

from forwarder.alarms.window import KeyedWindows, SlidingCounter
from tests.support import FakeClock


def test_events_count_until_their_pane_leaves_the_window() -> None:
    clock = FakeClock()  # monotonic starts at 1000.0, a pane boundary for 1 s panes
    c = SlidingCounter(60, panes=60)
    assert c.add(clock.monotonic()) == 1
    clock.advance(0.5)
    assert c.add(clock.monotonic(), 2) == 3
    clock.advance(30)
    assert c.add(clock.monotonic()) == 4
    clock.advance(29.49)  # 1059.99: still inside the window of the first pane
    assert c.total(clock.monotonic()) == 4
    clock.advance(0.01)  # 1060.0: the pane [1000, 1001) has left, with all three events
    assert c.total(clock.monotonic()) == 1
    clock.advance(30)  # 1090.0: the pane [1030, 1031) has left too
    assert c.total(clock.monotonic()) == 0


def test_a_gap_longer_than_the_window_empties_it() -> None:
    c = SlidingCounter(10, panes=5)
    for t in range(10):
        c.add(100.0 + t)
    assert c.total(109.0) == 10
    assert c.add(500.0) == 1
    assert c._pane_ids == [250]  # one pane held, 500 / 2 s


def test_memory_holds_at_most_one_entry_per_pane() -> None:
    c = SlidingCounter(60, panes=60)
    now = 0.0
    for _ in range(10_000):
        c.add(now)
        now += 0.37
    assert len(c._pane_ids) <= 60
    assert c.total(now) == sum(c._counts)


def test_time_going_back_counts_in_the_newest_pane() -> None:
    c = SlidingCounter(60, panes=60)
    c.add(1000.0)
    c.add(990.0)  # earlier: counted in the pane of 1000.0, not lost, not expired early
    assert c.total(1000.0) == 2
    assert c.total(1059.0) == 2
    assert c.total(1060.0) == 0


def test_rate_is_measured_over_the_span_that_holds_events() -> None:
    c = SlidingCounter(60, panes=60)
    assert c.rate(1000.0) == 0.0
    for i in range(100):
        c.add(1000.0 + i / 10)  # 100 events over 10 s
    assert c.rate(1010.0) == pytest.approx(10.0)
    for i in range(500):
        c.add(1010.0 + i / 10)  # 50 s more at the same pace: the window is full
    assert c.total(1060.0) == 590  # the pane [1000, 1001) has left: 59 s of events
    assert c.rate(1060.0) == pytest.approx(10.0)
    # Silence counts: 30 s later the events of [1031, 1060) are spread over [1031, 1090).
    assert c.rate(1090.0) == pytest.approx(290 / 59)


def test_rate_of_a_burst_in_one_pane_is_per_pane() -> None:
    c = SlidingCounter(60, panes=60)
    c.add(1000.0, 50)
    assert c.rate(1000.0) == 50.0  # at least one pane (1 s) of span


@pytest.mark.parametrize(("window_s", "panes"), [(0, 60), (-1, 60), (60, 0)])
def test_invalid_windows_are_refused(window_s: float, panes: int) -> None:
    with pytest.raises(ValueError):
        SlidingCounter(window_s, panes)


def test_negative_counts_are_refused() -> None:
    with pytest.raises(ValueError):
        SlidingCounter(60).add(0.0, -1)


def test_keys_count_independently() -> None:
    w: KeyedWindows[str] = KeyedWindows(60)
    assert w.add("a", 1000.0) == 1
    assert w.add("a", 1001.0) == 2
    assert w.add("b", 1001.0, 5) == 5
    assert w.total("a", 1001.0) == 2
    assert w.total("b", 1001.0) == 5
    assert w.total("nobody", 1001.0) == 0
    assert "nobody" not in w
    assert len(w) == 2


def test_an_idle_key_is_dropped_when_touched() -> None:
    w: KeyedWindows[str] = KeyedWindows(60)
    w.add("a", 1000.0)
    assert w.total("a", 1059.0) == 1
    assert "a" in w
    assert w.total("a", 1060.0) == 0
    assert "a" not in w
    assert w.evictions == 0


def test_prune_drops_only_idle_keys() -> None:
    w: KeyedWindows[str] = KeyedWindows(60)
    w.add("old", 1000.0)
    w.add("mid", 1020.0)
    w.add("old", 1030.0)  # used again: now newer than "mid"
    w.add("new", 1050.0)
    assert w.prune(1080.5) == 1
    assert list(w) == ["old", "new"]
    assert w.prune(1200.0) == 2
    assert len(w) == 0
    assert w.evictions == 0


def test_the_least_recently_added_live_key_is_evicted_and_counted() -> None:
    w: KeyedWindows[str] = KeyedWindows(60, max_keys=2)
    w.add("a", 1000.0)
    w.add("b", 1001.0)
    w.total("a", 1002.0)  # reading does not make "a" recently used
    w.add("c", 1002.0)
    assert list(w) == ["b", "c"]
    assert w.evictions == 1
    w.add("b", 1003.0)
    w.add("d", 1004.0)
    assert list(w) == ["b", "d"]
    assert w.evictions == 2


def test_an_idle_key_makes_room_without_an_eviction() -> None:
    w: KeyedWindows[str] = KeyedWindows(60, max_keys=2)
    w.add("a", 1000.0)
    w.add("b", 1030.0)
    w.add("c", 1070.0)  # "a" went idle at 1060
    assert list(w) == ["b", "c"]
    assert w.evictions == 0


def test_a_flood_of_distinct_keys_stays_within_max_keys() -> None:
    w: KeyedWindows[str] = KeyedWindows(600, max_keys=1000)
    for i in range(100_000):
        w.add(f"user-{i}", 1000.0 + i / 1000)
    assert len(w) == 1000
    assert w.evictions == 99_000
    assert next(iter(w)) == "user-99000"
    assert w.total("user-99999", 1100.0) == 1


def test_adding_zero_does_not_create_a_key() -> None:
    w: KeyedWindows[str] = KeyedWindows(60)
    assert w.add("a", 1000.0, 0) == 0
    assert "a" not in w


def test_max_keys_must_be_positive() -> None:
    with pytest.raises(ValueError):
        KeyedWindows(60, max_keys=0)
