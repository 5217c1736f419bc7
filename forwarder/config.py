"""The configuration tree: the only reader of the TOML file.

`load_config` reads config/forwarder.toml (or --config, or $FORWARDER_CONFIG), then
applies environment overrides `FORWARDER_<SECTION>__<KEY>` on top, and validates the
whole tree before anything starts. Unknown keys are errors: a typo must not be
silently ignored. Every error names its TOML key path.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from forwarder.alarms.config import (
    AlarmConfig,
    NotifierConfig,
    PrivacyConfig,
    ProbeConfig,
    SamplingConfig,
    alarm_reference_problems,
)
from forwarder.config_types import Identifier, Name, Section
from forwarder.http_config import HttpConfig
from forwarder.retention_config import RetentionConfig

__all__ = ["Identifier", "Name", "Section"]

DEFAULT_CONFIG_PATH = Path("config/forwarder.toml")
CONFIG_ENV = "FORWARDER_CONFIG"
DSN_ENV = "FORWARDER_DATABASE__DSN"
EMBEDDED_DSN = "embedded"


class ConfigError(Exception):
    """The configuration cannot be used; `problems` name each key path and what is wrong."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class DatabaseConfig(Section):
    dsn: SecretStr = Field(
        SecretStr(""),
        description='PostgreSQL DSN; "embedded" runs a private PostgreSQL under data_dir; '
        "empty is an error at start (set FORWARDER_DATABASE__DSN)",
    )
    data_dir: Path = Field(
        Path(".forwarder"), description="folder for the embedded cluster and the disk spool"
    )
    schema_name: Identifier = Field(
        "public", description="PostgreSQL schema that holds the forwarder's tables"
    )
    table: Identifier = Field("system_logs", description="the log table, partitioned by day")
    checkpoint_table: Identifier = Field(
        "forwarder_checkpoints", description="committed read position of every source stream"
    )
    dead_letter_table: Identifier = Field(
        "forwarder_dead_letters", description="rows the database refused, with the error text"
    )
    retention_days: int = Field(30, ge=1, description="days of log partitions to keep")
    partitions_ahead_days: int = Field(
        3, ge=1, le=60, description="day partitions created ahead of today"
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="timeout of one connection attempt")
    retry_initial_backoff_s: float = Field(
        0.5, gt=0, description="first wait after a failed write; doubles each retry"
    )
    retry_max_backoff_s: float = Field(
        30.0, gt=0, description="longest wait between retries of a failed write"
    )


class BatchConfig(Section):
    max_rows: int = Field(5000, ge=1, le=1_000_000, description="rows per COPY transaction")
    max_delay_s: float = Field(
        0.5, gt=0, le=3600, description="longest a row waits before its batch is written"
    )


class PipelineConfig(Section):
    queue_chunks: int = Field(
        16,
        ge=1,
        le=100_000,
        description="capacity of each stage queue, in chunks (a chunk is up to one read of lines)",
    )


class DaemonConfig(Section):
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="level of the forwarder's own logs (JSON lines on stderr)"
    )
    drain_timeout_s: float = Field(
        30.0, gt=0, description="on SIGTERM/SIGINT, time allowed to flush before a forced exit"
    )


class MultilineConfig(Section):
    """How consecutive lines are grouped into one record (tracebacks and the like)."""

    mode: Literal["python", "custom", "off"] = Field(
        "python",
        description='"python": a traceback joins the line before it (or stands alone), '
        'chained exceptions included; "custom": start_pattern/continue_pattern; "off"',
    )
    start_pattern: str | None = Field(
        None, description="custom mode: regex a line matches when it starts a new record"
    )
    continue_pattern: str | None = Field(
        None, description="custom mode: regex a line matches when it continues the record"
    )
    flush_timeout_s: float = Field(
        1.0, gt=0, le=60, description="a held record is written after this long without a line"
    )
    max_lines: int = Field(500, ge=2, description="lines in one record at most; then a new one")
    max_bytes: int = Field(
        1_048_576, ge=1024, description="bytes in one record at most; then a new one"
    )

    @model_validator(mode="after")
    def _patterns(self) -> MultilineConfig:
        for key in ("start_pattern", "continue_pattern"):
            pattern = getattr(self, key)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{key} is not a valid regex: {e}") from None
        if self.mode == "custom" and not (self.start_pattern or self.continue_pattern):
            raise ValueError('mode "custom" needs start_pattern or continue_pattern')
        return self


class TailConfig(Section):
    """How files are followed: shared by file sources and docker sources in files mode."""

    read_from: Literal["head", "tail"] = Field(
        "head",
        description="where to start a file present at first start with no checkpoint "
        "(for docker: also whether a container's rotated copies are read); files that "
        "appear later are always read from the head",
    )
    max_line_bytes: int = Field(
        1_048_576, ge=256, description="longer lines are cut here and flagged meta.truncated"
    )
    read_budget_bytes: int = Field(
        32_768, ge=4096, description="bytes read from one file per round, so none starves"
    )
    poll_interval_s: float = Field(0.25, gt=0, description="how often idle files are checked")
    glob_interval_s: float = Field(2.0, gt=0, description="how often globs are re-scanned")
    rotate_wait_s: float = Field(
        5.0, ge=0, description="how long a rotated-away file is still read after its last growth"
    )
    fingerprint_bytes: int = Field(
        256, ge=16, le=65536, description="leading bytes hashed to tell a reused inode apart"
    )
    follow_symlinks: bool = Field(
        False,
        description="read files through symlinks below the globs' fixed folder (a linked "
        "file, or a linked folder a glob descends into); false: each is skipped and logged "
        "once, so a link planted in a watched folder cannot make the forwarder read another "
        "file. Loops are detected either way",
    )
    multiline: MultilineConfig = Field(
        default_factory=MultilineConfig, description="grouping of tracebacks into one record"
    )


class FileSourceConfig(TailConfig):
    type: Literal["file"]
    name: Name = Field(description="unique source name; keys the checkpoints")
    service: Name = Field(description="service written on every row from this source")
    paths: list[str] = Field(min_length=1, description="files to tail; globs allowed")
    exclude: list[str] = Field(default_factory=list, description="globs of paths to skip")
    format: Literal["raw", "docker", "cri"] = Field(
        "raw",
        description='line framing: "raw" (lines as written), "docker" (json-file: '
        '{"log","stream","time"}), "cri" (containerd/Kubernetes "<time> <stream> <P|F> <log>")',
    )


class DockerSourceConfig(TailConfig):
    type: Literal["docker"]
    name: Name = Field(description="unique source name; keys the checkpoints")
    mode: Literal["files", "api"] = Field(
        "files",
        description='"files": tail the json-file logs under containers_dir; "api": follow '
        "the Engine API over its unix socket (when the log files cannot be mounted)",
    )
    containers_dir: Path = Field(
        Path("/var/lib/docker/containers"),
        description="files mode: dockerd's containers folder (mounted read-only)",
    )
    socket: Path = Field(
        Path("/var/run/docker.sock"), description="api mode: the Engine API's unix socket"
    )
    services: dict[str, Name] = Field(
        default_factory=dict,
        description="compose service or container name -> service written on the rows; "
        "unmapped containers use their compose service, else their name",
    )
    include_containers: list[str] = Field(
        default_factory=list, description="globs of container names to read (empty: all)"
    )
    exclude_containers: list[str] = Field(
        default_factory=list, description="globs of container names to skip"
    )
    include_labels: list[str] = Field(
        default_factory=list,
        description='labels a container must carry to be read: "key" or "key=value"',
    )
    exclude_labels: list[str] = Field(
        default_factory=list, description="containers with any of these labels are skipped"
    )


class StdinSourceConfig(Section):
    """Standard input as a source (`some_app | forwarder run`); one at most.

    Every line read goes to a disk spool (data_dir/spool/stdin-<name>) first: a pipe
    cannot be read again, so what was read is replayed from there after a crash.
    """

    type: Literal["stdin"]
    name: Name = Field(
        description="unique source name; keys the spool checkpoint and names the spool "
        "folder data_dir/spool/stdin-<name>"
    )
    service: Name = Field(description="service written on every row from this source")
    format: Literal["raw", "docker", "cri"] = Field(
        "raw",
        description='line framing, as for file sources: "raw", "docker" (json-file lines), '
        '"cri" (containerd/Kubernetes lines)',
    )
    max_line_bytes: int = Field(
        1_048_576,
        ge=256,
        le=1_048_576,
        description="longer lines are cut here and flagged meta.truncated (1 MiB at most: "
        "one spool record)",
    )
    multiline: MultilineConfig = Field(
        default_factory=MultilineConfig, description="grouping of tracebacks into one record"
    )
    spool_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=16 * 1024 * 1024,
        description="bytes the spool may hold while the database is behind; when full, "
        "standard input is not read (the writer blocks) until commits make room",
    )


SourceConfig = Annotated[
    FileSourceConfig | DockerSourceConfig | StdinSourceConfig, Field(discriminator="type")
]


class Settings(BaseSettings):
    """The whole configuration; environment variables override the TOML file."""

    model_config = SettingsConfigDict(
        env_prefix="FORWARDER_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    database: DatabaseConfig = DatabaseConfig()
    batch: BatchConfig = BatchConfig()
    pipeline: PipelineConfig = PipelineConfig()
    daemon: DaemonConfig = DaemonConfig()
    sources: list[SourceConfig] = Field(default_factory=list)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    alarms: list[AlarmConfig] = Field(default_factory=list)
    notifiers: dict[Name, NotifierConfig] = Field(default_factory=dict)
    probes: dict[Name, ProbeConfig] = Field(default_factory=dict)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment wins over it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _source_names_unique(self) -> Settings:
        seen: set[str] = set()
        for source in self.sources:
            if source.name in seen:
                raise ValueError(f"two sources are named {source.name!r}; names must be unique")
            seen.add(source.name)
        return self


def resolve_config_path(path: Path | None, environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    if path is not None:
        return path
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH


def load_config(path: Path | None = None) -> Settings:
    """Read, merge with the environment and validate; raise ConfigError listing every problem."""
    path = resolve_config_path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), ["config file not found"]) from None
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), [f"invalid TOML: {e}"]) from None
    return parse_config(data, source=str(path))


def parse_config(data: dict[str, Any], source: str = "<config>") -> Settings:
    try:
        settings = Settings(**data)
    except ValidationError as e:
        raise ConfigError(source, [_describe(err, data) for err in e.errors()]) from None
    problems = alarm_reference_problems(settings.alarms, settings.notifiers, settings.probes)
    if settings.http.enabled and settings.http.source_name in {s.name for s in settings.sources}:
        problems.append(
            f"http.source_name: {settings.http.source_name!r} is also the name of a "
            "[[sources]] entry; the intake needs a name of its own"
        )
    problems.extend(_stdin_problems(settings.sources))
    if problems:
        raise ConfigError(source, problems)
    return settings


def _stdin_problems(sources: list[Any]) -> list[str]:
    """There is one standard input: a second stdin source is an error naming its key."""
    stdin = [i for i, cfg in enumerate(sources) if isinstance(cfg, StdinSourceConfig)]
    return [
        f'sources[{i}].type: "stdin" is already the type of sources[{stdin[0]}] '
        f"({sources[stdin[0]].name!r}); there is one standard input, so at most one "
        "stdin source"
        for i in stdin[1:]
    ]


def _describe(err: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    path = _key_path(err["loc"], data)
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind == "union_tag_invalid":
        return f"{path}.type: {err['msg']}"
    if kind == "union_tag_not_found":
        return f"{path}.type: required key is missing (one of: file, docker, stdin)"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and kind not in ("missing",) and not _is_secret(err["loc"]):
        return f"{path}: {msg} (got {err['input']!r})"
    return f"{path}: {msg}"


def _is_secret(loc: tuple[Any, ...]) -> bool:
    return bool(loc) and loc[-1] in ("dsn",)


def _key_path(loc: tuple[Any, ...], data: Mapping[str, Any]) -> str:
    """('sources', 0, 'file', 'pahts') -> 'sources[0].pahts' (dropping the union tag)."""
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
            node = node[item] if isinstance(node, list) and item < len(node) else None
            continue
        if (
            isinstance(node, Mapping)
            and item not in node
            and isinstance(node.get("type"), str)
            and node.get("type") == item
        ):
            continue  # the discriminator tag pydantic inserts for tagged unions
        parts.append(str(item))
        node = node.get(item) if isinstance(node, Mapping) else None
    return ".".join(parts) or "<root>"
