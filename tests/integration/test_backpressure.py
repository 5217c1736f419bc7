"""A stalled sink stops reading: memory is bounded by the queues, arithmetic you can assert."""

from __future__ import annotations

import asyncio
from pathlib import Path

from forwarder.clock import SystemClock
from forwarder.config import FileSourceConfig
from forwarder.event import EventChunk, RawChunk
from forwarder.pipeline.stage import EndOfStream, NormalizeStage
from forwarder.sources.file import FileSource
from tests.support import wait_until


async def test_a_stalled_sink_stops_the_source_after_the_queues_fill(tmp_path: Path) -> None:
    budget = 16_384
    line = b'{"level":"info","message":"' + b"x" * 90 + b'"}\n'  # 120 bytes
    log = tmp_path / "big.log"
    log.write_bytes(line * 100_000)  # 12 MB: far more than the queues can hold
    config = FileSourceConfig(
        type="file",
        name="big",
        service="big",
        paths=[str(log)],
        read_budget_bytes=budget,
        poll_interval_s=0.01,
        glob_interval_s=0.05,
    )
    source = FileSource(config, {}, SystemClock())
    raw_q: asyncio.Queue[RawChunk | EndOfStream] = asyncio.Queue(maxsize=4)
    event_q: asyncio.Queue[EventChunk | EndOfStream] = asyncio.Queue(maxsize=3)
    stop = asyncio.Event()
    stage = NormalizeStage(SystemClock())
    async with asyncio.TaskGroup() as tg:
        source_task = tg.create_task(source.run(raw_q, stop))
        stage_task = tg.create_task(stage.run(raw_q, event_q))
        # Nobody consumes event_q: the sink is stalled.
        await wait_until(lambda: event_q.full() and raw_q.full(), what="queues full")
        read_then = source.bytes_read
        await asyncio.sleep(0.3)  # give a broken source the chance to read on
        # In flight at most: raw_q + event_q + one chunk in the stage + one in the source.
        limit = (raw_q.maxsize + event_q.maxsize + 2) * budget
        assert source.bytes_read == read_then, "the source kept reading into a full queue"
        assert source.bytes_read <= limit
        assert source.bytes_read < log.stat().st_size
        source_task.cancel()
        stage_task.cancel()
