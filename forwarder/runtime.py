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
import resource
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
    FileSourceConfig,
    Settings,
    StdinSourceConfig,
)
from forwarder.event import EventChunk, RawChunk
from forwarder.http import EngineAlarmControl, HttpContext, build_app, start_http, stop_http
from forwarder.http_config import TokenError
from forwarder.intake import Intake
from forwarder.metrics import Metrics, pipeline_status, snapshot_of
from forwarder.pipeline.sample import Sampler
from forwarder.pipeline.stage import END_OF_STREAM, Marker, NormalizeStage, flush_through
from forwarder.retention import RetentionJob
from forwarder.sinks.embedded import EmbeddedServer, start_embedded
from forwarder.sinks.postgres import PostgresSink
from forwarder.sinks.spool import SpoolError
from forwarder.sources.base import Source
from forwarder.sources.docker import build_docker_source
from forwarder.sources.file import FileSource, own_output_identities
from forwarder.sources.running import SourceFactory, SourceSet, SourceStartError
from forwarder.sources.stdin import StdinSource

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
    sources: SourceSet
    normalize: NormalizeStage
    raw_q: asyncio.Queue[RawChunk | Marker]
    event_q: asyncio.Queue[EventChunk | Marker]
    alarms: Alarms
    build_source: SourceFactory
    stop: asyncio.Event
    exit_on_eof: bool = False
    retention: RetentionJob | None = None
    reloading: asyncio.Lock = field(default_factory=asyncio.Lock)

    def progress(self) -> tuple[int, int]:
        done = total = 0
        for source in self.sources:
            d, t = source.progress()
            done += d
            total += t
        return done, total

    async def flush(self) -> None:
        """Return once every line queued so far is committed (or the daemon stops)."""
        await flush_through(self.raw_q, self.stop)


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
    _raise_open_files_limit(settings)
    # SIGHUP's default action ends the process: one sent during start-up (a deploy
    # script, logrotate's postrotate) or the drain must not; the supervisor reloads.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    database = await open_database(settings.database)
    try:
        return await _run_pipeline(
            settings, database, exit_on_eof, clock, on_started, progress, reload
        )
    finally:
        database.close()


# With an unlimited hard limit the kernel still caps the soft one (fs.nr_open).
NOFILE_UNLIMITED_TARGET = 1 << 20


def open_files_target(soft: int, hard: int, wanted: int) -> int:
    """The RLIMIT_NOFILE soft limit to set (pure): `wanted`, or the hard limit when
    `wanted` is 0 or above it; never below `soft` (the limit is only ever raised)."""
    ceiling = NOFILE_UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    target = ceiling if wanted <= 0 else min(wanted, ceiling)
    return max(soft, target) if soft != resource.RLIM_INFINITY else soft


def _raise_open_files_limit(settings: Settings) -> None:
    """Raise the open-files soft limit (http.max_open_files) and say the limit in the log."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = open_files_target(soft, hard, settings.http.max_open_files)
    now = soft
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            now = target
        except (OSError, ValueError) as e:
            log.warning(
                "cannot raise the open-files limit from %d to %d: %s",
                soft,
                target,
                e,
                extra={"component": "runtime", "event": "startup.open_files"},
            )
    hard_text = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    log.info(
        "open files limit %d (soft, %s at start; hard %s)",
        now,
        f"raised from {soft}" if now != soft else "unchanged",
        hard_text,
        extra={
            "component": "runtime",
            "event": "startup.open_files",
            "open_files_soft": now,
            "open_files_soft_at_start": soft,
            "open_files_hard": hard_text,
        },
    )
    http = settings.http
    if http.enabled and http.max_connections * 2 > now:
        log.warning(
            "http.max_connections (%d) is more than half the open-files limit (%d): a "
            "flood of connections could leave no descriptor for files, the database and "
            "probes; lower it or raise the hard limit (ulimit -Hn, compose ulimits.nofile)",
            http.max_connections,
            now,
            extra={"component": "runtime", "event": "startup.open_files"},
        )


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

        async def build_source(
            cfg: FileSourceConfig | DockerSourceConfig | StdinSourceConfig,
        ) -> Source:
            """A source resuming from the positions committed under its name."""
            checkpoints = await sink.load_checkpoints(cfg.name)
            if isinstance(cfg, StdinSourceConfig):
                name = cfg.name
                try:
                    return StdinSource(
                        cfg,
                        db.data_dir,
                        clock,
                        checkpoints,
                        exit_on_eof=exit_on_eof,
                        committed=lambda: sink.load_checkpoints(name),
                    )
                except (OSError, SpoolError) as e:
                    raise StartupError(f"cannot open the spool of source {name}: {e}") from None
            options = {"exit_on_eof": exit_on_eof, "ignore_identities": own_output}
            if isinstance(cfg, DockerSourceConfig):
                return build_docker_source(cfg, checkpoints, clock, **options)
            return FileSource(cfg, checkpoints, clock, **options)

        size = settings.pipeline.queue_chunks
        raw_q: asyncio.Queue[RawChunk | Marker] = asyncio.Queue(maxsize=size)
        stop = asyncio.Event()
        sources = SourceSet(raw_q, stop, exit_on_eof=exit_on_eof)
        for cfg in settings.sources:
            sources.add(cfg.name, await build_source(cfg), cfg)
        # A backfill reads its files to the end and exits; the intake has no end, so it
        # stays off (what its spool holds is replayed by the next daemon run).
        serve_http = settings.http.enabled and not exit_on_eof
        if settings.http.enabled and exit_on_eof:
            log.info(
                "backfill (--exit-on-eof): the HTTP server and intake are not started",
                extra={"component": "runtime"},
            )
        intake = await _build_intake(settings, sink, clock) if serve_http else None
        if intake is not None:
            sources.add(intake.name, intake)  # not reloadable: [http] needs a restart
        alarm_q: asyncio.Queue[EventChunk | Marker] = asyncio.Queue(maxsize=size)
        try:
            async with open_alarms(settings, sink, clock, alarm_q) as alarms:
                pipeline = Pipeline(
                    settings=settings,
                    sink=sink,
                    sources=sources,
                    build_source=build_source,
                    stop=stop,
                    normalize=NormalizeStage(
                        clock, privacy=privacy, sampler=_sampler(settings, exit_on_eof)
                    ),
                    raw_q=raw_q,
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
    if not settings.http.enabled or pipeline.exit_on_eof:
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
        if isinstance(cfg, StdinSourceConfig):
            log.info(
                "source %s (%s): reading standard input as service %s",
                cfg.name,
                cfg.type,
                cfg.service,
                extra={"component": "runtime", "event": "startup.source", "source": cfg.name},
            )
            continue
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
RELOADABLE = ("sampling", "alarms", "notifiers", "probes", "sources")


async def reload_config(pipeline: Pipeline, load: Callable[[], Settings]) -> None:
    """SIGHUP: read the configuration again; apply what can change while running.

    A file that does not validate, or names a secret that is missing, is refused and
    logged; the running configuration stays whole. Otherwise, in this order: notifiers
    and probes are swapped (before the rules that may name them); sampling is swapped;
    alarm rules are replaced keeping what is firing (their counting windows start
    empty); removed and changed sources stop and, once what they queued is committed,
    changed and added ones start from their committed positions: no line is read
    twice or skipped.
    """
    async with pipeline.reloading:  # one reload at a time, in signal order
        try:
            new = load()
        except ConfigError as e:
            _refuse("; ".join(e.problems))
            return
        old = pipeline.settings
        try:
            applied = await pipeline.alarms.replace_receivers(new.notifiers, new.probes)
        except AlarmSetupError as e:
            _refuse(str(e))
            return
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
        failed = []
        # Against what runs, not the old file: a source that failed to start is retried.
        if {cfg.name: cfg for cfg in new.sources} != pipeline.sources.configs():
            if pipeline.exit_on_eof:
                restart.append("sources")  # a backfill reads a fixed set to its end
            else:
                failed = await _reload_sources(pipeline, new)
                applied.append("sources")
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
            "sources_failed": failed,
        },
    )


def _refuse(problem: str) -> None:
    log.error(
        "SIGHUP: the new configuration is refused, the running one stays: %s",
        problem,
        extra={"component": "runtime", "event": "reload.refused"},
    )


async def _reload_sources(pipeline: Pipeline, new: Settings) -> list[str]:
    """Swap the source list; returns the names of sources that could not start."""
    configs = {cfg.name: cfg for cfg in new.sources}
    try:
        changes = await pipeline.sources.replace(configs, pipeline.build_source, pipeline.flush)
    except SourceStartError as e:
        log.error("SIGHUP: %s", e, extra={"component": "runtime", "event": "reload.source_failed"})
        return [e.name]
    log.info(
        "SIGHUP: sources added: %s; removed: %s; restarted with a new config: %s",
        ", ".join(changes.added) or "none",
        ", ".join(changes.removed) or "none",
        ", ".join(changes.changed) or "none",
        extra={"component": "runtime", "event": "reload.sources"},
    )
    return []


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
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup(load: Callable[[], Settings]) -> None:
        if pipeline.stop.is_set():
            log.info("SIGHUP ignored: draining", extra={"component": "runtime"})
            return
        task = asyncio.create_task(reload_config(pipeline, load), name="reload")
        reloads.add(task)
        task.add_done_callback(lambda t: _reload_finished(t, reloads))

    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, on_sighup, reload)
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
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # not back to SIG_DFL (see run)
        if deadline is not None:
            deadline.cancel()
        for task in list(reloads):  # a reload waiting on the database ends with the daemon
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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


def _reload_finished(task: asyncio.Task[None], running: set[asyncio.Task[None]]) -> None:
    running.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        # A bug, not a bad file (that is refused): keep running on what was applied.
        log.error(
            "SIGHUP: the reload failed: %r",
            exc,
            exc_info=exc,
            extra={"component": "runtime", "event": "reload.failed"},
        )


async def _run_sources(pipeline: Pipeline) -> None:
    """Run every source; once all have returned, end the stream for the stages."""
    await pipeline.sources.run()
    await pipeline.raw_q.put(END_OF_STREAM)
    pipeline.stop.set()  # a backfill at its end: stop the probes too
