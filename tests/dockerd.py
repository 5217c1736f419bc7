"""A real, private dockerd for tests, and the two images its containers run.

`RealDockerd` starts Debian's dockerd in a short temporary folder of its own (data root,
exec root, unix socket, pidfile, log), with no bridge, no iptables and nothing pulled:
every container runs with `--network none`. The client is Debian's /usr/bin/docker
(the engine's own version) with DOCKER_HOST pointing at that socket.

Images come without a registry:

- `busybox_image()`: busybox-static's binary and its applet links, `docker import`-ed
  (a fraction of a second, built per engine);
- `python_image()`: a Debian bookworm minbase rootfs with python3, pip and venv, made
  by debootstrap once and cached as a tarball under ~/.cache/forwarder-tests (keyed by
  ROOTFS_VERSION, built under a lock so two test runs never build it twice).

`real_dockerd_missing()` says why this machine cannot run one (the fixtures in
tests/dockerd_fixtures.py skip or fail with it).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _tool(name: str) -> str:
    """A system tool by name, also where root's PATH has it but a user's may not."""
    return shutil.which(name, path=f"{os.defpath}:/usr/sbin:/sbin") or f"/usr/sbin/{name}"


DOCKERD = _tool("dockerd")
DOCKER = "/usr/bin/docker"  # Debian's client, the engine's version (not /usr/local/bin's)
BUSYBOX = "/bin/busybox"  # busybox-static: it runs in an image with no libc
DEBOOTSTRAP = _tool("debootstrap")
NO_DOCKERD = "no dockerd: run .ci/install-docker (needs root)"
# Tests sharing an engine label their containers `TEST_LABEL=<token of the test>` and
# read only those (a docker source's include_labels).
TEST_LABEL = "forwarder.test"

# Change it to rebuild every cached rootfs (what debootstrap installs, or how it is trimmed).
ROOTFS_VERSION = "bookworm-minbase-python3-pip-venv-1"
ROOTFS_PACKAGES = ("python3", "python3-pip", "python3-venv", "python-is-python3")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DAEMON_FLAGS = (
    "--storage-driver=overlay2",
    "--iptables=false",
    "--ip6tables=false",
    "--bridge=none",
)
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


class DockerError(RuntimeError):
    """A docker command failed; the message has its arguments and its stderr."""


def real_dockerd_missing() -> str | None:
    """Why a real dockerd cannot run here (NO_DOCKERD and what lacks), or None."""
    if os.geteuid() != 0:
        return f"{NO_DOCKERD}: the tests are not running as root"
    lacking = [
        tool for tool in (DOCKERD, DOCKER, BUSYBOX, DEBOOTSTRAP) if not os.access(tool, os.X_OK)
    ]
    if lacking:
        return f"{NO_DOCKERD}: {', '.join(lacking)} not found"
    return None


def cache_dir() -> Path:
    """Where built images are kept between runs: $FORWARDER_TEST_CACHE, else the user's
    cache folder (~/.cache/forwarder-tests). Never inside the repository."""
    if os.environ.get("FORWARDER_TEST_CACHE"):
        return Path(os.environ["FORWARDER_TEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "forwarder-tests"


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[Path]:
    """An exclusive lock on cache_dir()/NAME.lock (across processes); yields cache_dir()."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def debian_mirror() -> str:
    """$FORWARDER_TEST_DEBIAN_MIRROR, else the machine's configured Debian mirror."""
    if os.environ.get("FORWARDER_TEST_DEBIAN_MIRROR"):
        return os.environ["FORWARDER_TEST_DEBIAN_MIRROR"]
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    with contextlib.suppress(OSError):
        for m in re.finditer(r"^URIs:\s*(\S+)", sources.read_text(), re.MULTILINE):
            if "security" not in m[1]:
                return m[1]
    with contextlib.suppress(OSError):
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[-3]:
                return parts[-3] if parts[1].startswith("[") else parts[1]
    return DEFAULT_MIRROR


def python_rootfs() -> Path:
    """The cached tarball of a Debian bookworm rootfs with python3 (debootstrap, once).

    Built in a temporary folder next to the cache and renamed into place, under a lock:
    a concurrent run waits for it instead of building it too."""
    with cache_lock("rootfs") as folder:
        tarball = folder / f"rootfs-{ROOTFS_VERSION}.tar"
        if tarball.exists():
            return tarball
        for stale in folder.glob("rootfs-*"):  # earlier versions, builds cut short
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink()
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=folder))
        try:
            root = work / "root"
            done = subprocess.run(
                [
                    DEBOOTSTRAP,
                    "--variant=minbase",
                    f"--include={','.join(ROOTFS_PACKAGES)}",
                    "bookworm",
                    str(root),
                    debian_mirror(),
                ],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise DockerError(f"debootstrap failed ({done.returncode}):\n{done.stdout[-3000:]}")
            _trim_rootfs(root)
            partial = work / "rootfs.tar"
            subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True)
            os.replace(partial, tarball)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return tarball


def _trim_rootfs(root: Path) -> None:
    """Drop apt's caches and the docs; let pip install into the system like the python
    images do (no EXTERNALLY-MANAGED marker)."""
    for pattern in (
        "var/cache/apt/*.bin",
        "var/cache/apt/archives/*.deb",
        "var/lib/apt/lists/*_*",
        "usr/lib/python3*/EXTERNALLY-MANAGED",
    ):
        for path in root.glob(pattern):
            path.unlink()
    for folder in ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info"):
        shutil.rmtree(root / folder, ignore_errors=True)
        (root / folder).mkdir()


def busybox_tar() -> bytes:
    """A rootfs of busybox-static and its applet links, as an uncompressed tar."""
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        tar.add(BUSYBOX, arcname="bin/busybox")
        for applet in applets.stdout.split():
            if applet == "busybox":
                continue
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
    return buf.getvalue()


@dataclass(frozen=True, slots=True)
class Container:
    """A container of a RealDockerd; `output` and `exit_code` for a foreground run."""

    engine: RealDockerd
    id: str
    name: str
    exit_code: int | None = None
    output: str = ""

    def wait(self, timeout_s: float = 60) -> int:
        return self.engine.wait(self.id, timeout_s)

    def inspect(self) -> dict[str, Any]:
        return self.engine.inspect(self.id)

    def logs(self) -> tuple[str, str]:
        return self.engine.logs(self.id)

    @property
    def log_path(self) -> Path:
        return self.engine.log_path(self.id)

    def messages(self) -> list[tuple[str, str]]:
        return self.engine.logged_messages(self.id)

    def stop(self, timeout_s: int = 10) -> None:
        self.engine.docker("stop", "--time", str(timeout_s), self.id, timeout_s=timeout_s + 30)


class RealDockerd:
    """A private dockerd: its own data root, exec root and socket in `folder`.

    `start()` returns once the engine answers on its socket; `stop()` sends SIGTERM to
    its pid and waits; `restart()` keeps the data root (containers, images, logs);
    `close()` stops it and removes the folder.
    """

    def __init__(self, folder: Path | None = None, *, flags: Sequence[str] = ()) -> None:
        # Short: the unix socket path must stay under 108 bytes.
        self.folder = folder or Path(tempfile.mkdtemp(prefix="fwd-", dir="/tmp"))
        self.flags = list(flags)
        self.data_root = self.folder / "data"
        self.exec_root = self.folder / "exec"
        self.socket = self.folder / "docker.sock"
        self.pidfile = self.folder / "dockerd.pid"
        self.log_file = self.folder / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None  # how long the last start took

    # -- the engine ----------------------------------------------------------------------

    @property
    def containers_dir(self) -> Path:
        """dockerd's containers folder: what a files-mode source reads."""
        return self.data_root / "containers"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self) -> RealDockerd:
        if self.pid is not None:
            return self
        started = time.monotonic()
        self.socket.unlink(missing_ok=True)
        self._clear_stale_pidfiles()
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    DOCKERD,
                    *DAEMON_FLAGS,
                    f"--data-root={self.data_root}",
                    f"--exec-root={self.exec_root}",
                    f"--host={self.host}",
                    f"--pidfile={self.pidfile}",
                    *self.flags,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of pytest does not reach it first
            )
        deadline = started + START_TIMEOUT_S
        while not self.ping():
            if self.proc.poll() is not None:
                raise DockerError(f"dockerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise DockerError(
                    f"dockerd did not answer in {START_TIMEOUT_S}s:\n{self.log_tail()}"
                )
            time.sleep(0.02)
        self.start_seconds = time.monotonic() - started
        return self

    def _clear_stale_pidfiles(self) -> None:
        """Pidfiles naming a process that is gone, a zombie or another program.

        dockerd refuses to start over its own pidfile while that pid is alive, and waits
        in vain for the containerd of containerd.pid while it is: after a SIGKILL the
        old containerd can linger as a zombie until it is reaped, and pids are reused.
        Our dockerd is not running here, so its pidfile is always stale."""
        self.pidfile.unlink(missing_ok=True)
        containerd_pidfile = self.exec_root / "containerd" / "containerd.pid"
        try:
            pid = int(containerd_pidfile.read_text().strip())
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            containerd_pidfile.unlink(missing_ok=True)
            return
        if state == "Z" or str(self.exec_root).encode() not in cmdline:
            containerd_pidfile.unlink(missing_ok=True)

    def ping(self) -> bool:
        """Whether the engine answers GET /_ping on its socket."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(str(self.socket))
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                status = s.recv(64).split(b"\r\n", 1)[0].split()
        except OSError:
            return False
        return status[1:2] == [b"200"]

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait for the process to end (SIGKILL after `timeout_s`); its status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL dockerd (its containers' shims keep running; live-restore finds them)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, *, live_restore: bool | None = None) -> RealDockerd:
        """Stop and start again on the same data root; `live_restore` sets or clears
        --live-restore (None keeps the flags as they are)."""
        self.stop()
        if live_restore is not None:
            self.flags = [f for f in self.flags if f != "--live-restore"]
            if live_restore:
                self.flags.append("--live-restore")
        return self.start()

    def close(self) -> None:
        """Remove every container, stop the engine, delete its folder.

        An engine that was killed or stopped with --live-restore may have left
        containers running: it is started again first, so that it removes them."""
        if self.proc is not None and self.pid is None:
            with contextlib.suppress(DockerError):
                self.start()
        if self.pid is not None:
            with contextlib.suppress(DockerError, subprocess.TimeoutExpired):
                ids = self.docker("ps", "-aq").stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, timeout_s=60)
        self.stop()
        _unmount_under(self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- the client ----------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_HOST"] = self.host
        env["DOCKER_CONFIG"] = str(self.folder / "client")  # no user config, no creds
        return env

    def docker(
        self,
        *args: str,
        input: bytes | None = None,
        stdin: Any = None,
        timeout_s: float = 120,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run /usr/bin/docker against this engine; DockerError when it fails."""
        done = subprocess.run(
            [DOCKER, *args],
            input=input,
            stdin=stdin,
            capture_output=True,
            timeout=timeout_s,
            env={**self.env(), **(env or {})},
        )
        result = subprocess.CompletedProcess(
            done.args,
            done.returncode,
            done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )
        if check and done.returncode != 0:
            raise DockerError(f"docker {' '.join(args)}: exit {done.returncode}\n{result.stderr}")
        return result

    def run(
        self,
        image: str,
        *cmd: str,
        name: str | None = None,
        detach: bool = True,
        rm: bool = False,
        tty: bool = False,
        init: bool = False,
        labels: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        log_opts: Mapping[str, str] | None = None,
        volumes: Sequence[str] = (),
        extra: Sequence[str] = (),
        timeout_s: float = 120,
    ) -> Container:
        """`docker run --network none` IMAGE CMD.

        Detached (the default): returns once the container started. `detach=False` runs
        it in the foreground to its end (right for `--rm` one-offs, which `docker wait`
        could miss) and returns its exit code and combined output."""
        args = ["run", "--network", "none"]
        name = name or f"fwd-{os.urandom(4).hex()}"
        args += ["--name", name]
        if detach:
            args.append("--detach")
        if rm:
            args.append("--rm")
        if tty:
            args.append("--tty")
        if init:
            args.append("--init")
        for key, value in (labels or {}).items():
            args += ["--label", f"{key}={value}"]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        for key, value in (log_opts or {}).items():
            args += ["--log-opt", f"{key}={value}"]
        for volume in volumes:
            args += ["--volume", volume]
        args += [*extra, image, *cmd]
        if detach:
            done = self.docker(*args, timeout_s=timeout_s)
            return Container(self, done.stdout.strip(), name)
        cidfile = self.folder / f"cid-{name}"
        done = self.docker(
            "run", f"--cidfile={cidfile}", *args[1:], timeout_s=timeout_s, check=False
        )
        cid = cidfile.read_text().strip() if cidfile.exists() else ""
        cidfile.unlink(missing_ok=True)
        if not cid:
            raise DockerError(f"docker {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
        return Container(self, cid, name, done.returncode, done.stdout + done.stderr)

    def wait(self, container: str, timeout_s: float = 60) -> int:
        """`docker wait`: blocks until the container exits; its exit code."""
        return int(self.docker("wait", container, timeout_s=timeout_s).stdout.split()[0])

    def inspect(self, container: str) -> dict[str, Any]:
        return json.loads(self.docker("inspect", "--type", "container", container).stdout)[0]

    def logs(self, container: str) -> tuple[str, str]:
        """`docker logs`: (stdout, stderr) as the engine returns them."""
        done = self.docker("logs", container)
        return done.stdout, done.stderr

    def log_path(self, container: str) -> Path:
        return Path(self.inspect(container)["LogPath"])

    def logged_messages(self, container: str) -> list[tuple[str, str]]:
        """(stream, text) of every message dockerd still holds in the container's
        json-file logs, oldest rotation first, 16 KB pieces joined, newline dropped."""
        path = self.log_path(container)
        rotated = sorted(
            (p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()),
            key=lambda p: -int(p.suffix[1:]),
        )
        out: list[tuple[str, str]] = []
        pending: dict[str, str] = {}
        for file in [*rotated, path]:
            for raw in file.read_bytes().splitlines():
                entry = json.loads(raw)
                stream, text = entry["stream"], pending.pop(entry["stream"], "") + entry["log"]
                if text.endswith("\n"):
                    out.append((stream, text[:-1]))
                else:
                    pending[stream] = text
        out.extend(pending.items())
        return out

    # -- images --------------------------------------------------------------------------

    def import_image(self, name: str, tar: bytes | Path, changes: Sequence[str] = ()) -> str:
        """`docker import` a rootfs tarball (bytes or a file) as image `name`."""
        args = ["import"]
        for change in changes:
            args += ["--change", change]
        args += ["-", name]
        if isinstance(tar, Path):
            with tar.open("rb") as f:
                self.docker(*args, stdin=f, timeout_s=300)
        else:
            self.docker(*args, input=tar, timeout_s=300)
        return name

    def build(
        self,
        tag: str,
        context: Path,
        *,
        dockerfile: str | None = None,
        build_args: Mapping[str, str] | None = None,
        timeout_s: float = 600,
    ) -> str:
        """`docker build` with BuildKit and no network (nothing can be pulled); the
        text `dockerfile` (on stdin) instead of the context's Dockerfile when given."""
        args = ["build", "--network", "none", "--tag", tag]
        for key, value in (build_args or {}).items():
            args += ["--build-arg", f"{key}={value}"]
        if dockerfile is not None:
            args += ["--file", "-"]
        self.docker(
            *args,
            str(context),
            input=None if dockerfile is None else dockerfile.encode(),
            env={"DOCKER_BUILDKIT": "1"},
            timeout_s=timeout_s,
        )
        return tag

    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False).returncode == 0

    def busybox_image(self) -> str:
        """busybox-static as an image on this engine (imported on first use)."""
        name = "fwd-busybox:1"
        if not self.has_image(name):
            self.import_image(name, busybox_tar())
        return name

    def python_image(self) -> str:
        """The cached Debian rootfs with python3 as an image on this engine."""
        name = f"fwd-python:{ROOTFS_VERSION}"
        if not self.has_image(name):
            self.import_image(name, python_rootfs(), changes=['CMD ["python3"]'])
        return name


def _unmount_under(folder: Path) -> None:
    """Lazily unmount whatever a killed dockerd left mounted under `folder`."""
    prefix = str(folder.resolve()) + "/"
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = [line.split()[4] for line in mounts if line.split()[4].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
