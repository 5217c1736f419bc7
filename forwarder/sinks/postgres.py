"""The PostgreSQL sink: batches of events written exactly once, with their positions.

One batch is ONE transaction: a binary COPY of the rows into the partitioned log
table, the rejected rows (if any) into the dead-letter table, and an upsert of the
last position of every stream the batch covers. Rows and positions commit together,
so a restart resumes exactly after the last committed line.

Errors go through `classify` (transient | permanent) before anything is done:
- transient (connection lost, server shutting down, too many connections,
  serialization failure, timeouts): back off (capped exponential, full jitter) and
  retry the SAME batch on a fresh connection. The input queue is not read meanwhile,
  so the sources block (backpressure) and `status()` says "degraded" with the reason.
  The failed transaction rolled back, so the retry is exactly-once, except in one
  case: the connection died after COMMIT was sent, before its answer arrived. The
  sink knows the transaction id of every transaction it commits; after such a loss it
  asks the server `pg_xact_status(xid)` and skips the batch if it committed (see
  `resolve_lost_ack`).
- permanent and due to a row's data (SQLSTATE classes 22, 23, 54, or a value the
  client cannot encode): the batch is written again in "isolating" mode: each COPY
  runs under a savepoint, a failed part is split (at the row the server names in its
  error context, else in halves) until the rejected rows are alone; the good rows,
  the rejected ones (into the dead-letter table, with the error text) and the
  checkpoints commit in one transaction. Nothing permanent is retried twice.
- any other permanent error (missing table, permissions, ...) cannot be fixed by
  splitting the batch: `run` raises `SinkError` and the daemon stops; nothing of the
  batch was committed, so the lines are read again after the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import asyncpg
import orjson

from forwarder.clock import Clock
from forwarder.config import BatchConfig, DatabaseConfig
from forwarder.event import Event, EventChunk, Position

# The end-of-stream marker is the pipeline's one instance; re-exported from here.
from forwarder.pipeline.stage import END_OF_STREAM, EndOfStream, Flush, Marker
from forwarder.sinks import schema
from forwarder.sinks.batch import Batch, Batcher

__all__ = [
    "END_OF_STREAM",
    "Backoff",
    "CommitInDoubtError",
    "EndOfStream",
    "PostgresSink",
    "SinkError",
    "classify",
    "forget_traceback",
    "is_row_error",
    "resolve_lost_ack",
]

log = logging.getLogger(__name__)

COMPONENT = "sink.postgres"
APPLICATION_NAME = "forwarder"  # how the sink's sessions show in pg_stat_activity
COLUMNS = ("ts", "service", "level", "event", "message", "meta")
WRITE_TIMEOUT_S = 120.0  # one COPY / statement; a hung server becomes a transient error
CLOSE_TIMEOUT_S = 10.0
PARTITION_RETRY_S = 60.0  # after a failed daily partition check, try again this much later
RETRY_LOG_INTERVAL_S = 10.0
MAX_ERROR_CHARS = 2000
TERMINATE_WAIT_MS = 5000

ErrorKind = Literal["transient", "permanent"]
LostAckDecision = Literal["skip", "rewrite", "wait"]


class SinkError(Exception):
    """A permanent failure the sink cannot work around; the daemon should stop."""


class CommitInDoubtError(Exception):
    """A lost COMMIT acknowledgement whose outcome the server cannot tell yet."""


# --- error classification (pure) --------------------------------------------------------------

# SQLSTATEs worth retrying although their class is otherwise permanent.
_TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "40003",  # statement_completion_unknown
        "55P03",  # lock_not_available (lock_timeout)
        "57014",  # query_canceled (statement_timeout, pg_cancel_backend)
        "57P01",  # admin_shutdown (also pg_terminate_backend)
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, shutting down)
        "57P05",  # idle_session_timeout
        "25P03",  # idle_in_transaction_session_timeout
        "25P04",  # transaction_timeout
    }
)
# 08 connection exception, 53 insufficient resources (too many connections, disk full,
# out of memory), 58 system error (I/O).
_TRANSIENT_CLASSES = frozenset({"08", "53", "58"})
# Classes whose errors a single row's data can cause: data exception, integrity
# constraint violation, program limit exceeded (e.g. an index row too large).
_ROW_CLASSES = frozenset({"22", "23", "54"})


def classify(exc: BaseException) -> ErrorKind:
    """Will the same write succeed if retried later on a fresh connection?"""
    if isinstance(exc, CommitInDoubtError):
        return "transient"
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        if state in _TRANSIENT_SQLSTATES or state[:2] in _TRANSIENT_CLASSES:
            return "transient"
        return "permanent"
    if isinstance(exc, asyncpg.InterfaceError):
        if isinstance(exc, ValueError):  # DataError, ClientConfigurationError: bad input
            return "permanent"
        text = str(exc).lower()
        if "pool is clos" in text:  # we are shutting down: retrying cannot help
            return "permanent"
        return "transient" if "connection" in text or "cancel" in text else "permanent"
    if isinstance(exc, asyncpg.exceptions.InternalClientError):  # protocol desync
        return "transient"
    if isinstance(exc, TimeoutError | OSError | EOFError):  # ConnectionError is an OSError
        return "transient"
    return "permanent"


def is_row_error(exc: BaseException) -> bool:
    """A permanent error that one row's data can cause, so isolating the row helps."""
    if classify(exc) != "permanent":
        return False
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in _ROW_CLASSES
    if isinstance(exc, asyncpg.InterfaceError):
        return isinstance(exc, asyncpg.exceptions._base.DataError)
    # Raised while encoding a value client side (a str with surrogates, a wrong type).
    return isinstance(exc, ValueError | TypeError | OverflowError)


_COPY_LINE = re.compile(r"COPY [^\n,]+, line (\d+)")


def failed_copy_line(exc: BaseException) -> int | None:
    """The 1-based row of a COPY the server blamed in its error context, if it did."""
    context = getattr(exc, "context", None) if isinstance(exc, asyncpg.PostgresError) else None
    match = _COPY_LINE.search(context or "")
    return int(match.group(1)) if match else None


def error_text(exc: BaseException) -> str:
    """What the dead-letter table stores: SQLSTATE, class, message and detail."""
    if isinstance(exc, asyncpg.PostgresError):
        text = f"{exc.sqlstate} {type(exc).__name__}: {exc.message or exc}"
        if exc.detail:
            text += f" ({exc.detail})"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return _clean_str(text)[:MAX_ERROR_CHARS]


def forget_traceback(exc: BaseException) -> None:
    """Drop the tracebacks of a handled error (and of its causes) before it is dropped.

    A failed asyncpg connect keeps its error in a local of the frame it raised from
    (`last_error` in connect_utils._connect), so error -> traceback -> frame -> error
    is a cycle, and that frame holds the attempt's SSLContext: ~17 KB per attempt that
    only the cyclic GC frees. With the daemon's GC threshold (cli._tune_gc) that is
    ~800 attempts, ~13 MB of RSS during a long outage. Without the tracebacks nothing
    is cyclic. Only for errors already logged as text and retried.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += (e.__cause__, e.__context__)


def resolve_lost_ack(xact_status: str | None, stored_match: bool | None) -> LostAckDecision:
    """Decide the fate of a batch whose COMMIT was sent but never acknowledged.

    `xact_status` is `pg_xact_status(xid)` of its transaction, asked on a new
    connection: "committed" -> the rows are stored, skip the batch; "aborted" -> write
    it again; "in progress" -> the old backend still holds it (the caller terminates
    it first), ask again later. NULL means the server no longer knows (the xid is
    older than its commit log): then the stored checkpoints decide, when the batch had
    any: all equal to the batch's -> skip; otherwise (or no checkpoints) rewrite.
    """
    if xact_status == "committed":
        return "skip"
    if xact_status == "aborted":
        return "rewrite"
    if xact_status == "in progress":
        return "wait"
    return "skip" if stored_match else "rewrite"


def checkpoints_match(
    batch: Sequence[tuple[str, str, int, Any]], stored: Mapping[tuple[str, str], tuple[int, Any]]
) -> bool | None:
    """Do the stored checkpoints equal the batch's (source, stream, offset, detail)?

    None when the batch has no checkpoint to compare.
    """
    if not batch:
        return None
    return all(stored.get((s, st)) == (offset, detail) for s, st, offset, detail in batch)


class Backoff:
    """Capped exponential backoff, full jitter: delay n is uniform in [0, min(cap, base * 2^n)]."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self._rng = rng
        self.attempts = 0

    def next_delay(self) -> float:
        ceiling = min(self._max_s, self._initial_s * 2.0 ** min(self.attempts, 60))
        self.attempts += 1
        return self._rng.uniform(0.0, ceiling)


# --- values made storable -------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    # orjson knows dict, list, tuple, str, numbers, datetime...; meta is a Mapping
    # (possibly a read-only proxy) and may hold sets.
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _clean_str(text: str) -> str:
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def storable(value: Any) -> Any:
    """A JSON-safe copy jsonb accepts: NUL and lone surrogates replaced, odd types as text."""
    if isinstance(value, str):
        return _clean_str(value)
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, Mapping):
        return {_clean_str(str(k)): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [storable(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    return _clean_str(repr(value))


def event_as_storable(event: Event) -> dict[str, Any]:
    return {
        "ts": storable(event.ts),
        "service": storable(event.service),
        "level": storable(str(event.level)),
        "event": storable(event.event),
        "message": storable(event.message),
        "meta": storable(event.meta),
    }


def jsonb(value: Any) -> bytes:
    """`value` in jsonb's binary wire format: a version byte (1), then the JSON text.

    Built by concatenation on purpose: orjson's own result keeps a 4 KiB allocation
    behind every small bytes object, which would cost ~4 KiB per buffered row.
    """
    return b"\x01" + orjson.dumps(value, default=_json_default)


def _jsonb_encode(value: Any) -> bytes:
    # Called once per row by COPY: meta dicts first, without a second function call.
    if value.__class__ is dict:
        return b"\x01" + orjson.dumps(value, default=_json_default)
    # bytes arrive already in the wire format (from `jsonb`): no second serialization.
    if isinstance(value, bytes):
        return value
    # A str is JSON text, as with asyncpg's own jsonb codec (other writers share the pool).
    if isinstance(value, str):
        return b"\x01" + value.encode()
    return jsonb(value)


def _jsonb_decode(data: bytes) -> str:
    # JSON text, as asyncpg's own jsonb codec returns it: other readers share the pool.
    return data[1:].decode()


def server_settings(dsn: str) -> dict[str, str] | None:
    """application_name=forwarder, unless the DSN names one (asyncpg lets ours win)."""
    if "application_name" in parse_qs(urlsplit(dsn).query):
        return None
    return {"application_name": APPLICATION_NAME}


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=_jsonb_encode,
        decoder=_jsonb_decode,
        format="binary",
    )


# --- one batch on its way to the database -----------------------------------------------------


@dataclass(slots=True)
class _DeadLetter:
    source: str | None
    error: str
    row: bytes  # jsonb of event_as_storable


@dataclass(slots=True)
class _Pending:
    """A batch on its way: the COPY rows are the events themselves (Event's fields are
    the table's columns in order; the jsonb codec serializes meta while COPY encodes).
    A meta that cannot be serialized fails the COPY client-side as a row error, and the
    isolating write dead-letters that row alone."""

    batch: Batch
    checkpoint_args: tuple[list[str], list[str], list[int], list[bytes]]
    isolate: bool = False  # write with savepoints, isolating rejected rows
    xid: str | None = None  # set while a COMMIT is unacknowledged
    backend_pid: int | None = None
    dead: list[_DeadLetter] = field(default_factory=list)  # all dead letters of the last try
    committed: bool = False  # COMMIT was acknowledged: whatever fails later, never rewrite

    @property
    def rows(self) -> list[Event]:
        return self.batch.events


def _dead_letter(batch: Batch, index: int, error: str) -> _DeadLetter:
    event = batch.events[index]
    source = batch.sources[index] if index < len(batch.sources) else None
    return _DeadLetter(source, error, jsonb(event_as_storable(event)))


def encode_batch(batch: Batch) -> _Pending:
    """Prepare a batch for writing: its checkpoints as the upsert's array arguments."""
    sources, streams, offsets, details = [], [], [], []
    for p in batch.checkpoints:
        sources.append(p.source)
        streams.append(p.stream)
        offsets.append(p.offset)
        try:
            details.append(jsonb(p.detail))
        except (TypeError, ValueError):
            details.append(jsonb(storable(p.detail)))
    return _Pending(batch, (sources, streams, offsets, details))


# --- the sink ---------------------------------------------------------------------------------


class PostgresSink:
    def __init__(
        self,
        db: DatabaseConfig,
        batch: BatchConfig,
        dsn: str,
        clock: Clock,
        *,
        rng: random.Random | None = None,
        on_batch: Callable[[float, int], None] | None = None,
    ) -> None:
        """`on_batch(seconds, rows)` is called after each commit: the time from the
        batch's first write attempt to its commit (retries included) and its rows (the
        dead-lettered ones included). It must be cheap and must not raise."""
        self._db = db
        self._on_batch = on_batch
        self._batch_config = batch
        self._dsn = dsn
        self._clock = clock
        self._rng = rng or random.Random()
        self._names = schema.Names.from_config(db)  # validates every identifier once
        self._pool: asyncpg.Pool | None = None
        self._closed = False
        self._batcher = Batcher(batch)
        self._waiting_rows = 0  # rows taken from the batcher and not yet committed
        self._state = "starting"
        self._reason: str | None = None
        self._last_commit: float | None = None
        self._partitions_day: date | None = None
        self._partitions_retry_at = float("-inf")
        self._last_retry_log = float("-inf")
        n = self._names
        self._upsert_sql = f"""
            WITH up AS (
                INSERT INTO {n.q_checkpoints} AS c (source, stream, "offset", detail, updated_at)
                SELECT s, st, o, d, now()
                FROM unnest($1::text[], $2::text[], $3::bigint[], $4::jsonb[]) AS u(s, st, o, d)
                ON CONFLICT (source, stream) DO UPDATE
                SET "offset" = EXCLUDED."offset", detail = EXCLUDED.detail,
                    updated_at = EXCLUDED.updated_at
                RETURNING 1)
            SELECT pg_current_xact_id()::text, pg_backend_pid(), (SELECT count(*) FROM up)"""
        self._dead_letter_sql = f"""
            INSERT INTO {n.q_dead_letters} (source, error, "row")
            SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[])"""
        # counters
        self.rows_written = 0
        self.batches_written = 0
        self.rows_dead_lettered = 0
        self.write_errors = 0
        self.retries = 0

    # -- lifecycle --

    async def open(self) -> None:
        """Create the pool; transient failures (server down, starting) are retried."""
        if self._pool is not None:
            return
        backoff = self._backoff()
        while True:
            try:
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=2,
                    init=_init_connection,
                    server_settings=server_settings(self._dsn),
                    timeout=self._db.connect_timeout_s,
                    # Bounds every statement, COMMIT included: a hung server becomes a
                    # TimeoutError (transient) instead of a stuck sink.
                    command_timeout=WRITE_TIMEOUT_S,
                )
                break
            except Exception as exc:
                if classify(exc) != "transient":
                    self._state, self._reason = "failed", f"cannot connect: {error_text(exc)}"
                    raise
                await self._retry_wait(backoff, "connect", exc)
        self._set_ok()

    async def aclose(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close the pool within `timeout_s`, terminating it on timeout or error. Idempotent."""
        pool, self._pool = self._pool, None
        self._closed = True
        if pool is None:
            if self._state != "failed":
                self._state = "stopped"
            return
        self._state = "stopping"
        try:
            async with asyncio.timeout(timeout_s):
                await pool.close()
        except Exception as exc:
            log.warning(
                "pool did not close cleanly (%s); terminating it",
                error_text(exc),
                extra={"component": COMPONENT},
            )
            pool.terminate()
        except asyncio.CancelledError:
            pool.terminate()
            raise
        self._state = "stopped"

    async def migrate(self, today: date) -> list[str]:
        return await self.with_retry("migrate", lambda conn: schema.migrate(conn, self._db, today))

    async def load_checkpoints(self, source: str) -> dict[str, Position]:
        """stream -> the committed Position of every stream of `source`."""
        sql = f'SELECT stream, "offset", detail FROM {self._names.q_checkpoints} WHERE source = $1'

        async def load(conn: asyncpg.Connection) -> dict[str, Position]:
            rows = await conn.fetch(sql, source, timeout=WRITE_TIMEOUT_S)
            return {
                r["stream"]: Position(source, r["stream"], r["offset"], orjson.loads(r["detail"]))
                for r in rows
            }

        return await self.with_retry("load checkpoints", load)

    @property
    def pool(self) -> asyncpg.Pool:
        """The sink's pool, for other writers of the same database (alarm history)."""
        return self._require_pool()

    @property
    def names(self) -> schema.Names:
        return self._names

    async def healthcheck(self) -> None:
        """Raise unless the pool answers SELECT 1 and the log table exists."""
        pool = self._require_pool()
        async with pool.acquire(timeout=self._db.connect_timeout_s) as conn:
            await conn.fetchval("SELECT 1", timeout=self._db.connect_timeout_s)
            if not await schema.table_exists(conn, self._names.q_table):
                raise SinkError(f"table {self._names.schema}.{self._names.table} does not exist")

    def status(self) -> dict[str, Any]:
        age = None if self._last_commit is None else self._clock.monotonic() - self._last_commit
        return {
            "state": self._state,
            "reason": self._reason,
            "last_commit_age_s": age,
            "pending_rows": self._batcher.rows + self._waiting_rows,
        }

    # -- the loop --

    async def run(self, inp: asyncio.Queue[EventChunk | Marker]) -> None:
        """Consume chunks, write a batch when due (size or age); on END_OF_STREAM flush, return.

        A `Flush` marker writes what is batched at once and is set done once it commits.

        The next batch is assembled and encoded while the previous one is being
        written, so our CPU work overlaps the server's; at most one batch is in flight
        and one waits for it. While a write is retried, this loop waits for it and
        stops reading its input, so the sources block (backpressure). Returns only after
        the last batch is committed.
        """
        self._require_pool()
        batcher = self._batcher
        clock = self._clock
        writing: asyncio.Task[None] | None = None
        try:
            while True:
                if batcher.due(clock.monotonic()):
                    writing = await self._start_write(batcher.take(), writing)
                    continue
                try:
                    item = inp.get_nowait()
                except asyncio.QueueEmpty:
                    try:
                        async with asyncio.timeout(batcher.time_until_due(clock.monotonic())):
                            item = await inp.get()
                    except TimeoutError:
                        continue  # the age deadline passed: re-check due()
                if item is END_OF_STREAM or isinstance(item, EndOfStream):
                    if not batcher.empty:
                        writing = await self._start_write(batcher.take(), writing)
                    if writing is not None:
                        await writing
                    return
                if isinstance(item, Flush):
                    if not batcher.empty:
                        writing = await self._start_write(batcher.take(), writing)
                    if writing is not None:
                        await writing
                    item.done.set()
                    continue
                batcher.add(item, clock.monotonic())
        finally:
            if writing is not None and not writing.done():
                writing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writing

    async def _start_write(
        self, batch: Batch, previous: asyncio.Task[None] | None
    ) -> asyncio.Task[None]:
        """Encode `batch` now, wait for the previous write, then start writing this one."""
        pending = encode_batch(batch)
        self._waiting_rows += len(batch.events)
        if previous is not None:
            await previous  # a permanent failure of the previous batch raises here
        return asyncio.create_task(self._write(pending), name="sink.write")

    # -- writing one batch --

    async def _write(self, pending: _Pending) -> None:
        try:
            await self._write_until_done(pending)
        finally:
            self._waiting_rows -= len(pending.batch.events)

    async def _write_until_done(self, pending: _Pending) -> None:
        batch = pending.batch
        backoff: Backoff | None = None
        started = self._clock.monotonic()
        while True:
            try:
                await self._attempt(pending)
                break
            except Exception as exc:
                if pending.committed:
                    # Failed after the acknowledged COMMIT (returning the connection
                    # to the pool): the batch is stored; writing it again would
                    # duplicate it.
                    log.info(
                        "batch committed; the connection failed afterwards: %s",
                        error_text(exc),
                        extra={"component": COMPONENT},
                    )
                    break
                self.write_errors += 1
                if classify(exc) == "transient":
                    backoff = backoff or self._backoff()
                    self.retries += 1
                    await self._retry_wait(backoff, "write", exc)
                    continue
                if is_row_error(exc) and not pending.isolate:
                    # Some row is refused: write again isolating it. No wait, nothing
                    # will change; this happens once per batch.
                    pending.isolate = True
                    continue
                self._state, self._reason = "failed", f"write failed: {error_text(exc)}"
                log.error(
                    "permanent write error; stopping: %s",
                    error_text(exc),
                    extra={"component": COMPONENT},
                )
                raise SinkError(self._reason) from exc
        dead = len(pending.dead)
        self.rows_written += len(batch.events) - dead
        self.rows_dead_lettered += dead
        self.batches_written += 1
        self._last_commit = self._clock.monotonic()
        if self._on_batch is not None:
            try:
                self._on_batch(self._last_commit - started, len(batch.events))
            except Exception:  # a metrics hook must never fail a committed batch
                log.exception("on_batch hook failed", extra={"component": COMPONENT})
        if dead:
            log.warning(
                "%d rows refused by the database went to %s",
                dead,
                self._names.dead_letter_table,
                extra={"component": COMPONENT, "first_error": pending.dead[0].error},
            )
        self._set_ok()

    async def _attempt(self, p: _Pending) -> None:
        pool = self._require_pool()
        async with pool.acquire(timeout=self._db.connect_timeout_s) as conn:
            try:
                if p.xid is not None:
                    decision = await self._resolve_lost_ack(conn, p)
                    if decision == "skip":
                        return
                    if decision == "wait":
                        raise CommitInDoubtError(f"transaction {p.xid} is still in progress")
                    p.xid = None
                await self._maybe_ensure_partitions(conn)
                await self._transaction(conn, p)
            except Exception as exc:
                if classify(exc) == "transient":
                    _terminate(conn)  # the retry runs on a fresh connection
                raise

    async def _transaction(self, conn: asyncpg.Connection, p: _Pending) -> None:
        tr = conn.transaction()
        await tr.start()
        try:
            dead: list[_DeadLetter] = []
            if p.isolate:
                dead.extend(await self._copy_isolating(conn, p))
            elif p.rows:
                await self._copy(conn, p.rows)
            if dead:
                await conn.execute(
                    self._dead_letter_sql,
                    [d.source for d in dead],
                    [d.error for d in dead],
                    [d.row for d in dead],
                    timeout=WRITE_TIMEOUT_S,
                )
            xid, pid, _ = await conn.fetchrow(
                self._upsert_sql, *p.checkpoint_args, timeout=WRITE_TIMEOUT_S
            )
        except BaseException:
            await _rollback_quietly(tr, conn)
            raise
        p.dead = dead
        # From here until the answer to COMMIT arrives, the outcome is unknown to us: a
        # lost connection now is resolved on the next attempt by _resolve_lost_ack.
        p.xid, p.backend_pid = xid, pid
        await tr.commit()
        p.xid, p.committed = None, True

    async def _copy(self, conn: asyncpg.Connection, rows: list[Event]) -> None:
        await conn.copy_records_to_table(
            self._names.table,
            records=rows,
            columns=COLUMNS,
            schema_name=self._names.schema,
            timeout=WRITE_TIMEOUT_S,
        )

    async def _copy_isolating(self, conn: asyncpg.Connection, p: _Pending) -> list[_DeadLetter]:
        """COPY every row that the database accepts; return the refused ones as dead letters.

        Each part is copied under a savepoint. A refused part is split at the row the
        server names ("COPY t, line N"; that row is then tried alone to confirm it), or
        in halves when it names none, until each refused row stands alone.
        """
        rejected: list[tuple[int, str]] = []
        stack: list[list[int]] = [list(range(len(p.rows)))]
        while stack:
            part = stack.pop()
            if not part:
                continue
            try:
                async with conn.transaction():  # a savepoint
                    await self._copy(conn, [p.rows[j] for j in part])
            except Exception as exc:
                if not is_row_error(exc):
                    raise
                if len(part) == 1:
                    rejected.append((part[0], error_text(exc)))
                    continue
                line = failed_copy_line(exc)
                if line is not None and 1 <= line <= len(part):
                    k = line - 1
                    stack.extend((part[k + 1 :], [part[k]], part[:k]))
                else:
                    mid = len(part) // 2
                    stack.extend((part[mid:], part[:mid]))
        rejected.sort()
        return [_dead_letter(p.batch, j, error) for j, error in rejected]

    async def _resolve_lost_ack(self, conn: asyncpg.Connection, p: _Pending) -> LostAckDecision:
        assert p.xid is not None
        status_sql = "SELECT pg_xact_status($1::text::xid8)"
        status = first_status = await conn.fetchval(status_sql, p.xid, timeout=WRITE_TIMEOUT_S)
        if status == "in progress" and p.backend_pid is not None:
            # The old backend has not noticed that we are gone: end it, so its
            # transaction resolves (it commits if COMMIT had arrived, else aborts).
            try:
                await conn.execute(
                    """SELECT pg_terminate_backend(pid, $3) FROM pg_stat_activity
                       WHERE pid = $1 AND backend_xid = $2::text::xid""",
                    p.backend_pid,
                    str(int(p.xid) & 0xFFFFFFFF),
                    TERMINATE_WAIT_MS,
                    timeout=WRITE_TIMEOUT_S,
                )
            except asyncpg.PostgresError as exc:
                log.warning(
                    "cannot terminate the backend of an unacknowledged commit: %s",
                    error_text(exc),
                    extra={"component": COMPONENT},
                )
            status = await conn.fetchval(status_sql, p.xid, timeout=WRITE_TIMEOUT_S)
        match = None
        if status is None and p.batch.checkpoints:
            match = await self._stored_checkpoints_match(conn, p)
        decision = resolve_lost_ack(status, match)
        log.warning(
            "commit of transaction %s was not acknowledged; server says %s%s: %s the batch",
            p.xid,
            status,
            "" if status == first_status else f" (was {first_status}, its backend was ended)",
            decision,
            extra={"component": COMPONENT},
        )
        return decision

    async def _stored_checkpoints_match(self, conn: asyncpg.Connection, p: _Pending) -> bool | None:
        sources, streams, offsets, details = p.checkpoint_args
        rows = await conn.fetch(
            f"""SELECT c.source, c.stream, c."offset", c.detail
                FROM {self._names.q_checkpoints} c
                JOIN unnest($1::text[], $2::text[]) AS k(s, st)
                  ON c.source = k.s AND c.stream = k.st""",
            sources,
            streams,
            timeout=WRITE_TIMEOUT_S,
        )
        stored = {
            (r["source"], r["stream"]): (r["offset"], orjson.loads(r["detail"])) for r in rows
        }
        wanted = [
            (s, st, o, orjson.loads(d[1:]))
            for s, st, o, d in zip(sources, streams, offsets, details, strict=True)
        ]
        return checkpoints_match(wanted, stored)

    async def _maybe_ensure_partitions(self, conn: asyncpg.Connection) -> None:
        """Once per UTC day (by the injected clock), make sure the day partitions exist."""
        today = self._clock.now().astimezone(UTC).date()
        if today == self._partitions_day or self._clock.monotonic() < self._partitions_retry_at:
            return
        try:
            done = await schema.ensure_partitions(conn, self._db, today)
        except Exception as exc:
            if not _is_open(conn):
                raise
            # A lock timeout or a race must not stop the writes: rows of days without
            # a partition go to the default partition and are moved when it is made.
            self._partitions_retry_at = self._clock.monotonic() + PARTITION_RETRY_S
            log.warning(
                "cannot prepare the day partitions, retrying in %.0fs: %s",
                PARTITION_RETRY_S,
                error_text(exc),
                extra={"component": COMPONENT},
            )
            return
        self._partitions_day = today
        for line in done:
            log.info("%s", line, extra={"component": COMPONENT})

    # -- helpers --

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("PostgresSink is not open" if not self._closed else "sink closed")
        return self._pool

    def _backoff(self) -> Backoff:
        return Backoff(self._db.retry_initial_backoff_s, self._db.retry_max_backoff_s, self._rng)

    def _set_ok(self) -> None:
        self._state, self._reason = "ok", None

    async def _retry_wait(self, backoff: Backoff, what: str, exc: BaseException) -> None:
        forget_traceback(exc)  # a transient error is logged as text, then retried
        delay = backoff.next_delay()
        self._state, self._reason = "degraded", f"{what} failed, retrying: {error_text(exc)}"
        now = self._clock.monotonic()
        if backoff.attempts == 1 or now - self._last_retry_log >= RETRY_LOG_INTERVAL_S:
            self._last_retry_log = now
            log.warning(
                "%s failed (attempt %d), retrying in %.2fs: %s",
                what,
                backoff.attempts,
                delay,
                error_text(exc),
                extra={"component": COMPONENT},
            )
        await asyncio.sleep(delay)

    async def with_retry(self, what: str, fn: Callable[[asyncpg.Connection], Any]) -> Any:
        """`fn(conn)` on a pooled connection; transient errors are retried with backoff.

        For the daemon's other start-up reads of the same database (alarm state), so a
        connection lost at that moment is retried like the sink's own statements.
        """
        backoff: Backoff | None = None
        while True:
            pool = self._require_pool()
            try:
                async with pool.acquire(timeout=self._db.connect_timeout_s) as conn:
                    try:
                        result = await fn(conn)
                    except Exception as exc:
                        if classify(exc) == "transient":
                            _terminate(conn)
                        raise
                self._set_ok()
                return result
            except Exception as exc:
                if classify(exc) != "transient":
                    raise
                backoff = backoff or self._backoff()
                await self._retry_wait(backoff, what, exc)


def _is_open(conn: asyncpg.Connection) -> bool:
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        # A pooled connection that was lost is released back to the pool at once;
        # its proxy then refuses every call.
        return False


def _terminate(conn: asyncpg.Connection) -> None:
    if _is_open(conn):
        conn.terminate()


async def _rollback_quietly(tr: Any, conn: asyncpg.Connection) -> None:
    if not _is_open(conn):
        return
    try:
        await tr.rollback()
    except Exception:
        _terminate(conn)
