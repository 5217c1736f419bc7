"""pytest fixtures for the real dockerd (tests/dockerd.py); registered in tests/conftest.py.

- `real_dockerd`: one private engine for the whole session; tests give their containers
  unique names (and a label of their own, to read only those).
- `new_dockerd`: a factory of fresh engines for one test (restarts, kills, flags such as
  --live-restore); each is closed after the test.

Where the machine cannot run dockerd (not root, packages missing) the test is skipped
with one reason, "no dockerd: run .ci/install-docker (needs root)"; with
FORWARDER_REQUIRE_DOCKER=1 (CI) it fails with that reason instead. An engine that is
installed but does not start always fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import pytest

from tests.dockerd import RealDockerd, real_dockerd_missing


def require_real_dockerd() -> None:
    """Skip (or fail, when FORWARDER_REQUIRE_DOCKER=1) when no dockerd can run here."""
    reason = real_dockerd_missing()
    if reason is None:
        return
    if os.environ.get("FORWARDER_REQUIRE_DOCKER") == "1":
        pytest.fail(f"{reason} (FORWARDER_REQUIRE_DOCKER=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_dockerd() -> Iterator[RealDockerd]:
    require_real_dockerd()
    engine = RealDockerd().start()
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def new_dockerd() -> Iterator[Callable[..., RealDockerd]]:
    """`new_dockerd(flags=("--live-restore",))`: a fresh engine, started, for this test."""
    require_real_dockerd()
    engines: list[RealDockerd] = []

    def start(flags: Sequence[str] = ()) -> RealDockerd:
        engine = RealDockerd(flags=flags)
        engines.append(engine)
        return engine.start()

    yield start
    for engine in engines:
        engine.close()
