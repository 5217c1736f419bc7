"""Alarm rules and the engine loop, driven by a FakeClock: which alert, when, for whom."""

from __future__ import annotations

import asyncio
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from forwarder.alarms.config import AlarmSettings
from forwarder.alarms.engine import AlarmEngine
from forwarder.alarms.privacy import Pseudonymizer
from forwarder.alarms.rules import (
    SAMPLE_CHARS,
    Alert,
    FiringRow,
    RuleSet,
    ThresholdRule,
)
from forwarder.event import Event, EventChunk, Level
from forwarder.pipeline.stage import END_OF_STREAM
from tests.support import FakeClock, api_error_burst, wait_until

SLACK = """[notifiers.ops_slack]
type = "slack"
webhook_url_env = "SLACK_WEBHOOK_URL"
"""

# The brief's form: the shared api_error_burst rule with its Slack action.
API_TOML = api_error_burst() + 'actions = ["ops_slack"]\n' + SLACK

# The strategy document's four seed rules.
SEED_TOML = """
[[alarms]]
name = "api_error_burst"
type = "threshold"
match = { service = "api", level = "ERROR" }
threshold = 5
window_s = 60
actions = ["ops_slack"]

[[alarms]]
name = "worker_behavior_engine"
type = "consecutive"
match = { service = "worker", level = "ERROR", message = "behavior_engine" }
count = 3
cycle_key = "cycle_id"
severity = "warning"
actions = ["restart_worker", "pagerduty"]

[[alarms]]
name = "ui_user_errors"
type = "threshold"
match = { service = "ui", level = "ERROR" }
threshold = 10
window_s = 600
group_by = "user_id"
severity = "warning"
actions = ["support_email"]

[[alarms]]
name = "redis_down"
type = "health"
probe = "redis"
severity = "critical"
actions = ["api_stop", "pagerduty"]

[notifiers.ops_slack]
type = "slack"
webhook_url_env = "SLACK_WEBHOOK_URL"

[notifiers.pagerduty]
type = "pagerduty"
routing_key_env = "PAGERDUTY_ROUTING_KEY"

[notifiers.restart_worker]
type = "docker_restart"
service = "worker"

[notifiers.support_email]
type = "email"
host = "smtp.example.com"
sender = "forwarder@example.com"
to = ["support@example.com"]
username = "forwarder"
password_env = "SMTP_PASSWORD"

[notifiers.api_stop]
type = "http"
url = "http://api:8000/control/stop"
bearer_token_env = "API_CONTROL_TOKEN"

[probes.redis]
type = "redis"
host = "redis"
port = 6379
"""

START = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
KEY = b"k" * 32


def settings(toml: str, **extra: Any) -> AlarmSettings:
    return AlarmSettings(**tomllib.loads(toml), **extra)


def ev(
    service: str,
    level: str = "ERROR",
    message: str = "boom",
    event: str = "log",
    meta: dict[str, Any] | None = None,
    ts: datetime | None = None,
) -> Event:
    return Event(ts or START, service, Level(level), event, message, meta or {})


@dataclass(frozen=True, slots=True)
class Probe:
    """Shaped like forwarder.alarms.probes.ProbeResult, as far as rules read it."""

    probe: str
    ok: bool
    detail: str
    at: datetime


class Harness:
    """Rules from TOML, driven by a FakeClock; every call returns the alerts it produced."""

    def __init__(self, toml: str, clock: FakeClock, max_event_age_s: float | None = 300.0):
        self.clock = clock
        self.rules = RuleSet.from_config(settings(toml).alarms, max_event_age_s)

    def at(self) -> float:
        return self.clock.monotonic() - 1000.0  # seconds since the test started

    def event(self, e: Event) -> list[Alert]:
        return self.rules.on_event(e._replace(ts=self.clock.now()), *self._now())

    def events(self, *es: Event) -> list[Alert]:
        return [a for e in es for a in self.event(e)]

    def probe(self, name: str, ok: bool, detail: str = "") -> list[Alert]:
        return self.rules.on_probe(Probe(name, ok, detail, self.clock.now()), *self._now())

    def tick(self) -> list[Alert]:
        return self.rules.tick(*self._now())

    def advance(self, seconds: float) -> list[Alert]:
        self.clock.advance(seconds)
        return self.tick()

    def run_to(self, t: float, step: float = 1.0) -> list[tuple[float, Alert]]:
        """Tick every `step` seconds (the engine's tick) up to `t`; alerts with their time."""
        told = []
        while self.at() < t:
            told += [(self.at(), a) for a in self.advance(step)]
        return told

    def _now(self) -> tuple[float, datetime]:
        return self.clock.monotonic(), self.clock.now()


def brief(alerts: list[Alert]) -> list[tuple[str, str | None, str, int]]:
    return [(a.rule, a.group, a.state, a.count) for a in alerts]


# --- threshold -------------------------------------------------------------------------------


def test_the_briefs_toml_fires_once_on_the_fifth_error_within_60_s(fake_clock: FakeClock) -> None:
    h = Harness(API_TOML, fake_clock)
    for i in range(4):
        assert h.event(ev("api", message=f"err {i}")) == []
        fake_clock.advance(10)
    fake_clock.advance(9)  # t = 49: the first error (t = 0) is still inside the window
    [alert] = h.event(ev("api", message="err 4"))
    at = START + timedelta(seconds=49)
    assert alert == Alert(
        rule="api_error_burst",
        group=None,
        state="firing",
        severity="error",
        count=5,
        window_s=60.0,
        samples=("err 0", "err 1", "err 2", "err 3", "err 4"),
        started_at=at,
        at=at,
        actions=("ops_slack",),
        summary="api_error_burst: >= 5 events within 60 s (service=api level=ERROR) (5 in 60 s)",
    )
    # More errors while firing: no new alert before repeat_s.
    assert h.event(ev("api")) == []
    assert h.tick() == []


def test_an_event_counts_for_exactly_window_s(fake_clock: FakeClock) -> None:
    h = Harness(API_TOML, fake_clock)
    for _ in range(4):
        assert h.event(ev("api")) == []
        fake_clock.advance(15)
    # t = 60: the error of t = 0 has left the window (an event counts while now - t < 60).
    assert h.event(ev("api")) == []
    fake_clock.advance(14.999)  # t = 74.999: errors at 15, 30, 45, 60 are in
    assert brief(h.event(ev("api"))) == [("api_error_burst", None, "firing", 5)]


def test_only_matching_events_count(fake_clock: FakeClock) -> None:
    h = Harness(API_TOML, fake_clock)
    noise = [ev("api", "WARNING"), ev("api", "INFO"), ev("worker"), ev("ui"), ev("apix")]
    assert h.events(*(noise * 10)) == []
    assert h.events(*[ev("api")] * 4) == []
    assert brief(h.event(ev("api"))) == [("api_error_burst", None, "firing", 5)]


def test_repeat_at_most_every_repeat_s_while_the_condition_holds(fake_clock: FakeClock) -> None:
    toml = API_TOML.replace("window_s = 60", "window_s = 60\nrepeat_s = 300")
    h = Harness(toml, fake_clock)
    assert len(h.events(*[ev("api")] * 5)) == 1  # t = 0
    repeats: list[tuple[float, int]] = []
    for _ in range(70):  # an error every 10 s for 700 s: 6 in each window
        fake_clock.advance(10)
        for a in h.event(ev("api")) + h.tick():
            assert a.state == "firing" and a.started_at == START
            repeats.append((h.at(), a.count))
    assert repeats == [(300.0, 6), (600.0, 6)]


def test_resolves_resolve_after_s_after_the_condition_went_away(fake_clock: FakeClock) -> None:
    toml = API_TOML.replace("window_s = 60", "window_s = 60\nresolve_after_s = 120")
    h = Harness(toml, fake_clock)
    h.events(*[ev("api")] * 7)  # t = 0: fires with 5, then 7 in the window
    assert h.advance(59.9) == []  # still 7 in the window
    assert h.advance(0.1) == []  # t = 60: the window is empty, the 120 s start now
    assert h.advance(119.9) == []
    [resolved] = h.advance(0.1)  # t = 180
    assert (resolved.state, resolved.count, resolved.started_at) == ("resolved", 7, START)
    assert resolved.at == START + timedelta(seconds=180)
    assert resolved.summary.startswith("api_error_burst: resolved after 3 min")
    assert h.advance(1000) == []  # resolved once
    assert h.rules.firing() == []


def test_the_condition_returning_before_resolve_after_s_keeps_it_firing(
    fake_clock: FakeClock,
) -> None:
    h = Harness(API_TOML, fake_clock)  # resolve_after_s = 300 by default
    h.events(*[ev("api")] * 5)
    assert h.run_to(200) == []  # clearing since t = 60
    [f] = h.rules.firing()
    assert f.clearing and f.notified
    assert h.events(*[ev("api")] * 5) == []  # back before 360: same episode, no notice
    assert not h.rules.firing()[0].clearing
    told = h.run_to(1000)  # clearing again from 260: resolved at 560
    assert [(t, a.state, a.count) for t, a in told] == [(560.0, "resolved", 5)]


def test_flapping_a_refire_within_repeat_s_is_held_then_told_or_dropped(
    fake_clock: FakeClock,
) -> None:
    toml = API_TOML.replace("window_s = 60", "window_s = 60\nresolve_after_s = 10\nrepeat_s = 600")
    h = Harness(toml, fake_clock)
    told: list[tuple[float, str]] = []

    def burst() -> None:
        for a in h.events(*[ev("api")] * 5):
            told.append((h.at(), a.state))

    def run_to(t: float) -> None:
        while h.at() < t:
            for a in h.advance(1):
                told.append((h.at(), a.state))

    burst()  # t = 0: fire
    run_to(100)  # clear at 60, resolved at 70
    burst()  # t = 100: re-fire inside repeat_s of the notice at 0: held
    [f] = h.rules.firing()
    assert (f.notified, f.started_at) == (False, START + timedelta(seconds=100))
    run_to(300)  # clears at 160, resolves silently at 170 (nobody was told)
    assert h.rules.firing() == []
    run_to(590)
    burst()  # t = 590: held again (notice at 0 + 600 > 590) ...
    run_to(600)  # ... and told at 600, the window still full
    run_to(700)
    assert told == [(0, "firing"), (70, "resolved"), (600, "firing"), (660, "resolved")]
    assert h.rules.rules["api_error_burst"].held == 2


def test_group_by_user_after_pseudonymization(fake_clock: FakeClock) -> None:
    h = Harness(SEED_TOML, fake_clock)
    privacy = Pseudonymizer(KEY, ["user_id"], ["ui"])
    alice, bob = privacy.token("alice"), privacy.token(42)

    def ui_error(user: object) -> list[Alert]:
        return h.event(privacy.apply(ev("ui", meta={"user_id": user})))

    for _ in range(9):
        assert ui_error("alice") == [] and ui_error(42) == []
        fake_clock.advance(60)  # t = 540 after the loop
    assert h.event(ev("ui")) == []  # no user_id: not counted in any group
    assert h.event(ev("ui", "WARNING", meta={"user_id": "alice"})) == []
    [a] = ui_error("alice")
    assert (a.rule, a.group, a.count, a.window_s, a.severity) == (
        "ui_user_errors",
        alice,
        10,
        600.0,
        "warning",
    )
    assert a.actions == ("support_email",)
    assert "alice" not in repr(a)
    fake_clock.advance(59.999)  # bob's first error (t = 0) is 599.999 s old
    assert brief(ui_error(42)) == [("ui_user_errors", bob, "firing", 10)]
    rule = h.rules.rules["ui_user_errors"]
    assert rule.events_without_group == 1  # type: ignore[attr-defined]


def test_groups_are_bounded_least_recently_used_first(fake_clock: FakeClock) -> None:
    toml = """
    [[alarms]]
    name = "per_user"
    type = "threshold"
    match = { service = "ui" }
    threshold = 2
    window_s = 600
    group_by = "user_id"
    max_groups = 3
    """
    h = Harness(toml, fake_clock)
    rule = h.rules.rules["per_user"]
    assert isinstance(rule, ThresholdRule)
    for user in ("a", "b", "c"):
        assert h.event(ev("ui", meta={"user_id": user})) == []
    h.event(ev("ui", meta={"user_id": "a"}))  # a fires and becomes the most recent
    for i in range(1000):  # a flood of distinct users
        h.event(ev("ui", meta={"user_id": f"flood{i}"}))
    assert len(rule._groups) == 3
    assert rule.groups_evicted == 1000
    assert "a" in rule._groups  # a firing group's count is spared while others can go
    # b was dropped with its count: its next error is its first again.
    assert h.event(ev("ui", meta={"user_id": "b"})) == []
    assert [f.group for f in h.rules.firing()] == ["a"]


def test_firing_groups_are_bounded_and_resolved_ones_make_room(fake_clock: FakeClock) -> None:
    toml = """
    [[alarms]]
    name = "per_user"
    type = "threshold"
    match = { service = "ui" }
    threshold = 1
    window_s = 10
    resolve_after_s = 0
    group_by = "user_id"
    max_groups = 2
    """
    h = Harness(toml, fake_clock)
    rule = h.rules.rules["per_user"]
    assert len(h.events(*[ev("ui", meta={"user_id": u}) for u in "abc"])) == 2
    assert rule.episodes_dropped == 1  # c: two groups already firing
    assert [(t, a.group, a.state) for t, a in h.run_to(10)] == [
        (10.0, "a", "resolved"),
        (10.0, "b", "resolved"),
    ]
    # a and b are resolved but remembered (repeat_s); c may take the place of one.
    assert brief(h.event(ev("ui", meta={"user_id": "c"}))) == [("per_user", "c", "firing", 1)]


def test_meta_equality_and_message_regex(fake_clock: FakeClock) -> None:
    toml = """
    [[alarms]]
    name = "m"
    type = "threshold"
    match = { service = "api", event = "db", message = "timeout|deadlock", meta = { retry = true, shard = 2 } }
    threshold = 1
    """  # noqa: E501
    h = Harness(toml, fake_clock)
    good = {"retry": True, "shard": 2}
    assert h.event(ev("api", event="db", message="lock wait", meta=good)) == []
    assert h.event(ev("api", event="db", message="timeout", meta={"retry": 1, "shard": 2})) == []
    assert h.event(ev("api", event="db", message="timeout", meta={"retry": True})) == []
    assert h.event(ev("api", event="web", message="timeout", meta=good)) == []
    [a] = h.event(ev("api", "INFO", event="db", message="a deadlock here", meta=good))
    assert a.samples == ("a deadlock here",)


def test_samples_are_the_last_five_and_cut(fake_clock: FakeClock) -> None:
    h = Harness(API_TOML.replace("threshold = 5", "threshold = 7"), fake_clock)
    alerts = h.events(
        *[ev("api", message=f"m{i}") for i in range(6)], ev("api", message="x" * 9000)
    )
    [a] = alerts
    assert a.samples[:4] == ("m2", "m3", "m4", "m5")
    assert len(a.samples[4]) == SAMPLE_CHARS and a.samples[4].endswith("…")


def test_old_events_do_not_raise_alarms(fake_clock: FakeClock) -> None:
    h = Harness(API_TOML, fake_clock, max_event_age_s=300)
    old = fake_clock.now() - timedelta(seconds=301)
    for _ in range(10):
        assert h.rules.on_event(ev("api", ts=old), fake_clock.monotonic(), fake_clock.now()) == []
    assert h.rules.events_stale == 10


# --- consecutive ----------------------------------------------------------------------------


def worker(cycle: int, bad: bool, message: str | None = None) -> Event:
    if bad:
        msg = message or "behavior_engine raised KeyError"
        return ev("worker", "ERROR", msg, meta={"cycle_id": cycle})
    return ev("worker", "INFO", "cycle step", meta={"cycle_id": cycle})


def test_three_consecutive_bad_cycles_fire_on_the_first_match_of_the_third(
    fake_clock: FakeClock,
) -> None:
    h = Harness(SEED_TOML, fake_clock)
    assert h.events(worker(1, False), worker(1, True), worker(1, False)) == []
    assert h.events(worker(2, True), worker(2, True)) == []
    assert h.events(worker(3, False)) == []
    fake_clock.advance(5)
    [a] = h.events(worker(3, True, "behavior_engine: boom"), worker(3, True))
    assert (a.rule, a.group, a.state, a.count, a.window_s) == (
        "worker_behavior_engine",
        None,
        "firing",
        3,
        None,
    )
    assert a.actions == ("restart_worker", "pagerduty") and a.severity == "warning"
    assert a.samples == ("behavior_engine raised KeyError",) * 3 + ("behavior_engine: boom",)
    assert a.summary.endswith("(3 bad cycles in a row)")


def test_a_clean_cycle_resets_the_count_and_then_resolves(fake_clock: FakeClock) -> None:
    toml = SEED_TOML.replace(
        'cycle_key = "cycle_id"', 'cycle_key = "cycle_id"\nresolve_after_s = 30'
    )
    h = Harness(toml, fake_clock)
    h.events(worker(1, True), worker(2, True), worker(3, False), worker(4, True), worker(5, True))
    assert h.rules.firing() == []  # cycle 3 was clean: 2 in a row only
    assert brief(h.events(worker(6, True))) == [("worker_behavior_engine", None, "firing", 3)]
    assert h.events(worker(7, True), worker(8, False)) == []  # 8 is not over yet
    assert h.advance(100) == []  # still 4 in a row until cycle 8 closes
    assert h.events(worker(9, False)) == []  # cycle 8 closed clean: clearing from now
    assert h.advance(29.9) == []
    assert brief(h.advance(0.1)) == [("worker_behavior_engine", None, "resolved", 4)]


def test_cycles_ended_by_an_end_event_and_counted_per_group(fake_clock: FakeClock) -> None:
    toml = """
    [[alarms]]
    name = "w"
    type = "consecutive"
    match = { service = "worker", message = "behavior_engine" }
    count = 2
    end_event = "cycle.end"
    group_by = "worker_id"
    """
    h = Harness(toml, fake_clock)

    def say(w: str, message: str, event: str = "log") -> list[Alert]:
        return h.event(ev("worker", "ERROR", message, event, {"worker_id": w}))

    assert say("a", "behavior_engine failed") == []
    assert say("b", "behavior_engine failed") == []
    assert say("a", "done", "cycle.end") == []
    assert say("b", "done", "cycle.end") == []
    assert say("b", "all good", "cycle.end") == []  # b: a clean cycle
    assert brief(say("a", "behavior_engine failed again")) == [("w", "a", "firing", 2)]
    assert say("b", "behavior_engine failed") == []  # b has 1 in a row


# --- health ---------------------------------------------------------------------------------


def test_a_failing_probe_fires_and_its_recovery_resolves(fake_clock: FakeClock) -> None:
    toml = SEED_TOML.replace('probe = "redis"', 'probe = "redis"\nresolve_after_s = 20')
    h = Harness(toml, fake_clock)
    assert h.probe("redis", True, "PONG") == []
    assert h.probe("postgres", False, "refused") == []  # another probe
    [a] = h.probe("redis", False, "connection refused")
    assert (a.rule, a.state, a.count, a.severity, a.samples) == (
        "redis_down",
        "firing",
        1,
        "critical",
        ("connection refused",),
    )
    assert a.actions == ("api_stop", "pagerduty")
    fake_clock.advance(10)
    assert h.probe("redis", False, "timeout after 2 s") == []
    fake_clock.advance(10)
    assert h.probe("redis", True, "PONG") == []  # clearing from t = 20
    assert h.advance(19) == []
    [r] = h.advance(1)
    assert (r.state, r.count) == ("resolved", 2)
    assert r.samples == ("connection refused", "timeout after 2 s")
    assert r.started_at == START and r.at == START + timedelta(seconds=40)


def test_failures_in_a_row(fake_clock: FakeClock) -> None:
    h = Harness(SEED_TOML.replace('probe = "redis"', 'probe = "redis"\nfailures = 3'), fake_clock)
    assert h.probe("redis", False) + h.probe("redis", False) + h.probe("redis", True) == []
    assert h.probe("redis", False) + h.probe("redis", False) == []
    assert brief(h.probe("redis", False)) == [("redis_down", None, "firing", 3)]


# --- reset and restore ----------------------------------------------------------------------


def test_reset_resolves_what_was_told_and_clears_the_counts(fake_clock: FakeClock) -> None:
    h = Harness(SEED_TOML, fake_clock)
    h.events(*[ev("api")] * 5)
    h.probe("redis", False, "down")
    fake_clock.advance(30)
    [r] = h.rules.reset(fake_clock.now(), "api_error_burst")
    assert (r.rule, r.state, r.count) == ("api_error_burst", "resolved", 5)
    assert "reset by an operator" in r.summary
    assert [f.rule for f in h.rules.firing()] == ["redis_down"]
    # The counts went too: four more errors do not fire, and no anti-flap hold remains.
    assert h.events(*[ev("api")] * 4) == []
    assert brief(h.event(ev("api"))) == [("api_error_burst", None, "firing", 5)]
    assert brief(h.rules.reset(fake_clock.now())) == [
        ("api_error_burst", None, "resolved", 5),
        ("redis_down", None, "resolved", 1),
    ]
    with pytest.raises(KeyError):
        h.rules.reset(fake_clock.now(), "nope")


def test_restore_rebuilds_firing_state_without_a_notice_storm(fake_clock: FakeClock) -> None:
    toml = SEED_TOML.replace(
        "window_s = 60\n", "window_s = 60\nrepeat_s = 100\nresolve_after_s = 50\n"
    )
    h = Harness(toml, fake_clock)
    earlier = START - timedelta(hours=1)
    rows = [
        FiringRow("api_error_burst", None, 9, ("a", "b"), earlier, earlier),
        FiringRow("gone_rule", None, 1, (), earlier, earlier),
    ]
    assert h.rules.restore(rows, fake_clock.monotonic()) == [rows[1]]
    [f] = h.rules.firing()
    assert (f.rule, f.count, f.samples, f.started_at, f.notified, f.clearing) == (
        "api_error_burst",
        9,
        ("a", "b"),
        earlier,
        True,
        True,  # resolves unless the condition is seen again
    )
    told: list[tuple[float, str, int]] = []
    for _ in range(12):  # an error every 10 s: the condition is back from the 5th
        told += [(h.at(), a.state, a.count) for a in h.event(ev("api")) + h.advance(10)]
    # The restart counts as a notice: the first repeat comes repeat_s after it.
    assert told == [(100.0, "firing", 5)]


def test_a_restored_firing_resolves_if_the_condition_never_returns(
    fake_clock: FakeClock,
) -> None:
    h = Harness(
        SEED_TOML.replace('probe = "redis"', 'probe = "redis"\nresolve_after_s = 50'), fake_clock
    )
    earlier = START - timedelta(minutes=5)
    h.rules.restore([FiringRow("redis_down", None, 4, ("refused",), earlier, earlier)], 1000.0)
    assert h.advance(49.9) == []
    [r] = h.advance(0.1)
    assert (r.rule, r.state, r.count, r.samples, r.started_at) == (
        "redis_down",
        "resolved",
        4,
        ("refused",),
        earlier,
    )


# --- the engine loop ------------------------------------------------------------------------


async def test_engine_emits_resolves_on_ticks_and_ends_on_end_of_stream(
    fake_clock: FakeClock,
) -> None:
    toml = API_TOML.replace("window_s = 60", "window_s = 60\nresolve_after_s = 5")
    engine = AlarmEngine(RuleSet.from_config(settings(toml).alarms), fake_clock, tick_s=0.01)
    events_in: asyncio.Queue[Any] = asyncio.Queue(maxsize=10)
    probes_in: asyncio.Queue[Any] = asyncio.Queue()
    alerts_out: asyncio.Queue[Any] = asyncio.Queue(maxsize=10)
    records_out: asyncio.Queue[Any] = asyncio.Queue(maxsize=10)
    stop = asyncio.Event()
    task = asyncio.create_task(
        engine.run(events_in, probes_in, alerts_out, stop, records_out=records_out)
    )
    await events_in.put(EventChunk([ev("api")] * 3))
    await events_in.put(ev("api"))
    await events_in.put(EventChunk([ev("api")]))
    fired = await asyncio.wait_for(alerts_out.get(), 5)
    assert (fired.state, fired.count) == ("firing", 5)
    assert [f.rule for f in engine.firing()] == ["api_error_burst"]
    fake_clock.advance(65)  # the window empties; resolution needs 5 more s of ticks
    await wait_until(lambda: engine.firing()[0].clearing, what="clearing")
    fake_clock.advance(5)
    resolved = await asyncio.wait_for(alerts_out.get(), 5)
    assert (resolved.state, resolved.at) == ("resolved", START + timedelta(seconds=70))
    await events_in.put(END_OF_STREAM)
    await asyncio.wait_for(task, 5)
    assert alerts_out.get_nowait() is END_OF_STREAM
    assert [records_out.get_nowait() for _ in range(3)] == [fired, resolved, END_OF_STREAM]
    assert engine.status()["events_in"] == 5 and engine.status()["state"] == "stopped"


async def test_a_full_alert_queue_drops_and_counts_never_blocks(fake_clock: FakeClock) -> None:
    toml = """
    [[alarms]]
    name = "per_user"
    type = "threshold"
    match = { service = "ui" }
    threshold = 1
    group_by = "user_id"
    """
    engine = AlarmEngine(RuleSet.from_config(settings(toml).alarms), fake_clock, tick_s=0.01)
    events_in: asyncio.Queue[Any] = asyncio.Queue(maxsize=2)
    alerts_out: asyncio.Queue[Any] = asyncio.Queue(maxsize=3)
    task = asyncio.create_task(engine.run(events_in, asyncio.Queue(), alerts_out, asyncio.Event()))
    for i in range(50):  # nobody reads alerts_out: ingestion goes on regardless
        await events_in.put(ev("ui", meta={"user_id": f"u{i}"}))
    await events_in.put(END_OF_STREAM)
    consumer_gone = asyncio.create_task(asyncio.wait_for(task, 5))
    await wait_until(lambda: engine.events_in == 50, what="50 events evaluated")
    assert engine.alerts_out == 50 and engine.alerts_dropped == 47
    assert engine.status()["state"] in ("degraded", "stopping")
    [alerts_out.get_nowait() for _ in range(3)]  # room for the end marker
    await consumer_gone
    assert alerts_out.get_nowait() is END_OF_STREAM


async def test_engine_reads_probe_results_and_reset_offers_the_resolution(
    fake_clock: FakeClock,
) -> None:
    engine = AlarmEngine(RuleSet.from_config(settings(SEED_TOML).alarms), fake_clock, tick_s=0.01)
    events_in: asyncio.Queue[Any] = asyncio.Queue()
    probes_in: asyncio.Queue[Any] = asyncio.Queue()
    alerts_out: asyncio.Queue[Any] = asyncio.Queue()
    task = asyncio.create_task(engine.run(events_in, probes_in, alerts_out, asyncio.Event()))
    await probes_in.put(Probe("redis", False, "connection refused", START))
    fired = await asyncio.wait_for(alerts_out.get(), 5)
    assert (fired.rule, fired.state, fired.samples) == (
        "redis_down",
        "firing",
        ("connection refused",),
    )
    [resolved] = engine.reset("redis_down")
    assert await asyncio.wait_for(alerts_out.get(), 5) == resolved
    assert engine.firing() == []
    await events_in.put(END_OF_STREAM)
    await asyncio.wait_for(task, 5)


# --- benchmark (not a test): python -m tests.unit.test_rules [events] -------------------------


def _bench_events(n: int) -> list[Event]:
    """A mix of the seed services: mostly INFO; api 5% ERROR; worker cycles of 50 lines
    with a behavior_engine error in 2%; ui 10% ERROR from 5,000 (hashed) users."""
    import random

    rnd = random.Random(7)
    privacy = Pseudonymizer(KEY, ["user_id"], ["ui"])
    out: list[Event] = []
    for i in range(n):
        r = rnd.random()
        if r < 0.4:
            level = "ERROR" if rnd.random() < 0.05 else "INFO"
            out.append(ev("api", level, "GET /bots 500", "http.request", {"status": 500}))
        elif r < 0.7:
            bad = rnd.random() < 0.02
            msg = "behavior_engine raised KeyError" if bad else "step done"
            out.append(ev("worker", "ERROR" if bad else "INFO", msg, meta={"cycle_id": i // 50}))
        else:
            level = "ERROR" if rnd.random() < 0.1 else "INFO"
            meta = {"user_id": f"user{rnd.randrange(5000)}", "page": "/dashboard"}
            out.append(privacy.apply(ev("ui", level, "TypeError: x is undefined", meta=meta)))
    return out


def bench(n: int = 1_000_000) -> None:
    import time

    clock = FakeClock()
    events = [e._replace(ts=clock.now()) for e in _bench_events(n)]
    alarms = settings(SEED_TOML).alarms

    rules = RuleSet.from_config(alarms)
    alerts = 0
    t0 = time.perf_counter()
    for i, e in enumerate(events):
        alerts += len(rules.on_event(e, 1000.0 + i / 10_000, clock.now()))
        if i % 10_000 == 0:  # the engine ticks once a second; here 10,000 events a second
            alerts += len(rules.tick(1000.0 + i / 10_000, clock.now()))
    pure = n / (time.perf_counter() - t0)

    async def through_engine() -> float:
        engine = AlarmEngine(RuleSet.from_config(alarms), clock, tick_s=1.0)
        events_in: asyncio.Queue[Any] = asyncio.Queue(maxsize=16)
        alerts_out: asyncio.Queue[Any] = asyncio.Queue(maxsize=100_000)
        task = asyncio.create_task(
            engine.run(events_in, asyncio.Queue(), alerts_out, asyncio.Event())
        )
        t0 = time.perf_counter()
        for k in range(0, n, 500):  # chunks of 500 events, as the pipeline hands them over
            await events_in.put(EventChunk(events[k : k + 500]))
        await events_in.put(END_OF_STREAM)
        await task
        return n / (time.perf_counter() - t0)

    looped = asyncio.run(through_engine())
    print(
        f"{n} events, 4 seed rules: {pure:,.0f} events/s through RuleSet.on_event, "
        f"{looped:,.0f} events/s through AlarmEngine.run (chunks of 500); {alerts} alerts"
    )


if __name__ == "__main__":
    import sys

    bench(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
