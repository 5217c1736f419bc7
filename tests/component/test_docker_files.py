"""The docker source in files mode against a containers folder laid out as dockerd does.

`Dockerd` below writes what dockerd writes: `<id>/config.v2.json` (replaced atomically),
`<id>/hostname|hosts|resolv.conf`, and `<id>/<id>-json.log` in the json-file format
(one JSON object per message, Go's escaping, RFC3339Nano times, lines over 16 KB split
into 16 KB messages of which only the last ends in "\\n"), rotated the way its
max-size/max-file options rotate it (rename to `.1`, new file).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from forwarder.clock import SystemClock
from forwarder.config import DockerSourceConfig
from forwarder.event import Position, RawChunk
from forwarder.sources.docker import (
    NOT_IN_A_CONTAINER,
    DockerFilesSource,
    OwnContainer,
    build_docker_source,
    detect_own_container,
    file_config,
)
from tests.docker_engine import compose_labels, config_v2
from tests.support import RunningSource, wait_until

PARTIAL_BYTES = 16 * 1024
T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def go_json_string(text: str) -> str:
    """A JSON string as Go's encoder writes it (<, >, & and U+2028/9 escaped)."""
    out = json.dumps(text, ensure_ascii=False)
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        out = out.replace(char, escape)
    return out


def rfc3339_nano(ts: datetime) -> str:
    """Go's time.RFC3339Nano in UTC: trailing zeros of the fraction trimmed."""
    base = ts.strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{ts.microsecond:06d}000".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


class Dockerd:
    """Writes a containers folder the way dockerd does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(exist_ok=True)
        self._now = T0
        self.times: dict[str, list[datetime]] = {}  # per container: each line's time

    def create(
        self,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        tty: bool = False,
        cid: str | None = None,
    ) -> str:
        """`docker run`: the folder, its config, the files it mounts, an empty log."""
        cid = cid or secrets.token_hex(32)
        folder = self.root / cid
        folder.mkdir()
        self._config(cid, config_v2(cid, name, labels=labels, tty=tty))
        (folder / "hostname").write_text(cid[:12] + "\n")
        (folder / "hosts").write_text("127.0.0.1\tlocalhost\n")
        (folder / "resolv.conf").write_text("nameserver 127.0.0.11\n")
        self.log_path(cid).touch()
        self.times[cid] = []
        return cid

    def stop(self, cid: str) -> None:
        doc = json.loads((self.root / cid / "config.v2.json").read_bytes())
        doc["State"].update(Running=False, Pid=0, FinishedAt=rfc3339_nano(self._now))
        self._config(cid, doc)

    def log_path(self, cid: str) -> Path:
        return self.root / cid / f"{cid}-json.log"

    def write(self, cid: str, line: str, stream: str = "stdout") -> None:
        """The container prints one line: appended as dockerd's json-file logger does."""
        pieces = [line[i : i + PARTIAL_BYTES] for i in range(0, len(line), PARTIAL_BYTES)]
        pieces = pieces or [""]
        entries = []
        for i, piece in enumerate(pieces):
            self._now += timedelta(microseconds=1)
            text = piece + "\n" if i == len(pieces) - 1 else piece
            log, time = go_json_string(text), rfc3339_nano(self._now)
            entries.append(f'{{"log":{log},"stream":"{stream}","time":"{time}"}}\n')
        self.times[cid].append(self._now)
        with self.log_path(cid).open("a", encoding="utf-8") as f:
            f.write("".join(entries))  # one write per message in dockerd; same bytes

    def rotate(self, cid: str) -> None:
        """max-file=2: the log becomes <id>-json.log.1 (the older .1 is dropped)."""
        path = self.log_path(cid)
        os.replace(path, path.with_name(path.name + ".1"))
        path.touch()

    def _config(self, cid: str, doc: dict[str, Any]) -> None:
        tmp = self.root / cid / ".tmp-config.v2.json"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.root / cid / "config.v2.json")  # atomic, like ioutils


def make_config(root: Path, **overrides: Any) -> DockerSourceConfig:
    fields: dict[str, Any] = {
        "type": "docker",
        "name": "containers",
        "containers_dir": root,
        "poll_interval_s": 0.01,
        "glob_interval_s": 0.05,
        "rotate_wait_s": 0.5,
        "multiline": {"mode": "off"},
    }
    fields.update(overrides)
    return DockerSourceConfig(**fields)


class Tail(RunningSource):
    """A running files-mode source and everything it has emitted."""

    def chunks_of(self, cid: str) -> list[RawChunk]:
        return [c for c in self.drain() if (c.meta or {}).get("container_id") == cid]

    def lines(self, cid: str) -> list[bytes]:
        return [line for c in self.chunks_of(cid) for line in c.lines]

    def records(self, cid: str) -> list[tuple[bytes, Any, Any]]:
        out = []
        for c in self.chunks_of(cid):
            metas = c.line_meta or [None] * len(c.lines)
            times = c.times or [None] * len(c.lines)
            for line, meta, ts in zip(c.lines, metas, times, strict=True):
                out.append((line, (meta or {}).get("stream"), ts))
        return out

    async def wait_lines(self, cid: str, n: int) -> list[bytes]:
        await wait_until(lambda: len(self.lines(cid)) >= n, what=f"{n} lines of {cid[:12]}")
        return self.lines(cid)


def tracks(t: Tail, path: Path) -> bool:
    st = path.stat()
    key = f"{st.st_dev}:{st.st_ino}"
    return any(f["stream"] == key for f in t.source.status()["files"])


@pytest.fixture
def dockerd(tmp_path: Path) -> Dockerd:
    return Dockerd(tmp_path / "containers")


@pytest.fixture
async def tail() -> AsyncIterator[Callable[..., Any]]:
    started: list[Tail] = []

    async def start(
        config: DockerSourceConfig,
        *,
        checkpoints: dict[str, Position] | None = None,
        own: OwnContainer = NOT_IN_A_CONTAINER,
    ) -> Tail:
        source = build_docker_source(
            config,
            checkpoints or {},
            SystemClock(),
            exit_on_eof=False,
            ignore_identities=frozenset(),
            own_container=own,
        )
        t = Tail(source)
        started.append(t)
        await wait_until(lambda: source.status()["state"] == "ok", what="source started")
        return t

    yield start
    for t in started:
        if not t.task.done():
            await t.close()


def test_file_config_takes_the_tail_settings_and_the_docker_format(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, read_from="tail", max_line_bytes=4096, rotate_wait_s=7.0)
    files = file_config(cfg)
    assert files.paths == [str(tmp_path / "*" / "*-json.log")]
    assert (files.type, files.name, files.format) == ("file", "containers", "docker")
    assert (files.read_from, files.max_line_bytes, files.rotate_wait_s) == ("tail", 4096, 7.0)
    assert files.multiline == cfg.multiline


async def test_containers_are_read_with_service_meta_stream_and_time(
    dockerd: Dockerd, tail: Callable[..., Any]
) -> None:
    api = dockerd.create("shop-api-1", labels=compose_labels("shop", "api"))
    redis = dockerd.create("redis")
    dockerd.write(api, '{"level": "info", "msg": "<listening> & ready"}')
    dockerd.write(api, "Traceback (most recent call last):", stream="stderr")
    dockerd.write(redis, "Ready to accept connections tcp")
    t = await tail(make_config(dockerd.root, services={"api": "shop-api"}))

    await t.wait_lines(api, 2)
    await t.wait_lines(redis, 1)
    assert t.records(api) == [
        (b'{"level": "info", "msg": "<listening> & ready"}', "stdout", dockerd.times[api][0]),
        (b"Traceback (most recent call last):", "stderr", dockerd.times[api][1]),
    ]
    chunk = t.chunks_of(api)[0]
    assert chunk.service == "shop-api"
    assert chunk.meta == {"container_id": api, "container_name": "shop-api-1"}
    assert t.chunks_of(redis)[0].service == "redis"
    assert t.chunks_of(redis)[0].meta == {"container_id": redis, "container_name": "redis"}


async def test_lines_split_at_16kb_by_dockerd_are_joined(
    dockerd: Dockerd, tail: Callable[..., Any]
) -> None:
    cid = dockerd.create("big")
    long_line = "0123456789" * 4000
    dockerd.write(cid, long_line)
    dockerd.write(cid, "after", stream="stderr")
    t = await tail(make_config(dockerd.root))

    assert await t.wait_lines(cid, 2) == [long_line.encode(), b"after"]
    assert dockerd.log_path(cid).read_bytes().count(b"\n") == 4  # three pieces + one


async def test_a_container_started_after_the_source_is_picked_up(
    dockerd: Dockerd, tail: Callable[..., Any]
) -> None:
    t = await tail(make_config(dockerd.root))
    cid = dockerd.create("late")
    dockerd.write(cid, "hello")
    assert await t.wait_lines(cid, 1) == [b"hello"]
    assert [c["name"] for c in t.source.status()["containers"]] == ["late"]


async def test_include_exclude_by_name_and_label(
    dockerd: Dockerd, tail: Callable[..., Any]
) -> None:
    api = dockerd.create("shop-api-1", labels={"logs": "yes"})
    db = dockerd.create("shop-db-1", labels={"logs": "yes"})
    cron = dockerd.create("shop-cron-1", labels={"logs": "no"})
    other = dockerd.create("other-1", labels={"logs": "yes"})
    unlabelled = dockerd.create("shop-web-1")
    for cid in (api, db, cron, other, unlabelled):
        dockerd.write(cid, "hello")
    config = make_config(
        dockerd.root,
        include_containers=["shop-*"],
        exclude_containers=["*-db-*"],
        include_labels=["logs"],
        exclude_labels=["logs=no"],
    )
    t = await tail(config)

    await t.wait_lines(api, 1)
    await wait_until(lambda: len(t.source.status()["skipped"]) == 4, what="4 skipped")
    assert {(c.meta or {}).get("container_name") for c in t.drain()} == {"shop-api-1"}


async def test_our_own_container_is_never_read(
    dockerd: Dockerd, tail: Callable[..., Any], tmp_path: Path
) -> None:
    ours = dockerd.create("forwarder-1")
    theirs = dockerd.create("shop-api-1")
    dockerd.write(ours, "our own log line")
    dockerd.write(theirs, "hello")
    # Found the way it is in production: /proc/self/mountinfo names our folder.
    proc = tmp_path / "proc"
    proc.mkdir()
    source = f"/var/lib/docker/containers/{ours}/hostname"  # the host's path
    (proc / "mountinfo").write_text(f"1194 1183 8:1 {source} /etc/hostname rw - ext4 sda1 rw\n")
    (proc / "cgroup").write_text("0::/\n")
    own = detect_own_container(proc, environ={"HOSTNAME": ours[:12]})
    assert own == OwnContainer(id=ours)
    t = await tail(make_config(dockerd.root), own=own)

    await t.wait_lines(theirs, 1)
    await wait_until(lambda: len(t.source.status()["skipped"]) == 1, what="ours skipped")
    assert t.lines(ours) == []
    assert "own container" in next(iter(t.source.status()["skipped"].values()))


async def test_rotation_while_writing_loses_and_repeats_nothing(
    dockerd: Dockerd, tail: Callable[..., Any]
) -> None:
    cid = dockerd.create("busy", labels=compose_labels("shop", "worker"))
    t = await tail(make_config(dockerd.root))
    expected = []
    for i in range(600):
        line = f"line {i:04d} " + "x" * (i % 50)
        dockerd.write(cid, line, stream="stderr" if i % 7 == 0 else "stdout")
        expected.append(line.encode())
        if i % 150 == 149:
            dockerd.rotate(cid)
            # The source opens the new file before it is rotated in turn (rotating
            # twice within one glob_interval_s is a limit of globbing `*-json.log`).
            await wait_until(lambda: tracks(t, dockerd.log_path(cid)), what="the new log")
        if i % 50 == 0:
            await asyncio.sleep(0)  # let the source read between bursts, as in life
    lines = await t.wait_lines(cid, 600)
    assert lines == expected
    assert {c.service for c in t.chunks_of(cid)} == {"worker"}
    assert t.source.status()["rotations_detected"] >= 4


async def test_a_stopped_container_is_read_to_its_end_and_a_restart_resumes(
    dockerd: Dockerd, tail: Callable[..., Any]
) -> None:
    cid = dockerd.create("job")
    for i in range(3):
        dockerd.write(cid, f"line {i}")
    dockerd.stop(cid)
    first = await tail(make_config(dockerd.root))
    assert await first.wait_lines(cid, 3) == [b"line 0", b"line 1", b"line 2"]
    await first.close()
    position = first.chunks_of(cid)[-1].position
    assert position is not None

    dockerd.write(cid, "line 3")  # started again and wrote while we were down
    checkpoints = {position.stream: position}
    second = await tail(make_config(dockerd.root), checkpoints=checkpoints)
    assert await second.wait_lines(cid, 1) == [b"line 3"]


async def test_a_log_without_its_config_is_skipped_until_the_config_appears(
    dockerd: Dockerd, tail: Callable[..., Any]
) -> None:
    cid = dockerd.create("half-made")
    dockerd.write(cid, "hello")
    config_file = dockerd.root / cid / "config.v2.json"
    saved = config_file.read_bytes()
    config_file.unlink()
    t = await tail(make_config(dockerd.root))
    await wait_until(lambda: t.source.status()["skipped"], what="the log skipped")
    assert "config.v2.json" in next(iter(t.source.status()["skipped"].values()))

    config_file.write_bytes(saved)
    assert await t.wait_lines(cid, 1) == [b"hello"]
    assert t.source.status()["skipped"] == {}


async def test_exit_on_eof_reads_every_container_and_returns(dockerd: Dockerd) -> None:
    a = dockerd.create("a")
    b = dockerd.create("b")
    dockerd.write(a, "from a")
    dockerd.write(b, "from b")
    dockerd.stop(b)
    source = DockerFilesSource(
        make_config(dockerd.root),
        {},
        SystemClock(),
        exit_on_eof=True,
        own_container=NOT_IN_A_CONTAINER,
    )
    queue: asyncio.Queue[RawChunk] = asyncio.Queue()
    await asyncio.wait_for(source.run(queue, asyncio.Event()), 10)
    got = set()
    while not queue.empty():
        chunk = queue.get_nowait()
        got.update(((chunk.meta or {})["container_name"], line) for line in chunk.lines)
    assert got == {("a", b"from a"), ("b", b"from b")}


def python_stderr() -> list[str]:
    """The stderr of a real Python program that logs an exception."""
    code = (
        "import logging\n"
        "logging.basicConfig(format='%(levelname)s %(name)s %(message)s')\n"
        "try:\n"
        "    {}['customer']\n"
        "except KeyError:\n"
        "    logging.getLogger('shop.api').exception('lookup failed')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    return result.stderr.rstrip("\n").split("\n")


async def test_a_traceback_logged_by_a_real_python_program_is_one_record(
    dockerd: Dockerd, tail: Callable[..., Any]
) -> None:
    stderr = python_stderr()
    cid = dockerd.create("shop-api-1", labels=compose_labels("shop", "api"))
    dockerd.write(cid, "GET /customers/7 500")
    for line in stderr:
        dockerd.write(cid, line, stream="stderr")
    dockerd.write(cid, "GET /health 200")
    config = make_config(dockerd.root, multiline={"mode": "python", "flush_timeout_s": 0.05})
    t = await tail(config)

    lines = await t.wait_lines(cid, 3)
    assert lines == [b"GET /customers/7 500", "\n".join(stderr).encode(), b"GET /health 200"]
    assert {c.service for c in t.chunks_of(cid)} == {"api"}
