"""Fixtures shared by the alarm tests: an HTTP receiver and a client session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.component.receiver import Receiver
from tests.component.tailing import tail  # noqa: F401 (a fixture for the FileSource tests)
from tests.support import serving


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    async with serving(app) as rec.base:
        try:
            yield rec
        finally:
            rec.released.set()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s
