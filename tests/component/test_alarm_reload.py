"""Hot reload (SIGHUP) of the alarm side: notifiers and probes swapped while running.

Notifiers deliver to real aiohttp receivers (and a Docker Engine API on a unix socket);
probes check a real HTTP endpoint, timed by a FakeClock; `Alarms.replace_receivers`
runs against a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import TypeAdapter

from forwarder.alarms.config import ProbeConfig
from forwarder.alarms.notify import Dispatcher, NotifierBuilder
from forwarder.alarms.probes import ProbeResult, ProbeRunner, ProbeSchedule, build_probes
from forwarder.alarms.wiring import Alarms, AlarmSetupError, open_alarms
from forwarder.clock import SystemClock
from forwarder.config import BatchConfig, DatabaseConfig, Settings
from forwarder.pipeline.stage import END_OF_STREAM
from forwarder.sinks.postgres import PostgresSink
from tests.component.receiver import Receiver
from tests.component.test_notify import (
    FakeEngine,
    Running,
    container,
    make_alert,
    notifier_configs,
)
from tests.support import FakeClock, serving, wait_until

PROBE_CONFIG = TypeAdapter(ProbeConfig)


async def serve(app: web.Application, site_of: Any) -> web.AppRunner:
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await site_of(runner).start()
    return runner


@pytest.fixture
async def builder(session: aiohttp.ClientSession) -> AsyncIterator[NotifierBuilder]:
    b = NotifierBuilder(session)
    try:
        yield b
    finally:
        await b.aclose()


def webhook(rec: Receiver, path: str, **extra: Any) -> dict[str, Any]:
    return {"type": "webhook", "url": rec.url(path), **extra}


def rules_at(rec: Receiver, path: str) -> list[str]:
    return [r.json()["rule"] for r in rec.at(path)]


def lane_task_running(name: str) -> bool:
    return any(t.get_name() == f"notify.{name}" and not t.done() for t in asyncio.all_tasks())


# --- the Dispatcher --------------------------------------------------------------------------


async def test_a_notifier_added_while_running_receives_the_next_alert(
    receiver: Receiver, builder: NotifierBuilder
) -> None:
    first = await builder.build(notifier_configs({"a": webhook(receiver, "/a")}))
    run = Running(first)
    run.offer(make_alert(rule="before", actions=("a", "b")))
    await wait_until(lambda: run.stats("a")["sent"] == 1, what="the first alert")
    assert run.dispatcher.unknown_actions == 1  # b is not configured yet

    added = await builder.build(notifier_configs({"b": webhook(receiver, "/b")}))
    run.dispatcher.replace_notifiers({**first, **added})
    run.offer(make_alert(rule="after", actions=("a", "b")))
    await wait_until(lambda: run.stats("b")["sent"] == 1, what="delivery to the new notifier")
    await wait_until(lambda: run.stats("a")["sent"] == 2, what="delivery to the old one")
    await run.finish()

    assert rules_at(receiver, "/b") == ["after"]
    assert rules_at(receiver, "/a") == ["before", "after"]
    assert run.dispatcher.unknown_actions == 1


async def test_a_removed_notifier_delivers_what_it_holds_and_nothing_after(
    receiver: Receiver, builder: NotifierBuilder, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.hang.add("/gone")
    notifiers = await builder.build(
        notifier_configs(
            {"keep": webhook(receiver, "/keep"), "gone": webhook(receiver, "/gone", timeout_s=60)}
        )
    )
    run = Running(notifiers)
    run.offer(make_alert(rule="in_flight", actions=("gone",)))
    run.offer(make_alert(rule="queued", actions=("gone",)))
    await wait_until(lambda: len(receiver.at("/gone")) == 1, what="the first alert in flight")
    await wait_until(lambda: run.dispatcher.status()["lanes"]["gone"] == 1, what="one queued")

    caplog.set_level(logging.INFO, logger="forwarder.alarms.notify")
    caplog.clear()
    run.dispatcher.replace_notifiers({"keep": notifiers["keep"]})
    status = run.dispatcher.status()
    assert set(status["notifiers"]) == set(status["lanes"]) == {"keep"}
    assert [r.getMessage() for r in caplog.records] == ["notifier gone (webhook) removed"]

    run.offer(make_alert(rule="later", actions=("gone", "keep")))  # never raises
    await wait_until(lambda: run.stats("keep")["sent"] == 1, what="the kept notifier")
    assert run.dispatcher.unknown_actions == 1

    receiver.released.set()
    await wait_until(lambda: not lane_task_running("gone"), what="the removed lane to end")
    assert rules_at(receiver, "/gone") == ["in_flight", "queued"]
    assert "gone" not in run.dispatcher.status()["notifiers"]
    await run.finish()
    assert rules_at(receiver, "/keep") == ["later"]


async def test_a_changed_url_takes_new_alerts_while_the_old_lane_flushes(
    receiver: Receiver, builder: NotifierBuilder, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.hang.add("/old")
    old = await builder.build(notifier_configs({"hook": webhook(receiver, "/old", timeout_s=60)}))
    run = Running(old)
    run.offer(make_alert(rule="one", actions=("hook",)))
    run.offer(make_alert(rule="two", actions=("hook",)))
    await wait_until(lambda: len(receiver.at("/old")) == 1, what="the first alert in flight")
    await wait_until(lambda: run.dispatcher.status()["lanes"]["hook"] == 1, what="one queued")

    caplog.set_level(logging.INFO, logger="forwarder.alarms.notify")
    caplog.clear()
    new = await builder.build(notifier_configs({"hook": webhook(receiver, "/new")}))
    run.dispatcher.replace_notifiers(new)
    assert [r.getMessage() for r in caplog.records] == ["notifier hook (webhook) changed"]
    assert run.dispatcher.status()["lanes"] == {"hook": 0}  # the new lane

    run.offer(make_alert(rule="three", actions=("hook",)))
    await wait_until(lambda: len(receiver.at("/new")) == 1, what="delivery to the new URL")
    receiver.released.set()
    await wait_until(lambda: run.stats("hook")["sent"] == 3, what="the old lane to flush")
    await run.finish()

    assert rules_at(receiver, "/old") == ["one", "two"]
    assert rules_at(receiver, "/new") == ["three"]


async def test_an_unchanged_notifier_keeps_its_queue_and_stats(
    receiver: Receiver, builder: NotifierBuilder, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.hang.add("/slow")
    receiver.statuses["/fails"] = [400]
    notifiers = await builder.build(
        notifier_configs(
            {
                "slow": webhook(receiver, "/slow", timeout_s=60),
                "fails": webhook(receiver, "/fails"),
            }
        )
    )
    run = Running(notifiers)
    run.offer(make_alert(rule="r1", actions=("slow", "fails")))
    run.offer(make_alert(rule="r2", actions=("slow",)))
    await wait_until(lambda: run.stats("fails")["failed"] == 1, what="the failed delivery")
    await wait_until(lambda: run.dispatcher.status()["lanes"]["slow"] == 1, what="one queued")
    before = run.dispatcher.status()

    caplog.set_level(logging.INFO, logger="forwarder.alarms.notify")
    caplog.clear()
    added = await builder.build(notifier_configs({"other": webhook(receiver, "/other")}))
    run.dispatcher.replace_notifiers({**notifiers, **added})
    after = run.dispatcher.status()
    assert [r.getMessage() for r in caplog.records] == ["notifier other (webhook) added"]
    assert after["lanes"] == {**before["lanes"], "other": 0}
    assert after["notifiers"] == {**before["notifiers"], "other": after["notifiers"]["other"]}
    assert (after["state"], after["reason"]) == ("degraded", "last delivery failed: fails")

    receiver.released.set()
    await wait_until(lambda: run.stats("slow")["sent"] == 2, what="the kept lane to deliver")
    await run.finish()
    assert rules_at(receiver, "/slow") == ["r1", "r2"]


async def test_a_replace_before_run_only_swaps_the_set(
    receiver: Receiver, builder: NotifierBuilder
) -> None:
    first = await builder.build(notifier_configs({"a": webhook(receiver, "/a")}))
    second = await builder.build(notifier_configs({"b": webhook(receiver, "/b")}))
    dispatcher = Dispatcher(first, SystemClock())
    dispatcher.replace_notifiers(second)
    assert set(dispatcher.status()["notifiers"]) == {"b"}
    queue: asyncio.Queue[Any] = asyncio.Queue()
    task = asyncio.create_task(dispatcher.run(queue))
    dispatcher.offer(queue, make_alert(actions=("a", "b")))
    await queue.put(END_OF_STREAM)
    async with asyncio.timeout(10):
        await task
    assert rules_at(receiver, "/b") == ["api_error_burst"]
    assert receiver.at("/a") == []
    assert dispatcher.unknown_actions == 1


@pytest.fixture
async def engine_on(tmp_path: Path) -> AsyncIterator[tuple[FakeEngine, Path]]:
    """A Docker Engine API on a unix socket; the socket path exists only once started."""
    sock = tmp_path / "d.sock"
    if len(str(sock)) > 100:  # AF_UNIX path limit
        pytest.skip(f"tmp_path too long for a unix socket: {sock}")
    fake = FakeEngine([container("a" * 64, "shop-api-1", "api")])
    app = web.Application()
    app.router.add_get("/containers/json", fake.list_containers)
    app.router.add_post("/containers/{ident}/restart", fake.restart)
    runner = await serve(app, lambda r: web.UnixSite(r, str(sock)))
    try:
        yield fake, sock
    finally:
        await runner.cleanup()


async def test_a_docker_restart_notifier_on_a_new_socket_gets_its_own_session(
    receiver: Receiver, builder: NotifierBuilder, engine_on: tuple[FakeEngine, Path]
) -> None:
    fake, sock = engine_on
    first = await builder.build(notifier_configs({"hook": webhook(receiver, "/hook")}))
    run = Running(first)
    restart = {"type": "docker_restart", "service": "api", "socket": str(sock)}
    added = await builder.build(notifier_configs({"restart_api": restart}))
    run.dispatcher.replace_notifiers({**first, **added})
    run.offer(make_alert(actions=("restart_api", "hook")))
    await wait_until(lambda: run.stats("restart_api")["sent"] == 1, what="the restart")
    await run.finish()
    assert [ident for ident, _ in fake.restarts] == ["a" * 64]

    # A session is opened once per socket path and closed with the builder.
    again = await builder.build(notifier_configs({"restart_api": restart}))
    assert again["restart_api"]._session is added["restart_api"]._session  # type: ignore[attr-defined]
    await builder.aclose()
    assert added["restart_api"]._session.closed  # type: ignore[attr-defined]


# --- probes ------------------------------------------------------------------------------------


def test_schedule_add_and_remove_keep_the_other_probes_on_time(fake_clock: FakeClock) -> None:
    start = fake_clock.monotonic()
    schedule = ProbeSchedule({"keep": 10.0, "gone": 10.0, "change": 10.0}, start)
    for name in schedule.due(start):
        schedule.done(name, start)
    fake_clock.advance(4.0)
    schedule.remove("gone")
    schedule.add("change", 3.0, fake_clock.monotonic())  # a new interval, due now
    schedule.add("new", 5.0, fake_clock.monotonic())
    ran: dict[str, list[float]] = {}
    for _ in range(81):
        now = fake_clock.monotonic()
        for name in schedule.due(now):
            ran.setdefault(name, []).append(now - start)
            schedule.done(name, now)
        fake_clock.advance(0.25)
    assert ran == {
        "keep": [10.0, 20.0],
        "change": [4.0, 7.0, 10.0, 13.0, 16.0, 19.0, 22.0],
        "new": [4.0, 9.0, 14.0, 19.0, 24.0],
    }


class Health:
    """An HTTP endpoint per probe: counts hits; paths in `hang` answer once released."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.hang: set[str] = set()
        self.released = asyncio.Event()
        self.base = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        if request.path in self.hang:
            await self.released.wait()
        return web.Response(text="ok")

    def probe(self, path: str, interval_s: float = 3600.0) -> Any:
        timeout_s = min(30.0, interval_s)  # long enough never to fire in a test
        return PROBE_CONFIG.validate_python(
            {
                "type": "http",
                "url": self.base + path,
                "interval_s": interval_s,
                "timeout_s": timeout_s,
            }
        )


@pytest.fixture
async def health() -> AsyncIterator[Health]:
    h = Health()
    app = web.Application()
    app.router.add_get("/{tail:.*}", h.handle)
    async with serving(app) as h.base:
        try:
            yield h
        finally:
            h.released.set()


class Probing:
    """A ProbeRunner running, and every result it has put so far."""

    def __init__(self, runner: ProbeRunner) -> None:
        self.runner = runner
        self.out: asyncio.Queue[ProbeResult] = asyncio.Queue()
        self.stop = asyncio.Event()
        self.results: list[ProbeResult] = []
        self.task = asyncio.create_task(runner.run(self.out, self.stop))

    def got(self, n: int) -> bool:
        while not self.out.empty():
            self.results.append(self.out.get_nowait())
        return len(self.results) >= n

    async def close(self) -> None:
        self.stop.set()
        async with asyncio.timeout(5):
            await self.task


async def test_probes_added_changed_and_removed_while_the_runner_waits(
    health: Health, session: aiohttp.ClientSession, fake_clock: FakeClock
) -> None:
    configs = {"keep": health.probe("/keep"), "gone": health.probe("/gone")}
    configs["change"] = health.probe("/change-old")
    run = Probing(ProbeRunner(build_probes(configs, session, fake_clock), fake_clock))
    await wait_until(lambda: run.got(3), what="every probe's first check, at start")

    fake_clock.advance(60)
    fresh = {"change": health.probe("/change-new", 5.0), "new": health.probe("/new", 10.0)}
    keep = run.runner.probes["keep"]
    run.runner.replace_probes([keep, *build_probes(fresh, session, fake_clock)])
    # The runner was waiting an hour: the replace woke it up.
    await wait_until(lambda: run.got(5), what="the added and the changed probe, at once")
    assert set(run.runner.status()["probes"]) == {"keep", "change", "new"}
    assert run.runner.status()["probes"]["change"]["at"] == fake_clock.now().isoformat()

    # The changed probe runs on its new interval; the unchanged ones keep their schedule
    # (a replace by the same probes changes nothing but wakes the runner up).
    fake_clock.advance(5)
    run.runner.replace_probes(list(run.runner.probes.values()))
    await wait_until(lambda: run.got(6), what="the changed probe, 5 s later")
    assert run.results[5].probe == "change"

    run.runner.replace_probes([keep, run.runner.probes["new"]])
    fake_clock.advance(5)
    run.runner.replace_probes(list(run.runner.probes.values()))
    await wait_until(lambda: run.got(7), what="the new probe, 10 s after it was added")
    await run.close()

    assert [r.probe for r in run.results[5:]] == ["change", "new"]
    assert health.hits == {"/keep": 1, "/gone": 1, "/change-old": 1, "/change-new": 2, "/new": 2}
    assert set(run.runner.status()["probes"]) == {"keep", "new"}


async def test_a_probe_removed_during_its_check_reports_nothing(
    health: Health, session: aiohttp.ClientSession, fake_clock: FakeClock
) -> None:
    health.hang.add("/slow")
    configs = {"slow": health.probe("/slow"), "fast": health.probe("/fast")}
    run = Probing(ProbeRunner(build_probes(configs, session, fake_clock), fake_clock))
    await wait_until(lambda: health.hits.get("/slow") == 1, what="the slow check in flight")
    run.runner.replace_probes([run.runner.probes["fast"]])
    health.released.set()
    await wait_until(lambda: run.got(1), what="the fast probe's result")
    await run.close()
    assert [r.probe for r in run.results] == ["fast"]
    assert set(run.runner.status()["probes"]) == {"fast"}


# --- Alarms.replace_receivers, as the runtime calls it ----------------------------------------


@pytest.fixture
async def sink(pg_dsn: str, pg_schema: str) -> AsyncIterator[PostgresSink]:
    clock = SystemClock()
    s = PostgresSink(
        DatabaseConfig(schema_name=pg_schema), BatchConfig(), pg_dsn, clock, rng=random.Random(1)
    )
    await s.open()
    await s.migrate(date.today())
    try:
        yield s
    finally:
        await s.aclose()


class RunningAlarms:
    def __init__(self, alarms: Alarms, sink: PostgresSink) -> None:
        self.alarms = alarms
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(alarms.run(sink, self.stop))

    def alert(self, rule: str, *actions: str) -> None:
        assert self.alarms.dispatcher.offer(
            self.alarms.alerts, make_alert(rule=rule, actions=actions)
        )

    def notifier(self, name: str) -> dict[str, Any]:
        notifiers: dict[str, Any] = self.alarms.status()["notifiers"]["notifiers"]
        return notifiers[name]

    async def close(self) -> None:
        await self.alarms.events.put(END_OF_STREAM)
        self.stop.set()
        async with asyncio.timeout(10):
            await self.task


def alarm_settings(pg_schema: str, notifiers: dict[str, Any], probes: dict[str, Any]) -> Settings:
    rule = {
        "name": "api_error_burst",
        "type": "threshold",
        "match": {"service": "api", "level": "ERROR"},
        "threshold": 5,
        "window_s": 60,
        "actions": list(notifiers),
    }
    return Settings(
        database=DatabaseConfig(schema_name=pg_schema),
        alarms=[rule],
        notifiers=notifier_configs(notifiers),
        probes={name: PROBE_CONFIG.validate_python(cfg) for name, cfg in probes.items()},
    )


async def test_replace_receivers_applies_a_new_set_and_refuses_a_broken_one(
    receiver: Receiver,
    health: Health,
    sink: PostgresSink,
    pg_schema: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RELOAD_TEST_HOOK_KEY", "k1")
    monkeypatch.delenv("RELOAD_TEST_MISSING", raising=False)
    hook = webhook(receiver, "/hook", hmac_secret_env="RELOAD_TEST_HOOK_KEY")
    probe = {"type": "http", "url": health.base + "/up", "interval_s": 3600, "timeout_s": 5}
    settings = alarm_settings(pg_schema, {"hook": hook}, {"up": probe})
    async with open_alarms(settings, sink, SystemClock(), asyncio.Queue()) as alarms:
        run = RunningAlarms(alarms, sink)
        run.alert("first", "hook")
        await wait_until(lambda: run.notifier("hook")["sent"] == 1, what="the first alert")
        await wait_until(lambda: health.hits == {"/up": 1}, what="the probe's first check")

        # A new notifier whose secret is missing: refused, nothing changes.
        broken = {"hook": hook, "page": {"type": "webhook", "url_env": "RELOAD_TEST_MISSING"}}
        new_probe = {**probe, "url": health.base + "/new-up"}
        with pytest.raises(AlarmSetupError) as err:
            await alarms.replace_receivers(
                notifier_configs(broken), {"up": PROBE_CONFIG.validate_python(new_probe)}
            )
        assert str(err.value) == (
            "notifiers.page.url_env: environment variable RELOAD_TEST_MISSING is not set"
        )
        assert set(alarms.status()["notifiers"]["notifiers"]) == {"hook"}
        assert health.hits == {"/up": 1}
        run.alert("second", "hook", "page")
        await wait_until(lambda: run.notifier("hook")["sent"] == 2, what="the old notifier")

        # The same set again: nothing to do.
        same = await alarms.replace_receivers(settings.notifiers, settings.probes)
        assert same == []

        # The variable is there now: the page notifier is added, the probe changed.
        monkeypatch.setenv("RELOAD_TEST_MISSING", receiver.url("/page"))
        changed = await alarms.replace_receivers(
            notifier_configs(broken), {"up": PROBE_CONFIG.validate_python(new_probe)}
        )
        assert changed == ["notifiers", "probes"]
        run.alert("third", "hook", "page")
        await wait_until(lambda: run.notifier("page")["sent"] == 1, what="the added notifier")
        await wait_until(lambda: health.hits.get("/new-up") == 1, what="the changed probe")
        assert run.notifier("hook")["sent"] == 3

        # Only the probes change: the notifiers are left as they are.
        assert await alarms.replace_receivers(notifier_configs(broken), {}) == ["probes"]
        assert alarms.status()["probes"]["probes"] == {}
        await run.close()

    assert rules_at(receiver, "/hook") == ["first", "second", "third"]
    assert rules_at(receiver, "/page") == ["third"]
    assert health.hits == {"/up": 1, "/new-up": 1}
