"""The repository's Dockerfile, built on the session's real dockerd, runs as the sidecar.

No registry and no network at build time here, so the image is built FROM a local base
(`--build-arg PYTHON_IMAGE`): the cached Debian rootfs with python3 and pip
(tests/dockerd.py) plus a wheelhouse of the project's runtime dependencies, downloaded
on the host once per dependency list and cached, which pip in the build finds through
PIP_NO_INDEX / PIP_FIND_LINKS set in that base. The Dockerfile itself is used as it is,
except its `# syntax=docker/dockerfile:1` line: that makes BuildKit fetch the frontend
image from Docker Hub, so the build uses the engine's built-in Dockerfile frontend.

The sidecar runs as deploy/docker-compose.yml runs it (uid 0, every capability
dropped, read-only root), with `--network none`: the containers folder is mounted
read-only and PostgreSQL is reached through its unix socket folder, mounted in.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import orjson
import pytest

from tests.dockerd import ROOTFS_VERSION, TEST_LABEL, DockerError, RealDockerd, cache_lock
from tests.integration.daemon import connected
from tests.support import wait_until

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
# Wheels for the base image's interpreter: CPython 3.11 on glibc 2.36 (bookworm), x86_64.
WHEEL_TARGET = [
    "--python-version=3.11",
    "--implementation=cp",
    "--abi=cp311",
    *(f"--platform=manylinux_2_{minor}_x86_64" for minor in (36, 35, 34, 28, 27, 17, 12, 5)),
]
SOCKET_IN_CONTAINER = "/run/postgresql"


def requirements() -> list[str]:
    """What the Dockerfile's pip needs: the runtime dependencies and the build backend."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return sorted({*project["project"]["dependencies"], *project["build-system"]["requires"]})


def wheelhouse() -> Path:
    """The cached folder of wheels for `requirements()` (pip download on the host once
    per dependency list, under a lock, renamed into place when complete)."""
    wanted = requirements()
    key = hashlib.sha256(orjson.dumps([wanted, WHEEL_TARGET])).hexdigest()[:16]
    with cache_lock("wheelhouse") as folder:
        target = folder / f"wheelhouse-{key}"
        if target.is_dir():
            return target
        for stale in [*folder.glob("wheelhouse-*"), *folder.glob("partial-*")]:  # older, cut short
            shutil.rmtree(stale, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix="partial-", dir=folder))
        done = subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"),
                *WHEEL_TARGET,
                *("--dest", str(partial), *wanted),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise DockerError(f"pip download for the image failed:\n{done.stderr[-3000:]}")
        partial.rename(target)
        return target


def offline_dockerfile() -> str:
    """The repository's Dockerfile without its `# syntax=` line (see the module doc)."""
    text = (REPO / "Dockerfile").read_text()
    first, _, rest = text.partition("\n")
    assert first.startswith("# syntax="), "the Dockerfile's first line changed: see here"
    return rest


@pytest.fixture(scope="module")
def forwarder_image(real_dockerd: RealDockerd) -> str:
    """`docker build` of the repository's Dockerfile on the session engine, this code."""
    wheels = wheelhouse()
    base = real_dockerd.build(
        f"fwd-python-wheels:{ROOTFS_VERSION}-{wheels.name}",
        wheels,
        dockerfile=(
            f"FROM {real_dockerd.python_image()}\n"
            "COPY . /wheelhouse\n"
            "ENV PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse\n"
        ),
    )
    return real_dockerd.build(
        "forwarder:test", REPO, dockerfile=offline_dockerfile(), build_args={"PYTHON_IMAGE": base}
    )


def socket_folder(dsn: str) -> tuple[Path, str]:
    """The host folder of the server's unix socket, and the DSN to use through it."""
    url = urlsplit(dsn)
    query = parse_qs(url.query)
    port = (query.get("port") or [str(url.port or 5432)])[0]
    folders = [Path(h) for h in query.get("host", []) if h.startswith("/")]
    if url.hostname in (None, "", "localhost", "127.0.0.1", "::1"):
        folders += [Path("/var/run/postgresql"), Path("/tmp")]
    for folder in folders:
        if (folder / f".s.PGSQL.{port}").exists():
            user = url.username or "postgres"
            auth = f"{user}:{url.password}" if url.password else user
            database = url.path.lstrip("/") or "postgres"
            return folder, (
                f"postgresql://{auth}@/{database}?host={SOCKET_IN_CONTAINER}&port={port}"
            )
    pytest.skip(f"PostgreSQL at {dsn} has no unix socket on this host to mount")


def sidecar_config(schema: str, token: str) -> str:
    return f"""
[database]
dsn = ""
schema_name = "{schema}"
data_dir = "/var/lib/forwarder"
retry_initial_backoff_s = 0.05
retry_max_backoff_s = 0.5

[batch]
max_delay_s = 0.05

[daemon]
log_level = "DEBUG"

[sampling]
threshold_per_min = 1000000000

[[sources]]
type = "docker"
name = "containers"
mode = "files"
containers_dir = "/var/lib/docker/containers"
include_labels = ["{TEST_LABEL}={token}"]
read_from = "head"
poll_interval_s = 0.02
glob_interval_s = 0.05
"""


@pytest.mark.timeout(600)  # cold: the Debian rootfs (~75 s) and the wheels are made once
async def test_the_image_reads_other_containers_skips_itself_and_stops_cleanly(
    real_dockerd: RealDockerd, forwarder_image: str, tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    token = secrets.token_hex(4)
    pg_socket, dsn_inside = socket_folder(pg_dsn)
    config = tmp_path / "forwarder.toml"
    config.write_text(sidecar_config(pg_schema, token))
    sidecar = real_dockerd.run(
        forwarder_image,
        name=f"forwarder-{token}",
        labels={TEST_LABEL: token},  # it passes the label filter: only "own container" skips it
        env={"FORWARDER_DATABASE__DSN": dsn_inside},
        volumes=[
            f"{real_dockerd.containers_dir}:/var/lib/docker/containers:ro",
            f"{pg_socket}:{SOCKET_IN_CONTAINER}",
            f"{config}:/etc/forwarder/forwarder.toml:ro",
        ],
        # As deploy/docker-compose.yml runs it.
        extra=[
            "--user=0:0",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges:true",
            "--read-only",
            "--tmpfs=/tmp",
        ],
    )
    printer = real_dockerd.run(
        real_dockerd.busybox_image(),
        "sh",
        "-c",
        'for i in $(seq 1 50); do echo "order $i shipped"; done',
        name=f"shop-worker-{token}",
        labels={TEST_LABEL: token},
    )
    assert printer.wait() == 0
    expected = [text for _, text in printer.messages()]
    assert len(expected) == 50

    async with connected(pg_dsn, pg_schema) as conn:

        async def stored() -> list:
            try:
                return await conn.fetch(
                    "SELECT message, meta->>'container_id' AS cid FROM system_logs ORDER BY ts, id"
                )
            except asyncpg.UndefinedTableError:  # the sidecar has not created it yet
                return []

        async def printer_done() -> bool:
            return sum(r["cid"] == printer.id for r in await stored()) >= len(expected)

        try:
            await wait_until(printer_done, timeout_s=60, what="the printer's lines in the table")
        except AssertionError:
            raise AssertionError(sidecar.engine.logs(sidecar.id)[1][-5000:]) from None
        rows = await stored()

    assert [r["message"] for r in rows if r["cid"] == printer.id] == expected
    own_log = sidecar.logs()[1]
    assert own_log, "the sidecar wrote no logs of its own"
    assert {r["cid"] for r in rows} == {printer.id}  # nothing of its own
    assert f"({sidecar.id[:12]}): it is the forwarder's own container" in own_log

    sidecar.stop(timeout_s=30)
    state = sidecar.inspect()["State"]
    assert (state["Running"], state["ExitCode"]) == (False, 0), sidecar.logs()[1][-3000:]
