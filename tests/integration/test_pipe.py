"""`python -m forwarder pipe` as a real process, with real child processes, against a
real PostgreSQL: passthrough, rows (a traceback is one row), exit statuses, signals,
stdin, and the spool when the database is unreachable or the pipe is killed (then
replayed exactly once by the next run)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest

from forwarder import pipe as pipe_module
from forwarder.config import parse_config
from forwarder.event import RawChunk
from forwarder.pipe import LineGate, PipeOptions, run_pipe, spool_folder
from forwarder.pipeline.normalize import normalize_chunk
from forwarder.sinks.spool import SpoolReader, SpoolRecord, list_segments
from tests.support import free_port, wait_until

SEQ = re.compile(r"seq=(\d+)")
# The repository root: `python -m forwarder` runs from here, as in the daemon tests.
ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, *, dsn: str, schema: str, data_dir: Path) -> Path:
    path.write_text(
        "\n".join(
            [
                "[database]",
                f"dsn = {orjson.dumps(dsn).decode()}",
                f'schema_name = "{schema}"',
                f"data_dir = {orjson.dumps(str(data_dir)).decode()}",
                "connect_timeout_s = 2",
                "retry_initial_backoff_s = 0.05",
                "retry_max_backoff_s = 0.2",
                "[batch]",
                "max_rows = 500",
                "max_delay_s = 0.05",
                "",
            ]
        )
    )
    return path


def script(tmp_path: Path, name: str, code: str) -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return [sys.executable, str(path)]


class Pipe:
    """One `python -m forwarder pipe` process, in a session of its own (no terminal, so
    SIGINT is always forwarded); stdout and stderr collected as they arrive.

    `program`: what runs instead of `-m forwarder pipe` (given the same arguments)."""

    def __init__(
        self,
        config: Path,
        service: str,
        *command: str,
        stdin: int = asyncio.subprocess.DEVNULL,
        flush_timeout: float | None = None,
        program: tuple[str, ...] = ("-m", "forwarder", "pipe"),
    ) -> None:
        self.program = program
        self.args = ["--service", service, "--config", str(config)]
        if flush_timeout is not None:
            self.args += ["--flush-timeout", str(flush_timeout)]
        if command:
            self.args += ["--", *command]
        self.stdin = stdin
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []

    async def start(self) -> Pipe:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *self.program,
            *self.args,
            stdin=self.stdin,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._collect(self.proc.stdout, self.stdout)),
            asyncio.create_task(self._collect(self.proc.stderr, self.stderr)),
        ]
        return self

    @staticmethod
    async def _collect(stream: asyncio.StreamReader, into: bytearray) -> None:
        while data := await stream.read(65536):
            into += data

    async def finish(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        try:
            async with asyncio.timeout(timeout_s):
                await self.proc.wait()
                await asyncio.gather(*self._readers)
        finally:
            self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def our_log_lines(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in self.stderr.splitlines() if _is_ours(line)]

    def child_stderr(self) -> bytes:
        """stderr without our own log lines: what the child wrote."""
        return b"".join(
            line for line in bytes(self.stderr).splitlines(keepends=True) if not _is_ours(line)
        )


def _is_ours(line: bytes) -> bool:
    if not line.startswith(b'{"ts":'):
        return False
    try:
        return orjson.loads(line).get("service") == "forwarder"
    except orjson.JSONDecodeError:
        return False


async def run_pipe_process(config: Path, service: str, *command: str, **kw: object) -> Pipe:
    pipe = await Pipe(config, service, *command, **kw).start()  # type: ignore[arg-type]
    await pipe.finish()
    return pipe


def direct(command: list[str]) -> subprocess.CompletedProcess[bytes]:
    """The child run without us: what the terminal would show."""
    return subprocess.run(command, capture_output=True, timeout=60, check=False)


async def fetch_rows(dsn: str, schema: str, service: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return await conn.fetch(
            "SELECT id, ts, level, event, message, meta::text AS meta FROM system_logs "
            "WHERE service = $1 ORDER BY id",
            service,
        )
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await conn.close()


@pytest.fixture
def config(tmp_path: Path, pg_dsn: str, pg_schema: str) -> Path:
    return write_config(tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema, data_dir=tmp_path / "d")


MIXED = """
import sys
out, err = sys.stdout.buffer, sys.stderr.buffer
for i in range(300):
    out.write(b"seq=%d out %s\\n" % (i, b"x" * (i % 50)))
    if i % 3 == 0:
        err.write(b"seq=%d err\\n" % i)
        err.flush()
out.write(b"bad utf8 \\xff\\xfe\\n")
out.write(b"crlf line\\r\\n")
out.write(b"big " + b"y" * 200000 + b"\\n")
out.write(b"no newline at the end")
"""


async def test_output_passes_through_unchanged_and_every_line_is_a_row(
    tmp_path: Path, config: Path, pg_dsn: str, pg_schema: str
) -> None:
    child = script(tmp_path, "mixed.py", MIXED)
    expected = direct(child)
    pipe = await run_pipe_process(config, "api", *child)
    assert pipe.proc is not None and pipe.proc.returncode == 0
    assert bytes(pipe.stdout) == expected.stdout  # byte for byte
    assert bytes(pipe.stderr) == expected.stderr  # and no log line of ours: all went well
    rows = await fetch_rows(pg_dsn, pg_schema, "api")
    messages = [r["message"] for r in rows]
    assert len(rows) == 300 + 100 + 4
    assert sorted(messages) == sorted(
        [f"seq={i} out " + "x" * (i % 50) for i in range(300)]
        + [f"seq={i} err" for i in range(0, 300, 3)]
        + ["bad utf8 \ufffd\ufffd", "crlf line", "big " + "y" * 200000, "no newline at the end"]
    )
    # Lines of one stream keep their order.
    outs = [
        int(m.group(1)) for r in rows if (m := SEQ.match(r["message"])) and "out" in r["message"]
    ]
    assert outs == list(range(300))
    assert not list_segments(spool_folder(tmp_path / "d", "api"))  # acknowledged, deleted


async def test_rows_say_which_stream_they_came_from(
    tmp_path: Path, config: Path, pg_dsn: str, pg_schema: str
) -> None:
    probe = RawChunk("s", "svc", [b"x"], line_meta=[{"stream": "stderr"}])
    if "stream" not in normalize_chunk(probe, datetime.now(UTC))[0].meta:
        pytest.xfail("pipeline/normalize.py does not apply RawChunk.line_meta yet")
    child = script(tmp_path, "two.py", MIXED)
    await run_pipe_process(config, "api", *child)
    rows = await fetch_rows(pg_dsn, pg_schema, "api")
    streams = {r["message"]: orjson.loads(r["meta"]).get("stream") for r in rows}
    assert streams["seq=3 err"] == "stderr"
    assert streams["seq=3 out xxx"] == "stdout"


async def test_a_progress_bar_without_newline_shows_while_the_child_runs(
    tmp_path: Path, config: Path, pg_dsn: str, pg_schema: str
) -> None:
    child = script(
        tmp_path,
        "progress.py",
        """
        import sys
        sys.stdout.write("progress 50%")
        sys.stdout.flush()
        sys.stdin.readline()  # the test says go once it saw the bar
        sys.stdout.write("\\rprogress 100%\\n")
        """,
    )
    pipe = await Pipe(config, "cli", *child, stdin=asyncio.subprocess.PIPE).start()
    try:
        await wait_until(lambda: b"progress 50%" in pipe.stdout, what="the bar on our stdout")
        assert pipe.proc is not None and pipe.proc.returncode is None
        assert pipe.proc.stdin is not None
        pipe.proc.stdin.write(b"go\n")
        await pipe.proc.stdin.drain()
        pipe.proc.stdin.close()
        assert await pipe.finish() == 0
    finally:
        pipe.kill()
    assert bytes(pipe.stdout) == b"progress 50%\rprogress 100%\n"
    rows = await fetch_rows(pg_dsn, pg_schema, "cli")
    assert [r["message"] for r in rows] == ["progress 50%\rprogress 100%"]


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("sys.exit(0)", 0),
        ("sys.exit(3)", 3),
        ("os.kill(os.getpid(), signal.SIGTERM); signal.pause()", 128 + signal.SIGTERM),
    ],
)
async def test_exit_status_is_the_childs(
    tmp_path: Path, config: Path, pg_dsn: str, pg_schema: str, code: str, status: int
) -> None:
    child = script(
        tmp_path, "exit.py", f"import os, signal, sys\nprint('before exit', flush=True)\n{code}\n"
    )
    pipe = await run_pipe_process(config, "job", *child)
    assert pipe.proc is not None and pipe.proc.returncode == status
    assert bytes(pipe.stdout) == b"before exit\n"
    assert [r["message"] for r in await fetch_rows(pg_dsn, pg_schema, "job")] == ["before exit"]


async def test_a_command_that_does_not_exist_exits_127(tmp_path: Path, config: Path) -> None:
    pipe = await run_pipe_process(config, "job", str(tmp_path / "no-such-program"))
    assert pipe.proc is not None and pipe.proc.returncode == 127
    assert b"command not found" in pipe.stderr


TRAP = """
import signal, sys
def on(signum, frame):
    print(f"child got {signal.Signals(signum).name}", flush=True)
    sys.exit(7)
signal.signal(signal.SIGINT, on)
signal.signal(signal.SIGTERM, on)
print("ready", flush=True)
while True:
    signal.pause()
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_sigint_and_sigterm_are_forwarded_to_the_child(
    tmp_path: Path, config: Path, pg_dsn: str, pg_schema: str, signum: signal.Signals
) -> None:
    child = script(tmp_path, "trap.py", TRAP)
    pipe = await Pipe(config, "api", *child).start()
    try:
        await wait_until(lambda: b"ready\n" in pipe.stdout, what="the child's handlers")
        assert pipe.proc is not None
        pipe.proc.send_signal(signum)  # to the forwarder only, not to its process group
        assert await pipe.finish() == 7
    finally:
        pipe.kill()
    assert bytes(pipe.stdout) == f"ready\nchild got {signum.name}\n".encode()
    rows = await fetch_rows(pg_dsn, pg_schema, "api")
    assert [r["message"] for r in rows] == ["ready", f"child got {signum.name}"]


async def test_a_child_killed_by_the_forwarded_sigterm_exits_143(
    tmp_path: Path, config: Path, pg_dsn: str, pg_schema: str
) -> None:
    child = script(
        tmp_path, "sleep.py", "import signal\nprint('ready', flush=True)\nsignal.pause()\n"
    )
    pipe = await Pipe(config, "api", *child).start()
    try:
        await wait_until(lambda: b"ready\n" in pipe.stdout, what="the child")
        assert pipe.proc is not None
        pipe.proc.send_signal(signal.SIGTERM)
        assert await pipe.finish() == 143
    finally:
        pipe.kill()
    assert [r["message"] for r in await fetch_rows(pg_dsn, pg_schema, "api")] == ["ready"]


def meta_of(row: asyncpg.Record) -> dict[str, object]:
    meta: dict[str, object] = orjson.loads(row["meta"])
    return meta


async def test_a_traceback_is_one_error_row(
    tmp_path: Path, config: Path, pg_dsn: str, pg_schema: str
) -> None:
    child = script(
        tmp_path,
        "crash.py",
        """
        import logging
        logging.basicConfig(level=logging.INFO)
        log = logging.getLogger("app")
        log.info("starting")
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("division failed")
        def handler():
            raise KeyError("missing")
        handler()
        """,
    )
    expected = direct(child)
    pipe = await run_pipe_process(config, "worker", *child)
    assert pipe.proc is not None and pipe.proc.returncode == 1
    assert bytes(pipe.stderr) == expected.stderr
    lines = expected.stderr.decode().splitlines()
    assert lines[:3] == [
        "INFO:app:starting",
        "ERROR:app:division failed",
        "Traceback (most recent call last):",
    ]
    second = lines.index("Traceback (most recent call last):", 3)
    assert lines[second - 1] == "ZeroDivisionError: division by zero"
    assert lines[-1] == "KeyError: 'missing'"
    rows = await fetch_rows(pg_dsn, pg_schema, "worker")
    # The logged exception joins its message line; the uncaught one stands alone.
    assert (
        [(r["level"], r["message"]) for r in rows]
        == [
            ("INFO", "starting"),  # "INFO:app:starting" parsed
            ("ERROR", "\n".join(["division failed", *lines[2:second]])),
            ("ERROR", "\n".join(lines[second:])),
        ]
    )
    assert [meta_of(r) for r in rows] == [
        {"stream": "stderr", "logger": "app"},
        {
            "stream": "stderr",
            "logger": "app",
            "multiline": second - 1,
            "exc_type": "ZeroDivisionError",
            "exc_message": "division by zero",
        },
        {
            "stream": "stderr",
            "multiline": len(lines) - second,
            "exc_type": "KeyError",
            "exc_message": "'missing'",
        },
    ]
    assert rows[2]["event"] == "exception"


async def test_a_traceback_on_stderr_between_stdout_lines_is_one_row(
    tmp_path: Path, config: Path, pg_dsn: str, pg_schema: str
) -> None:
    """stdout lines before and after a logger.exception on stderr: the traceback is one
    row of its own stream. (A stdout line printed while the traceback is being written
    would split it: grouping is sequential, see pipe.py.)"""
    child = script(
        tmp_path,
        "api.py",
        """
        import json, logging, sys
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        log = logging.getLogger("api")
        for i in range(3):
            print(f"seq={i} before", flush=True)
        def load(raw):
            return json.loads(raw)["user"]
        try:
            load('{"id": 1}')
        except KeyError:
            log.exception("request failed")
        sys.stdin.readline()  # the test says go once the traceback is in the spool
        for i in range(3, 6):
            print(f"seq={i} after", flush=True)
        """,
    )
    folder = spool_folder(tmp_path / "d", "api")
    pipe = await Pipe(config, "api", *child, stdin=asyncio.subprocess.PIPE).start()
    try:

        def spooled() -> bool:
            records: list[SpoolRecord] = []
            with contextlib.suppress(FileNotFoundError):
                records = SpoolReader(folder).read(None, max_records=10_000).records
            return any(r.data == b"KeyError: 'user'" for r in records)

        await wait_until(spooled, what="the whole traceback in the spool")
        assert pipe.proc is not None and pipe.proc.stdin is not None
        pipe.proc.stdin.write(b"go\n")
        await pipe.proc.stdin.drain()
        pipe.proc.stdin.close()
        assert await pipe.finish() == 0
    finally:
        pipe.kill()
    assert bytes(pipe.stdout) == b"".join(
        b"seq=%d %s\n" % (i, b"before" if i < 3 else b"after") for i in range(6)
    )
    stderr = pipe.stderr.decode()
    head, _, _ = stderr.partition("\n")
    assert head.endswith(" ERROR api: request failed")
    rows = await fetch_rows(pg_dsn, pg_schema, "api")
    outs = [r for r in rows if meta_of(r)["stream"] == "stdout"]
    assert [r["message"] for r in outs] == [f"seq={i} before" for i in range(3)] + [
        f"seq={i} after" for i in range(3, 6)
    ]
    assert all(r["level"] == "INFO" and meta_of(r) == {"stream": "stdout"} for r in outs)
    (error,) = [r for r in rows if meta_of(r)["stream"] == "stderr"]
    assert error["level"] == "ERROR"
    assert error["message"] == "request failed\n" + stderr.rstrip("\n").partition("\n")[2]
    assert error["message"].endswith("KeyError: 'user'")
    meta = meta_of(error)
    assert (meta["exc_type"], meta["exc_message"]) == ("KeyError", "'user'")
    assert meta["multiline"] == stderr.count("\n")
    assert len(rows) == 7
    assert not list_segments(folder)


async def test_a_held_traceback_is_written_after_the_flush_timeout_while_the_child_runs(
    tmp_path: Path, config: Path, pg_dsn: str, pg_schema: str
) -> None:
    """Nothing follows the traceback (the child waits): after flush_timeout_s (1s, the
    file source's default) it is released all the same."""
    child = script(
        tmp_path,
        "stuck.py",
        """
        import logging, sys
        logging.basicConfig()
        try:
            int("x")
        except ValueError:
            logging.getLogger("job").exception("parsing failed")
        sys.stdin.readline()
        """,
    )
    pipe = await Pipe(config, "job", *child, stdin=asyncio.subprocess.PIPE).start()
    try:

        async def written() -> bool:
            return len(await fetch_rows(pg_dsn, pg_schema, "job")) == 1

        await wait_until(written, what="the traceback's row while the child waits")
        assert pipe.proc is not None and pipe.proc.returncode is None
        assert pipe.proc.stdin is not None
        pipe.proc.stdin.close()
        assert await pipe.finish() == 0
    finally:
        pipe.kill()
    (row,) = await fetch_rows(pg_dsn, pg_schema, "job")
    assert row["level"] == "ERROR"
    assert row["message"].startswith("parsing failed\nTraceback (most recent call last):\n")
    assert row["message"].endswith("\nValueError: invalid literal for int() with base 10: 'x'")
    assert meta_of(row)["exc_type"] == "ValueError"


# `forwarder pipe` as the CLI runs it, but with the longest flush timeout (60s, which
# the test's waits never reach): a traceback it holds stays held until the kill,
# however slow the machine.
HOLDING_PIPE = """
import argparse, asyncio, sys
from pathlib import Path
from forwarder.config import MultilineConfig, load_config
from forwarder.pipe import LineGate, PipeOptions, install_logging, run_pipe
parser = argparse.ArgumentParser()
parser.add_argument("--service")
parser.add_argument("--config", type=Path)
parser.add_argument("command", nargs=argparse.REMAINDER)
args = parser.parse_args()
settings = load_config(args.config)
gate = LineGate(sys.stderr.fileno())
install_logging(gate)
options = PipeOptions(
    service=args.service,
    command=tuple(args.command[1:]),
    multiline=MultilineConfig(flush_timeout_s=60),  # the most it may be
)
sys.exit(asyncio.run(run_pipe(settings, options, stderr_gate=gate)))
"""


EXC_LINE = b"ValueError: invalid literal for int() with base 10: 'x'"


async def test_kill_9_while_a_traceback_is_held_then_the_next_run_writes_it_once_whole(
    tmp_path: Path, config: Path, pg_dsn: str, pg_schema: str
) -> None:
    child = script(
        tmp_path,
        "fails.py",
        """
        import logging, signal, sys
        logging.basicConfig()
        print("seq=0 before", file=sys.stderr, flush=True)
        try:
            int("x")
        except ValueError:
            logging.getLogger("job").exception("parsing failed")
        signal.pause()
        """,
    )
    holding = tmp_path / "holding_pipe.py"
    holding.write_text(HOLDING_PIPE)
    folder = spool_folder(tmp_path / "d", "job")
    pipe = await Pipe(config, "job", *child, program=(str(holding),)).start()
    try:

        async def before_written() -> bool:
            rows = await fetch_rows(pg_dsn, pg_schema, "job")
            return [r["message"] for r in rows] == ["seq=0 before"]

        def traceback_spooled() -> bool:
            records = SpoolReader(folder).read(None, max_records=10_000).records
            return bool(records) and records[-1].data == EXC_LINE

        # "seq=0 before" is released by the next line, the message line, which the
        # grouper then holds with its traceback.
        await wait_until(before_written, what="the line before the traceback committed")
        await wait_until(traceback_spooled, what="the whole traceback in the spool")
        assert pipe.proc is not None
        os.killpg(pipe.proc.pid, signal.SIGKILL)  # the pipe and its child
        await pipe.finish()
    finally:
        pipe.kill()
    # The traceback was held: nothing of it was committed.
    assert [r["message"] for r in await fetch_rows(pg_dsn, pg_schema, "job")] == ["seq=0 before"]
    spooled = SpoolReader(folder).read(None, max_records=10_000).records
    assert [r.data for r in spooled[:3]] == [
        b"seq=0 before",
        b"ERROR:job:parsing failed",
        b"Traceback (most recent call last):",
    ]

    again = await run_pipe_process(config, "job", sys.executable, "-c", "pass")
    assert again.proc is not None and again.proc.returncode == 0
    rows = await fetch_rows(pg_dsn, pg_schema, "job")
    assert [r["message"] for r in rows] == [
        "seq=0 before",
        "\n".join(["parsing failed", *(r.data.decode() for r in spooled[2:])]),
    ]
    assert rows[1]["level"] == "ERROR"
    meta = meta_of(rows[1])
    assert meta["exc_type"] == "ValueError" and meta["multiline"] == len(spooled) - 1
    assert not list_segments(folder)

    third = await run_pipe_process(config, "job", sys.executable, "-c", "pass")
    assert third.proc is not None and third.proc.returncode == 0
    assert len(await fetch_rows(pg_dsn, pg_schema, "job")) == 2


async def test_stdin_is_forwarded_and_copied_to_stdout(
    tmp_path: Path, config: Path, pg_dsn: str, pg_schema: str
) -> None:
    data = b"".join(b"seq=%d from stdin\n" % i for i in range(200)) + b"\xff last, no newline"
    pipe = await Pipe(config, "shell", stdin=asyncio.subprocess.PIPE).start()
    try:
        assert pipe.proc is not None and pipe.proc.stdin is not None
        pipe.proc.stdin.write(data)
        await pipe.proc.stdin.drain()
        pipe.proc.stdin.close()
        assert await pipe.finish() == 0
    finally:
        pipe.kill()
    assert bytes(pipe.stdout) == data
    rows = await fetch_rows(pg_dsn, pg_schema, "shell")
    assert [r["message"] for r in rows] == [f"seq={i} from stdin" for i in range(200)] + [
        "\ufffd last, no newline"
    ]


async def test_stdin_mode_stops_on_sigint_after_forwarding_what_it_read(
    tmp_path: Path, config: Path, pg_dsn: str, pg_schema: str
) -> None:
    pipe = await Pipe(config, "shell", stdin=asyncio.subprocess.PIPE).start()
    try:
        assert pipe.proc is not None and pipe.proc.stdin is not None
        pipe.proc.stdin.write(b"".join(b"seq=%d\n" % i for i in range(10)))
        await pipe.proc.stdin.drain()

        async def ten_rows() -> bool:
            return len(await fetch_rows(pg_dsn, pg_schema, "shell")) == 10

        await wait_until(ten_rows, what="10 rows while stdin is still open")
        pipe.proc.send_signal(signal.SIGINT)
        assert await pipe.finish() == 130
    finally:
        pipe.kill()


CHATTY = """
import sys
first, last, status = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for i in range(first, last):
    stream = sys.stdout if i % 2 else sys.stderr
    print(f"seq={i} line", file=stream, flush=True)
sys.exit(status)
"""


async def test_database_unreachable_then_the_next_run_writes_each_line_once(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    data_dir = tmp_path / "d"
    down = write_config(
        tmp_path / "down.toml",
        dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/test",
        schema=pg_schema,
        data_dir=data_dir,
    )
    up = write_config(tmp_path / "up.toml", dsn=pg_dsn, schema=pg_schema, data_dir=data_dir)
    child = script(tmp_path, "chatty.py", CHATTY)

    # 1. No database: the child runs and prints as usual, its status is ours, the lines wait.
    expected = direct([*child, "0", "500", "3"])
    first = await run_pipe_process(down, "api", *child, "0", "500", "3", flush_timeout=0.5)
    assert first.proc is not None and first.proc.returncode == 3
    assert bytes(first.stdout) == expected.stdout
    assert first.child_stderr() == expected.stderr  # our log lines are whole lines apart
    events = {line["event"] for line in first.our_log_lines()}
    assert "pipe.left_in_spool" in events
    assert all(line["level"] in ("WARNING", "ERROR") for line in first.our_log_lines())
    folder = spool_folder(data_dir, "api")
    assert list_segments(folder)
    assert len(SpoolReader(folder).read(None, max_records=10_000).records) == 500

    # 2. The database is back: the waiting lines go first, then the new ones.
    between = datetime.now(UTC)
    second = await run_pipe_process(up, "api", *child, "500", "600", "0")
    assert second.proc is not None and second.proc.returncode == 0
    assert not second.our_log_lines()
    rows = await fetch_rows(pg_dsn, pg_schema, "api")
    seqs = [int(SEQ.match(r["message"]).group(1)) for r in rows]  # type: ignore[union-attr]
    assert sorted(seqs) == list(range(600))  # each line exactly once
    replayed = [r["id"] for r in rows if int(SEQ.match(r["message"]).group(1)) < 500]  # type: ignore[union-attr]
    new = [r["id"] for r in rows if int(SEQ.match(r["message"]).group(1)) >= 500]  # type: ignore[union-attr]
    assert max(replayed) < min(new)
    # A replayed line keeps the time it was received (the spool's "t"), not the replay's.
    assert all(r["ts"] < between for r in rows if r["id"] in set(replayed))
    assert all(r["ts"] > between for r in rows if r["id"] in set(new))
    assert not list_segments(folder)

    # 3. Nothing is written twice by a later run.
    third = await run_pipe_process(up, "api", sys.executable, "-c", "pass")
    assert third.proc is not None and third.proc.returncode == 0
    assert len(await fetch_rows(pg_dsn, pg_schema, "api")) == 600


async def test_kill_9_of_the_pipe_then_the_next_run_writes_each_spooled_line_once(
    tmp_path: Path, config: Path, pg_dsn: str, pg_schema: str
) -> None:
    child = script(
        tmp_path,
        "forever.py",
        """
        import itertools
        for i in itertools.count():
            print(f"seq={i} tick", flush=True)
        """,
    )
    pipe = await Pipe(config, "loop", *child).start()
    try:

        async def some_rows() -> bool:
            return len(await fetch_rows(pg_dsn, pg_schema, "loop")) >= 2000

        await wait_until(some_rows, what="2000 rows committed")
        assert pipe.proc is not None
        os.killpg(pipe.proc.pid, signal.SIGKILL)  # the pipe and its child, mid-flight
        await pipe.finish()
    finally:
        pipe.kill()
    again = await run_pipe_process(config, "loop", sys.executable, "-c", "pass")
    assert again.proc is not None and again.proc.returncode == 0
    rows = await fetch_rows(pg_dsn, pg_schema, "loop")
    seqs = [int(SEQ.match(r["message"]).group(1)) for r in rows]  # type: ignore[union-attr]
    # Every line that reached the spool, once: a gapless prefix of what the child printed
    # (lines still in our pipe buffers at the kill were never durable).
    assert sorted(seqs) == list(range(len(seqs))) and len(seqs) >= 2000


async def test_a_second_pipe_of_the_same_service_is_refused(tmp_path: Path, config: Path) -> None:
    child = script(tmp_path, "wait.py", "import sys\nprint('up', flush=True)\nsys.stdin.read()\n")
    first = await Pipe(config, "api", *child, stdin=asyncio.subprocess.PIPE).start()
    try:
        await wait_until(lambda: b"up\n" in first.stdout, what="the first pipe's child")
        second = await run_pipe_process(config, "api", sys.executable, "-c", "print('never')")
        assert second.proc is not None and second.proc.returncode == 75
        assert second.stdout == b""
        assert "another `forwarder pipe --service api`" in second.stderr.decode()
        assert first.proc is not None and first.proc.stdin is not None
        first.proc.stdin.close()
        assert await first.finish() == 0
    finally:
        first.kill()


async def test_full_spool_drops_lines_but_every_line_still_shows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In process, with a tiny spool and no database: the child's output is complete,
    the spool holds a gapless prefix within its bound, the rest is counted and warned."""
    settings = parse_config(
        {
            "database": {
                "dsn": f"postgresql://postgres@127.0.0.1:{free_port()}/test",
                "data_dir": str(tmp_path / "d"),
                "retry_initial_backoff_s": 0.05,
            }
        }
    )
    child = script(
        tmp_path,
        "flood.py",
        "for i in range(5000):\n    print(f'seq={i} ' + 'f' * 50)\n",
    )
    out_path, err_path = tmp_path / "out", tmp_path / "err"
    out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT)
    err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT)
    options = PipeOptions(
        service="flood",
        command=tuple(child),
        flush_timeout_s=0.2,
        spool_max_bytes=64 * 1024,
        spool_segment_bytes=16 * 1024,
        buffer_bytes=1024 * 1024,  # the spool's bound is what stops spooling here
        stdout_fd=out_fd,
        stderr_fd=err_fd,
    )
    try:
        status = await run_pipe(settings, options, stderr_gate=LineGate(err_fd))
    finally:
        os.close(out_fd)
        os.close(err_fd)
    assert status == 0
    assert out_path.read_bytes() == b"".join(f"seq={i} {'f' * 50}\n".encode() for i in range(5000))
    folder = spool_folder(tmp_path / "d", "flood")
    spooled = SpoolReader(folder).read(None, max_records=10_000).records
    sizes = sum((folder / f"{s:012d}.spool").stat().st_size for s in list_segments(folder))
    assert sizes <= 64 * 1024
    seqs = [int(SEQ.match(r.data.decode()).group(1)) for r in spooled]  # type: ignore[union-attr]
    assert 0 < len(seqs) < 5000 and seqs == list(range(len(seqs)))
    assert sizes > 64 * 1024 - 2 * 16 * 1024  # it was full, not merely slow
    warnings = [r.getMessage() for r in caplog.records if r.name == "forwarder.pipe"]
    assert any("is full" in m for m in warnings), (len(seqs), warnings)
    assert any(
        m.startswith(f"{5000 - len(seqs)} lines were shown but not forwarded") for m in warnings
    ), (len(seqs), warnings)


# --- Ctrl-C in a terminal ------------------------------------------------------------------

# Makes the pseudo-terminal on fd 0 the controlling terminal of a new session, then runs
# `python ARGS...` in it: a shell's foreground job, as when a developer presses Ctrl-C.
WITH_TERMINAL = (
    "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)

COUNT_SIGINT = """
import signal, sys
n = 0
def on(signum, frame):
    global n
    n += 1
    print(f"got SIGINT {n}", flush=True)
signal.signal(signal.SIGINT, on)
print("ready", flush=True)
sys.stdin.readline()
sys.exit(n)
"""


async def test_ctrl_c_in_a_terminal_reaches_the_child_once(
    tmp_path: Path, config: Path, pg_dsn: str, pg_schema: str
) -> None:
    """The terminal sends SIGINT to the whole foreground group, the child included:
    forwarding it as well would make it arrive twice (uvicorn, a REPL: a hard exit)."""
    child = script(tmp_path, "count.py", COUNT_SIGINT)
    master, slave = os.openpty()
    output = bytearray()

    def read_terminal() -> None:
        with contextlib.suppress(OSError):  # EIO once every process let go of the pty
            while data := os.read(master, 4096):
                output.extend(data)

    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WITH_TERMINAL,
        "-m",
        "forwarder",
        "pipe",
        "--service",
        "tty",
        "--config",
        str(config),
        "--",
        *child,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=ROOT,
        env=env,
    )
    os.close(slave)
    reader = asyncio.get_running_loop().run_in_executor(None, read_terminal)
    try:
        await wait_until(lambda: b"ready" in output, what="the child under the terminal")
        os.write(master, b"\x03")  # Ctrl-C
        await wait_until(lambda: b"got SIGINT 1" in output, what="the child's handler")
        os.write(master, b"quit\n")
        async with asyncio.timeout(60):
            assert await proc.wait() == 1, bytes(output)  # 2 if it got a forwarded copy
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(master)
        await reader
    rows = await fetch_rows(pg_dsn, pg_schema, "tty")
    assert [r["message"] for r in rows] == ["ready", "got SIGINT 1"]


# --- the pieces, in process ----------------------------------------------------------------


def test_our_log_lines_wait_for_the_childs_newline(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        gate = LineGate(fd, hold_s=60)
        gate.passthrough(b"downloading 40%")
        gate.log_line(b'{"ours": 1}\n')  # the child is mid-line: it waits
        assert path.read_bytes() == b"downloading 40%"
        gate.passthrough(b"\rdownloading 100%\n")
        gate.log_line(b'{"ours": 2}\n')  # at a line start: at once
        gate.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == (b'downloading 40%\rdownloading 100%\n{"ours": 1}\n{"ours": 2}\n')


async def test_a_line_the_child_leaves_open_gets_our_newline_after_a_while(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stderr"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        gate = LineGate(fd, hold_s=0.05)
        gate.passthrough(b"50%")
        gate.log_line(b'{"ours": 1}\n')
        await wait_until(lambda: path.read_bytes() == b'50%\n{"ours": 1}\n', what="our line")
        gate.passthrough(b" 60%\n")
        gate.close()
    finally:
        os.close(fd)
    assert path.read_bytes() == b'50%\n{"ours": 1}\n 60%\n'


async def test_chunks_carry_stream_receipt_time_and_the_spool_position(
    tmp_path: Path, pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What pipe.py hands the pipeline, whatever normalize does with it."""
    seen: list[RawChunk] = []

    class Recording(pipe_module.NormalizeStage):
        async def run(self, inp, out):  # type: ignore[no-untyped-def]
            tee: asyncio.Queue[object] = asyncio.Queue(1)

            async def record() -> None:
                while True:
                    item = await inp.get()
                    if isinstance(item, RawChunk):
                        seen.append(item)
                    await tee.put(item)
                    if not isinstance(item, RawChunk):
                        return

            async with asyncio.TaskGroup() as tg:
                tg.create_task(record())
                tg.create_task(super().run(tee, out))  # type: ignore[arg-type]

    monkeypatch.setattr(pipe_module, "NormalizeStage", Recording)
    settings = parse_config(
        {
            "database": {"dsn": pg_dsn, "schema_name": pg_schema, "data_dir": str(tmp_path)},
            "batch": {"max_delay_s": 0.05},
        }
    )
    child = script(tmp_path, "mixed.py", MIXED)
    before = datetime.now(UTC)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        options = PipeOptions(service="api", command=tuple(child), stdout_fd=null, stderr_fd=null)
        assert await run_pipe(settings, options, stderr_gate=LineGate(null)) == 0
    finally:
        os.close(null)
    lines = [(c, i) for c in seen for i in range(len(c.lines))]
    assert len(lines) == 404
    streams = {c.lines[i]: c.line_meta[i] for c, i in lines}  # type: ignore[index]
    assert streams[b"seq=3 err"] == {"stream": "stderr"}
    assert streams[b"seq=3 out xxx"] == {"stream": "stdout"}
    assert all(before <= c.times[i] <= datetime.now(UTC) for c, i in lines)  # type: ignore[index]
    big = next(c for c, i in lines if c.lines[i].startswith(b"big "))
    assert not big.truncated
    offsets = [c.position.offset for c in seen if c.position is not None]
    assert offsets == sorted(offsets) and len(offsets) == len(seen)
    last = seen[-1].position
    assert last is not None and (last.source, last.stream) == ("pipe:api", "spool")
    assert set(last.detail) == {"segment", "byte", "spool"}
