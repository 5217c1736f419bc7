"""The HTTP face through aiohttp's test server against a real PostgreSQL: every
endpoint and every refusal with its exact status and body, ingest durability,
hostile bodies, the rate limit on an injected clock, /metrics parsed back, the
status page and its local assets, and `forwarder summary`'s report merge."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from forwarder.alarms import state as alarm_state
from forwarder.alarms.engine import AlarmEngine
from forwarder.alarms.rules import Alert, FiringRow, RuleSet
from forwarder.clock import SystemClock
from forwarder.config import Settings, parse_config
from forwarder.http import EngineAlarmControl, HttpContext, build_app, start_http, stop_http
from forwarder.http_config import HttpConfig
from forwarder.intake import Intake
from forwarder.metrics import Metrics, pipeline_status, snapshot_of
from forwarder.pipeline.stage import END_OF_STREAM
from forwarder.report import merge_into_report, summarize
from forwarder.sinks.postgres import PostgresSink
from forwarder.sinks.spool import START, SpoolReader
from tests.component.test_intake import Pipeline, make_settings
from tests.support import FakeClock, free_port, wait_until

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ORIGIN = "https://panel.example.com"
RULE = "ui_errors"
UNAUTHORIZED = {"error": "missing or wrong token (Authorization: Bearer <token>)"}


def alarm_settings(base: Settings) -> Settings:
    data = {
        "database": base.database.model_dump(mode="json")
        | {"dsn": base.database.dsn.get_secret_value()},
        "batch": base.batch.model_dump(mode="json"),
        "alarms": [
            {
                "type": "threshold",
                "name": RULE,
                "match": {"service": "ui", "level": "ERROR"},
                "threshold": 5,
                "severity": "critical",
            }
        ],
    }
    return parse_config(data)


@dataclass
class Http:
    client: TestClient
    ctx: HttpContext
    settings: Settings
    sink: PostgresSink
    intake: Intake | None
    pipeline: Pipeline | None
    clock: FakeClock
    engine: AlarmEngine
    components: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def post(self, body: Any, *, headers: dict[str, str] | None = None, **kw: Any) -> Any:
        data = orjson.dumps(body) if isinstance(body, dict | list) else body
        hdrs = {"Content-Type": "application/json", **AUTH, **(headers or {})}
        return await self.client.post("/logs/ingest", data=data, headers=hdrs, **kw)

    def start_pipeline(self) -> Pipeline:
        assert self.intake is not None
        self.pipeline = Pipeline(self.intake, self.sink, SystemClock()).start()
        return self.pipeline


HttpFactory = Callable[..., Any]


@pytest.fixture
async def make_http(pg_dsn: str, pg_schema: str, tmp_path: Path) -> AsyncIterator[HttpFactory]:
    made: list[Http] = []
    engines: list[tuple[asyncio.Queue[Any], asyncio.Task[None]]] = []

    async def make(
        *,
        config: dict[str, Any] | None = None,
        tokens: frozenset[str] = frozenset({TOKEN}),
        with_intake: bool = True,
        run_pipeline: bool = True,
        status: Callable[[], dict[str, dict[str, Any]]] | None = None,
        pool: asyncpg.Pool | None = None,
    ) -> Http:
        settings = alarm_settings(make_settings(pg_dsn, pg_schema, tmp_path / "data"))
        http_config = HttpConfig(**({"cors_origins": [ORIGIN]} | (config or {})))
        clock = FakeClock(start=datetime.now(UTC))
        metrics = Metrics()
        # The database side runs on the real clock (batch age); the HTTP face on the fake one.
        sink = PostgresSink(
            settings.database, settings.batch, pg_dsn, SystemClock(), on_batch=metrics.observe_batch
        )
        await sink.open()
        await sink.migrate(clock.now().date())
        engine = AlarmEngine(RuleSet.from_config(settings.alarms), clock, tick_s=0.05)
        started = clock.now() - timedelta(minutes=3)
        engine.restore([FiringRow(RULE, None, 7, ("boom",), started, started, "critical")])
        events: asyncio.Queue[Any] = asyncio.Queue(16)
        engine_task = asyncio.create_task(
            engine.run(events, asyncio.Queue(), asyncio.Queue(100), asyncio.Event())
        )
        engines.append((events, engine_task))
        await wait_until(lambda: engine.status()["state"] == "ok", what="engine running")
        intake = (
            Intake(
                http_config,
                settings.database.data_dir,
                SystemClock(),
                await sink.load_checkpoints(http_config.source_name),
                committed=lambda: sink.load_checkpoints(http_config.source_name),
            )
            if with_intake
            else None
        )
        h = Http(
            client=None,  # type: ignore[arg-type]
            ctx=None,  # type: ignore[arg-type]
            settings=settings,
            sink=sink,
            intake=intake,
            pipeline=None,
            clock=clock,
            engine=engine,
        )
        view = SimpleNamespace(
            settings=settings,
            sources=[intake] if intake is not None else [],
            normalize=SimpleNamespace(lines_in=0, events_out=0, sampler=None),
            sink=sink,
            raw_q=asyncio.Queue(16),
            event_q=asyncio.Queue(16),
            alarms=SimpleNamespace(
                engine=engine, events=events, status=lambda: {"engine": engine.status()}
            ),
        )

        def live_view() -> Any:
            if h.pipeline is not None:
                view.normalize = h.pipeline.normalize
                view.raw_q, view.event_q = h.pipeline.raw_q, h.pipeline.event_q
            return view

        metrics.read_from(lambda: snapshot_of(live_view(), intake))
        h.ctx = HttpContext(
            settings=settings,
            clock=clock,
            pool=pool or sink.pool,
            names=sink.names,
            status=status or (lambda: pipeline_status(live_view(), intake)),
            metrics=metrics,
            alarms=EngineAlarmControl(engine),
            intake=intake,
            config=http_config,
            tokens=tokens,
        )
        h.client = TestClient(TestServer(build_app(h.ctx)))
        await h.client.start_server()
        if run_pipeline and intake is not None:
            h.start_pipeline()
        made.append(h)
        return h

    yield make
    for h in made:
        await h.client.close()
        if h.pipeline is not None and h.pipeline.task is not None and not h.pipeline.task.done():
            await h.pipeline.drain()
        if h.intake is not None:
            h.intake.close()
        await h.sink.aclose()
    for events, task in engines:
        await events.put(END_OF_STREAM)  # the engine ends on the end of its stream
        await task


async def rows(conn: asyncpg.Connection, where: str = "TRUE") -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT service, level, event, message, meta::text AS meta FROM system_logs "
        f"WHERE {where} ORDER BY id"
    )


async def insert(conn: asyncpg.Connection, *values: tuple[Any, ...]) -> None:
    await conn.executemany(
        "INSERT INTO system_logs (ts, service, level, event, message, meta) "
        "VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
        [(ts, s, lv, ev, m, orjson.dumps(meta).decode()) for ts, s, lv, ev, m, meta in values],
    )


# --- POST /logs/ingest: accepted -------------------------------------------------------------


async def test_ingest_answers_202_once_the_records_are_durable_then_stores_them_once(
    make_http: HttpFactory, pg_conn: asyncpg.Connection
) -> None:
    h = await make_http(run_pipeline=False)  # the database side is not running yet
    assert h.intake is not None
    r = await h.post({"message": "one", "level": "error", "meta": {"url": "/a"}})
    assert (r.status, await r.json()) == (202, {"accepted": 1})
    r = await h.post([{"message": "two", "level": "warn"}, {"message": "three", "level": "info"}])
    assert (r.status, await r.json()) == (202, {"accepted": 2})
    r = await h.post(
        b'{"message":"four","level":"info"}\n{"message":"five","level":"info"}\n',
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert (r.status, await r.json()) == (202, {"accepted": 2})
    r = await h.post(  # what navigator.sendBeacon sends
        b'[{"message":"six","level":"error"}]',
        headers={"Content-Type": "text/plain;charset=UTF-8"},
    )
    assert (r.status, await r.json()) == (202, {"accepted": 1})

    spooled = SpoolReader(h.intake.folder).read(START).records
    assert [orjson.loads(rec.data)["message"] for rec in spooled] == [
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
    ]
    assert await rows(pg_conn) == []

    h.start_pipeline()  # the database is back
    await wait_until(lambda: h.sink.rows_written == 6, what="six rows")
    stored = await rows(pg_conn)
    assert [(r["service"], r["level"], r["message"]) for r in stored] == [
        ("ui", "ERROR", "one"),
        ("ui", "WARNING", "two"),
        ("ui", "INFO", "three"),
        ("ui", "INFO", "four"),
        ("ui", "INFO", "five"),
        ("ui", "ERROR", "six"),
    ]
    assert orjson.loads(stored[0]["meta"])["url"] == "/a"


async def test_the_service_is_the_configured_one(
    make_http: HttpFactory, pg_conn: asyncpg.Connection
) -> None:
    h = await make_http(config={"service": "panel"})
    r = await h.post({"message": "m", "level": "info", "service": "api"})
    assert r.status == 202
    await wait_until(lambda: h.sink.rows_written == 1, what="the row")
    assert [r["service"] for r in await rows(pg_conn)] == ["panel"]


# --- POST /logs/ingest: refusals ----------------------------------------------------------


async def test_a_bad_record_is_400_naming_index_and_field_and_nothing_is_stored(
    make_http: HttpFactory, pg_conn: asyncpg.Connection
) -> None:
    h = await make_http()
    assert h.intake is not None
    before = h.intake.writer.position
    r = await h.post([{"message": "ok", "level": "info"}, {"message": "bad", "level": 5}])
    assert r.status == 400
    assert await r.json() == {
        "error": "record 1, field 'level': must be a string, not a number",
        "index": 1,
        "field": "level",
    }
    r = await h.post(b'{"message": "m", "level": ')
    assert r.status == 400
    body = await r.json()
    assert body["index"] is None and body["field"] is None
    assert body["error"].startswith("malformed JSON (")
    r = await h.post(
        b'{"message":"a","level":"info"}\nnot json\n',
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert r.status == 400
    assert (await r.json())["error"].startswith("record 1: line 2: malformed JSON")
    assert h.intake.writer.position == before
    assert SpoolReader(h.intake.folder).read(START).records == []
    assert await rows(pg_conn) == []


async def test_a_body_over_the_limit_is_413_by_content_length_or_while_reading(
    make_http: HttpFactory,
) -> None:
    h = await make_http(config={"max_body_bytes": 4096, "spool_max_bytes": 1024 * 1024})
    expected = {
        "error": "body larger than 4096 bytes (http.max_body_bytes); send smaller batches",
        "max_body_bytes": 4096,
    }
    big = orjson.dumps({"message": "x" * 5000, "level": "info"})
    r = await h.post(big)
    assert (r.status, await r.json()) == (413, expected)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        yield big[:3000]
        yield big[3000:]

    r = await h.post(chunked())
    assert (r.status, await r.json()) == (413, expected)
    r = await h.post({"message": "x" * 3000, "level": "info"})
    assert r.status == 202


@pytest.mark.parametrize(
    ("content_type", "error"),
    [
        (
            "application/x-www-form-urlencoded",
            "content type 'application/x-www-form-urlencoded' is not accepted",
        ),
        ("application/json; charset=latin-1", "charset 'latin-1': send UTF-8"),
        (None, "content type 'application/octet-stream' is not accepted"),
    ],
)
async def test_a_wrong_content_type_is_415(
    make_http: HttpFactory, content_type: str | None, error: str
) -> None:
    h = await make_http()
    headers = dict(AUTH)
    if content_type is not None:
        headers["Content-Type"] = content_type
    r = await h.client.post(
        "/logs/ingest",
        data=b'{"message":"m","level":"info"}',
        headers=headers,
        skip_auto_headers={"Content-Type"},
    )
    assert r.status == 415
    assert (await r.json())["error"].startswith(error)


async def test_tokens_are_required_when_configured(make_http: HttpFactory) -> None:
    h = await make_http()
    body = orjson.dumps({"message": "m", "level": "info"})
    json_type = {"Content-Type": "application/json"}
    r = await h.client.post("/logs/ingest", data=body, headers=json_type)
    assert (r.status, await r.json()) == (401, UNAUTHORIZED)
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="forwarder"'
    wrong = {**json_type, "Authorization": "Bearer " + "x" * len(TOKEN)}
    r = await h.client.post("/logs/ingest", data=body, headers=wrong)
    assert (r.status, await r.json()) == (401, UNAUTHORIZED)
    r = await h.client.post("/logs/ingest", data=body, headers={**json_type, **AUTH})
    assert r.status == 202
    r = await h.client.post(f"/logs/ingest?token={TOKEN}", data=body, headers=json_type)
    assert r.status == 202  # sendBeacon cannot set headers


async def test_the_intake_can_be_left_open_while_reads_need_the_token(
    make_http: HttpFactory,
) -> None:
    h = await make_http(config={"ingest_requires_token": False})
    r = await h.client.post(
        "/logs/ingest",
        data=b'{"message":"m","level":"info"}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status == 202
    r = await h.client.get("/alerts")
    assert (r.status, await r.json()) == (401, UNAUTHORIZED)


async def test_no_token_is_needed_when_none_is_configured(make_http: HttpFactory) -> None:
    h = await make_http(tokens=frozenset())
    r = await h.client.post(
        "/logs/ingest",
        data=b'{"message":"m","level":"info"}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status == 202
    r = await h.client.get("/alerts")
    assert r.status == 200


async def test_over_the_rate_is_429_with_retry_after_until_the_clock_moves(
    make_http: HttpFactory,
) -> None:
    h = await make_http(config={"rate_per_min": 2})
    one = {"message": "m", "level": "info"}
    assert (await h.post(one)).status == 202
    assert (await h.post(one)).status == 202
    r = await h.post(one)
    assert r.status == 429
    assert r.headers["Retry-After"] == "30"
    assert await r.json() == {
        "error": "over 2 requests per minute from this client",
        "retry_after_s": 30,
    }
    h.clock.advance(29)
    r = await h.post(one)
    assert (r.status, r.headers["Retry-After"]) == (429, "1")
    h.clock.advance(1)
    assert (await h.post(one)).status == 202


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_rate(
    make_http: HttpFactory,
) -> None:
    """The test client connects from 127.0.0.1, configured as the reverse proxy."""
    h = await make_http(config={"rate_per_min": 1, "trusted_proxies": ["127.0.0.0/8"]})
    one = {"message": "m", "level": "info"}

    def from_(client: str) -> dict[str, str]:
        return {"X-Forwarded-For": f"6.6.6.6, {client}"}  # the left entry is a lie

    assert (await h.post(one, headers=from_("198.51.100.1"))).status == 202
    assert (await h.post(one, headers=from_("198.51.100.1"))).status == 429
    assert (await h.post(one, headers=from_("198.51.100.2"))).status == 202
    # without trusted_proxies the header is not read (a spool of its own: source_name)
    untrusted = await make_http(config={"rate_per_min": 1, "source_name": "other"})
    assert (await untrusted.post(one, headers=from_("198.51.100.1"))).status == 202
    assert (await untrusted.post(one, headers=from_("198.51.100.2"))).status == 429


async def test_a_full_spool_is_503_with_retry_after(make_http: HttpFactory) -> None:
    h = await make_http(
        config={"spool_max_bytes": 1024 * 1024, "max_body_bytes": 256 * 1024},
        run_pipeline=False,
    )
    big = {"message": "x" * 200_000, "level": "info"}
    statuses = [(await h.post(big)).status for _ in range(5)]
    assert statuses == [202] * 5
    r = await h.post(big)
    assert r.status == 503
    assert r.headers["Retry-After"] == "5"
    assert await r.json() == {
        "error": "the spool is full: the database is behind; retry later",
        "retry_after_s": 5,
    }


async def test_a_stopping_intake_is_503(make_http: HttpFactory) -> None:
    h = await make_http()
    assert h.pipeline is not None
    await h.pipeline.drain()
    r = await h.post({"message": "m", "level": "info"})
    assert r.status == 503
    assert await r.json() == {"error": "the forwarder is stopping", "retry_after_s": 5}


async def test_no_intake_is_404(make_http: HttpFactory) -> None:
    h = await make_http(with_intake=False)
    r = await h.post({"message": "m", "level": "info"})
    assert (r.status, await r.json()) == (
        404,
        {"error": "the intake is not enabled on this forwarder"},
    )


async def test_cors_for_configured_origins_with_preflight(make_http: HttpFactory) -> None:
    h = await make_http()
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization",
    }
    r = await h.client.options("/logs/ingest", headers=preflight)
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert r.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
    assert r.headers["Vary"] == "Origin"

    other = {**preflight, "Origin": "https://evil.example.com"}
    r = await h.client.options("/logs/ingest", headers=other)
    assert r.status == 403
    assert await r.json() == {
        "error": "origin 'https://evil.example.com' is not allowed (http.cors_origins)"
    }
    assert "Access-Control-Allow-Origin" not in r.headers

    r = await h.post({"message": "m", "level": "info"}, headers={"Origin": ORIGIN})
    assert r.status == 202
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    r = await h.post({"message": 1, "level": "info"}, headers={"Origin": ORIGIN})
    assert r.status == 400  # the page can read why
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert r.headers["Access-Control-Expose-Headers"] == "Retry-After"
    r = await h.post({"message": "m", "level": "info"}, headers={"Origin": "https://x.test"})
    assert r.status == 202  # not a browser rule for servers; the browser hides the answer
    assert "Access-Control-Allow-Origin" not in r.headers


HOSTILE: list[tuple[str, bytes, int]] = [
    ("deep arrays", b"[" * 100_000 + b"]" * 100_000, 400),
    (
        "deep meta",
        b'{"message":"m","level":"info","meta":' + b'{"a":' * 40 + b"1" + b"}" * 40 + b"}",
        400,
    ),
    ("invalid utf-8", b'{"message":"\xff\xfe","level":"info"}', 400),
    ("lone surrogate", b'{"message":"\\ud800","level":"info"}', 400),
    ("huge integer", b'{"message":"m","level":"info","meta":{"n":' + b"9" * 400 + b"}}", 400),
    ("array of nulls", b"[" + b"null," * 9999 + b"null]", 400),
    ("wrong level type", b'{"message":"m","level":["ERROR"]}', 400),
    ("message object", b'{"message":{"$gt":""},"level":"info"}', 400),
    ("binary", bytes(range(256)) * 8, 400),
    (
        "NUL in message and meta",
        b'{"message":"a\\u0000b","level":"error","meta":{"k\\u0000":"v\\u0000","u":"\\u0000"}}',
        202,
    ),
    ("huge string", orjson.dumps({"message": "y" * 250_000, "level": "error"}), 202),
    (
        "many keys",
        orjson.dumps({"message": "k", "level": "info", "meta": {f"k{i}": i for i in range(8000)}}),
        202,
    ),
    (
        "many records",
        b"\n".join(b'{"message":"r%d","level":"info"}' % i for i in range(6000)),
        202,
    ),
    ("sql-ish", b'{"message":"\'); DROP TABLE system_logs; --","level":"info"}', 202),
    ("float extremes", b'{"message":"f","level":"info","meta":{"a":1e308,"b":-1e-308}}', 202),
]


async def test_hostile_bodies_are_refused_or_stored_safely_never_500(
    make_http: HttpFactory, pg_conn: asyncpg.Connection
) -> None:
    h = await make_http(config={"rate_per_min": 0})
    accepted = 0
    for name, body, status in HOSTILE:
        ctype = "application/x-ndjson" if name == "many records" else "application/json"
        r = await h.post(body, headers={"Content-Type": ctype})
        assert r.status == status, (name, r.status, await r.text())
        payload = await r.json()
        if status == 202:
            accepted += payload["accepted"]
        else:
            assert payload["error"], name
    await wait_until(lambda: h.sink.rows_written == accepted, what="accepted rows committed")
    assert h.sink.rows_dead_lettered == 0
    (nul,) = await rows(pg_conn, "message LIKE 'a%b' AND level = 'ERROR'")
    assert "\x00" not in nul["message"] and "\\u0000" not in nul["meta"]
    assert (
        await pg_conn.fetchval("SELECT length(message) FROM system_logs WHERE message LIKE 'yyy%'")
        == 250_000
    )
    assert await pg_conn.fetchval("SELECT count(*) FROM system_logs") == accepted
    assert await pg_conn.fetchval("SELECT 1") == 1
    async with h.ctx.pool.acquire() as conn:
        assert await conn.fetchval("SELECT 1") == 1


# --- GET /health and /metrics ----------------------------------------------------------------


async def test_health_is_200_only_when_every_component_is_ok(make_http: HttpFactory) -> None:
    components: dict[str, dict[str, Any]] = {
        "source:http": {"state": "ok"},
        "sink": {"state": "ok", "pending_rows": 3, "last_commit_age_s": 0.5},
        "alarms": {"state": "ok"},
    }
    h = await make_http(status=lambda: components)
    r = await h.client.get("/health")  # no token needed: probes carry none
    assert r.status == 200
    assert await r.json() == {
        "status": "ok",
        "unhealthy": [],
        "sink_lag": {"pending_rows": 3, "last_commit_age_s": 0.5},
        "components": components,
    }
    components["sink"] = {"state": "degraded", "reason": "write failed, retrying: x"}
    r = await h.client.get("/health")
    assert r.status == 503
    body = await r.json()
    assert (body["status"], body["unhealthy"]) == ("unhealthy", ["sink"])
    assert body["components"]["sink"]["reason"] == "write failed, retrying: x"


async def test_health_of_the_real_components(make_http: HttpFactory) -> None:
    h = await make_http()
    await wait_until(lambda: h.intake is not None and h.intake.status()["state"] == "ok")
    r = await h.client.get("/health")
    body = await r.json()
    assert r.status == 200, body
    assert set(body["components"]) == {"source:http", "normalize", "sink", "queues", "alarms"}
    assert body["components"]["queues"]["raw"] == {"depth": 0, "capacity": 16}
    assert body["sink_lag"]["pending_rows"] == 0


async def test_metrics_parse_and_have_every_named_series(make_http: HttpFactory) -> None:
    h = await make_http()
    assert (await h.post([{"message": f"m{i}", "level": "info"} for i in range(4)])).status == 202
    await wait_until(lambda: h.sink.rows_written == 4, what="rows")
    r = await h.client.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(await r.text())}

    def value(name: str, sample: str | None = None, **labels: str) -> float:
        for s in families[name].samples:
            if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        raise AssertionError(f"no sample {sample or name} {labels}")

    for name in (
        "forwarder_source_lines_read",
        "forwarder_source_lag_bytes",
        "forwarder_sampler_events_sampled_out",
        "forwarder_sink_rows_written",
        "forwarder_sink_rows_dead_lettered",
        "forwarder_sink_batch_duration_seconds",
        "forwarder_queue_depth",
        "forwarder_alarms_firing",
        "forwarder_component_up",
        "forwarder_http_requests",
        "forwarder_intake_requests_refused",
    ):
        assert name in families, name
    lines = value("forwarder_source_lines_read", "forwarder_source_lines_read_total", source="http")
    assert lines == 4
    assert value("forwarder_sink_rows_written", "forwarder_sink_rows_written_total") == 4
    dead = value("forwarder_sink_rows_dead_lettered", "forwarder_sink_rows_dead_lettered_total")
    assert dead == 0
    assert (
        value(
            "forwarder_sink_batch_duration_seconds", "forwarder_sink_batch_duration_seconds_count"
        )
        >= 1
    )
    assert value("forwarder_alarms_firing", rule=RULE) == 1
    assert value("forwarder_queue_depth", queue="raw") == 0
    assert value("forwarder_source_lag_bytes", source="http") == 0
    assert value("forwarder_component_up", component="sink") == 1
    assert (
        value(
            "forwarder_http_requests",
            "forwarder_http_requests_total",
            route="/logs/ingest",
            method="POST",
            code="202",
        )
        == 1
    )


async def test_metrics_never_share_the_global_registry(make_http: HttpFactory) -> None:
    from prometheus_client import REGISTRY

    a, b = Metrics(), Metrics()
    a.observe_batch(0.1, 10)
    assert a.registry is not b.registry is not REGISTRY
    assert b"forwarder_sink_batch_rows_count 0.0" in b.render()[0]
    assert REGISTRY.get_sample_value("forwarder_sink_batch_rows_count") is None


# --- reads ----------------------------------------------------------------------------------


async def test_recent_filters_and_caps(make_http: HttpFactory, pg_conn: asyncpg.Connection) -> None:
    h = await make_http()
    now = h.clock.now()
    await insert(
        pg_conn,
        (now - timedelta(minutes=1), "api", "ERROR", "http.error", "newest", {"code": 500}),
        (now - timedelta(minutes=2), "api", "ERROR", "http.error", "older", {}),
        (now - timedelta(minutes=3), "api", "INFO", "log", "info", {}),
        (now - timedelta(minutes=4), "worker", "ERROR", "job", "worker err", {}),
        (now - timedelta(hours=2), "api", "ERROR", "http.error", "too old", {}),
    )
    r = await h.client.get("/logs/recent?service=api&level=error&since=1h", headers=AUTH)
    assert r.status == 200
    body = await r.json()
    assert (body["limit"], body["count"]) == (50, 2)
    assert body["since"] == (now - timedelta(hours=1)).isoformat()
    assert body["rows"][0] == {
        "ts": (now - timedelta(minutes=1)).isoformat(),
        "service": "api",
        "level": "ERROR",
        "event": "http.error",
        "message": "newest",
        "meta": {"code": 500},
    }
    assert [row["message"] for row in body["rows"]] == ["newest", "older"]
    r = await h.client.get("/logs/recent?since=1h&limit=2", headers=AUTH)
    assert [row["message"] for row in (await r.json())["rows"]] == ["newest", "older"]
    r = await h.client.get("/logs/recent?since=3d&limit=999999", headers=AUTH)
    body = await r.json()
    assert (body["limit"], body["count"]) == (500, 5)
    r = await h.client.get("/logs/recent", headers=AUTH)  # since=15m by default
    assert (await r.json())["count"] == 4


@pytest.mark.parametrize(
    ("query", "error", "param"),
    [
        ("level=loud", "level: must be INFO, WARNING or ERROR, not 'loud'", "level"),
        ("since=soon", "since: not a duration: 'soon' (use e.g. 30s, 15m, 2h, 7d)", "since"),
        ("since=0s", "since: must be more than 0 and at most 31 days, 0:00:00", "since"),
        ("limit=0", "limit: must be a positive integer, not '0'", "limit"),
        ("limit=ten", "limit: must be a positive integer, not 'ten'", "limit"),
    ],
)
async def test_recent_refuses_bad_parameters(
    make_http: HttpFactory, query: str, error: str, param: str
) -> None:
    h = await make_http()
    r = await h.client.get(f"/logs/recent?{query}", headers=AUTH)
    assert (r.status, await r.json()) == (400, {"error": error, "param": param})


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/logs/recent"),
        ("GET", "/summary"),
        ("GET", "/alerts"),
        ("POST", f"/alerts/{RULE}/reset"),
    ],
)
async def test_reads_and_resets_need_the_token(
    make_http: HttpFactory, method: str, path: str
) -> None:
    h = await make_http()
    r = await h.client.request(method, path)
    assert (r.status, await r.json()) == (401, UNAUTHORIZED)
    r = await h.client.request(method, path, headers={"Authorization": "Basic x"})
    assert (r.status, await r.json()) == (401, UNAUTHORIZED)
    assert h.engine.firing()  # nothing was reset


async def test_summary_counts_lines_per_service_and_level_with_the_badge_and_alarms(
    make_http: HttpFactory, pg_conn: asyncpg.Connection
) -> None:
    h = await make_http()
    now = h.clock.now()
    m = timedelta(minutes=1)
    await insert(
        pg_conn,
        *[(now - 2 * m, "api", "INFO", "log", f"i{i}", {}) for i in range(3)],
        *[(now - 3 * m, "api", "ERROR", "http.error", f"e{i}", {}) for i in range(2)],
        (now - 4 * m, "worker", "WARNING", "job", "w", {}),
        (now - 30 * m, "worker", "ERROR", "job", "outside the window", {}),
        (now - 2 * m, "api", "INFO", "forwarder.sampled", "sampled api", {"dropped": {"INFO": 10}}),
    )
    r = await h.client.get("/summary?window=15m", headers=AUTH)
    assert r.status == 200
    body = await r.json()
    assert body["services"] == {
        "api": {"INFO": 13, "WARNING": 0, "ERROR": 2, "total": 15},
        "worker": {"INFO": 0, "WARNING": 1, "ERROR": 0, "total": 1},
    }
    assert body["totals"] == {"INFO": 13, "WARNING": 1, "ERROR": 2, "total": 16}
    assert body["critical_errors"] == 2
    assert (body["window"], body["window_s"]) == ("15m", 900.0)
    assert [(a["rule"], a["severity"], a["count"]) for a in body["alarms_firing"]] == [
        (RULE, "critical", 7)
    ]
    series = body["series"]
    assert (series["bucket_s"], series["points"]) == (60.0, 60)
    assert set(series["services"]) == {"api", "worker"}
    assert round(sum(series["services"]["api"]) * 60) == 15
    assert round(sum(series["services"]["worker"]) * 60) == 2  # the hour holds both
    assert all(len(v) == 60 for v in series["services"].values())

    r = await h.client.get("/summary?window=1h&series=0", headers=AUTH)
    body = await r.json()
    assert body["critical_errors"] == 3 and "series" not in body
    r = await h.client.get("/summary?window=1h&series=1d&bucket=1s", headers=AUTH)
    assert (r.status, await r.json()) == (
        400,
        {"error": "bucket: series/bucket gives more than 1440 points", "param": "bucket"},
    )


async def test_summarize_reads_the_database_clock_and_alarm_rows(
    make_http: HttpFactory, pg_conn: asyncpg.Connection
) -> None:
    h = await make_http()
    now = datetime.now(UTC)
    await insert(pg_conn, (now - timedelta(minutes=1), "api", "ERROR", "x", "e", {}))
    await alarm_state.write_alert(pg_conn, h.sink.names, firing_alert(now))
    summary = await summarize(pg_conn, h.sink.names, timedelta(minutes=15))
    assert summary["critical_errors"] == 1
    assert summary["services"] == {"api": {"INFO": 0, "WARNING": 0, "ERROR": 1, "total": 1}}
    assert [a["rule"] for a in summary["alarms_firing"]] == [RULE]
    orjson.dumps(summary)


def firing_alert(at: datetime) -> Alert:
    return Alert(
        rule=RULE,
        group=None,
        state="firing",
        severity="critical",
        count=7,
        window_s=60.0,
        samples=("boom",),
        started_at=at,
        at=at,
        actions=(),
        summary=f"{RULE}: 7 errors",
    )


async def test_alerts_lists_the_firing_alarms(make_http: HttpFactory) -> None:
    h = await make_http()
    r = await h.client.get("/alerts", headers=AUTH)
    assert r.status == 200
    body = await r.json()
    assert (body["count"], body["from"]) == (1, "engine")
    (alarm,) = body["firing"]
    assert {k: alarm[k] for k in ("rule", "group", "severity", "count", "samples")} == {
        "rule": RULE,
        "group": None,
        "severity": "critical",
        "count": 7,
        "samples": ["boom"],
    }


async def test_reset_clears_memory_and_writes_the_ok_rows(
    make_http: HttpFactory, pg_conn: asyncpg.Connection
) -> None:
    h = await make_http()
    await alarm_state.write_alert(pg_conn, h.sink.names, firing_alert(h.clock.now()))
    r = await h.client.post(f"/alerts/{RULE}/reset", headers=AUTH)
    assert r.status == 200
    body = await r.json()
    assert (body["rule"], body["rows_written"]) == (RULE, 1)
    assert [c["rule"] for c in body["cleared"]] == [RULE]
    assert h.engine.firing() == []
    assert await alarm_state.load_firing(pg_conn, h.sink.names) == []
    latest = await pg_conn.fetchrow(
        "SELECT status, details FROM system_checks WHERE name = $1 ORDER BY id DESC LIMIT 1",
        RULE,
    )
    assert latest["status"] == "ok"
    assert orjson.loads(latest["details"])["reset"] is True
    r = await h.client.get("/alerts", headers=AUTH)
    assert (await r.json())["firing"] == []

    r = await h.client.post("/alerts/nope/reset", headers=AUTH)
    assert (r.status, await r.json()) == (
        404,
        {"error": "no alarm rule named 'nope'", "rule": "nope"},
    )


async def test_reset_without_a_rule_clears_every_alarm(
    make_http: HttpFactory, pg_conn: asyncpg.Connection
) -> None:
    h = await make_http()
    await alarm_state.write_alert(pg_conn, h.sink.names, firing_alert(h.clock.now()))
    assert (await h.client.post("/alerts/reset")).status == 401
    r = await h.client.post("/alerts/reset", headers=AUTH)
    assert r.status == 200
    body = await r.json()
    assert (body["rule"], body["resolved"], body["rows_written"]) == (None, 1, 1)
    assert h.engine.firing() == []
    assert await alarm_state.load_firing(pg_conn, h.sink.names) == []


async def test_reads_answer_503_while_the_database_is_unreachable(
    make_http: HttpFactory,
) -> None:
    port = free_port()
    dead = await asyncpg.create_pool(
        f"postgresql://postgres@127.0.0.1:{port}/x", min_size=0, timeout=1
    )
    try:
        h = await make_http(pool=dead)
        expected = {"error": "the database is unavailable; retry later", "retry_after_s": 5}
        for path in ("/logs/recent", "/summary"):
            r = await h.client.get(path, headers=AUTH)
            assert (r.status, await r.json()) == (503, expected), path
            assert r.headers["Retry-After"] == "5"
        r = await h.client.post(f"/alerts/{RULE}/reset", headers=AUTH)
        assert (r.status, await r.json()) == (503, expected)
        assert h.engine.firing()  # the reset did nothing anywhere
    finally:
        await dead.close()


# --- routing errors, the page, a real server ------------------------------------------------


async def test_unknown_routes_and_methods_answer_json(make_http: HttpFactory) -> None:
    h = await make_http()
    r = await h.client.get("/nope")
    assert (r.status, await r.json()) == (404, {"error": "Not Found"})
    r = await h.client.get("/logs/ingest")
    assert (r.status, await r.json()) == (405, {"error": "Method Not Allowed"})
    assert r.headers["Allow"] == "POST"


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.ids: set[str] = set()
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for key in ("src", "href"):
            if values.get(key):
                self.refs.append(str(values[key]))
        if values.get("id"):
            self.ids.add(str(values["id"]))
        if tag == "script" and not values.get("src"):
            self._in_script = True
        if "style" in values or any(k.startswith("on") for k in values):
            raise AssertionError(f"inline style or handler on <{tag}>")

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False


async def test_the_status_page_is_served_with_only_local_assets(make_http: HttpFactory) -> None:
    h = await make_http()
    r = await h.client.get("/")
    assert r.status == 200
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    page = _Assets()
    page.feed(await r.text())
    assert page.inline_scripts == 0
    assert sorted(page.refs) == ["static/status.css", "static/status.js"]
    assert {"critical-badge", "service-cards", "rate-chart", "alarms", "errors"} <= page.ids
    for ref in page.refs:
        assert "//" not in ref and not ref.startswith("/")
        asset = await h.client.get("/" + ref)
        assert asset.status == 200, ref
        text = await asset.text()
        assert "http://" not in text and "https://" not in text, ref
    js = await (await h.client.get("/static/status.js")).text()
    for endpoint in ('"health"', '"summary?', '"alerts"', '"logs/recent?'):
        assert endpoint in js
    assert ".innerHTML" not in js  # server data only ever as text
    r = await h.client.get("/static/..%2Fhttp.py")
    assert r.status == 404


UI_LOGGER = Path(__file__).resolve().parents[2] / "forwarder" / "producers" / "ui-logger.js"


async def test_ui_logger_is_served_from_the_package_when_present(make_http: HttpFactory) -> None:
    h = await make_http()
    r = await h.client.get("/ui-logger.js")
    expected = UI_LOGGER.read_bytes() if UI_LOGGER.is_file() else None
    if expected is not None:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert await r.read() == expected
    else:
        assert (r.status, await r.json()) == (
            404,
            {"error": "ui-logger.js is not installed (forwarder/producers/ui-logger.js)"},
        )


async def test_start_http_serves_on_a_real_port_and_stops(make_http: HttpFactory) -> None:
    h = await make_http(status=lambda: {"sink": {"state": "ok"}})
    app = build_app(h.ctx)
    runner = await start_http(app, "127.0.0.1:0")
    try:
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{host}:{port}/health") as r:
                assert r.status == 200
                assert (await r.json())["status"] == "ok"
    finally:
        await stop_http(runner)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://{host}:{port}/health")


# --- the report merge ---------------------------------------------------------------------


def test_merge_into_report_keeps_other_fields_and_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "latest_oneclick_report.json"
    path.write_bytes(orjson.dumps({"status": "green", "log_summary": {"old": True}, "n": [1]}))
    os.chmod(path, 0o600)
    report = merge_into_report(path, {"critical_errors": 2})
    assert (
        orjson.loads(path.read_bytes())
        == report
        == {
            "status": "green",
            "log_summary": {"critical_errors": 2},
            "n": [1],
        }
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left

    fresh = tmp_path / "new.json"
    assert merge_into_report(fresh, {"a": 1}) == {"log_summary": {"a": 1}}

    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an object"):
        merge_into_report(bad, {"a": 1})
    assert bad.read_text() == "[1, 2]"


def test_an_app_is_independent_of_any_other(tmp_path: Path) -> None:
    settings = make_settings("postgresql://x@127.0.0.1:1/x", "public", tmp_path)
    ctx = HttpContext(
        settings=settings,
        clock=FakeClock(),
        pool=None,  # type: ignore[arg-type]
        names=None,  # type: ignore[arg-type]
        status=dict,
        metrics=Metrics(),
        tokens=frozenset(),
    )
    a, b = build_app(ctx), build_app(ctx)
    assert isinstance(a, web.Application) and a is not b
