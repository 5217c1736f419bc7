"""Health probes against real servers: Redis (the machine's, or a redis-server we start),
closed ports, a silent TCP server, and an aiohttp server that turns unhealthy."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import TypeAdapter

from forwarder.alarms.config import ProbeConfig
from forwarder.alarms.probes import (
    HttpProbe,
    ProbeResult,
    ProbeRunner,
    ProbeSchedule,
    RedisProbe,
    build_probes,
    resp_command,
)
from forwarder.alarms.secrets import SecretError
from forwarder.clock import SystemClock
from tests.support import FakeClock, free_port, serving, wait_until

PROBE_CONFIG = TypeAdapter(ProbeConfig)


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class RedisServer:
    def __init__(self, port: int, process: subprocess.Popen[bytes] | None) -> None:
        self.port = port
        self.process = process


def start_redis(tmp: Path, *extra: str) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    process = subprocess.Popen(
        [
            *(binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--dir", str(tmp), *extra),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return RedisServer(port, process)


def stop_redis(server: RedisServer) -> None:
    if server.process is not None:
        server.process.terminate()
        server.process.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The machine's Redis at 127.0.0.1:6379 when reachable, else our own redis-server."""
    if reachable(6379):
        yield RedisServer(6379, None)
        return
    if shutil.which("redis-server") is None:
        pytest.skip("no Redis at 127.0.0.1:6379 and redis-server is not installed")
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        stop_redis(server)


@pytest.fixture
async def redis_with_password(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = start_redis(tmp_path, "--requirepass", "pr0be-pass")
    try:
        await wait_until(lambda: reachable(server.port), what="redis-server to listen")
        yield server
    finally:
        stop_redis(server)


async def test_redis_ping_against_a_real_redis(redis_server: RedisServer) -> None:
    await wait_until(lambda: reachable(redis_server.port), what="redis to listen")
    probe = RedisProbe("cache", SystemClock(), port=redis_server.port, timeout_s=2.0)
    result = await probe.check()
    if not result.ok and "NOAUTH" in result.detail:
        pytest.skip("the machine's Redis requires a password")
    assert result.ok, result.detail
    assert (result.probe, result.kind, result.detail) == ("cache", "redis", "PONG")
    assert result.error is None
    assert 0 <= result.latency_ms < 2000


async def test_redis_auth_with_the_right_and_the_wrong_password(
    redis_with_password: RedisServer,
) -> None:
    port = redis_with_password.port
    configs = {
        "good": PROBE_CONFIG.validate_python(
            {"type": "redis", "port": port, "password_env": "REDIS_PASSWORD"}
        ),
        "bad": PROBE_CONFIG.validate_python(
            {"type": "redis", "port": port, "password_env": "REDIS_BAD_PASSWORD"}
        ),
        "none": PROBE_CONFIG.validate_python({"type": "redis", "port": port}),
    }
    environ = {"REDIS_PASSWORD": "pr0be-pass", "REDIS_BAD_PASSWORD": "not-it"}
    async with aiohttp.ClientSession() as session:
        probes = build_probes(configs, session, SystemClock(), environ=environ)
        good, bad, none = [await p.check() for p in probes]
    assert (good.ok, good.detail) == (True, "PONG")
    assert not bad.ok
    assert bad.detail.startswith(f"AUTH refused by 127.0.0.1:{port}: -WRONGPASS")
    assert "not-it" not in bad.detail
    assert not none.ok
    assert none.detail == f"PING to 127.0.0.1:{port} answered -NOAUTH Authentication required."


async def test_redis_probe_on_a_closed_port_fails_clearly() -> None:
    port = free_port()
    result = await RedisProbe("cache", SystemClock(), port=port, timeout_s=2.0).check()
    assert not result.ok
    assert result.detail == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    assert result.error == result.detail


async def test_redis_probe_times_out_on_a_server_that_never_answers() -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept, read nothing, answer nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await RedisProbe("cache", SystemClock(), port=port, timeout_s=0.2).check()
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert not result.ok
    assert result.detail == f"timed out after 0.2s (PING to 127.0.0.1:{port})"


def test_resp_command_encoding() -> None:
    assert resp_command("PING") == b"*1\r\n$4\r\nPING\r\n"
    assert resp_command("AUTH", "pässword") == b"*2\r\n$4\r\nAUTH\r\n$9\r\np\xc3\xa4ssword\r\n"


def test_missing_probe_password_names_the_key_and_variable() -> None:
    configs = {"cache": PROBE_CONFIG.validate_python({"type": "redis", "password_env": "REDIS_PW"})}
    with pytest.raises(SecretError) as err:
        build_probes(configs, None, SystemClock(), environ={})  # type: ignore[arg-type]
    assert str(err.value) == "probes.cache.password_env: environment variable REDIS_PW is not set"


# --- http -------------------------------------------------------------------------------------


class Health:
    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.hits = 0

    async def handle(self, request: web.Request) -> web.Response:
        status = self.statuses[min(self.hits, len(self.statuses) - 1)]
        self.hits += 1
        return web.json_response({"healthy": status < 300}, status=status)


@pytest.fixture
async def health_server() -> AsyncIterator[tuple[Health, str]]:
    health = Health([200, 503])
    app = web.Application()
    app.router.add_get("/system/checks/latest", health.handle)
    async with serving(app) as base:
        yield health, f"{base}/system/checks/latest"


async def test_runner_reports_200_then_503_from_an_http_endpoint(
    health_server: tuple[Health, str],
) -> None:
    _, url = health_server
    config = PROBE_CONFIG.validate_python(
        {"type": "http", "url": url, "interval_s": 0.3, "timeout_s": 0.3}
    )
    out: asyncio.Queue[ProbeResult] = asyncio.Queue(maxsize=10)
    stop = asyncio.Event()
    results: list[ProbeResult] = []

    def got(n: int) -> bool:
        while not out.empty():
            results.append(out.get_nowait())
        return len(results) >= n

    async with aiohttp.ClientSession() as session:
        runner = ProbeRunner(build_probes({"api": config}, session, SystemClock()), SystemClock())
        task = asyncio.create_task(runner.run(out, stop))
        await wait_until(lambda: got(2), what="two probe results")
        stop.set()
        await wait_until(task.done, what="the runner to stop")
        await task
    first, second = results[:2]
    assert (first.probe, first.kind, first.ok, first.detail) == ("api", "http", True, "HTTP 200")
    assert (second.ok, second.detail) == (False, 'HTTP 503: {"healthy": false}')
    assert second.at >= first.at
    status = runner.status()
    assert status["state"] == "stopped"
    assert status["probes"]["api"]["ok"] is False
    assert status["failures"] >= 1


async def test_http_probe_on_a_closed_port_fails_clearly() -> None:
    port = free_port()
    async with aiohttp.ClientSession() as session:
        probe = HttpProbe("api", SystemClock(), session, f"http://127.0.0.1:{port}/health")
        result = await probe.check()
    assert not result.ok
    assert result.detail == f"cannot connect to 127.0.0.1:{port}: Connection refused"


async def test_runner_stops_at_once_while_waiting_for_the_next_run(
    redis_server: RedisServer,
) -> None:
    probe = RedisProbe("cache", SystemClock(), port=redis_server.port, interval_s=3600)
    out: asyncio.Queue[ProbeResult] = asyncio.Queue(maxsize=10)
    stop = asyncio.Event()
    task = asyncio.create_task(ProbeRunner([probe], SystemClock()).run(out, stop))
    await wait_until(lambda: out.qsize() == 1, what="the first check, made at start")
    stop.set()
    async with asyncio.timeout(5):
        await task


# --- scheduling (pure, on a fake clock) -------------------------------------------------------


def test_schedule_runs_each_probe_on_its_own_interval(fake_clock: FakeClock) -> None:
    schedule = ProbeSchedule({"fast": 1.0, "slow": 5.0}, fake_clock.monotonic())
    ran: list[tuple[float, list[str]]] = []
    start = fake_clock.monotonic()
    for _ in range(60):
        now = fake_clock.monotonic()
        due = schedule.due(now)
        if due:
            ran.append((now - start, due))
            for name in due:
                schedule.done(name, now)
        fake_clock.advance(0.25)
    fast = [t for t, names in ran if "fast" in names]
    slow = [t for t, names in ran if "slow" in names]
    assert fast == [float(i) for i in range(15)]
    assert slow == [0.0, 5.0, 10.0]


def test_schedule_skips_missed_runs_instead_of_bursting(fake_clock: FakeClock) -> None:
    schedule = ProbeSchedule({"p": 1.0}, fake_clock.monotonic())
    start = fake_clock.monotonic()
    assert schedule.due(start) == ["p"]
    fake_clock.advance(3.5)  # the check took 3.5 s
    schedule.done("p", fake_clock.monotonic())
    assert schedule.due(fake_clock.monotonic()) == []
    assert schedule.wait_s(fake_clock.monotonic()) == pytest.approx(1.0)


def test_schedule_wait_is_the_time_to_the_earliest_due_probe(fake_clock: FakeClock) -> None:
    now = fake_clock.monotonic()
    schedule = ProbeSchedule({"a": 10.0, "b": 4.0}, now)
    for name in schedule.due(now):
        schedule.done(name, now)
    assert schedule.wait_s(now) == 4.0
    assert schedule.wait_s(now + 5.0) == 0.0
    assert ProbeSchedule({}, now).wait_s(now) == float("inf")


def test_probe_result_as_dict(fake_clock: FakeClock) -> None:
    result = ProbeResult("cache", "redis", False, "boom", 1.23456, fake_clock.now())
    expected: dict[str, Any] = {
        "probe": "cache",
        "type": "redis",
        "ok": False,
        "detail": "boom",
        "latency_ms": 1.235,
        "at": "2026-11-26T12:00:00+00:00",
    }
    assert result.as_dict() == expected
