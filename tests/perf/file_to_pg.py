"""Benchmark: `forwarder run --exit-on-eof` against a plain PostgreSQL COPY, same run.

    python -m tests.perf.file_to_pg --lines 1000000

Generates N lines in the schema, runs the forwarder (a real child process) over them
into a fresh table, loads the same rows into an identical fresh table with a
server-side COPY from a file, and prints both rates, their ratio and the forwarder's
peak RSS. The database is --dsn, else $FORWARDER_TEST_DSN, else an embedded one.
Not a test: nothing here asserts a speed; it exits 1 only if rows are missing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson

from forwarder.config import DatabaseConfig
from forwarder.sinks.schema import migrate

SERVICES = ("api", "worker", "ui")
LEVELS = ("INFO",) * 8 + ("WARNING", "ERROR")
EVENTS = ("http.request", "cycle.done", "db.query", "cache.miss", "ui.click")


def generate(lines: int, log_path: Path, copy_path: Path, seed: int = 1) -> int:
    """Write N schema lines and the same rows in COPY text format; return bytes written."""
    rng = random.Random(seed)
    start = datetime(2026, 11, 26, tzinfo=UTC)
    with log_path.open("wb") as log, copy_path.open("wb") as copy:
        for block in range(0, lines, 10_000):
            out_log: list[bytes] = []
            out_copy: list[bytes] = []
            for i in range(block, min(block + 10_000, lines)):
                ts = (start + timedelta(milliseconds=i)).isoformat(timespec="milliseconds")
                ts = ts.replace("+00:00", "Z")
                service = SERVICES[i % 3]
                level = LEVELS[rng.randrange(len(LEVELS))]
                event = EVENTS[rng.randrange(len(EVENTS))]
                message = f"request {i} handled in {rng.randrange(1, 900)} ms"
                meta = {"seq": i, "trace_id": f"{rng.getrandbits(64):016x}", "user_id": i % 97}
                meta_json = orjson.dumps(meta)
                out_log.append(
                    b'{"ts":"%s","service":"%s","level":"%s","event":"%s","message":"%s","meta":%s}\n'
                    % (
                        ts.encode(),
                        service.encode(),
                        level.encode(),
                        event.encode(),
                        message.encode(),
                        meta_json,
                    )
                )
                out_copy.append(
                    b"\t".join(
                        (
                            ts.encode(),
                            service.encode(),
                            level.encode(),
                            event.encode(),
                            message.encode(),
                            meta_json,
                        )
                    )
                    + b"\n"
                )
            log.write(b"".join(out_log))
            copy.write(b"".join(out_copy))
    return log_path.stat().st_size


async def prepare_schema(dsn: str, name: str) -> DatabaseConfig:
    db = DatabaseConfig(schema_name=name)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
        await migrate(conn, db, date(2026, 11, 26))
    finally:
        await conn.close()
    return db


async def prepare_bare_table(dsn: str, name: str) -> None:
    """The same columns in one plain table: no partitions, no indexes (a ceiling)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
        await conn.execute(
            f'CREATE TABLE "{name}".system_logs (id bigserial, ts timestamptz not null, '
            "service text not null, level text not null, event text not null, "
            "message text not null, meta jsonb not null)"
        )
    finally:
        await conn.close()


async def drop_schema(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


async def plain_copy(dsn: str, schema: str, copy_path: Path) -> tuple[float, str]:
    """Load the rows with COPY; server-side from the file when allowed, else streamed."""
    conn = await asyncpg.connect(dsn)
    columns = "(ts, service, level, event, message, meta)"
    try:
        await conn.execute("SELECT 1")
        started = time.perf_counter()
        try:
            await conn.execute(
                f'COPY "{schema}".system_logs {columns} FROM {_literal(str(copy_path))}'
            )
            how = "server-side COPY FROM file"
        except (asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedFileError, OSError):
            started = time.perf_counter()
            await conn.copy_to_table(
                "system_logs",
                source=str(copy_path),
                schema_name=schema,
                columns=["ts", "service", "level", "event", "message", "meta"],
            )
            how = "COPY FROM STDIN streamed from the file (server cannot read it)"
        return time.perf_counter() - started, how
    finally:
        await conn.close()


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def steady_seconds(stderr: str) -> float | None:
    """Seconds from the daemon's start-up log (sources started) to its last line."""
    stamps = {}
    for line in stderr.splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        stamps.setdefault(record.get("event"), datetime.fromisoformat(record["ts"]))
    if "startup.sink" not in stamps or "shutdown.done" not in stamps:
        return None
    return (stamps["shutdown.done"] - stamps["startup.sink"]).total_seconds()


def run_forwarder(dsn: str, schema: str, log_path: Path, workdir: Path) -> tuple[float, int, str]:
    """Run the daemon as a child process; return (seconds, peak RSS in KiB, its stderr)."""
    config = workdir / "bench.toml"
    config.write_text(
        f"[database]\ndsn = {orjson.dumps(dsn).decode()}\n"
        f'schema_name = "{schema}"\n'
        f"data_dir = {orjson.dumps(str(workdir / 'data')).decode()}\n"
        '[[sources]]\ntype = "file"\nname = "bench"\nservice = "bench"\n'
        f"paths = [{orjson.dumps(str(log_path)).decode()}]\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    stderr_path = workdir / "forwarder.stderr"
    with stderr_path.open("wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "forwarder", "run", "--config", str(config), "--exit-on-eof"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = stderr_path.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(stderr.splitlines()[-5:])
        raise SystemExit(f"forwarder exited {proc.returncode}:\n{tail}")
    return elapsed, usage.ru_maxrss, stderr


async def count(dsn: str, schema: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(f'SELECT count(*) FROM "{schema}".system_logs')
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--dsn", default=os.environ.get("FORWARDER_TEST_DSN"))
    parser.add_argument("--keep", action="store_true", help="keep the schemas and files")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="forwarder-bench-"))
    os.chmod(workdir, 0o755)  # the database server reads the COPY file from here
    embedded = None
    dsn = args.dsn
    if not dsn:
        from forwarder.sinks.embedded import start_embedded

        embedded = start_embedded(workdir / "pg")
        dsn = embedded.dsn
    tag = secrets.token_hex(4)
    fw_schema, copy_schema = f"bench_fw_{tag}", f"bench_copy_{tag}"
    bare_schema = f"bench_bare_{tag}"
    try:
        log_path, copy_path = workdir / "bench.log", workdir / "bench.copy"
        size = generate(args.lines, log_path, copy_path)
        os.chmod(copy_path, 0o644)
        print(f"{args.lines:,} lines, {size / 1e6:,.1f} MB of schema JSON")
        asyncio.run(prepare_schema(dsn, copy_schema))
        asyncio.run(prepare_schema(dsn, fw_schema))

        asyncio.run(prepare_bare_table(dsn, bare_schema))

        bare_s, _ = asyncio.run(plain_copy(dsn, bare_schema, copy_path))
        print(
            f"COPY, bare table {args.lines / bare_s:>10,.0f} rows/s  ({bare_s:.2f} s, one "
            "table without partitions or indexes: for reference only)"
        )
        copy_s, how = asyncio.run(plain_copy(dsn, copy_schema, copy_path))
        copy_rate = args.lines / copy_s
        print(
            f"plain COPY       {copy_rate:>10,.0f} rows/s  ({copy_s:.2f} s, {how}, into a "
            "table identical to the forwarder's)"
        )

        fw_s, rss_kib, stderr = run_forwarder(dsn, fw_schema, log_path, workdir)
        stored = asyncio.run(count(dsn, fw_schema))
        fw_rate = args.lines / fw_s
        print(
            f"forwarder        {fw_rate:>10,.0f} lines/s ({fw_s:.2f} s, whole process "
            "from start to exit, start-up and migration included)"
        )
        print(f"ratio            {fw_rate / copy_rate:>10.2f} of plain COPY")
        steady = steady_seconds(stderr)
        if steady:
            rate = args.lines / steady
            print(
                f"after start-up   {rate:>10,.0f} lines/s ({steady:.2f} s from the daemon's "
                f"start-up log to its exit: ratio {rate / copy_rate:.2f})"
            )
        print(f"peak RSS         {rss_kib / 1024:>10.1f} MB (forwarder process)")
        if stored != args.lines:
            print(f"ERROR: {stored:,} rows stored for {args.lines:,} lines")
            return 1
        print(f"rows stored      {stored:>10,} (all lines, once)")
        return 0
    finally:
        if not args.keep:
            for schema in (fw_schema, copy_schema, bare_schema):
                asyncio.run(drop_schema(dsn, schema))
            if embedded is not None:
                embedded.stop()
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
