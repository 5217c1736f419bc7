"""Properties: whatever the events and clock steps, nothing is lost from the accounting."""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from forwarder.alarms.window import KeyedWindows, SlidingCounter
from forwarder.event import Event, Level
from forwarder.pipeline.sample import SUMMARY_EVENT, Sampler

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

_step = st.sampled_from([0.0, 0.0, 0.001, 0.01, 0.3, 1.0, 5.0, 29.9, 60.0, 61.0]) | st.floats(
    0, 130, allow_nan=False
)
_ops = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),  # service
        st.sampled_from(list(Level)),
        st.sampled_from(["x", "y", "z"]),  # event
        st.integers(1, 40),  # lines in a row with this shape
        _step,  # clock advance after them
        st.booleans(),  # ask for summaries after them
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=_ops,
    threshold=st.integers(1, 30),
    never=st.sets(st.sampled_from([lv.value for lv in Level])),
    window_s=st.sampled_from([10.0, 60.0]),
    panes=st.sampled_from([1, 6, 60]),
    max_services=st.integers(1, 4),
    max_kinds=st.integers(1, 10),
    seed=st.integers(0, 2**32),
)
def test_the_accounting_always_balances(
    ops: list[tuple[str, Level, str, int, float, bool]],
    threshold: int,
    never: set[str],
    window_s: float,
    panes: int,
    max_services: int,
    max_kinds: int,
    seed: int,
) -> None:
    s = Sampler(threshold, never, window_s, seed, max_services, max_kinds, panes)
    now, wall = 1000.0, T0
    total: Counter[tuple[str, str]] = Counter()
    kept: Counter[tuple[str, str]] = Counter()
    dropped: Counter[tuple[str, str]] = Counter()
    rows: list[Event] = []
    for service, level, name, n, step, ask in ops:
        for i in range(n):
            line = Event(wall, service, level, name, f"m{i}", {"i": i})
            out = s.admit(line, now)
            key = (service, level.value)
            total[key] += 1
            if out is None:
                assert level.value not in never  # never_sample is never dropped
                dropped[key] += 1
                continue
            kept[key] += 1
            assert out[:5] == line[:5]
            rate = out.meta.get("sample_rate")
            assert {**out.meta, "sample_rate": rate} == {**line.meta, "sample_rate": rate}
            if rate is not None:
                assert isinstance(rate, float) and rate > 1.0
                assert level.value not in never
            assert "sample_rate" not in line.meta  # the input is never mutated
        now += step
        wall += timedelta(seconds=step)
        if ask:
            rows += s.summaries(now)
    rows += s.summaries(now, flush=True)

    assert kept + dropped == total
    assert s.seen == sum(total.values())
    assert s.dropped == sum(dropped.values())
    summarized: Counter[tuple[str, str]] = Counter()
    for row in rows:
        assert row.event == SUMMARY_EVENT and row.level is Level.INFO
        assert row.meta["dropped"] and all(v > 0 for v in row.meta["dropped"].values())
        assert row.meta["kept"] >= 0
        for level_name, count in row.meta["dropped"].items():
            summarized[(row.service, level_name)] += count
    assert summarized == dropped  # every drop is in exactly one summary row
    per_service = Counter[str]()
    for row in rows:
        per_service[row.service] += row.meta["kept"]
    for service, k in per_service.items():
        assert k <= sum(v for (svc, _), v in kept.items() if svc == service)


def _pane(t: float, pane_s: float) -> int:
    return math.floor(t / pane_s)


@settings(max_examples=500, deadline=None)
@given(
    window_s=st.floats(0.5, 120, allow_nan=False),
    panes=st.integers(1, 70),
    start=st.floats(-1e6, 1e6, allow_nan=False),
    ops=st.lists(
        st.tuples(
            st.floats(-2, 200, allow_nan=False),  # clock step (a few go back)
            st.integers(0, 5),  # n to add (0: only read the total)
        ),
        max_size=80,
    ),
)
def test_sliding_counter_matches_a_brute_force_count(
    window_s: float, panes: int, start: float, ops: list[tuple[float, int]]
) -> None:
    c = SlidingCounter(window_s, panes)
    adds: list[tuple[int, int]] = []  # (pane counted in, n)
    newest: int | None = None
    now = start
    for step, n in ops:
        now += step
        pane = _pane(now, c.pane_s)
        newest = pane if newest is None else max(newest, pane)  # time never goes back
        if n:
            adds.append((newest, n))
            got = c.add(now, n)
        else:
            got = c.total(now)
        expected = sum(k for p, k in adds if p > newest - panes)
        assert got == expected
        assert len(c._pane_ids) <= panes
        if got:
            assert c.rate(now) * window_s >= got * (1 - 1e-9)


@settings(max_examples=300, deadline=None)
@given(
    max_keys=st.integers(1, 6),
    ops=st.lists(
        st.tuples(st.integers(0, 7), st.floats(0, 40, allow_nan=False), st.booleans()),
        max_size=80,
    ),
)
def test_keyed_windows_stay_bounded_and_never_overcount(
    max_keys: int, ops: list[tuple[int, float, bool]]
) -> None:
    w: KeyedWindows[int] = KeyedWindows(60, max_keys=max_keys)
    exact: dict[int, SlidingCounter] = {}  # an unbounded reference
    now = 1000.0
    for key, step, prune in ops:
        now += step
        got = w.add(key, now)
        ref = exact.setdefault(key, SlidingCounter(60)).add(now)
        assert 1 <= got <= ref
        if prune:
            w.prune(now)
        assert len(w) <= max_keys
        for k, counter in exact.items():
            assert w.total(k, now) <= counter.total(now)
    if len(exact) <= max_keys:
        assert w.evictions == 0
        assert all(w.total(k, now) == c.total(now) for k, c in exact.items())
