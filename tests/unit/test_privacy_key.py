"""Where the privacy key comes from when the config does not name one."""

from __future__ import annotations

from pathlib import Path

import pytest

from forwarder.alarms.wiring import AlarmSetupError, build_privacy
from forwarder.config import parse_config


def settings_for(tmp_path: Path, privacy: dict | None = None) -> object:
    data = {"database": {"data_dir": str(tmp_path / "data")}}
    if privacy is not None:
        data["privacy"] = privacy
    return parse_config(data)


def test_without_a_configured_key_one_is_generated_once_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PRIVACY_HMAC_KEY", raising=False)
    first = build_privacy(settings_for(tmp_path))
    key_file = tmp_path / "data" / "privacy.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    second = build_privacy(settings_for(tmp_path))
    assert first is not None and second is not None
    assert first.token("alice") == second.token("alice")  # stable across restarts


def test_the_variable_wins_when_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVACY_HMAC_KEY", "k" * 32)
    pseudo = build_privacy(settings_for(tmp_path))
    assert pseudo is not None
    assert not (tmp_path / "data" / "privacy.key").exists()


def test_an_explicitly_named_key_that_is_missing_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(AlarmSetupError, match="MY_KEY"):
        build_privacy(settings_for(tmp_path, {"hmac_key_env": "MY_KEY"}))


def test_no_service_means_no_hashing(tmp_path: Path) -> None:
    assert build_privacy(settings_for(tmp_path, {"services": []})) is None
