"""The `forwarder` command: parse arguments, load the config, hand over to the runtime."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from forwarder import __version__
from forwarder.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, DSN_ENV, ConfigError, load_config

EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h: the configuration cannot be used
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: try again later (the spool is in use by another pipe)

log = logging.getLogger("forwarder.cli")

DESCRIPTION = """\
Collects the logs of a small stack into one PostgreSQL table, one JSON schema per
line (ts, service, level, event, message, meta), exactly once, even after kill -9.
"""

CONFIG_HELP = (
    f"TOML config file (default: ${CONFIG_ENV}, then {DEFAULT_CONFIG_PATH}). Every key can be "
    "overridden from the environment as FORWARDER_<SECTION>__<KEY>, e.g. "
    f"{DSN_ENV}=postgresql://user@host/db"
)

RUN_EPILOG = """\
The daemon creates or upgrades its tables at start, then tails every [[sources]]
entry and writes each line as one row. SIGTERM or SIGINT drains: sources stop, the
last batch commits, exit 0; a second signal, or daemon.drain_timeout_s, forces exit 1.
SIGHUP reads the config again: [[sources]] (removed, added, changed: no line lost or
read twice), notifiers, probes, [sampling] and the [[alarms]] rules change in place;
other sections are logged as needing a restart. An invalid file is refused and
logged, and the running configuration stays.
With --exit-on-eof every file (and standard input, for a type = "stdin" source) is
read to its end once (a backfill), then the daemon exits 0 once all is committed; on
a terminal it shows bytes done / total and lines per second.

examples:
  forwarder run --config config/forwarder.dev.toml
  FORWARDER_DATABASE__DSN=postgresql://logs@db/logs forwarder run
  forwarder run --config backfill.toml --exit-on-eof
  zcat old.log.gz | forwarder run --config stdin-backfill.toml --exit-on-eof
"""


PIPE_EPILOG = """\
Every line goes to a disk spool first (data_dir/spool/pipe-SERVICE/): if the database
is unreachable, CMD still runs and prints as usual, and the lines are written by the
next `forwarder pipe --service SERVICE`, before its own. SIGINT and SIGTERM are passed
to CMD. The pipe's own warnings are JSON lines on stderr, each on a line of its own.

examples:
  forwarder pipe --service api -- uvicorn app.main:app --reload
  python worker.py 2>&1 | forwarder pipe --service worker
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forwarder",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'forwarder COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"forwarder {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run the daemon: tail the sources and write rows until SIGTERM/SIGINT",
        description="Run the daemon: tail the configured sources, write every line to PostgreSQL.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", type=Path, metavar="PATH", help=CONFIG_HELP)
    run.add_argument(
        "--exit-on-eof",
        action="store_true",
        help="read every file source (and stdin) to its end, flush, and exit 0 (a backfill)",
    )
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser(
        "check-config",
        help="validate the config; print every error with its TOML key path",
        description="Validate the config file and environment overrides without starting. "
        "Prints every problem with its TOML key path (unknown keys are errors); exit 1 if any.",
    )
    check.add_argument("--config", type=Path, metavar="PATH", help=CONFIG_HELP)
    check.set_defaults(handler=cmd_check_config)

    migrate = commands.add_parser(
        "migrate",
        help="create or upgrade the tables (the daemon also does this at start)",
        description="Create or upgrade the forwarder's tables and the day partitions ahead, "
        "then exit. Safe to run any number of times, also while daemons are running.",
    )
    migrate.add_argument("--config", type=Path, metavar="PATH", help=CONFIG_HELP)
    migrate.set_defaults(handler=cmd_migrate)

    recent = commands.add_parser(
        "recent",
        help="show the latest rows, newest first",
        description="Show the latest rows of system_logs, newest first: the runbook's "
        "first look after an alarm (e.g. --service api --level ERROR --since 15m).",
    )
    recent.add_argument("--config", type=Path, metavar="PATH", help=CONFIG_HELP)
    recent.add_argument("--service", help="only this service (e.g. api, worker, ui)")
    recent.add_argument(
        "--level", type=str.upper, choices=["INFO", "WARNING", "ERROR"], help="only this level"
    )
    recent.add_argument(
        "--since",
        default="15m",
        type=_duration,
        metavar="DURATION",
        help="how far back: 30s, 15m, 2h, 7d",
    )
    recent.add_argument("--limit", type=int, default=50, metavar="N", help="at most N rows")
    recent.add_argument("--json", action="store_true", help="one JSON object per line")
    recent.set_defaults(handler=cmd_recent)

    alerts = commands.add_parser(
        "alerts",
        help="list firing alarms, or reset them",
        description="List the firing alarms recorded in system_checks, or reset them: "
        "--reset RULE (or --all) writes an ok row for each, the strategy's "
        "check_alerts.py --reset. After the runbook's procedure is applied. With [http] "
        "on, the reset goes through the running daemon (its memory and the rows); with "
        "no daemon answering there, into the database directly.",
    )
    alerts.add_argument("--config", type=Path, metavar="PATH", help=CONFIG_HELP)
    which = alerts.add_mutually_exclusive_group()
    which.add_argument("--reset", metavar="RULE", help="clear the firing alarm(s) of RULE")
    which.add_argument("--all", action="store_true", help="clear every firing alarm")
    alerts.set_defaults(handler=cmd_alerts)

    check = commands.add_parser(
        "check-alerts",
        help="evaluate the threshold alarms in SQL over system_logs",
        description="Evaluate the threshold rules over the rows in system_logs, for "
        "deployments where several forwarders write into one database (run it from cron). "
        "Fires, repeats and resolves through system_checks rows like the daemon does.",
    )
    check.add_argument("--config", type=Path, metavar="PATH", help=CONFIG_HELP)
    check.add_argument(
        "--window", type=float, metavar="SECONDS", help="use this window for every rule"
    )
    check.add_argument("--dry-run", action="store_true", help="report, write nothing")
    check.set_defaults(handler=cmd_check_alerts)

    summary = commands.add_parser(
        "summary",
        help="log statistics of a recent window; optionally into a JSON report",
        description="Lines per service and level over the window, the critical (ERROR) "
        "count for the dashboard badge and the firing alarms. --merge writes them into "
        "that report's log_summary field (e.g. latest_oneclick_report.json), keeping its "
        "other fields.",
    )
    summary.add_argument("--config", type=Path, metavar="PATH", help=CONFIG_HELP)
    summary.add_argument(
        "--window",
        default="15m",
        type=_duration,
        metavar="DURATION",
        help="how far back: 30s, 15m, 2h, 7d",
    )
    summary.add_argument("--merge", type=Path, metavar="FILE", help="JSON report to update")
    summary.set_defaults(handler=cmd_summary)

    retention = commands.add_parser(
        "retention",
        help="drop log partitions older than retention_days (the daemon runs it daily)",
        description="Drop day partitions of system_logs older than database.retention_days, "
        "exporting each to a gzip JSON-lines file under retention.export_dir first when set; "
        "prune dead letters and system_checks rows past their own periods. The daemon runs "
        "this once a day at retention.hour_utc.",
    )
    retention.add_argument("--config", type=Path, metavar="PATH", help=CONFIG_HELP)
    retention.add_argument("--dry-run", action="store_true", help="report, change nothing")
    retention.set_defaults(handler=cmd_retention)

    pipe = commands.add_parser(
        "pipe",
        help="forward stdin, or run CMD and forward its stdout/stderr while still printing them",
        description="Local development: run CMD and pass its stdout and stderr through\n"
        "unchanged while every line is also written to the database (meta.stream =\n"
        "stdout|stderr); exit with CMD's status. Without CMD, forward the lines of\n"
        "stdin (and copy them to stdout).",
        epilog=PIPE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pipe.add_argument(
        "--service", required=True, type=_service_name, help="service written on every row"
    )
    pipe.add_argument("--config", type=Path, metavar="PATH", help=CONFIG_HELP)
    pipe.add_argument(
        "--flush-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="after CMD exits, wait at most this long for the database (default: 5); "
        "what is not written by then stays in the spool for the next run",
    )
    pipe.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- CMD ARGS",
        help="the command to run (after --); without it, stdin is forwarded",
    )
    pipe.set_defaults(handler=cmd_pipe)
    return parser


def _service_name(value: str) -> str:
    from forwarder.pipe import validate_service

    try:
        return validate_service(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except CommandError as e:
        print(f"forwarder {args.command}: {e}", file=sys.stderr)
        return 1


def _duration(text: str) -> Any:
    """argparse type of --since/--window: a timedelta, or the problem in argparse's words."""
    from forwarder.queries import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _load(args: argparse.Namespace) -> Any:
    try:
        return load_config(args.config)
    except ConfigError as e:
        print(f"forwarder: invalid configuration in {e.source}:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    if settings is None:
        return 1
    if not settings.database.dsn.get_secret_value().strip():
        print(
            f"note: database.dsn is empty; `forwarder run` will need {DSN_ENV} set",
            file=sys.stderr,
        )
    names = ", ".join(s.name for s in settings.sources) or "none"
    print(f"config OK: {len(settings.sources)} source(s) ({names})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from forwarder.logs import setup_logging
    from forwarder.runtime import StartupError, run

    settings = _load(args)
    if settings is None:
        return EXIT_CONFIG
    setup_logging(settings.daemon.log_level)
    _tune_gc()
    show_progress = args.exit_on_eof and sys.stderr.isatty()
    try:
        return _run_async(
            run(
                settings,
                exit_on_eof=args.exit_on_eof,
                progress=_progress_bar if show_progress else None,
                reload=lambda: load_config(args.config),
            )
        )
    except StartupError as e:
        log.error("cannot start: %s", e, extra={"component": "runtime"})
        return EXIT_CONFIG


def cmd_migrate(args: argparse.Namespace) -> int:
    from forwarder.logs import setup_logging
    from forwarder.runtime import StartupError, open_database
    from forwarder.sinks.postgres import PostgresSink

    settings = _load(args)
    if settings is None:
        return EXIT_CONFIG
    setup_logging(settings.daemon.log_level)

    async def migrate() -> list[str]:
        from forwarder.clock import SystemClock

        clock = SystemClock()
        database = await open_database(settings.database)
        try:
            sink = PostgresSink(settings.database, settings.batch, database.dsn, clock)
            await sink.open()
            try:
                return await sink.migrate(clock.now().date())
            finally:
                await sink.aclose()
        finally:
            database.close()

    try:
        actions = _run_async(migrate())
    except StartupError as e:
        log.error("cannot start: %s", e, extra={"component": "runtime"})
        return EXIT_CONFIG
    for action in actions:
        print(action)
    print("schema up to date")
    return 0


class CommandError(Exception):
    """A read or maintenance command failed; the message says why (exit status 1)."""


def _with_connection(settings: Any, fn: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run `fn(conn)` on a connection to the configured database (embedded included)."""
    import asyncpg

    from forwarder.runtime import StartupError, open_database

    async def go() -> Any:
        database = await open_database(settings.database)
        try:
            conn = await asyncpg.connect(database.dsn)
            try:
                return await fn(conn)
            finally:
                await conn.close()
        finally:
            database.close()

    try:
        return _run_async(go())
    except StartupError as e:
        raise CommandError(str(e)) from None
    except (OSError, asyncpg.PostgresError) as e:
        raise CommandError(f"cannot query the database: {e}") from None


def cmd_recent(args: argparse.Namespace) -> int:
    import orjson

    from forwarder.clock import SystemClock
    from forwarder.queries import recent

    settings = _load(args)
    if settings is None:
        return EXIT_CONFIG
    rows = _with_connection(
        settings,
        lambda conn: recent(
            conn,
            settings.database,
            since=SystemClock().now() - args.since,
            service=args.service,
            level=args.level,
            limit=args.limit,
        ),
    )
    for row in rows:
        meta = orjson.loads(row["meta"]) if isinstance(row["meta"], str | bytes) else row["meta"]
        if args.json:
            line = {**row, "ts": row["ts"].isoformat(), "meta": meta}
            print(orjson.dumps(line).decode())
        else:
            extra = f"  {orjson.dumps(meta).decode()}" if meta else ""
            print(
                f"{row['ts']:%Y-%m-%d %H:%M:%S.%f}"[:-3]
                + f"  {row['service']:<8} {row['level']:<7} {row['event']:<20} "
                f"{row['message']}{extra}"
            )
    if not rows and sys.stdout.isatty():
        print(f"no rows in the last {args.since}", file=sys.stderr)
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    from forwarder.alarms import state
    from forwarder.clock import SystemClock
    from forwarder.sinks.schema import Names

    settings = _load(args)
    if settings is None:
        return EXIT_CONFIG
    names = Names.from_config(settings.database)
    rule = None if args.all else args.reset
    if args.reset and args.reset not in {a.name for a in settings.alarms}:
        print(f"note: no alarm named {args.reset!r} in the config", file=sys.stderr)

    async def work(conn: Any) -> list[Any]:
        if args.reset or args.all:
            return await state.reset(conn, names, SystemClock().now(), rule=rule)
        return await state.load_firing(conn, names)

    resetting = bool(args.reset or args.all)
    # A running daemon holds the firing state in memory: reset it there (it writes
    # the ok rows too); only with no daemon answering, write the rows directly.
    done = _reset_in_daemon(settings, rule) if resetting else None
    if done is not None:
        for f in done["cleared"]:
            print(f"reset {f['rule']}" + (f" [{f['group']}]" if f.get("group") else ""))
        print(
            f"{done['rows_written']} alarm(s) reset in the running daemon "
            f"({done['resolved']} resolved in its memory)"
        )
        return 0
    rows = _with_connection(settings, work)
    if resetting:
        for f in rows:
            print(f"reset {f.rule}" + (f" [{f.group}]" if f.group else ""))
        print(f"{len(rows)} alarm(s) reset in system_checks")
        if not settings.http.enabled:
            print(
                "note: [http] is off, so a running daemon was not told: it keeps them firing "
                "until they resolve (POST /alerts/RULE/reset reaches it when [http] is on)",
                file=sys.stderr,
            )
        return 0
    if not rows:
        print("no alarm is firing")
        return 0
    for f in rows:
        group = f" [{f.group}]" if f.group else ""
        print(
            f"FIRING  {f.rule}{group}  since {f.started_at:%Y-%m-%d %H:%M:%S}  "
            f"count {f.count}  severity {f.severity or '-'}"
        )
        for sample in f.samples:
            print(f"        {sample}")
    return 0


def _reset_in_daemon(settings: Any, rule: str | None) -> dict[str, Any] | None:
    """POST the reset to the daemon's [http] listener; None when none listens there."""
    import aiohttp

    from forwarder.http_config import TokenError

    http = settings.http
    host, port = http.host_port
    if not http.enabled or port == 0:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    path = "/alerts/reset" if rule is None else f"/alerts/{quote(rule, safe='')}/reset"
    try:
        tokens = sorted(http.load_tokens())
    except TokenError as e:
        raise CommandError(str(e)) from None
    headers = {"Authorization": f"Bearer {tokens[0]}"} if tokens else {}

    async def post() -> dict[str, Any] | None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as client:
            try:
                async with client.post(f"http://{where}{path}", headers=headers) as r:
                    body = await r.json(content_type=None)
                    if r.status != 200:
                        error = body.get("error") if isinstance(body, dict) else body
                        raise CommandError(f"the daemon at {where} answered {r.status}: {error}")
                    return dict(body)
            except aiohttp.ClientConnectorError:
                return None  # no daemon running (or not on this host)
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                raise CommandError(f"the daemon at {where} did not answer: {e!r}") from None

    return _run_async(post())


def cmd_check_alerts(args: argparse.Namespace) -> int:
    from forwarder.alarms import state
    from forwarder.clock import SystemClock
    from forwarder.sinks.schema import Names

    settings = _load(args)
    if settings is None:
        return EXIT_CONFIG
    names = Names.from_config(settings.database)
    report = _with_connection(
        settings,
        lambda conn: state.check_alerts(
            conn,
            names,
            settings.alarms,
            SystemClock().now(),
            window_s=args.window,
            write=not args.dry_run,
        ),
    )
    for kind, alerts in (
        ("fired", report.fired),
        ("repeated", report.repeated),
        ("resolved", report.resolved),
    ):
        for a in alerts:
            group = f" [{a.group}]" if a.group else ""
            print(f"{kind:<9} {a.rule}{group}  count {a.count}")
    print(
        f"{len(report.hits)} rule(s) over threshold; "
        f"{'nothing written (dry run)' if args.dry_run else 'system_checks updated'}"
    )
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    import orjson

    from forwarder.report import merge_into_report, summarize
    from forwarder.sinks.schema import Names

    settings = _load(args)
    if settings is None:
        return EXIT_CONFIG
    names = Names.from_config(settings.database)
    result = _with_connection(settings, lambda conn: summarize(conn, names, args.window))
    if args.merge is not None:
        try:
            merge_into_report(args.merge, result)
        except (OSError, ValueError) as e:
            print(f"forwarder summary: cannot update {args.merge}: {e}", file=sys.stderr)
            return 1
        print(f"log_summary written into {args.merge}")
        return 0
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2, default=str).decode())
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    from forwarder.retention import retention_command
    from forwarder.runtime import StartupError

    settings = _load(args)
    if settings is None:
        return EXIT_CONFIG
    try:
        report = _run_async(retention_command(settings, dry_run=args.dry_run))
    except StartupError as e:
        print(f"forwarder retention: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as e:
        print(f"forwarder retention: cannot reach the database: {e}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


def cmd_pipe(args: argparse.Namespace) -> int:
    from forwarder.pipe import LineGate, PipeOptions, install_logging, run_pipe
    from forwarder.runtime import StartupError
    from forwarder.sinks.spool import SpoolError, SpoolLocked

    settings = _load(args)
    if settings is None:
        return EXIT_CONFIG
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.flush_timeout < 0:
        print("forwarder pipe: --flush-timeout must not be negative", file=sys.stderr)
        return 2
    gate = LineGate(sys.stderr.fileno())
    install_logging(gate, settings.daemon.log_level)
    options = PipeOptions(
        service=args.service, command=tuple(command), flush_timeout_s=args.flush_timeout
    )
    try:
        return int(_run_async(run_pipe(settings, options, stderr_gate=gate)))
    except StartupError as e:
        log.error("cannot start: %s", e, extra={"component": "pipe"})
        return EXIT_CONFIG
    except SpoolLocked as e:
        log.error(
            "cannot start: %s (another `forwarder pipe --service %s` is running; "
            "give this one another --service)",
            e,
            args.service,
            extra={"component": "pipe"},
        )
        return EXIT_TEMPFAIL
    except SpoolError as e:
        log.error("cannot start: %s", e, extra={"component": "pipe"})
        return EXIT_CONFIG


def _tune_gc() -> None:
    """Fewer cyclic-GC passes for a daemon that allocates one dict and tuple per line.

    The pipeline's objects hold no reference cycles, yet at the default threshold (700
    allocations) the collector runs thousands of times a second and costs ~12% of the
    CPU (measured with tests/perf/file_to_pg.py). Start-up objects are frozen so that the
    rarer full passes do not walk them again.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _progress_bar(pipeline: Any) -> None:
    """Bytes done / total and committed lines per second, redrawn on stderr."""
    start = time.monotonic()

    def draw(final: bool = False) -> None:
        done, total = pipeline.progress()
        rows = pipeline.sink.rows_written
        elapsed = max(time.monotonic() - start, 1e-6)
        pct = 100.0 * done / total if total else 100.0
        sys.stderr.write(
            f"\r{done / 1e6:,.1f} / {total / 1e6:,.1f} MB ({pct:5.1f}%)  "
            f"{rows:,} rows  {rows / elapsed:,.0f} lines/s   "
        )
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()

    try:
        while True:
            draw()
            await asyncio.sleep(0.5)
    except asyncio.CancelledError:
        draw(final=True)
        raise
