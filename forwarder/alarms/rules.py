"""Alarm rules: the `Alert` type and pure evaluators (no I/O, no await, `now` passed in).

Three kinds of rule, built from the `[[alarms]]` config by `build_rule`:

- `ThresholdRule`: at least `threshold` matching events within `window_s`, optionally
  per value of a meta key (`group_by`). The decision is exact: each group keeps the
  arrival times of its last matches (an event counts while `now - t < window_s`).
- `ConsecutiveRule`: `count` consecutive cycles that each hold a matching event; a cycle
  ends at an `end_event` or when meta[`cycle_key`] changes; a clean cycle resets. The
  rule fires on the first match of the Nth bad cycle (it does not wait for its end).
- `HealthRule`: a probe fails `failures` times in a row; an ok result clears it.

Each (rule, group) has one lifecycle (`_Episode`): the condition becoming true fires it,
it repeats at most every `repeat_s` while the condition holds, and it resolves once the
condition has been absent for `resolve_after_s` (ticks drive that). Every transition or
repeat that receivers must hear of is returned as an `Alert`.

Flapping: the repeat interval also bounds re-fires. After a resolution, a new firing of
the same (rule, group) within `repeat_s` of the previous firing notice is *held*: it is
firing (`firing()` shows it, `notified=False`) but announced only once `repeat_s` has
passed since that notice, and only if it still holds then; if it clears first, it
resolves silently (receivers were never told). So receivers see at most one firing
notice per `repeat_s` per (rule, group), and every firing notice is followed by exactly
one resolved notice.

Times: `now` is `Clock.monotonic()` (windows, repeat, resolve); `wall` is `Clock.now()`
(only stamped on alerts). Events are counted when they arrive, not by their own `ts`;
`RuleSet` ignores events whose `ts` is older than `max_event_age_s` (a backfill or a
replay after a restart must not raise alarms about the past).
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from forwarder.alarms.config import (
    AlarmConfig,
    ConsecutiveAlarmConfig,
    HealthAlarmConfig,
    MatchConfig,
    ThresholdAlarmConfig,
)
from forwarder.event import Event

MAX_SAMPLES = 5
SAMPLE_CHARS = 500  # a sample is a message cut here: a traceback must not bloat a payload
GROUP_CHARS = 200  # group values longer than this are cut (they key memory)
COUNT_CAP_GROUPED = 100  # arrival times kept per group (grouped rules): counts stop there
COUNT_CAP_UNGROUPED = 10_000  # ... and for an ungrouped rule
EVICT_SCAN = 8  # firing groups passed over, at most, to find one to drop

__all__ = [
    "Alert",
    "ConsecutiveRule",
    "Firing",
    "FiringRow",
    "HealthRule",
    "ProbeOutcome",
    "Rule",
    "RuleSet",
    "ThresholdRule",
    "build_rule",
    "compile_match",
]


@dataclass(frozen=True)
class Alert:
    """One lifecycle transition (or repeat) of a rule for one group; what notifiers send.

    `group` is the value of the rule's group_by key (None for ungrouped rules).
    `count`: threshold rules, the matching events within `window_s` (exact up to a cap
    of max(threshold, 100) per group, 10,000 ungrouped); consecutive rules, the
    consecutive bad cycles; health rules, the consecutive failed probe results. On a
    resolved alert it is the highest value the episode reached.
    `window_s` is set for threshold rules only. `samples` holds up to 5 messages (the
    latest matches; probe details for health rules), each cut at 500 characters.
    `started_at` is when this firing episode began (equal to `at` on a first notice,
    earlier on a repeat or a resolution); `at` is when this alert was emitted.
    """

    rule: str
    group: str | None
    state: Literal["firing", "resolved"]
    severity: str
    count: int
    window_s: float | None
    samples: tuple[str, ...]
    started_at: datetime
    at: datetime
    actions: tuple[str, ...]
    summary: str


class ProbeOutcome(Protocol):
    """What health rules read of a probe result (`forwarder.alarms.probes.ProbeResult`).

    A protocol, so this pure module does not import the probes' I/O.
    """

    @property
    def probe(self) -> str: ...  # the [probes.NAME] key
    @property
    def ok(self) -> bool: ...
    @property
    def detail(self) -> str: ...  # what was seen or what went wrong
    @property
    def at(self) -> datetime: ...


@dataclass(frozen=True, slots=True)
class Firing:
    """A (rule, group) currently firing, for status pages and `forwarder alerts`."""

    rule: str
    group: str | None
    severity: str
    count: int
    samples: tuple[str, ...]
    started_at: datetime
    notified: bool  # False while a re-fire is held back by repeat_s (see the module doc)
    clearing: bool  # the condition is absent; resolves after resolve_after_s unless it returns


@dataclass(frozen=True, slots=True)
class FiringRow:
    """A firing (rule, group) read back from system_checks after a restart."""

    rule: str
    group: str | None
    count: int
    samples: tuple[str, ...]
    started_at: datetime
    at: datetime  # when the row was written
    severity: str | None = None


# --- matching ---------------------------------------------------------------------------------


_MISSING = object()


def compile_match(m: MatchConfig) -> Callable[[Event], bool]:
    """A predicate for `m`: cheap comparisons first, the regex last."""
    service = m.service
    levels = m.levels()
    event_key = m.event
    meta_items = tuple(m.meta.items())
    search = re.compile(m.message).search if m.message is not None else None

    def match(ev: Event) -> bool:
        if service is not None and ev.service != service:
            return False
        if levels is not None and ev.level not in levels:
            return False
        if event_key is not None and ev.event != event_key:
            return False
        if meta_items:
            meta = ev.meta
            for key, value in meta_items:
                got = meta.get(key, _MISSING)
                # bool is an int in Python: True must not equal 1 here.
                if got != value or (type(got) is bool) != (type(value) is bool):
                    return False
        return search is None or search(ev.message) is not None

    return match


def _describe_match(m: MatchConfig) -> str:
    parts = []
    if m.service is not None:
        parts.append(f"service={m.service}")
    levels = m.levels()
    if levels is not None:
        parts.append("level=" + "|".join(sorted(levels)))
    if m.event is not None:
        parts.append(f"event={m.event}")
    if m.message is not None:
        parts.append(f"message~/{m.message}/")
    parts.extend(f"meta.{k}={v}" for k, v in m.meta.items())
    return " ".join(parts) or "any event"


def _sample(message: str) -> str:
    return message if len(message) <= SAMPLE_CHARS else message[: SAMPLE_CHARS - 1] + "…"


def _group_value(meta: Mapping[str, Any], key: str) -> str | None:
    value = meta.get(key)
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text[:GROUP_CHARS]


# --- the lifecycle of one (rule, group) -------------------------------------------------------


class _Episode:
    """Fire / repeat / resolve bookkeeping; kept after a resolution until repeat_s passed."""

    __slots__ = ("clear_since", "count", "firing", "last_notice", "notified", "samples", "started")

    def __init__(self) -> None:
        self.firing = False
        self.notified = False
        self.started: datetime | None = None
        self.last_notice: float | None = None  # monotonic time of the last firing notice
        self.clear_since: float | None = None  # monotonic time the condition went away
        self.count = 0  # highest count of the episode
        self.samples: tuple[str, ...] = ()


class Rule:
    """What every rule kind shares: identity, actions, timing, and the lifecycles."""

    kind: str = ""

    def __init__(self, cfg: ThresholdAlarmConfig | ConsecutiveAlarmConfig | HealthAlarmConfig):
        self.name = cfg.name
        self.severity = cfg.severity
        self.actions = tuple(cfg.actions)
        self.repeat_s = cfg.repeat_s
        self.resolve_after_s = cfg.resolve_after_s
        self.custom_summary = cfg.summary
        self.window_s: float | None = None
        self.max_episodes = 10_000
        self._episodes: dict[str | None, _Episode] = {}
        self.held = 0  # re-fires held back by repeat_s
        self.groups_evicted = 0  # groups whose counting state the LRU cap dropped
        self.episodes_dropped = 0  # fires refused because max_episodes were live

    # -- what a rule kind provides --

    def services(self) -> frozenset[str] | None:
        """The services whose events this rule reads; None: every service."""
        return frozenset()

    def on_event(self, ev: Event, now: float, wall: datetime, out: list[Alert]) -> None:
        return None

    def on_probe(self, result: ProbeOutcome, now: float, wall: datetime, out: list[Alert]) -> None:
        return None

    def _condition(self, group: str | None, now: float) -> tuple[bool, int]:
        """Whether the condition holds for `group` at `now`, and the current count."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    # -- the lifecycle --

    def _update(
        self,
        group: str | None,
        cond: bool,
        count: int,
        samples: tuple[str, ...],
        now: float,
        wall: datetime,
        out: list[Alert],
    ) -> None:
        ep = self._episodes.get(group)
        if ep is None:
            if not cond:
                return
            if len(self._episodes) >= self.max_episodes and not self._make_room():
                self.episodes_dropped += 1
                return
            ep = self._episodes[group] = _Episode()
        if cond:
            ep.clear_since = None
            ep.samples = samples
            new = not ep.firing
            if new:
                ep.firing = True
                ep.notified = False
                ep.started = wall
                ep.count = count
            else:
                ep.count = max(ep.count, count)
            if ep.last_notice is not None and now - ep.last_notice < self.repeat_s:
                if new:
                    self.held += 1  # a re-fire inside repeat_s of the last firing notice
                return
            ep.last_notice = now
            ep.notified = True
            out.append(self._alert(group, ep, "firing", count, wall))
            return
        if not ep.firing:
            return
        if ep.clear_since is None:
            ep.clear_since = now
        if now - ep.clear_since >= self.resolve_after_s:
            ep.firing = False
            if ep.notified:
                out.append(self._alert(group, ep, "resolved", ep.count, wall))
            ep.notified = False

    def _make_room(self) -> bool:
        """Forget the oldest resolved episode (its anti-flap memory) to admit a new one."""
        for group, ep in self._episodes.items():
            if not ep.firing:
                del self._episodes[group]
                return True
        return False

    def _evict(self, groups: OrderedDict[Any, Any]) -> None:
        """Drop the least recently used group's counting state, sparing firing groups.

        A firing group that is passed over moves to the recent end; after EVICT_SCAN
        firing groups in a row the oldest goes anyway (its episode then resolves).
        """
        for _ in range(EVICT_SCAN):
            group = next(iter(groups))
            ep = self._episodes.get(group)
            if ep is None or not ep.firing:
                break
            groups.move_to_end(group)
        groups.popitem(last=False)
        self.groups_evicted += 1

    def tick(self, now: float, wall: datetime, out: list[Alert]) -> None:
        """Re-evaluate every live episode: repeats, held notices, resolutions, cleanup."""
        stale: list[str | None] = []
        for group, ep in list(self._episodes.items()):
            if ep.firing:
                cond, count = self._condition(group, now)
                self._update(group, cond, count, ep.samples, now, wall, out)
            if not ep.firing and (ep.last_notice is None or now - ep.last_notice >= self.repeat_s):
                stale.append(group)
        for group in stale:
            del self._episodes[group]

    def firing(self) -> list[Firing]:
        return [
            Firing(
                rule=self.name,
                group=group,
                severity=self.severity,
                count=ep.count,
                samples=ep.samples,
                started_at=ep.started,
                notified=ep.notified,
                clearing=ep.clear_since is not None,
            )
            for group, ep in self._episodes.items()
            if ep.firing and ep.started is not None
        ]

    def reset(self, wall: datetime, out: list[Alert]) -> int:
        """Clear every group: counters and episodes (the anti-flap memory too).

        A firing that receivers were told of gets its resolved notice; returns how
        many groups were firing.
        """
        cleared = 0
        for group, ep in self._episodes.items():
            if ep.firing:
                cleared += 1
                if ep.notified:
                    out.append(self._alert(group, ep, "resolved", ep.count, wall, reset=True))
        self._episodes.clear()
        self._forget_all()
        return cleared

    def _forget_all(self) -> None:
        raise NotImplementedError

    def restore(self, row: FiringRow, now: float) -> None:
        """Rebuild a firing episode read back from system_checks after a restart.

        It counts as announced just now (no repeat before repeat_s, so a crash loop
        cannot storm), and as clearing: it resolves after resolve_after_s unless the
        condition is seen again.
        """
        ep = self._episodes.get(row.group) or _Episode()
        ep.firing = True
        ep.notified = True
        ep.started = row.started_at
        ep.last_notice = now
        ep.clear_since = now
        ep.count = row.count
        ep.samples = row.samples[:MAX_SAMPLES]
        self._episodes[row.group] = ep

    # -- alert text --

    def _alert(
        self,
        group: str | None,
        ep: _Episode,
        state: Literal["firing", "resolved"],
        count: int,
        wall: datetime,
        reset: bool = False,
    ) -> Alert:
        started = ep.started or wall
        return Alert(
            rule=self.name,
            group=group,
            state=state,
            severity=self.severity,
            count=count,
            window_s=self.window_s,
            samples=ep.samples,
            started_at=started,
            at=wall,
            actions=self.actions,
            summary=self._summary(group, state, count, wall - started, reset),
        )

    def _summary(
        self,
        group: str | None,
        state: str,
        count: int,
        lasted: timedelta,
        reset: bool,
    ) -> str:
        head = self.custom_summary or self.describe()
        where = "" if group is None else f" [{group}]"
        if state == "firing":
            return f"{self.name}{where}: {head} ({self._count_phrase(count)})"
        how = "reset by an operator" if reset else "resolved"
        return f"{self.name}{where}: {how} after {_duration(lasted)} ({head})"

    def _count_phrase(self, count: int) -> str:
        return str(count)


def _duration(d: timedelta) -> str:
    s = int(d.total_seconds())
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


# --- threshold --------------------------------------------------------------------------------


class _Window:
    """Arrival times of the latest matches of one group, and its latest messages."""

    __slots__ = ("samples", "times")

    def __init__(self, cap: int) -> None:
        self.times: deque[float] = deque(maxlen=cap)
        self.samples: deque[str] = deque(maxlen=MAX_SAMPLES)

    def count(self, now: float, window_s: float) -> int:
        times = self.times
        horizon = now - window_s
        while times and times[0] <= horizon:
            times.popleft()
        return len(times)


class ThresholdRule(Rule):
    kind = "threshold"

    def __init__(self, cfg: ThresholdAlarmConfig) -> None:
        super().__init__(cfg)
        self.cfg = cfg
        self.match = compile_match(cfg.match)
        self.threshold = cfg.threshold
        self.window_s = cfg.window_s
        self.group_by = cfg.group_by
        self.max_groups = cfg.max_groups
        self.max_episodes = cfg.max_groups
        self._cap = max(
            cfg.threshold, COUNT_CAP_UNGROUPED if cfg.group_by is None else COUNT_CAP_GROUPED
        )
        self._groups: OrderedDict[str | None, _Window] = OrderedDict()
        self.events_without_group = 0

    def services(self) -> frozenset[str] | None:
        return None if self.cfg.match.service is None else frozenset({self.cfg.match.service})

    def describe(self) -> str:
        by = f" from the same {self.group_by}" if self.group_by else ""
        return (
            f">= {self.threshold} events{by} within {self.window_s:g} s "
            f"({_describe_match(self.cfg.match)})"
        )

    def _count_phrase(self, count: int) -> str:
        more = "+" if count >= self._cap else ""
        return f"{count}{more} in {self.window_s:g} s"

    def on_event(self, ev: Event, now: float, wall: datetime, out: list[Alert]) -> None:
        if not self.match(ev):
            return
        group = None
        if self.group_by is not None:
            group = _group_value(ev.meta, self.group_by)
            if group is None:
                self.events_without_group += 1
                return
        groups = self._groups
        w = groups.get(group)
        if w is None:
            w = groups[group] = _Window(self._cap)
            if len(groups) > self.max_groups:
                self._evict(groups)
        elif self.group_by is not None:
            groups.move_to_end(group)
        w.times.append(now)
        w.samples.append(_sample(ev.message))
        count = w.count(now, self.window_s)
        cond = count >= self.threshold
        if cond or group in self._episodes:
            self._update(group, cond, count, tuple(w.samples), now, wall, out)

    def _condition(self, group: str | None, now: float) -> tuple[bool, int]:
        w = self._groups.get(group)
        if w is None:
            return False, 0
        count = w.count(now, self.window_s)
        return count >= self.threshold, count

    def _forget_all(self) -> None:
        self._groups.clear()


# --- consecutive ------------------------------------------------------------------------------


class _Cycles:
    __slots__ = ("bad_closed", "bad_now", "cycle_id", "samples")

    def __init__(self) -> None:
        self.cycle_id: object = None
        self.bad_now = False  # the current cycle holds a match
        self.bad_closed = 0  # consecutive bad cycles that have ended
        self.samples: deque[str] = deque(maxlen=MAX_SAMPLES)

    def close(self) -> None:
        self.bad_closed = self.bad_closed + 1 if self.bad_now else 0
        self.bad_now = False

    def bad(self) -> int:
        return self.bad_closed + self.bad_now


class ConsecutiveRule(Rule):
    kind = "consecutive"

    def __init__(self, cfg: ConsecutiveAlarmConfig) -> None:
        super().__init__(cfg)
        self.cfg = cfg
        self.match = compile_match(cfg.match)
        self.count = cfg.count
        self.end_event = cfg.end_event
        self.cycle_key = cfg.cycle_key
        self.cycle_service = cfg.cycle_service or cfg.match.service
        self.group_by = cfg.group_by
        self.max_groups = cfg.max_groups
        self.max_episodes = cfg.max_groups
        self._groups: OrderedDict[str | None, _Cycles] = OrderedDict()

    def services(self) -> frozenset[str] | None:
        return None if self.cycle_service is None else frozenset({self.cycle_service})

    def describe(self) -> str:
        how = f"ended by {self.end_event}" if self.end_event else f"by meta.{self.cycle_key}"
        return (
            f"{self.count} consecutive cycles ({how}) each with {_describe_match(self.cfg.match)}"
        )

    def _count_phrase(self, count: int) -> str:
        return f"{count} bad cycles in a row"

    def on_event(self, ev: Event, now: float, wall: datetime, out: list[Alert]) -> None:
        if self.cycle_service is not None and ev.service != self.cycle_service:
            return
        group = None
        if self.group_by is not None:
            group = _group_value(ev.meta, self.group_by)
            if group is None:
                return
        groups = self._groups
        st = groups.get(group)
        if st is None:
            st = groups[group] = _Cycles()
            if len(groups) > self.max_groups:
                self._evict(groups)
        elif self.group_by is not None:
            groups.move_to_end(group)
        if self.cycle_key is not None:
            cid = ev.meta.get(self.cycle_key)
            if cid is not None and cid != st.cycle_id:
                if st.cycle_id is not None:
                    st.close()
                st.cycle_id = cid
        if self.match(ev):
            st.bad_now = True
            st.samples.append(_sample(ev.message))
        if self.end_event is not None and ev.event == self.end_event:
            st.close()
        bad = st.bad()
        cond = bad >= self.count
        if cond or group in self._episodes:
            self._update(group, cond, bad, tuple(st.samples), now, wall, out)

    def _condition(self, group: str | None, now: float) -> tuple[bool, int]:
        st = self._groups.get(group)
        if st is None:
            return False, 0
        bad = st.bad()
        return bad >= self.count, bad

    def _forget_all(self) -> None:
        self._groups.clear()


# --- health -----------------------------------------------------------------------------------


class HealthRule(Rule):
    kind = "health"

    def __init__(self, cfg: HealthAlarmConfig) -> None:
        super().__init__(cfg)
        self.probe = cfg.probe
        self.failures = cfg.failures
        self._failed = 0
        self._details: deque[str] = deque(maxlen=MAX_SAMPLES)

    def services(self) -> frozenset[str] | None:
        return frozenset()

    def describe(self) -> str:
        times = "" if self.failures == 1 else f" {self.failures} times in a row"
        return f"probe {self.probe} failing{times}"

    def _count_phrase(self, count: int) -> str:
        return f"{count} failed check{'s' if count != 1 else ''} in a row"

    def on_probe(self, result: ProbeOutcome, now: float, wall: datetime, out: list[Alert]) -> None:
        if result.probe != self.probe:
            return
        if result.ok:
            self._failed = 0
            self._details.clear()
        else:
            self._failed += 1
            self._details.append(_sample(result.detail))
        cond = self._failed >= self.failures
        if cond or None in self._episodes:
            self._update(None, cond, self._failed, tuple(self._details), now, wall, out)

    def _condition(self, group: str | None, now: float) -> tuple[bool, int]:
        return self._failed >= self.failures, self._failed

    def _forget_all(self) -> None:
        self._failed = 0
        self._details.clear()


def build_rule(cfg: AlarmConfig) -> Rule:
    if isinstance(cfg, ThresholdAlarmConfig):
        return ThresholdRule(cfg)
    if isinstance(cfg, ConsecutiveAlarmConfig):
        return ConsecutiveRule(cfg)
    if isinstance(cfg, HealthAlarmConfig):
        return HealthRule(cfg)
    raise TypeError(f"unknown alarm config {type(cfg).__name__}")


# --- all rules together -----------------------------------------------------------------------


class RuleSet:
    """Every rule, with events routed by service; the pure core of the alarm engine."""

    def __init__(self, rules: Sequence[Rule], max_event_age_s: float | None = None) -> None:
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise ValueError("rule names must be unique")
        self.rules: dict[str, Rule] = {r.name: r for r in rules}
        self.max_event_age_s = max_event_age_s
        self._max_age = None if max_event_age_s is None else timedelta(seconds=max_event_age_s)
        self._any = tuple(r for r in rules if r.services() is None)
        self._by_service: dict[str, tuple[Rule, ...]] = {}
        self.events_in = 0
        self.events_stale = 0

    @classmethod
    def from_config(
        cls, alarms: Iterable[AlarmConfig], max_event_age_s: float | None = 300.0
    ) -> RuleSet:
        return cls([build_rule(a) for a in alarms], max_event_age_s)

    def _for_service(self, service: str) -> tuple[Rule, ...]:
        rules = self._by_service.get(service)
        if rules is None:
            specific = tuple(
                r for r in self.rules.values() if (s := r.services()) is not None and service in s
            )
            rules = self._by_service[service] = specific + self._any
        return rules

    def on_event(self, ev: Event, now: float, wall: datetime) -> list[Alert]:
        self.events_in += 1
        out: list[Alert] = []
        if self._max_age is not None and ev.ts < wall - self._max_age:
            self.events_stale += 1
            return out
        for rule in self._for_service(ev.service):
            rule.on_event(ev, now, wall, out)
        return out

    def on_probe(self, result: ProbeOutcome, now: float, wall: datetime) -> list[Alert]:
        out: list[Alert] = []
        for rule in self.rules.values():
            rule.on_probe(result, now, wall, out)
        return out

    def tick(self, now: float, wall: datetime) -> list[Alert]:
        out: list[Alert] = []
        for rule in self.rules.values():
            rule.tick(now, wall, out)
        return out

    def firing(self) -> list[Firing]:
        return [f for rule in self.rules.values() for f in rule.firing()]

    def reset(self, wall: datetime, rule: str | None = None) -> list[Alert]:
        """Clear one rule (or all): counters and firing state. Returns the resolved notices
        of firings receivers had been told of; KeyError for an unknown rule."""
        out: list[Alert] = []
        targets = list(self.rules.values()) if rule is None else [self.rules[rule]]
        for r in targets:
            r.reset(wall, out)
        return out

    def restore(self, rows: Iterable[FiringRow], now: float) -> list[FiringRow]:
        """Rebuild firing state read back from system_checks; returns rows of unknown rules."""
        unknown: list[FiringRow] = []
        for row in rows:
            rule = self.rules.get(row.rule)
            if rule is None:
                unknown.append(row)
            else:
                rule.restore(row, now)
        return unknown
