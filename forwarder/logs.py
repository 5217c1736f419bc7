"""The daemon's own logs: JSON lines in the product's schema on stderr.

They use the same formatter the API and the worker use (forwarder.producers.logging),
with service "forwarder", so these lines can be told apart if anyone collects them;
the forwarder itself never tails its own stderr.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from forwarder.producers.logging import JsonLogFormatter

SERVICE = "forwarder"


def daemon_formatter() -> JsonLogFormatter:
    return JsonLogFormatter(SERVICE)


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route every logger of this process to one JSON handler on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(daemon_formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
