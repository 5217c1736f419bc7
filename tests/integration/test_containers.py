"""Container logs through a real `forwarder run`: dockerd's json-file layout to rows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from tests.component.test_docker_files import Dockerd
from tests.integration.daemon import Daemon, connected, write_config

TRACEBACK_PROGRAM = """
import logging
logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
log = logging.getLogger("shop.api")
try:
    {}["cart"]
except KeyError:
    log.exception("checkout failed")
"""


def python_stderr(program: str) -> str:
    """What a real Python program prints on stderr."""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stderr


async def test_compose_containers_become_rows_of_their_services(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    dockerd = Dockerd(tmp_path / "containers")
    api = dockerd.create("shop-api-1", labels={"com.docker.compose.service": "api"})
    db = dockerd.create("shop-db-1", labels={"com.docker.compose.service": "db"})
    worker = dockerd.create("worker-standalone")
    dockerd.write(api, '{"level":"info","event":"http.request","message":"GET /cart"}')
    dockerd.write(api, "x" * 40_000)  # dockerd splits it into 16 KB pieces
    stderr = python_stderr(TRACEBACK_PROGRAM)
    for text in stderr.splitlines():  # a real traceback, line by line on stderr
        dockerd.write(api, text, stream="stderr")
    dockerd.write(db, "database system is ready to accept connections")
    dockerd.write(worker, "cycle 1 done")
    sources = f"""
[[sources]]
type = "docker"
name = "containers"
containers_dir = "{dockerd.root}"
services = {{ "api" = "shop-api" }}
exclude_containers = ["*-db-*"]
"""
    config = write_config(tmp_path / "f.toml", dsn=pg_dsn, schema=pg_schema, files={},
                          extra=sources)  # fmt: skip
    daemon = await Daemon(config, "--exit-on-eof").start()
    assert await daemon.wait(60) == 0, daemon.stderr()
    async with connected(pg_dsn, pg_schema) as conn:
        rows = await conn.fetch(
            "SELECT service, level, event, message, meta FROM system_logs ORDER BY ts, id"
        )
    by_service: dict[str, list] = {}
    for r in rows:
        by_service.setdefault(r["service"], []).append(r)
    assert set(by_service) == {"shop-api", "worker-standalone"}  # db excluded
    api_rows = by_service["shop-api"]
    assert [r["event"] for r in api_rows][:1] == ["http.request"]
    meta = orjson.loads(api_rows[0]["meta"])
    assert meta["container_name"] == "shop-api-1" and meta["container_id"] == api
    assert meta["stream"] == "stdout"
    assert len(api_rows[1]["message"]) == 40_000  # the pieces joined again
    [failure] = [r for r in api_rows if r["level"] == "ERROR"]
    assert failure["message"].startswith("checkout failed")
    assert "Traceback (most recent call last):" in failure["message"]
    failure_meta = orjson.loads(failure["meta"])
    assert (failure_meta["exc_type"], failure_meta["stream"]) == ("KeyError", "stderr")
    assert len(api_rows) == 3  # the traceback is one row with its message line
    assert by_service["worker-standalone"][0]["message"] == "cycle 1 done"
