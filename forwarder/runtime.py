"""Builds every component from the config and supervises them in one TaskGroup.

Flow: sources -> raw queue -> normalize -> event queue -> PostgreSQL sink. Each arrow
is one bounded asyncio.Queue, so a slow database slows reading. The first SIGTERM or
SIGINT starts a drain in flow order (sources stop, queues empty, the last batch
commits); a second signal or the drain deadline forces exit with a non-zero status.
Signals are handled here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from forwarder.alarms.rules import RuleSet
from forwarder.alarms.wiring import Alarms, AlarmSetupError, build_privacy, open_alarms
from forwarder.clock import Clock, SystemClock
from forwarder.config import (
    DSN_ENV,
    EMBEDDED_DSN,
    ConfigError,
    DatabaseConfig,
    DockerSourceConfig,
    Settings,
)
from forwarder.event import EventChunk, RawChunk
from forwarder.http import EngineAlarmControl, HttpContext, build_app, start_http, stop_http
from forwarder.http_config import TokenError
from forwarder.intake import Intake
from forwarder.metrics import Metrics, pipeline_status, snapshot_of
from forwarder.pipeline.sample import Sampler
from forwarder.pipeline.stage import END_OF_STREAM, EndOfStream, NormalizeStage
from forwarder.retention import RetentionJob
from forwarder.sinks.embedded import EmbeddedServer, start_embedded
from forwarder.sinks.postgres import PostgresSink
from forwarder.sinks.spool import SpoolError
from forwarder.sources.base import Source
from forwarder.sources.docker import build_docker_source
from forwarder.sources.file import FileSource, own_output_identities

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FORCED = 1


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix."""


@dataclass
class Database:
    """Where rows go: a DSN, and the embedded server behind it if we started one."""

    dsn: str
    embedded: EmbeddedServer | None = None

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()


async def open_database(db: DatabaseConfig) -> Database:
    """Resolve database.dsn: a real DSN, or "embedded" (start the private cluster)."""
    dsn = db.dsn.get_secret_value().strip()
    if not dsn:
        raise StartupError(
            f"database.dsn is empty: set {DSN_ENV} to the PostgreSQL DSN to write into "
            f'(or set dsn = "{EMBEDDED_DSN}" in the config for a private database on this machine)'
        )
    if dsn != EMBEDDED_DSN:
        return Database(dsn)
    pgdata = db.data_dir / "pg"
    log.info("starting embedded PostgreSQL in %s", pgdata, extra={"component": "database"})
    server = await asyncio.to_thread(start_embedded, pgdata)
    log.info(
        "embedded PostgreSQL ready; connect with: psql '%s'",
        server.dsn,
        extra={"component": "database", "dsn": server.dsn, "event": "embedded.ready"},
    )
    return Database(server.dsn, server)


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for logs."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable dsn>"
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return dsn


@dataclass
class Pipeline:
    """Everything `run` builds; kept together so status and progress can read it."""

    settings: Settings
    sink: PostgresSink
    sources: list[Source]
    normalize: NormalizeStage
    raw_q: asyncio.Queue[RawChunk | EndOfStream]
    event_q: asyncio.Queue[EventChunk | EndOfStream]
    alarms: Alarms
    exit_on_eof: bool = False
    retention: RetentionJob | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def progress(self) -> tuple[int, int]:
        done = total = 0
        for source in self.sources:
            d, t = source.progress()
            done += d
            total += t
        return done, total


# A progress display: a coroutine over the running pipeline, cancelled when it ends.
ProgressReporter = Callable[[Pipeline], Coroutine[Any, Any, None]]


async def run(
    settings: Settings,
    *,
    exit_on_eof: bool = False,
    clock: Clock | None = None,
    on_started: Callable[[Pipeline], None] | None = None,
    progress: ProgressReporter | None = None,
    reload: Callable[[], Settings] | None = None,
) -> int:
    """Run the daemon until a signal (or, with exit_on_eof, until every file is read).

    `reload` re-reads the configuration on SIGHUP (it raises ConfigError when invalid).
    """
    clock = clock or SystemClock()
    database = await open_database(settings.database)
    try:
        return await _run_pipeline(
            settings, database, exit_on_eof, clock, on_started, progress, reload
        )
    finally:
        database.close()


async def _run_pipeline(
    settings: Settings,
    database: Database,
    exit_on_eof: bool,
    clock: Clock,
    on_started: Callable[[Pipeline], None] | None,
    progress: ProgressReporter | None,
    reload: Callable[[], Settings] | None = None,
) -> int:
    db = settings.database
    try:
        privacy = build_privacy(settings)
    except AlarmSetupError as e:
        raise StartupError(str(e)) from None
    metrics = Metrics()
    sink = PostgresSink(db, settings.batch, database.dsn, clock, on_batch=metrics.observe_batch)
    await sink.open()
    try:
        for action in await sink.migrate(clock.now().date()):
            log.info("migrate: %s", action, extra={"component": "database"})
        own_output = own_output_identities()
        sources: list[Source] = []
        for cfg in settings.sources:
            checkpoints = await sink.load_checkpoints(cfg.name)
            if isinstance(cfg, DockerSourceConfig):
                sources.append(
                    build_docker_source(
                        cfg,
                        checkpoints,
                        clock,
                        exit_on_eof=exit_on_eof,
                        ignore_identities=own_output,
                    )
                )
            else:
                sources.append(
                    FileSource(
                        cfg,
                        checkpoints,
                        clock,
                        exit_on_eof=exit_on_eof,
                        ignore_identities=own_output,
                    )
                )
        intake = await _build_intake(settings, sink, clock) if settings.http.enabled else None
        if intake is not None:
            sources.append(intake)
        size = settings.pipeline.queue_chunks
        alarm_q: asyncio.Queue[EventChunk | EndOfStream] = asyncio.Queue(maxsize=size)
        try:
            async with open_alarms(settings, sink, clock, alarm_q) as alarms:
                pipeline = Pipeline(
                    settings=settings,
                    sink=sink,
                    sources=sources,
                    normalize=NormalizeStage(
                        clock, privacy=privacy, sampler=_sampler(settings, exit_on_eof)
                    ),
                    raw_q=asyncio.Queue(maxsize=size),
                    event_q=asyncio.Queue(maxsize=size),
                    alarms=alarms,
                    exit_on_eof=exit_on_eof,
                    retention=(
                        RetentionJob.for_database(database.dsn, db, settings.retention, clock)
                        if settings.retention.enabled and not exit_on_eof
                        else None
                    ),
                )
                metrics.read_from(lambda: snapshot_of(pipeline))
                runner = await _start_http(settings, pipeline, sink, metrics, clock, intake)
                _log_startup(settings, database)
                if on_started is not None:
                    on_started(pipeline)
                try:
                    return await _supervise(pipeline, progress, reload)
                finally:
                    if runner is not None:
                        await stop_http(runner)
                    if intake is not None:
                        intake.close()
        except AlarmSetupError as e:
            raise StartupError(str(e)) from None
    finally:
        await sink.aclose()


async def _build_intake(settings: Settings, sink: PostgresSink, clock: Clock) -> Intake:
    name = settings.http.source_name
    try:
        return Intake(
            settings.http,
            settings.database.data_dir,
            clock,
            await sink.load_checkpoints(name),
            committed=lambda: sink.load_checkpoints(name),
        )
    except (OSError, SpoolError) as e:
        raise StartupError(f"cannot open the HTTP intake's spool: {e}") from None


async def _start_http(
    settings: Settings,
    pipeline: Pipeline,
    sink: PostgresSink,
    metrics: Metrics,
    clock: Clock,
    intake: Intake | None,
) -> web.AppRunner | None:
    if not settings.http.enabled:
        return None
    try:
        ctx = HttpContext(
            settings=settings,
            clock=clock,
            pool=sink.pool,
            names=sink.names,
            status=lambda: pipeline_status(pipeline),
            metrics=metrics,
            alarms=EngineAlarmControl(pipeline.alarms.engine),
            intake=intake,
        )
        runner = await start_http(build_app(ctx), settings.http.listen)
    except TokenError as e:
        raise StartupError(str(e)) from None
    except OSError as e:
        raise StartupError(f"cannot listen on {settings.http.listen}: {e.strerror}") from None
    log.info(
        "HTTP on %s: /logs/ingest (service %s), /health, /metrics, / (status page)",
        settings.http.listen,
        settings.http.service,
        extra={"component": "runtime", "event": "startup.http"},
    )
    return runner


def _sampler(settings: Settings, exit_on_eof: bool) -> Sampler | None:
    """Sampling protects the database from live floods; a backfill is never sampled."""
    if exit_on_eof:
        return None
    cfg = settings.sampling
    return Sampler(
        threshold_per_min=cfg.threshold_per_min,
        never_sample=frozenset(str(level) for level in cfg.never_sample),
        window_s=cfg.window_s,
        seed=cfg.seed,
    )


def _log_startup(settings: Settings, database: Database) -> None:
    db = settings.database
    target = f"{db.schema_name}.{db.table}"
    log.info(
        "writing to %s at %s",
        target,
        redact_dsn(database.dsn),
        extra={"component": "runtime", "event": "startup.sink"},
    )
    if not settings.sources:
        log.warning("no sources configured: nothing to read", extra={"component": "runtime"})
    log.info(
        "alarms: %d rule(s), notifiers: %s, probes: %s, sampling above %d lines/min per service",
        len(settings.alarms),
        ", ".join(settings.notifiers) or "none",
        ", ".join(settings.probes) or "none",
        settings.sampling.threshold_per_min,
        extra={"component": "runtime", "event": "startup.alarms"},
    )
    for cfg in settings.sources:
        if isinstance(cfg, DockerSourceConfig):
            where = (
                f"containers in {cfg.containers_dir}"
                if cfg.mode == "files"
                else f"the Docker Engine API at {cfg.socket}"
            )
            what = f"following {where}, service from each container"
        else:
            what = f"tailing {', '.join(cfg.paths)} as service {cfg.service}"
        log.info(
            "source %s (%s): %s, new files from the %s",
            cfg.name,
            cfg.type,
            what,
            cfg.read_from,
            extra={"component": "runtime", "event": "startup.source", "source": cfg.name},
        )


# Sections a SIGHUP applies to the running daemon; a change anywhere else is logged as
# needing a restart (the running configuration keeps them).
RELOADABLE = ("sampling", "alarms")


def reload_config(pipeline: Pipeline, load: Callable[[], Settings]) -> None:
    """SIGHUP: read the configuration again; apply what can change while running.

    An invalid file is refused and logged; the running configuration stays whole.
    Sampling is swapped at once; alarm rules are replaced keeping what is firing
    (their counting windows start empty).
    """
    try:
        new = load()
    except ConfigError as e:
        log.error(
            "SIGHUP: the new configuration is refused, the running one stays: %s",
            "; ".join(e.problems),
            extra={"component": "runtime", "event": "reload.refused"},
        )
        return
    old = pipeline.settings
    applied: list[str] = []
    restart = [
        name
        for name in Settings.model_fields
        if name not in RELOADABLE and getattr(new, name) != getattr(old, name)
    ]
    if new.sampling != old.sampling:
        pipeline.normalize.sampler = _sampler(new, pipeline.exit_on_eof)
        applied.append("sampling")
    if new.alarms != old.alarms:
        if pipeline.alarms.has_rules and new.alarms:
            pipeline.alarms.engine.replace_rules(RuleSet.from_config(new.alarms))
            applied.append("alarms")
        else:  # the alarm engine starts (or stops) listening only at start
            restart.append("alarms")
    kept = {name: getattr(new, name) for name in applied}
    pipeline.settings = old.model_copy(update=kept)
    log.info(
        "SIGHUP: configuration reloaded; applied: %s; unchanged until a restart: %s",
        ", ".join(applied) or "nothing",
        ", ".join(restart) or "nothing",
        extra={
            "component": "runtime",
            "event": "reload.done",
            "applied": applied,
            "restart_needed": restart,
        },
    )


async def _supervise(
    pipeline: Pipeline,
    progress: ProgressReporter | None,
    reload: Callable[[], Settings] | None = None,
) -> int:
    """One TaskGroup for every loop; signals turn into stop (first) and force (second)."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    forced = False
    drain_timeout_s = pipeline.settings.daemon.drain_timeout_s
    deadline: asyncio.TimerHandle | None = None

    def force(reason: str) -> None:
        nonlocal forced
        if not forced:
            forced = True
            log.error("forced exit: %s", reason, extra={"component": "runtime"})
            main.cancel()

    def on_signal(signum: int) -> None:
        nonlocal deadline
        name = signal.Signals(signum).name
        if deadline is not None:
            force(f"second {name} during drain")
            return
        log.info(
            "%s received: draining (at most %.0fs)",
            name,
            drain_timeout_s,
            extra={"component": "runtime", "event": "shutdown.drain"},
        )
        pipeline.stop.set()
        deadline = loop.call_later(
            drain_timeout_s, force, f"drain took longer than {drain_timeout_s}s"
        )

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_config, pipeline, reload)
    reporter = asyncio.create_task(progress(pipeline)) if progress is not None else None
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_run_sources(pipeline), name="sources")
            alarm_events = pipeline.alarms.events if pipeline.alarms.has_rules else None
            normalize = pipeline.normalize.run(pipeline.raw_q, pipeline.event_q, alarm_events)
            tg.create_task(normalize, name="normalize")
            tg.create_task(pipeline.sink.run(pipeline.event_q), name="sink")
            tg.create_task(pipeline.alarms.run(pipeline.sink, pipeline.stop), name="alarms")
            if pipeline.retention is not None:
                tg.create_task(pipeline.retention.run(pipeline.stop), name="retention")
    except asyncio.CancelledError:
        if forced:
            main.uncancel()  # the cancel was ours; let the clean-up below await normally
            return EXIT_FORCED
        raise
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if deadline is not None:
            deadline.cancel()
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
    log.info(
        "stopped: %d rows written",
        pipeline.sink.rows_written,
        extra={"component": "runtime", "event": "shutdown.done"},
    )
    return EXIT_OK


async def _run_sources(pipeline: Pipeline) -> None:
    """Run every source; once all have returned, end the stream for the stages."""
    async with asyncio.TaskGroup() as tg:
        for source in pipeline.sources:
            tg.create_task(source.run(pipeline.raw_q, pipeline.stop), name=f"source:{source}")
    if not pipeline.exit_on_eof:
        # A daemon runs until a signal, even with no source (probes and alarms only).
        await pipeline.stop.wait()
    await pipeline.raw_q.put(END_OF_STREAM)
    pipeline.stop.set()  # a backfill at its end: stop the probes too
