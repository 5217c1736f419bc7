"""ui-logger.js in a real headless Chromium, against a recording /logs/ingest.

Each test serves a page from tests/browser/pages (loading the packaged ui-logger.js)
from an aiohttp server started here, opens it in Chromium, and checks what reached the
endpoint and what the page itself saw (tests/browser/pages/spies.js records it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from forwarder.producers import ui_logger_js
from tests.support import serving as serve_app
from tests.support import wait_until

CHROMIUM = Path("/usr/bin/chromium")
PAGES = Path(__file__).parent / "pages"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers give /dev/shm 64 MiB
)


@dataclass
class Ingest:
    status: int
    headers: dict[str, str]
    reports: list[dict[str, Any]]


@dataclass
class Recorder:
    """What the test server saw; the first `fail_first` ingest requests get a 500."""

    fail_first: int = 0
    ingests: list[Ingest] = field(default_factory=list)
    page_reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)

    def accepted(self) -> list[dict[str, Any]]:
        return [r for i in self.ingests if 200 <= i.status < 300 for r in i.reports]


def make_app(recorder: Recorder) -> web.Application:
    @web.middleware
    async def log_paths(request: web.Request, handler: Any) -> web.StreamResponse:
        recorder.paths.append(request.path)
        return await handler(request)

    async def page(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        path = PAGES / name
        if not path.is_file() or path.parent != PAGES:
            raise web.HTTPNotFound()
        kind = "text/html" if name.endswith(".html") else "text/javascript"
        return web.Response(body=path.read_bytes(), content_type=kind, charset="utf-8")

    async def logger_js(request: web.Request) -> web.Response:
        return web.Response(body=ui_logger_js(), content_type="text/javascript", charset="utf-8")

    async def ingest(request: web.Request) -> web.Response:
        # fetch sends application/json; sendBeacon sends its Blob's type, the same.
        if request.content_type != "application/json":
            return web.json_response({"error": f"bad type {request.content_type}"}, status=415)
        body = orjson.loads(await request.read())
        status = 500 if len(recorder.ingests) < recorder.fail_first else 202
        recorder.ingests.append(Ingest(status, dict(request.headers), body))
        if status == 500:
            return web.json_response({"error": "failing on purpose"}, status=500)
        return web.json_response({"accepted": len(body)}, status=202)

    async def report(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())  # fetch or a text/plain beacon
        recorder.page_reports[body["phase"]] = body
        return web.Response(status=204)

    async def bye(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>bye</title>bye", content_type="text/html")

    async def no_content(request: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application(middlewares=[log_paths])
    app.router.add_get("/ui-logger.js", logger_js)
    app.router.add_post("/logs/ingest", ingest)
    app.router.add_post("/report", report)
    app.router.add_get("/bye", bye)
    app.router.add_get("/favicon.ico", no_content)
    app.router.add_get("/{name}", page)
    return app


@contextlib.asynccontextmanager
async def serving(recorder: Recorder) -> AsyncIterator[str]:
    async with serve_app(make_app(recorder)) as base:
        yield base


@contextlib.asynccontextmanager
async def chromium(url: str, profile: Path, log: Path) -> AsyncIterator[None]:
    """Headless Chromium on `url` for the block; killed (its whole process group) after."""
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            str(CHROMIUM),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            url,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


@pytest.fixture
def browser_ready() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run .ci/install-browser (as root) to install it")


async def run_page(page: str, recorder: Recorder, tmp_path: Path, done: Any, what: str) -> str:
    """Open `page` and wait for `done(recorder)`; returns the page's URL."""
    async with serving(recorder) as base:
        url = f"{base}/{page}"
        log = tmp_path / "chromium.log"
        async with chromium(url, tmp_path / "profile", log):
            try:
                await wait_until(lambda: done(recorder), timeout_s=30, what=what)
            except AssertionError as exc:
                tail = log.read_text(errors="replace")[-3000:]
                raise AssertionError(f"{exc}\nserver saw: {recorder}\nchromium: {tail}") from exc
        return url


def assert_iso(ts: str) -> None:
    assert ts.endswith("Z")
    datetime.fromisoformat(ts.replace("Z", "+00:00"))


# -- errors, a failing endpoint, leaving the page ---------------------------------------------


async def test_errors_are_batched_retried_once_and_beaconed_on_pagehide(
    browser_ready: None, tmp_path: Path
) -> None:
    recorder = Recorder(fail_first=1)

    def done(r: Recorder) -> bool:
        return "pagehide" in r.page_reports and "/bye" in r.paths and len(r.accepted()) >= 4

    url = await run_page("errors.html", recorder, tmp_path, done, "the page to leave")

    # Three requests: the batch (answered 500), its retry, and the beacon on pagehide.
    assert [i.status for i in recorder.ingests] == [500, 202, 202]
    failed, retried, beacon = recorder.ingests
    assert failed.reports == retried.reports  # the same batch again, nothing added
    for request in recorder.ingests:
        assert request.headers["Content-Type"] == "application/json"
        assert "Authorization" not in request.headers

    accepted = recorder.accepted()
    assert [(r["event"], r["message"]) for r in accepted] == [
        ("ui.error", "Error: boom from timeout"),
        ("ui.unhandledrejection", "TypeError: rejected on purpose"),
        ("ui.console_error", 'console says hello {"id":7}'),
        ("ui.console_error", "leaving the page"),
    ]
    assert [r["message"] for r in beacon.reports] == ["leaving the page"]
    for r in accepted:
        assert r["level"] == "ERROR"
        assert_iso(r["ts"])
        meta = r["meta"]
        assert meta["url"] == url  # the logger's own fields win over the app's meta()
        assert meta["user_id"] == "user-42"
        assert meta["release"] == "test-1"
        assert "HeadlessChrome" in meta["user_agent"]
        assert "dropped_count" not in meta
        assert "repeat_count" not in meta

    error, rejection, console_error, leaving = (r["meta"] for r in accepted)
    assert error["source"] == url
    assert isinstance(error["line"], int) and isinstance(error["col"], int)
    assert error["error_name"] == "Error"
    assert "throwInTimeout" in error["stack"]
    assert rejection["error_name"] == "TypeError"
    assert "rejectUnhandled" in rejection["stack"]
    assert "logConsoleError" in console_error["stack"]
    assert "ui-logger.js" not in console_error["stack"]  # the caller's frames only
    assert "/errors.html:" in leaving["stack"]

    # The page: no exception from the logger, only its own two, console.error still
    # reached the console (and only the page's calls did), one beacon from the logger.
    before, pagehide = recorder.page_reports["before-leaving"], recorder.page_reports["pagehide"]
    for snapshot in (before, pagehide):
        assert snapshot["loggerErrors"] == []
        assert snapshot["pageErrors"] == [
            "error: Uncaught Error: boom from timeout",
            "rejection: rejected on purpose",
        ]
    assert before["consoleCalls"] == ["console says %s hello [object Object]"]
    assert pagehide["consoleCalls"] == ["console says %s hello [object Object]", "leaving the page"]
    assert pagehide["beacons"] == [{"url": "/logs/ingest", "type": "application/json"}]
    assert pagehide["stats"] == {
        "queued": 0,
        "in_flight": 0,
        "captured": 4,
        "sent": 4,
        "dropped": 0,
        "failed_sends": 1,
    }


# -- bounded queue, token, hostile input --------------------------------------------------------


async def test_bounded_queue_counts_drops_and_nothing_escapes_into_the_page(
    browser_ready: None, tmp_path: Path
) -> None:
    recorder = Recorder()

    def done(r: Recorder) -> bool:
        return "pagehide" in r.page_reports and "/bye" in r.paths and len(r.accepted()) >= 5

    url = await run_page("limits.html", recorder, tmp_path, done, "the page to leave")

    assert [i.status for i in recorder.ingests] == [202, 202]
    for request in recorder.ingests:
        assert request.headers["Authorization"] == "Bearer secret-token"
        assert request.headers["Content-Type"] == "application/json"
    flushed, on_exit = recorder.ingests

    assert [(r["level"], r["event"], r["message"]) for r in flushed.reports] == [
        ("ERROR", "ui.console_error", "hostile [object Object] [unprintable value]"),
        ("ERROR", "ui.error", "RangeError: handled one"),
        ("INFO", "ui.log", "Symbol(odd)"),
        ("ERROR", "ui.console_error", "repeated"),
    ]
    hostile, handled, logged, repeated = (r["meta"] for r in flushed.reports)
    assert hostile["dropped_count"] == 2  # "dropped one" and "dropped two"
    assert hostile["meta_error"] == "Error: meta() is broken"
    assert "release" not in hostile
    assert handled["handled"] is True
    assert handled["order_id"] == 5
    assert handled["bad"] == "[unprintable value]"
    assert handled["error_name"] == "RangeError"
    assert handled["release"] == "test-2"
    assert repeated["repeat_count"] == 2
    for meta in (hostile, handled, logged, repeated):
        assert meta["url"] == url
        assert meta["user_id"] == 1234  # the bad setUser call changed nothing
    # With a token the exit flush is a keepalive fetch (a beacon cannot send the header).
    assert [r["message"] for r in on_exit.reports] == ["on the way out"]
    assert "dropped_count" not in on_exit.reports[0]["meta"]

    pagehide = recorder.page_reports["pagehide"]
    assert pagehide["loggerErrors"] == []
    assert pagehide["pageErrors"] == []
    assert pagehide["beacons"] == []
    # console.error from inside the app's meta() reached the console but was not reported.
    assert [c for c in pagehide["consoleCalls"] if c != "meta() complains"] == [
        "dropped one",
        "dropped two",
        "hostile [object Object] [unprintable]",
        "repeated",
        "repeated",
        "on the way out",
    ]
    assert pagehide["stats"]["dropped"] == 2
    assert pagehide["stats"]["sent"] == 5
    assert pagehide["stats"]["queued"] == 0
