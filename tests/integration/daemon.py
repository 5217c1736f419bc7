"""Drive a real `forwarder run` child process from tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import orjson


def write_config(
    path: Path,
    *,
    dsn: str,
    schema: str,
    files: dict[str, list[str]],
    data_dir: Path | None = None,
    max_rows: int = 500,
    max_delay_s: float = 0.05,
    extra: str = "",
    sampling_threshold_per_min: int = 1_000_000_000,
    privacy_services: tuple[str, ...] = (),
) -> Path:
    """A TOML config with one file source per entry of `files` (name -> globs)."""
    lines = [
        "[database]",
        f"dsn = {orjson.dumps(dsn).decode()}",
        f'schema_name = "{schema}"',
        f"data_dir = {orjson.dumps(str(data_dir or path.parent / 'data')).decode()}",
        "retry_initial_backoff_s = 0.05",
        "retry_max_backoff_s = 0.5",
        "[batch]",
        f"max_rows = {max_rows}",
        f"max_delay_s = {max_delay_s}",
        "[daemon]",
        "drain_timeout_s = 20",
        "log_level = 'DEBUG'",
        "[privacy]",
        f"services = {orjson.dumps(list(privacy_services)).decode()}",
        "[sampling]",
        # These tests count every line; sampling has tests of its own.
        f"threshold_per_min = {sampling_threshold_per_min}",
    ]
    for name, globs in files.items():
        lines += [
            "[[sources]]",
            'type = "file"',
            f'name = "{name}"',
            f'service = "{name}"',
            f"paths = {orjson.dumps(globs).decode()}",
            "poll_interval_s = 0.02",
            "glob_interval_s = 0.05",
            "rotate_wait_s = 1.0",
        ]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


class Daemon:
    """One `python -m forwarder run` process; its stderr goes to a file for post-mortems.

    `stdin` is what `start` gives the child as standard input (asyncio.subprocess.PIPE:
    a pipe the test writes into through `proc.stdin`).
    """

    def __init__(self, config: Path, *args: str) -> None:
        self.config = config
        self.args = args
        self.log_path = config.parent / "forwarder.stderr"
        self.proc: asyncio.subprocess.Process | None = None
        self.env_extra: dict[str, str] = {}
        self.stdin: int = asyncio.subprocess.DEVNULL

    async def start(self) -> Daemon:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
        env.update(self.env_extra)
        with self.log_path.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "forwarder",
                "run",
                "--config",
                str(self.config),
                *self.args,
                stdin=self.stdin,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
                env=env,
            )
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        await self.wait(10)

    async def wait(self, timeout_s: float = 60) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout_s)

    async def stop(self) -> int:
        """SIGTERM and wait; kill it if it hangs (and fail the caller via the code)."""
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return await self.wait(30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.asynccontextmanager
async def connected(dsn: str, schema: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of its own to the daemon's schema, closed on leaving."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        yield conn
    finally:
        await conn.close()


async def count_rows(dsn: str, schema: str, table: str = "system_logs") -> int:
    async with connected(dsn, schema) as conn:
        try:
            return await conn.fetchval(f"SELECT count(*) FROM {table}")
        except asyncpg.UndefinedTableError:
            return 0
