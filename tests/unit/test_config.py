"""The config tree: TOML + environment, every error named by its key path."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from forwarder.config import (
    ConfigError,
    FileSourceConfig,
    Settings,
    load_config,
    parse_config,
    resolve_config_path,
)

REPO = Path(__file__).resolve().parents[2]
FILE_SOURCE = {"type": "file", "name": "ui", "service": "ui", "paths": ["/var/log/ui.log"]}


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


def test_defaults_match_the_design() -> None:
    settings = parse_config({})
    assert settings.database.dsn.get_secret_value() == ""
    assert settings.database.data_dir == Path(".forwarder")
    assert settings.database.table == "system_logs"
    assert settings.database.retention_days == 30
    assert settings.batch.max_rows == 5000
    assert settings.batch.max_delay_s == 0.5
    assert settings.sources == []


def test_file_source_is_read_with_its_defaults() -> None:
    settings = parse_config({"sources": [FILE_SOURCE]})
    (source,) = settings.sources
    assert isinstance(source, FileSourceConfig)
    assert source.paths == ["/var/log/ui.log"]
    assert source.read_from == "head"


def test_unknown_keys_are_errors_with_their_path() -> None:
    problems = problems_of(
        {
            "databse": {},
            "database": {"tabel": "x"},
            "sources": [{**FILE_SOURCE, "pahts": ["x"]}],
        }
    )
    assert "databse: unknown key" in problems
    assert "database.tabel: unknown key" in problems
    assert "sources[0].pahts: unknown key" in problems


def test_every_error_is_reported_at_once() -> None:
    problems = problems_of(
        {
            "batch": {"max_rows": 0, "max_delay_s": "soon"},
            "sources": [{"type": "file", "name": "a"}, {"type": "kafka"}, {"name": "c"}],
        }
    )
    assert any(
        p.startswith("batch.max_rows: ") and "greater than or equal to 1" in p for p in problems
    )
    assert any(p.startswith("batch.max_delay_s: ") and "'soon'" in p for p in problems)
    assert "sources[0].service: required key is missing" in problems
    assert "sources[0].paths: required key is missing" in problems
    assert any(p.startswith("sources[1].type: ") and "'kafka'" in p for p in problems)
    assert any(p.startswith("sources[2].type: required key is missing") for p in problems)


def test_read_from_accepts_only_head_or_tail() -> None:
    (problem,) = problems_of({"sources": [{**FILE_SOURCE, "read_from": "middle"}]})
    assert problem.startswith("sources[0].read_from: ")
    assert "'head' or 'tail'" in problem


def test_duplicate_source_names_are_refused() -> None:
    (problem,) = problems_of({"sources": [FILE_SOURCE, FILE_SOURCE]})
    assert "two sources are named 'ui'" in problem


def test_table_names_must_be_plain_identifiers() -> None:
    (problem,) = problems_of({"database": {"table": 'logs"; drop table x; --'}})
    assert problem.startswith("database.table: ")


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORWARDER_DATABASE__DSN", "postgresql://logs@db/logs")
    monkeypatch.setenv("FORWARDER_BATCH__MAX_ROWS", "42")
    settings = parse_config(
        {"database": {"dsn": "embedded", "table": "t"}, "batch": {"max_rows": 7}}
    )
    assert settings.database.dsn.get_secret_value() == "postgresql://logs@db/logs"
    assert settings.database.table == "t"  # untouched keys of the section stay
    assert settings.batch.max_rows == 42


def test_a_bad_environment_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORWARDER_BATCH__MAX_ROWS", "many")
    (problem,) = problems_of({})
    assert problem.startswith("batch.max_rows: ")
    assert "'many'" in problem


def test_the_dsn_never_appears_in_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    problems = problems_of({"database": {"dsn": ["postgresql://u:hunter2@h/db"]}})
    assert problems and not any("hunter2" in p for p in problems)


def test_config_path_comes_from_argument_then_environment_then_default() -> None:
    assert resolve_config_path(Path("a.toml"), {"FORWARDER_CONFIG": "b.toml"}) == Path("a.toml")
    assert resolve_config_path(None, {"FORWARDER_CONFIG": "b.toml"}) == Path("b.toml")
    assert resolve_config_path(None, {}) == Path("config/forwarder.toml")


def test_missing_file_and_broken_toml_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[database\ndsn = 1\n")
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 1"):
        load_config(broken)


@pytest.mark.parametrize("name", ["forwarder.toml", "forwarder.dev.toml"])
def test_shipped_configs_are_valid(name: str) -> None:
    load_config(REPO / "config" / name)


def _models_in(annotation: object) -> list[type[BaseModel]]:
    """The config models an annotation holds: directly, in a list, dict or union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _keys(model: type[BaseModel]) -> set[str]:
    """Every key of a model, nested sections included."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        keys.add(name)
        for inner in _models_in(field.annotation):
            keys |= _keys(inner)
    return keys


def test_every_option_is_documented_in_the_shipped_config() -> None:
    """A key that exists in the code but not in config/forwarder.toml fails here."""
    text = (REPO / "config" / "forwarder.toml").read_text()
    present = set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, flags=re.MULTILINE))
    present |= set(re.findall(r"^#?\s*\[+(?:[a-z_]+\.)*([a-z_]+)\]+", text, flags=re.MULTILINE))
    for name in Settings.model_fields:
        assert re.search(rf"^#?\s*\[+{name}[\].]", text, flags=re.MULTILINE), (
            f"section [{name}] missing from config/forwarder.toml"
        )
    expected = set().union(*(_keys(m) for f in Settings.model_fields.values()
                             for m in _models_in(f.annotation)))  # fmt: skip
    missing = sorted(expected - present)
    assert not missing, f"options missing from config/forwarder.toml: {missing}"
