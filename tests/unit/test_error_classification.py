"""Error decisions of the PostgreSQL sink: classify, row errors, lost commit acks, backoff."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from types import MappingProxyType

import asyncpg
import orjson
import pytest

from forwarder.event import Event, Level, Position
from forwarder.sinks.batch import Batch
from forwarder.sinks.postgres import (
    END_OF_STREAM,
    Backoff,
    CommitInDoubtError,
    EndOfStream,
    checkpoints_match,
    classify,
    encode_batch,
    error_text,
    failed_copy_line,
    is_row_error,
    resolve_lost_ack,
    server_settings,
    storable,
)


def pg(sqlstate: str, message: str = "boom", **fields: str) -> asyncpg.PostgresError:
    codes = {"detail": "D", "context": "W"}
    raw = {"C": sqlstate, "M": message} | {codes[k]: v for k, v in fields.items()}
    return asyncpg.PostgresError.new(raw)


@pytest.mark.parametrize(
    "sqlstate",
    [
        "57P01",  # admin_shutdown, pg_terminate_backend
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now
        "53300",  # too_many_connections
        "53100",  # disk_full
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "08006",  # connection_failure
        "08003",  # connection_does_not_exist
        "55P03",  # lock_not_available
        "57014",  # query_canceled (statement_timeout)
        "58030",  # io_error
    ],
)
def test_server_errors_that_go_away_are_transient(sqlstate: str) -> None:
    assert classify(pg(sqlstate)) == "transient"
    assert not is_row_error(pg(sqlstate))


@pytest.mark.parametrize(
    "exc",
    [
        OSError("network is unreachable"),
        ConnectionRefusedError(111, "refused"),
        ConnectionResetError(104, "reset by peer"),
        TimeoutError(),
        TimeoutError(),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.InterfaceError("cannot perform operation: connection is closed"),
        asyncpg.InterfaceError("cannot perform operation: another operation is cancelling"),
        asyncpg.exceptions.ProtocolError("unexpected message"),
        CommitInDoubtError("xid 1 in progress"),
    ],
)
def test_client_side_connection_trouble_is_transient(exc: BaseException) -> None:
    assert classify(exc) == "transient"


@pytest.mark.parametrize(
    "sqlstate",
    [
        "22021",  # character_not_in_repertoire: NUL / bad encoding
        "22P05",  # untranslatable_character: \u0000 in jsonb
        "22P02",  # invalid_text_representation
        "22003",  # numeric_value_out_of_range
        "22008",  # datetime_field_overflow
        "23514",  # check_violation
        "23502",  # not_null_violation
        "54000",  # program_limit_exceeded: index row too large
    ],
)
def test_data_errors_are_permanent_and_attributable_to_a_row(sqlstate: str) -> None:
    assert classify(pg(sqlstate)) == "permanent"
    assert is_row_error(pg(sqlstate))


@pytest.mark.parametrize(
    "sqlstate",
    [
        "42P01",  # undefined_table
        "42501",  # insufficient_privilege
        "42703",  # undefined_column
        "3F000",  # invalid_schema_name
        "28P01",  # invalid_password
        "3D000",  # invalid_catalog_name
        "XX000",  # internal_error
        "XY123",  # unknown to asyncpg
    ],
)
def test_structural_errors_are_permanent_but_not_a_row_problem(sqlstate: str) -> None:
    assert classify(pg(sqlstate)) == "permanent"
    assert not is_row_error(pg(sqlstate))


@pytest.mark.parametrize(
    "exc",
    [
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
        TypeError("expected str, got int"),
        ValueError("bad value"),
        OverflowError("int too big to convert"),
        asyncpg.exceptions._base.DataError("invalid input for query argument $1"),
    ],
)
def test_values_the_client_cannot_encode_are_permanent_row_errors(exc: BaseException) -> None:
    assert classify(exc) == "permanent"
    assert is_row_error(exc)


def test_a_closed_pool_is_permanent() -> None:
    assert classify(asyncpg.InterfaceError("pool is closed")) == "permanent"
    assert classify(asyncpg.InterfaceError("pool is closing")) == "permanent"
    assert not is_row_error(asyncpg.InterfaceError("pool is closed"))


def test_unexpected_exceptions_are_permanent() -> None:
    assert classify(RuntimeError("bug")) == "permanent"
    assert not is_row_error(RuntimeError("bug"))


def test_the_row_a_copy_failed_on_is_read_from_the_error_context() -> None:
    exc = pg(
        "22P05", context='JSON data, line 1: "\\u0000...\nCOPY system_logs, line 7, column meta'
    )
    assert failed_copy_line(exc) == 7
    assert failed_copy_line(pg("23514", context="COPY system_logs, line 12")) == 12
    assert failed_copy_line(pg("23514")) is None
    assert failed_copy_line(ValueError("line 3")) is None


def test_error_text_names_sqlstate_message_and_detail() -> None:
    exc = pg("23514", 'violates check constraint "no_poison"', detail="Failing row contains (x)")
    text = error_text(exc)
    assert text.startswith("23514 CheckViolationError: ")
    assert "no_poison" in text and "Failing row contains (x)" in text
    assert error_text(ValueError("a\x00b")) == "ValueError: a\ufffdb"


# --- the lost COMMIT acknowledgement ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "match", "decision"),
    [
        ("committed", None, "skip"),
        ("committed", False, "skip"),  # the server's word wins over the checkpoints
        ("aborted", None, "rewrite"),
        ("aborted", True, "rewrite"),
        ("in progress", None, "wait"),
        (None, True, "skip"),  # status forgotten: stored checkpoints equal the batch's
        (None, False, "rewrite"),
        (None, None, "rewrite"),  # nothing to compare: write again
    ],
)
def test_a_lost_commit_ack_is_resolved_from_the_transaction_status(
    status: str | None, match: bool | None, decision: str
) -> None:
    assert resolve_lost_ack(status, match) == decision


def test_checkpoints_match_needs_every_stream_equal() -> None:
    batch = [("ui", "a", 10, {"path": "/a"}), ("ui", "b", 5, {})]
    stored = {("ui", "a"): (10, {"path": "/a"}), ("ui", "b"): (5, {})}
    assert checkpoints_match(batch, stored) is True
    assert checkpoints_match(batch, {**stored, ("ui", "b"): (4, {})}) is False
    assert checkpoints_match(batch, {("ui", "a"): (10, {"path": "/a"})}) is False
    assert checkpoints_match(batch, {**stored, ("ui", "a"): (10, {"path": "/b"})}) is False
    assert checkpoints_match([], stored) is None


# --- backoff ----------------------------------------------------------------------------------


class _Ceiling(random.Random):
    """A Random whose uniform() returns the upper bound: shows the backoff ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_doubles_from_the_initial_wait_up_to_the_cap() -> None:
    b = Backoff(0.5, 30.0, _Ceiling())
    assert [b.next_delay() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    for _ in range(2000):  # never overflows
        assert b.next_delay() == 30.0


def test_backoff_has_full_jitter_and_is_reproducible_with_a_seed() -> None:
    first = Backoff(0.5, 30.0, random.Random(7))
    again = Backoff(0.5, 30.0, random.Random(7))
    delays = [first.next_delay() for _ in range(50)]
    assert delays == [again.next_delay() for _ in range(50)]
    ceilings = [min(30.0, 0.5 * 2**i) for i in range(50)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == 50


# --- values made storable ---------------------------------------------------------------------


def test_storable_replaces_nul_and_surrogates_everywhere() -> None:
    value = {"k\x00": ["a\x00", {"b": "\ud800"}], "n": 2**70, "ok": (1, 2.5, None, True)}
    clean = storable(value)
    assert clean == {
        "k\ufffd": ["a\ufffd", {"b": "?"}],
        "n": str(2**70),
        "ok": [1, 2.5, None, True],
    }
    assert b"\\u0000" not in orjson.dumps(clean)


def ev(meta: object, message: str = "m") -> Event:
    ts = datetime(2026, 11, 26, tzinfo=UTC)
    return Event(ts=ts, service="api", level=Level.INFO, event="e", message=message, meta=meta)  # type: ignore[arg-type]


def test_a_batch_goes_to_copy_as_its_events_with_checkpoints_as_jsonb() -> None:
    events = [ev({"a": 1}), ev({"x": object()})]
    batch = Batch(
        events=events,
        checkpoints=[Position("ui", "a", 10, MappingProxyType({"p": 1}))],
        sources=["ui", "ui"],
    )
    pending = encode_batch(batch)
    assert pending.rows is events  # Event's fields are the table's columns, in order
    assert pending.checkpoint_args == (["ui"], ["a"], [10], [b'\x01{"p":1}'])


def test_the_sink_ends_on_the_pipelines_end_of_stream_marker() -> None:
    from forwarder.pipeline import stage

    assert END_OF_STREAM is stage.END_OF_STREAM
    assert EndOfStream is stage.EndOfStream
    assert repr(END_OF_STREAM) == "END_OF_STREAM"


def test_sessions_are_named_forwarder_unless_the_dsn_says_otherwise() -> None:
    assert server_settings("postgresql://u@h/db") == {"application_name": "forwarder"}
    assert server_settings("postgresql://u@/db?host=/run/pg") == {"application_name": "forwarder"}
    assert server_settings("postgresql://u@h/db?application_name=mine") is None
