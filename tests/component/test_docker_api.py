"""The docker source in api mode, component by component: against a real dockerd where
it can be (tests/dockerd.py, marker `docker`), against the scripted stand-in
(tests/docker_engine.py) for what a real one cannot be made to do on demand.

The real engine is the session's private dockerd; each test labels its containers with
a token of its own and the source reads only those (include_labels). What dockerd
itself holds in a container's json-file log is the ground truth (times included).

The stand-in speaks the same wire format (checked against dockerd 20.10.24): its tests
are the faults, a stream cut inside a frame or a TTY message, an event stream aborted,
lines that share one timestamp, and a re-send after a rotation at an exact message.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from forwarder.clock import SystemClock
from forwarder.config import DockerSourceConfig
from forwarder.event import Position, RawChunk
from forwarder.sources.docker import NOT_IN_A_CONTAINER, OwnContainer, build_docker_source
from forwarder.sources.docker_api import DockerApiSource, parse_timestamp_ns
from tests.docker_engine import BASE_TS_NS, NS, FakeEngine
from tests.dockerd import Container, RealDockerd
from tests.support import RunningSource, wait_until

LABEL = "forwarder.test"


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    # A short folder: a unix socket path must fit in 108 bytes, tmp_path may not.
    folder = Path(tempfile.mkdtemp(prefix="fwd-docker-"))
    fake = FakeEngine(folder / "docker.sock")
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()
        shutil.rmtree(folder, ignore_errors=True)


def make_config(engine: FakeEngine | RealDockerd, **overrides: Any) -> DockerSourceConfig:
    socket = engine.socket_path if isinstance(engine, FakeEngine) else engine.socket
    fields: dict[str, Any] = {
        "type": "docker",
        "name": "containers",
        "mode": "api",
        "socket": socket,
        "multiline": {"mode": "off"},
    }
    fields.update(overrides)
    return DockerSourceConfig(**fields)


class Follow(RunningSource):
    """A running api-mode source and everything it has emitted so far."""

    def chunks_of(self, cid: str) -> list[RawChunk]:
        return [c for c in self.drain() if c.position is not None and c.position.stream == cid]

    def lines(self, cid: str) -> list[bytes]:
        return [line for c in self.chunks_of(cid) for line in c.lines]

    def records(self, cid: str) -> list[tuple[bytes, str, datetime | None]]:
        """(line, stream, time) of every line of the container."""
        out = []
        for c in self.chunks_of(cid):
            assert c.line_meta is not None and c.times is not None
            for line, meta, ts in zip(c.lines, c.line_meta, c.times, strict=True):
                assert meta is not None
                out.append((line, meta["stream"], ts))
        return out

    def last_position(self, cid: str) -> Position:
        position = self.chunks_of(cid)[-1].position
        assert position is not None
        return position

    def container(self, cid: str) -> dict[str, Any] | None:
        for c in self.source.status()["containers"]:
            if c["id"] == cid:
                return c
        return None

    async def wait_lines(self, cid: str, n: int, timeout_s: float = 20) -> list[bytes]:
        await wait_until(
            lambda: len(self.lines(cid)) >= n, timeout_s, what=f"{n} lines of {cid[:12]}"
        )
        return self.lines(cid)

    async def wait_state(self, state: str, timeout_s: float = 20) -> None:
        await wait_until(
            lambda: self.source.status()["state"] == state, timeout_s, what=f"state {state}"
        )

    async def wait_connected(self, cid: str) -> None:
        await wait_until(lambda: (self.container(cid) or {}).get("connected"), what="connected")

    async def wait_done(self, cid: str) -> None:
        await wait_until(
            lambda: self.container(cid) is not None and not self.container(cid)["following"],
            what=f"the follower of {cid[:12]} to end",
        )


@pytest.fixture
async def follow() -> AsyncIterator[Callable[..., Any]]:
    """Factory: follow(config, checkpoints=..., own=..., exit_on_eof=...) -> running Follow."""
    started: list[Follow] = []

    async def start(
        config: DockerSourceConfig,
        *,
        checkpoints: dict[str, Position] | None = None,
        own: OwnContainer = NOT_IN_A_CONTAINER,
        exit_on_eof: bool = False,
    ) -> Follow:
        source = DockerApiSource(
            config,
            checkpoints or {},
            SystemClock(),
            exit_on_eof=exit_on_eof,
            own_container=own,
            reconnect_initial_s=0.01,
            reconnect_max_s=0.1,
        )
        f = Follow(source)
        started.append(f)
        return f

    yield start
    for f in started:
        if not f.task.done():
            await f.close()


def ts_of(ts_ns: int) -> datetime:
    return datetime.fromtimestamp(ts_ns // NS, UTC).replace(microsecond=ts_ns % NS // 1000)


def since_of(ts_ns: int) -> str:
    return f"{ts_ns // NS}.{ts_ns % NS:09d}"


# -- against the real dockerd ------------------------------------------------------------


class Real:
    """The session's dockerd, seen by one test: its token, its containers."""

    def __init__(self, engine: RealDockerd) -> None:
        self.engine = engine
        self.token = secrets.token_hex(4)
        self.image = engine.busybox_image()

    def config(self, **overrides: Any) -> DockerSourceConfig:
        labels = [f"{LABEL}={self.token}", *overrides.pop("include_labels", [])]
        return make_config(self.engine, include_labels=labels, **overrides)

    def name(self, base: str) -> str:
        return f"{base}-{self.token}"

    async def run(self, script: str, name: str, **kwargs: Any) -> Container:
        """A busybox container running `sh -c script`, labelled with the token."""
        labels = {LABEL: self.token, **kwargs.pop("labels", {})}
        return await asyncio.to_thread(
            self.engine.run, self.image, "sh", "-c", script, name=name, labels=labels, **kwargs
        )

    async def docker(self, *args: str) -> str:
        done = await asyncio.to_thread(self.engine.docker, *args)
        return done.stdout

    async def say(self, c: Container, text: str, stream: int = 1) -> None:
        """The running container writes `text` (a line) on its stdout (1) or stderr (2)."""
        await self.docker("exec", c.id, "sh", "-c", f"echo '{text}' > /proc/1/fd/{stream}")


def json_file(c: Container) -> list[dict[str, Any]]:
    """The json-file entries dockerd holds for a container (no rotation in these tests)."""
    return [json.loads(line) for line in c.log_path.read_bytes().splitlines()]


def time_of(entry: dict[str, Any]) -> datetime:
    ts = parse_timestamp_ns(entry["time"].encode())
    assert ts is not None
    return ts_of(ts)


@pytest.fixture
def real(real_dockerd: RealDockerd) -> Real:
    return Real(real_dockerd)


# Sleeps in these container scripts only keep a container running for the test to act
# on it; no test waits for them to pass.
KEEP_RUNNING = "exec sleep 600"


@pytest.mark.docker
async def test_running_containers_are_followed_with_service_meta_stream_and_time(
    real: Real, follow: Callable[..., Any]
) -> None:
    api = await real.run(
        f"""echo '{{"level": "info", "msg": "listening"}}'; echo boom >&2; {KEEP_RUNNING}""",
        real.name("shop-api-1"),
        labels={"com.docker.compose.service": "api", "com.docker.compose.project": "shop"},
    )
    worker = await real.run(
        f"echo tick; {KEEP_RUNNING}",
        real.name("worker"),
        labels={"com.docker.compose.service": "worker"},
    )
    await wait_until(lambda: len(json_file(api)) == 2, what="api's two lines on disk")
    f = await follow(real.config(services={"api": "shop-api"}))

    await f.wait_lines(api.id, 2)
    await f.wait_lines(worker.id, 1)
    held = json_file(api)
    assert sorted(f.records(api.id), key=lambda r: r[2] or 0) == sorted(
        [(e["log"].rstrip("\n").encode(), e["stream"], time_of(e)) for e in held],
        key=lambda r: r[2],
    )
    chunk = f.chunks_of(api.id)[0]
    assert chunk.service == "shop-api"  # the services map, by compose service
    assert chunk.meta == {"container_id": api.id, "container_name": api.name}
    assert f.chunks_of(worker.id)[0].service == "worker"  # unmapped: the compose service
    # Lines written while following arrive too; the position is the cursor after them.
    await real.say(api, "later")
    await f.wait_lines(api.id, 3)
    later = json_file(api)[-1]
    ts = parse_timestamp_ns(later["time"].encode())
    assert f.last_position(api.id) == Position(
        "containers", api.id, ts, {"count_at_ts": 1, "name": api.name}
    )
    assert f.source.status()["state"] == "ok"


@pytest.mark.docker
async def test_lines_split_at_16kb_by_dockerd_are_joined_with_the_first_pieces_time(
    real: Real, follow: Callable[..., Any]
) -> None:
    # 38,894 bytes of numbers: three pieces, no two alike.
    c = await real.run("seq -s , 1 7000; echo after", real.name("big"))
    assert await asyncio.to_thread(c.wait) == 0
    long_line = ",".join(str(n) for n in range(1, 7001)).encode()
    pieces = json_file(c)[:-1]
    assert [len(p["log"]) for p in pieces] == [16384, 16384, len(long_line) - 32768 + 1]
    assert len({p["time"] for p in pieces}) == 1  # dockerd stamps the pieces alike
    checkpoint = Position("containers", c.id, 1, {"count_at_ts": 0, "name": c.name})
    f = await follow(real.config(), checkpoints={c.id: checkpoint})  # stopped: read it

    assert await f.wait_lines(c.id, 2) == [long_line, b"after"]
    assert f.records(c.id)[0][2] == time_of(pieces[0])


@pytest.mark.docker
async def test_tty_container_has_no_frame_headers(real: Real, follow: Callable[..., Any]) -> None:
    script = r"printf '\033[32mgreen\033[0m prompt\n'; seq -s , 1 4000; echo; " + KEEP_RUNNING
    c = await real.run(script, real.name("console"), tty=True)
    f = await follow(real.config())

    long_line = ",".join(str(n) for n in range(1, 4001)).encode()  # 19,892 bytes
    await f.wait_lines(c.id, 3)
    records = [(line, stream) for line, stream, _ in f.records(c.id)]
    assert records == [
        (b"\x1b[32mgreen\x1b[0m prompt", "stdout"),
        (long_line, "stdout"),
        (b"", "stdout"),
    ]
    assert f.container(c.id)["tty"] is True  # type: ignore[index]


@pytest.mark.docker
async def test_container_started_while_running_is_followed_and_read_to_its_end(
    real: Real, follow: Callable[..., Any]
) -> None:
    f = await follow(real.config())
    await f.wait_state("ok")
    script = "echo life $(cat /proc/sys/kernel/random/uuid); echo last words"
    labels = ["--label", f"{LABEL}={real.token}"]
    create = ["create", "--network", "none", *labels, "--name", real.name("late")]
    cid = (await real.docker(*create, real.image, "sh", "-c", script)).strip()
    await real.docker("start", cid)
    await f.wait_lines(cid, 2)
    await f.wait_done(cid)  # it exited: its stream ended, its follower too
    # Started again (docker restart): read on from its cursor, nothing twice.
    await real.docker("start", cid)
    lines = await f.wait_lines(cid, 4)
    await f.wait_done(cid)
    assert [line.split()[0] for line in lines] == [b"life", b"last", b"life", b"last"]
    assert lines[0] != lines[2]  # two lives, each read once
    assert f.lines(cid) == lines


@pytest.mark.docker
async def test_stopped_container_with_a_checkpoint_is_read_to_its_end(
    real: Real, follow: Callable[..., Any]
) -> None:
    never_seen = await real.run("echo from before the forwarder", real.name("old-job"))
    assert await asyncio.to_thread(never_seen.wait) == 0
    job = await real.run(
        'trap "echo written after the checkpoint; exit 0" TERM; echo read before the restart;'
        " while true; do sleep 0.1; done",
        real.name("batch-job"),
    )
    first = await follow(real.config())
    assert await first.wait_lines(job.id, 1) == [b"read before the restart"]
    await first.close()
    checkpoint = first.last_position(job.id)
    await real.docker("stop", job.id)  # it exits while the forwarder is down

    second = await follow(real.config(), checkpoints={job.id: checkpoint})
    assert await second.wait_lines(job.id, 1) == [b"written after the checkpoint"]
    await second.wait_done(job.id)
    assert second.container(never_seen.id) is None  # stopped and never read: left alone


@pytest.mark.docker
async def test_include_exclude_and_our_own_container(
    real: Real, follow: Callable[..., Any]
) -> None:
    say = f"echo hello; {KEEP_RUNNING}"
    own = await real.run(say, real.name("forwarder-1"))
    api = await real.run(say, real.name("shop-api-1"), labels={"logs": "yes"})
    db = await real.run(say, real.name("shop-db-1"), labels={"logs": "yes"})
    quiet = await real.run(say, real.name("shop-cron-1"), labels={"logs": "no"})
    other = await real.run(say, real.name("other-1"), labels={"logs": "yes"})
    config = real.config(
        include_containers=["shop-*", "forwarder-*"],
        exclude_containers=["*-db-*"],
        include_labels=["logs"],
        exclude_labels=["logs=no"],
    )
    f = await follow(config, own=OwnContainer(prefix=own.id[:12]))

    await f.wait_lines(api.id, 1)
    ours = {own.id, db.id, quiet.id, other.id}
    await wait_until(lambda: ours <= set(f.source.status()["skipped"]), what="4 skipped")
    reasons = f.source.status()["skipped"]
    assert "own container" in reasons[own.id]
    assert "exclude_containers" in reasons[db.id]
    assert "exclude_labels" in reasons[quiet.id]
    assert "include_containers" in reasons[other.id]
    assert [c["name"] for c in f.source.status()["containers"]] == [api.name]
    assert {c.position.stream for c in f.drain() if c.position} == {api.id}


@pytest.mark.docker
async def test_read_from_tail_skips_what_running_containers_wrote_before(
    real: Real, follow: Callable[..., Any]
) -> None:
    c = await real.run(f"echo old; {KEEP_RUNNING}", real.name("api"))
    await wait_until(lambda: len(json_file(c)) == 1, what="the old line on disk")
    f = await follow(real.config(read_from="tail"))
    await f.wait_connected(c.id)
    await real.say(c, "new")
    assert await f.wait_lines(c.id, 1) == [b"new"]


@pytest.mark.docker
async def test_exit_on_eof_reads_every_container_to_its_end_and_returns(real: Real) -> None:
    a = await real.run(f"echo a0; echo a1; echo a2; {KEEP_RUNNING}", real.name("a"))
    b = await real.run(f"echo b0; echo b1; echo b2; {KEEP_RUNNING}", real.name("b"), tty=True)
    await wait_until(
        lambda: len(json_file(a)) == 3 and len(json_file(b)) == 3, what="the lines on disk"
    )
    source = build_docker_source(
        real.config(),
        {},
        SystemClock(),
        exit_on_eof=True,
        ignore_identities=frozenset(),
        own_container=NOT_IN_A_CONTAINER,
    )
    queue: asyncio.Queue[RawChunk] = asyncio.Queue()
    await asyncio.wait_for(source.run(queue, asyncio.Event()), 20)

    lines: dict[str, list[bytes]] = {}
    while not queue.empty():
        chunk = queue.get_nowait()
        assert chunk.position is not None
        lines.setdefault(chunk.position.stream, []).extend(chunk.lines)
    assert lines == {a.id: [b"a0", b"a1", b"a2"], b.id: [b"b0", b"b1", b"b2"]}
    assert source.status()["state"] == "stopped"


@pytest.mark.docker
async def test_stop_ends_the_source_promptly_while_streams_are_open(
    real: Real, follow: Callable[..., Any]
) -> None:
    c = await real.run(KEEP_RUNNING, real.name("api"))
    f = await follow(real.config())
    await f.wait_connected(c.id)
    await f.close()
    assert f.source.status()["state"] == "stopped"


@pytest.mark.docker
async def test_attrs_of_the_log_options_reach_the_line_meta(
    real: Real, follow: Callable[..., Any]
) -> None:
    c = await real.run(
        f"echo hello; echo oops >&2; seq -s , 1 4000; {KEEP_RUNNING}",
        real.name("attrs"),
        labels={"com.example.team": "shop"},
        env={"REGION": "eu", "ODD": "a b,c=d"},
        log_opts={"labels": "com.example.team,missing", "env": "REGION,ODD", "tag": "{{.Name}}"},
    )
    plain = await real.run(f"echo plain; {KEEP_RUNNING}", real.name("plain"))
    f = await follow(real.config())

    await f.wait_lines(c.id, 3)
    await f.wait_lines(plain.id, 1)
    attrs = {"com.example.team": "shop", "REGION": "eu", "ODD": "a b,c=d", "tag": c.name}
    assert json_file(c)[0]["attrs"] == attrs  # what dockerd keeps
    metas = sorted(
        (m["stream"], line[:5], m.get("attrs"))
        for chunk in f.chunks_of(c.id)
        for line, m in zip(chunk.lines, chunk.line_meta or [], strict=True)
    )
    assert metas == [
        ("stderr", b"oops", attrs),
        ("stdout", b"1,2,3", attrs),  # the 19,892-byte line: its two pieces joined
        ("stdout", b"hello", attrs),
    ]
    assert ",".join(str(n) for n in range(1, 4001)).encode() in f.lines(c.id)
    assert [c.line_meta for c in f.chunks_of(plain.id)] == [[{"stream": "stdout"}]]


def python_app_stderr() -> list[str]:
    """The stderr of a real Python program whose handler logs an exception."""
    code = (
        "import logging\n"
        "logging.basicConfig(format='%(levelname)s %(name)s %(message)s')\n"
        "log = logging.getLogger('shop.pay')\n"
        "def charge():\n"
        "    raise TimeoutError('gateway did not answer')\n"
        "try:\n"
        "    try:\n"
        "        charge()\n"
        "    except TimeoutError as e:\n"
        "        raise RuntimeError('payment failed') from e\n"
        "except RuntimeError:\n"
        "    log.exception('order 42 not paid')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    return result.stderr.rstrip("\n").split("\n")


@pytest.mark.docker
async def test_a_traceback_is_one_record_and_a_held_one_is_read_again_after_restart(
    real: Real, follow: Callable[..., Any], tmp_path: Path
) -> None:
    stderr = python_app_stderr()
    assert any("direct cause" in line for line in stderr)  # a chained exception
    (tmp_path / "tb.txt").write_text("\n".join(stderr) + "\n")
    c = await real.run(
        f"echo 'GET /orders/42 200'; cat /tb/tb.txt >&2; {KEEP_RUNNING}",
        real.name("shop-api-1"),
        volumes=[f"{tmp_path}:/tb:ro"],
    )
    await wait_until(lambda: len(json_file(c)) == 1 + len(stderr), what="all on disk")
    # The traceback may still grow: it is held (for flush_timeout_s) and not committed.
    held = {"mode": "python", "flush_timeout_s": 60}
    first = await follow(real.config(multiline=held))
    assert await first.wait_lines(c.id, 1) == [b"GET /orders/42 200"]
    await first.close()
    assert first.lines(c.id) == [b"GET /orders/42 200"]
    checkpoint = first.last_position(c.id)

    quick = {"mode": "python", "flush_timeout_s": 0.05}
    second = await follow(real.config(multiline=quick), checkpoints={c.id: checkpoint})
    assert await second.wait_lines(c.id, 1) == ["\n".join(stderr).encode()]
    chunk = second.chunks_of(c.id)[0]
    assert chunk.line_meta == [{"stream": "stderr", "multiline": len(stderr)}]
    last = parse_timestamp_ns(json_file(c)[-1]["time"].encode())
    assert second.last_position(c.id).offset == last


@pytest.mark.docker
async def test_dockerd_restarted_with_live_restore_loses_and_repeats_nothing(
    new_dockerd: Callable[..., RealDockerd], follow: Callable[..., Any]
) -> None:
    engine = new_dockerd(flags=("--live-restore",))
    real = Real(engine)
    ticker = await real.run(
        "i=0; while [ $i -lt 200 ]; do i=$((i+1)); echo $i; usleep 25000; done",
        real.name("ticker"),
    )
    f = await follow(real.config())
    await f.wait_lines(ticker.id, 10)
    await asyncio.to_thread(engine.restart)
    assert (await asyncio.to_thread(ticker.inspect))["State"]["Running"]  # kept running
    await f.wait_lines(ticker.id, 200)
    await f.wait_done(ticker.id)
    assert f.lines(ticker.id) == [str(i).encode() for i in range(1, 201)]
    assert f.source.status()["reconnects"] >= 1


# -- against the stand-in: the faults and exact cases ------------------------------------


async def test_a_rotation_resend_is_not_stored_and_reading_resumes_from_the_cursor(
    engine: FakeEngine, follow: Callable[..., Any]
) -> None:
    c = engine.add("api")
    for i in range(3):
        engine.write(c.id, f"line {i}")
    f = await follow(make_config(engine))
    await f.wait_lines(c.id, 3)
    engine.rotate(c.id)
    for i in range(3, 6):  # the new file: read, then sent again from its start
        engine.write(c.id, f"line {i}")
    await wait_until(lambda: len(engine.logs_requests(c.id)) == 2, what="a second request")
    engine.write(c.id, "line 6")

    assert await f.wait_lines(c.id, 7) == [f"line {i}".encode() for i in range(7)]
    assert f.container(c.id)["resends"] == 1  # type: ignore[index]
    line_5 = engine.containers[c.id].messages[5]
    assert engine.logs_requests(c.id)[1]["since"] == since_of(line_5.ts_ns)
    assert f.last_position(c.id).detail["count_at_ts"] == 1


async def test_a_resend_that_starts_with_a_16kb_piece_is_not_stored(
    engine: FakeEngine, follow: Callable[..., Any]
) -> None:
    c = engine.add("big")
    f = await follow(make_config(engine))
    await f.wait_connected(c.id)
    long_line = b"".join(b"%05d|" % i for i in range(8000))  # 48,000 bytes: three pieces
    engine.write(c.id, "before")
    engine.write(c.id, long_line, rotate_after=2)  # the new file starts with piece 2
    pieces = engine.containers[c.id].messages[1:]
    assert len({m.ts_ns for m in pieces}) == 1  # all stamped with the first one's time
    await wait_until(lambda: len(engine.logs_requests(c.id)) == 2, what="a second request")
    engine.write(c.id, "after")

    assert await f.wait_lines(c.id, 3) == [b"before", long_line, b"after"]
    assert f.records(c.id)[1][2] == ts_of(pieces[0].ts_ns)
    assert f.container(c.id)["resends"] == 1  # type: ignore[index]


@pytest.mark.parametrize("cut", [3, 8, 20], ids=["in-header", "after-header", "in-payload"])
async def test_stream_broken_mid_frame_resumes_without_loss_or_repeat(
    engine: FakeEngine, follow: Callable[..., Any], cut: int
) -> None:
    c = engine.add("flaky")
    # Three lines share one timestamp: the cursor's count_at_ts tells them apart.
    for i in range(6):
        engine.write(c.id, f"line {i}", ts_ns=BASE_TS_NS + (1 if i < 3 else i))
    engine.break_logs(c.id, after=2, cut=cut)
    f = await follow(make_config(engine))

    lines = await f.wait_lines(c.id, 6)
    engine.write(c.id, "line 6")
    lines = await f.wait_lines(c.id, 7)
    assert lines == [f"line {i}".encode() for i in range(7)]
    requests = engine.logs_requests(c.id)
    assert len(requests) == 2
    assert requests[1]["since"] == since_of(BASE_TS_NS + 1)  # the last complete line's
    assert f.container(c.id)["reconnects"] == 1  # type: ignore[index]


@pytest.mark.parametrize("cut", [10, 33, 38], ids=["in-timestamp", "in-text", "before-newline"])
async def test_tty_stream_broken_mid_line_resumes_without_loss_or_repeat(
    engine: FakeEngine, follow: Callable[..., Any], cut: int
) -> None:
    c = engine.add("console", tty=True)
    for i in range(4):
        engine.write(c.id, f"line {i}")  # "<30-byte timestamp> line i\r\n" each
    engine.break_logs(c.id, after=2, cut=cut)
    f = await follow(make_config(engine))

    assert await f.wait_lines(c.id, 4) == [f"line {i}".encode() for i in range(4)]
    assert len(engine.logs_requests(c.id)) == 2


async def test_stream_broken_inside_a_16kb_split_line_never_emits_part_of_it(
    engine: FakeEngine, follow: Callable[..., Any]
) -> None:
    c = engine.add("flaky")
    engine.write(c.id, "before")
    long_line = b"y" * 40_000
    engine.write(c.id, long_line)  # messages 1, 2, 3
    engine.break_logs(c.id, after=2, cut=5000)  # "before" and the first 16 KB arrive
    f = await follow(make_config(engine))

    await f.wait_lines(c.id, 2)
    engine.write(c.id, "after")
    assert await f.wait_lines(c.id, 3) == [b"before", long_line, b"after"]
    assert all(len(line) != 16 * 1024 for line in f.lines(c.id))


async def test_restart_from_checkpoint_repeats_nothing(
    engine: FakeEngine, follow: Callable[..., Any]
) -> None:
    c = engine.add("api")
    for i in range(4):
        engine.write(c.id, f"line {i}", ts_ns=BASE_TS_NS + 1 + i // 2)  # pairs share a stamp
    first = await follow(make_config(engine))
    await first.wait_lines(c.id, 4)
    await first.close()
    checkpoint = first.last_position(c.id)
    assert checkpoint == Position(
        "containers", c.id, BASE_TS_NS + 2, {"count_at_ts": 2, "name": "api"}
    )
    # While we are down: more lines, two of them at the checkpoint's very timestamp.
    engine.write(c.id, "line 4", ts_ns=BASE_TS_NS + 2)
    engine.write(c.id, "line 5", ts_ns=BASE_TS_NS + 2)
    engine.write(c.id, "line 6", ts_ns=BASE_TS_NS + 3)

    second = await follow(make_config(engine), checkpoints={c.id: checkpoint})
    assert await second.wait_lines(c.id, 3) == [b"line 4", b"line 5", b"line 6"]
    assert engine.logs_requests(c.id)[-1]["since"] == since_of(BASE_TS_NS + 2)
    assert second.last_position(c.id).detail == {"count_at_ts": 1, "name": "api"}


async def test_a_start_is_seen_after_the_event_stream_breaks(
    engine: FakeEngine, follow: Callable[..., Any]
) -> None:
    f = await follow(make_config(engine))
    await f.wait_state("ok")
    engine.break_events()
    await wait_until(
        lambda: sum(path == "/events" for path, _ in engine.requests) == 2,
        what="the event stream to be opened again",
    )
    c = engine.add("late", running=False)
    engine.write(c.id, "hello")
    engine.start_container(c.id)
    assert await f.wait_lines(c.id, 1) == [b"hello"]
