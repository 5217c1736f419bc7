"""A real headless Chromium against a real `forwarder run` with [http] enabled.

1. A panel on another origin loads the daemon's /ui-logger.js and reports its errors
   to the daemon's /logs/ingest (CORS preflight, a fetch batch, a beacon on pagehide):
   the rows land in system_logs, pseudonymized.
2. The daemon's own status page (GET /) rendered by Chromium (--dump-dom, then
   --screenshot) over rows put in the database: the badge, a card per service, and no
   request leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import signal
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from tests.browser.test_ui_logger import CHROMIUM, CHROMIUM_FLAGS, chromium
from tests.integration.daemon import Daemon, write_config
from tests.integration.test_http_daemon import free_port
from tests.support import serving, wait_until

PRIVACY_KEY = "a-privacy-key-for-the-browser-test-0123"


@pytest.fixture
def browser_ready() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run .ci/install-browser (as root) to install it")


# --- the daemon ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_daemon(
    tmp_path: Path, dsn: str, schema: str, cors_origins: list[str]
) -> AsyncIterator[str]:
    """`forwarder run` with [http] on a free port and privacy on for "ui"; yields its URL."""
    port = free_port()
    http = f"""
[http]
enabled = true
listen = "127.0.0.1:{port}"
cors_origins = {orjson.dumps(cors_origins).decode()}
"""
    config = write_config(tmp_path / "f.toml", dsn=dsn, schema=schema, files={},
                          extra=http, privacy_services=("ui",))  # fmt: skip
    daemon = Daemon(config)
    daemon.env_extra = {"PRIVACY_HMAC_KEY": PRIVACY_KEY}  # no FORWARDER_HTTP_TOKENS: open
    await daemon.start()
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as client:

            async def up() -> bool:
                assert daemon.proc is not None
                if daemon.proc.returncode is not None:
                    raise AssertionError(f"the daemon exited early:\n{daemon.stderr()[-3000:]}")
                try:
                    async with client.get(f"{base}/health") as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(up, timeout_s=30, what="/health answering 200")
        yield base
    finally:
        code = await daemon.stop()
    assert code == 0, daemon.stderr()[-5000:]


async def fetch_rows(dsn: str, schema: str, service: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        try:
            records = await conn.fetch(
                "SELECT ts, service, level, event, message, meta FROM system_logs "
                "WHERE service = $1 ORDER BY ts, id",
                service,
            )
        except asyncpg.UndefinedTableError:
            return []
    finally:
        await conn.close()
    rows = []
    for r in records:
        row = dict(r)
        if isinstance(row["meta"], str):
            row["meta"] = orjson.loads(row["meta"])
        rows.append(row)
    return rows


def pseudonym(value: str) -> str:
    digest = hmac.new(PRIVACY_KEY.encode(), value.encode(), hashlib.sha256).hexdigest()
    return "u_" + digest[:32]


# --- 1. a panel on another origin reports to the daemon --------------------------------------

PANEL = """<!doctype html>
<html>
<head>
<meta charset="utf-8">
<title>panel</title>
<script>
  // Before the logger: note what every sendBeacon call returned.
  window.__beacons = [];
  var originalBeacon = navigator.sendBeacon.bind(navigator);
  navigator.sendBeacon = function (url, data) {
    var ok = originalBeacon(url, data);
    window.__beacons.push({url: String(url), type: data && data.type, returned: ok});
    return ok;
  };
</script>
<script src="DAEMON/ui-logger.js"></script>
</head>
<body>
<p>a panel on another origin</p>
<script>
  ForwarderLogger.init({
    endpoint: 'DAEMON/logs/ingest',
    batchSize: 2,            // the error and the rejection: one fetch, sent at once
    flushIntervalMs: 60000,  // the last report waits in the queue until pagehide
    retryBaseMs: 100
  });
  ForwarderLogger.setUser('alice');

  // After the logger's pagehide listener: what the logger did, to the panel's own origin.
  window.addEventListener('pagehide', function () {
    var report = {stats: ForwarderLogger.stats(), beacons: window.__beacons};
    navigator.sendBeacon('/report', JSON.stringify(report));
  });

  setTimeout(function throwInTimeout() { throw new Error('boom from the panel'); }, 0);
  setTimeout(function rejectLater() {
    Promise.reject(new TypeError('rejected in the panel'));
  }, 50);

  var timer = setInterval(function () {
    var s = ForwarderLogger.stats();
    if (s.sent >= 2 && s.queued === 0 && s.in_flight === 0) {
      clearInterval(timer);
      console.error('leaving the panel');  // queued: goes with the pagehide beacon
      location.href = '/bye';
    }
  }, 20);
</script>
</body>
</html>
"""


@dataclass
class Panel:
    daemon: str = ""
    paths: list[str] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def serving_panel(panel: Panel) -> AsyncIterator[str]:
    @web.middleware
    async def log_paths(request: web.Request, handler: Any) -> web.StreamResponse:
        panel.paths.append(request.path)
        return await handler(request)

    async def page(request: web.Request) -> web.Response:
        html = PANEL.replace("DAEMON", panel.daemon)
        return web.Response(text=html, content_type="text/html")

    async def bye(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>bye</title>bye", content_type="text/html")

    async def report(request: web.Request) -> web.Response:
        panel.reports.append(orjson.loads(await request.read()))
        return web.Response(status=204)

    async def no_content(request: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application(middlewares=[log_paths])
    app.router.add_get("/panel.html", page)
    app.router.add_get("/bye", bye)
    app.router.add_post("/report", report)
    app.router.add_get("/favicon.ico", no_content)
    async with serving(app) as base:
        yield base


async def preflight_allows_credentials(daemon: str, origin: str) -> bool:
    """Whether the daemon's answer to a beacon's preflight lets the beacon through.

    sendBeacon always sends credentials (fetch's credentials mode "include"), so its
    preflight needs Access-Control-Allow-Credentials: true besides the allowed origin.
    """
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with aiohttp.ClientSession() as client:
        async with client.options(f"{daemon}/logs/ingest", headers=headers) as r:
            assert r.status == 204, await r.text()
            assert r.headers.get("Access-Control-Allow-Origin") == origin
            return r.headers.get("Access-Control-Allow-Credentials") == "true"


async def test_panel_on_another_origin_reports_to_the_daemon_and_rows_land_pseudonymized(
    browser_ready: None, tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    panel = Panel()
    async with serving_panel(panel) as origin:
        async with running_daemon(tmp_path, pg_dsn, pg_schema, [origin]) as daemon:
            panel.daemon = daemon
            assert urlsplit(origin).port != urlsplit(daemon).port  # two origins
            beacon_can_pass = await preflight_allows_credentials(daemon, origin)
            url = f"{origin}/panel.html"
            log = tmp_path / "chromium.log"

            def rows_at_least(n: int) -> Any:
                async def check() -> bool:
                    return len(await fetch_rows(pg_dsn, pg_schema, "ui")) >= n

                return check

            async with chromium(url, tmp_path / "profile", log):
                try:
                    # The page reports to its own origin once it has left (pagehide).
                    await wait_until(
                        lambda: "/bye" in panel.paths and bool(panel.reports),
                        timeout_s=30,
                        what="the panel to report its errors and leave",
                    )
                    await wait_until(rows_at_least(2), timeout_s=30, what="the fetched rows")
                except AssertionError as exc:
                    rows = await fetch_rows(pg_dsn, pg_schema, "ui")
                    tail = log.read_text(errors="replace")[-3000:]
                    raise AssertionError(
                        f"{exc}\\npanel server saw: {panel}\\nrows: {rows}\\nchromium: {tail}"
                    ) from exc
                # The beacon was handed over before the page's own report: its row
                # follows at once, or never (a refused preflight is not retried).
                try:
                    await wait_until(
                        rows_at_least(3),
                        timeout_s=30 if beacon_can_pass else 10,
                        what="the row sent by the pagehide beacon",
                    )
                    beacon_error = None
                except AssertionError as exc:
                    beacon_error = exc
            rows = await fetch_rows(pg_dsn, pg_schema, "ui")

    # What the page saw: the error and the rejection sent by one fetch (after a CORS
    # preflight), the console.error handed to sendBeacon at pagehide, which took it.
    (report,) = panel.reports
    assert report["stats"] == {
        "queued": 0,
        "in_flight": 0,
        "captured": 3,
        "sent": 3,
        "dropped": 0,
        "failed_sends": 0,
    }
    assert report["beacons"] == [
        {"url": f"{daemon}/logs/ingest", "type": "application/json", "returned": True}
    ]

    # What the database holds: ERROR rows of service ui, the page's URL, the user
    # pseudonymized with the configured key ("alice" is nowhere).
    by_event = {r["event"]: r for r in rows}
    assert len(by_event) == len(rows)
    assert by_event["ui.error"]["message"] == "Error: boom from the panel"
    assert by_event["ui.unhandledrejection"]["message"] == "TypeError: rejected in the panel"
    for row in rows:
        assert row["service"] == "ui"
        assert row["level"] == "ERROR"
        meta = row["meta"]
        assert meta["url"] == url
        assert meta["user_id"] == pseudonym("alice")
        assert "alice" not in orjson.dumps(meta).decode()
        assert "HeadlessChrome" in meta["user_agent"]
    assert "throwInTimeout" in by_event["ui.error"]["meta"]["stack"]
    assert by_event["ui.error"]["meta"]["source"] == url
    assert "rejectLater" in by_event["ui.unhandledrejection"]["meta"]["stack"]

    if beacon_error is not None and not beacon_can_pass:
        pytest.xfail(
            "the pagehide beacon's row is lost: sendBeacon sends credentials, and the "
            "daemon's CORS preflight answer has no Access-Control-Allow-Credentials: "
            "true, so Chromium refuses the preflight and never sends the POST, while "
            "sendBeacon has already returned true (the logger counts it sent)"
        )
    assert beacon_error is None, f"{beacon_error}\nrows: {rows}"
    assert sorted(by_event) == ["ui.console_error", "ui.error", "ui.unhandledrejection"]
    assert by_event["ui.console_error"]["message"] == "leaving the panel"


# --- 2. the status page --------------------------------------------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def walk(self) -> list[Node]:
        out = [self]
        for c in self.children:
            if isinstance(c, Node):
                out += c.walk()
        return out

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def by_id(self, id_: str) -> Node:
        (node,) = [n for n in self.walk() if n.attrs.get("id") == id_]
        return node


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


class TreeBuilder(HTMLParser):
    """Chromium's --dump-dom output (serialized, so well nested) as a tree of Nodes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse_dom(html: str) -> Node:
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


async def run_chromium(tmp_path: Path, name: str, *args: str, timeout_s: float = 60) -> bytes:
    """One headless Chromium run to its end (--dump-dom, --screenshot); its stdout."""
    profile = tmp_path / f"profile-{name}"
    log = tmp_path / f"chromium-{name}.log"
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            str(CHROMIUM),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
    return out


def page_requests(path: Path, site: str) -> list[str]:
    """The URLs requested on behalf of pages of `site`, from a --log-net-log file.

    A page's requests (its document, scripts, styles, fetches, wherever they go) carry
    a network isolation key whose top-frame site is the page's; Chromium's own traffic
    (update checks, time sync, accounts: it tries some even with
    --disable-background-networking) carries "null" or a Google site and is left out.
    """
    text = path.read_text(errors="replace").rstrip().rstrip(",")
    if not text.endswith("}"):  # a log cut short has no closing brackets
        text += "]}"
    data = json.loads(text)
    start_job = data["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in data["events"]:
        params = event.get("params") or {}
        if event["type"] != start_job or "url" not in params:
            continue
        top_frame_site = str(params.get("network_isolation_key", "")).split(" ")[0]
        if top_frame_site == site:
            urls.append(params["url"])
    return urls


async def test_status_page_renders_badge_and_cards_from_local_assets_only(
    browser_ready: None, tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    async with running_daemon(tmp_path, pg_dsn, pg_schema, []) as daemon:
        # Rows for three services in the last 15 minutes: 3 api ERRORs, 1 api WARNING,
        # 2 worker INFO (straight into the table, a few minutes old so that they are in
        # the chart's whole buckets), and 1 ui ERROR through the intake (now).
        now = datetime.now(UTC)
        records = [
            (now - timedelta(seconds=150 + i), "api", level, "api.request", message, meta)
            for i, (level, message, meta) in enumerate(
                [
                    ("ERROR", "database timeout on /orders", '{"status": 500}'),
                    ("ERROR", "KeyError: 'sku'", '{"status": 500}'),
                    ("ERROR", "upstream refused", '{"status": 502}'),
                    ("WARNING", "slow query 2.1s", "{}"),
                ]
            )
        ] + [
            (now - timedelta(seconds=200 + i), "worker", "INFO", "job.done", f"job {i} done", "{}")
            for i in range(2)
        ]
        conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema})
        try:
            await conn.copy_records_to_table(
                "system_logs",
                records=records,
                columns=["ts", "service", "level", "event", "message", "meta"],
                schema_name=pg_schema,
            )
        finally:
            await conn.close()
        async with aiohttp.ClientSession() as client:
            body = [{"level": "error", "message": "TypeError: x is undefined"}]
            async with client.post(f"{daemon}/logs/ingest", json=body) as r:
                assert r.status == 202, await r.text()

        async def ui_row() -> bool:
            return len(await fetch_rows(pg_dsn, pg_schema, "ui")) == 1

        await wait_until(ui_row, what="the ingested ui row")

        # The DOM after the page's first refresh (virtual time waits for its fetches).
        net_log = tmp_path / "net-log.json"
        dom_text = (
            await run_chromium(
                tmp_path,
                "dom",
                "--dump-dom",
                "--virtual-time-budget=3000",
                f"--log-net-log={net_log}",
                f"{daemon}/",
            )
        ).decode()
        png = tmp_path / "status.png"
        await run_chromium(
            tmp_path,
            "shot",
            f"--screenshot={png}",
            "--window-size=1280,900",
            "--hide-scrollbars",
            "--virtual-time-budget=3000",
            f"{daemon}/",
        )

    dom = parse_dom(dom_text)
    (body_el,) = [n for n in dom.walk() if n.tag == "body"]
    assert body_el.attrs.get("data-loaded") == "true", dom_text[-3000:]
    assert dom.by_id("notice").attrs.get("hidden") is not None, dom.by_id("notice").text()

    # The badge: 4 ERROR lines in 15 minutes (3 api + 1 ui).
    assert dom.by_id("critical-count").text() == "4"
    assert "badge-bad" in dom.by_id("critical-badge").classes()
    chip = dom.by_id("forwarder-health")
    assert chip.text() == "forwarder: healthy"
    assert "chip-ok" in chip.classes()

    # One card per service, sorted, with its state and counts.
    cards = [n for n in dom.by_id("service-cards").walk() if n.tag == "article"]
    seen = {}
    for card in cards:
        (h3,) = [n for n in card.walk() if n.tag == "h3"]
        (state,) = [n for n in card.walk() if "state" in n.classes()]
        dts = [n.text() for n in card.walk() if n.tag == "dt"]
        dds = [int(n.text()) for n in card.walk() if n.tag == "dd"]
        assert dts == ["errors", "warnings", "info", "lines"]
        seen[h3.text()] = (card.attrs["class"], state.text(), *dds)
    assert seen == {
        # service: (card class, state, errors, warnings, info, lines)
        "api": ("card bad", "errors", 3, 1, 0, 4),
        "ui": ("card bad", "errors", 1, 0, 0, 1),
        "worker": ("card ok", "healthy", 0, 0, 2, 2),
    }
    assert [n.text() for n in dom.by_id("service-cards").walk() if n.tag == "h3"] == [
        "api",
        "ui",
        "worker",
    ]

    # The latest errors table: the four ERROR messages, rendered as text.
    messages = {n.text() for n in dom.by_id("errors").walk() if "msg" in n.classes()}
    assert messages == {
        "database timeout on /orders",
        "KeyError: 'sku'",
        "upstream refused",
        "TypeError: x is undefined",
    }
    # The chart's legend: a line per service with lines in the series' whole buckets
    # (the ui row is in there only if a minute ended since it was written).
    legend = [n.text().split(" ")[0] for n in dom.by_id("chart-legend").walk() if n.tag == "li"]
    assert legend in (["api", "worker"], ["api", "ui", "worker"]), legend

    # Only local assets: nothing in the DOM points elsewhere, and the browser asked for
    # nothing but the daemon (the net log sees every request, the page's and Chromium's).
    for node in dom.walk():
        for attr in ("src", "href"):
            ref = node.attrs.get(attr)
            if ref:
                assert not urlsplit(ref).netloc, f"<{node.tag} {attr}={ref!r}>"
    requests = page_requests(net_log, "http://127.0.0.1")
    assert f"{daemon}/" in requests
    assert f"{daemon}/static/status.js" in requests
    assert f"{daemon}/static/status.css" in requests
    assert any(u.startswith(f"{daemon}/summary?") for u in requests), requests
    elsewhere = [u for u in requests if urlsplit(u).netloc != urlsplit(daemon).netloc]
    assert elsewhere == [], elsewhere

    # The screenshot: a real PNG of the window's size, not a blank page.
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 900)
    assert len(data) > 20_000, len(data)
