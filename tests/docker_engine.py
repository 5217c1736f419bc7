"""A scripted stand-in for the Docker Engine API on a unix socket, for the faults a real
dockerd cannot be made to produce on demand (a stream cut inside a frame, an event
stream aborted, a re-send at an exact message); everything else is tested against a
real dockerd (tests/dockerd.py).

It speaks the wire format of the endpoints the api-mode source uses as Debian's
dockerd 20.10.24 (API 1.41) does, checked with curl on its socket: HTTP/1.1 over a
unix socket; `GET /containers/json`, `GET /containers/{id}/json`;
`GET /containers/{id}/logs` with follow/stdout/stderr/timestamps/since/tail, streamed
with chunked transfer encoding and no Content-Type header, multiplexed with the 8-byte
header per frame (stream type, 3 zero bytes, big-endian uint32 length) unless the
container has a TTY, every message prefixed by its RFC3339Nano timestamp (9 fraction
digits, "Z") and a space; `GET /events` streaming one JSON object per event.

Log lines are stored the way dockerd's json-file driver stores them: one message per
line, a line longer than 16 KB split into 16 KB messages (only the last ends in
"\\n"), every piece stamped with the line's first timestamp; TTY lines end in
"\\r\\n". `since` keeps the messages stamped at or after it, as dockerd does.

`rotate` starts a new json-file, as `--log-opt max-size` makes dockerd do, whoever
reads: a follow stream that crosses it reads the new file to its end and then sends
what it read of it once more from its start (dockerd 20.10 takes the new, smaller file
for a truncated one); a new request reads the files whole.

Faults: `break_logs` cuts the next logs stream of a container in the middle of a
frame (then aborts the connection); `break_events` aborts the event streams; `close`
and `start` take the socket away and bring it back (a daemon restart).

Also here, for files-mode tests: `config_v2`, a container's config.v2.json as dockerd
writes it, and `compose_labels`, the labels docker compose sets.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web

NS = 1_000_000_000
PARTIAL_BYTES = 16 * 1024
BASE_TS_NS = int(datetime(2026, 11, 26, 12, 0, tzinfo=UTC).timestamp()) * NS
STREAM_TYPES = {"stdout": 1, "stderr": 2}


def rfc3339_nano(ts_ns: int) -> str:
    """dockerd's RFC3339NanoFixed in UTC: 2006-01-02T15:04:05.000000000Z."""
    seconds, nanos = divmod(ts_ns, NS)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def frame(stream: str, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", STREAM_TYPES[stream], len(payload)) + payload


def parse_since(value: str) -> int:
    """dockerd's `since`: "<seconds>[.<nanos>]" -> ns."""
    seconds, _, frac = value.partition(".")
    return int(seconds) * NS + int(frac.ljust(9, "0")[:9] or "0")


def config_v2(
    cid: str,
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    running: bool = True,
    tty: bool = False,
) -> dict[str, Any]:
    """A container's /var/lib/docker/containers/<id>/config.v2.json, as dockerd
    (moby's `container.Container`, serialized) writes it: the fields the source reads
    (ID, Name, Config.Labels, Config.Tty, State.Running) among the others."""
    root = f"/var/lib/docker/containers/{cid}"
    return {
        "StreamConfig": {},
        "State": {
            "Running": running,
            "Paused": False,
            "Restarting": False,
            "OOMKilled": False,
            "RemovalInProgress": False,
            "Dead": False,
            "Pid": 31337 if running else 0,
            "ExitCode": 0,
            "Error": "",
            "StartedAt": "2026-11-26T11:59:58.123456789Z",
            "FinishedAt": "0001-01-01T00:00:00Z" if running else "2026-11-26T12:10:00.5Z",
            "Health": None,
        },
        "ID": cid,
        "Created": "2026-11-26T11:59:57.987654321Z",
        "Managed": False,
        "Path": "docker-entrypoint.sh",
        "Args": ["gunicorn", "app:app"],
        "Config": {
            "Hostname": cid[:12],
            "Domainname": "",
            "User": "",
            "AttachStdin": False,
            "AttachStdout": True,
            "AttachStderr": True,
            "ExposedPorts": {"8000/tcp": {}},
            "Tty": tty,
            "OpenStdin": False,
            "StdinOnce": False,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "PYTHONUNBUFFERED=1"],
            "Cmd": ["gunicorn", "app:app"],
            "Image": "shop/api:1.4.2",
            "Volumes": None,
            "WorkingDir": "/app",
            "Entrypoint": ["docker-entrypoint.sh"],
            "OnBuild": None,
            "Labels": dict(labels or {}),
        },
        "Image": "sha256:" + "5f" * 32,
        "ImageManifest": None,
        "NetworkSettings": {
            "Bridge": "",
            "SandboxID": "9c" * 32,
            "SandboxKey": "/var/run/docker/netns/9c9c9c9c9c9c",
            "HairpinMode": False,
            "Networks": {"shop_default": {"IPAddress": "172.18.0.3", "Aliases": [name]}},
            "Service": None,
            "Ports": {"8000/tcp": None},
            "HasSwarmEndpoint": False,
        },
        "LogPath": f"{root}/{cid}-json.log",
        "Name": "/" + name,
        "Driver": "overlay2",
        "OS": "linux",
        "RestartCount": 0,
        "HasBeenStartedBefore": True,
        "HasBeenManuallyStopped": False,
        "MountPoints": {},
        "SecretReferences": None,
        "ConfigReferences": None,
        "MountLabel": "",
        "ProcessLabel": "",
        "AppArmorProfile": "docker-default",
        "SeccompProfile": "",
        "NoNewPrivileges": False,
        "HostnamePath": f"{root}/hostname",
        "HostsPath": f"{root}/hosts",
        "ShmPath": "",
        "ResolvConfPath": f"{root}/resolv.conf",
        "LocalLogCacheMeta": {"HaveNotifyEnabled": False},
    }


def compose_labels(project: str, service: str, number: int = 1) -> dict[str, str]:
    """The labels docker compose puts on a service's container."""
    return {
        "com.docker.compose.config-hash": "8d" * 32,
        "com.docker.compose.container-number": str(number),
        "com.docker.compose.depends_on": "",
        "com.docker.compose.image": "sha256:" + "5f" * 32,
        "com.docker.compose.oneoff": "False",
        "com.docker.compose.project": project,
        "com.docker.compose.project.config_files": f"/home/dev/{project}/compose.yaml",
        "com.docker.compose.project.working_dir": f"/home/dev/{project}",
        "com.docker.compose.service": service,
        "com.docker.compose.version": "2.29.7",
    }


@dataclass
class Message:
    ts_ns: int
    stream: str
    text: bytes  # ends in "\n" unless it is a partial


@dataclass
class Container:
    id: str
    name: str
    labels: dict[str, str]
    tty: bool
    running: bool
    messages: list[Message] = field(default_factory=list)
    rotations: list[int] = field(default_factory=list)  # where each new file starts

    def inspect(self) -> dict[str, Any]:
        return {
            "Id": self.id,
            "Created": "2026-11-26T11:59:00.000000000Z",
            "Name": "/" + self.name,
            "Config": {
                "Hostname": self.id[:12],
                "Tty": self.tty,
                "Image": "example/app:1",
                "Labels": dict(self.labels),
            },
            "State": {
                "Status": "running" if self.running else "exited",
                "Running": self.running,
                "Pid": 4242 if self.running else 0,
                "ExitCode": 0,
            },
            "LogPath": f"/var/lib/docker/containers/{self.id}/{self.id}-json.log",
        }

    def summary(self) -> dict[str, Any]:
        return {
            "Id": self.id,
            "Names": ["/" + self.name],
            "Image": "example/app:1",
            "Labels": dict(self.labels),
            "State": "running" if self.running else "exited",
            "Status": "Up 1 minute" if self.running else "Exited (0) 1 second ago",
        }


@dataclass
class LogsBreak:
    """Cut the next logs stream after `after` whole messages, `cut` bytes into the next."""

    after: int
    cut: int


class FakeEngine:
    """The server and its script: containers, their log messages, events, faults."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.containers: dict[str, Container] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._clock_ns = BASE_TS_NS
        self._changed = asyncio.Event()
        self._subscribers: list[asyncio.Queue[dict[str, Any] | None]] = []
        self._breaks: dict[str, LogsBreak] = {}
        self._streams: set[web.StreamResponse] = set()
        self._runner: web.AppRunner | None = None
        self._closing = False

    # -- lifetime ------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/containers/json", self._list)
        app.router.add_get("/containers/{id}/json", self._inspect)
        app.router.add_get("/containers/{id}/logs", self._logs)
        app.router.add_get("/events", self._events)
        self._closing = False
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket_path)).start()

    async def close(self) -> None:
        """Stop serving: open streams end (as when dockerd stops), the socket goes away."""
        self._closing = True
        self._notify()
        for queue in self._subscribers:
            queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.socket_path.unlink(missing_ok=True)

    async def restart(self) -> None:
        await self.close()
        await self.start()

    # -- script --------------------------------------------------------------------

    def add(
        self,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        tty: bool = False,
        running: bool = True,
        cid: str | None = None,
    ) -> Container:
        """A container that exists already (no event)."""
        c = Container(cid or secrets.token_hex(32), name, dict(labels or {}), tty, running)
        self.containers[c.id] = c
        return c

    def start_container(self, cid: str) -> None:
        self.containers[cid].running = True
        self._event("start", self.containers[cid])
        self._notify()

    def stop_container(self, cid: str) -> None:
        """It exits: its follow streams end, a die event is sent."""
        self.containers[cid].running = False
        self._event("die", self.containers[cid])
        self._notify()

    def write(
        self,
        cid: str,
        line: bytes | str,
        stream: str = "stdout",
        ts_ns: int | None = None,
        *,
        rotate_after: int | None = None,
    ) -> None:
        """The container writes one line: stored as dockerd's copier splits it;
        `rotate_after`: a new file starts after that many of its pieces."""
        c = self.containers[cid]
        data = line.encode() if isinstance(line, str) else line
        pieces = [data[i : i + PARTIAL_BYTES] for i in range(0, len(data), PARTIAL_BYTES)]
        pieces = pieces or [b""]
        end = b"\r\n" if c.tty else b"\n"
        stamp = self._tick() if ts_ns is None else ts_ns  # one for all the pieces
        for i, piece in enumerate(pieces):
            if i == rotate_after:
                self.rotate(cid)
            last = i == len(pieces) - 1
            c.messages.append(Message(stamp, stream, piece + end if last else piece))
        self._notify()

    def rotate(self, cid: str) -> None:
        """json-file rotation: the next message starts a new file."""
        c = self.containers[cid]
        c.rotations.append(len(c.messages))

    def break_logs(self, cid: str, *, after: int, cut: int) -> None:
        """The next logs stream of `cid` sends `after` messages whole, then the first
        `cut` bytes of the next frame, then the connection is aborted."""
        self._breaks[cid] = LogsBreak(after, cut)

    def break_events(self) -> None:
        for queue in self._subscribers:
            queue.put_nowait(None)

    def logs_requests(self, cid: str) -> list[dict[str, str]]:
        return [q for path, q in self.requests if path == f"/containers/{cid}/logs"]

    def _tick(self) -> int:
        self._clock_ns += 1000
        return self._clock_ns

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _event(self, action: str, c: Container) -> None:
        event = {
            "status": action,
            "id": c.id,
            "from": "example/app:1",
            "Type": "container",
            "Action": action,
            "Actor": {"ID": c.id, "Attributes": {"name": c.name, **c.labels}},
            "scope": "local",
            "time": self._clock_ns // NS,
            "timeNano": self._clock_ns,
        }
        for queue in self._subscribers:
            queue.put_nowait(event)

    # -- handlers ------------------------------------------------------------------

    def _record(self, request: web.Request) -> None:
        self.requests.append((request.path, dict(request.query)))

    def _container(self, request: web.Request) -> Container:
        c = self.containers.get(request.match_info["id"])
        if c is None:
            raise web.HTTPNotFound(
                text=json.dumps({"message": f"No such container: {request.match_info['id']}"}),
                content_type="application/json",
            )
        return c

    async def _list(self, request: web.Request) -> web.Response:
        self._record(request)
        everything = request.query.get("all") in ("1", "true")
        return web.json_response(
            [c.summary() for c in self.containers.values() if everything or c.running]
        )

    async def _inspect(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.json_response(self._container(request).inspect())

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        c = self._container(request)
        q = request.query
        follow = q.get("follow") in ("1", "true")
        stamps = q.get("timestamps") in ("1", "true")
        wanted = {s for s in ("stdout", "stderr") if q.get(s) in ("1", "true")}
        since = parse_since(q["since"]) if "since" in q else None
        resp = _NoContentType()  # API 1.41 names no type: the TTY flag tells
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self._streams.add(resp)
        fault = self._breaks.pop(c.id, None)
        sent = 0
        index = len(c.messages) if q.get("tail") == "0" else 0
        files_read = len(c.rotations)  # a new request reads the files there whole
        crossed: int | None = None  # the start of a new file this stream has entered
        try:
            while not self._closing:
                changed = self._changed
                while index < len(c.messages) or crossed is not None:
                    if index == len(c.messages):  # the end of the new file: once more
                        assert crossed is not None
                        index, crossed = crossed, None
                        continue
                    if follow and files_read < len(c.rotations):
                        if index == c.rotations[files_read]:
                            files_read += 1
                            crossed = index
                    m = c.messages[index]
                    index += 1
                    if (since is not None and m.ts_ns < since) or m.stream not in wanted:
                        continue
                    payload = (rfc3339_nano(m.ts_ns).encode() + b" " if stamps else b"") + m.text
                    data = payload if c.tty else frame(m.stream, payload)
                    if fault is not None and sent == fault.after:
                        await resp.write(data[: fault.cut])
                        _abort(request)
                        return resp
                    await resp.write(data)
                    sent += 1
                if not follow or not c.running:
                    break
                await changed.wait()
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away (or the test closed the server)
        finally:
            self._streams.discard(resp)
        return resp

    async def _events(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        filters = json.loads(request.query.get("filters", "{}"))
        types = set(filters.get("type", [])) or None
        actions = set(filters.get("event", [])) or None
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._subscribers.append(queue)
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            while not self._closing:
                event = await queue.get()
                if event is None:
                    _abort(request)
                    return resp
                if types is not None and event["Type"] not in types:
                    continue
                if actions is not None and event["Action"] not in actions:
                    continue
                await resp.write(json.dumps(event).encode() + b"\n")
        finally:
            self._subscribers.remove(queue)
        return resp


class _NoContentType(web.StreamResponse):
    """A streamed answer without a Content-Type header (aiohttp adds one otherwise)."""

    async def _write_headers(self) -> None:
        self._headers.popall(hdrs.CONTENT_TYPE, None)
        await super()._write_headers()


def _abort(request: web.Request) -> None:
    """Drop the connection as a crashing daemon would: no final chunk."""
    if request.transport is not None:
        request.transport.abort()
