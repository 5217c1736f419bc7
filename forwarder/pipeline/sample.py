"""Per-service sampling above a volume threshold, with exact accounting of what it drops.

Pure: decisions depend only on the events, the `now` passed in (monotonic seconds)
and the seed. Alarms see every event before this stage; only the table is sampled.

The rule, per service, over a sliding `window_s` (a minute by default):

- While the service's lines in the window (this one included) are at most
  threshold_per_min * window_s / 60, every line is kept.
- Above it, lines whose level is in `never_sample` (WARNING, ERROR) are still kept,
  and so is the first line of each (service, event) not kept in the last window_s, so
  a new kind of message is never invisible. Any other line is kept with probability
  p = threshold rate / observed rate (see `SlidingCounter.rate`), so about
  threshold_per_min lines a minute are kept in a steady flood (at most about twice
  that in its first minute: the lines kept before the threshold was crossed).
- A line kept with p < 1 stands for others: it carries meta["sample_rate"] = 1 / p,
  a float (10.0: "this row stands for about 10 lines of its service, level and event,
  itself included"). Lines kept for sure (p = 1) carry no sample_rate.
- Dropped lines are counted per (service, level). A service's count opens at its first
  drop; `summaries` closes it window_s later into one row:
      Event(ts=<ts of the last line it covers>, service=<service>, level=INFO,
            event="forwarder.sampled", message="sampled api: kept 512 of 5000 ...",
            meta={"dropped": {"INFO": 4488}, "kept": 512, "window_s": 60.0,
                  "first_ts": "<ts of the first dropped line, ISO 8601>"})
  where "kept" counts the service's lines kept over the same period.

Rebuilding totals in SQL (table `system_logs`, the default name). Exact line counts per
service and level: the rows present plus the dropped counts of the summary rows.

    SELECT service, level, sum(n)::bigint AS lines FROM (
        SELECT service, level, count(*) AS n
          FROM system_logs
         WHERE ts >= $1 AND ts < $2 AND event <> 'forwarder.sampled'
         GROUP BY service, level
        UNION ALL
        SELECT s.service, d.key, sum(d.value::bigint)
          FROM system_logs s, jsonb_each_text(s.meta -> 'dropped') AS d
         WHERE s.ts >= $1 AND s.ts < $2 AND s.event = 'forwarder.sampled'
         GROUP BY s.service, d.key
    ) t GROUP BY service, level ORDER BY service, level;

Estimates for any other breakdown (per event, per message pattern ...): weight each row
by its sample_rate (unbiased: 1 / the probability it was kept with). Use one method or
the other, never both: a row's sample_rate already stands for the lines dropped beside
it.

    SELECT service, event, round(sum(coalesce((meta ->> 'sample_rate')::float8, 1))) AS lines
      FROM system_logs
     WHERE ts >= $1 AND ts < $2 AND event <> 'forwarder.sampled'
     GROUP BY service, event;

A summary's ts is the ts of the last line it covers, so a time range that cuts through
a summary's period attributes all its drops to the side that holds its end.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime

from forwarder.alarms.window import KeyedWindows
from forwarder.event import Event, EventChunk, Level

SUMMARY_EVENT = "forwarder.sampled"


class _Tally:
    """What one service kept and dropped since its first drop of the period."""

    __slots__ = ("dropped", "first_ts", "kept", "last_ts", "opened")

    def __init__(self, opened: float, first_ts: datetime) -> None:
        self.opened = opened
        self.first_ts = first_ts
        self.last_ts = first_ts
        self.kept = 0
        self.dropped: dict[str, int] = {}


class Sampler:
    """Keeps, drops or weights each event; see the module docstring for the rule.

    Memory is bounded: at most `max_services` service windows (least recently seen out,
    counted in `evicted_services`; an evicted service starts again below threshold, so
    it errs towards keeping), at most `max_kinds` remembered (service, event) pairs
    (counted in `evicted_kinds`; a forgotten kind is kept again on its next line), and
    at most `max_services` open summaries (the oldest is closed early to make room, and
    returned by the next `summaries` call).
    Counters for metrics: `seen`, `dropped`, `weighted` (kept with a sample_rate).
    """

    def __init__(
        self,
        threshold_per_min: int = 500,
        never_sample: Iterable[str] = frozenset({"WARNING", "ERROR"}),
        window_s: float = 60.0,
        seed: int | None = None,
        max_services: int = 10_000,
        max_kinds: int = 100_000,
        panes: int = 60,
    ) -> None:
        if threshold_per_min < 1:
            raise ValueError(f"threshold_per_min must be >= 1, got {threshold_per_min!r}")
        if max_kinds < 1:
            raise ValueError(f"max_kinds must be >= 1, got {max_kinds!r}")
        never = frozenset(never_sample)
        unknown = never - {level.value for level in Level}
        if unknown:
            raise ValueError(f"never_sample: unknown level(s) {sorted(unknown)}")
        self.threshold_per_min = threshold_per_min
        self.never_sample = never
        self.window_s = float(window_s)
        self.max_kinds = max_kinds
        # Lines per service over the window; the threshold in those units.
        self._lines: KeyedWindows[str] = KeyedWindows(window_s, panes, max_services)
        self._limit = threshold_per_min * self.window_s / 60.0
        self._threshold_per_s = threshold_per_min / 60.0
        self._rng = random.Random(seed)
        # (service, event) -> monotonic time it was last kept; oldest first.
        self._kinds: OrderedDict[tuple[str, str], float] = OrderedDict()
        # service -> open tally, in the order they opened (= the order they fall due).
        self._tallies: OrderedDict[str, _Tally] = OrderedDict()
        self._max_tallies = max_services
        self._ready: list[Event] = []  # summaries closed early to respect the bound
        self.seen = 0
        self.dropped = 0
        self.weighted = 0
        self.evicted_kinds = 0

    @property
    def evicted_services(self) -> int:
        return self._lines.evictions

    def admit(self, event: Event, now: float) -> Event | None:
        """The event to write (itself, or a copy with meta["sample_rate"]), or None."""
        self.seen += 1
        service = event.service
        count = self._lines.add(service, now)
        tally = self._tallies.get(service)
        if tally is not None and event.ts > tally.last_ts:
            tally.last_ts = event.ts
        kind = (service, event.event)
        if count > self._limit and event.level not in self.never_sample:
            last = self._kinds.get(kind)
            if last is not None and now - last < self.window_s:
                counter = self._lines.get(service)
                assert counter is not None  # added above
                rate = round(counter.rate(now) / self._threshold_per_s, 2)
                if rate > 1.0:
                    if self._rng.random() * rate >= 1.0:
                        self._drop(event, service, tally, now)
                        return None
                    self.weighted += 1
                    event = event._replace(meta={**event.meta, "sample_rate": rate})
        self._keep_kind(kind, now)
        if tally is not None:
            tally.kept += 1
        return event

    def sample_chunk(self, chunk: EventChunk, now: float) -> EventChunk:
        """The chunk with its events sampled and its positions unchanged.

        Dropped lines still advance the checkpoint. The chunk itself is returned when
        no event was dropped or weighted.
        """
        admit = self.admit
        events: list[Event] = []
        changed = False
        for event in chunk.events:
            kept = admit(event, now)
            if kept is not event:
                changed = True
                if kept is None:
                    continue
            events.append(kept)
        return EventChunk(events, chunk.positions) if changed else chunk

    def summaries(self, now: float, *, flush: bool = False) -> list[Event]:
        """The summary rows due at `now` (every open one with `flush`, at shutdown).

        A service's tally is due window_s after its first drop, so a sampled service
        gets one row per window_s at most. Call it after every chunk and on a tick; it
        also forgets windows and kinds that went quiet. Cost O(due + 1).
        """
        out, self._ready = self._ready, []
        tallies = self._tallies
        while tallies:
            service, tally = next(iter(tallies.items()))
            if not flush and now - tally.opened < self.window_s:
                break
            del tallies[service]
            out.append(self._summary(service, tally))
        self._lines.prune(now)
        kinds = self._kinds
        while kinds:
            kind, last = next(iter(kinds.items()))
            if now - last < self.window_s:
                break
            del kinds[kind]
        return out

    def _drop(self, event: Event, service: str, tally: _Tally | None, now: float) -> None:
        self.dropped += 1
        if tally is None:
            if len(self._tallies) >= self._max_tallies:
                old_service, old = self._tallies.popitem(last=False)
                self._ready.append(self._summary(old_service, old))
            tally = self._tallies[service] = _Tally(now, event.ts)
        level = str(event.level)
        tally.dropped[level] = tally.dropped.get(level, 0) + 1

    def _keep_kind(self, kind: tuple[str, str], now: float) -> None:
        kinds = self._kinds
        if kind in kinds:
            kinds[kind] = now
            kinds.move_to_end(kind)
            return
        if len(kinds) >= self.max_kinds:
            _, last = kinds.popitem(last=False)
            if now - last < self.window_s:
                self.evicted_kinds += 1
        kinds[kind] = now

    def _summary(self, service: str, tally: _Tally) -> Event:
        dropped = dict(sorted(tally.dropped.items()))
        n_dropped = sum(dropped.values())
        per_level = ", ".join(f"{level} {n}" for level, n in dropped.items())
        return Event(
            ts=tally.last_ts,
            service=service,
            level=Level.INFO,
            event=SUMMARY_EVENT,
            message=(
                f"sampled {service}: kept {tally.kept} of {tally.kept + n_dropped} lines "
                f"above {self.threshold_per_min}/min since {tally.first_ts.isoformat()}; "
                f"dropped {per_level}"
            ),
            meta={
                "dropped": dropped,
                "kept": tally.kept,
                "window_s": self.window_s,
                "first_ts": tally.first_ts.isoformat(),
            },
        )
