"""The daemon's own logs: JSON lines in the product's schema on stderr.

service is always "forwarder", so these lines can be told apart if anyone collects
them; the forwarder itself never tails its own stderr.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

# Attributes every LogRecord has; anything else was passed through `extra=` and goes to meta.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
_LEVELS = {"DEBUG": "INFO", "INFO": "INFO", "WARNING": "WARNING", "ERROR": "ERROR"}


class JsonLogFormatter(logging.Formatter):
    """Formats a LogRecord as one schema line: ts, service, level, event, message, meta."""

    def __init__(self, service: str = "forwarder") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        meta: dict[str, Any] = {"logger": record.name}
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key != "event":
                meta[key] = value
        if record.levelname not in ("INFO", "WARNING", "ERROR"):
            meta["original_level"] = record.levelname
        if record.exc_info:
            meta["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            meta["traceback"] = self.formatException(record.exc_info)
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "service": self.service,
            "level": _LEVELS.get(record.levelname, "ERROR"),
            "event": getattr(record, "event", None) or record.name,
            "message": record.getMessage(),
            "meta": meta,
        }
        return orjson.dumps(line, default=str).decode()


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route every logger of this process to one JSON handler on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
