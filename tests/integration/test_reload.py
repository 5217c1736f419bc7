"""SIGHUP changes the source list of a running daemon without losing or repeating a line."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import asyncpg
import orjson

from tests.integration.daemon import Daemon, write_config
from tests.support import free_port, wait_until


class Writers:
    """Appends numbered text lines round-robin to several files, one counter for all."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths
        self.written: dict[str, int] = dict.fromkeys(paths, 0)
        self.seq = 0

    def append(self, lines_per_file: int) -> None:
        for name, path in self.paths.items():
            with path.open("ab") as f:
                for _ in range(lines_per_file):
                    f.write(f"INFO reload line {self.seq} file {name}\n".encode())
                    self.seq += 1
            self.written[name] += lines_per_file

    async def run(self, stop: asyncio.Event) -> None:
        """Keep appending while the daemon reloads: lines arrive during every switch."""
        while not stop.is_set():
            self.append(5)
            await asyncio.sleep(0.005)  # pacing of a producer, not a wait for a result


def source(name: str, path: Path, service: str, **extra: str) -> str:
    lines = [
        "[[sources]]",
        'type = "file"',
        f'name = "{name}"',
        f'service = "{service}"',
        f"paths = [{orjson.dumps(str(path)).decode()}]",
        "poll_interval_s = 0.02",
        "glob_interval_s = 0.05",
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    return "\n".join(lines) + "\n"


async def rows(dsn: str, schema: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return await conn.fetch("SELECT service, message FROM system_logs")
    except asyncpg.UndefinedTableError:
        return []
    finally:
        await conn.close()


async def stored(dsn: str, schema: str) -> int:
    return len(await rows(dsn, schema))


def reloads_done(daemon: Daemon) -> list[dict]:
    return [
        orjson.loads(line)
        for line in daemon.stderr().splitlines()
        if '"reload.done"' in line or '"reload.refused"' in line
    ]


async def sighup(daemon: Daemon, reloads_before: int) -> dict:
    daemon.signal(signal.SIGHUP)
    await wait_until(lambda: len(reloads_done(daemon)) > reloads_before, what="the reload")
    return reloads_done(daemon)[-1]


async def test_sources_are_added_removed_and_changed_without_losing_or_repeating_a_line(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    paths = {name: logs / f"{name}.log" for name in ("a", "b", "c")}
    for path in paths.values():
        path.touch()
    config = tmp_path / "f.toml"

    def configure(*sources: str) -> None:
        write_config(config, dsn=pg_dsn, schema=pg_schema, files={}, extra="".join(sources))

    a = source("a", paths["a"], "alpha")
    b = source("b", paths["b"], "beta")
    c = source("c", paths["c"], "gamma")
    configure(a, b)  # c.log is written from the start but not yet tailed
    daemon = await Daemon(config).start()
    writers = Writers(paths)
    stop_writing = asyncio.Event()
    writing = asyncio.create_task(writers.run(stop_writing))

    async def some_rows_of(service: str) -> bool:
        return any(r["service"] == service for r in await rows(pg_dsn, pg_schema))

    try:
        await wait_until(lambda: some_rows_of("beta"), what="rows from a and b")
        # a changes (a new service name), b goes, c comes: while lines keep arriving
        configure(source("a", paths["a"], "alpha2"), c)
        done = await sighup(daemon, 0)
        assert done["meta"]["applied"] == ["sources"], done
        await wait_until(lambda: some_rows_of("alpha2"), what="a restarted with its new config")
        await wait_until(lambda: some_rows_of("gamma"), what="c added")
        b_at_removal = sum(r["service"] == "beta" for r in await rows(pg_dsn, pg_schema))
        # b comes back: it resumes where its committed position was
        configure(source("a", paths["a"], "alpha2"), b, c)
        done = await sighup(daemon, 1)
        assert done["meta"]["applied"] == ["sources"], done
        await wait_until(
            lambda: _more_of(pg_dsn, pg_schema, "beta", b_at_removal), what="b read again"
        )
        stop_writing.set()
        await writing
        total = writers.seq
        await wait_until(lambda: _stored_is(pg_dsn, pg_schema, total), what="every line stored")
    finally:
        stop_writing.set()
        with contextlib.suppress(Exception):
            await writing
        code = await daemon.stop()
    assert code == 0, daemon.stderr()
    got = await rows(pg_dsn, pg_schema)
    messages = [r["message"] for r in got]
    assert len(messages) == len(set(messages)) == writers.seq, "each line stored exactly once"
    by_file = {name: 0 for name in paths}
    for r in got:
        by_file[r["message"].rsplit(" ", 1)[1]] += 1
    assert by_file == writers.written
    log = daemon.stderr()
    assert '"reload.sources"' in log and "source b stopped (removed from the config)" in log
    assert "source a stopped (config changed)" in log


async def _more_of(dsn: str, schema: str, service: str, than: int) -> bool:
    return sum(r["service"] == service for r in await rows(dsn, schema)) > than


async def _stored_is(dsn: str, schema: str, n: int) -> bool:
    count = await stored(dsn, schema)
    assert count <= n, f"more rows than lines: {count} > {n}"
    return count == n


MISSING_SECRET = """
[notifiers.hook]
type = "webhook"
url = "http://127.0.0.1:9/hook"
hmac_secret_env = "WEBHOOK_SECRET_THAT_IS_NOT_SET"
"""


async def test_a_reload_with_a_typo_or_a_missing_secret_is_refused_and_nothing_changes(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    paths = {"a": logs / "a.log"}
    paths["a"].touch()
    config = tmp_path / "f.toml"
    write_config(config, dsn=pg_dsn, schema=pg_schema, files={},
                 extra=source("a", paths["a"], "alpha"))  # fmt: skip
    daemon = await Daemon(config).start()
    writers = Writers(paths)
    try:
        writers.append(10)
        await wait_until(lambda: _stored_is(pg_dsn, pg_schema, 10), what="first rows")
        # a typo in the new source: refused, a keeps running untouched
        write_config(config, dsn=pg_dsn, schema=pg_schema, files={},
                     extra=source("a", paths["a"], "alpha", pahts="[]"))  # fmt: skip
        done = await sighup(daemon, 0)
        assert done["event"] == "reload.refused"
        assert "sources[0].pahts" in done["message"]
        # a webhook whose secret is missing: refused as a whole, sources unchanged
        write_config(config, dsn=pg_dsn, schema=pg_schema, files={},
                     extra=source("a", paths["a"], "alpha2") + MISSING_SECRET)  # fmt: skip
        done = await sighup(daemon, 1)
        assert done["event"] == "reload.refused"
        assert "WEBHOOK_SECRET_THAT_IS_NOT_SET" in done["message"]
        writers.append(10)
        await wait_until(lambda: _stored_is(pg_dsn, pg_schema, 20), what="rows after refusals")
    finally:
        code = await daemon.stop()
    assert code == 0, daemon.stderr()
    assert {r["service"] for r in await rows(pg_dsn, pg_schema)} == {"alpha"}


async def test_a_reload_during_a_database_outage_waits_for_queued_lines_then_applies(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    """The changed source may restart only once what it queued is committed: with the
    database away, the reload waits (the other sources keep their places), then
    completes when it is back."""
    from tests.integration.tcp_proxy import PgProxy

    proxy = PgProxy(pg_dsn)
    await proxy.up()
    logs = tmp_path / "logs"
    logs.mkdir()
    paths = {name: logs / f"{name}.log" for name in ("a", "b")}
    for path in paths.values():
        path.touch()
    config = tmp_path / "f.toml"

    def configure(service_a: str) -> None:
        sources = source("a", paths["a"], service_a) + source("b", paths["b"], "beta")
        write_config(config, dsn=proxy.proxied_dsn(), schema=pg_schema, files={}, extra=sources)

    configure("alpha")
    daemon = await Daemon(config).start()
    writers = Writers(paths)
    try:
        writers.append(100)
        await wait_until(lambda: _stored_is(pg_dsn, pg_schema, 200), what="rows before outage")
        await proxy.down()
        writers.append(100)  # queued, not committed
        configure("alpha2")
        daemon.signal(signal.SIGHUP)
        await wait_until(
            lambda: "retry" in daemon.stderr() and "source a stopped" in daemon.stderr(),
            what="the outage noticed and a stopped",
        )
        assert "source a started" not in daemon.stderr()  # waits for the flush
        assert not reloads_done(daemon)
        await proxy.up()
        await wait_until(lambda: bool(reloads_done(daemon)), timeout_s=60, what="the reload")
        writers.append(100)
        await wait_until(lambda: _stored_is(pg_dsn, pg_schema, 600), timeout_s=60, what="all")
    finally:
        code = await daemon.stop()
        await proxy.down()
    assert code == 0, daemon.stderr()
    got = await rows(pg_dsn, pg_schema)
    assert len({r["message"] for r in got}) == len(got) == 600
    services = [r["service"] for r in got if r["message"].endswith("file a")]
    # lines a read before the outage are alpha's, lines written after the reload alpha2's
    assert services.count("alpha") >= 100 and services.count("alpha2") >= 100


async def test_a_sighup_during_start_up_or_the_drain_does_not_end_the_daemon(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    """SIGHUP's default action ends a process, and logrotate's postrotate may send one
    at any moment. Here start-up waits for an unreachable database (a long window)."""
    from tests.integration.tcp_proxy import PgProxy

    proxy = PgProxy(pg_dsn)
    proxy.port = free_port()  # nothing listens there until proxy.up()
    logs = tmp_path / "logs"
    logs.mkdir()
    paths = {"a": logs / "a.log"}
    paths["a"].touch()
    config = tmp_path / "f.toml"
    write_config(config, dsn=proxy.proxied_dsn(), schema=pg_schema, files={},
                 extra=source("a", paths["a"], "alpha"))  # fmt: skip
    daemon = await Daemon(config).start()
    try:
        Writers(paths).append(10)
        await wait_until(lambda: "retrying" in daemon.stderr(), what="start-up waiting")
        for _ in range(3):
            daemon.signal(signal.SIGHUP)
        await proxy.up()
        await wait_until(lambda: _stored_is(pg_dsn, pg_schema, 10), what="rows")
        assert daemon.proc is not None and daemon.proc.returncode is None
        daemon.signal(signal.SIGTERM)
        for _ in range(20):  # into the drain
            daemon.signal(signal.SIGHUP)
        code = await daemon.wait(30)
    finally:
        await daemon.stop()
        await proxy.down()
    assert code == 0, daemon.stderr()
