"""The HTTP limits of a real `forwarder run` (issue 12, finding 2): started under a low
open-files soft limit it raises the limit and says so; a client over its connection
cap is refused while another address is served; slow heads and stalled bodies are
closed on the configured (small) timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
from collections.abc import Iterator
from pathlib import Path

import orjson

from tests.component.test_http_limits import parse, until_closed
from tests.integration.daemon import Daemon, write_config
from tests.support import free_port, wait_until

LOW_SOFT_LIMIT = 256
STARTED = re.compile(r"open files limit (\d+) \(soft, raised from (\d+) at start")


@contextlib.contextmanager
def soft_open_files_limit(soft: int) -> Iterator[None]:
    """A low soft limit for the children started inside (they inherit it at fork)."""
    was, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, was), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (was, hard))


async def test_the_daemon_raises_its_open_files_limit_and_holds_its_connection_limits(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    port = free_port()
    http = f"""
[http]
enabled = true
listen = "127.0.0.1:{port}"
max_connections = 40
max_connections_per_client = 5
header_timeout_s = 3.0
body_timeout_s = 0.5
"""
    config = write_config(tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema, files={}, extra=http)
    daemon = Daemon(config)
    with soft_open_files_limit(LOW_SOFT_LIMIT):
        await daemon.start()
    held: list[asyncio.StreamWriter] = []

    async def connect(
        client: str = "127.0.0.1",
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", port, local_addr=(client, 0))

    async def health(client: str = "127.0.0.1") -> int:
        reader, writer = await connect(client)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        try:
            return parse(await until_closed(reader))[0]
        finally:
            writer.close()

    try:

        async def up() -> bool:
            try:
                return await health() == 200
            except OSError:
                return False

        await wait_until(up, 60, "/health answering 200")
        found = STARTED.search(daemon.stderr())
        assert found, daemon.stderr()[-3000:]
        assert int(found.group(2)) == LOW_SOFT_LIMIT
        assert int(found.group(1)) > LOW_SOFT_LIMIT

        # Five keep-alive connections, each answered once and then idle, fill
        # 127.0.0.1's share (a 429 here: the slot of a closed probe not yet given back).
        readers = []
        async with asyncio.timeout(30):
            while len(held) < 5:
                reader, writer = await connect()
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE)
                await reader.readexactly(int(length.group(1)) if length else 0)
                if parse(head)[0] == 200:
                    readers.append(reader)
                    held.append(writer)
                else:
                    writer.close()
        refused_reader, refused = await connect()
        status, body = parse(await until_closed(refused_reader))
        refused.close()
        assert status == 429, daemon.stderr()[-4000:]
        assert "http.max_connections_per_client" in orjson.loads(body)["error"]
        assert await health("127.0.0.2") == 200  # another client is still served
        # The idle ones send no further head: each is closed after header_timeout_s.
        for reader in readers:
            assert await until_closed(reader) == b""

        # A body that stalls is 408 and closed after body_timeout_s.
        reader, writer = await connect()
        writer.write(
            b"POST /logs/ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n[{"
        )
        status, body = parse(await until_closed(reader))
        writer.close()
        assert status == 408, body
        assert await health() == 200
    finally:
        for writer in held:
            writer.close()
        assert await daemon.stop() == 0, daemon.stderr()[-3000:]
