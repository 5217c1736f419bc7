"""The alarm engine: the thin async loop around the pure rules of `rules.py`.

It takes events (EventChunks or single Events) and probe results from its input
queues, ticks the rules at least every `tick_s` (repeats, held notices and
resolutions need time to pass without input), and offers every Alert to
`alerts_out` (and to `records_out`, the system_checks writer, when given) with
`put_nowait`: when a queue is full the alert is dropped and counted, so a slow
notifier or database never stalls ingestion.

The rules see events as they arrive, before sampling, already pseudonymized.
Time comes from the injected clock: `monotonic()` for the rules' windows and timers,
`now()` only to stamp alerts. One `now` serves a whole batch of events taken from the
queue without waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from forwarder.alarms.rules import Alert, Firing, FiringRow, ProbeOutcome, Rule, RuleSet
from forwarder.clock import Clock
from forwarder.event import Event, EventChunk
from forwarder.pipeline.stage import END_OF_STREAM, EndOfStream

log = logging.getLogger(__name__)

COMPONENT = "alarms.engine"
DROP_LOG_EVERY = 100  # a full alert queue logs its first drop, then every 100th

AlertQueue = asyncio.Queue[Alert | EndOfStream]


class AlarmEngine:
    """Feeds events, probe results and ticks to the rules; emits Alerts without blocking."""

    def __init__(
        self,
        rules: RuleSet | Sequence[Rule],
        clock: Clock,
        *,
        tick_s: float = 1.0,
        batch: int = 1024,
    ) -> None:
        if tick_s <= 0:
            raise ValueError("tick_s must be > 0")
        self.rules = rules if isinstance(rules, RuleSet) else RuleSet(rules)
        self.clock = clock
        self.tick_s = tick_s
        self.batch = batch
        self._outs: tuple[AlertQueue, ...] = ()
        self._state = "starting"
        self.events_in = 0
        self.probe_results_in = 0
        self.ticks = 0
        self.alerts_out = 0
        self.alerts_dropped = 0  # alerts a full queue refused (per queue)

    # -- status --

    def firing(self) -> list[Firing]:
        """Every (rule, group) firing now, held re-fires included (notified=False)."""
        return self.rules.firing()

    def status(self) -> dict[str, Any]:
        state, reason = self._state, None
        if state == "ok" and self.alerts_dropped:
            state, reason = "degraded", f"{self.alerts_dropped} alerts dropped (queue full)"
        rules = self.rules.rules.values()
        return {
            "state": state,
            "reason": reason,
            "events_in": self.events_in,
            "events_stale": self.rules.events_stale,
            "probe_results_in": self.probe_results_in,
            "ticks": self.ticks,
            "alerts_out": self.alerts_out,
            "alerts_dropped": self.alerts_dropped,
            "firing": len(self.firing()),
            "refires_held": sum(r.held for r in rules),
            "groups_evicted": sum(getattr(r, "groups_evicted", 0) for r in rules),
        }

    # -- operator actions --

    def replace_rules(self, rules: RuleSet) -> None:
        """Evaluate with `rules` from now on, keeping what is firing (a config reload).

        Counting windows start empty; every (rule, group) that fires and still exists
        in the new rules carries on without a second firing notice.
        """
        wall = self.clock.now()
        rows = [
            FiringRow(f.rule, f.group, f.count, f.samples, f.started_at, wall, f.severity)
            for f in self.rules.firing()
        ]
        rules.restore(rows, self.clock.monotonic())
        self.rules = rules

    def restore(self, rows: Iterable[FiringRow]) -> list[FiringRow]:
        """Rebuild firing state from system_checks rows (`state.load_firing`) at start.

        Returns the rows whose rule no longer exists (reset them with `state.reset`).
        """
        unknown = self.rules.restore(rows, self.clock.monotonic())
        for row in unknown:
            log.warning(
                "system_checks says alarm %s is firing, but no such rule is configured",
                row.rule,
                extra={"component": COMPONENT},
            )
        return unknown

    def reset(self, rule: str | None = None) -> list[Alert]:
        """Clear one rule (or all, rule=None): its counters and firing state.

        The resolved notices of firings receivers were told of are offered to the
        output queues when the engine runs, and returned (KeyError: unknown rule).
        """
        alerts = self.rules.reset(self.clock.now(), rule)
        self._emit(alerts)
        return alerts

    # -- the loop --

    async def run(
        self,
        events_in: asyncio.Queue[EventChunk | Event | EndOfStream],
        probe_results_in: asyncio.Queue[ProbeOutcome],
        alerts_out: AlertQueue,
        stop: asyncio.Event,
        *,
        records_out: AlertQueue | None = None,
    ) -> None:
        """Evaluate until END_OF_STREAM arrives on `events_in`; then pass it on and return.

        Probe results are taken whenever the loop wakes, at least every `tick_s`.
        `stop` (the daemon's first signal) does not end the loop by itself: it reads
        `events_in` until END_OF_STREAM, since the drain goes in flow order and a
        producer must never be left blocked on a queue nobody reads. Cancel the task
        to force an end.
        """
        self._outs = (alerts_out,) if records_out is None else (alerts_out, records_out)
        clock = self.clock
        tick_s = self.tick_s
        next_tick = clock.monotonic() + tick_s
        self._state = "ok"
        try:
            while True:
                if events_in.empty():
                    try:
                        async with asyncio.timeout(tick_s):
                            item = await events_in.get()
                    except TimeoutError:
                        item = None
                else:
                    item = events_in.get_nowait()
                now = clock.monotonic()
                rules = self.rules  # read per round: a reload (SIGHUP) may replace it
                if item is not None:
                    wall = clock.now()
                    taken = 0
                    while True:
                        if item is END_OF_STREAM or isinstance(item, EndOfStream):
                            self._drain_probes(probe_results_in, now, wall)
                            self._emit(rules.tick(now, wall))
                            self._state = "stopping"
                            for out in self._outs:
                                await out.put(END_OF_STREAM)
                            return
                        if type(item) is EventChunk:
                            for ev in item.events:
                                self._emit(rules.on_event(ev, now, wall))
                            self.events_in += len(item.events)
                        else:
                            self._emit(rules.on_event(item, now, wall))  # type: ignore[arg-type]
                            self.events_in += 1
                        taken += 1
                        if taken >= self.batch or events_in.empty():
                            break
                        item = events_in.get_nowait()
                if not probe_results_in.empty():
                    self._drain_probes(probe_results_in, now, clock.now())
                if item is None or now >= next_tick:
                    self.ticks += 1
                    self._emit(rules.tick(now, clock.now()))
                    next_tick = now + tick_s
                if item is not None:
                    await asyncio.sleep(0)  # after each batch: let the other loops run
        finally:
            self._state = "stopped"

    def _drain_probes(
        self, probe_results_in: asyncio.Queue[ProbeOutcome], now: float, wall: datetime
    ) -> None:
        while not probe_results_in.empty():
            result = probe_results_in.get_nowait()
            self.probe_results_in += 1
            self._emit(self.rules.on_probe(result, now, wall))

    def _emit(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            self.alerts_out += 1
            for out in self._outs:
                self._offer(out, alert)

    def _offer(self, queue: AlertQueue, alert: Alert) -> bool:
        """Put `alert` without waiting; count (and rate-limit the log of) a drop when full."""
        try:
            queue.put_nowait(alert)
            return True
        except asyncio.QueueFull:
            self.alerts_dropped += 1
            if self.alerts_dropped % DROP_LOG_EVERY == 1:
                log.warning(
                    "alert queue full: dropped the %s alert of %s (%d dropped so far)",
                    alert.state,
                    alert.rule,
                    self.alerts_dropped,
                    extra={"component": COMPONENT, "rule": alert.rule},
                )
            return False
