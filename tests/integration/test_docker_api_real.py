"""Api mode against a real dockerd through a real `forwarder run`: every line a container
prints is numbered, and the rows are counted against that numbering: 0 lost, 0
duplicated, in every cell.

The cells (issue 11): numbered lines at 300 and 2,000 lines a second across dockerd's
own rotations (`--log-opt max-size=50k --log-opt max-file=10`), a TTY container across
them too, a 1 MB line, a `kill -9` of the forwarder kept down while the container
rotates, and dockerd restarted with and without --live-restore. By default each cell
is small (the file takes well under a minute on 2 cores); FORWARDER_DOCKER_MATRIX=full
runs the full sizes (KILL_DOWNTIME_S of 10 s, thousands of lines more):

    FORWARDER_DOCKER_MATRIX=full .venv/bin/pytest tests/integration/test_docker_api_real.py -s

Each test prints its figures (written / stored / duplicated). The session's dockerd
serves the cells that do not restart it; each test labels its containers with a token
and the source reads only those. The restart cells start an engine of their own.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.dockerd import Container, RealDockerd
from tests.integration.daemon import Daemon, connected, count_rows, write_config
from tests.support import wait_until

pytestmark = pytest.mark.docker

FULL = os.environ.get("FORWARDER_DOCKER_MATRIX") == "full"
KILL_DOWNTIME_S = 10.0 if FULL else 3.0  # the forwarder is down this long (or longer)
ROTATING = {"max-size": "50k", "max-file": "10"}
LABEL = "forwarder.test"
# About 170 bytes a line in json-file: a 50k file holds some 290 lines.
PAD = "abcdefghij" * 10


@dataclass(frozen=True)
class Rate:
    lines_per_s: int
    small: int  # lines written in the default run
    full: int  # with FORWARDER_DOCKER_MATRIX=full

    @property
    def total(self) -> int:
        return self.full if FULL else self.small


SLOW = Rate(300, small=1_500, full=6_000)
FAST = Rate(2_000, small=6_000, full=24_000)
RESTARTED = Rate(1_000, small=3_000, full=20_000)  # runs on through dockerd's restart


def numbered(total: int, lines_per_s: int) -> str:
    """A busybox script printing "<n> <PAD>" for n = 1..total at about lines_per_s: a
    burst of a tenth of a second's lines every 0.1 s (the container's own pacing)."""
    burst = max(1, lines_per_s // 10)
    return (
        f"i=0; while [ $i -lt {total} ]; do j=$((i+{burst})); "
        f"[ $j -gt {total} ] && j={total}; "
        f"seq $((i+1)) $j | sed 's/$/ {PAD}/'; i=$j; usleep 100000; done"
    )


def api_source(engine: RealDockerd, token: str) -> str:
    return f"""
[[sources]]
type = "docker"
name = "containers"
mode = "api"
socket = "{engine.socket}"
include_labels = ["{LABEL}={token}"]
[sources.multiline]
mode = "off"
"""


_DAEMONS: list[Daemon] = []  # started by the test running now


@pytest.fixture(autouse=True)
async def _no_daemon_left() -> AsyncIterator[None]:
    """A test that fails half-way leaves no forwarder running."""
    yield
    while _DAEMONS:
        daemon = _DAEMONS.pop()
        if daemon.proc is not None and daemon.proc.returncode is None:
            await daemon.kill9()


class Cell:
    """One cell: its engine, token, forwarder config and daemon."""

    def __init__(
        self, engine: RealDockerd, tmp_path: Path, dsn: str, schema: str, name: str
    ) -> None:
        self.engine = engine
        self.name = name
        self.token = secrets.token_hex(4)
        self.dsn, self.schema = dsn, schema
        self.config = write_config(
            tmp_path / "f.toml",
            dsn=dsn,
            schema=schema,
            files={},
            extra=api_source(engine, self.token),
        )
        self.daemon: Daemon | None = None

    async def start(self) -> Daemon:
        self.daemon = await Daemon(self.config).start()
        _DAEMONS.append(self.daemon)
        return self.daemon

    async def run(self, script: str, **kwargs: object) -> Container:
        image = self.engine.busybox_image()
        return await asyncio.to_thread(
            self.engine.run,
            image,
            "sh",
            "-c",
            script,
            name=f"{self.name}-{self.token}",
            labels={LABEL: self.token},
            **kwargs,
        )

    async def rows(self) -> int:
        return await count_rows(self.dsn, self.schema)

    async def wait_rows(self, n: int, timeout_s: float) -> None:
        async def enough() -> bool:
            assert self.daemon is not None and self.daemon.proc is not None
            assert self.daemon.proc.returncode is None, self.daemon.stderr()[-3000:]
            return await self.rows() >= n

        await wait_until(enough, timeout_s, what=f"{n} rows")

    async def messages(self) -> list[tuple[str, dict]]:
        async with connected(self.dsn, self.schema) as conn:
            rows = await conn.fetch("SELECT message, meta FROM system_logs ORDER BY ts, id")
        return [(r["message"], orjson.loads(r["meta"])) for r in rows]

    async def finish(self, container: Container, expected: int) -> Counter[int]:
        """Wait for the container to end and `expected` rows; stop the forwarder (it
        drains); the numbers stored, each with how often."""
        assert await asyncio.to_thread(container.wait, 120) == 0
        await self.wait_rows(expected, timeout_s=60)
        assert self.daemon is not None
        assert await self.daemon.stop() == 0, self.daemon.stderr()[-3000:]
        return Counter(int(m.split(" ", 1)[0]) for m, _ in await self.messages())


def report(cell: str, written: list[int], stored: Counter[int]) -> None:
    """Print the cell's figures; fail on any line lost or stored twice."""
    lost = [n for n in written if n not in stored]
    twice = sorted(n for n, k in stored.items() if k > 1)
    unknown = sorted(set(stored) - set(written))
    print(
        f"\n{cell}: written {len(written)} stored {sum(stored.values())} "
        f"lost {len(lost)} duplicated {sum(stored[n] - 1 for n in twice)}"
    )
    assert not lost, f"{len(lost)} lost, first {lost[:10]}"
    assert not twice, f"{len(twice)} stored twice, first {twice[:10]}"
    assert not unknown, f"stored but never written: {unknown[:10]}"


def rotated(container: Container) -> int:
    """How many rotated copies dockerd holds for the container now."""
    path = container.log_path
    return len(list(path.parent.glob(path.name + ".*")))


@pytest.mark.parametrize("rate", [SLOW, FAST], ids=["300-lines-s", "2000-lines-s"])
async def test_numbered_lines_across_dockerd_rotations_are_stored_once_each(
    real_dockerd: RealDockerd, tmp_path: Path, pg_dsn: str, pg_schema: str, rate: Rate
) -> None:
    cell = Cell(real_dockerd, tmp_path, pg_dsn, pg_schema, f"numbers-{rate.lines_per_s}")
    await cell.start()
    printer = await cell.run(numbered(rate.total, rate.lines_per_s), log_opts=ROTATING)

    stored = await cell.finish(printer, rate.total)

    assert rotated(printer) >= 3  # the cell is about rotations: they happened
    report(f"api {rate.lines_per_s} lines/s", list(range(1, rate.total + 1)), stored)


# A known loss, open in issue 11: under load (1 run in 6 here, alone it passes) dockerd's
# follow reader skips a rotated file of a TTY container and its lines are never stored.
# Files mode reads them all (test_docker_files_real). Not strict: it passes when it passes.
@pytest.mark.xfail(
    strict=False,
    reason="api mode, TTY at 2,000 lines/s across rotations: dockerd's follow reader can skip "
    "a rotated file under load (issue 11, open)",
)
async def test_a_tty_container_across_rotations_is_stored_once_each(
    real_dockerd: RealDockerd, tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    cell = Cell(real_dockerd, tmp_path, pg_dsn, pg_schema, "tty")
    await cell.start()
    total = FAST.total
    printer = await cell.run(numbered(total, FAST.lines_per_s), tty=True, log_opts=ROTATING)

    stored = await cell.finish(printer, total)

    assert rotated(printer) >= 3
    rows = await cell.messages()
    assert all(m.endswith(PAD) for m, _ in rows)  # "\r\n" line ends taken off
    report("api TTY 2000 lines/s", list(range(1, total + 1)), stored)


async def test_a_1mb_line_is_one_row(
    real_dockerd: RealDockerd, tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    cell = Cell(real_dockerd, tmp_path, pg_dsn, pg_schema, "megabyte")
    await cell.start()
    # 1 before; the numbers 1..160,000 joined by "," (1,004,894 bytes; no two 16 KB
    # pieces alike) after "2 "; 3 after. The long line waits for /go/go: a container
    # that starts and ends before the forwarder follows it is not read (api mode reads
    # stopped containers only from a cursor), so the test first sees line 1 stored.
    go = tmp_path / "go"
    go.mkdir()
    numbers = ",".join(str(n) for n in range(1, 160_001))
    script = (
        "echo 1 before; while [ ! -e /go/go ]; do usleep 20000; done; "
        "echo -n '2 '; seq -s , 1 160000; echo 3 after"
    )
    printer = await cell.run(script, volumes=[f"{go}:/go"])
    await cell.wait_rows(1, timeout_s=30)
    (go / "go").touch()

    stored = await cell.finish(printer, 3)

    rows = [m for m, _ in await cell.messages()]
    assert rows == ["1 before", f"2 {numbers}", "3 after"]
    assert len(rows[1]) > 1_000_000
    report("api 1 MB line", [1, 2, 3], stored)


async def test_kill_9_of_the_forwarder_down_while_dockerd_rotates_loses_nothing(
    real_dockerd: RealDockerd, tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    cell = Cell(real_dockerd, tmp_path, pg_dsn, pg_schema, "killed")
    # Long enough to run through the downtime and beyond it.
    total = int(SLOW.lines_per_s * (KILL_DOWNTIME_S + (20 if FULL else 4)))
    daemon = await cell.start()
    printer = await cell.run(numbered(total, SLOW.lines_per_s), log_opts=ROTATING)
    await cell.wait_rows(300, timeout_s=30)
    await daemon.kill9()
    killed_at, inode = time.monotonic(), printer.log_path.stat().st_ino

    def rotated_while_down() -> bool:  # the scenario: down that long, through rotations
        down_s = time.monotonic() - killed_at
        return down_s >= KILL_DOWNTIME_S and printer.log_path.stat().st_ino != inode

    await wait_until(rotated_while_down, KILL_DOWNTIME_S + 30, what="a rotation while down")
    assert (await asyncio.to_thread(printer.inspect))["State"]["Running"]
    await cell.start()

    stored = await cell.finish(printer, total)

    report(f"api kill -9, {KILL_DOWNTIME_S:g} s down", list(range(1, total + 1)), stored)


@pytest.mark.parametrize("live_restore", [True, False], ids=["live-restore", "no-live-restore"])
async def test_dockerd_restart_loses_and_repeats_nothing(
    new_dockerd: Callable[..., RealDockerd],
    tmp_path: Path,
    pg_dsn: str,
    pg_schema: str,
    live_restore: bool,
) -> None:
    engine = new_dockerd(flags=("--live-restore",) if live_restore else ())
    cell = Cell(engine, tmp_path, pg_dsn, pg_schema, "restarted")
    # Without live-restore dockerd's stop ends the container: it writes less than this.
    total = RESTARTED.total * (1 if live_restore else 10)
    await cell.start()
    # --init: sh is not PID 1, so dockerd's stop (no live-restore) ends it at once.
    printer = await cell.run(numbered(total, RESTARTED.lines_per_s), log_opts=ROTATING, init=True)
    await cell.wait_rows(500, timeout_s=30)
    await asyncio.to_thread(engine.restart)
    state = printer.inspect()["State"]
    if live_restore:
        assert state["Running"]  # it ran on while dockerd was away
        stored = await cell.finish(printer, total)
        written = list(range(1, total + 1))
    else:
        assert not state["Running"]  # stopped with dockerd: what it wrote is the truth
        held = printer.messages()
        written = [int(text.split(" ", 1)[0]) for _, text in held]
        assert written == list(range(1, len(written) + 1))  # dockerd kept all of it
        await cell.wait_rows(len(written), timeout_s=60)
        assert cell.daemon is not None and await cell.daemon.stop() == 0
        stored = Counter(int(m.split(" ", 1)[0]) for m, _ in await cell.messages())
    mode = "with" if live_restore else "without"
    report(f"api dockerd restart {mode} --live-restore", written, stored)
