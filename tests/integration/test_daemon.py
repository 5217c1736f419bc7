"""The whole daemon as a real child process against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from pathlib import Path

import asyncpg
import orjson
import pytest

from tests.integration.daemon import Daemon, count_rows, write_config
from tests.support import api_error_burst, wait_until


def schema_line(seq: int, service: str = "api") -> bytes:
    return (
        orjson.dumps(
            {
                "ts": "2026-11-26T12:00:00.123Z",
                "service": service,
                "level": "INFO" if seq % 10 else "ERROR",
                "event": "test.seq",
                "message": f"line {seq}",
                "meta": {"seq": seq},
            }
        )
        + b"\n"
    )


class SeqLog:
    """A log file that gets schema lines with consecutive sequence numbers appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written = 0  # lines appended so far; the next line's sequence number

    def append(self, n: int) -> None:
        with self.path.open("ab") as f:
            f.write(b"".join(schema_line(self.written + i) for i in range(n)))
        self.written += n


async def assert_each_seq_once(dsn: str, schema: str, expected: int) -> None:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        total, distinct = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT (meta->>'seq')::bigint) FROM system_logs"
        )
    finally:
        await conn.close()
    assert (total, distinct) == (expected, expected), "rows stored vs distinct lines"


async def test_lines_become_rows_and_sigterm_drains(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    config = write_config(
        tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema, files={"app": [str(logs / "*.log")]}
    )
    (logs / "app.log").write_bytes(b"".join(schema_line(i) for i in range(1000)))
    daemon = await Daemon(config).start()
    try:
        await wait_until(lambda: count_rows(pg_dsn, pg_schema), what="first rows")
        await wait_until(lambda: _count_is(pg_dsn, pg_schema, 1000), what="1000 rows")
        with (logs / "app.log").open("ab") as f:
            f.write(b"ERROR:app.db:connection lost\n")
        await wait_until(lambda: _count_is(pg_dsn, pg_schema, 1001), what="text line row")
    finally:
        code = await daemon.stop()
    assert code == 0, daemon.stderr()
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema})
    try:
        row = await conn.fetchrow(
            "SELECT ts, service, level, event, message, meta FROM system_logs "
            "WHERE message = 'connection lost'"
        )
        first = await conn.fetchrow("SELECT * FROM system_logs WHERE message = 'line 0'")
        checkpoint = await conn.fetchrow("SELECT * FROM forwarder_checkpoints")
    finally:
        await conn.close()
    assert (row["service"], row["level"], row["event"]) == ("app", "ERROR", "log")
    assert orjson.loads(row["meta"])["logger"] == "app.db"
    assert first["service"] == "api"  # the line's own service wins over the source's
    assert first["level"] == "ERROR" and first["event"] == "test.seq"
    assert first["ts"].isoformat() == "2026-11-26T12:00:00.123000+00:00"
    assert orjson.loads(first["meta"]) == {"seq": 0}
    assert checkpoint["source"] == "app"
    assert checkpoint["offset"] == (logs / "app.log").stat().st_size
    stderr = daemon.stderr()
    assert "startup.source" in stderr and "shutdown.done" in stderr


async def _count_is(dsn: str, schema: str, n: int) -> bool:
    count = await count_rows(dsn, schema)
    assert count <= n, f"more rows than lines: {count} > {n}"
    return count == n


async def test_kill_9_mid_stream_loses_and_duplicates_nothing(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    """Two files written continuously; the daemon is SIGKILLed three times and restarted."""
    logs = tmp_path / "logs"
    logs.mkdir()
    config = write_config(
        tmp_path / "f.toml",
        dsn=pg_dsn,
        schema=pg_schema,
        files={"a": [str(logs / "a.log")], "b": [str(logs / "b.log")]},
        max_rows=300,
        max_delay_s=0.02,
    )
    total = 30_000
    rng = random.Random(7)
    written = 0

    async def writer() -> None:
        nonlocal written
        files = [(logs / "a.log").open("ab"), (logs / "b.log").open("ab")]
        try:
            while written < total:
                burst = min(rng.randint(50, 400), total - written)
                f = files[rng.randrange(2)]
                f.write(b"".join(schema_line(written + i) for i in range(burst)))
                f.flush()
                written += burst
                await asyncio.sleep(0.002)
        finally:
            for f in files:
                f.close()

    writing = asyncio.create_task(writer())
    daemon = await Daemon(config).start()
    kills = 0
    try:
        for _ in range(3):
            target = await count_rows(pg_dsn, pg_schema) + rng.randint(2000, 6000)
            await wait_until(lambda t=target: _at_least(pg_dsn, pg_schema, t), what="progress")
            await daemon.kill9()
            kills += 1
            daemon = await Daemon(config).start()
        await writing
        await wait_until(
            lambda: _count_is(pg_dsn, pg_schema, total),
            timeout_s=60,
            what=f"all {total} lines stored",
        )
    finally:
        writing.cancel()
        code = await daemon.stop()
    assert kills == 3
    assert code == 0, daemon.stderr()
    await assert_each_seq_once(pg_dsn, pg_schema, total)


async def _at_least(dsn: str, schema: str, n: int) -> bool:
    return await count_rows(dsn, schema) >= n


async def test_terminated_connections_lose_and_duplicate_nothing(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    """pg_terminate_backend on the daemon's sessions, again and again, while it writes."""
    logs = tmp_path / "logs"
    logs.mkdir()
    config = write_config(
        tmp_path / "f.toml",
        dsn=pg_dsn,
        schema=pg_schema,
        files={"a": [str(logs / "a.log")]},
        max_rows=200,
        max_delay_s=0.01,
    )
    total = 20_000
    daemon = await Daemon(config).start()
    admin = await asyncpg.connect(pg_dsn)
    sessions = (
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'forwarder' "
        "AND pid <> pg_backend_pid() AND datname = current_database()"
    )

    async def kill_sessions() -> int:
        pids = [r["pid"] for r in await admin.fetch(sessions)]
        return sum([await admin.fetchval("SELECT pg_terminate_backend($1)", p) for p in pids])

    terminated = 0
    try:
        with (logs / "a.log").open("ab") as f:
            for start in range(0, total, 500):
                f.write(b"".join(schema_line(i) for i in range(start, start + 500)))
                f.flush()
                if start % 4000 == 0:
                    await wait_until(lambda: admin.fetch(sessions), what="a daemon session")
                    terminated += await kill_sessions()
                await asyncio.sleep(0.01)
        await wait_until(
            lambda: _count_is(pg_dsn, pg_schema, total),
            timeout_s=60,
            what=f"all {total} lines stored",
        )
    finally:
        await admin.close()
        code = await daemon.stop()
    assert terminated >= 5, "the test must actually cut connections"
    assert code == 0, daemon.stderr()
    await assert_each_seq_once(pg_dsn, pg_schema, total)


async def test_exit_on_eof_backfills_and_exits(tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "old.log").write_bytes(b"".join(schema_line(i) for i in range(5000)) + b"no newline")
    config = write_config(
        tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema, files={"old": [str(logs / "*.log")]}
    )
    daemon = await Daemon(config, "--exit-on-eof").start()
    code = await daemon.wait(60)
    assert code == 0, daemon.stderr()
    assert await count_rows(pg_dsn, pg_schema) == 5001
    # A second backfill finds everything committed and writes nothing.
    code = await (await Daemon(config, "--exit-on-eof").start()).wait(60)
    assert code == 0
    assert await count_rows(pg_dsn, pg_schema) == 5001


async def test_rotation_under_a_running_daemon(tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    """rename+create and copytruncate rotations while lines are written; a kill -9 between."""
    logs = tmp_path / "logs"
    logs.mkdir()
    config = write_config(
        tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema, files={"r": [str(logs / "app.log")]}
    )
    live = logs / "app.log"
    daemon = await Daemon(config).start()
    log = SeqLog(live)

    try:
        for round_ in range(4):
            log.append(1000)
            # The daemon follows this file before it is rotated (a file renamed away
            # before the forwarder ever saw it cannot be known).
            await wait_until(lambda: _count_is(pg_dsn, pg_schema, log.written), what="live rows")
            log.append(1000)  # most likely still unread when the rename happens
            live.rename(logs / f"app.log.{round_}")  # rename + create
            log.append(500)
            await wait_until(lambda: _count_is(pg_dsn, pg_schema, log.written), what="renamed rows")
            if round_ == 1:
                await daemon.kill9()
                daemon = await Daemon(config).start()
        log.append(1000)
        await wait_until(lambda: _count_is(pg_dsn, pg_schema, log.written), what="before truncate")
        (logs / "app.log.copy").write_bytes(live.read_bytes())  # copytruncate
        with live.open("r+b") as f:
            f.truncate(0)
        log.append(300)
        await wait_until(lambda: _count_is(pg_dsn, pg_schema, log.written), what="after truncate")
    finally:
        code = await daemon.stop()
    assert code == 0, daemon.stderr()
    await assert_each_seq_once(pg_dsn, pg_schema, log.written)


async def test_empty_dsn_refuses_to_start_and_names_the_variable(tmp_path: Path) -> None:
    config = write_config(tmp_path / "f.toml", dsn="", schema="public", files={})
    daemon = await Daemon(config).start()
    code = await daemon.wait(30)
    assert code == 78
    assert "FORWARDER_DATABASE__DSN" in daemon.stderr()


async def test_embedded_database_on_a_bare_laptop(tmp_path: Path) -> None:
    """dsn = "embedded": the daemon starts its own PostgreSQL and prints its DSN."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_bytes(b"".join(schema_line(i) for i in range(100)))
    config = write_config(
        tmp_path / "f.toml",
        dsn="embedded",
        schema="public",
        files={"app": [str(logs / "*.log")]},
        data_dir=tmp_path / "data",
    )
    daemon = await Daemon(config, "--exit-on-eof").start()
    code = await daemon.wait(120)
    assert code == 0, daemon.stderr()
    ready = [
        orjson.loads(line) for line in daemon.stderr().splitlines() if '"embedded.ready"' in line
    ]
    assert ready, daemon.stderr()
    dsn = ready[0]["meta"]["dsn"]
    assert str(tmp_path / "data" / "pg") in dsn
    from forwarder.sinks.embedded import start_embedded

    server = await asyncio.to_thread(start_embedded, tmp_path / "data" / "pg")
    try:
        assert await count_rows(server.dsn, "public") == 100
    finally:
        await asyncio.to_thread(server.stop)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_either_signal_drains_with_status_0(
    tmp_path: Path, pg_dsn: str, pg_schema: str, signum: int
) -> None:
    """max_delay_s is 60 s: a prompt exit 0 with rows stored means the drain flushed."""
    logs = tmp_path / "logs"
    logs.mkdir()
    config = write_config(
        tmp_path / "f.toml",
        dsn=pg_dsn,
        schema=pg_schema,
        files={"a": [str(logs / "a.log")]},
        max_rows=1000,
        max_delay_s=60,
    )
    (logs / "a.log").write_bytes(b"".join(schema_line(i) for i in range(2500)))
    daemon = await Daemon(config).start()
    # The first full batch (1000 rows by size) shows reading is under way.
    await wait_until(lambda: _at_least(pg_dsn, pg_schema, 1000), what="first batch")
    daemon.signal(signum)
    assert await daemon.wait(20) == 0, daemon.stderr()
    # Whatever was read before the signal is committed; a restart reads exactly the rest.
    code = await (await Daemon(config, "--exit-on-eof").start()).wait(60)
    assert code == 0
    await assert_each_seq_once(pg_dsn, pg_schema, 2500)


def test_check_config_names_every_error(tmp_path: Path) -> None:
    import subprocess

    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[database]\ndsn = "x"\ntabel = "y"\n[batch]\nmax_rows = -5\n'
        '[[sources]]\ntype = "file"\nname = "ui"\nservice = "ui"\npahts = ["/x"]\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", "check-config", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    for expected in (
        "database.tabel: unknown key",
        "batch.max_rows:",
        "sources[0].pahts: unknown key",
        "sources[0].paths: required key is missing",
    ):
        assert expected in result.stderr
    good = subprocess.run(
        [sys.executable, "-m", "forwarder", "check-config", "--config", "config/forwarder.toml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert good.returncode == 0, good.stderr
    assert "config OK" in good.stdout


async def test_database_outage_pauses_reading_and_loses_nothing(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    """The database disappears for a while (every connection cut, new ones refused)."""
    from tests.integration.tcp_proxy import PgProxy

    proxy = PgProxy(pg_dsn)
    await proxy.up()
    logs = tmp_path / "logs"
    logs.mkdir()
    config = write_config(
        tmp_path / "f.toml",
        dsn=proxy.proxied_dsn(),
        schema=pg_schema,
        files={"a": [str(logs / "a.log")]},
        max_rows=200,
        max_delay_s=0.01,
    )
    daemon = await Daemon(config).start()
    log = SeqLog(logs / "a.log")

    try:
        log.append(3000)
        await wait_until(lambda: _count_is(pg_dsn, pg_schema, 3000), what="rows before outage")
        for _ in range(2):
            await proxy.down()
            log.append(4000)  # written while the database is unreachable
            await wait_until(
                lambda: "degraded" in daemon.stderr() or "retry" in daemon.stderr(),
                what="the daemon noticing the outage",
            )
            assert await count_rows(pg_dsn, pg_schema) < log.written
            await proxy.up()
            await wait_until(
                lambda: _count_is(pg_dsn, pg_schema, log.written),
                timeout_s=60,
                what="rows after the outage",
            )
    finally:
        code = await daemon.stop()
        await proxy.down()
    assert code == 0, daemon.stderr()
    await assert_each_seq_once(pg_dsn, pg_schema, log.written)


HOSTILE_LINES = [
    b"plain text with a \x00 NUL byte",
    b"invalid UTF-8 \xff\xfe \xc3\x28 here",
    b'{"message":"escaped \\u0000 NUL","meta":{"k\\u0000":"v\\u0000"}}',
    b'{"message":"lone surrogate \\ud800"}',
    b"[" * 50_000,
    b'{"ts": 1e300, "level": 50, "message": "absurd timestamp"}',
    b"x" * 10_000_000,  # a 10 MB line: cut at max_line_bytes
    b"after the long line",
]


async def test_hostile_bytes_are_all_stored(tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    """Every line becomes a row; nothing is refused by PostgreSQL, nothing stops the daemon."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "evil.log").write_bytes(b"\n".join(HOSTILE_LINES) + b"\n")
    config = write_config(
        tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema, files={"evil": [str(logs / "*.log")]}
    )
    daemon = await Daemon(config, "--exit-on-eof").start()
    assert await daemon.wait(60) == 0, daemon.stderr()
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema})
    try:
        rows = await conn.fetch("SELECT level, event, message, meta FROM system_logs ORDER BY id")
        dead = await conn.fetchval("SELECT count(*) FROM forwarder_dead_letters")
    finally:
        await conn.close()
    assert dead == 0
    assert len(rows) == len(HOSTILE_LINES)
    by_message = {r["message"][:40]: r for r in rows}
    assert "plain text with a \ufffd NUL byte" in by_message
    assert "invalid UTF-8 \ufffd\ufffd \ufffd( here" in by_message
    escaped = by_message["escaped \ufffd NUL"]
    assert orjson.loads(escaped["meta"]) == {"k\ufffd": "v\ufffd"}
    long_row = next(r for r in rows if r["message"].startswith("xxxx"))
    assert len(long_row["message"]) == 1_048_576
    assert orjson.loads(long_row["meta"])["truncated"] is True
    assert rows[-1]["message"] == "after the long line"
    absurd = next(r for r in rows if r["message"] == "absurd timestamp")
    assert absurd["level"] == "ERROR"
    assert "original_ts" in orjson.loads(absurd["meta"])


async def test_backfill_shows_progress_on_a_terminal(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    """--exit-on-eof with stderr on a real pseudo-terminal draws bytes done/total and lines/s."""
    import os
    import pty

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.log").write_bytes(b"".join(schema_line(i) for i in range(20_000)))
    config = write_config(
        tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema, files={"a": [str(logs / "*.log")]}
    )
    controller, terminal = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "forwarder",
        "run",
        "--config",
        str(config),
        "--exit-on-eof",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    output = bytearray()

    def read_all() -> None:
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            output.extend(data)

    reader = asyncio.get_running_loop().run_in_executor(None, read_all)
    try:
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        await asyncio.wait_for(reader, 10)
    finally:
        os.close(controller)
    text = output.decode(errors="replace")
    size_mb = (logs / "a.log").stat().st_size / 1e6
    assert f"{size_mb:,.1f} / {size_mb:,.1f} MB (100.0%)" in text, text[-2000:]
    assert "20,000 rows" in text and "lines/s" in text


async def test_sighup_applies_sampling_and_alarms_and_refuses_a_broken_file(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    import os

    logs = tmp_path / "logs"
    logs.mkdir()
    config = tmp_path / "f.toml"

    def configure(threshold: int, max_rows: int, sampling: int) -> None:
        write_config(config, dsn=pg_dsn, schema=pg_schema, files={"a": [str(logs / "a.log")]},
                     max_rows=max_rows, extra=api_error_burst(threshold),
                     sampling_threshold_per_min=sampling)  # fmt: skip

    configure(threshold=5, max_rows=500, sampling=1_000_000_000)
    daemon = await Daemon(config).start()
    log = SeqLog(logs / "a.log")

    try:
        log.append(100)
        await wait_until(lambda: _count_is(pg_dsn, pg_schema, 100), what="rows before reload")
        config.write_text("[batch]\nmax_rows = 'many'\n")  # broken: refused, nothing changes
        os.kill(daemon.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        await wait_until(lambda: '"reload.refused"' in daemon.stderr(), what="the refusal")
        assert "batch.max_rows" in daemon.stderr()
        log.append(100)
        await wait_until(lambda: _count_is(pg_dsn, pg_schema, 200), what="rows after refusal")
        # sampling and alarms apply in place; batch needs a restart
        configure(threshold=7, max_rows=400, sampling=2_000_000_000)
        os.kill(daemon.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
        await wait_until(lambda: '"reload.done"' in daemon.stderr(), what="the reload")
        done = next(orjson.loads(line) for line in daemon.stderr().splitlines()
                    if '"reload.done"' in line)  # fmt: skip
        assert done["meta"]["applied"] == ["sampling", "alarms"]
        assert done["meta"]["restart_needed"] == ["batch"]
        log.append(100)
        await wait_until(lambda: _count_is(pg_dsn, pg_schema, 300), what="rows after reload")
    finally:
        code = await daemon.stop()
    assert code == 0, daemon.stderr()
    await assert_each_seq_once(pg_dsn, pg_schema, log.written)
