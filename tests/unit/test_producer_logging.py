"""forwarder.producers.logging: the API's and the worker's JSON lines (DESIGN.md section 2)."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from forwarder.event import Level
from forwarder.pipeline.normalize import normalize
from forwarder.producers.logging import (
    JsonLogFormatter,
    setup_logging,
    trace_context,
    trace_id_var,
)

CREATED = datetime(2024, 7, 1, 12, 34, 56, 789123, tzinfo=UTC).timestamp()
NOW = datetime(2030, 1, 1, tzinfo=UTC)
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Every test leaves the process's logging exactly as it found it."""
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    saved = {
        n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
        for n in SERVER_LOGGERS
    }
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in saved_root[0]:
                handler.close()
        root.handlers[:] = saved_root[0]
        root.setLevel(saved_root[1])
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate


def make_record(
    msg: str = "hello",
    *args: Any,
    level: int = logging.INFO,
    name: str = "app.orders",
    extra: dict[str, Any] | None = None,
    exc_info: Any = None,
    sinfo: str | None = None,
) -> logging.LogRecord:
    logger = logging.getLogger(name)
    record = logger.makeRecord(
        name, level, "orders.py", 12, msg, args, exc_info, "pay", extra, sinfo
    )
    record.created = CREATED
    return record


def fmt(record: logging.LogRecord, service: str = "api") -> dict[str, Any]:
    line = JsonLogFormatter(service).format(record)
    assert "\n" not in line  # one record, one line, whatever it holds
    return orjson.loads(line)


def capture(service: str = "worker", level: str = "DEBUG") -> io.StringIO:
    stream = io.StringIO()
    setup_logging(service, level, stream)
    return stream


def lines_of(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def raise_chained() -> None:
    try:
        {}["missing"]
    except KeyError as exc:
        raise RuntimeError("payment failed") from exc


# -- the line ------------------------------------------------------------------------------


def test_plain_record_is_exactly_the_schema_line() -> None:
    line = JsonLogFormatter("api").format(make_record("order %s paid", 42))
    assert line == (
        '{"ts":"2024-07-01T12:34:56.789Z","service":"api","level":"INFO",'
        '"event":"app.orders","message":"order 42 paid","meta":{"logger":"app.orders"}}'
    )


def test_extra_fields_go_to_meta_and_event_comes_from_extra() -> None:
    record = make_record(
        "paid",
        extra={"event": "order.paid", "order_id": 42, "bot": {"id": 7, "tags": ["a"]}},
    )
    assert fmt(record) == {
        "ts": "2024-07-01T12:34:56.789Z",
        "service": "api",
        "level": "INFO",
        "event": "order.paid",
        "message": "paid",
        "meta": {"logger": "app.orders", "order_id": 42, "bot": {"id": 7, "tags": ["a"]}},
    }


def test_computed_facts_win_over_extra_fields_of_the_same_name() -> None:
    record = make_record("x", level=logging.DEBUG, extra={"logger": "fake", "original_level": "?"})
    assert fmt(record)["meta"] == {"logger": "app.orders", "original_level": "DEBUG"}


@pytest.mark.parametrize(
    ("levelno", "level", "original"),
    [
        (logging.DEBUG, "INFO", "DEBUG"),
        (logging.INFO, "INFO", None),
        (logging.WARNING, "WARNING", None),
        (logging.ERROR, "ERROR", None),
        (logging.CRITICAL, "ERROR", "CRITICAL"),
        (5, "INFO", "Level 5"),
        (35, "WARNING", "Level 35"),
        (60, "ERROR", "Level 60"),
    ],
)
def test_levels_map_to_the_three_schema_levels(
    levelno: int, level: str, original: str | None
) -> None:
    out = fmt(make_record("x", level=levelno))
    assert out["level"] == level
    assert out["meta"].get("original_level") == original


def test_exception_with_chained_cause_is_one_record_with_the_whole_traceback() -> None:
    stream = capture("api")
    try:
        raise_chained()
    except RuntimeError:
        logging.getLogger("app.pay").exception("charge %s failed", "c-1", extra={"order": 9})

    [line] = lines_of(stream)
    assert line["level"] == "ERROR"
    assert line["event"] == "app.pay"
    assert line["message"] == "charge c-1 failed"
    meta = line["meta"]
    assert meta["order"] == 9
    assert meta["exc_type"] == "RuntimeError"
    assert meta["exc_message"] == "payment failed"
    tb = meta["traceback"]
    assert tb.startswith("Traceback (most recent call last):")
    assert "KeyError: 'missing'" in tb
    assert "The above exception was the direct cause of the following exception:" in tb
    assert tb.endswith("RuntimeError: payment failed")
    assert tb.index("KeyError") < tb.index("RuntimeError: payment failed")
    assert 'in raise_chained\n    {}["missing"]' in tb


def test_exception_group_traceback_holds_every_sub_exception() -> None:
    try:
        raise ExceptionGroup("jobs failed", [ValueError("bad row"), OSError("disk full")])
    except ExceptionGroup:
        record = make_record("batch", level=logging.ERROR, exc_info=sys.exc_info())
    meta = fmt(record)["meta"]
    assert meta["exc_type"] == "ExceptionGroup"
    assert meta["exc_message"] == "jobs failed (2 sub-exceptions)"
    assert "ValueError: bad row" in meta["traceback"]
    assert "OSError: disk full" in meta["traceback"]


def test_exception_type_is_named_as_the_traceback_names_it() -> None:
    try:
        orjson.loads(b"{")
    except orjson.JSONDecodeError:
        record = make_record("x", level=logging.ERROR, exc_info=sys.exc_info())
    meta = fmt(record)["meta"]
    assert meta["exc_type"] == "orjson.JSONDecodeError"
    assert meta["traceback"].splitlines()[-1].startswith("orjson.JSONDecodeError: ")


def test_warning_with_exc_info_keeps_its_level() -> None:
    try:
        raise TimeoutError("slow")
    except TimeoutError:
        record = make_record("retrying", level=logging.WARNING, exc_info=sys.exc_info())
    out = fmt(record)
    assert out["level"] == "WARNING"
    assert out["meta"]["exc_type"] == "TimeoutError"


def test_stack_info_goes_to_meta() -> None:
    stream = capture()
    logging.getLogger("app").info("where", stack_info=True)
    [line] = lines_of(stream)
    assert line["meta"]["stack_info"].startswith("Stack (most recent call last):")
    assert "test_stack_info_goes_to_meta" in line["meta"]["stack_info"]


def test_values_json_cannot_hold_are_rendered_with_repr() -> None:
    class Thing:
        def __repr__(self) -> str:
            return "<Thing 1>"

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    cycle: list[Any] = []
    cycle.append(cycle)
    extra = {
        "thing": Thing(),
        "ids": {3},
        "raw": b"\x00\xff",
        "huge": 2**80,
        "cycle": cycle,
        "pair_keys": {(1, 2): "x"},
        "broken": Broken(),
        "when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "ok": [1, "two", None, 3.5],
    }
    meta = fmt(make_record("x", extra=extra))["meta"]
    assert meta == {
        "logger": "app.orders",
        "thing": "<Thing 1>",
        "ids": "{3}",
        "raw": "b'\\x00\\xff'",
        "huge": str(2**80),
        "cycle": "[[...]]",
        "pair_keys": "{(1, 2): 'x'}",
        "broken": f"<unrepresentable {Broken.__qualname__}>",
        "when": "2024-01-02T03:04:05+00:00",
        "ok": [1, "two", None, 3.5],
    }


def test_message_with_lone_surrogate_or_bad_arguments_still_gives_a_line() -> None:
    out = fmt(make_record("bad \ud800 text"))
    assert out["message"] == "bad \\ud800 text"
    out = fmt(make_record("count %d", "x"))
    assert out["message"] == "count %d % ('x',)"
    assert "format_error" in out["meta"]


# -- trace ids -----------------------------------------------------------------------------


async def test_trace_id_comes_from_the_contextvar_of_each_asyncio_task() -> None:
    stream = capture("api")
    log = logging.getLogger("app.http")
    both_set = asyncio.Event()
    started = 0

    async def request(trace_id: str) -> None:
        nonlocal started
        with trace_context(trace_id):
            started += 1
            if started == 2:
                both_set.set()
            await both_set.wait()  # both contexts are live at the same time
            log.info("handled %s", trace_id)

    await asyncio.gather(asyncio.create_task(request("t-1")), asyncio.create_task(request("t-2")))
    log.info("outside")

    by_message = {line["message"]: line["meta"] for line in lines_of(stream)}
    assert by_message["handled t-1"]["trace_id"] == "t-1"
    assert by_message["handled t-2"]["trace_id"] == "t-2"
    assert "trace_id" not in by_message["outside"]
    assert trace_id_var.get() is None


def test_trace_context_makes_an_id_when_none_is_given_and_extra_wins() -> None:
    with trace_context() as generated:
        assert len(generated) == 32
        assert trace_id_var.get() == generated
        assert fmt(make_record("x"))["meta"]["trace_id"] == generated
        assert fmt(make_record("x", extra={"trace_id": "explicit"}))["meta"]["trace_id"] == (
            "explicit"
        )
    assert trace_id_var.get() is None


def test_trace_id_var_set_directly_is_used_too() -> None:
    token = trace_id_var.set("job-77")
    try:
        assert fmt(make_record("x"))["meta"]["trace_id"] == "job-77"
    finally:
        trace_id_var.reset(token)


# -- setup_logging ---------------------------------------------------------------------------


def test_setup_writes_to_stdout_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("worker")
    logging.getLogger("jobs").info("started", extra={"event": "job.started"})
    logging.getLogger("jobs").debug("hidden at INFO")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    line = orjson.loads(out[0])
    assert (line["service"], line["event"], line["message"]) == ("worker", "job.started", "started")


def test_setup_is_idempotent() -> None:
    root = logging.getLogger()
    root.addHandler(logging.StreamHandler(sys.stderr))  # basicConfig's, set up earlier
    kept = logging.NullHandler()
    root.addHandler(kept)
    first = io.StringIO()
    setup_logging("api", "INFO", first)
    setup_logging("api", "INFO", first)
    second = io.StringIO()
    setup_logging("worker", "WARNING", second)
    setup_logging("worker", "WARNING", second)

    logging.getLogger("app").warning("once")
    logging.getLogger("app").info("below the level")
    assert first.getvalue() == ""
    [line] = lines_of(second)
    assert (line["service"], line["message"]) == ("worker", "once")
    assert kept in root.handlers
    consoles = [h for h in root.handlers if type(h) is logging.StreamHandler]
    assert consoles == []
    assert root.level == logging.WARNING


def test_uvicorn_lines_go_through_the_root_handler_once() -> None:
    # What uvicorn's default dictConfig leaves behind: its own handlers, propagate off.
    text = io.StringIO()
    for name in ("uvicorn", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.addHandler(logging.StreamHandler(text))
        logger.propagate = False
    stream = capture("api", "INFO")
    logging.getLogger("uvicorn.error").info("Application startup complete.")
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "10.0.0.1:5000", "GET", "/orders?x=1", "1.1", 503
    )

    assert text.getvalue() == ""
    lines = lines_of(stream)
    assert [(line["event"], line["message"]) for line in lines] == [
        ("uvicorn.error", "Application startup complete."),
        ("uvicorn.access", '10.0.0.1:5000 - "GET /orders?x=1 HTTP/1.1" 503'),
    ]
    assert lines[1]["meta"] == {
        "logger": "uvicorn.access",
        "client_addr": "10.0.0.1:5000",
        "method": "GET",
        "path": "/orders?x=1",
        "http_version": "1.1",
        "status_code": 503,
    }


# -- what the forwarder makes of these lines ---------------------------------------------------


def produced_lines() -> list[tuple[str, logging.LogRecord]]:
    records = [make_record("order %s paid", 42)]
    records.append(make_record("paid", extra={"event": "order.paid", "order_id": 42, "x": {1}}))
    records.append(make_record("debug", level=logging.DEBUG))
    records.append(make_record("fatal", level=logging.CRITICAL, name="worker.loop"))
    records.append(make_record("careful", level=logging.WARNING, extra={"retry": 3}))
    try:
        raise_chained()
    except RuntimeError:
        records.append(make_record("failed", level=logging.ERROR, exc_info=sys.exc_info()))
    with trace_context("t-9"):
        records.append(make_record("traced", sinfo="Stack (most recent call last):\n  x"))
    formatter = JsonLogFormatter("worker")
    return [(formatter.format(record), record) for record in records]


@pytest.mark.parametrize(("line", "record"), produced_lines())
def test_normalize_turns_each_line_into_the_same_event(
    line: str, record: logging.LogRecord
) -> None:
    produced = orjson.loads(line)
    event = normalize(line.encode(), "configured", NOW)

    created = datetime.fromtimestamp(record.created, UTC)
    assert event.ts == created.replace(microsecond=created.microsecond // 1000 * 1000)
    assert event.service == produced["service"] == "worker"
    assert event.level == Level(produced["level"])
    assert event.event == produced["event"]
    assert event.message == produced["message"] == record.getMessage()
    assert dict(event.meta) == produced["meta"]
