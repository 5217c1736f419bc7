"""Health probes run by the daemon: Redis PING (RESP over TCP) and HTTP GET expecting 2xx.

A probe's `check()` never raises for a failed check: it returns a `ProbeResult` with
`ok=False` and the error, so a `health` alarm (and system_checks) sees every outcome.
The `ProbeRunner` runs each probe on its own interval; when a probe is due is decided
by the pure `ProbeSchedule` from the injected clock, and the loop only waits.

A check that fails because of the forwarder itself, not the service, is told apart
(`forwarder_side`, decided by the pure `own_fault`): no free file descriptor or
socket buffer (EMFILE, ENFILE, ENOBUFS, ENOMEM), or a timeout whose timer fired far
late (the event loop was starved, so the answer may have been there unread). Such a
result is shown in status() and logged, but never handed to the alarms: a client
exhausting the forwarder must not make `redis_down` fire and run its actions.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_codes
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

import aiohttp

from forwarder.alarms.config import HttpProbeConfig, ProbeConfig, RedisProbeConfig
from forwarder.alarms.secrets import secret_ref
from forwarder.clock import Clock

__all__ = [
    "OWN_ERRNOS",
    "HttpProbe",
    "Probe",
    "ProbeResult",
    "ProbeRunner",
    "ProbeSchedule",
    "RedisProbe",
    "build_probes",
    "resp_command",
]

log = logging.getLogger(__name__)

COMPONENT = "alarms.probes"
PING: Final = b"*1\r\n$4\r\nPING\r\n"
MAX_DETAIL_CHARS = 200
# errno values that say the forwarder, not the probed service, is out of something.
OWN_ERRNOS: Final = frozenset(
    {errno_codes.EMFILE, errno_codes.ENFILE, errno_codes.ENOBUFS, errno_codes.ENOMEM}
)
# A timeout timer that fires this late (a fraction of the timeout, at least the floor)
# means the event loop did not run for that long: the check proves nothing.
LATE_TIMER_FRACTION: Final = 0.25
LATE_TIMER_FLOOR_S: Final = 0.1


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One check: `detail` says what was seen ("PONG", "HTTP 200") or what went wrong."""

    probe: str
    kind: str
    ok: bool
    detail: str
    latency_ms: float
    at: datetime
    forwarder_side: bool = False  # failed for the forwarder's own reasons (own_fault)

    @property
    def error(self) -> str | None:
        return None if self.ok else self.detail

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (system_checks.health_checks, /health)."""
        return {
            "probe": self.probe,
            "type": self.kind,
            "ok": self.ok,
            "detail": self.detail,
            "latency_ms": round(self.latency_ms, 3),
            "at": self.at.isoformat(),
        } | ({"forwarder_side": True} if self.forwarder_side else {})


class Probe(Protocol):
    name: str
    kind: str
    interval_s: float

    async def check(self) -> ProbeResult:
        """Run once within the probe's timeout; a failure is a result, not an exception."""


class ProbeFailed(Exception):
    """A check got an answer, but the wrong one; the message is the result's detail."""


def resp_command(*args: str) -> bytes:
    """A RESP array of bulk strings: how a client sends a command to Redis."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"


def own_fault(exc: BaseException, *, timeout_s: float, elapsed_s: float) -> str | None:
    """Why a failed check is the forwarder's own doing (pure), or None: the service's.

    `exc` is what ended the check; for a timeout, `elapsed_s` is how long it really
    took: a timer late by more than LATE_TIMER_FRACTION of `timeout_s` (at least
    LATE_TIMER_FLOOR_S) ran on a starved event loop.
    """
    if isinstance(exc, TimeoutError):
        late_s = elapsed_s - timeout_s
        if late_s > max(LATE_TIMER_FLOOR_S, LATE_TIMER_FRACTION * timeout_s):
            return f"the forwarder's event loop was stalled ({late_s:.1f}s late)"
        return None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # the error and its causes
        seen.add(id(current))
        os_error = getattr(current, "os_error", None)  # aiohttp's connector errors
        for candidate in (current, os_error):
            if isinstance(candidate, OSError) and candidate.errno in OWN_ERRNOS:
                return f"the forwarder is out of resources: {_os_error_text(candidate)}"
        current = current.__cause__ or current.__context__
    return None


def _os_error_text(exc: OSError) -> str:
    if exc.errno is not None and exc.errno in errno_codes.errorcode:
        return os.strerror(exc.errno)
    return exc.strerror or type(exc).__name__


class _TimedProbe:
    kind = ""

    def __init__(self, name: str, clock: Clock, interval_s: float, timeout_s: float) -> None:
        if timeout_s <= 0 or interval_s <= 0:
            raise ValueError("a probe needs interval_s > 0 and timeout_s > 0")
        self.name = name
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._clock = clock

    async def check(self) -> ProbeResult:
        started = self._clock.monotonic()
        failure: BaseException | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                ok, detail = True, await self._attempt()
        except TimeoutError as exc:
            failure = exc
            ok, detail = False, f"timed out after {self.timeout_s:g}s{self._phase_text()}"
        except ProbeFailed as exc:
            failure = exc
            ok, detail = False, str(exc)
        except OSError as exc:
            failure = exc
            ok, detail = False, f"{self._os_context()}: {_os_error_text(exc)}"
        except Exception as exc:  # a probe must report, never kill the runner
            failure = exc
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        elapsed_s = self._clock.monotonic() - started
        own = None
        if failure is not None:
            own = own_fault(failure, timeout_s=self.timeout_s, elapsed_s=elapsed_s)
            if own is not None:
                detail = f"forwarder-side: {own} ({detail})"
        return ProbeResult(
            self.name,
            self.kind,
            ok,
            _clip(self._redact(detail)),
            elapsed_s * 1000.0,
            self._clock.now(),
            forwarder_side=own is not None,
        )

    async def _attempt(self) -> str:
        raise NotImplementedError

    def _phase_text(self) -> str:
        return ""

    def _os_context(self) -> str:
        return "I/O error"

    def _redact(self, text: str) -> str:
        return text


class RedisProbe(_TimedProbe):
    """PING over a fresh TCP connection, after AUTH when a password is configured."""

    kind = "redis"

    def __init__(
        self,
        name: str,
        clock: Clock,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        password: str | None = None,
        interval_s: float = 10.0,
        timeout_s: float = 2.0,
    ) -> None:
        super().__init__(name, clock, interval_s, timeout_s)
        self.host = host
        self.port = port
        self._password = password
        self._phase = "connect"

    def __repr__(self) -> str:
        return f"<RedisProbe {self.name!r} {self.host}:{self.port}>"

    async def _attempt(self) -> str:
        self._phase = "connect"
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            if self._password is not None:
                self._phase = "AUTH"
                writer.write(resp_command("AUTH", self._password))
                await writer.drain()
                reply = await self._reply(reader)
                if reply != "+OK":
                    raise ProbeFailed(f"AUTH refused by {self.host}:{self.port}: {reply}")
            self._phase = "PING"
            writer.write(PING)
            await writer.drain()
            reply = await self._reply(reader)
            if reply != "+PONG":
                raise ProbeFailed(f"PING to {self.host}:{self.port} answered {reply}")
            return "PONG"
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _reply(self, reader: asyncio.StreamReader) -> str:
        line = await reader.readline()
        if not line:
            raise ProbeFailed(f"{self.host}:{self.port} closed the connection during {self._phase}")
        return line.rstrip(b"\r\n").decode("utf-8", "replace")

    def _phase_text(self) -> str:
        return f" ({self._phase} to {self.host}:{self.port})"

    def _os_context(self) -> str:
        if self._phase == "connect":
            return f"cannot connect to {self.host}:{self.port}"
        return f"{self._phase} to {self.host}:{self.port} failed"

    def _redact(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text


class HttpProbe(_TimedProbe):
    """GET a URL on the shared session; any 2xx is healthy (redirects are not followed)."""

    kind = "http"

    def __init__(
        self,
        name: str,
        clock: Clock,
        session: aiohttp.ClientSession,
        url: str,
        *,
        interval_s: float = 10.0,
        timeout_s: float = 2.0,
    ) -> None:
        super().__init__(name, clock, interval_s, timeout_s)
        self._session = session
        self.url = url

    def __repr__(self) -> str:
        return f"<HttpProbe {self.name!r}>"

    async def _attempt(self) -> str:
        try:
            async with self._session.get(self.url, allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    await resp.read()
                    return f"HTTP {resp.status}"
                body = _clip(await resp.text(errors="replace"))
                raise ProbeFailed(f"HTTP {resp.status}" + (f": {body}" if body else ""))
        except aiohttp.ClientConnectorError as exc:
            raise ProbeFailed(  # the cause stays: own_fault reads its os_error
                f"cannot connect to {exc.host}:{exc.port}: {_os_error_text(exc.os_error)}"
            ) from exc
        except aiohttp.ClientError as exc:
            # str() of some aiohttp errors embeds the URL: name the kind of failure only.
            raise ProbeFailed(f"HTTP request failed: {type(exc).__name__}") from None


def build_probes(
    configs: Mapping[str, ProbeConfig],
    session: aiohttp.ClientSession,
    clock: Clock,
    *,
    environ: Mapping[str, str] | None = None,
) -> list[Probe]:
    """One probe per `[probes.<name>]`; a password reference that cannot be read raises
    SecretError naming probes.<name>.password_env/_file."""
    probes: list[Probe] = []
    for name, cfg in configs.items():
        if isinstance(cfg, RedisProbeConfig):
            password = secret_ref(
                cfg, "password", f"probes.{name}", required=False, environ=environ
            )
            probes.append(
                RedisProbe(
                    name,
                    clock,
                    host=cfg.host,
                    port=cfg.port,
                    password=password,
                    interval_s=cfg.interval_s,
                    timeout_s=cfg.timeout_s,
                )
            )
        elif isinstance(cfg, HttpProbeConfig):
            probes.append(
                HttpProbe(
                    name,
                    clock,
                    session,
                    cfg.url,
                    interval_s=cfg.interval_s,
                    timeout_s=cfg.timeout_s,
                )
            )
        else:  # pragma: no cover - the config union is closed
            raise ValueError(f"probes.{name}.type: unknown probe type {cfg.type!r}")
    return probes


class ProbeSchedule:
    """When each probe is due (pure): first at `start`, then every interval.

    A probe that falls behind (a check longer than its interval, a stalled loop) skips
    the missed runs instead of running them back to back.
    """

    def __init__(self, intervals: Mapping[str, float], start: float) -> None:
        self._intervals = dict(intervals)
        self._next = dict.fromkeys(intervals, start)

    def due(self, now: float) -> list[str]:
        return [name for name, at in self._next.items() if at <= now]

    def done(self, name: str, now: float) -> None:
        """Record that `name`'s due run was made; `now` is when it finished."""
        nxt = self._next[name] + self._intervals[name]
        self._next[name] = nxt if nxt > now else now + self._intervals[name]

    def wait_s(self, now: float) -> float:
        if not self._next:
            return float("inf")
        return max(0.0, min(self._next.values()) - now)

    def add(self, name: str, interval_s: float, at: float) -> None:
        """Schedule `name` (anew, if it was scheduled): first at `at`, then every interval."""
        self._intervals[name] = interval_s
        self._next[name] = at

    def remove(self, name: str) -> None:
        self._intervals.pop(name, None)
        self._next.pop(name, None)


class ProbeRunner:
    """Runs every probe on its interval and puts each result on `out`.

    `replace_probes` swaps the set while running (a SIGHUP); the run loop wakes up to
    schedule what was added or changed.
    """

    def __init__(self, probes: Sequence[Probe], clock: Clock) -> None:
        self._probes = _by_name(probes)
        self._clock = clock
        self._schedule: ProbeSchedule | None = None  # while running
        self._wake = asyncio.Event()
        self._state = "starting"
        self.last: dict[str, ProbeResult] = {}
        self.checks = 0
        self.failures = 0
        self.own_failures = 0  # forwarder-side: shown and logged, never alarmed on

    @property
    def probes(self) -> Mapping[str, Probe]:
        return dict(self._probes)

    def replace_probes(self, probes: Sequence[Probe]) -> None:
        """Run `probes` from now on; a name given the same object as now is unchanged.

        Unchanged probes keep their schedule; added and changed ones run now, then on
        their interval; removed ones stop, and their last result leaves status().
        """
        old, new = self._probes, _by_name(probes)
        now = self._clock.monotonic()
        for name, probe in old.items():
            if name not in new:
                self.last.pop(name, None)
                if self._schedule is not None:
                    self._schedule.remove(name)
                self._log_change(probe, "removed")
        for name, probe in new.items():
            if old.get(name) is probe:
                continue
            if self._schedule is not None:
                self._schedule.add(name, probe.interval_s, now)
            self._log_change(probe, "changed" if name in old else "added")
        self._probes = new
        self._wake.set()

    def _log_change(self, probe: Probe, change: str) -> None:
        log.info(
            "probe %s (%s) %s",
            probe.name,
            probe.kind,
            change,
            extra={"component": COMPONENT, "probe": probe.name, "event": f"probe.{change}"},
        )

    def status(self) -> dict[str, Any]:
        return {
            "state": self._state,
            "probes": {name: r.as_dict() for name, r in self.last.items()},
            "checks": self.checks,
            "failures": self.failures,
            "own_failures": self.own_failures,
        }

    async def run(self, out: asyncio.Queue[ProbeResult], stop: asyncio.Event) -> None:
        """Until `stop` is set: run due probes (concurrently), put results, wait for the next."""
        clock = self._clock
        schedule = ProbeSchedule(
            {name: p.interval_s for name, p in self._probes.items()}, clock.monotonic()
        )
        self._schedule = schedule
        self._state = "ok"
        try:
            while not stop.is_set():
                self._wake.clear()  # a replace from here on cuts the wait below short
                due = [(name, self._probes[name]) for name in schedule.due(clock.monotonic())]
                if due:
                    results = await asyncio.gather(*(probe.check() for _, probe in due))
                    finished = clock.monotonic()
                    for (name, probe), result in zip(due, results, strict=True):
                        # Replaced or removed while it ran: the schedule already holds
                        # the new probe (or none), and this result is of the old one.
                        if self._probes.get(name) is not probe:
                            continue
                        schedule.done(name, finished)
                        self._record(result)
                        if not result.forwarder_side:  # no evidence about the service
                            await out.put(result)
                    continue
                await self._sleep(schedule.wait_s(clock.monotonic()), stop)
        finally:
            self._schedule = None
            self._state = "stopped"

    async def _sleep(self, wait_s: float, stop: asyncio.Event) -> None:
        """Wait `wait_s`, or less: until `stop` is set or the probes are replaced."""
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(self._wake.wait())]
        try:
            await asyncio.wait(
                waits,
                timeout=None if math.isinf(wait_s) else wait_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def _record(self, result: ProbeResult) -> None:
        self.checks += 1
        previous = self.last.get(result.probe)
        self.last[result.probe] = result
        if result.forwarder_side:
            self.own_failures += 1
            log.warning(
                "probe %s (%s) could not check: %s; not counted as a failure",
                result.probe,
                result.kind,
                result.detail,
                extra={"component": COMPONENT, "probe": result.probe, "event": "probe.own_error"},
            )
            return
        if not result.ok:
            self.failures += 1
        if previous is None or previous.ok != result.ok:
            log.log(
                logging.INFO if result.ok else logging.WARNING,
                "probe %s (%s) %s: %s",
                result.probe,
                result.kind,
                "ok" if result.ok else "failed",
                result.detail,
                extra={"component": COMPONENT, "probe": result.probe},
            )


def _by_name(probes: Sequence[Probe]) -> dict[str, Probe]:
    names = [p.name for p in probes]
    if len(set(names)) != len(names):
        raise ValueError("probe names must be unique")
    return {p.name: p for p in probes}
