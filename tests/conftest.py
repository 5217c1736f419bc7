"""A real PostgreSQL for every test that needs one.

FORWARDER_TEST_DSN names a running server (CI sets it to the machine's service);
otherwise one embedded PostgreSQL is started for the session in a temporary folder.
Each test gets its own schema, dropped afterwards.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.dockerd_fixtures import new_dockerd, real_dockerd  # noqa: F401 (fixtures)
from tests.support import FakeClock


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    dsn = os.environ.get("FORWARDER_TEST_DSN")
    if dsn:
        yield dsn
        return
    from forwarder.sinks.embedded import start_embedded

    folder = Path(tempfile.mkdtemp(prefix="forwarder-test-pg-"))
    server = start_embedded(folder / "pg")
    try:
        yield server.dsn
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def pg_schema(pg_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty schema name for this test; dropped with everything in it after."""
    name = "t_" + secrets.token_hex(6)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
    finally:
        await conn.close()
    yield name
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'DROP SCHEMA "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def pg_conn(pg_dsn: str, pg_schema: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection whose search_path is the test's own schema."""
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema})
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()
