"""The HTTP server's limits over real sockets on loopback (issue 12, finding 2), and a
probe that fails for the forwarder's own lack of descriptors kept from the alarms.

A real aiohttp server started by `start_http` with small limits; raw TCP clients play
slowloris, stall a body, and hold more connections than the caps from one address
(127.0.0.1) while another address (127.0.0.2, also loopback) is still served. Every
wait has a deadline; the limits come from the config, and the assertions check that
the close (or refusal) happened, not how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from forwarder.alarms.probes import ProbeFailed, ProbeResult, ProbeRunner, RedisProbe, own_fault
from forwarder.clock import SystemClock
from forwarder.config import parse_config
from forwarder.http import CONTEXT, HttpContext, build_app, start_http, stop_http
from forwarder.http_config import HttpConfig
from forwarder.http_limits import BodyBudget, ConnectionGate, GatedTCPSite, refusal_response
from forwarder.intake import Intake
from forwarder.metrics import Metrics
from forwarder.runtime import NOFILE_UNLIMITED_TARGET, open_files_target
from tests.support import wait_until

DEADLINE_S = 15.0
OTHER_CLIENT = "127.0.0.2"


class Server:
    def __init__(self, runner: web.AppRunner, app: web.Application, intake: Intake) -> None:
        self.runner = runner
        self.app = app
        self.intake = intake
        self.port = int(runner.addresses[0][1])

    @property
    def gate(self) -> ConnectionGate:
        (site,) = self.runner.sites
        assert isinstance(site, GatedTCPSite)
        return site.gate

    @property
    def bodies(self) -> BodyBudget:
        return self.app[CONTEXT].bodies

    async def connect(
        self, client: str = "127.0.0.1"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, local_addr=(client, 0))

    async def exchange(self, request: bytes, client: str = "127.0.0.1") -> tuple[int, bytes]:
        """Send `request` on a new connection; the status and body once the server closes."""
        reader, writer = await self.connect(client)
        try:
            writer.write(request)
            return parse(await until_closed(reader))
        finally:
            writer.close()

    async def get(self, path: str, client: str = "127.0.0.1") -> tuple[int, bytes]:
        return await self.exchange(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), client
        )


ServerFactory = Callable[..., Any]


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    started: list[Server] = []

    async def start(**limits: Any) -> Server:
        config = HttpConfig(enabled=True, listen="127.0.0.1:0", tokens_env=None, **limits)
        settings = parse_config(
            {"database": {"dsn": "postgresql://unused@127.0.0.1:1/x", "data_dir": str(tmp_path)}}
        )
        intake = Intake(config, tmp_path, SystemClock())
        ctx = HttpContext(
            settings=settings,
            clock=SystemClock(),
            pool=None,  # type: ignore[arg-type]  # nothing here reads the database
            names=None,  # type: ignore[arg-type]
            status=lambda: {"sink": {"state": "ok"}},
            metrics=Metrics(),
            intake=intake,
            config=config,
            tokens=frozenset(),
        )
        app = build_app(ctx)
        server = Server(await start_http(app, config.listen, shutdown_timeout_s=1.0), app, intake)
        started.append(server)
        return server

    yield start
    for server in started:
        await stop_http(server.runner)
        server.intake.close()


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes (EOF or reset); fails at the deadline."""
    data = b""
    async with asyncio.timeout(DEADLINE_S):
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data


def parse(response: bytes) -> tuple[int, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, body


# --- the pure parts ---------------------------------------------------------------------------


def test_the_gate_caps_each_client_and_all_and_gives_slots_back() -> None:
    gate = ConnectionGate(max_connections=3, max_per_client=2)
    assert gate.admit("a") is None
    assert gate.admit("a") is None
    assert gate.admit("a") == "client"
    assert gate.admit("b") is None
    assert gate.admit("c") == "total"
    gate.release("a")
    assert gate.admit("c") is None
    assert (gate.open, gate.refused) == (3, {"total": 1, "client": 1})
    gate.release("nobody")  # never admitted: nothing changes
    assert gate.open == 3


def test_a_trusted_proxy_counts_only_against_the_total() -> None:
    gate = ConnectionGate(max_connections=4, max_per_client=1)
    assert [gate.admit("proxy", exempt=True) for _ in range(4)] == [None] * 4
    assert gate.admit("proxy", exempt=True) == "total"


def test_a_refusal_is_one_complete_json_response_that_closes() -> None:
    gate = ConnectionGate(max_connections=10, max_per_client=2)
    status, body = parse(refusal_response("client", gate, 5))
    assert status == 429
    assert orjson.loads(body)["retry_after_s"] == 5
    assert b"Connection: close" in refusal_response("total", gate, 5)
    assert parse(refusal_response("total", gate, 5))[0] == 503


def test_the_open_files_target_is_raised_only_and_capped_by_the_hard_limit() -> None:
    unlimited = resource.RLIM_INFINITY
    assert open_files_target(1024, 4096, 0) == 4096  # 0: the hard limit
    assert open_files_target(1024, 4096, 2048) == 2048  # a configured cap
    assert open_files_target(1024, 4096, 10_000) == 4096  # never above the hard limit
    assert open_files_target(1024, 4096, 512) == 1024  # never lowered
    assert open_files_target(1024, unlimited, 0) == NOFILE_UNLIMITED_TARGET


def test_the_limits_are_validated_together() -> None:
    with pytest.raises(ValueError, match="max_connections_per_client"):
        HttpConfig(max_connections=4, max_connections_per_client=5)
    with pytest.raises(ValueError, match="max_buffered_body_bytes"):
        HttpConfig(max_body_bytes=8192, max_buffered_body_bytes=4096, spool_max_bytes=2**20)


# --- slow clients -----------------------------------------------------------------------------


async def test_slowloris_headers_are_closed_after_the_header_timeout(
    limited: ServerFactory,
) -> None:
    server = await limited(header_timeout_s=0.5)
    reader, writer = await server.connect()

    async def trickle() -> None:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(ConnectionError):
            for i in range(10_000):  # one header line at a time, never the blank line
                writer.write(b"X-Slow-%d: 1\r\n" % i)
                await writer.drain()
                await asyncio.sleep(0.05)

    trickling = asyncio.create_task(trickle())
    try:
        assert await until_closed(reader) == b""  # closed, not answered
        assert not trickling.done()  # the client was still sending when it was closed
    finally:
        trickling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trickling
        writer.close()
    assert (await server.get("/health"))[0] == 200


async def test_an_idle_connection_is_closed_after_the_header_timeout(
    limited: ServerFactory,
) -> None:
    server = await limited(header_timeout_s=0.5)
    # keep-alive, then silence: answered, then closed
    assert (await server.exchange(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200
    await wait_until(lambda: server.gate.open == 0, DEADLINE_S, "the slot given back")


async def test_a_stalled_body_is_408_and_closed_and_its_memory_released(
    limited: ServerFactory,
) -> None:
    server = await limited(body_timeout_s=0.5)
    reader, writer = await server.connect()
    writer.write(
        b"POST /logs/ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000\r\n\r\n" + b"[" + b" " * 3000
    )
    await wait_until(lambda: server.bodies.held > 0, DEADLINE_S, "the body being read")
    answer = await until_closed(reader)  # the client never sends the rest
    writer.close()
    status, body = parse(answer)
    assert status == 408
    assert "http.body_timeout_s" in orjson.loads(body)["error"]
    assert server.bodies.held == 0
    await wait_until(lambda: server.gate.open == 0, DEADLINE_S, "the slot given back")


async def test_an_unread_stalled_body_is_closed_after_the_body_timeout(
    limited: ServerFactory,
) -> None:
    server = await limited(body_timeout_s=0.5)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\nabc"
    # answered, then closed instead of waiting for the rest
    assert (await server.exchange(request))[0] == 200


async def test_bodies_in_flight_share_one_memory_budget(limited: ServerFactory) -> None:
    server = await limited(
        max_body_bytes=4096, max_buffered_body_bytes=4096, body_timeout_s=30, spool_max_bytes=2**20
    )
    head = (
        b"POST /logs/ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 4000\r\n\r\n"
    )
    _, stalled = await server.connect()
    stalled.write(head + b"[" + b" " * 2999)
    await wait_until(lambda: server.bodies.held >= 3000, DEADLINE_S, "3000 bytes held")
    reader, writer = await server.connect(OTHER_CLIENT)
    record = orjson.dumps([{"level": "error", "message": "x" * 3000}])
    writer.write(head.replace(b"4000", str(len(record)).encode()) + record)
    status, body = parse(await until_closed(reader))
    writer.close()
    assert status == 503
    assert "http.max_buffered_body_bytes" in orjson.loads(body)["error"]
    stalled.close()
    await wait_until(lambda: server.bodies.held == 0, DEADLINE_S, "the stalled body released")


# --- connection caps --------------------------------------------------------------------------


async def test_one_client_over_its_cap_is_refused_while_another_is_served(
    limited: ServerFactory,
) -> None:
    server = await limited(max_connections=10, max_connections_per_client=3, header_timeout_s=30)
    held = [await server.connect() for _ in range(3)]
    await wait_until(lambda: server.gate.open == 3, DEADLINE_S, "three connections held")
    reader, writer = await server.connect()
    status, body = parse(await until_closed(reader))
    writer.close()
    assert status == 429
    assert "http.max_connections_per_client" in orjson.loads(body)["error"]
    assert (await server.get("/health", OTHER_CLIENT))[0] == 200
    # The held connections were never disturbed; one closed frees a slot for its client.
    held.pop()[1].close()
    await wait_until(lambda: server.gate.open == 2, DEADLINE_S, "a slot given back")
    assert (await server.get("/health"))[0] == 200
    for _, w in held:
        w.close()


async def test_over_the_total_cap_every_client_is_refused_503(limited: ServerFactory) -> None:
    server = await limited(max_connections=4, max_connections_per_client=2, header_timeout_s=30)
    held = [await server.connect(c) for c in ("127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2")]
    await wait_until(lambda: server.gate.open == 4, DEADLINE_S, "four connections held")
    status, body = await server.get("/health", "127.0.0.3")
    assert status == 503
    assert "http.max_connections" in orjson.loads(body)["error"]
    for _, w in held:
        w.close()
    await wait_until(lambda: server.gate.open == 0, DEADLINE_S, "every slot given back")
    assert (await server.get("/health", "127.0.0.3"))[0] == 200


async def test_a_refused_client_sending_its_request_first_still_reads_the_answer(
    limited: ServerFactory,
) -> None:
    server = await limited(max_connections=2, max_connections_per_client=1, header_timeout_s=30)
    _, holder = await server.connect()
    await wait_until(lambda: server.gate.open == 1, DEADLINE_S, "one connection held")
    for _ in range(5):  # the request is already on its way when the refusal is written
        status, _ = await server.get("/health")
        assert status == 429
    holder.close()


# --- a probe failing for the forwarder's own reasons -----------------------------------------


def test_own_fault_tells_the_forwarders_errors_from_the_services() -> None:
    emfile = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    assert "out of resources" in (own_fault(emfile, timeout_s=2, elapsed_s=0) or "")
    wrapped = ProbeFailed("cannot connect")
    wrapped.__cause__ = emfile  # how HttpProbe passes aiohttp's connector error on
    assert own_fault(wrapped, timeout_s=2, elapsed_s=0) is not None
    refused = OSError(errno.ECONNREFUSED, "Connection refused")
    assert own_fault(refused, timeout_s=2, elapsed_s=0) is None
    assert own_fault(TimeoutError(), timeout_s=2, elapsed_s=2.05) is None  # on time
    late = own_fault(TimeoutError(), timeout_s=2, elapsed_s=3.5)  # the loop was stalled
    assert late is not None and "stalled" in late


@contextlib.contextmanager
def no_free_descriptors() -> Iterator[None]:
    """Every file descriptor under a lowered soft limit taken; all given back after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_probe_out_of_descriptors_is_forwarder_side_and_never_reaches_the_alarms() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # a port with nothing answering: the service "down"
    port = listener.getsockname()[1]
    listener.close()
    probe = RedisProbe("redis", SystemClock(), port=port, interval_s=0.05, timeout_s=0.05)
    down = await probe.check()
    assert (down.ok, down.forwarder_side) == (False, False)  # the service's fault: counted

    runner = ProbeRunner([probe], SystemClock())
    out: asyncio.Queue[ProbeResult] = asyncio.Queue()
    stop = asyncio.Event()
    with no_free_descriptors():
        own = await probe.check()
        running = asyncio.create_task(runner.run(out, stop))
        try:
            await wait_until(lambda: runner.own_failures >= 2, DEADLINE_S, "two own failures")
        finally:
            stop.set()
            await running
    assert (own.ok, own.forwarder_side) == (False, True)
    assert own.detail.startswith("forwarder-side: the forwarder is out of resources")
    assert own.as_dict()["forwarder_side"] is True
    assert out.empty()  # nothing for a redis_down rule to count
    status = runner.status()
    assert (status["failures"], status["probes"]["redis"]["forwarder_side"]) == (0, True)
