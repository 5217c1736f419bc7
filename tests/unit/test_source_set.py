"""SourceSet: per-source stops, and the order of a replace (stop, flush, start)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from forwarder.sources.running import SourceSet, SourceStartError, diff_sources
from tests.support import wait_until


class Counter:
    """A source putting (name, n) items until stopped, or `limit` of them (a backfill)."""

    def __init__(self, name: str, journal: list[str], limit: int | None = None) -> None:
        self.name = name
        self.journal = journal
        self.limit = limit

    async def run(self, out: asyncio.Queue[Any], stop: asyncio.Event) -> None:
        self.journal.append(f"start {self.name}")
        n = 0
        while not stop.is_set() and (self.limit is None or n < self.limit):
            await out.put((self.name, n))
            n += 1
            await asyncio.sleep(0)  # like a real source between reads
        self.journal.append(f"stop {self.name}")

    def status(self) -> dict[str, Any]:
        return {"state": "ok"}

    def progress(self) -> tuple[int, int]:
        return 0, 0


def test_diff_compares_configs_by_value() -> None:
    changes = diff_sources({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 20, "d": 4})
    assert (changes.added, changes.removed, changes.changed) == (("d",), ("c",), ("b",))
    assert not diff_sources({"a": 1}, {"a": 1})


async def test_replace_stops_then_flushes_then_starts_and_leaves_the_rest_alone() -> None:
    journal: list[str] = []
    out: asyncio.Queue[Any] = asyncio.Queue(maxsize=4)
    stop = asyncio.Event()
    sources = SourceSet(out, stop)
    keep = Counter("keep", journal)
    sources.add("keep", keep, {"v": 1})
    sources.add("gone", Counter("gone", journal), {"v": 1})
    sources.add("changed", Counter("changed", journal), {"v": 1})
    sources.add("intake", Counter("intake", journal))  # no config: never reloaded
    running = asyncio.create_task(sources.run())
    consumer = asyncio.create_task(_drain(out))

    async def flush() -> None:
        journal.append("flush")

    async def build(config: dict[str, Any]) -> Counter:
        return Counter(config["name"], journal)

    await wait_until(
        lambda: {"start keep", "start gone", "start changed", "start intake"} <= set(journal),
        what="the sources started",
    )
    changes = await sources.replace(
        {
            "keep": {"v": 1},
            "changed": {"v": 2, "name": "changed2"},
            "new": {"v": 1, "name": "new"},
        },
        build,
        flush,
    )
    assert (changes.added, changes.removed, changes.changed) == (("new",), ("gone",), ("changed",))
    flushed = journal.index("flush")
    assert {"stop gone", "stop changed"} <= set(journal[:flushed])
    assert sorted(sources.configs()) == ["changed", "keep", "new"]
    assert "keep" in [s.name for s in sources] and "intake" in [s.name for s in sources]
    assert "stop keep" not in journal and "stop intake" not in journal
    stop.set()
    await asyncio.wait_for(running, 5)
    consumer.cancel()
    assert {"start changed2", "start new"} <= set(journal[flushed:])
    assert {"stop keep", "stop intake", "stop changed2", "stop new"} <= set(journal)


async def test_a_source_that_cannot_be_built_is_reported_after_the_others_start() -> None:
    journal: list[str] = []
    out: asyncio.Queue[Any] = asyncio.Queue()
    stop = asyncio.Event()
    sources = SourceSet(out, stop)
    running = asyncio.create_task(sources.run())
    await asyncio.sleep(0)

    async def build(config: dict[str, Any]) -> Counter:
        if config["name"] == "bad":
            raise OSError("no such socket")
        return Counter(config["name"], journal, limit=1)

    async def flush() -> None:
        pass

    with pytest.raises(SourceStartError, match="source bad could not start: no such socket"):
        await sources.replace({"bad": {"name": "bad"}, "good": {"name": "good"}}, build, flush)
    assert sorted(sources.configs()) == ["good"]
    stop.set()
    await asyncio.wait_for(running, 5)
    assert "start good" in journal


async def test_a_backfill_ends_when_every_source_has_returned_and_is_never_replaced() -> None:
    journal: list[str] = []
    out: asyncio.Queue[Any] = asyncio.Queue()
    stop = asyncio.Event()
    sources = SourceSet(out, stop, exit_on_eof=True)
    sources.add("a", Counter("a", journal, limit=3), {"v": 1})
    sources.add("b", Counter("b", journal, limit=5), {"v": 1})
    running = asyncio.create_task(sources.run())
    await wait_until(lambda: {"start a", "start b"} <= set(journal), what="the sources started")

    async def never(_: Any) -> Counter:
        raise AssertionError("a backfill's sources are fixed")

    async def flush() -> None:
        raise AssertionError("nothing to flush")

    assert not await sources.replace({}, never, flush)
    await asyncio.wait_for(running, 5)
    assert out.qsize() == 8 and not stop.is_set()


async def _drain(q: asyncio.Queue[Any]) -> None:
    while True:
        await q.get()


async def test_a_new_source_cannot_take_the_name_of_one_that_is_never_reloaded() -> None:
    journal: list[str] = []
    stop = asyncio.Event()
    sources = SourceSet(asyncio.Queue(), stop)
    sources.add("http", Counter("http", journal))  # the intake: no config
    running = asyncio.create_task(sources.run())
    await asyncio.sleep(0)

    async def build(config: dict[str, Any]) -> Counter:
        return Counter("file", journal)

    async def flush() -> None:
        pass

    with pytest.raises(SourceStartError, match="source http could not start: the name is taken"):
        await sources.replace({"http": {"v": 1}}, build, flush)
    assert [s.name for s in sources] == ["http"]
    stop.set()
    await asyncio.wait_for(running, 5)
