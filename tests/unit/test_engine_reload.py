"""A config reload replaces the alarm rules without forgetting what is firing."""

from __future__ import annotations

import tomllib

from forwarder.alarms.config import AlarmSettings
from forwarder.alarms.engine import AlarmEngine
from forwarder.alarms.rules import RuleSet
from forwarder.event import Event, Level
from tests.support import FakeClock, api_error_burst


def rules(threshold: int) -> RuleSet:
    settings = AlarmSettings(**tomllib.loads(api_error_burst(threshold)))
    return RuleSet.from_config(settings.alarms)


def error(clock: FakeClock) -> Event:
    return Event(clock.now(), "api", Level.ERROR, "db", "timeout", {})


def test_replaced_rules_keep_the_firing_alarm_without_a_second_notice() -> None:
    clock = FakeClock()
    engine = AlarmEngine(rules(5), clock)
    fired = []
    for _ in range(5):
        fired += engine.rules.on_event(error(clock), clock.monotonic(), clock.now())
    assert [(a.rule, a.state) for a in fired] == [("api_error_burst", "firing")]

    engine.replace_rules(rules(7))
    assert [f.rule for f in engine.firing()] == ["api_error_burst"]
    again = []
    for _ in range(7):  # the new threshold is reached again: still the same episode
        again += engine.rules.on_event(error(clock), clock.monotonic(), clock.now())
    assert [a for a in again if a.state == "firing"] == []


def test_replaced_rules_use_the_new_threshold() -> None:
    clock = FakeClock()
    engine = AlarmEngine(rules(5), clock)
    engine.replace_rules(rules(7))
    out = []
    for _ in range(6):
        out += engine.rules.on_event(error(clock), clock.monotonic(), clock.now())
    assert out == []  # 6 errors: under the new threshold of 7
    out += engine.rules.on_event(error(clock), clock.monotonic(), clock.now())
    assert [(a.rule, a.state) for a in out] == [("api_error_burst", "firing")]
