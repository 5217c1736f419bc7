"""Containers of a real dockerd through a real `forwarder run` (files mode).

The engine is the session's private dockerd (tests/dockerd.py); each test labels its
containers with a token of its own and the source reads only those (include_labels),
so tests sharing the engine do not see each other's lines. Ground truth is what dockerd
itself holds in the containers' json-file logs.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests.dockerd import TEST_LABEL, RealDockerd
from tests.integration.daemon import Daemon, connected, write_config
from tests.integration.test_containers import TRACEBACK_PROGRAM
from tests.integration.test_docker_files_real import docker_source

pytestmark = pytest.mark.docker


async def backfill(tmp_path: Path, dsn: str, schema: str, sources: str) -> list:
    """`forwarder run --exit-on-eof` over `sources`; every row, oldest first."""
    config = write_config(tmp_path / "f.toml", dsn=dsn, schema=schema, files={},
                          extra=sources)  # fmt: skip
    daemon = await Daemon(config, "--exit-on-eof").start()
    assert await daemon.wait(60) == 0, daemon.stderr()
    async with connected(dsn, schema) as conn:
        return await conn.fetch(
            "SELECT service, level, event, message, meta FROM system_logs ORDER BY ts, id"
        )


async def test_numbered_lines_of_a_container_are_stored_once_each(
    real_dockerd: RealDockerd, tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    token = secrets.token_hex(4)
    # About 75 bytes a line in json-file: 1,000 lines stay in one file under max-size
    # (no rotation here; rotation has tests of its own).
    printer = real_dockerd.run(
        real_dockerd.busybox_image(),
        "seq",
        "1",
        "1000",
        name=f"numbers-{token}",
        labels={TEST_LABEL: token},
        log_opts={"max-size": "200k", "max-file": "10"},
    )
    assert printer.wait() == 0
    held = printer.messages()  # what dockerd keeps on disk
    assert not list(printer.log_path.parent.glob("*-json.log.*")), "rotated: resize the test"
    assert held == [("stdout", str(n)) for n in range(1, 1001)]

    rows = await backfill(
        tmp_path,
        pg_dsn,
        pg_schema,
        docker_source(real_dockerd, token, read_from='"head"', poll_interval_s="0.02"),
    )

    assert [r["message"] for r in rows] == [text for _, text in held]
    metas = [orjson.loads(r["meta"]) for r in rows]
    assert {(m["container_id"], m["container_name"], m["stream"]) for m in metas} == {
        (printer.id, printer.name, "stdout")
    }
    assert {r["service"] for r in rows} == {printer.name}


@pytest.mark.timeout(600)  # the first run builds the cached Debian rootfs (~75 s)
async def test_a_real_python_traceback_is_one_error_row(
    real_dockerd: RealDockerd, tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    token = secrets.token_hex(4)
    program = 'print("cart service up", flush=True)\n' + TRACEBACK_PROGRAM
    program += '\nprint("still serving", flush=True)\n'
    python = real_dockerd.run(
        real_dockerd.python_image(),
        "python3",
        "-c",
        program,
        name=f"api-{token}",
        init=True,
        labels={TEST_LABEL: token, "com.docker.compose.service": "api"},
    )
    assert python.wait() == 0
    stdout, stderr = python.logs()
    assert stdout == "cart service up\nstill serving\n"
    assert "Traceback (most recent call last):" in stderr and "KeyError: 'cart'" in stderr

    rows = await backfill(
        tmp_path,
        pg_dsn,
        pg_schema,
        docker_source(real_dockerd, token, read_from='"head"', poll_interval_s="0.02"),
    )

    assert {r["service"] for r in rows} == {"api"}  # the compose label
    by_stream: dict[str, list] = {}
    for r in rows:
        by_stream.setdefault(orjson.loads(r["meta"])["stream"], []).append(r)
    assert [r["message"] for r in by_stream["stdout"]] == ["cart service up", "still serving"]
    [failure] = by_stream["stderr"]  # message line and traceback: one row
    assert failure["level"] == "ERROR"
    assert failure["message"].startswith("checkout failed")
    assert failure["message"].rstrip("\n").endswith("KeyError: 'cart'")
    assert failure["message"].count("\n") == stderr.rstrip("\n").count("\n")
    meta = orjson.loads(failure["meta"])
    assert (meta["exc_type"], meta["exc_message"]) == ("KeyError", "'cart'")


def test_an_engine_killed_with_live_restore_comes_back_with_its_container(
    new_dockerd: Callable[..., RealDockerd],
) -> None:
    """The helper's kill -9 and restart (what the matrix's dockerd cells rest on)."""
    engine = new_dockerd(flags=("--live-restore",))
    sleeper = engine.run(engine.busybox_image(), "sleep", "600", init=True)
    engine.kill()
    assert not engine.ping()
    engine.start()  # over the dead engine's pidfiles
    assert sleeper.inspect()["State"]["Running"]
    sleeper.stop(timeout_s=10)
    assert sleeper.wait() == 128 + 15  # docker-init passed SIGTERM on to sleep
