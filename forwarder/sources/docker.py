"""Container stdout: the `docker` source, and the container facts both its modes share.

Two modes (`DockerSourceConfig.mode`):

- "files" (here): a `FileSource` over dockerd's json-file logs,
  `<containers_dir>/<id>/<id>-json.log`, decoded with format "docker". Rotation,
  truncation and exactly-once checkpoints are the file source's; this module only says,
  per log file, which container it belongs to (its `config.v2.json`, next to it),
  whether to read it, and the service and meta of its rows (`describe`).
- "api" (`docker_api.py`): the Engine API over its unix socket.

The pure part, shared by both: parse a container document (`config.v2.json` on disk or
`GET /containers/{id}/json`: same layout) into `ContainerInfo`; pick its service
(`service_for`); include/exclude it (`ContainerSelector`); recognise the forwarder's own
container (`OwnContainer`, detected from /proc/self/mountinfo, /proc/self/cgroup or
$HOSTNAME), which is never read: its output is this process's own logs.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from forwarder.clock import Clock
from forwarder.config import DockerSourceConfig, FileSourceConfig, TailConfig
from forwarder.event import Position
from forwarder.sources.file import FileSource, FileTarget

log = logging.getLogger(__name__)

COMPONENT = "source.docker"
COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
COMPOSE_NUMBER_LABEL = "com.docker.compose.container-number"
COMPOSE_ONEOFF_LABEL = "com.docker.compose.oneoff"
COMPOSE_SLUG_LABEL = "com.docker.compose.slug"
CONFIG_FILE = "config.v2.json"
LOG_GLOB = "*-json.log"  # its rotated copies (<id>-json.log.1, ...) are read too

_FULL_ID = re.compile(r"^[0-9a-f]{64}$")
_SHORT_ID = re.compile(r"^[0-9a-f]{12}$")
# <data root>/containers/<id>/hostname (and resolv.conf, hosts) are bind-mounted into
# every container: the id in their source path is the container's own. The path is
# relative to the root of the filesystem holding it: "/var/lib/docker/containers/<id>/
# hostname" on the root filesystem, "/containers/<id>/hostname" when the data root is a
# filesystem of its own (a disk mounted at /var/lib/docker), whatever the data root is.
_MOUNTINFO_ID = re.compile(r"(?:^|/)containers/([0-9a-f]{64})/(?:hostname|hosts|resolv\.conf)$")
# cgroup v1 (and v2 with the cgroupfs driver): ".../docker/<id>" or "docker-<id>.scope".
_CGROUP_ID = re.compile(r"(?:/docker/|/docker-)([0-9a-f]{64})(?:\.scope)?(?:/|$)")
_OWN_MOUNTS = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")


# -- container facts (pure) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """What the source needs to know about one container."""

    id: str  # the full 64-hex id
    name: str  # without the leading "/"
    labels: Mapping[str, str] = field(default_factory=dict)
    running: bool = False
    tty: bool = False


def parse_container(doc: Mapping[str, Any] | bytes | str) -> ContainerInfo:
    """A container document -> ContainerInfo; ValueError when it is not one.

    Accepts dockerd's `config.v2.json` ("ID") and the Engine API's inspect answer
    ("Id"): both carry "Name" ("/shop-api-1"), "Config" {"Labels", "Tty"} and
    "State" {"Running"}.
    """
    if isinstance(doc, bytes | str):
        try:
            doc = json.loads(doc)
        except ValueError as e:
            raise ValueError(f"not JSON: {e}") from None
    if not isinstance(doc, Mapping):
        raise ValueError("not a JSON object")
    cid = doc.get("ID", doc.get("Id"))
    if not isinstance(cid, str) or not _FULL_ID.match(cid):
        raise ValueError(f"no container id (ID): {cid!r}")
    name = doc.get("Name")
    if not isinstance(name, str) or not name.strip("/"):
        raise ValueError("no container name (Name)")
    config = doc.get("Config")
    config = config if isinstance(config, Mapping) else {}
    labels = config.get("Labels")
    labels = labels if isinstance(labels, Mapping) else {}
    state = doc.get("State")
    state = state if isinstance(state, Mapping) else {}
    return ContainerInfo(
        id=cid,
        name=name.lstrip("/"),
        labels={str(k): str(v) for k, v in labels.items()},
        running=state.get("Running") is True,
        tty=config.get("Tty") is True,
    )


def compose_names(info: ContainerInfo) -> tuple[str, ...]:
    """Its name, then the name the other docker compose version gives the same container.

    docker-compose v1 (python, 1.x) joins project, service and number with "_"
    (`shop_api_1`, one-offs `shop_api_run_<slug[:12]>`), compose v2 with "-"
    (`shop-api-1`, `shop-api-run-<slug[:12]>`; `--compatibility` uses "_"); both set
    the labels project, service, oneoff, container-number (v1 not on one-offs) and slug
    (one-offs). A container not named so by compose (no such labels, or a
    `container_name`) has only its name.
    """
    labels = info.labels
    project = labels.get(COMPOSE_PROJECT_LABEL)
    service = labels.get(COMPOSE_SERVICE_LABEL)
    if not project or not service:
        return (info.name,)
    slug = labels.get(COMPOSE_SLUG_LABEL)
    number = labels.get(COMPOSE_NUMBER_LABEL)
    if labels.get(COMPOSE_ONEOFF_LABEL) == "True" and slug:
        bits = [project.lstrip("-_"), service, "run", slug[:12]]
    elif number:
        bits = [project.lstrip("-_"), service, number]
    else:
        return (info.name,)
    v1, v2 = "_".join(bits), "-".join(bits)
    if info.name == v1:
        return (v1, v2)
    if info.name == v2:
        return (v2, v1)
    return (info.name,)


def service_for(info: ContainerInfo, services: Mapping[str, str]) -> str:
    """The `services` entry of its compose service, else of its name (as either compose
    version names it: `shop_api_1` or `shop-api-1`, see `compose_names`); else the
    compose service itself, else the name."""
    compose = info.labels.get(COMPOSE_SERVICE_LABEL) or None
    if compose is not None and compose in services:
        return services[compose]
    if services:
        for name in compose_names(info):
            if name in services:
                return services[name]
    return compose or info.name


def container_meta(info: ContainerInfo) -> dict[str, str]:
    """Meta written on every row of the container: full id, name without "/"."""
    return {"container_id": info.id, "container_name": info.name}


def label_matches(labels: Mapping[str, str], spec: str) -> bool:
    """`spec` is "key" (the label is present) or "key=value" (present with that value)."""
    key, eq, value = spec.partition("=")
    if not eq:
        return key in labels
    return labels.get(key) == value


@dataclass(frozen=True, slots=True)
class ContainerSelector:
    """Include/exclude rules: name globs and labels. Exclusion wins.

    Included when (no include_names, or the name matches one) and it carries every
    include_labels entry; excluded when the name matches an exclude_names glob or it
    carries any exclude_labels entry. A compose container's name matches a glob when
    either compose version's name for it does (`compose_names`: "*-db-*" matches
    `shop_db_1` too).
    """

    include_names: tuple[str, ...] = ()
    exclude_names: tuple[str, ...] = ()
    include_labels: tuple[str, ...] = ()
    exclude_labels: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: DockerSourceConfig) -> ContainerSelector:
        return cls(
            tuple(cfg.include_containers),
            tuple(cfg.exclude_containers),
            tuple(cfg.include_labels),
            tuple(cfg.exclude_labels),
        )

    def rejects(self, info: ContainerInfo) -> str | None:
        """Why the container is not read, or None when it is."""
        names = compose_names(info) if self.include_names or self.exclude_names else ()
        if self.include_names and not any(
            fnmatch.fnmatchcase(n, g) for g in self.include_names for n in names
        ):
            return "its name matches no include_containers glob"
        for glob in self.exclude_names:
            if any(fnmatch.fnmatchcase(n, glob) for n in names):
                return f"its name matches exclude_containers {glob!r}"
        for spec in self.include_labels:
            if not label_matches(info.labels, spec):
                return f"it lacks include_labels {spec!r}"
        for spec in self.exclude_labels:
            if label_matches(info.labels, spec):
                return f"it has exclude_labels {spec!r}"
        return None


@dataclass(frozen=True, slots=True)
class OwnContainer:
    """The container this process runs in, if any: never read (it holds our own logs).

    `id` is the full id when it could be read from mountinfo or cgroup; `prefix` a
    12-hex short id from $HOSTNAME (Docker's default hostname) when it could not.
    """

    id: str | None = None
    prefix: str | None = None

    def matches(self, container_id: str) -> bool:
        if self.id is not None:
            return container_id == self.id
        return self.prefix is not None and container_id.startswith(self.prefix)


NOT_IN_A_CONTAINER = OwnContainer()


def own_container_from(
    mountinfo: str | None, cgroup: str | None, hostname: str | None
) -> OwnContainer:
    """Our container from the texts of /proc/self/mountinfo, /proc/self/cgroup and
    $HOSTNAME (each None when unavailable), in that order of trust.

    mountinfo: a line whose mount point is /etc/hostname, /etc/hosts or /etc/resolv.conf
    and whose root is `.../containers/<id>/<that file>` (dockerd bind-mounts them from
    the container's folder under its data root). The root is relative to the filesystem
    that holds it, so any data root works: `/var/lib/docker/containers/<id>/hostname`,
    `/srv/docker/containers/<id>/hostname`, or `/containers/<id>/hostname` when the data
    root is a filesystem of its own. This works with a private cgroup namespace too
    (cgroup v2's default, where /proc/self/cgroup is `0::/`). Other lines naming such a
    folder are not evidence: on the host itself, every running container's
    `.../containers/<id>/mounts/shm` may be listed, and a sidecar's mount of the
    containers folder is not one of those files. cgroup (v1, or v2 with the host's
    cgroup namespace): `.../docker/<id>` or `docker-<id>.scope`. HOSTNAME: 12 hex
    digits, Docker's default.
    """
    for line in (mountinfo or "").splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) > 4 and fields[4] in _OWN_MOUNTS:
            m = _MOUNTINFO_ID.search(fields[3])
            if m is not None:
                return OwnContainer(id=m[1])
    if cgroup:
        m = _CGROUP_ID.search(cgroup)
        if m is not None:
            return OwnContainer(id=m[1])
    if hostname and _SHORT_ID.match(hostname):
        return OwnContainer(prefix=hostname)
    return NOT_IN_A_CONTAINER


def detect_own_container(
    proc: Path = Path("/proc/self"), environ: Mapping[str, str] | None = None
) -> OwnContainer:
    """`own_container_from` over this process's /proc files and environment."""
    environ = os.environ if environ is None else environ

    def read(name: str) -> str | None:
        try:
            return (proc / name).read_text(errors="replace")
        except OSError:
            return None

    return own_container_from(read("mountinfo"), read("cgroup"), environ.get("HOSTNAME"))


@dataclass(frozen=True, slots=True)
class ContainerTarget:
    """A container to read: the service and meta of its rows."""

    info: ContainerInfo
    service: str
    meta: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ContainerRules:
    """Everything that decides whether a container is read, and as which service."""

    selector: ContainerSelector
    services: Mapping[str, str]
    own: OwnContainer

    @classmethod
    def from_config(cls, cfg: DockerSourceConfig, own: OwnContainer) -> ContainerRules:
        return cls(ContainerSelector.from_config(cfg), dict(cfg.services), own)

    def decide(self, info: ContainerInfo) -> ContainerTarget | str:
        """The target, or why the container is skipped."""
        if self.own.matches(info.id):
            return "it is the forwarder's own container (reading it would loop)"
        reason = self.selector.rejects(info)
        if reason is not None:
            return reason
        return ContainerTarget(info, service_for(info, self.services), container_meta(info))


# -- files mode ------------------------------------------------------------------------


class DockerSource(Protocol):
    """What `build_docker_source` returns: the runtime's source contract."""

    async def run(self, out: asyncio.Queue[Any], stop: asyncio.Event) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def progress(self) -> tuple[int, int]: ...


def file_config(cfg: DockerSourceConfig) -> FileSourceConfig:
    """The file source over dockerd's json-file logs: the docker config's tail fields."""
    tail = {key: getattr(cfg, key) for key in TailConfig.model_fields}
    return FileSourceConfig(
        type="file",
        name=cfg.name,
        service=cfg.name,  # placeholder: every file's service comes from describe()
        paths=[str(cfg.containers_dir / "*" / LOG_GLOB)],
        format="docker",
        **tail,
    )


def read_container_config(log_path: str) -> ContainerInfo:
    """The container owning a json-file log: its config.v2.json, in the same folder.

    Raises OSError (unreadable) or ValueError (not a container document)."""
    with open(os.path.join(os.path.dirname(log_path), CONFIG_FILE), "rb") as f:
        return parse_container(f.read())


class DockerFilesSource:
    """Files mode: dockerd's json-file logs through a FileSource, one service per container.

    Containers that start later are found by the file source's glob re-scan; a stopped
    container's log is read to its end like any file; dockerd's rotation
    (<id>-json.log -> <id>-json.log.1) is followed by the file source.
    """

    def __init__(
        self,
        cfg: DockerSourceConfig,
        checkpoints: Mapping[str, Position],
        clock: Clock,
        *,
        exit_on_eof: bool = False,
        ignore_identities: frozenset[tuple[int, int]] = frozenset(),
        own_container: OwnContainer | None = None,
        read_config: Callable[[str], ContainerInfo] = read_container_config,
    ) -> None:
        self.name = cfg.name  # the source's name, for status
        self._cfg = cfg
        own = detect_own_container() if own_container is None else own_container
        self._rules = ContainerRules.from_config(cfg, own)
        self._read_config = read_config
        self._log_extra = {"component": COMPONENT, "source": cfg.name}
        self._containers: dict[str, dict[str, str]] = {}  # id -> {name, service}
        self._skipped: dict[str, str] = {}  # container folder -> reason (logged once)
        self._file = FileSource(
            file_config(cfg),
            checkpoints,
            clock,
            exit_on_eof=exit_on_eof,
            ignore_identities=ignore_identities,
            describe=self.describe,
            rotations=True,
        )

    def describe(self, path: str) -> FileTarget | None:
        """The service and meta of a log file's rows, or None to skip the file.

        Called by the file source when it opens the file, so config.v2.json is read
        afresh for every container (and every rotated file) it starts reading.
        """
        folder = os.path.dirname(path)
        try:
            info = self._read_config(path)
        except (OSError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self._skip(folder, f"cannot read its {CONFIG_FILE}: {why}", logging.WARNING)
            return None
        decision = self._rules.decide(info)
        if isinstance(decision, str):
            self._skip(folder, f"container {info.name} ({info.id[:12]}): {decision}")
            return None
        self._skipped.pop(folder, None)
        self._containers[info.id] = {"name": info.name, "service": decision.service}
        return FileTarget(service=decision.service, meta=decision.meta)

    def _skip(self, folder: str, reason: str, level: int = logging.INFO) -> None:
        if self._skipped.get(folder) != reason:
            self._skipped[folder] = reason
            log.log(level, "skipping %s: %s", folder, reason, extra=self._log_extra)

    async def run(self, out: asyncio.Queue[Any], stop: asyncio.Event) -> None:
        await self._file.run(out, stop)

    def status(self) -> dict[str, Any]:
        status = self._file.status()
        status["mode"] = "files"
        status["containers"] = [{"id": cid, **c} for cid, c in self._containers.items()]
        status["skipped"] = dict(self._skipped)
        return status

    def progress(self) -> tuple[int, int]:
        return self._file.progress()


def build_docker_source(
    cfg: DockerSourceConfig,
    checkpoints: Mapping[str, Position],
    clock: Clock,
    *,
    exit_on_eof: bool,
    ignore_identities: frozenset[tuple[int, int]],
    own_container: OwnContainer | None = None,
) -> DockerSource:
    """The docker source of `cfg.mode`. `own_container`: None detects it from /proc."""
    if cfg.mode == "api":
        from forwarder.sources.docker_api import DockerApiSource  # it imports this module

        return DockerApiSource(
            cfg, checkpoints, clock, exit_on_eof=exit_on_eof, own_container=own_container
        )
    return DockerFilesSource(
        cfg,
        checkpoints,
        clock,
        exit_on_eof=exit_on_eof,
        ignore_identities=ignore_identities,
        own_container=own_container,
    )
