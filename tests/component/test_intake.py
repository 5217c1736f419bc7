"""The HTTP intake's spool and feed against real files and a real PostgreSQL: what
`accept` returned is on disk, rows commit exactly once with the spool checkpoint,
the spool is replayed after a restart, stop drains, a full spool refuses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from forwarder.alarms.privacy import Pseudonymizer
from forwarder.clock import Clock, SystemClock
from forwarder.config import Settings, parse_config
from forwarder.event import EventChunk, RawChunk
from forwarder.http_config import HttpConfig
from forwarder.intake import Intake, IntakeClosed, parse_body
from forwarder.pipeline.stage import END_OF_STREAM, EndOfStream, NormalizeStage
from forwarder.sinks.postgres import PostgresSink
from forwarder.sinks.spool import (
    CHECKPOINT_STREAM,
    START,
    SpoolFull,
    SpoolReader,
    SpoolRecord,
    list_segments,
)
from tests.support import wait_until

SOURCE = "http"


def make_settings(dsn: str, schema: str, data_dir: Path) -> Settings:
    return parse_config(
        {
            "database": {
                "dsn": dsn,
                "schema_name": schema,
                "data_dir": str(data_dir),
                "connect_timeout_s": 2,
                "retry_initial_backoff_s": 0.05,
                "retry_max_backoff_s": 0.2,
            },
            "batch": {"max_rows": 200, "max_delay_s": 0.05},
        }
    )


def body_lines(messages: list[str], level: str = "error", **extra: Any) -> list[bytes]:
    records = [{"message": m, "level": level, **extra} for m in messages]
    return parse_body(orjson.dumps(records), "json")


class Pipeline:
    """Intake -> NormalizeStage -> PostgresSink, wired as the runtime wires a source."""

    def __init__(
        self,
        intake: Intake,
        sink: PostgresSink,
        clock: Clock,
        privacy: Pseudonymizer | None = None,
    ) -> None:
        self.intake = intake
        self.sink = sink
        self.stop = asyncio.Event()
        self.raw_q: asyncio.Queue[RawChunk | EndOfStream] = asyncio.Queue(16)
        self.event_q: asyncio.Queue[EventChunk | EndOfStream] = asyncio.Queue(16)
        self.normalize = NormalizeStage(clock, privacy=privacy)
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async def sources() -> None:
            await self.intake.run(self.raw_q, self.stop)
            await self.raw_q.put(END_OF_STREAM)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(sources())
            tg.create_task(self.normalize.run(self.raw_q, self.event_q))
            tg.create_task(self.sink.run(self.event_q))

    def start(self) -> Pipeline:
        self.task = asyncio.create_task(self._run())
        return self

    async def drain(self) -> None:
        """A graceful stop: the intake feeds what it has, the sink commits it."""
        self.stop.set()
        assert self.task is not None
        async with asyncio.timeout(20):
            await self.task

    async def kill(self) -> None:
        """A crash: cancel everything wherever it is."""
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def env(pg_dsn: str, pg_schema: str, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """A factory of (settings, sink): the sink open and migrated; all closed after."""
    sinks: list[PostgresSink] = []
    settings = make_settings(pg_dsn, pg_schema, tmp_path / "data")

    async def make(**sink_kw: Any) -> tuple[Settings, PostgresSink]:
        clock = SystemClock()
        sink = PostgresSink(settings.database, settings.batch, pg_dsn, clock, **sink_kw)
        await sink.open()
        await sink.migrate(clock.now().date())
        sinks.append(sink)
        return settings, sink

    yield make
    for sink in sinks:
        await sink.aclose()


def new_intake(
    settings: Settings, sink: PostgresSink | None = None, checkpoints: Any = None, **kw: Any
) -> Intake:
    config = kw.pop("config", HttpConfig())
    return Intake(
        config,
        settings.database.data_dir,
        SystemClock(),
        checkpoints or {},
        committed=(lambda: sink.load_checkpoints(SOURCE)) if sink is not None else None,
        **kw,
    )


async def messages(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch("SELECT message FROM system_logs ORDER BY id")
    return [r["message"] for r in rows]


async def test_accept_returns_once_the_lines_are_in_the_spool(env: Any) -> None:
    settings, _ = await env()
    intake = new_intake(settings)
    try:
        lines = body_lines(["a", "b", "c"])
        accepted = await intake.accept(lines)
        assert accepted.records == 3
        # Read by a second reader, as a restarted process would: already on disk.
        batch = SpoolReader(intake.folder).read(START)
        assert [r.data for r in batch.records] == lines
        assert batch.position == accepted.position == intake.writer.position
        assert intake.status()["events_accepted"] == 3
    finally:
        intake.close()


async def test_rows_commit_exactly_once_with_the_spool_checkpoint(
    env: Any, pg_conn: asyncpg.Connection
) -> None:
    settings, sink = await env()
    intake = new_intake(settings, sink)
    pipeline = Pipeline(intake, sink, SystemClock()).start()
    expected: list[str] = []
    for n in range(5):
        batch = [f"r{n}-{i}" for i in range(7)]
        await intake.accept(body_lines(batch))
        expected += batch
    await wait_until(lambda: sink.rows_written == len(expected), what="rows committed")
    await pipeline.drain()
    intake.close()
    assert await messages(pg_conn) == expected
    rows = await pg_conn.fetch("SELECT DISTINCT service, level FROM system_logs")
    assert [tuple(r) for r in rows] == [("ui", "ERROR")]
    checkpoint = (await sink.load_checkpoints(SOURCE))[CHECKPOINT_STREAM]
    assert checkpoint.offset == intake.writer.position.offset
    assert checkpoint.detail["spool"] == intake.writer.spool_id

    # A restart from the committed checkpoint feeds nothing again; new lines once.
    again = new_intake(settings, sink, await sink.load_checkpoints(SOURCE))
    pipeline = Pipeline(again, sink, SystemClock()).start()
    await again.accept(body_lines(["after restart"]))
    await wait_until(lambda: sink.rows_written == len(expected) + 1, what="the new row")
    await pipeline.drain()
    again.close()
    assert await messages(pg_conn) == [*expected, "after restart"]


async def test_lines_spooled_while_the_database_was_away_are_written_at_start(
    env: Any, pg_conn: asyncpg.Connection
) -> None:
    settings, sink = await env()
    offline = new_intake(settings)  # accepted, never fed: the database was down
    await offline.accept(body_lines(["while down 1", "while down 2"]))
    offline.close()

    intake = new_intake(settings, sink, await sink.load_checkpoints(SOURCE))
    pipeline = Pipeline(intake, sink, SystemClock()).start()
    await wait_until(lambda: sink.rows_written == 2, what="replayed rows")
    await pipeline.drain()
    intake.close()
    assert await messages(pg_conn) == ["while down 1", "while down 2"]


async def test_a_crash_replays_only_what_was_not_committed(
    env: Any, pg_conn: asyncpg.Connection
) -> None:
    settings, sink = await env()
    intake = new_intake(settings, sink)
    pipeline = Pipeline(intake, sink, SystemClock()).start()
    await intake.accept(body_lines(["committed 1", "committed 2"]))
    await wait_until(lambda: sink.rows_written == 2, what="first rows")
    await pipeline.kill()
    # Accepted (durable, 202 sent) but the process died before feeding it.
    intake.writer.append(
        [SpoolRecord(datetime.now(UTC), "http", line) for line in body_lines(["accepted 3"])]
    )
    intake.close()

    restarted = new_intake(settings, sink, await sink.load_checkpoints(SOURCE))
    pipeline = Pipeline(restarted, sink, SystemClock()).start()
    await wait_until(lambda: sink.rows_written == 3, what="the replayed row")
    await pipeline.drain()
    restarted.close()
    assert await messages(pg_conn) == ["committed 1", "committed 2", "accepted 3"]


async def test_stop_refuses_new_requests_and_feeds_everything_accepted(
    env: Any, pg_conn: asyncpg.Connection
) -> None:
    settings, sink = await env()
    intake = new_intake(settings, sink)
    pipeline = Pipeline(intake, sink, SystemClock()).start()
    sent = [f"m{i}" for i in range(300)]
    await asyncio.gather(*(intake.accept(body_lines(sent[i : i + 30])) for i in range(0, 300, 30)))
    await pipeline.drain()  # returns only once the sink committed what was fed
    assert intake.status()["state"] == "stopped"
    with pytest.raises(IntakeClosed):
        await intake.accept(body_lines(["too late"]))
    intake.close()
    assert sorted(await messages(pg_conn)) == sorted(sent)


async def test_a_full_spool_refuses_and_writes_nothing(env: Any) -> None:
    settings, _ = await env()
    config = HttpConfig(spool_max_bytes=1024 * 1024, max_body_bytes=256 * 1024)
    intake = new_intake(settings, config=config)
    try:
        big = body_lines(["x" * 200_000])
        with pytest.raises(SpoolFull):
            for _ in range(10):
                await intake.accept(big)
        before = intake.writer.position
        with pytest.raises(SpoolFull):
            await intake.accept(big)
        assert intake.writer.position == before
        assert intake.status()["spool_full"] == 2
        assert intake.status()["events_accepted"] == 5
    finally:
        intake.close()


async def test_committed_segments_are_deleted_while_running(env: Any) -> None:
    settings, sink = await env()
    intake = new_intake(settings, sink, segment_bytes=4096)
    pipeline = Pipeline(intake, sink, SystemClock()).start()
    for n in range(40):
        await intake.accept(body_lines([f"{n}-{i}-" + "y" * 200 for i in range(5)]))
    await wait_until(lambda: sink.rows_written == 200, what="rows committed")
    assert intake.writer.bytes_appended > 40_000
    await wait_until(
        lambda: len(list_segments(intake.folder)) <= 2, what="committed segments deleted"
    )
    assert intake.writer.used_bytes < 10_000
    await pipeline.drain()
    intake.close()


async def test_user_ids_are_pseudonymized_before_they_are_stored(
    env: Any, pg_conn: asyncpg.Connection
) -> None:
    settings, sink = await env()
    privacy = Pseudonymizer(b"k" * 32, ["user_id"], ["ui"])
    intake = new_intake(settings, sink)
    pipeline = Pipeline(intake, sink, SystemClock(), privacy=privacy).start()
    await intake.accept(body_lines(["clicked"], meta={"user_id": "alice@example.com"}))
    await wait_until(lambda: sink.rows_written == 1, what="the row")
    await pipeline.drain()
    intake.close()
    meta = await pg_conn.fetchval("SELECT meta::text FROM system_logs")
    assert "alice" not in meta
    assert orjson.loads(meta)["user_id"] == privacy.token("alice@example.com")
