"""Sliding-window counters: how many events in the last `window_s` seconds.

Pure: no clock is read here, every method takes `now`, seconds on a monotonic clock
(`Clock.monotonic()`). The time given to one object must not go back; if it does,
the event is counted in the newest pane seen (never lost, never in the future).

The window is a ring of time panes with a running total, the idea of Fluent Bit's
filter_throttle window.c, without its ticker thread: time moves only when a caller
passes a later `now`. Pane k covers [k * pane_s, (k + 1) * pane_s), pane_s =
window_s / panes; the window at `now` is the `panes` panes ending with the one that
holds `now`, so an event counts for between window_s - pane_s and window_s seconds.

- `SlidingCounter`: one window. Only non-empty panes are stored, oldest first (at most
  `panes` of them): memory O(panes), O(1) amortized per call whatever the gaps
  between calls, and a counter that saw nothing for a window holds nothing.
- `KeyedWindows`: one counter per key (service, rule group, user hash ...) under an
  LRU cap, so a flood of distinct keys cannot grow memory without bound. Keys whose
  window is empty are dropped when touched, by `prune`, or first when room is needed;
  live keys pushed out by the cap are counted in `evictions`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class SlidingCounter:
    """Events counted over the last `window_s` seconds, at pane granularity."""

    __slots__ = ("_counts", "_newest", "_pane_ids", "_total", "pane_s", "panes", "window_s")

    def __init__(self, window_s: float, panes: int = 60) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        if panes < 1:
            raise ValueError(f"panes must be >= 1, got {panes!r}")
        self.window_s = float(window_s)
        self.panes = panes
        self.pane_s = self.window_s / panes
        # Parallel lists, oldest pane first: the id of each non-empty pane, its count.
        self._pane_ids: list[int] = []
        self._counts: list[int] = []
        self._total = 0
        self._newest: float = -math.inf  # the newest pane id seen (an int once set)

    def _advance(self, now: float) -> int:
        """Move the window's end to `now` (never back); drop panes that left it."""
        pane = math.floor(now / self.pane_s)
        if pane > self._newest:
            self._newest = pane
            ids = self._pane_ids
            if ids and ids[0] <= pane - self.panes:
                horizon = pane - self.panes
                k = 1
                while k < len(ids) and ids[k] <= horizon:
                    k += 1
                self._total -= sum(self._counts[:k])
                del ids[:k]
                del self._counts[:k]
        return int(self._newest)

    def add(self, now: float, n: int = 1) -> int:
        """Count `n` events at `now`; return the total in the window, these included."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n!r}")
        pane = self._advance(now)
        ids = self._pane_ids
        if ids and ids[-1] == pane:
            self._counts[-1] += n
        elif n:
            ids.append(pane)
            self._counts.append(n)
        self._total += n
        return self._total

    def total(self, now: float) -> int:
        """Events in the window that ends at `now`."""
        self._advance(now)
        return self._total

    def rate(self, now: float) -> float:
        """Events per second in the window ending at `now`.

        Measured over the part of the window that holds events when that is shorter
        (from the start of the oldest non-empty pane, at least one pane): a counter
        that started 10 s ago with 100 events reports 10/s, not 100 / window_s. So a
        steady flow reads the same rate in its first window as after it.
        """
        self._advance(now)
        if not self._total:
            return 0.0
        span = now - self._pane_ids[0] * self.pane_s
        return self._total / min(self.window_s, max(self.pane_s, span))


class KeyedWindows(Generic[K]):
    """A `SlidingCounter` per key, at most `max_keys` of them (least recently added out).

    "Used" means added to: reading a total does not keep a key alive. So keys are
    ordered by their last event, and those whose window is empty come first.
    """

    def __init__(self, window_s: float, panes: int = 60, max_keys: int = 10_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        SlidingCounter(window_s, panes)  # validate the window once, here
        self.window_s = float(window_s)
        self.panes = panes
        self.max_keys = max_keys
        self.evictions = 0  # live keys dropped to respect max_keys
        self._counters: OrderedDict[K, SlidingCounter] = OrderedDict()

    def add(self, key: K, now: float, n: int = 1) -> int:
        """Count `n` events for `key` at `now`; return its total in the window."""
        counters = self._counters
        counter = counters.get(key)
        if counter is None:
            if not n:
                return 0
            if len(counters) >= self.max_keys:
                self._make_room(now)
            counter = counters[key] = SlidingCounter(self.window_s, self.panes)
        else:
            counters.move_to_end(key)
        return counter.add(now, n)

    def total(self, key: K, now: float) -> int:
        """The key's total in the window ending at `now`; 0 for an unknown key.

        A key whose window is empty is dropped here.
        """
        counter = self._counters.get(key)
        if counter is None:
            return 0
        total = counter.total(now)
        if not total:
            del self._counters[key]
        return total

    def get(self, key: K) -> SlidingCounter | None:
        """The key's counter (for `rate`), without touching its LRU place."""
        return self._counters.get(key)

    def prune(self, now: float) -> int:
        """Drop the keys whose window is empty at `now`; return how many.

        Cost is O(dropped + 1): empty keys are the least recently added ones.
        """
        counters = self._counters
        dropped = 0
        while counters:
            key, counter = next(iter(counters.items()))
            if counter.total(now):
                break
            del counters[key]
            dropped += 1
        return dropped

    def _make_room(self, now: float) -> None:
        if not self.prune(now):
            self._counters.popitem(last=False)
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._counters)

    def __contains__(self, key: object) -> bool:
        return key in self._counters

    def __iter__(self) -> Iterator[K]:
        """The keys, least recently added first (a snapshot: safe to call `total`)."""
        return iter(list(self._counters))
