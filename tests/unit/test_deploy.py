"""Packaging and deployment, checked without a Docker engine.

The Dockerfile is parsed (stages, USER, HEALTHCHECK, ENV, EXPOSE, what the final stage
installs), deploy/docker-compose.yml is loaded with a YAML parser and held against
the config the container reads (every path the config names is mounted, read-only
where it should be; every secret the config names is passed and listed in
.env.example), every shipped config passes `forwarder check-config`, the example
services log lines that the forwarder's alarms recognise, and docs/configuration.md
is what docs/gen_config_reference.py prints today.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel

from forwarder.alarms.rules import RuleSet
from forwarder.config import DSN_ENV, DockerSourceConfig, FileSourceConfig, Settings, load_config
from forwarder.pipeline.normalize import normalize
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
SHIPPED_CONFIGS = sorted([*REPO.glob("config/*.toml"), *DEPLOY.glob("*.toml")])
NON_ROOT_UID = 10001


# --- the Dockerfile -------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.image}"
        return found[-1]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.all("ENV"):
            for word in shlex.split(args):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=value form"
                env[key] = value
        return env


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages): continuation lines joined, comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # also inside a continuation, as the Docker parser does
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, "the Dockerfile ends inside a continuation line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name, []))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            stages[-1].instructions.append(Instruction(keyword, rest))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def dev_extras() -> list[str]:
    """Names of the dev extras in pyproject.toml (pytest, ruff, ...)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [
        re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]
        for spec in project["optional-dependencies"]["dev"]
    ]
    assert "pytest" in names and "ruff" in names
    return names


def test_dockerfile_is_multi_stage_on_python_311_slim(stages: list[Stage], final: Stage) -> None:
    assert len(stages) >= 2
    builder = stages[0]
    assert builder.name == "builder"
    assert all(stage.image == "python:3.11-slim" for stage in stages)
    assert any("pip wheel" in run for run in builder.all("RUN"))
    # The final stage takes the wheels from the builder, nothing else of it.
    taken = [run for run in final.all("RUN") if "from=builder" in run]
    taken += [copy for copy in final.all("COPY") if "--from=builder" in copy]
    assert taken, "the final stage does not install the builder's wheels"


def test_final_stage_runs_as_the_non_root_user(final: Stage) -> None:
    users = final.all("USER")
    assert users, "no USER in the final stage: it would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0")
    assert int(user) == NON_ROOT_UID
    keywords = [i.keyword for i in final.instructions]
    last_user = max(n for n, k in enumerate(keywords) if k == "USER")
    assert last_user < keywords.index("ENTRYPOINT")
    assert any(f"--uid {NON_ROOT_UID}" in run for run in final.all("RUN"))


def test_final_stage_installs_no_dev_dependency_and_no_compiler(
    stages: list[Stage], final: Stage
) -> None:
    text = " ".join(i.args for i in final.instructions if i.keyword in ("RUN", "COPY", "ADD"))
    for name in [*dev_extras(), "pytest", "ruff", "[dev]", "gcc", "build-essential"]:
        assert name.lower() not in text.lower(), f"the final stage installs {name}"
    installs = [run for run in final.all("RUN") if "pip install" in run]
    assert installs and all("--no-index" in run for run in installs), (
        "the final stage must install the builder's wheels only, offline"
    )
    assert not any("apt-get install" in run for run in final.all("RUN"))
    for run in stages[0].all("RUN"):
        assert "[dev]" not in run and ".[" not in run, "the builder builds an extra"


def test_read_only_root_filesystem_settings(final: Stage) -> None:
    env = final.env()
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    volumes = [v for args in final.all("VOLUME") for v in json.loads(args)]
    data_dir = load_config(REPO / "config" / "forwarder.toml").database.data_dir
    assert str(data_dir) in volumes, "database.data_dir must be the image's volume"
    assert final.last("WORKDIR")
    assert json.loads(final.last("ENTRYPOINT")) == ["forwarder"]
    assert json.loads(final.last("CMD")) == ["run"]


def test_config_path_env_matches_the_copied_file(final: Stage) -> None:
    config_path = final.env()["FORWARDER_CONFIG"]
    copies = [shlex.split(args) for args in final.all("COPY")]
    sources = [words[:-1] for words in copies if words[-1] == config_path]
    assert sources == [["config/forwarder.toml"]], f"nothing copied to {config_path}"
    assert (REPO / "config" / "forwarder.toml").is_file()


def test_http_listen_matches_expose_and_the_healthcheck(final: Stage) -> None:
    env = final.env()
    assert env.get("FORWARDER_HTTP__ENABLED") == "true"
    host, _, port = env["FORWARDER_HTTP__LISTEN"].rpartition(":")
    assert host == "0.0.0.0", "inside a container the server must listen on every interface"
    assert final.all("EXPOSE") == [port]
    healthcheck = final.last("HEALTHCHECK")
    assert "/health" in healthcheck and "urllib" in healthcheck


def _healthcheck_argv(final: Stage) -> list[str]:
    args = final.last("HEALTHCHECK")
    _, _, command = args.partition("CMD ")
    argv = json.loads(command)
    assert argv[0] == "python", "the slim image has no curl: the check must use python"
    return [sys.executable, *argv[1:]]


class _HealthServer(http.server.ThreadingHTTPServer):
    status = 200


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = self.server.status if self.path == "/health" else 404  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[_HealthServer]:
    server = _HealthServer(("127.0.0.1", 0), _HealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_the_healthcheck_command_follows_health(
    final: Stage, health_server: _HealthServer, status: int, healthy: bool
) -> None:
    """The HEALTHCHECK's own command, run against a stand-in /health on the listen port."""
    health_server.status = status
    port = health_server.server_address[1]
    env = {**_clean_env(), "FORWARDER_HTTP__LISTEN": f"0.0.0.0:{port}"}
    done = subprocess.run(_healthcheck_argv(final), env=env, capture_output=True, timeout=30)
    assert (done.returncode == 0) is healthy, done.stderr.decode()


def _dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            patterns.append((negated, line.removeprefix("!").strip("/")))
    return patterns


def _ignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matches a path or its parents."""
    ignored = False
    parts = PurePosixPath(path).parts
    prefixes = [str(PurePosixPath(*parts[: n + 1])) for n in range(len(parts))]
    for negated, pattern in _dockerignore_patterns():
        if any(_glob_match(p, pattern) for p in prefixes):
            ignored = not negated
    return ignored


def _glob_match(path: str, pattern: str) -> bool:
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            regex += ".*"
            i += 2
        elif pattern[i] == "*":
            regex += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            regex += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            regex += pattern[i : end + 1]
            i = end + 1
        else:
            regex += re.escape(pattern[i])
            i += 1
    return re.fullmatch(regex, path) is not None


def test_dockerignore_sends_what_the_build_copies_and_no_secret(stages: list[Stage]) -> None:
    for stage in stages:
        for args in stage.all("COPY"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            for source in words[:-1]:
                assert not _ignored(source), f".dockerignore drops {source}, which COPY needs"
    for needed in (
        "forwarder/cli.py",
        "forwarder/static/index.html",
        "forwarder/producers/ui-logger.js",
    ):
        assert not _ignored(needed)
    for secret in (
        "deploy/.env",
        ".env",
        ".venv/bin/python",
        ".forwarder/privacy.key",
        ".git/HEAD",
    ):
        assert _ignored(secret), f"{secret} would be sent to the Docker daemon"
    assert _ignored("forwarder/__pycache__/cli.cpython-311.pyc")


# --- the compose file -----------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    target: str
    read_only: bool


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not KEY=value"
            values[key] = value
    return values


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def interpolated(value: str) -> list[str]:
    """Variables compose interpolates in `value` ($${...} is a literal dollar, skipped)."""
    return re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", value)


def substitute(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?msg}, ${VAR:-default} against `variables`."""

    def one(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in variables and (variables[name] or op not in (":-", ":?")):
            return variables[name]
        assert op != ":?" and op != "?", f"{name} is required but not in .env.example"
        return default if op in (":-", "-") else ""

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, value)


def mounts_of(service: dict[str, Any]) -> list[Mount]:
    mounts = []
    for item in service.get("volumes", []):
        if isinstance(item, str):
            parts = item.split(":")
            source, target = parts[0], parts[1]
            mode = parts[2] if len(parts) > 2 else "rw"
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            mounts.append(Mount(kind, source, target, "ro" in mode.split(",")))
        else:
            mounts.append(
                Mount(item["type"], item["source"], item["target"], bool(item.get("read_only")))
            )
    return mounts


def mount_for(mounts: list[Mount], path: str | Path) -> Mount | None:
    """The mount a container path lies on (the deepest target that contains it)."""
    path = PurePosixPath(path)
    best = None
    for m in mounts:
        target = PurePosixPath(m.target)
        if (path == target or target in path.parents) and (
            best is None or len(target.parts) > len(PurePosixPath(best.target).parts)
        ):
            best = m
    return best


def builds_our_image(service: dict[str, Any]) -> bool:
    build = service.get("build")
    if build is None:
        return False
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    return (DEPLOY / context / dockerfile).resolve() == DOCKERFILE


def container_env(
    service: dict[str, Any], final: Stage, variables: dict[str, str]
) -> dict[str, str]:
    """The environment the process sees: the image's ENV, then the service's (interpolated)."""
    env = dict(final.env()) if builds_our_image(service) else {}
    env.update({k: substitute(v, variables) for k, v in service_env(service).items()})
    return env


@pytest.fixture
def container_settings(
    compose: dict[str, Any],
    final: Stage,
    env_example: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Settings, Path]:
    """The forwarder service's settings as the container loads them: the mounted config
    file under the container's environment (secrets from .env.example)."""
    service = compose["services"]["forwarder"]
    env = container_env(service, final, env_example)
    config_mount = mount_for(mounts_of(service), env["FORWARDER_CONFIG"])
    assert config_mount is not None and config_mount.target == env["FORWARDER_CONFIG"], (
        "FORWARDER_CONFIG names a file that is not mounted: the container would read the "
        "image's copy of config/forwarder.toml"
    )
    assert config_mount.type == "bind" and config_mount.read_only
    source = (DEPLOY / config_mount.source).resolve()
    assert source.is_file(), f"{config_mount.source} does not exist"
    for key in list(os.environ):
        if key.upper().startswith("FORWARDER_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_config(source), source


def test_compose_has_the_stack(compose: dict[str, Any]) -> None:
    assert {"postgres", "redis", "forwarder", "api", "worker"} <= set(compose["services"])


def test_postgres_has_a_healthcheck_and_a_named_volume(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]
    assert pg["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    data = mount_for(mounts_of(pg), "/var/lib/postgresql/data")
    assert data is not None and data.type == "volume" and not data.read_only
    assert data.source in compose["volumes"]


def test_forwarder_service_is_a_hardened_sidecar(
    compose: dict[str, Any], final: Stage, env_example: dict[str, str]
) -> None:
    fwd = compose["services"]["forwarder"]
    assert builds_our_image(fwd)
    assert fwd["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert fwd["read_only"] is True
    tmpfs = fwd["tmpfs"] if isinstance(fwd["tmpfs"], list) else [fwd["tmpfs"]]
    assert "/tmp" in tmpfs
    assert fwd["restart"] == "unless-stopped"
    assert fwd["logging"]["driver"] == "json-file"
    assert fwd.get("cap_drop") == ["ALL"]
    # The image's HEALTHCHECK (GET /health) applies: not disabled, not replaced.
    assert "healthcheck" not in fwd
    env = container_env(fwd, final, env_example)
    assert env["FORWARDER_HTTP__ENABLED"] == "true"
    listen_port = env["FORWARDER_HTTP__LISTEN"].rpartition(":")[2]
    targets = [str(p).rpartition(":")[2] for p in fwd["ports"]]
    assert targets == [listen_port] == final.all("EXPOSE")


def test_forwarder_mounts_agree_with_the_config_it_reads(
    compose: dict[str, Any], container_settings: tuple[Settings, Path], final: Stage
) -> None:
    settings, _ = container_settings
    mounts = mounts_of(compose["services"]["forwarder"])
    by_target = {m.target: m for m in mounts}
    docker_sources = [s for s in settings.sources if isinstance(s, DockerSourceConfig)]
    file_sources = [s for s in settings.sources if isinstance(s, FileSourceConfig)]
    assert docker_sources and file_sources, "the compose config reads containers and ui.log"
    for source in docker_sources:
        if source.mode == "files":
            m = mount_for(mounts, source.containers_dir)
            assert m is not None, f"sources[{source.name}].containers_dir is not mounted"
            assert m.type == "bind" and m.read_only, "mount dockerd's logs read-only"
            assert m.source == m.target == str(source.containers_dir)
        else:
            m = by_target.get(str(source.socket))
            assert m is not None and m.read_only, f"sources[{source.name}].socket is not mounted"
    for source in file_sources:
        for path in source.paths:
            m = mount_for(mounts, path)
            assert m is not None, f"sources[{source.name}]: {path} is not on a mount"
            assert m.read_only, f"{path}: the forwarder only reads it; mount it read-only"
    for name, notifier in settings.notifiers.items():
        socket_path = getattr(notifier, "socket", None)
        if socket_path is not None:
            assert str(socket_path) in by_target, f"notifiers.{name}.socket is not mounted"
    data = mount_for(mounts, settings.database.data_dir)
    assert data is not None and data.type == "volume" and not data.read_only, (
        "database.data_dir must be a writable volume (the root filesystem is read-only)"
    )
    assert data.target == str(settings.database.data_dir)
    assert data.target in [v for args in final.all("VOLUME") for v in json.loads(args)]


def _path_fields(value: Any, where: str = "") -> Iterator[tuple[str, Path]]:
    """(key path, value) of every Path the settings hold."""
    if isinstance(value, BaseModel):
        for key in type(value).model_fields:
            yield from _path_fields(getattr(value, key), f"{where}.{key}".lstrip("."))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _path_fields(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _path_fields(item, f"{where}.{key}")
    elif isinstance(value, Path):
        yield where, value


def test_every_folder_the_forwarder_writes_is_a_writable_mount(
    compose: dict[str, Any], container_settings: tuple[Settings, Path], final: Stage
) -> None:
    """The root filesystem is read-only: any *_dir the config names (data_dir, an export
    folder, ...) must lie on a writable mount; any *_file (a secret) on some mount."""
    settings, _ = container_settings
    mounts = mounts_of(compose["services"]["forwarder"])
    workdir = PurePosixPath(final.last("WORKDIR"))
    for where, path in _path_fields(settings):
        name = where.rsplit(".", 1)[-1]
        if name in ("containers_dir", "socket"):
            continue  # read, checked above
        in_container = workdir / path  # a relative path is relative to WORKDIR
        m = mount_for(mounts, in_container)
        if name.endswith("_dir"):
            assert m is not None and not m.read_only, f"{where} ({path}) is not writable"
        elif name.endswith("_file"):
            assert m is not None, f"{where} ({path}) is not mounted into the container"


def _secret_env_names(value: Any) -> set[str]:
    """Every environment variable the settings name through a `*_env` key."""
    found: set[str] = set()
    if isinstance(value, BaseModel):
        for key in type(value).model_fields:
            item = getattr(value, key)
            if key.endswith("_env") and isinstance(item, str):
                found.add(item)
            else:
                found |= _secret_env_names(item)
    elif isinstance(value, list | tuple):
        for item in value:
            found |= _secret_env_names(item)
    elif isinstance(value, dict):
        for item in value.values():
            found |= _secret_env_names(item)
    return found


def test_every_secret_the_config_names_is_passed_and_documented(
    compose: dict[str, Any], container_settings: tuple[Settings, Path], env_example: dict[str, str]
) -> None:
    settings, _ = container_settings
    names = _secret_env_names(settings) | {DSN_ENV}
    assert {"SLACK_WEBHOOK_URL", "PRIVACY_HMAC_KEY", "API_CONTROL_TOKEN"} <= names
    declared = service_env(compose["services"]["forwarder"])
    for name in sorted(names):
        assert name in declared, f"{name} is not passed to the forwarder service"
        assert interpolated(declared[name]) == [name], f"{name} must come from deploy/.env"
        assert name in env_example, f"{name} is not listed in deploy/.env.example"


def test_env_example_lists_every_variable_the_compose_file_uses_with_a_comment(
    env_example: dict[str, str],
) -> None:
    used = set(interpolated(COMPOSE_FILE.read_text()))
    assert used <= set(env_example), f"missing from .env.example: {used - set(env_example)}"
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert i > 0 and lines[i - 1].startswith("#"), f"{line.split('=')[0]} has no comment"


def test_env_example_dsn_points_at_the_postgres_service(
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    pg = compose["services"]["postgres"]
    pg_env = {k: substitute(v, env_example) for k, v in service_env(pg).items()}
    dsn = urlsplit(env_example[DSN_ENV])
    assert dsn.scheme in ("postgresql", "postgres")
    assert dsn.hostname == "postgres" and "postgres" in compose["services"]
    assert (dsn.port or 5432) == 5432
    assert dsn.username == pg_env["POSTGRES_USER"]
    assert dsn.password == pg_env["POSTGRES_PASSWORD"]
    assert dsn.path.lstrip("/") == pg_env["POSTGRES_DB"]


def test_hosts_the_config_calls_are_compose_services(
    compose: dict[str, Any], container_settings: tuple[Settings, Path]
) -> None:
    settings, _ = container_settings
    services = set(compose["services"])
    for name, probe in settings.probes.items():
        host = getattr(probe, "host", None) or urlsplit(getattr(probe, "url", "")).hostname
        assert host in services, f"probes.{name} checks {host}, not a compose service"
    for name, notifier in settings.notifiers.items():
        if notifier.type == "http":
            host = urlsplit(notifier.url).hostname
            assert host in services, f"notifiers.{name} calls {host}, not a compose service"
        if notifier.type == "docker_restart":
            assert notifier.service in services, f"notifiers.{name} restarts an unknown service"


def test_every_service_logs_with_the_json_file_driver(
    compose: dict[str, Any], container_settings: tuple[Settings, Path]
) -> None:
    settings, _ = container_settings
    labels = {
        label
        for source in settings.sources
        if isinstance(source, DockerSourceConfig)
        for label in source.exclude_labels
    }
    for name, service in compose["services"].items():
        assert service.get("logging", {}).get("driver") == "json-file", (
            f"{name}: the docker source reads json-file logs only"
        )
    for name in ("postgres", "redis"):
        assert set(compose["services"][name].get("labels", {})) & labels, (
            f"{name} is not excluded from the docker source"
        )


def test_the_compose_config_keeps_the_shipped_alarms(
    container_settings: tuple[Settings, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, _ = container_settings
    for key in list(os.environ):
        if key.upper().startswith("FORWARDER_"):
            monkeypatch.delenv(key)
    shipped = load_config(REPO / "config" / "forwarder.toml")
    for section in ("alarms", "notifiers", "probes", "sampling", "privacy"):
        assert getattr(settings, section) == getattr(shipped, section), (
            f"[{section}] of deploy/forwarder.toml differs from config/forwarder.toml"
        )


# --- the example services -------------------------------------------------------------


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    for line in lines:
        assert set(line) == {"ts", "service", "level", "event", "message", "meta"}, line
    return lines


def _fired(lines: list[dict[str, Any]], settings: Settings, service: str) -> set[str]:
    """Rules that fire when the forwarder normalizes these lines (as a docker source would)."""
    rules = RuleSet.from_config(settings.alarms)
    fired: set[str] = set()
    for line in lines:
        event = normalize(json.dumps(line).encode(), service, datetime.now(UTC))
        now = event.ts.timestamp()
        for alert in rules.on_event(event, now, datetime.now(UTC)):
            if alert.state == "firing":
                fired.add(alert.rule)
    return fired


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("FORWARDER_")}


def test_the_example_worker_logs_cycles_the_alarm_recognises(
    container_settings: tuple[Settings, Path],
) -> None:
    settings, _ = container_settings
    env = {
        **_clean_env(),
        "EXAMPLE_CYCLES": "3",
        "EXAMPLE_CYCLE_S": "0",
        "EXAMPLE_FAIL_RATE": "1",
    }
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "examples" / "worker.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = _json_lines(done.stdout)
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert len(errors) == 3
    assert all("behavior_engine" in e["message"] and "traceback" in e["meta"] for e in errors)
    assert [e["meta"]["cycle_id"] for e in errors] == [1, 2, 3]
    assert _fired(lines, settings, "worker") == {"worker_behavior_engine"}


def test_the_example_api_logs_requests_the_alarm_recognises(
    container_settings: tuple[Settings, Path],
) -> None:
    settings, _ = container_settings
    port = free_port()
    token = "t" * 32
    env = {**_clean_env(), "EXAMPLE_PORT": str(port), "API_CONTROL_TOKEN": token}
    proc = subprocess.Popen(
        [sys.executable, str(DEPLOY / "examples" / "api.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    assert r.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "the example API did not start"
                time.sleep(0.05)
        for _ in range(5):
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(f"{base}/boom", timeout=5)
            caught.value.close()
            assert caught.value.code == 500
        refused = urllib.request.Request(f"{base}/control/stop", method="POST", data=b"")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(refused, timeout=5)
        caught.value.close()
        assert caught.value.code == 401
        stop = urllib.request.Request(
            f"{base}/control/stop",
            method="POST",
            data=b"{}",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(stop, timeout=5) as r:
            assert r.status == 202
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    lines = _json_lines(out)
    assert not err.strip(), err
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert len(errors) == 5 and all("KeyError" in e["meta"]["traceback"] for e in errors)
    assert any(line["event"] == "control.stop" for line in lines)
    assert _fired(lines, settings, "api") == {"api_error_burst"}


# --- every shipped config, and the generated reference --------------------------------


def _forwarder_command() -> list[str]:
    script = Path(sys.executable).with_name("forwarder")
    return [str(script)] if script.exists() else [sys.executable, "-m", "forwarder"]


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_check_config_accepts_every_shipped_config(path: Path) -> None:
    env = {**_clean_env(), DSN_ENV: "postgresql://forwarder@db.invalid:5432/logs"}
    done = subprocess.run(
        [*_forwarder_command(), "check-config", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("config OK")


def test_shipped_configs_are_found() -> None:
    names = {str(p.relative_to(REPO)) for p in SHIPPED_CONFIGS}
    assert {"config/forwarder.toml", "config/forwarder.dev.toml", "deploy/forwarder.toml"} <= names


def test_configuration_reference_is_generated_from_the_code() -> None:
    spec = importlib.util.spec_from_file_location(
        "gen_config_reference", REPO / "docs" / "gen_config_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert module.render() == committed, (
        "docs/configuration.md is stale: run "
        ".venv/bin/python docs/gen_config_reference.py > docs/configuration.md"
    )


def test_readme_links_every_document() -> None:
    readme = (REPO / "README.md").read_text()
    for doc in sorted((REPO / "docs").glob("*.md")):
        assert f"](docs/{doc.name})" in readme, f"README.md does not link docs/{doc.name}"
