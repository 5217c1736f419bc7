"""`forwarder run` reading its standard input, as a real child process against a real
PostgreSQL: a backfill from a pipe exits 0 with every line stored once; a daemon killed
with SIGKILL after reading lines stores them once after a restart (spool replay); a
SIGHUP that changes the source keeps reading with every line once; two stdin sources
are refused naming the key."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncpg
import orjson

from forwarder.sinks.spool import SpoolPosition, SpoolReader, list_segments
from forwarder.sources.stdin import spool_folder
from tests.integration.daemon import Daemon, connected, count_rows, write_config
from tests.integration.test_reload import sighup
from tests.support import wait_until

STDIN_SOURCE = """
[[sources]]
type = "stdin"
name = "{name}"
service = "{service}"
"""


def stdin_config(
    path: Path,
    dsn: str,
    schema: str,
    *,
    max_rows: int = 500,
    max_delay_s: float = 0.05,
    service: str = "piped",
) -> Path:
    """The test daemon's config (tests/integration/daemon.py) with one stdin source."""
    return write_config(
        path,
        dsn=dsn,
        schema=schema,
        files={},
        max_rows=max_rows,
        max_delay_s=max_delay_s,
        extra=STDIN_SOURCE.format(name="in", service=service),
    )


def seq_lines(start: int, n: int) -> bytes:
    return b"".join(
        orjson.dumps({"level": "info", "message": f"line {i}", "meta": {"seq": i}}) + b"\n"
        for i in range(start, start + n)
    )


class PipedDaemon(Daemon):
    """A `forwarder run` child whose standard input is a pipe the test writes into."""

    def __init__(self, config: Path, *args: str) -> None:
        super().__init__(config, *args)
        self.stdin = asyncio.subprocess.PIPE

    async def feed(self, data: bytes) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(data)
        await self.proc.stdin.drain()

    def close_stdin(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()


async def seqs_stored(dsn: str, schema: str) -> tuple[int, int, int]:
    """(rows, distinct seq, the highest seq + 1)."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        row = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT (meta->>'seq')::bigint), "
            "coalesce(max((meta->>'seq')::bigint) + 1, 0) FROM system_logs"
        )
    finally:
        await conn.close()
    return row[0], row[1], row[2]


async def test_a_backfill_from_a_pipe_exits_0_with_every_line_once(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    config = stdin_config(tmp_path / "backfill.toml", pg_dsn, pg_schema)
    daemon = await PipedDaemon(config, "--exit-on-eof").start()
    try:
        for start in range(0, 10_000, 1000):  # as a producer writes: in pieces
            await daemon.feed(seq_lines(start, 1000))
        daemon.close_stdin()
        code = await daemon.wait(60)
    finally:
        await daemon.stop()
    assert code == 0, daemon.stderr()
    assert await seqs_stored(pg_dsn, pg_schema) == (10_000, 10_000, 10_000)
    stderr = daemon.stderr()
    assert "source in (stdin): reading standard input as service piped" in stderr
    assert "stdin.eof" in stderr and "shutdown.done" in stderr
    # Everything committed: the spool holds no segment any more.
    assert list_segments(spool_folder(tmp_path / "data", "in")) == []


async def test_lines_read_before_a_sigkill_are_stored_once_after_a_restart(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    # A batch commits at 1000 rows, or after a minute: the second lot is read and
    # spooled, but not committed, when the daemon is killed.
    config = stdin_config(tmp_path / "f.toml", pg_dsn, pg_schema, max_rows=1000, max_delay_s=60)
    folder = spool_folder(tmp_path / "data", "in")
    daemon = await PipedDaemon(config).start()
    try:
        await daemon.feed(seq_lines(0, 1000))
        await wait_until(lambda: count_is(pg_dsn, pg_schema, 1000), what="the first batch")
        committed = await spool_checkpoint(pg_dsn, pg_schema)
        await daemon.feed(seq_lines(1000, 700))
        await wait_until(
            lambda: len(SpoolReader(folder).read(committed, max_records=10_000).records) == 700,
            what="700 more lines in the spool",
        )
        await daemon.kill9()
    finally:
        await daemon.stop()
    assert await count_rows(pg_dsn, pg_schema) == 1000  # they were only in the spool

    # Restarted as a daemon with nothing on standard input: the spool is replayed.
    restarted = Daemon(config)  # stdin is /dev/null
    restarted.env_extra["FORWARDER_BATCH__MAX_DELAY_S"] = "0.05"
    await restarted.start()
    try:
        await wait_until(lambda: count_is(pg_dsn, pg_schema, 1700), what="the replayed lines")
        # Once committed, the end of the input empties the spool; the daemon idles.
        await wait_until(lambda: not list_segments(folder), what="the spool emptied")
        assert restarted.proc is not None and restarted.proc.returncode is None
    finally:
        code = await restarted.stop()
    assert code == 0, restarted.stderr()
    assert await seqs_stored(pg_dsn, pg_schema) == (1700, 1700, 1700)


async def test_a_sighup_that_changes_the_source_keeps_every_line_once(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    path = tmp_path / "f.toml"
    config = stdin_config(path, pg_dsn, pg_schema)
    daemon = await PipedDaemon(config).start()
    written = 0

    async def producer(stop: asyncio.Event) -> None:
        nonlocal written
        while not stop.is_set():
            # 50 lines (~3 KB): one atomic pipe write, so the switch cannot cut a line.
            await daemon.feed(seq_lines(written, 50))
            written += 50
            await asyncio.sleep(0.005)  # pacing of a producer, not a wait for a result

    try:
        await daemon.feed(seq_lines(0, 1000))
        written = 1000
        await wait_until(lambda: count_is(pg_dsn, pg_schema, 1000), what="the first rows")
        stdin_config(path, pg_dsn, pg_schema, service="renamed")
        stop = asyncio.Event()
        writing = asyncio.create_task(producer(stop))
        reload = await sighup(daemon, 0)  # the source stops and starts while lines arrive
        assert reload["event"] == "reload.done" and reload["meta"]["applied"] == ["sources"]
        await wait_until(lambda: renamed_rows(pg_dsn, pg_schema), what="rows of the new source")
        stop.set()
        await writing
        await daemon.feed(seq_lines(written, 1000))
        written += 1000
        daemon.close_stdin()
        await wait_until(lambda: count_is(pg_dsn, pg_schema, written), what="every row")
    finally:
        code = await daemon.stop()
    assert code == 0, daemon.stderr()
    assert await seqs_stored(pg_dsn, pg_schema) == (written, written, written)
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema})
    try:
        services = await conn.fetch(
            "SELECT service, min((meta->>'seq')::bigint), max((meta->>'seq')::bigint) "
            "FROM system_logs GROUP BY service ORDER BY 2"
        )
    finally:
        await conn.close()
    # The old source's lines, then the new one's: the switch falls between two lines.
    assert [tuple(r) for r in services] == [
        ("piped", 0, services[1][1] - 1),
        ("renamed", services[1][1], written - 1),
    ]


async def renamed_rows(dsn: str, schema: str) -> bool:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return bool(
            await conn.fetchval("SELECT count(*) FROM system_logs WHERE service = 'renamed'")
        )
    finally:
        await conn.close()


async def test_two_stdin_sources_are_refused_naming_the_key(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    config = stdin_config(tmp_path / "two.toml", pg_dsn, pg_schema)
    with config.open("a") as f:
        f.write(STDIN_SOURCE.format(name="again", service="piped"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    for command, status in (("run", 78), ("check-config", 1)):  # 78: EX_CONFIG
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "forwarder",
            command,
            "--config",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == status, command
        assert 'sources[1].type: "stdin" is already the type of sources[0]' in err.decode(), err
    assert not (tmp_path / "data" / "spool").exists()  # refused before anything started


async def count_is(dsn: str, schema: str, n: int) -> bool:
    count = await count_rows(dsn, schema)
    assert count <= n, f"more rows than lines: {count} > {n}"
    return count == n


async def spool_checkpoint(dsn: str, schema: str) -> SpoolPosition:
    async with connected(dsn, schema) as conn:
        offset = await conn.fetchval(
            "SELECT \"offset\" FROM forwarder_checkpoints WHERE source = 'in'"
        )
    return SpoolPosition.from_offset(offset)
