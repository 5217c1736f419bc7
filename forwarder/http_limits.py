"""What keeps a client from holding the HTTP server: connection caps and slow requests.

* `ConnectionGate` (pure): open connections counted in all and per client address;
  `admit` answers None or why not ("total", "client"), `release` gives a slot back.
* `GatedTCPSite`: an aiohttp site whose accepted connections pass the gate before
  aiohttp sees them. One over a cap gets a single JSON answer (503 over
  `http.max_connections`, 429 over `http.max_connections_per_client`) with
  `Connection: close`, and is closed: at once, or after its request bytes are read
  and dropped for at most `REFUSAL_LINGER_S` (so the answer is not lost to a reset),
  with at most `MAX_LINGERING` of those at a time.
* `BodyBudget` (pure) and `read_body`: a request body is read within
  `http.body_timeout_s`, up to `http.max_body_bytes`, and all bodies being read hold
  at most `http.max_buffered_body_bytes` together.

The header timeout is aiohttp's keep-alive timer, set to `http.header_timeout_s`: it
starts when a connection opens and again after each response, and closes the
connection unless a complete request head has arrived by then. Bytes trickled in do
not restart it, so a slowloris client is closed on time; an idle keep-alive
connection is closed the same way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import Any, Final, cast

import orjson
from aiohttp import web
from aiohttp.streams import StreamReader

from forwarder.http_config import HttpConfig

__all__ = [
    "BodyBudget",
    "BodyRefused",
    "ConnectionGate",
    "GatedTCPSite",
    "gated_runner",
    "read_body",
    "refusal_response",
]

log = logging.getLogger(__name__)

COMPONENT = "http"
REFUSAL_LINGER_S: Final = 1.0
MAX_LINGERING: Final = 64
REFUSAL_LOG_EVERY_S: Final = 60.0
READ_CHUNK_BYTES: Final = 64 * 1024


# --- connections ------------------------------------------------------------------------------


class ConnectionGate:
    """Open connections in all and per client (pure: no sockets, no clock).

    A client is the peer's address; `exempt` clients (trusted reverse proxies, which
    carry many clients on their connections) count only against the total.
    """

    def __init__(self, max_connections: int, max_per_client: int) -> None:
        if max_connections < 1 or max_per_client < 1:
            raise ValueError("connection caps must be at least 1")
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.open = 0
        self._per_client: dict[str, int] = {}
        self.refused: dict[str, int] = {"total": 0, "client": 0}

    def admit(self, client: str, *, exempt: bool = False) -> str | None:
        """Take a slot for `client`: None, or the cap that refuses it ("total", "client")."""
        if self.open >= self.max_connections:
            self.refused["total"] += 1
            return "total"
        held = self._per_client.get(client, 0)
        if not exempt and held >= self.max_per_client:
            self.refused["client"] += 1
            return "client"
        self.open += 1
        self._per_client[client] = held + 1
        return None

    def release(self, client: str) -> None:
        held = self._per_client.get(client, 0)
        if held <= 0:
            return
        self.open -= 1
        if held == 1:
            del self._per_client[client]
        else:
            self._per_client[client] = held - 1

    def held_by(self, client: str) -> int:
        return self._per_client.get(client, 0)


def refusal_response(reason: str, gate: ConnectionGate, retry_after_s: int) -> bytes:
    """The one answer a refused connection gets: a complete HTTP/1.1 response."""
    if reason == "client":
        status = "429 Too Many Requests"
        message = (
            f"{gate.max_per_client} connections already open from this client "
            "(http.max_connections_per_client); retry later"
        )
    else:
        status = "503 Service Unavailable"
        message = f"{gate.max_connections} connections open (http.max_connections); retry later"
    body = orjson.dumps({"error": message, "retry_after_s": retry_after_s})
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: {retry_after_s}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _Gated(asyncio.Protocol):
    """Stands before aiohttp's protocol: passes everything through once admitted."""

    __slots__ = ("_client", "_inner", "_site")

    def __init__(self, site: GatedTCPSite) -> None:
        self._site = site
        self._inner: asyncio.Protocol | None = None
        self._client: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        site = self._site
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        reason = site.gate.admit(client, exempt=site.exempt(client))
        if reason is not None:
            site.refused(reason, client, transport, self)
            return
        self._client = client
        server = site.runner_server()
        self._inner = server()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        inner, self._inner = self._inner, None
        if inner is None:
            self._site.lingering_done(self)
            return
        assert self._client is not None
        self._site.gate.release(self._client)
        inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)
        # refused: the request is read and dropped, so closing sends FIN, not RST

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            return self._inner.eof_received()
        return None  # refused: the transport closes itself

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class GatedTCPSite(web.BaseSite):
    """`web.TCPSite`'s job, with every accepted connection passing a `ConnectionGate`."""

    __slots__ = ("_host", "_lingering", "_logged_at", "_port", "_retry_after_s", "exempt", "gate")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        gate: ConnectionGate,
        *,
        exempt: Callable[[str], bool] = lambda client: False,
        retry_after_s: int = 1,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self.gate = gate
        self.exempt = exempt
        self._retry_after_s = retry_after_s
        self._lingering: dict[_Gated, tuple[asyncio.Transport, asyncio.TimerHandle]] = {}
        self._logged_at: float | None = None

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    def runner_server(self) -> web.Server:
        server = self._runner.server
        if server is None:  # the runner was cleaned up under an open connection
            raise RuntimeError("the HTTP runner is stopped")
        return server

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Gated(self),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )

    async def stop(self) -> None:
        for transport, handle in self._lingering.values():
            handle.cancel()
            transport.close()
        self._lingering.clear()
        await super().stop()

    # -- refusals --

    def refused(
        self, reason: str, client: str, transport: asyncio.BaseTransport, protocol: _Gated
    ) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        transport = cast(asyncio.Transport, transport)
        transport.write(refusal_response(reason, self.gate, self._retry_after_s))
        self._log_refusal(reason, client)
        if len(self._lingering) >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        handle = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.close)
        self._lingering[protocol] = (transport, handle)

    def lingering_done(self, protocol: _Gated) -> None:
        held = self._lingering.pop(protocol, None)
        if held is not None:
            held[1].cancel()

    def _log_refusal(self, reason: str, client: str) -> None:
        now = asyncio.get_running_loop().time()
        if self._logged_at is not None and now - self._logged_at < REFUSAL_LOG_EVERY_S:
            return
        self._logged_at = now
        cap = "http.max_connections" if reason == "total" else "http.max_connections_per_client"
        log.warning(
            "connection from %s refused over %s (%d open; refused so far: %d over the "
            "total, %d over a client's share)",
            client,
            cap,
            self.gate.open,
            self.gate.refused["total"],
            self.gate.refused["client"],
            extra={"component": COMPONENT, "event": "http.connection_refused"},
        )


def gated_runner(
    app: web.Application, config: HttpConfig, *, shutdown_timeout_s: float
) -> web.AppRunner:
    """An AppRunner whose connections carry the header and body timeouts of `config`."""
    return web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=shutdown_timeout_s,
        # Starts at connect and after each response; closes unless a head is complete.
        keepalive_timeout=config.header_timeout_s,
        # A body a handler did not read is drained at most this long, then closed.
        lingering_time=config.body_timeout_s,
    )


def gated_site(runner: web.AppRunner, host: str, port: int, config: HttpConfig) -> GatedTCPSite:
    """The site on host:port with the connection caps of `config`."""
    trusted = tuple(config.trusted_proxies)

    def exempt(client: str) -> bool:
        try:
            ip = ipaddress.ip_address(client)
        except ValueError:
            return False
        return any(ip in network for network in trusted)

    return GatedTCPSite(
        runner,
        host,
        port,
        ConnectionGate(config.max_connections, config.max_connections_per_client),
        exempt=exempt,
        retry_after_s=config.retry_after_s,
    )


# --- bodies -----------------------------------------------------------------------------------


class BodyRefused(Exception):
    """A body not read whole: `status` and the JSON fields of the answer, `reason` for
    the refusal counter. The connection is closed after the answer."""

    def __init__(self, status: int, reason: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.extra = extra


class BodyBudget:
    """Bytes of request bodies held in memory by every request together (pure)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.max_bytes = max_bytes
        self.held = 0
        self.exhausted = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.max_bytes:
            self.exhausted += 1
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held = max(0, self.held - n)


def too_large(limit: int) -> BodyRefused:
    return BodyRefused(
        413,
        "too_large",
        f"body larger than {limit} bytes (http.max_body_bytes); send smaller batches",
        max_body_bytes=limit,
    )


async def read_body(content: StreamReader, config: HttpConfig, budget: BodyBudget) -> bytes:
    """The whole body (decompressed by aiohttp when encoded), within the limits.

    BodyRefused: 413 past `http.max_body_bytes`, 408 when it takes longer than
    `http.body_timeout_s` in all, 503 when `budget` has no room. What it held goes back
    to the budget whichever way it ends.
    """
    limit = config.max_body_bytes
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(config.body_timeout_s):
            while True:
                chunk = await content.read(READ_CHUNK_BYTES)
                if not chunk:
                    return b"".join(chunks)
                if size + len(chunk) > limit:
                    raise too_large(limit)
                if not budget.take(len(chunk)):
                    raise BodyRefused(
                        503,
                        "busy",
                        "too many request bodies in flight (http.max_buffered_body_bytes); "
                        "retry later",
                        retry_after_s=config.retry_after_s,
                    )
                size += len(chunk)
                chunks.append(chunk)
    except TimeoutError:
        raise BodyRefused(
            408,
            "body_timeout",
            f"the body did not arrive within {config.body_timeout_s:g}s (http.body_timeout_s)",
        ) from None
    finally:
        budget.give(size)
