"""Benchmark: the forwarder's memory through a database outage, and nothing lost after it.

    python -m tests.perf.outage_rss --outage-minutes 10 --rate 1000 [--http-rate 20]

A real `forwarder run` child reaches PostgreSQL through a PgProxy (a TCP proxy this
script can cut). Writers append sequence-numbered JSON lines to a few files at --rate
lines/s in total, paced by the monotonic clock; with --http-rate a client POSTs batches
of --http-batch records that many times a second to /logs/ingest (the intake on a free
port, with a small spool_max_bytes) and counts 202 and 503 answers. The child's VmRSS
is sampled from /proc every second, the intake spool's size on disk too.

Phase 1: --baseline-seconds with the database up (baseline RSS). Phase 2: the proxy
down for --outage-minutes, writing goes on. Phase 3: the proxy up, writing goes on
until the rows stored reach the lines written before the proxy came back (catch-up
time), then writing stops and the script waits (--catchup-timeout) until every line
written and every 202-accepted record is in system_logs exactly once, by the sequence
number in meta. The database is --dsn, else $FORWARDER_TEST_DSN, else an embedded one.
Exits 1 on any loss or duplicate (or a timeout, or the child dying); no speed asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg

from tests.integration.daemon import Daemon, write_config
from tests.integration.tcp_proxy import PgProxy
from tests.support import free_port

FILE_SERVICE = "outage"
HTTP_SERVICE = "outage-http"
LEVELS = ("INFO",) * 8 + ("WARNING", "ERROR")


@dataclass
class Sample:
    t: float  # seconds since the start of phase 1
    phase: int
    rss_kib: int
    spool_bytes: int


@dataclass
class State:
    """Shared between the writers, the HTTP client and the sampler."""

    phase: int = 1
    lines_written: int = 0
    next_seq: int = 0
    http_next_seq: int = 0
    http_accepted: set[int] = field(default_factory=set)
    http_refused_503: int = 0
    http_refused_records: int = 0
    http_other: dict[str, int] = field(default_factory=dict)
    http_unknown: set[int] = field(default_factory=set)  # no answer: may or may not be stored
    samples: list[Sample] = field(default_factory=list)
    stop_writing: asyncio.Event = field(default_factory=asyncio.Event)


def vm_kib(pid: int, key: str) -> int | None:
    """VmRSS / VmHWM of `pid` in KiB, None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def folder_bytes(folder: Path) -> int:
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.name.endswith(".spool"):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size
    return total


def slope_mb_per_min(points: list[Sample]) -> float | None:
    """Least-squares slope of RSS over time, MB per minute."""
    if len(points) < 2:
        return None
    xs = [p.t / 60 for p in points]
    ys = [p.rss_kib / 1024 for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def line_for(seq: int) -> bytes:
    ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    level = LEVELS[seq % len(LEVELS)]
    return (
        b'{"ts":"%s","level":"%s","event":"outage.line","message":"line %d of the outage '
        b'benchmark","meta":{"seq":%d,"pad":"%s"}}\n'
        % (ts.encode(), level.encode(), seq, seq, b"x" * 64)
    )


async def paced(rate: float, stop: asyncio.Event, step: Callable[[int], object]) -> None:
    """Call step(n) so that the running total follows rate * elapsed (monotonic clock).

    Sleeps only to the next tick; a late tick does the missed work, so the rate does not
    drift with scheduling delays.
    """
    started = time.monotonic()
    done = 0
    tick = 0.01
    while not stop.is_set():
        due = int((time.monotonic() - started) * rate)
        if due > done:
            result = step(due - done)
            if asyncio.iscoroutine(result):
                await result
            done = due
        next_at = started + (done + 1) / rate
        await asyncio.sleep(max(0.0, min(tick, next_at - time.monotonic())))


async def file_writer(path: Path, rate: float, state: State) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:

        def write(n: int) -> None:
            seqs = range(state.next_seq, state.next_seq + n)
            state.next_seq += n
            os.write(fd, b"".join(line_for(s) for s in seqs))
            state.lines_written += n

        await paced(rate, state.stop_writing, write)
    finally:
        os.close(fd)


async def http_client(base: str, rate: float, batch: int, state: State) -> None:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as client:

        async def post(n: int) -> None:
            for _ in range(n):  # one request per due slot, one at a time
                seqs = list(range(state.http_next_seq, state.http_next_seq + batch))
                state.http_next_seq += batch
                body = [
                    {
                        "level": "info",
                        "event": "outage.http",
                        "message": f"http record {s}",
                        "meta": {"seq": s},
                    }
                    for s in seqs
                ]
                try:
                    async with client.post(f"{base}/logs/ingest", json=body) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, TimeoutError) as e:
                    state.http_unknown.update(seqs)
                    key = type(e).__name__
                    state.http_other[key] = state.http_other.get(key, 0) + 1
                    continue
                if status == 202:
                    state.http_accepted.update(seqs)
                elif status == 503:
                    state.http_refused_503 += 1
                    state.http_refused_records += batch
                else:
                    state.http_other[str(status)] = state.http_other.get(str(status), 0) + 1

        await paced(rate, state.stop_writing, post)


async def sampler(pid: int, spool: Path | None, t0: float, state: State) -> None:
    next_at = time.monotonic()
    while True:
        rss = vm_kib(pid, "VmRSS")
        if rss is None:
            return
        spool_bytes = folder_bytes(spool) if spool is not None else 0
        state.samples.append(Sample(time.monotonic() - t0, state.phase, rss, spool_bytes))
        next_at += 1.0
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def stored_count(conn: asyncpg.Connection) -> int:
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM system_logs WHERE service = ANY($1::text[])",
            [FILE_SERVICE, HTTP_SERVICE],
        )
    except asyncpg.UndefinedTableError:
        return 0


async def stored_seqs(conn: asyncpg.Connection) -> dict[str, dict[int, int]]:
    """service -> {seq: number of rows carrying it}."""
    rows = await conn.fetch(
        "SELECT service, (meta->>'seq')::bigint AS seq, count(*) AS n FROM system_logs "
        "WHERE service = ANY($1::text[]) GROUP BY 1, 2",
        [FILE_SERVICE, HTTP_SERVICE],
    )
    out: dict[str, dict[int, int]] = {FILE_SERVICE: {}, HTTP_SERVICE: {}}
    for r in rows:
        out[r["service"]][r["seq"]] = r["n"]
    return out


def mb(kib: float | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f}"


async def run(args: argparse.Namespace, dsn: str, workdir: Path) -> int:
    schema = f"outage_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    await admin.execute(f'SET search_path = "{schema}"')
    proxy = PgProxy(dsn)
    await proxy.up()
    state = State()
    daemon: Daemon | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        logs = workdir / "logs"
        logs.mkdir()
        paths = [logs / f"w{i}.log" for i in range(args.files)]
        extra = ""
        spool: Path | None = None
        base = ""
        if args.http_rate:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            extra = (
                "[http]\nenabled = true\n"
                f'listen = "127.0.0.1:{port}"\n'
                f'service = "{HTTP_SERVICE}"\n'
                "rate_per_min = 0\n"
                "retry_after_s = 1\n"
                f"spool_max_bytes = {args.spool_max_bytes}\n"
            )
            spool = workdir / "data" / "spool" / "http-http"
        config = write_config(
            workdir / "outage.toml",
            dsn=proxy.proxied_dsn(),
            schema=schema,
            files={FILE_SERVICE: [str(logs / "*.log")]},
            data_dir=workdir / "data",
            extra=extra,
        )
        daemon = await Daemon(config).start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        t0 = time.monotonic()
        tasks.append(asyncio.create_task(sampler(pid, spool, t0, state)))
        for path in paths:
            tasks.append(asyncio.create_task(file_writer(path, args.rate / args.files, state)))

        async def alive() -> None:
            if daemon.proc.returncode is not None:
                tail = "\n".join(daemon.stderr().splitlines()[-10:])
                raise SystemExit(f"forwarder exited {daemon.proc.returncode}:\n{tail}")

        # Phase 1: database up. Rows must flow before the outage counts for anything.
        deadline = time.monotonic() + 30
        while await stored_count(admin) == 0:
            await alive()
            if time.monotonic() > deadline:
                raise SystemExit("no row stored within 30 s of the start; see " + str(workdir))
            await asyncio.sleep(0.2)
        if args.http_rate:
            tasks.append(
                asyncio.create_task(http_client(base, args.http_rate, args.http_batch, state))
            )
        await asyncio.sleep(max(0.0, t0 + args.baseline_seconds - time.monotonic()))
        await alive()
        print(
            f"phase 1 done: {state.lines_written:,} lines written, "
            f"{await stored_count(admin):,} rows stored",
            flush=True,
        )

        # Phase 2: the outage.
        await proxy.down()
        state.phase = 2
        outage_start = time.monotonic()
        outage_s = args.outage_minutes * 60
        while time.monotonic() - outage_start < outage_s:
            await alive()
            await asyncio.sleep(min(10.0, outage_s - (time.monotonic() - outage_start)))
            last = state.samples[-1] if state.samples else None
            print(
                f"  outage {time.monotonic() - outage_start:6.0f} s: "
                f"{state.lines_written:,} lines written, RSS {mb(last and last.rss_kib)} MB"
                + (f", spool {last.spool_bytes:,} B" if spool and last else ""),
                flush=True,
            )

        # Phase 3: back up; writing goes on until the backlog is stored.
        written_at_up = state.lines_written + len(state.http_accepted)
        await proxy.up()
        state.phase = 3
        up_at = time.monotonic()
        catchup_s: float | None = None
        deadline = up_at + args.catchup_timeout
        while time.monotonic() < deadline:
            await alive()
            if await stored_count(admin) >= written_at_up:
                catchup_s = time.monotonic() - up_at
                break
            await asyncio.sleep(0.2)
        state.stop_writing.set()
        for task in tasks[1:]:
            await task
        expected = state.lines_written + len(state.http_accepted)
        complete = False
        while time.monotonic() < deadline:
            await alive()
            if await stored_count(admin) >= expected:
                complete = True
                break
            await asyncio.sleep(0.2)
        if complete:
            # Anything still in flight (an unanswered POST) gets a moment to land too.
            await asyncio.sleep(2)
        all_stored_s = time.monotonic() - up_at
        hwm = vm_kib(pid, "VmHWM")
        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)

        seqs = await stored_seqs(admin)
        files = seqs[FILE_SERVICE]
        lost = sum(1 for s in range(state.lines_written) if s not in files)
        dup = sum(n - 1 for n in files.values() if n > 1)
        stray = sum(1 for s in files if not 0 <= s < state.lines_written)
        http = seqs[HTTP_SERVICE]
        http_lost = sum(1 for s in state.http_accepted if s not in http)
        http_dup = sum(n - 1 for n in http.values() if n > 1)
        http_stray = sum(1 for s in http if s not in state.http_accepted)
        http_stray_unknown = sum(1 for s in http if s in state.http_unknown)

        def rss(phase: int) -> list[Sample]:
            return [s for s in state.samples if s.phase == phase]

        p1, p2, p3 = rss(1), rss(2), rss(3)
        tail = p1[len(p1) // 2 :] or p1
        baseline = sum(s.rss_kib for s in tail) / len(tail) if tail else None
        half = p2[len(p2) // 2 :]
        slope = slope_mb_per_min(p2)
        slope_half = slope_mb_per_min(half)

        print()
        print(f"outage            {args.outage_minutes:g} min at {args.rate:g} lines/s "
              f"over {args.files} files (baseline {args.baseline_seconds:g} s)")  # fmt: skip
        print(f"lines written     {state.lines_written:>12,}")
        print(f"rows stored       {len(files):>12,} distinct sequence numbers "
              f"({sum(files.values()):,} rows)")  # fmt: skip
        print(f"lost              {lost:>12,}")
        print(f"duplicated        {dup:>12,}")
        if stray:
            print(f"unexpected seqs   {stray:>12,}")
        print(f"RSS baseline      {mb(baseline):>12} MB (mean of the last half of phase 1)")
        print(f"RSS peak, outage  {mb(max((s.rss_kib for s in p2), default=None)):>12} MB")
        print(f"RSS peak, after   {mb(max((s.rss_kib for s in p3), default=None)):>12} MB "
              f"(catch-up and drain)")  # fmt: skip
        print(f"RSS high water    {mb(hwm):>12} MB (VmHWM, whole run)")
        print(
            f"RSS slope, outage "
            f"{'n/a' if slope is None else f'{slope:+.3f}':>12} MB/min (least squares, "
            f"{len(p2)} samples; second half "
            f"{'n/a' if slope_half is None else f'{slope_half:+.3f}'} MB/min)"
        )
        print(
            "catch-up          "
            + (
                f"{catchup_s:>12.1f} s (proxy up to rows >= the {written_at_up:,} written "
                "before it)"
                if catchup_s is not None
                else f"{'TIMEOUT':>12} after {args.catchup_timeout:g} s"
            )
        )
        print(f"all stored        {all_stored_s:>12.1f} s after the proxy came up"
              + ("" if complete else " (TIMEOUT: not all rows arrived)"))  # fmt: skip
        if args.http_rate:
            sent = state.http_next_seq
            print(f"HTTP records sent {sent:>12,} ({args.http_rate:g} POST/s x "
                  f"{args.http_batch} records)")  # fmt: skip
            print(f"HTTP accepted     {len(state.http_accepted):>12,} records (202)")
            print(f"HTTP refused 503  {state.http_refused_records:>12,} records "
                  f"({state.http_refused_503:,} requests)")  # fmt: skip
            if state.http_other:
                print(f"HTTP other        {state.http_other}")
            print(f"HTTP lost         {http_lost:>12,}")
            print(f"HTTP duplicated   {http_dup:>12,}")
            print(f"HTTP stored, not accepted {http_stray:,} "
                  f"({http_stray_unknown:,} of them unanswered requests)")  # fmt: skip
            peak = max((s.spool_bytes for s in state.samples), default=0)
            print(f"spool peak        {peak:>12,} B on disk (bound {args.spool_max_bytes:,})")
        code = await daemon.stop()
        print(f"forwarder exit    {code:>12}")

        bad = lost or dup or stray or http_lost or http_dup or (http_stray - http_stray_unknown)
        if bad or not complete or catchup_s is None:
            print(f"FAILED; the daemon's log is kept in {workdir}")
            args.keep = True
            return 1
        return 0
    finally:
        state.stop_writing.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if daemon is not None and daemon.proc is not None and daemon.proc.returncode is None:
            with contextlib.suppress(Exception):
                await daemon.stop()
        await proxy.down()
        if not args.keep:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage-minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=1000, help="file lines/s, all files")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--http-rate", type=float, default=0, help="POST /logs/ingest per s")
    parser.add_argument("--http-batch", type=int, default=20, help="records per POST")
    parser.add_argument("--spool-max-bytes", type=int, default=1024 * 1024)
    parser.add_argument("--baseline-seconds", type=float, default=30)
    parser.add_argument("--catchup-timeout", type=float, default=600)
    parser.add_argument("--dsn", default=os.environ.get("FORWARDER_TEST_DSN"))
    parser.add_argument("--keep", action="store_true", help="keep the schema and files")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="forwarder-outage-"))
    embedded = None
    dsn = args.dsn
    if not dsn:
        from forwarder.sinks.embedded import start_embedded

        embedded = start_embedded(workdir / "pg")
        dsn = embedded.dsn
    try:
        return asyncio.run(run(args, dsn, workdir))
    finally:
        if embedded is not None:
            embedded.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


if __name__ == "__main__":
    raise SystemExit(main())
