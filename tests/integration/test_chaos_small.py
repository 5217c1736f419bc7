"""The chaos suite (tests/chaos/run.py) at a small size: about 45 s on 2 cores.

Its own embedded PostgreSQL (restarted with pg_ctl during the run), a real forwarder
killed with SIGKILL and restarted, real logrotate in create and copytruncate modes,
SIGHUP reloads that restart, remove and add back file sources (one of them while the
database is down), and 4 clients POSTing to its HTTP intake throughout; at the end
every written line and every acknowledged (202) HTTP line must be stored exactly once,
and an HTTP line whose answer was lost at most once. The seed is fixed so a failure
replays the same schedule; FORWARDER_CHAOS_SEED tries another one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.chaos.run import LOGROTATE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        not os.access(LOGROTATE, os.X_OK),
        reason=f"{LOGROTATE} is missing: the chaos suite needs Debian's logrotate "
        "(run .ci/install-chaos-tools)",
    ),
]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Outside pytest's basetemp: the embedded server runs as another user and must
    traverse the path, and pytest keeps (and re-asserts) its own root at mode 0700."""
    folder = Path(tempfile.mkdtemp(prefix="forwarder-chaos-"))
    os.chmod(folder, 0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_small_chaos_run_stores_every_line_exactly_once(tmp_path: Path, workdir: Path) -> None:
    seed = os.environ.get("FORWARDER_CHAOS_SEED", "20261126")
    figures = tmp_path / "figures.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.chaos.run",
            "--seconds",
            "35",
            "--writers",
            "2",
            "--files",
            "2",
            "--rate",
            "250",
            "--interval",
            "1.5",
            "--http-clients",
            "4",
            "--reload-interval",
            "6",
            "--seed",
            seed,
            "--workdir",
            str(workdir / "work"),
            "--json",
            str(figures),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report + _post_mortem(workdir / "work")
    fig = orjson.loads(figures.read_bytes())
    assert fig["lines_written"] > 5000, report
    assert fig["rows_stored"] == fig["lines_written"], report
    assert (fig["lost"], fig["duplicated"], fig["garbled_rows"]) == (0, 0, 0), report
    # Every kind of fault happened at least once (the schedule starts with one of each).
    assert fig["kills_survived"] >= 1 and fig["graceful_restarts"] >= 1, report
    assert fig["db_restarts_fast"] >= 1 and fig["db_restarts_immediate"] >= 1, report
    assert fig["rotations_create"] + fig["rotations_copytruncate"] >= 2, report
    assert fig["unexpected_exits"] == [], report
    # SIGHUP reloads: the first removes a source, the second adds it back; each SIGHUP
    # is answered by reload.done unless a SIGKILL or SIGTERM came first.
    assert fig["reloads"] >= 2 and fig["reloads_done"] >= 1, report
    assert fig["reload_sources_removed"] >= 1, report
    assert fig["reload_sources_readded"] == fig["reload_sources_removed"], report
    assert (fig["reloads_unanswered"], fig["reload_errors"]) == (0, []), report
    # The HTTP intake under load: acknowledged lines exactly once, in-doubt at most once.
    assert fig["http_acknowledged_lines"] > 2000, report
    assert (fig["http_lost"], fig["http_duplicated"], fig["http_other_rows"]) == (0, 0, 0), report
    assert fig["http_unexpected_answers"] == {}, report
    stored = fig["http_acknowledged_lines"] + fig["http_in_doubt_stored"]
    assert fig["http_rows"] == stored, report
    assert fig["http_retries_refused"] > 0, report  # it did post while the daemon was down


def _post_mortem(work: Path) -> str:
    out = []
    for name in ("actions.log", "forwarder.stderr"):
        path = work / name
        if path.exists():
            text = path.read_text(errors="replace")
            out.append(f"\n--- {name} (last 4000 chars) ---\n{text[-4000:]}")
    return "".join(out)
