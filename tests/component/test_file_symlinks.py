"""Symlinks in watched globs (issue 12, finding 6), on real files and real symlinks.

The attack: a process that may write into a watched folder links a file it cannot read
(0600, another owner's) into it, and the forwarder, running as root, reads it and
serves it. By default a symlink below a glob's fixed folder is not followed; with
follow_symlinks = true it is, and `**` recognises a loop instead of walking it forever.
The walk runs off the event loop, and a daemon stops promptly on SIGTERM during one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forwarder.config import FileSourceConfig
from forwarder.sources import file as file_module
from forwarder.sources.file import GlobWalk, split_pattern
from tests.integration.daemon import Daemon, count_rows, write_config
from tests.support import wait_until


def make_config(paths: list[str], **overrides: Any) -> FileSourceConfig:
    fields: dict[str, Any] = {
        "type": "file",
        "name": "files",
        "service": "app",
        "paths": paths,
        "poll_interval_s": 0.01,
        "glob_interval_s": 0.05,
        "multiline": {"mode": "off"},
    }
    fields.update(overrides)
    return FileSourceConfig(**fields)


def secret_linked_in(tmp_path: Path) -> tuple[Path, Path]:
    """A 0600 file outside the watched folder, linked into it; (watched folder, link)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    secret = private / "shadow"
    secret.write_bytes(b"root:secret-hash\n")
    secret.chmod(0o600)
    watched = tmp_path / "logs"
    watched.mkdir()
    (watched / "app.log").write_bytes(b"ordinary line\n")
    link = watched / "evil.log"
    link.symlink_to(secret)
    return watched, link


def test_split_pattern_keeps_the_operators_fixed_folder() -> None:
    assert split_pattern("/var/log/app/*.log") == ("/var/log/app", ["*.log"])
    assert split_pattern("/var/log/ui.log") == ("/var/log", ["ui.log"])
    assert split_pattern("/data/**/x/*.log") == ("/data", ["**", "x", "*.log"])
    assert split_pattern("*.log") == ("", ["*.log"])


async def test_linked_0600_file_is_not_read_by_default(
    tmp_path: Path, tail: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    watched, link = secret_linked_in(tmp_path)
    caplog.set_level(logging.WARNING, logger=file_module.__name__)
    t = await tail(make_config([str(watched / "*.log")]))
    await t.wait_lines(1)
    await t.wait_scans(3)
    assert t.lines == [b"ordinary line"]
    assert t.source.status()["symlinks_skipped"] == 1
    skipped = [r.getMessage() for r in caplog.records if "symlink" in r.getMessage()]
    assert skipped == [f"skipping {link}: a symlink; set follow_symlinks = true to read it"]


async def test_linked_file_is_read_with_follow_symlinks(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    watched, _ = secret_linked_in(tmp_path)
    t = await tail(make_config([str(watched / "*.log")], follow_symlinks=True))
    assert sorted(await t.wait_lines(2)) == [b"ordinary line", b"root:secret-hash"]
    assert t.source.status()["symlinks_skipped"] == 0


async def test_linked_folder_below_the_fixed_folder_is_not_entered(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    """`*` and `**` do not descend into a linked folder; the fixed folder itself may be
    a link (the operator wrote it)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.log").write_bytes(b"outside\n")
    real = tmp_path / "real"
    (real / "svc").mkdir(parents=True)
    (real / "svc" / "a.log").write_bytes(b"inside\n")
    (real / "linked").symlink_to(outside)
    fixed = tmp_path / "fixed"  # a link as the fixed folder: allowed
    fixed.symlink_to(real)
    t = await tail(make_config([str(fixed / "*" / "*.log"), str(fixed / "**" / "*.log")]))
    await t.wait_lines(1)
    await t.wait_scans(3)
    assert t.lines == [b"inside"]
    assert t.source.status()["symlinks_skipped"] == 1  # fixed/linked, once


async def test_file_swapped_for_a_symlink_after_the_walk_is_not_opened(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    """TOCTOU: the walk saw a regular file; a symlink (O_NOFOLLOW) or a file reached
    through a swapped folder (fstat differs from the walk's stat) is not read."""
    watched, _ = secret_linked_in(tmp_path)
    t = await tail(make_config([str(watched / "app.log")]))
    await t.wait_lines(1)
    source = t.source
    real = watched / "later.log"
    real.write_bytes(b"real\n")
    walked = os.lstat(real)
    real.unlink()
    real.symlink_to(tmp_path / "private" / "shadow")
    assert source._open(str(real), False, expect=walked) is None
    other = watched / "other.log"
    other.write_bytes(b"another file\n")
    assert source._open(str(other), False, expect=walked) is None  # not the walked file
    assert [f["path"] for f in source.status()["files"]] == [str(watched / "app.log")]


def loop_tree(root: Path) -> Path:
    """root/logs with a.log, b/c.log and two links back up (root/logs/b/up -> .., and
    root/logs/b/top -> root/logs): `**` following links would never end."""
    logs = root / "logs"
    (logs / "b").mkdir(parents=True)
    (logs / "a.log").write_bytes(b"a\n")
    (logs / "b" / "c.log").write_bytes(b"c\n")
    (logs / "b" / "up").symlink_to("..")
    (logs / "b" / "top").symlink_to(logs)
    return logs


async def test_double_star_over_a_symlink_loop_finishes_and_keeps_reading(
    tmp_path: Path, tail: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    logs = loop_tree(tmp_path)
    caplog.set_level(logging.WARNING, logger=file_module.__name__)
    t = await tail(make_config([str(logs / "**" / "*.log")], follow_symlinks=True))
    assert sorted(await t.wait_lines(2)) == [b"a", b"c"]
    await t.wait_scans(3)
    with (logs / "a.log").open("ab") as f:
        f.write(b"a2\n")
    await t.wait_lines(3)
    assert t.source.status()["symlink_loops"] == 2
    loops = [r.getMessage() for r in caplog.records if "a loop" in r.getMessage()]
    assert sorted(loops) == sorted(
        [
            f"not following {logs / 'b' / 'top'}: it leads back to {logs}, a folder above it "
            "(a loop); the rest of the tree is scanned",
            f"not following {logs / 'b' / 'up'}: it leads back to {logs}, a folder above it "
            "(a loop); the rest of the tree is scanned",
        ]
    )  # each once, over several scans


async def test_double_star_does_not_follow_links_by_default(
    tmp_path: Path, tail: Callable[..., Any]
) -> None:
    logs = loop_tree(tmp_path)
    t = await tail(make_config([str(logs / "**" / "*.log")]))
    assert sorted(await t.wait_lines(2)) == [b"a", b"c"]
    await t.wait_scans(2)
    status = t.source.status()
    assert (status["symlinks_skipped"], status["symlink_loops"]) == (2, 0)


def test_walk_is_capped_and_stops_when_aborted(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"f{i:02}.log").write_bytes(b"x\n")
    pattern = [str(tmp_path / "*.log")]

    def walk(max_entries: int, abort: bool = False) -> Any:
        event = threading.Event()
        if abort:
            event.set()
        return GlobWalk(
            pattern,
            [],
            follow_symlinks=False,
            rotations=False,
            abort=event,
            max_entries=max_entries,
        ).run()

    capped = walk(10)
    assert (capped.capped, capped.entries) == (True, 11)  # stopped at the 11th entry
    assert len(capped.found) <= 10
    whole = walk(1000)
    assert (whole.capped, len(whole.found)) == (False, 50)
    aborted = walk(1000, abort=True)
    assert (aborted.aborted, aborted.found) == (True, [])


async def test_capped_scan_keeps_tracking_files_it_did_not_reach(
    tmp_path: Path, tail: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_module, "MAX_SCAN_ENTRIES", 5)
    for name in ("a.log", "b.log", "c.log"):
        (tmp_path / name).write_bytes(name.encode() + b"\n")
    t = await tail(make_config([str(tmp_path / "*.log")]))
    await t.wait_lines(3)
    for i in range(10):
        (tmp_path / f"z{i}.log").write_bytes(b"beyond\n")
    await t.wait_scans(3)
    status = t.source.status()
    assert status["scans_capped"] >= 1
    assert [f["rotated"] for f in status["files"]][:3] == [False, False, False]
    with (tmp_path / "c.log").open("ab") as f:
        f.write(b"c2\n")
    assert b"c2" in await t.wait_lines(4)


async def test_daemon_stops_on_sigterm_while_walking_a_looping_tree(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    """A deep tree with loops under `**`, links followed: scans run back to back in the
    worker thread, the daemon stores the real file's lines and exits 0 on SIGTERM."""
    logs = loop_tree(tmp_path)
    for d in range(200):
        folder = logs / "deep" / f"d{d:03}" / "x" / "y"
        folder.mkdir(parents=True)
        for i in range(50):
            (folder / f"n{i:02}.txt").touch()
        (folder / "back").symlink_to(logs / "deep")
    config = write_config(
        tmp_path / "f.toml",
        dsn=pg_dsn,
        schema=pg_schema,
        files={"app": [str(logs / "**" / "*.log")]},
        extra="follow_symlinks = true\n",
    )
    daemon = await Daemon(config).start()
    try:
        await wait_until(
            lambda: count_rows(pg_dsn, pg_schema), timeout_s=60, what="rows of a.log, c.log"
        )
        await wait_until(lambda: "a loop" in daemon.stderr(), what="the loop logged")
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        code = await daemon.wait(15)
        stopped_in = time.monotonic() - started
    finally:
        if daemon.proc is not None and daemon.proc.returncode is None:
            daemon.proc.kill()
            await daemon.proc.wait()
    assert code == 0, daemon.stderr()
    assert stopped_in < 10, daemon.stderr()
    assert await count_rows(pg_dsn, pg_schema) == 2
    loops = [line for line in daemon.stderr().splitlines() if "a loop" in line]
    assert len({line.split("not following ")[1].split(":")[0] for line in loops}) == len(loops)
