"""The [sampling], [[alarms]], [notifiers.*], [probes.*] and [privacy] sections."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from forwarder.alarms import config as alarm_config
from forwarder.alarms.config import (
    AlarmSettings,
    ConsecutiveAlarmConfig,
    HealthAlarmConfig,
    MatchConfig,
    PrivacyConfig,
    SamplingConfig,
    SlackNotifierConfig,
    ThresholdAlarmConfig,
    alarm_reference_problems,
)
from forwarder.alarms.secrets import SecretError
from forwarder.event import Level
from tests.unit.test_rules import API_TOML, SEED_TOML


def load(toml: str) -> AlarmSettings:
    return AlarmSettings(**tomllib.loads(toml))


def problems(toml: str) -> list[str]:
    with pytest.raises(ValidationError) as e:
        load(toml)
    return [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.value.errors()]


def test_the_briefs_form_validates_as_written() -> None:
    s = load(API_TOML)
    [alarm] = s.alarms
    assert alarm == ThresholdAlarmConfig(
        type="threshold",
        name="api_error_burst",
        match=MatchConfig(service="api", level=Level.ERROR),
        threshold=5,
        window_s=60.0,
        actions=["ops_slack"],
    )
    assert (alarm.group_by, alarm.repeat_s, alarm.resolve_after_s, alarm.severity) == (
        None,
        3600.0,
        300.0,
        "error",
    )
    assert s.notifiers == {
        "ops_slack": SlackNotifierConfig(type="slack", webhook_url_env="SLACK_WEBHOOK_URL")
    }
    assert s.sampling == SamplingConfig()
    assert s.privacy == PrivacyConfig()


def test_the_four_seed_rules_validate() -> None:
    s = load(SEED_TOML)
    assert [(a.name, a.type) for a in s.alarms] == [
        ("api_error_burst", "threshold"),
        ("worker_behavior_engine", "consecutive"),
        ("ui_user_errors", "threshold"),
        ("redis_down", "health"),
    ]
    worker, ui, redis = s.alarms[1], s.alarms[2], s.alarms[3]
    assert isinstance(worker, ConsecutiveAlarmConfig) and worker.cycle_key == "cycle_id"
    assert isinstance(ui, ThresholdAlarmConfig) and ui.group_by == "user_id"
    assert isinstance(redis, HealthAlarmConfig) and redis.probe == "redis"
    assert sorted(s.notifiers) == [
        "api_stop",
        "ops_slack",
        "pagerduty",
        "restart_worker",
        "support_email",
    ]


def test_defaults_of_sampling_and_privacy() -> None:
    assert SamplingConfig().model_dump() == {
        "threshold_per_min": 500,
        "never_sample": [Level.WARNING, Level.ERROR],
        "window_s": 60.0,
        "seed": None,
    }
    assert PrivacyConfig().model_dump() == {
        "user_keys": ["user_id"],
        "services": ["ui"],
        "hmac_key_env": "PRIVACY_HMAC_KEY",
        "hmac_key_file": None,
    }


def test_unknown_and_missing_keys_are_errors() -> None:
    assert problems(API_TOML.replace("threshold = 5", "treshold = 5")) == [
        "alarms.0.threshold.threshold: Field required",
        "alarms.0.threshold.treshold: Extra inputs are not permitted",
    ]
    assert problems(API_TOML.replace('type = "threshold"', 'type = "treshold"'))[0].startswith(
        "alarms.0: Input tag 'treshold' found using 'type' does not match"
    )


def test_cross_references_name_the_key() -> None:
    [p] = problems(API_TOML.replace('actions = ["ops_slack"]', 'actions = ["ops_slack", "ops"]'))
    assert p == (
        ": Value error, alarms[0].actions[1]: no notifier named 'ops' "
        "(add [notifiers.ops]; defined: ops_slack)"
    )
    [p] = problems(SEED_TOML.replace('probe = "redis"\nseverity', 'probe = "redis2"\nseverity'))
    assert "alarms[3].probe: no probe named 'redis2' (add [probes.redis2]; defined: redis)" in p
    [p] = problems(API_TOML + API_TOML.split("[notifiers")[0])
    assert "alarms[1].name: two alarms are named 'api_error_burst'" in p
    assert alarm_reference_problems([], {}, {}) == []


def test_regexes_are_compiled_at_load() -> None:
    [p] = problems(API_TOML.replace('level = "ERROR" }', 'message = "(unclosed" }'))
    assert p.startswith("alarms.0.threshold.match.message: Value error, message is not a valid")


def test_a_consecutive_rule_needs_one_cycle_delimiter() -> None:
    base = SEED_TOML.replace('cycle_key = "cycle_id"\n', "")
    [p] = problems(base)
    assert p.endswith("one of end_event, cycle_key is required")
    [p] = problems(base.replace("count = 3", 'count = 3\nend_event = "e"\ncycle_key = "c"'))
    assert p.endswith("set only one of end_event, cycle_key (got end_event, cycle_key)")


def test_levels_can_be_one_or_several() -> None:
    assert MatchConfig(level="ERROR").levels() == {Level.ERROR}  # type: ignore[arg-type]
    assert MatchConfig(level=["WARNING", "ERROR"]).levels() == {Level.WARNING, Level.ERROR}  # type: ignore[arg-type]
    assert MatchConfig().levels() is None
    with pytest.raises(ValidationError):
        MatchConfig(level="FATAL")  # type: ignore[arg-type]


SLACK = "[notifiers.n]\ntype = 'slack'\n"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (SLACK, "one of webhook_url_env, webhook_url_file is required"),
        (SLACK + "webhook_url = 'https://hooks.slack.com/x'", "Extra inputs are not permitted"),
        (SLACK + "webhook_url_env = 'A'\nwebhook_url_file = '/f'", "set only one of"),
        (SLACK + "webhook_url_env = 'not a var'", "String should match pattern"),
        ("[notifiers.n]\ntype = 'pagerduty'\nrouting_key = 'R'", "Extra inputs"),
        (
            "[notifiers.n]\ntype = 'webhook'\nurl = 'http://x'\nheaders = { Authorization = 'B' }",
            "header 'Authorization' carries a credential",
        ),
        (
            "[notifiers.n]\ntype = 'http'\nurl = 'http://x'\nheaders = { 'X-API-Key' = 'B' }",
            "header 'X-API-Key' carries a credential",
        ),
        ("[notifiers.n]\ntype = 'webhook'\nhmac_secret = 's'\nurl = 'http://x'", "Extra inputs"),
        (
            "[notifiers.n]\ntype = 'email'\nhost = 'h'\nsender = 'a@b'\nto = ['c@d']\n"
            "password_env = 'P'",
            "a password is set but username is missing",
        ),
        ("[notifiers.n]\ntype = 'email'\nhost = 'h'\nsender = 'a@b'\nto = []", "at least 1"),
        ("[notifiers.n]\ntype = 'sms'", "does not match any of the expected tags"),
        ("[probes.p]\ntype = 'redis'\ninterval_s = 1\ntimeout_s = 2", "exceeds interval_s"),
        ("[probes.p]\ntype = 'http'", "Field required"),
        ("[probes.p]\ntype = 'redis'\npassword = 'x'", "Extra inputs"),
        ("[privacy]\nhmac_key_env = 'A'\nhmac_key_file = '/k'", "set only one of"),
        ("[privacy]\nhmac_key_env = ''", "String should have at least 1 character"),
    ],
)
def test_notifier_probe_and_privacy_errors(toml: str, expected: str) -> None:
    assert any(expected in p for p in problems(toml)), problems(toml)


def test_secrets_are_only_references() -> None:
    """No model has a field that could hold a secret itself: only *_env / *_file."""
    secretish = ("password", "secret", "token", "routing_key", "webhook_url", "hmac_key")
    for model in _models():
        for name in model.model_fields:
            if any(word in name for word in secretish):
                assert name.endswith(("_env", "_file")), f"{model.__name__}.{name}"


def test_every_field_has_a_description() -> None:
    for model in _models():
        for name, field in model.model_fields.items():
            if name == "type":
                continue
            assert field.description, f"{model.__name__}.{name} has no description"


def test_every_notifier_and_probe_type_loads_with_its_defaults() -> None:
    s = load(
        """
        [notifiers.slack]
        type = "slack"
        webhook_url_file = "/run/secrets/slack"
        [notifiers.pd]
        type = "pagerduty"
        routing_key_env = "PD_KEY"
        [notifiers.mail]
        type = "email"
        host = "smtp"
        sender = "f@x"
        to = ["t@x"]
        [notifiers.hook]
        type = "webhook"
        url_env = "HOOK_URL"
        hmac_secret_env = "HOOK_KEY"
        [notifiers.restart]
        type = "docker_restart"
        service = "worker"
        [notifiers.stop]
        type = "http"
        url = "http://api:8000/control/stop"
        [probes.redis]
        type = "redis"
        [probes.api]
        type = "http"
        url = "http://api:8000/system/checks/latest"
        """
    )
    n = s.notifiers
    assert n["pd"].url == "https://events.pagerduty.com/v2/enqueue"  # type: ignore[union-attr]
    assert (n["mail"].port, n["mail"].starttls) == (587, True)  # type: ignore[union-attr]
    assert n["hook"].signature_header == "X-Forwarder-Signature"  # type: ignore[union-attr]
    assert n["restart"].socket == Path("/var/run/docker.sock")  # type: ignore[union-attr]
    assert (n["stop"].method, n["stop"].timeout_s, n["stop"].retries) == ("POST", 10.0, 3)  # type: ignore[union-attr]
    r = s.probes["redis"]
    assert (r.host, r.port, r.interval_s, r.timeout_s) == ("127.0.0.1", 6379, 10.0, 2.0)  # type: ignore[union-attr]


def test_the_privacy_key_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert PrivacyConfig().load_key({"PRIVACY_HMAC_KEY": "s3cret-key"}) == b"s3cret-key"
    with pytest.raises(SecretError, match=r"privacy\.hmac_key_env: .* PRIVACY_HMAC_KEY is not set"):
        PrivacyConfig().load_key({})
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    assert PrivacyConfig(hmac_key_file=key_file).load_key({}) == b"from-a-file"
    # Nothing to hash: no key needed.
    assert PrivacyConfig(services=[]).load_key({}) is None


def test_the_sections_fit_a_settings_tree_at_the_top_level() -> None:
    # What forwarder.config.Settings will hold: the same keys at the root of the file.
    data: dict[str, Any] = tomllib.loads(SEED_TOML + "[sampling]\nthreshold_per_min = 900\n")
    assert set(data) == {"alarms", "notifiers", "probes", "sampling"}
    assert set(data) <= set(AlarmSettings.model_fields)
    assert (
        load(SEED_TOML + "[sampling]\nthreshold_per_min = 900\n").sampling.threshold_per_min == 900
    )


def _models() -> list[type[BaseModel]]:
    return [
        obj
        for obj in vars(alarm_config).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseModel)
        and obj.__module__ == alarm_config.__name__
    ]
