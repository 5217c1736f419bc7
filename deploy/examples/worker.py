"""Example worker for deploy/docker-compose.yml: cycles logged in the forwarder's schema.

Stands in for the real background worker. Every line is one JSON object on stdout,
written by `forwarder.producers.logging` (the image ships the package), and carries
meta.cycle_id: the key the worker_behavior_engine alarm (`cycle_key = "cycle_id"`)
uses to tell one cycle from the next.

A cycle logs "cycle.start", then either "cycle.done" or, with probability
EXAMPLE_FAIL_RATE, a behavior_engine exception (one ERROR line holding the traceback in
meta.traceback). Three failing cycles in a row fire the alarm, which restarts this
container (notifiers.restart_worker) and pages.

Environment: EXAMPLE_CYCLE_S (seconds between cycles, default 5), EXAMPLE_FAIL_RATE
(0.0 .. 1.0, default 0), EXAMPLE_CYCLES (stop after this many; default 0: forever).
"""

from __future__ import annotations

import logging
import os
import random
import time

from forwarder.producers.logging import setup_logging

log = logging.getLogger("worker")


class BehaviorEngineError(RuntimeError):
    pass


def behavior_engine(cycle: int, fail_rate: float) -> int:
    if random.random() < fail_rate:
        raise BehaviorEngineError(f"rule evaluation failed in cycle {cycle}")
    return cycle * 2


def main() -> int:
    setup_logging("worker")
    cycle_s = float(os.environ.get("EXAMPLE_CYCLE_S", "5"))
    fail_rate = float(os.environ.get("EXAMPLE_FAIL_RATE", "0"))
    cycles = int(os.environ.get("EXAMPLE_CYCLES", "0"))
    cycle = 0
    while cycles == 0 or cycle < cycles:
        cycle += 1
        log.info("cycle %d started", cycle, extra={"event": "cycle.start", "cycle_id": cycle})
        try:
            result = behavior_engine(cycle, fail_rate)
        except BehaviorEngineError:
            log.exception(
                "behavior_engine failed in cycle %d",
                cycle,
                extra={"event": "behavior_engine.error", "cycle_id": cycle},
            )
        else:
            log.info(
                "cycle %d done",
                cycle,
                extra={"event": "cycle.done", "cycle_id": cycle, "result": result},
            )
        time.sleep(cycle_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
