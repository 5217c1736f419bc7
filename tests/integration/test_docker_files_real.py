"""The files-mode matrix against a real dockerd: every line numbered, counted once.

Each cell runs busybox containers that print numbered lines (`seq=N ...`) through
dockerd's json-file driver with its own rotation (`max-size` / `max-file`), while a real
`forwarder run` reads the engine's containers folder with the docker source's default
intervals (the folder watch, not a fast timer, must find every rotated copy). Ground
truth is the containers' own numbering: every number stored exactly once, in order.

`make test` runs each cell at a small size; FORWARDER_DOCKER_MATRIX=full (`make
docker-matrix`) runs the sizes of issue 11 (10 s of downtime, more lines).
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.dockerd import TEST_LABEL as LABEL
from tests.dockerd import Container, RealDockerd
from tests.integration.daemon import Daemon, connected, write_config
from tests.support import free_port, wait_until

pytestmark = pytest.mark.docker

FULL = os.environ.get("FORWARDER_DOCKER_MATRIX") == "full"
ROTATION = {"max-size": "50k", "max-file": "10"}
PAD = "the quick brown fox jumps over the lazy dog"  # ~115 bytes a line in json-file


def printer_script(n: int, per_s: int) -> str:
    """busybox sh: print seq=0 .. seq=n-1 at about per_s lines a second (ten bursts)."""
    burst = max(1, per_s // 10)
    return (
        f"i=0; while [ $i -lt {n} ]; do j=0; "
        f'while [ $j -lt {burst} ] && [ $i -lt {n} ]; do echo "seq=$i {PAD}"; '
        "i=$((i+1)); j=$((j+1)); done; usleep 100000; done"
    )


def docker_source(engine: RealDockerd, token: str, **keys: str) -> str:
    """A files-mode docker source over the engine, only this test's containers; the
    intervals are the defaults a user gets."""
    extra = "".join(f"{k} = {v}\n" for k, v in keys.items())
    return f"""
[[sources]]
type = "docker"
name = "containers"
mode = "files"
containers_dir = "{engine.containers_dir}"
include_labels = ["{LABEL}={token}"]
{extra}"""


@dataclass
class Cell:
    """One forwarder over one engine, and the rows it stored."""

    engine: RealDockerd
    tmp_path: Path
    dsn: str
    schema: str
    token: str
    daemon: Daemon | None = None
    started: list[Daemon] = field(default_factory=list)

    async def start_forwarder(self, http: str = "", **keys: str) -> Daemon:
        config = write_config(
            self.tmp_path / "f.toml",
            dsn=self.dsn,
            schema=self.schema,
            files={},
            extra=http + docker_source(self.engine, self.token, **keys),
        )
        self.daemon = await Daemon(config).start()
        self.started.append(self.daemon)
        await self.wait_log('"startup.source"', what="the source's start-up line")
        return self.daemon

    async def wait_log(self, pattern: str, what: str, timeout_s: float = 30) -> None:
        """Until the daemon's own log matches `pattern` (it died: fail at once)."""
        deadline = time.monotonic() + timeout_s
        assert self.daemon is not None
        while not re.search(pattern, self.daemon.stderr()):
            assert self.daemon.proc is not None and self.daemon.proc.returncode is None, (
                self.daemon.stderr()
            )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout_s}s:\n{self.daemon.stderr()}")
            await asyncio.sleep(0.05)

    def run(self, script: str, *, log_opts: dict[str, str] | None = None, **kw: Any) -> Container:
        return self.engine.run(
            self.engine.busybox_image(),
            "sh",
            "-c",
            script,
            labels={LABEL: self.token},
            log_opts=ROTATION if log_opts is None else log_opts,
            **kw,
        )

    async def rows(self) -> list[Any]:
        async with connected(self.dsn, self.schema) as conn:
            return await conn.fetch("SELECT service, message, meta FROM system_logs ORDER BY id")

    async def settle(self, expected: int, timeout_s: float = 60) -> list[Any]:
        """The rows once `expected` are stored (or the deadline passed: then whatever
        is there, for the assertion to name what is missing), the forwarder stopped."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            async with connected(self.dsn, self.schema) as conn:
                if await conn.fetchval("SELECT count(*) FROM system_logs") >= expected:
                    break
            await asyncio.sleep(0.1)
        assert self.daemon is not None
        assert await self.daemon.stop() == 0, self.daemon.stderr()
        return await self.rows()


@pytest.fixture
async def make_cell(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> AsyncIterator[Callable[[RealDockerd], Cell]]:
    """Factory: a Cell over an engine; a forwarder a failed test left running is killed."""
    made: list[Cell] = []

    def make(engine: RealDockerd) -> Cell:
        made.append(Cell(engine, tmp_path, pg_dsn, pg_schema, secrets.token_hex(4)))
        return made[-1]

    yield make
    for cell in made:
        for daemon in cell.started:
            if daemon.proc is not None and daemon.proc.returncode is None:
                await daemon.kill9()


def numbers_of(rows: list[Any]) -> list[int]:
    return [int(r["message"].split()[0][4:]) for r in rows if r["message"].startswith("seq=")]


def assert_exactly_once(stored: list[int], written: range, why: str = "") -> None:
    counts = collections.Counter(stored)
    lost = [n for n in written if n not in counts]
    repeated = sorted(n for n, c in counts.items() if c > 1)
    # The matrix's figures (`make docker-matrix` shows them; pytest -rP in CI logs).
    print(f"{why}: written {len(written)}, stored {len(stored)}, lost {len(lost)}, "
          f"repeated {len(stored) - len(counts)}")  # fmt: skip
    assert (len(lost), repeated[:10]) == (0, []), (
        f"{why}: {len(stored)} stored of {len(written)} written; "
        f"lost {len(lost)} (first {lost[:10]}), repeated {len(repeated)}"
    )
    assert stored == sorted(stored), f"{why}: out of order"


async def exited(container: Container, timeout_s: float = 120) -> int:
    return await asyncio.to_thread(container.wait, timeout_s)


@pytest.mark.parametrize(("per_s", "lines"), [(300, 6000 if FULL else 1500),
                                              (2000, 20000 if FULL else 6000)])  # fmt: skip
async def test_rotation_by_dockerd_loses_and_repeats_nothing(
    real_dockerd: RealDockerd, make_cell: Callable[[RealDockerd], Cell], per_s: int, lines: int
) -> None:
    cell = make_cell(real_dockerd)
    await cell.start_forwarder()
    printer = cell.run(printer_script(lines, per_s))
    assert await exited(printer) == 0
    rotated = len(list(printer.log_path.parent.glob("*-json.log.*")))
    assert rotated >= 3, "no rotation: resize the test"
    rows = await cell.settle(lines)
    assert_exactly_once(numbers_of(rows), range(lines), f"{per_s} lines/s")


async def test_kill_9_during_rotation_resumes_with_the_copies_made_while_down(
    real_dockerd: RealDockerd, make_cell: Callable[[RealDockerd], Cell]
) -> None:
    lines, down_s = (6000, 10.0) if FULL else (3000, 3.0)
    cell = make_cell(real_dockerd)
    daemon = await cell.start_forwarder()
    printer = cell.run(printer_script(lines, 300))
    await asyncio.sleep(2.0)  # the scenario: the forwarder dies while the container logs
    await daemon.kill9()
    await asyncio.sleep(down_s)  # the downtime, while dockerd rotates (not a wait for state)
    await cell.start_forwarder()
    assert await exited(printer) == 0
    rows = await cell.settle(lines)
    assert_exactly_once(numbers_of(rows), range(lines), f"kill -9, {down_s} s down")


@pytest.mark.parametrize("live_restore", [False, True])
async def test_dockerd_restart_loses_and_repeats_nothing(
    new_dockerd: Callable[..., RealDockerd],
    make_cell: Callable[[RealDockerd], Cell],
    live_restore: bool,
) -> None:
    engine = new_dockerd(("--live-restore",) if live_restore else ())
    lines = 3000
    cell = make_cell(engine)
    await cell.start_forwarder()
    # --init: the shell as PID 1 would ignore the SIGTERM of dockerd's shutdown.
    printer = cell.run(printer_script(lines, 300), init=True)
    await asyncio.sleep(2.0)  # the scenario: dockerd restarts while the container logs
    await asyncio.to_thread(engine.restart)
    if live_restore:
        assert await exited(printer) == 0  # it kept running through the restart
        written = range(lines)
    else:
        # Without live-restore dockerd stops its containers: what it wrote is the truth.
        written = range(len([m for m in printer.messages() if m[1].startswith("seq=")]))
        assert 0 < len(written) < lines
    rows = await cell.settle(len(written))
    assert_exactly_once(numbers_of(rows), written, f"dockerd restart, live-restore {live_restore}")


async def test_one_off_rm_containers_are_read_before_dockerd_removes_them(
    real_dockerd: RealDockerd, make_cell: Callable[[RealDockerd], Cell]
) -> None:
    cell = make_cell(real_dockerd)
    await cell.start_forwarder()
    runs = 10 if FULL else 5
    for i in range(runs):
        script = "; ".join(f"echo seq={3 * i + j} {PAD}" for j in range(3))
        done = cell.run(script, rm=True, detach=False)  # in the foreground, to its end
        assert done.exit_code == 0
    rows = await cell.settle(3 * runs)
    assert_exactly_once(numbers_of(rows), range(3 * runs), "--rm one-offs")


async def test_a_one_megabyte_line_is_one_row(
    real_dockerd: RealDockerd, make_cell: Callable[[RealDockerd], Cell]
) -> None:
    cell = make_cell(real_dockerd)
    await cell.start_forwarder(max_line_bytes="2097152")
    size = 1_000_000
    printer = cell.run(
        f"echo seq=0; head -c {size} /dev/zero | tr '\\0' x; echo; echo seq=1",
        log_opts={"max-size": "10m", "max-file": "2"},
    )
    assert await exited(printer) == 0
    rows = await cell.settle(3)
    assert [len(r["message"]) for r in rows] == [5, size, 5]
    assert numbers_of(rows) == [0, 1]
    assert "truncated" not in orjson.loads(rows[1]["meta"])


async def test_tty_containers_lines_lose_their_carriage_return(
    real_dockerd: RealDockerd, make_cell: Callable[[RealDockerd], Cell]
) -> None:
    cell = make_cell(real_dockerd)
    await cell.start_forwarder()
    lines = 1500
    printer = cell.run(printer_script(lines, 2000), tty=True)
    assert await exited(printer) == 0
    rows = await cell.settle(lines)
    assert_exactly_once(numbers_of(rows), range(lines), "tty")
    assert not [r for r in rows if r["message"].endswith("\r")]


async def test_compose_v1_and_v2_containers_map_to_their_services(
    real_dockerd: RealDockerd, make_cell: Callable[[RealDockerd], Cell]
) -> None:
    cell = make_cell(real_dockerd)
    project = f"p{cell.token}"
    await cell.start_forwarder(services=f'{{ "api" = "shop-api", "{project}_worker_1" = "jobs" }}')
    v1 = {  # what docker-compose 1.29.2 sets (tests/fixtures/dockerd/compose-v1-*.json)
        "com.docker.compose.project": project,
        "com.docker.compose.service": "api",
        "com.docker.compose.container-number": "1",
        "com.docker.compose.oneoff": "False",
        "com.docker.compose.version": "1.29.2",
    }
    v2 = {**v1, "com.docker.compose.service": "worker", "com.docker.compose.version": "2.29.7"}
    image = cell.engine.busybox_image()
    mine = {LABEL: cell.token}
    api = cell.engine.run(image, "echo", "seq=0 from api", name=f"{project}_api_1",
                          labels={**v1, **mine})  # fmt: skip
    worker = cell.engine.run(image, "echo", "seq=1 from worker", name=f"{project}-worker-1",
                             labels={**v2, **mine})  # fmt: skip
    assert await exited(api) == 0 and await exited(worker) == 0
    rows = await cell.settle(2)
    assert sorted((r["service"], r["message"]) for r in rows) == [
        ("jobs", "seq=1 from worker"),  # services key in v1's spelling, container in v2's
        ("shop-api", "seq=0 from api"),
    ]


async def test_compressed_copies_not_read_before_are_counted_in_the_metrics(
    real_dockerd: RealDockerd, make_cell: Callable[[RealDockerd], Cell]
) -> None:
    cell = make_cell(real_dockerd)
    lines = 1500
    printer = cell.run(printer_script(lines, 2000), log_opts={**ROTATION, "compress": "true"})
    assert await exited(printer) == 0
    folder = printer.log_path.parent
    gz = sorted(p.name for p in folder.glob("*-json.log.*.gz"))
    plain = [m for m in printer.messages() if m[1].startswith("seq=")]  # what is not compressed
    assert gz, "no compressed copy: resize the test"
    port = free_port()
    await cell.start_forwarder(http=f'[http]\nenabled = true\nlisten = "127.0.0.1:{port}"\n')
    async with connected(cell.dsn, cell.schema) as conn:
        await wait_until(
            lambda: conn.fetchval("SELECT count(*) >= $1 FROM system_logs", len(plain)),
            what="the uncompressed lines",
        )
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        metrics = await r.text()
    rows = await cell.settle(len(plain))
    # The history in .gz copies is not read: counted, each copy once, and said so.
    unread = 'forwarder_source_files_unread_total{reason="compressed",source="containers"}'
    assert f"{unread} {float(len(gz))}" in metrics, metrics
    assert numbers_of(rows) == [int(text.split()[0][4:]) for _, text in plain]
    assert (
        cell.daemon is not None and "compressed rotated copies are not read" in cell.daemon.stderr()
    )
