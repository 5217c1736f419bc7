"""Builds the alarm side of the daemon from the config: rules, notifiers, probes.

The runtime owns the loops; this module owns turning config sections into the
objects those loops run, so runtime.py stays free of alarm details. On a reload
(SIGHUP) `Alarms.replace_receivers` builds and swaps in new notifiers and probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from forwarder.alarms.config import NotifierConfig, ProbeConfig
from forwarder.alarms.engine import AlarmEngine
from forwarder.alarms.notify import Dispatcher, NotifierBuilder
from forwarder.alarms.privacy import Pseudonymizer
from forwarder.alarms.probes import ProbeResult, ProbeRunner, build_probes
from forwarder.alarms.rules import Alert, RuleSet
from forwarder.alarms.secrets import SecretError
from forwarder.alarms.state import AlertRecorder, load_firing, record_probe_result
from forwarder.clock import Clock
from forwarder.config import Settings
from forwarder.pipeline.stage import END_OF_STREAM, EndOfStream
from forwarder.sinks.postgres import PostgresSink, forget_traceback

log = logging.getLogger(__name__)

ALERT_QUEUE_SIZE = 1000  # lossy: a full queue drops the newest alert and counts it


class AlarmSetupError(Exception):
    """The alarms cannot be built, e.g. a secret is missing; the message names the
    problem (a secret's variable or file, never its value)."""


INSTALLATION_KEY_FILE = "privacy.key"


def build_privacy(settings: Settings) -> Pseudonymizer | None:
    """The pseudonymizer of user ids, or None when [privacy] names no service or key.

    The key comes from the variable or file the config names. When neither was set
    explicitly and the default variable is absent, a random key is made once and kept
    in data_dir, so a single forwarder hashes ids safely with no setup; several
    forwarders writing into one database must share a configured key instead.
    """
    cfg = settings.privacy
    if not cfg.enabled():
        return None
    try:
        key = cfg.load_key()
    except SecretError as e:
        explicit = cfg.hmac_key_file is not None or "hmac_key_env" in cfg.model_fields_set
        if explicit:
            hint = "or set [privacy] services = [] to store user ids as they are"
            raise AlarmSetupError(f"{e} ({hint})") from None
        key = _installation_key(settings.database.data_dir / INSTALLATION_KEY_FILE)
    return Pseudonymizer.from_config(cfg, key)


def _installation_key(path: Path) -> bytes:
    """This installation's privacy key: read it, or create it (owner-only) the first time."""
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    log.info(
        "privacy: no key configured (PRIVACY_HMAC_KEY); generated one in %s",
        path,
        extra={"component": "alarms"},
    )
    return key


@dataclass
class Receivers:
    """What the notifiers and probes were built from, and what builds them again."""

    notifiers: dict[str, NotifierConfig]
    probes: dict[str, ProbeConfig]
    builder: NotifierBuilder
    session: aiohttp.ClientSession  # the shared one: HTTP notifiers and probes
    clock: Clock


@dataclass
class Alarms:
    """The running alarm side: engine, dispatcher, recorder, probes, and their queues."""

    engine: AlarmEngine
    dispatcher: Dispatcher
    recorder: AlertRecorder
    probes: ProbeRunner
    events: asyncio.Queue[Any]
    receivers: Receivers
    has_rules: bool = True  # without rules nothing feeds the engine (and it ends at once)
    alerts: asyncio.Queue[Alert | EndOfStream] = field(
        default_factory=lambda: asyncio.Queue(maxsize=ALERT_QUEUE_SIZE)
    )
    records: asyncio.Queue[Alert | EndOfStream] = field(
        default_factory=lambda: asyncio.Queue(maxsize=ALERT_QUEUE_SIZE)
    )
    probe_results: asyncio.Queue[ProbeResult] = field(default_factory=asyncio.Queue)
    engine_probe_results: asyncio.Queue[ProbeResult] = field(default_factory=asyncio.Queue)
    _reloading: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    async def replace_receivers(
        self, notifiers: Mapping[str, NotifierConfig], probes: Mapping[str, ProbeConfig]
    ) -> list[str]:
        """Swap notifiers and probes for a new configuration, while running (a SIGHUP).

        Only what changed (compared by config) is built anew: an unchanged notifier
        keeps its lane, queue and stats, an unchanged probe its schedule. Returns which
        of "notifiers" / "probes" changed. Raises AlarmSetupError naming the problem
        (a missing secret: its variable or file, never its value) and then changes
        nothing.
        """
        async with self._reloading:
            current = self.receivers
            new_notifiers, new_probes = dict(notifiers), dict(probes)
            built_probes = {p.name: p for p in self.probes.probes.values()}
            try:
                # Probes first: building them has no side effect to undo if a
                # notifier then fails.
                fresh = {n: c for n, c in new_probes.items() if current.probes.get(n) != c}
                built_probes.update(
                    (p.name, p) for p in build_probes(fresh, current.session, current.clock)
                )
                fresh_notifiers = {
                    n: c for n, c in new_notifiers.items() if current.notifiers.get(n) != c
                }
                built = {**self.dispatcher.notifiers}
                built.update(await current.builder.build(fresh_notifiers))
            except (SecretError, ValueError) as e:
                raise AlarmSetupError(str(e)) from None
            changed = []
            if new_notifiers != current.notifiers:
                self.dispatcher.replace_notifiers({n: built[n] for n in new_notifiers})
                current.notifiers = new_notifiers
                changed.append("notifiers")
            if new_probes != current.probes:
                self.probes.replace_probes([built_probes[n] for n in new_probes])
                current.probes = new_probes
                changed.append("probes")
            return changed

    def status(self) -> dict[str, Any]:
        engine = self.engine.status()
        if not self.has_rules:  # nothing to evaluate: idle, not "stopped"
            engine = {**engine, "state": "ok", "reason": "no alarm rules configured"}
        return {
            "engine": engine,
            "notifiers": self.dispatcher.status(),
            "probes": self.probes.status(),
        }

    async def run(self, sink: PostgresSink, stop: asyncio.Event) -> None:
        """Every alarm loop; returns once END_OF_STREAM has passed through all of them."""
        probes_stop = asyncio.Event()
        if not self.has_rules:
            self.events.put_nowait(END_OF_STREAM)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                self.engine.run(
                    self.events,
                    self.engine_probe_results,
                    self.alerts,
                    stop,
                    records_out=self.records,
                ),
                name="alarms.engine",
            )
            tg.create_task(self.dispatcher.run(self.alerts), name="alarms.dispatcher")
            tg.create_task(self.recorder.run(self.records), name="alarms.recorder")
            probing = tg.create_task(self.probes.run(self.probe_results, probes_stop))
            recording = tg.create_task(self._record_probes(sink), name="alarms.probe_recorder")
            await stop.wait()
            probes_stop.set()
            await probing
            await self.probe_results.put(END_OF_STREAM)  # type: ignore[arg-type]
            await recording

    async def _record_probes(self, sink: PostgresSink) -> None:
        """Each probe result: a system_checks row (health_checks), then to the engine."""
        while (result := await self.probe_results.get()) is not END_OF_STREAM:
            try:
                async with sink.pool.acquire(timeout=5) as conn:
                    await record_probe_result(conn, sink.names, result)
            except Exception as e:  # history must not stop the alarms; the row is lost
                forget_traceback(e)  # its name is all we log; a kept traceback is a cycle
                log.warning(
                    "could not record the result of probe %s: %s",
                    result.probe,
                    type(e).__name__,
                    extra={"component": "alarms"},
                )
            if self.has_rules:
                self.engine_probe_results.put_nowait(result)


@contextlib.asynccontextmanager
async def open_alarms(
    settings: Settings, sink: PostgresSink, clock: Clock, events: asyncio.Queue[Any]
) -> AsyncIterator[Alarms]:
    """Build the alarm side; the notifiers' HTTP session lives as long as the context."""
    rules = RuleSet.from_config(settings.alarms)
    engine = AlarmEngine(rules, clock)
    restored = await sink.with_retry("load alarm state", lambda c: load_firing(c, sink.names))
    for row in engine.restore(restored):
        log.info(
            "alarm %s is no longer configured; its firing state was not restored",
            row.rule,
            extra={"component": "alarms"},
        )
    if restored:
        log.info(
            "%d firing alarm(s) restored from system_checks",
            len(restored),
            extra={"component": "alarms"},
        )
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        )
        builder = NotifierBuilder(session)
        stack.push_async_callback(builder.aclose)  # docker sessions, reloads' included
        try:
            probes = build_probes(settings.probes, session, clock)
            notifiers = await builder.build(settings.notifiers)
        except SecretError as e:
            raise AlarmSetupError(str(e)) from None
        yield Alarms(
            engine=engine,
            dispatcher=Dispatcher(notifiers, clock),
            recorder=AlertRecorder(sink.pool, sink.names),
            probes=ProbeRunner(probes, clock),
            events=events,
            receivers=Receivers(
                notifiers=dict(settings.notifiers),
                probes=dict(settings.probes),
                builder=builder,
                session=session,
                clock=clock,
            ),
            has_rules=bool(settings.alarms),
        )
