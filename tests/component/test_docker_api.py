"""The docker source in api mode against a fake Engine API on a real unix socket.

`tests/docker_engine.py` speaks the wire format (HTTP/1.1 over the socket, chunked
follow streams, 8-byte multiplexing headers, RFC3339Nano timestamps, `since`); each
test scripts its containers, their lines and events, and its faults.
"""

from __future__ import annotations

import asyncio
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
from forwarder.sources.docker_api import DockerApiSource
from tests.docker_engine import BASE_TS_NS, NS, FakeEngine
from tests.support import RunningSource, wait_until


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


def make_config(engine: FakeEngine, **overrides: Any) -> DockerSourceConfig:
    fields: dict[str, Any] = {
        "type": "docker",
        "name": "containers",
        "mode": "api",
        "socket": engine.socket_path,
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

    async def wait_lines(self, cid: str, n: int) -> list[bytes]:
        await wait_until(lambda: len(self.lines(cid)) >= n, what=f"{n} lines of {cid[:12]}")
        return self.lines(cid)

    async def wait_state(self, state: str) -> None:
        await wait_until(lambda: self.source.status()["state"] == state, what=f"state {state}")


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


async def test_running_containers_are_followed_with_service_meta_stream_and_time(
    engine: FakeEngine, follow: Callable[..., Any]
) -> None:
    api = engine.add(
        "shop-api-1",
        labels={"com.docker.compose.service": "api", "com.docker.compose.project": "shop"},
    )
    worker = engine.add("shop-worker-1", labels={"com.docker.compose.service": "worker"})
    engine.write(api.id, '{"level": "info", "msg": "listening"}', ts_ns=BASE_TS_NS + 1)
    engine.write(api.id, "boom", stream="stderr", ts_ns=BASE_TS_NS + 2)
    engine.write(worker.id, "tick")
    f = await follow(make_config(engine, services={"api": "shop-api"}))

    await f.wait_lines(api.id, 2)
    await f.wait_lines(worker.id, 1)
    assert f.records(api.id) == [
        (b'{"level": "info", "msg": "listening"}', "stdout", ts_of(BASE_TS_NS + 1)),
        (b"boom", "stderr", ts_of(BASE_TS_NS + 2)),
    ]
    chunk = f.chunks_of(api.id)[0]
    assert chunk.service == "shop-api"  # the services map, by compose service
    assert chunk.meta == {"container_id": api.id, "container_name": "shop-api-1"}
    assert f.chunks_of(worker.id)[0].service == "worker"  # unmapped: the compose service
    # Lines written while following arrive too; the position is the cursor after them.
    engine.write(api.id, "later", ts_ns=BASE_TS_NS + 2)
    await f.wait_lines(api.id, 3)
    assert f.last_position(api.id) == Position(
        "containers", api.id, BASE_TS_NS + 2, {"count_at_ts": 2, "name": "shop-api-1"}
    )
    requests = engine.logs_requests(api.id)
    assert requests[0] == {"follow": "1", "stdout": "1", "stderr": "1", "timestamps": "1"}
    assert f.source.status()["state"] == "ok"


async def test_lines_split_at_16kb_by_dockerd_are_joined(
    engine: FakeEngine, follow: Callable[..., Any]
) -> None:
    c = engine.add("big")
    long_line = bytes(range(48, 58)) * 4000  # 40 000 bytes: three messages
    engine.write(c.id, long_line)
    engine.write(c.id, "after")
    f = await follow(make_config(engine))

    assert await f.wait_lines(c.id, 2) == [long_line, b"after"]
    assert len(engine.containers[c.id].messages) == 4
    # The line's time is that of its last message, so `since` finds the line's end.
    last_message = engine.containers[c.id].messages[2]
    assert f.records(c.id)[0][2] == ts_of(last_message.ts_ns)


async def test_tty_container_has_no_frame_headers(
    engine: FakeEngine, follow: Callable[..., Any]
) -> None:
    c = engine.add("console", tty=True)
    long_line = b"x" * 20_000
    engine.write(c.id, "\x1b[32mgreen\x1b[0m prompt")
    engine.write(c.id, long_line)
    engine.write(c.id, "")
    f = await follow(make_config(engine))

    await f.wait_lines(c.id, 3)
    records = [(line, stream) for line, stream, _ in f.records(c.id)]
    assert records == [
        (b"\x1b[32mgreen\x1b[0m prompt", "stdout"),
        (long_line, "stdout"),
        (b"", "stdout"),
    ]
    assert f.container(c.id)["tty"] is True  # type: ignore[index]


async def test_container_started_while_running_is_followed_and_read_to_its_end(
    engine: FakeEngine, follow: Callable[..., Any]
) -> None:
    f = await follow(make_config(engine))
    await f.wait_state("ok")
    c = engine.add("late", running=False)
    engine.write(c.id, "written before the start event was seen")
    engine.start_container(c.id)
    await f.wait_lines(c.id, 1)
    engine.write(c.id, "last words")
    engine.stop_container(c.id)

    await wait_until(
        lambda: f.container(c.id) is not None and not f.container(c.id)["following"],
        what="the follower of the stopped container to end",
    )
    assert f.lines(c.id) == [b"written before the start event was seen", b"last words"]
    # Started again (docker restart): read on from its cursor, nothing twice.
    engine.write(c.id, "second life")
    engine.start_container(c.id)
    await f.wait_lines(c.id, 3)
    assert f.lines(c.id)[2:] == [b"second life"]
    assert engine.logs_requests(c.id)[-1]["since"] == since_of(
        engine.containers[c.id].messages[1].ts_ns
    )


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


async def test_stopped_container_with_a_checkpoint_is_read_to_its_end(
    engine: FakeEngine, follow: Callable[..., Any]
) -> None:
    c = engine.add("batch-job")
    never_seen = engine.add("old-job", running=False)
    engine.write(never_seen.id, "from before the forwarder")
    engine.write(c.id, "read before the restart", ts_ns=BASE_TS_NS + 1)
    engine.write(c.id, "written after the checkpoint", ts_ns=BASE_TS_NS + 2)
    engine.containers[c.id].running = False  # it exited while the forwarder was down
    checkpoint = Position("containers", c.id, BASE_TS_NS + 1, {"count_at_ts": 1, "name": "x"})
    f = await follow(make_config(engine), checkpoints={c.id: checkpoint})

    assert await f.wait_lines(c.id, 1) == [b"written after the checkpoint"]
    await wait_until(lambda: not f.container(c.id)["following"], what="its follower to end")  # type: ignore[index]
    assert f.container(never_seen.id) is None  # stopped and never read: left alone


async def test_include_exclude_and_our_own_container(
    engine: FakeEngine, follow: Callable[..., Any]
) -> None:
    own = engine.add("forwarder-1")
    api = engine.add("shop-api-1", labels={"logs": "yes"})
    db = engine.add("shop-db-1", labels={"logs": "yes"})
    quiet = engine.add("shop-cron-1", labels={"logs": "no"})
    other = engine.add("other-1", labels={"logs": "yes"})
    for c in (own, api, db, quiet, other):
        engine.write(c.id, f"hello from {c.name}")
    config = make_config(
        engine,
        include_containers=["shop-*", "forwarder-*"],
        exclude_containers=["*-db-*"],
        include_labels=["logs"],
        exclude_labels=["logs=no"],
    )
    f = await follow(config, own=OwnContainer(prefix=own.id[:12]))

    await f.wait_lines(api.id, 1)
    await wait_until(lambda: len(f.source.status()["skipped"]) == 4, what="4 skipped")
    assert [c["name"] for c in f.source.status()["containers"]] == ["shop-api-1"]
    assert {c.position.stream for c in f.drain() if c.position} == {api.id}
    assert not engine.logs_requests(own.id)


async def test_engine_restart_is_survived_without_loss_or_repeat(
    engine: FakeEngine, follow: Callable[..., Any]
) -> None:
    c = engine.add("api")
    engine.write(c.id, "line 0")
    f = await follow(make_config(engine))
    await f.wait_lines(c.id, 1)

    await engine.close()
    await f.wait_state("degraded")
    engine.write(c.id, "line 1")  # written while the socket is away
    await engine.start()
    engine.write(c.id, "line 2")
    assert await f.wait_lines(c.id, 3) == [b"line 0", b"line 1", b"line 2"]
    await f.wait_state("ok")
    assert f.source.status()["reconnects"] >= 2


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


async def test_read_from_tail_skips_what_running_containers_wrote_before(
    engine: FakeEngine, follow: Callable[..., Any]
) -> None:
    c = engine.add("api")
    engine.write(c.id, "old")
    f = await follow(make_config(engine, read_from="tail"))
    await wait_until(lambda: engine.logs_requests(c.id), what="the logs request")
    assert engine.logs_requests(c.id)[0]["tail"] == "0"
    engine.write(c.id, "new")
    assert await f.wait_lines(c.id, 1) == [b"new"]


async def test_exit_on_eof_reads_every_container_to_its_end_and_returns(
    engine: FakeEngine,
) -> None:
    a = engine.add("a")
    b = engine.add("b", tty=True)
    for i in range(3):
        engine.write(a.id, f"a{i}")
        engine.write(b.id, f"b{i}")
    config = make_config(engine)
    source = build_docker_source(
        config,
        {},
        SystemClock(),
        exit_on_eof=True,
        ignore_identities=frozenset(),
        own_container=NOT_IN_A_CONTAINER,
    )
    queue: asyncio.Queue[RawChunk] = asyncio.Queue()
    await asyncio.wait_for(source.run(queue, asyncio.Event()), 10)

    lines: dict[str, list[bytes]] = {}
    while not queue.empty():
        chunk = queue.get_nowait()
        assert chunk.position is not None
        lines.setdefault(chunk.position.stream, []).extend(chunk.lines)
    assert lines == {a.id: [b"a0", b"a1", b"a2"], b.id: [b"b0", b"b1", b"b2"]}
    assert all(q["follow"] == "0" for path, q in engine.requests if path.endswith("/logs"))
    assert source.status()["state"] == "stopped"


async def test_stop_ends_the_source_promptly_while_streams_are_open(
    engine: FakeEngine, follow: Callable[..., Any]
) -> None:
    c = engine.add("api")
    f = await follow(make_config(engine))
    await wait_until(lambda: (f.container(c.id) or {}).get("connected"), what="connected")
    await f.close()
    assert f.source.status()["state"] == "stopped"


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


async def test_a_traceback_is_one_record_and_a_held_one_is_read_again_after_restart(
    engine: FakeEngine, follow: Callable[..., Any]
) -> None:
    c = engine.add("shop-api-1")
    stderr = python_app_stderr()
    assert any("direct cause" in line for line in stderr)  # a chained exception
    engine.write(c.id, "GET /orders/42 200")
    for line in stderr:
        engine.write(c.id, line, stream="stderr")
    # The traceback may still grow: it is held (for flush_timeout_s) and not committed.
    held = {"mode": "python", "flush_timeout_s": 60}
    first = await follow(make_config(engine, multiline=held))
    assert await first.wait_lines(c.id, 1) == [b"GET /orders/42 200"]
    await first.close()
    assert first.lines(c.id) == [b"GET /orders/42 200"]
    checkpoint = first.last_position(c.id)

    quick = {"mode": "python", "flush_timeout_s": 0.05}
    second = await follow(make_config(engine, multiline=quick), checkpoints={c.id: checkpoint})
    assert await second.wait_lines(c.id, 1) == ["\n".join(stderr).encode()]
    chunk = second.chunks_of(c.id)[0]
    assert chunk.line_meta == [{"stream": "stderr", "multiline": len(stderr)}]
    assert second.last_position(c.id).offset == engine.containers[c.id].messages[-1].ts_ns
