"""JSON log lines in the forwarder's schema, for the API and the worker (DESIGN.md section 2).

One call at startup (the strategy's ``logging_config.py``)::

    from forwarder.producers.logging import setup_logging, trace_context

    setup_logging("api")                      # or "worker"; level="DEBUG", stream=...

    @app.middleware("http")                   # FastAPI: one trace id per request
    async def with_trace_id(request, call_next):
        with trace_context(request.headers.get("x-request-id")):
            return await call_next(request)

    log.info("order paid", extra={"event": "order.paid", "order_id": 42})

Every record becomes one line::

    {"ts":"2024-07-01T12:34:56.789Z","service":"api","level":"INFO","event":"order.paid",
     "message":"order paid","meta":{"logger":"app.orders","order_id":42,"trace_id":"..."}}

* ``level`` is INFO, WARNING or ERROR; DEBUG (and custom levels below WARNING) become
  INFO and CRITICAL (and custom levels above ERROR) become ERROR, the original level
  name kept in ``meta.original_level``.
* ``event`` is the ``event`` passed through ``extra=``, else the logger name.
* ``meta`` holds every other ``extra=`` field (a value JSON cannot hold is rendered with
  ``repr``), ``logger``, ``trace_id`` from `trace_id_var` when set (an explicit
  ``extra={"trace_id": ...}`` wins), ``stack_info`` when asked for, and for an exception
  ``exc_type``, ``exc_message`` and ``traceback``: the whole traceback, chained causes and
  exception groups included, in the same single line. Facts the formatter computes win
  over ``extra=`` fields of the same name.
* uvicorn's access lines also get ``client_addr``, ``method``, ``path``, ``http_version``
  and ``status_code`` in meta.

The formatter never raises: a message whose ``%`` arguments do not match is kept as
``msg % args`` text with ``meta.format_error``.

uvicorn: `setup_logging` routes uvicorn's loggers through the root handler. When the app
starts uvicorn itself, pass ``log_config=None`` to ``uvicorn.run`` (or call
`setup_logging` after it), otherwise uvicorn's own dictConfig installs its text handlers
again.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import orjson

__all__ = [
    "JsonLogFormatter",
    "setup_logging",
    "trace_context",
    "trace_id_var",
]

trace_id_var: ContextVar[str | None] = ContextVar("forwarder_trace_id", default=None)
"""The current request's or job's trace id; every record logged in that context carries it."""

# Attributes every LogRecord has; anything else was passed through `extra=` and goes to meta.
_RECORD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
_EXACT_LEVELS: Final = {"INFO": "INFO", "WARNING": "WARNING", "ERROR": "ERROR"}
_DUMPS_OPTIONS: Final = orjson.OPT_NON_STR_KEYS

# Loggers that servers give their own handlers; setup_logging sends them to the root one.
_SERVER_LOGGERS: Final = (
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "uvicorn.asgi",
    "gunicorn",
    "gunicorn.error",
    "gunicorn.access",
)
_ACCESS_FIELDS: Final = ("client_addr", "method", "path", "http_version", "status_code")


class JsonLogFormatter(logging.Formatter):
    """Formats a LogRecord as one schema line: ts, service, level, event, message, meta."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        meta: dict[str, Any] = {"logger": record.name}
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key != "event":
                meta[key] = value
        meta["logger"] = record.name

        if "trace_id" not in meta:
            trace_id = trace_id_var.get()
            if trace_id is not None:
                meta["trace_id"] = trace_id

        levelname = record.levelname
        level = _EXACT_LEVELS.get(levelname)
        if level is None:
            level = _level_of(record.levelno)
            meta["original_level"] = levelname

        message = _message_of(record, meta)
        if record.name == "uvicorn.access":
            _access_fields(record, meta)
        if record.exc_info:
            _exception_fields(record.exc_info, meta)
        if record.stack_info:
            meta["stack_info"] = record.stack_info

        event = getattr(record, "event", None)
        if event is None or event == "":
            event = record.name or "root"
        elif not isinstance(event, str):
            event = _safe_repr(event) if not isinstance(event, int | float) else str(event)

        line = {
            "ts": _iso_utc(record.created),
            "service": self.service,
            "level": level,
            "event": event,
            "message": message,
            "meta": meta,
        }
        try:  # one pass in the usual case: unknown types become their repr
            return orjson.dumps(line, default=_safe_repr, option=_DUMPS_OPTIONS).decode()
        except (TypeError, orjson.JSONEncodeError):
            # A value orjson refuses even so (an int over 64 bits, a cycle, a tuple key, a
            # lone surrogate): that value alone becomes its repr.
            line["meta"] = {_safe_str(k): _json_safe(v) for k, v in meta.items()}
            safe = _scrub_strings(line)
            return orjson.dumps(safe, default=_safe_repr, option=_DUMPS_OPTIONS).decode()


def setup_logging(service: str, level: str | int = "INFO", stream: TextIO | None = None) -> None:
    """Send every log record of this process to one JSON handler (stdout by default).

    One call at startup for the API and the worker. Idempotent: a second call replaces
    the handler it installed (new service, level or stream) instead of adding one.
    Console handlers already on the root logger (``logging.basicConfig``'s) are removed
    so no line is written twice; other handlers (files, test capture) are kept.
    uvicorn's and gunicorn's loggers lose their own handlers and propagate to the root
    logger, so each of their lines is written once, through this formatter.
    """
    handler = _JsonHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonLogFormatter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _JsonHandler) or _is_console_handler(old):
            root.removeHandler(old)
            if isinstance(old, _JsonHandler):
                old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in _SERVER_LOGGERS:
        server_logger = logging.getLogger(name)
        server_logger.handlers.clear()
        server_logger.propagate = True


@contextlib.contextmanager
def trace_context(trace_id: str | None = None) -> Iterator[str]:
    """Set `trace_id_var` for the block (a new random id when none is given); yields it.

    Pass an id from a trusted header (x-request-id, traceparent) or none at all: the
    value lands in every line logged inside the block.
    """
    value = trace_id or uuid.uuid4().hex
    token = trace_id_var.set(value)
    try:
        yield value
    finally:
        trace_id_var.reset(token)


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler setup_logging installs (a marker type, so a second call finds it)."""


def _is_console_handler(handler: logging.Handler) -> bool:
    if type(handler) is not logging.StreamHandler:
        return False
    consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return any(handler.stream is console for console in consoles)


def _iso_utc(created: float) -> str:
    when = datetime.fromtimestamp(created, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _level_of(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "ERROR"
    if levelno >= logging.WARNING:
        return "WARNING"
    return "INFO"


def _message_of(record: logging.LogRecord, meta: dict[str, Any]) -> str:
    try:
        return record.getMessage()
    except Exception as exc:  # mismatched % arguments: keep what was logged
        meta["format_error"] = _safe_repr(exc)
        return f"{_safe_str(record.msg)} % {_safe_repr(record.args)}"


def _access_fields(record: logging.LogRecord, meta: dict[str, Any]) -> None:
    args = record.args
    if isinstance(args, tuple) and len(args) == len(_ACCESS_FIELDS):
        for key, value in zip(_ACCESS_FIELDS, args, strict=True):
            meta[key] = _json_safe(value)


def _exception_fields(exc_info: Any, meta: dict[str, Any]) -> None:
    exc = exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) == 3 else None
    if not isinstance(exc, BaseException):
        return
    cls = type(exc)
    module = cls.__module__
    # As the traceback's last line names it (what the forwarder reads from text tracebacks).
    meta["exc_type"] = (
        cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"
    )
    meta["exc_message"] = _safe_str(exc)
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception as failure:  # a broken __str__ or __notes__ deep in the chain
        text = f"{meta['exc_type']}: (traceback unavailable: {_safe_repr(failure)})"
    meta["traceback"] = text.rstrip("\n")


def _json_safe(value: Any) -> Any:
    """`value` when orjson can encode it (unknown types as their repr), else its repr."""
    if isinstance(value, str):
        return _encodable(value)
    try:
        orjson.dumps(value, default=_safe_repr, option=_DUMPS_OPTIONS)
    except (TypeError, orjson.JSONEncodeError):
        return _safe_repr(value)
    return value


def _safe_repr(value: Any) -> str:
    try:
        return _encodable(repr(value))
    except Exception:
        return f"<unrepresentable {type(value).__qualname__}>"


def _safe_str(value: Any) -> str:
    try:
        return _encodable(str(value))
    except Exception:
        return _safe_repr(value)


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _scrub_strings(value: Any) -> Any:
    if isinstance(value, str):
        return _encodable(value)
    if isinstance(value, dict):
        return {_scrub_strings(k): _scrub_strings(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_strings(v) for v in value]
    return value
