"""The PostgreSQL sink against a real server: exactly-once batches, dead letters, faults.

Faults are real: backends killed with pg_terminate_backend from a second connection,
and a small TCP proxy in front of the server that can cut every connection or lose
the answer to a COMMIT.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import random
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

from forwarder.clock import Clock, SystemClock
from forwarder.config import BatchConfig, DatabaseConfig
from forwarder.event import Event, EventChunk, Level, Position
from forwarder.sinks.postgres import END_OF_STREAM, EndOfStream, PostgresSink, SinkError
from tests.support import FakeClock, wait_until

DAY = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

SinkFactory = Callable[..., Awaitable[PostgresSink]]


# --- helpers ----------------------------------------------------------------------------------


def event(i: int, **kw: Any) -> Event:
    fields: dict[str, Any] = {
        "ts": DAY + timedelta(microseconds=i),
        "service": "api",
        "level": Level.WARNING if i % 3 == 0 else Level.INFO,
        "event": f"event_{i % 7}",
        "message": f"m{i}",
        "meta": {"i": i, "trace_id": f"t-{i}", "nested": {"ok": True, "list": [1, "ü"]}},
    }
    fields.update(kw)
    return Event(**fields)


def chunk(
    start: int, n: int, offset: int | None = None, stream: str = "s1", source: str = "ui"
) -> EventChunk:
    positions = () if offset is None else (Position(source, stream, offset, {"path": stream}),)
    return EventChunk(events=[event(i) for i in range(start, start + n)], positions=positions)


async def run_all(sink: PostgresSink, chunks: list[EventChunk]) -> None:
    q: asyncio.Queue[EventChunk | EndOfStream] = asyncio.Queue()
    for c in chunks:
        q.put_nowait(c)
    q.put_nowait(END_OF_STREAM)
    await asyncio.wait_for(sink.run(q), 60)


async def stored_messages(conn: asyncpg.Connection) -> list[str]:
    return [r["message"] for r in await conn.fetch("SELECT message FROM system_logs ORDER BY id")]


async def assert_exactly_once(conn: asyncpg.Connection, n: int) -> None:
    total, distinct = await conn.fetchrow(
        "SELECT count(*), count(DISTINCT message) FROM system_logs"
    )
    assert (total, distinct) == (n, n)
    got = {r["message"] for r in await conn.fetch("SELECT message FROM system_logs")}
    assert got == {f"m{i}" for i in range(n)}


def with_params(dsn: str, **params: str) -> str:
    parts = urlsplit(dsn)
    query = parts.query + ("&" if parts.query else "") + urlencode(params)
    return urlunsplit(parts._replace(query=query))


@pytest.fixture
async def make_sink(pg_dsn: str, pg_schema: str) -> AsyncIterator[SinkFactory]:
    sinks: list[PostgresSink] = []

    async def make(
        *,
        dsn: str | None = None,
        clock: Clock | None = None,
        max_rows: int = 1000,
        max_delay_s: float = 0.05,
        migrate: bool = True,
        open_: bool = True,
        **db: Any,
    ) -> PostgresSink:
        clock = clock or SystemClock()
        db_config = DatabaseConfig(
            schema_name=pg_schema,
            retry_initial_backoff_s=0.01,
            retry_max_backoff_s=0.1,
            connect_timeout_s=5,
            **db,
        )
        sink = PostgresSink(
            db_config,
            BatchConfig(max_rows=max_rows, max_delay_s=max_delay_s),
            dsn or pg_dsn,
            clock,
            rng=random.Random(42),
        )
        sinks.append(sink)
        if open_:
            await sink.open()
            if migrate:
                await sink.migrate(clock.now().date())
        return sink

    yield make
    for sink in sinks:
        await sink.aclose()


class PgProxy:
    """A TCP proxy in front of PostgreSQL that can refuse service or lose a COMMIT's answer.

    Modes armed for the next COMMIT only:
    - "lose_commit_ack": forward COMMIT, let the server commit, drop its answer and
      cut the client: the commit landed but the client cannot know.
    - "swallow_commit": never forward COMMIT, cut the client but keep the server side
      open: the transaction stays "in progress" on a backend that no one will use.
    """

    def __init__(self, pg_dsn: str) -> None:
        parts = urlsplit(pg_dsn)
        query = parse_qs(parts.query)
        host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
        port = parts.port or int(query.get("port", ["5432"])[0])
        if host.startswith("/"):
            sockets = [
                s
                for s in glob.glob(f"{host}/.s.PGSQL.{parts.port or '*'}")
                if not s.endswith(".lock")
            ]
            assert len(sockets) == 1, sockets
            self._unix_path: str | None = sockets[0]
        else:
            self._unix_path = None
        self._host, self._port = host, port
        user = parts.username or "postgres"
        self._auth = quote(user) + (f":{quote(parts.password)}" if parts.password else "")
        self._database = parts.path.lstrip("/") or user
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.refusing = False
        self.armed: str | None = None
        self.triggered = 0
        self.port = 0

    @property
    def dsn(self) -> str:
        return f"postgresql://{self._auth}@127.0.0.1:{self.port}/{self._database}?sslmode=disable"

    async def start(self, port: int = 0) -> PgProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def down(self) -> None:
        """Cut every connection and refuse new ones."""
        self.refusing = True
        for w in list(self._writers):
            w.transport.abort()

    def up(self) -> None:
        self.refusing = False

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._unix_path:
            return await asyncio.open_unix_connection(self._unix_path)
        return await asyncio.open_connection(self._host, self._port)

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self._writers.add(c_writer)
        if self.refusing:
            c_writer.transport.abort()
            self._writers.discard(c_writer)
            return
        s_reader, s_writer = await self._open_upstream()
        self._writers.add(s_writer)
        state = {"lose_reply": False}
        up = asyncio.create_task(self._client_to_server(c_reader, c_writer, s_writer, state))
        down = asyncio.create_task(self._server_to_client(s_reader, s_writer, c_writer, state))
        self._tasks |= {up, down}
        await asyncio.gather(up, down, return_exceptions=True)
        self._tasks -= {up, down}
        for w in (c_writer, s_writer):
            w.transport.abort()
            self._writers.discard(w)

    async def _client_to_server(
        self,
        reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        server: asyncio.StreamWriter,
        state: dict[str, bool],
    ) -> None:
        while data := await reader.read(65536):
            if self.armed and b"COMMIT;\x00" in data:
                mode, self.armed = self.armed, None
                self.triggered += 1
                if mode == "swallow_commit":
                    client.transport.abort()
                    await asyncio.Event().wait()  # hold the server side open until closed
                state["lose_reply"] = True
            server.write(data)
            await server.drain()
        server.transport.abort()

    async def _server_to_client(
        self,
        reader: asyncio.StreamReader,
        server: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
        state: dict[str, bool],
    ) -> None:
        swallowed = b""
        while data := await reader.read(65536):
            if state["lose_reply"]:
                swallowed += data
                if b"COMMIT\x00" in swallowed:  # the server committed: the client never hears
                    client.transport.abort()
                    server.transport.abort()
                    return
                continue
            client.write(data)
            await client.drain()
        client.transport.abort()


@pytest.fixture
async def proxy(pg_dsn: str) -> AsyncIterator[PgProxy]:
    p = await PgProxy(pg_dsn).start()
    yield p
    await p.aclose()


# --- the happy path ---------------------------------------------------------------------------


async def test_rows_and_checkpoints_commit_together_exactly_as_given(
    make_sink: SinkFactory, pg_conn: asyncpg.Connection
) -> None:
    sink = await make_sink()
    meta = {"bot_id": 42, "chat_id": "-100", "float": 1.5, "none": None, "deep": {"a": [1, {}]}}
    events = [
        event(0, meta=meta),
        event(1, ts=datetime(2026, 11, 26, 23, 59, 59, 999999, tzinfo=UTC), level=Level.ERROR),
        event(2, message="multi\nline ünïcödé ✓", meta={}),
    ]
    position = Position("ui", "inode:42", 1234, {"path": "/var/log/ui.log", "fp": "abc"})
    await run_all(sink, [EventChunk(events=events, positions=(position,))])

    rows = await pg_conn.fetch(
        "SELECT ts, service, level, event, message, meta FROM system_logs ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        (e.ts, e.service, e.level.value, e.event, e.message, _json(e.meta)) for e in events
    ]
    cp = await pg_conn.fetchrow(
        'SELECT source, stream, "offset", detail FROM forwarder_checkpoints'
    )
    assert tuple(cp) == ("ui", "inode:42", 1234, '{"fp": "abc", "path": "/var/log/ui.log"}')
    assert await sink.load_checkpoints("ui") == {"inode:42": position}
    assert await sink.load_checkpoints("other") == {}
    assert (sink.rows_written, sink.batches_written, sink.rows_dead_lettered) == (3, 1, 0)
    status = sink.status()
    assert status["state"] == "ok" and status["reason"] is None and status["pending_rows"] == 0
    assert status["last_commit_age_s"] is not None and status["last_commit_age_s"] >= 0


def _json(value: Any) -> str:
    # pg_conn has no jsonb codec: PostgreSQL's own text rendering of jsonb.
    import json

    def norm(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: norm(v[k]) for k in sorted(v, key=lambda k: (len(k), k))}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    return json.dumps(norm(value), ensure_ascii=False)


async def test_checkpoint_is_the_last_position_per_stream(
    make_sink: SinkFactory, pg_conn: asyncpg.Connection
) -> None:
    sink = await make_sink(max_rows=100_000)
    await run_all(
        sink,
        [
            chunk(0, 2, offset=5000, stream="a"),
            chunk(2, 2, offset=70, stream="b"),
            chunk(4, 2, offset=30, stream="a"),  # truncated and restarted: 30 is the truth
        ],
    )
    assert sink.batches_written == 1
    stored = await pg_conn.fetch('SELECT stream, "offset" FROM forwarder_checkpoints ORDER BY 1')
    assert [tuple(r) for r in stored] == [("a", 30), ("b", 70)]
    # a later batch overwrites, even with a lower offset
    await run_all(sink, [chunk(6, 1, offset=10, stream="b")])
    assert (await sink.load_checkpoints("ui"))["b"].offset == 10


async def test_a_full_batch_is_written_without_waiting_for_its_age(
    make_sink: SinkFactory, pg_conn: asyncpg.Connection
) -> None:
    sink = await make_sink(max_rows=5, max_delay_s=3600)
    q: asyncio.Queue[EventChunk | EndOfStream] = asyncio.Queue()
    task = asyncio.create_task(sink.run(q))
    q.put_nowait(chunk(0, 3, offset=3))
    q.put_nowait(chunk(3, 3, offset=6))  # 6 >= 5 at a chunk boundary
    q.put_nowait(chunk(6, 1, offset=7))  # stays in the batcher for an hour
    await wait_until(lambda: sink.batches_written == 1, what="the size flush")
    assert await pg_conn.fetchval("SELECT count(*) FROM system_logs") == 6
    assert await pg_conn.fetchval('SELECT "offset" FROM forwarder_checkpoints') == 6
    assert sink.status()["pending_rows"] == 1
    q.put_nowait(END_OF_STREAM)
    await asyncio.wait_for(task, 10)
    assert await pg_conn.fetchval("SELECT count(*) FROM system_logs") == 7


async def test_a_partial_batch_is_written_when_its_oldest_row_is_max_delay_old(
    make_sink: SinkFactory, pg_conn: asyncpg.Connection
) -> None:
    sink = await make_sink(max_rows=1000, max_delay_s=0.1)
    q: asyncio.Queue[EventChunk | EndOfStream] = asyncio.Queue()
    task = asyncio.create_task(sink.run(q))
    q.put_nowait(chunk(0, 2, offset=2))
    await wait_until(lambda: sink.batches_written == 1, what="the age flush")
    q.put_nowait(EventChunk(events=[], positions=(Position("ui", "s1", 99),)))  # no rows
    await wait_until(lambda: sink.batches_written == 2, what="the positions-only flush")
    assert await pg_conn.fetchval("SELECT count(*) FROM system_logs") == 2
    assert await pg_conn.fetchval('SELECT "offset" FROM forwarder_checkpoints') == 99
    q.put_nowait(END_OF_STREAM)
    await asyncio.wait_for(task, 10)
    assert sink.batches_written == 2  # nothing left to flush


async def test_a_new_utc_day_prepares_its_partitions_on_the_next_write(
    make_sink: SinkFactory, pg_conn: asyncpg.Connection
) -> None:
    clock = FakeClock(DAY)
    sink = await make_sink(clock=clock, partitions_ahead_days=1)
    await run_all(sink, [chunk(0, 1, offset=1)])
    assert await pg_conn.fetchval("SELECT to_regclass('system_logs_p20261128')") is None
    clock.advance(2 * 86400)  # 2026-11-28 12:00 UTC
    later = EventChunk(events=[event(1, ts=clock.now())], positions=())
    await run_all(sink, [later])
    for day in ("20261127", "20261128", "20261129"):
        assert await pg_conn.fetchval(f"SELECT to_regclass('system_logs_p{day}') IS NOT NULL")
    part = await pg_conn.fetchval(
        "SELECT tableoid::regclass::text FROM system_logs WHERE message = 'm1'"
    )
    assert part == "system_logs_p20261128"


# --- permanent errors: dead letters -----------------------------------------------------------


async def test_rows_the_database_refuses_go_to_dead_letters_and_the_rest_commits(
    make_sink: SinkFactory, pg_conn: asyncpg.Connection
) -> None:
    sink = await make_sink(max_rows=10_000)
    await pg_conn.execute(
        "ALTER TABLE system_logs ADD CONSTRAINT no_poison CHECK (event <> 'poison')"
    )
    events = [event(i, event="poison" if i in (3, 7, 8) else "ok") for i in range(12)]
    await run_all(
        sink,
        [
            EventChunk(events=events[:6], positions=(Position("ui", "s1", 600),)),
            EventChunk(events=events[6:], positions=(Position("ui", "s1", 1200),)),
        ],
    )
    assert await stored_messages(pg_conn) == [f"m{i}" for i in range(12) if i not in (3, 7, 8)]
    assert await pg_conn.fetchval('SELECT "offset" FROM forwarder_checkpoints') == 1200
    dead = await pg_conn.fetch(
        "SELECT source, error, \"row\"->>'message' AS message, \"row\"->>'event' AS event, "
        "\"row\"->'meta'->>'trace_id' AS trace FROM forwarder_dead_letters ORDER BY id"
    )
    assert [(d["source"], d["message"], d["event"], d["trace"]) for d in dead] == [
        ("ui", "m3", "poison", "t-3"),
        ("ui", "m7", "poison", "t-7"),
        ("ui", "m8", "poison", "t-8"),
    ]
    assert all(d["error"].startswith("23514 CheckViolationError:") for d in dead)
    assert all("no_poison" in d["error"] for d in dead)
    assert (sink.rows_written, sink.rows_dead_lettered, sink.batches_written) == (9, 3, 1)
    assert sink.status()["state"] == "ok"
    await sink.healthcheck()


async def test_nul_and_unencodable_values_cannot_kill_the_sink(
    make_sink: SinkFactory, pg_conn: asyncpg.Connection
) -> None:
    sink = await make_sink(max_rows=10_000)
    bad = {
        1: event(1, message="nul\x00inside"),
        2: event(2, meta={"k": "a\u0000b"}),
        3: event(3, service="surrogate\ud800"),
        4: event(4, meta={"obj": object()}),
        5: event(5, meta={"big": 2**80}),
    }
    events = [bad.get(i, event(i)) for i in range(8)]
    await run_all(sink, [EventChunk(events=events, positions=(Position("ui", "s1", 8),))])
    assert await stored_messages(pg_conn) == ["m0", "m6", "m7"]
    assert await pg_conn.fetchval('SELECT "offset" FROM forwarder_checkpoints') == 8
    dead = {
        r["message"]: r
        for r in await pg_conn.fetch(
            'SELECT error, "row"->>\'message\' AS message, "row"::text AS row '
            "FROM forwarder_dead_letters"
        )
    }
    assert set(dead) == {"nul\ufffdinside", "m2", "m3", "m4", "m5"}
    assert dead["nul\ufffdinside"]["error"].startswith("22021 ")
    assert dead["m2"]["error"].startswith("22P05 ") and "a\ufffdb" in dead["m2"]["row"]
    assert "UnicodeEncodeError" in dead["m3"]["error"]
    assert "JSON" in dead["m4"]["error"] and "<object object" in dead["m4"]["row"]
    assert '"big": "1208925819614629174706176"' in dead["m5"]["row"]
    assert sink.rows_dead_lettered == 5
    # the sink goes on
    await run_all(sink, [chunk(100, 2, offset=10)])
    assert await pg_conn.fetchval("SELECT count(*) FROM system_logs") == 5
    await sink.healthcheck()


async def test_an_error_no_row_can_explain_stops_the_sink(
    make_sink: SinkFactory, pg_conn: asyncpg.Connection
) -> None:
    sink = await make_sink()
    await pg_conn.execute("ALTER TABLE system_logs RENAME TO renamed")
    with pytest.raises(SinkError, match="42P01"):
        await run_all(sink, [chunk(0, 3, offset=3)])
    assert sink.status()["state"] == "failed"
    assert await pg_conn.fetchval("SELECT count(*) FROM forwarder_checkpoints") == 0
    with pytest.raises(SinkError, match="does not exist"):
        await sink.healthcheck()  # SELECT 1 answered; the table is what is missing


# --- transient errors: exactly once -----------------------------------------------------------


async def _sink_backends(conn: asyncpg.Connection, app: str, *, waiting: bool = False) -> list[int]:
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
        + (" AND wait_event_type = 'Lock'" if waiting else ""),
        app,
    )
    return [r["pid"] for r in rows]


async def test_killed_connections_mid_stream_store_every_row_exactly_once(
    make_sink: SinkFactory, pg_dsn: str, pg_schema: str, pg_conn: asyncpg.Connection
) -> None:
    app = f"fwd_{pg_schema}"
    sink = await make_sink(dsn=with_params(pg_dsn, application_name=app), max_rows=1000)
    n_chunks, per = 60, 250
    q: asyncio.Queue[EventChunk | EndOfStream] = asyncio.Queue(maxsize=4)

    async def produce() -> None:
        for k in range(n_chunks):
            await q.put(chunk(k * per, per, offset=(k + 1) * per * 10))
        await q.put(END_OF_STREAM)

    tasks = [asyncio.create_task(sink.run(q)), asyncio.create_task(produce())]
    killed = 0
    for target in (2, 5, 8):
        await wait_until(lambda t=target: sink.batches_written >= t, what=f"batch {target}")
        # Hold the checkpoint table: the sink's next transaction stops after its COPY,
        # with rows written but not committed; kill it right there.
        async with pg_conn.transaction():
            await pg_conn.execute("LOCK TABLE forwarder_checkpoints IN EXCLUSIVE MODE")
            await wait_until(
                lambda: _sink_backends(pg_conn, app, waiting=True), what="a blocked sink"
            )
            pids = await _sink_backends(pg_conn, app, waiting=True)
            for pid in pids:
                killed += await pg_conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    # and once more whatever it holds now, busy or idle (maybe nothing: reconnecting)
    for pid in await _sink_backends(pg_conn, app):
        killed += await pg_conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    await asyncio.wait_for(asyncio.gather(*tasks), 60)

    assert killed >= 3
    assert sink.retries >= 3
    await assert_exactly_once(pg_conn, n_chunks * per)
    assert (
        await pg_conn.fetchval('SELECT "offset" FROM forwarder_checkpoints') == n_chunks * per * 10
    )
    assert sink.rows_written == n_chunks * per
    await sink.healthcheck()
    assert sink.status()["state"] == "ok"


async def test_a_commit_whose_answer_is_lost_is_not_written_twice(
    make_sink: SinkFactory, proxy: PgProxy, pg_conn: asyncpg.Connection, caplog: Any
) -> None:
    caplog.set_level(logging.WARNING, logger="forwarder.sinks.postgres")
    sink = await make_sink(dsn=proxy.dsn, max_rows=500)
    proxy.armed = "lose_commit_ack"  # the first batch's COMMIT lands, its answer does not
    await run_all(sink, [chunk(k * 500, 500, offset=(k + 1) * 500) for k in range(3)])
    assert proxy.triggered == 1
    assert sink.retries >= 1
    await assert_exactly_once(pg_conn, 1500)
    assert await pg_conn.fetchval('SELECT "offset" FROM forwarder_checkpoints') == 1500
    assert (sink.rows_written, sink.batches_written) == (1500, 3)
    assert any("server says committed: skip" in r.getMessage() for r in caplog.records)
    await sink.healthcheck()


async def test_a_commit_that_never_arrived_is_written_again(
    make_sink: SinkFactory, proxy: PgProxy, pg_conn: asyncpg.Connection, caplog: Any
) -> None:
    caplog.set_level(logging.WARNING, logger="forwarder.sinks.postgres")
    sink = await make_sink(dsn=proxy.dsn, max_rows=500)
    # COMMIT never reaches the server and its backend stays idle in the transaction:
    # the sink finds the transaction "in progress", ends that backend, then rewrites.
    proxy.armed = "swallow_commit"
    await run_all(sink, [chunk(k * 500, 500, offset=(k + 1) * 500) for k in range(2)])
    assert proxy.triggered == 1
    await assert_exactly_once(pg_conn, 1000)
    assert await pg_conn.fetchval('SELECT "offset" FROM forwarder_checkpoints') == 1000
    assert any("server says aborted (was in progress" in r.getMessage() for r in caplog.records)
    await sink.healthcheck()


async def test_while_the_database_is_down_the_sink_retries_and_stops_reading(
    make_sink: SinkFactory, proxy: PgProxy, pg_conn: asyncpg.Connection, caplog: Any
) -> None:
    caplog.set_level(logging.WARNING, logger="forwarder.sinks.postgres")
    sink = await make_sink(dsn=proxy.dsn, max_rows=100)
    q: asyncio.Queue[EventChunk | EndOfStream] = asyncio.Queue(maxsize=2)
    task = asyncio.create_task(sink.run(q))
    await q.put(chunk(0, 100, offset=100))
    await wait_until(lambda: sink.batches_written == 1, what="the first batch")

    proxy.down()
    for k in range(1, 5):
        await q.put(chunk(k * 100, 100, offset=(k + 1) * 100))
    await wait_until(lambda: sink.retries >= 3, what="retries")
    status = sink.status()
    assert status["state"] == "degraded" and "retrying" in status["reason"]
    # One batch in flight (retried), the next one encoded and waiting for it, and the
    # queue full behind them: nothing more is taken (backpressure).
    assert status["pending_rows"] == 200
    assert q.full()
    assert sink.batches_written == 1

    proxy.up()
    await q.put(END_OF_STREAM)
    await asyncio.wait_for(task, 30)
    await assert_exactly_once(pg_conn, 500)
    assert sink.status()["state"] == "ok"
    retry_logs = [
        r
        for r in caplog.records
        if r.name == "forwarder.sinks.postgres" and "retrying" in r.getMessage()
    ]
    assert retry_logs and all(getattr(r, "component", None) == "sink.postgres" for r in retry_logs)
    assert "connection" in retry_logs[0].getMessage().lower()
    await sink.healthcheck()


async def test_open_waits_for_the_database_to_come_up(
    make_sink: SinkFactory, pg_dsn: str, pg_conn: asyncpg.Connection
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = PgProxy(pg_dsn)
    proxy.port = port
    sink = await make_sink(dsn=proxy.dsn, open_=False)
    opening = asyncio.create_task(sink.open())
    try:
        await wait_until(lambda: sink.status()["state"] == "degraded", what="degraded")
        assert "connect" in sink.status()["reason"]
        await proxy.start(port)
        await asyncio.wait_for(opening, 10)
        assert sink.status()["state"] == "ok"
        await sink.migrate(DAY.date())
        await run_all(sink, [chunk(0, 5, offset=5)])
        assert await pg_conn.fetchval("SELECT count(*) FROM system_logs") == 5
    finally:
        opening.cancel()
        await sink.aclose()
        await proxy.aclose()


async def test_aclose_is_idempotent(make_sink: SinkFactory) -> None:
    sink = await make_sink()
    await sink.aclose()
    await sink.aclose()
    assert sink.status()["state"] == "stopped"
    with pytest.raises(RuntimeError):
        await run_all(sink, [])


async def test_a_flush_marker_is_done_only_once_everything_before_it_is_committed(
    make_sink: SinkFactory, pg_dsn: str, pg_schema: str
) -> None:
    """A batch far from full and far from due is written at once for a Flush."""
    from forwarder.pipeline.stage import Flush

    sink = await make_sink(max_rows=100_000, max_delay_s=3600)
    q: asyncio.Queue[Any] = asyncio.Queue()
    running = asyncio.create_task(sink.run(q))
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema})
    try:
        q.put_nowait(chunk(0, 10, offset=100))
        first, second = Flush(), Flush()
        q.put_nowait(first)
        q.put_nowait(chunk(10, 5, offset=200))
        q.put_nowait(second)
        await asyncio.wait_for(first.done.wait(), 30)
        assert len(await stored_messages(conn)) >= 10
        await asyncio.wait_for(second.done.wait(), 30)
        await assert_exactly_once(conn, 15)
        committed = await sink.load_checkpoints("ui")
        assert committed["s1"].offset == 200
        q.put_nowait(END_OF_STREAM)
        await asyncio.wait_for(running, 30)
    finally:
        running.cancel()
        await conn.close()


async def test_retried_connection_failures_leave_no_cyclic_garbage(
    make_sink: SinkFactory, proxy: PgProxy
) -> None:
    """A failed asyncpg connect is a reference cycle through its traceback; kept, each
    retry would hold ~17 KB until a (rare, see cli._tune_gc) cyclic GC pass: the RSS
    rise seen during a long outage."""
    import gc

    sink = await make_sink(dsn=proxy.dsn, max_rows=10)
    q: asyncio.Queue[Any] = asyncio.Queue()
    task = asyncio.create_task(sink.run(q))
    proxy.down()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what a pass finds unreachable, to look at it
    try:
        await q.put(chunk(0, 10, offset=10))
        await wait_until(lambda: sink.retries >= 30, what="30 retries")
        proxy.up()
        await q.put(END_OF_STREAM)
        await asyncio.wait_for(task, 30)
        gc.collect()
        kinds = Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()
    # (The test proxy's own aborted sockets are garbage too: not the sink's.)
    held = {
        k: n for k, n in kinds.items() if k in ("frame", "traceback", "SSLContext", "coroutine")
    }
    assert not held, f"after {sink.retries} retries the cyclic garbage holds {held}"
