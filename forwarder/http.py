"""The HTTP face: intake, health, metrics, queries and the live status page.

One aiohttp application built by `build_app(HttpContext)`; the runtime starts it with
`start_http` and stops it with `stop_http` (`runner.cleanup()`). It reads statuses,
metrics and the database, and hands bodies to the `Intake`; it owns no pipeline
logic. State reaches handlers through one typed `AppKey`; no globals. Signals stay
with the runtime (`handle_signals=False`).

Endpoints (JSON unless said otherwise; every refusal is {"error": "...", ...}):

    POST /logs/ingest            202 {"accepted": n} once durable in the spool;
                                 400 (bad JSON or field: "index" and "field" say where),
                                 401, 413, 415, 429 and 503 (with Retry-After)
    GET  /health                 200 when every component is "ok", else 503
    GET  /metrics                Prometheus text format
    GET  /logs/recent?service=&level=&since=15m&limit=50
    GET  /summary?window=15m&series=1h&bucket=60s
    GET  /alerts
    POST /alerts/{rule}/reset   (POST /alerts/reset: every rule)
    GET  /                       the status page (static/index.html, status.css, status.js)
    GET  /ui-logger.js           the browser snippet (forwarder/producers/ui-logger.js)

Tokens (when configured): `Authorization: Bearer <token>`, or `?token=` (sendBeacon
cannot set headers). Required for the reads and the reset, and for the intake unless
`ingest_requires_token = false`. /health, /metrics and the static files are open: an
orchestrator's probe and a scraper need no secret, and they carry no log content.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Final, Protocol

import asyncpg
import orjson
from aiohttp import web

from forwarder.alarms import state as alarm_state
from forwarder.clock import Clock
from forwarder.config import Settings
from forwarder.http_config import HttpConfig, parse_listen
from forwarder.http_limits import (
    BodyBudget,
    BodyRefused,
    gated_runner,
    gated_site,
    read_body,
    too_large,
)
from forwarder.intake import (
    Intake,
    IntakeClosed,
    IntakeError,
    RateLimiter,
    UnsupportedMediaType,
    media_kind,
    parse_body,
)
from forwarder.metrics import Metrics
from forwarder.queries import parse_duration, recent
from forwarder.report import firing_as_dict, rate_series, summarize
from forwarder.sinks.schema import Names
from forwarder.sinks.spool import RecordTooLarge, SpoolFull

__all__ = [
    "CONTEXT",
    "AlarmControl",
    "EngineAlarmControl",
    "HttpContext",
    "build_app",
    "start_http",
    "stop_http",
]

log = logging.getLogger(__name__)

COMPONENT = "http"
DB_TIMEOUT_S: Final = 5.0
MAX_WINDOW: Final = timedelta(days=31)
MAX_RULE_CHARS: Final = 200
STATIC_FILES: Final = {
    "status.css": "text/css",
    "status.js": "text/javascript",
}
PAGE_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
CORS_MAX_AGE_S: Final = 600


class AlarmControl(Protocol):
    """What the HTTP face needs of the alarm side: what fires, and an operator reset."""

    def firing(self) -> Sequence[Any]:
        """The (rule, group) pairs firing now (rules.Firing-like objects)."""

    async def reset(self, rule: str | None) -> Sequence[Any]:
        """Clear one rule (None: all) in memory; KeyError when no such rule exists."""


class EngineAlarmControl:
    """`AlarmControl` over the daemon's AlarmEngine (pipeline.alarms.engine)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def firing(self) -> Sequence[Any]:
        return self.engine.firing()

    async def reset(self, rule: str | None) -> Sequence[Any]:
        return self.engine.reset(rule)


@dataclass
class HttpContext:
    """Everything the handlers read; built by the runtime, owned by it."""

    settings: Settings
    clock: Clock
    pool: asyncpg.Pool  # the sink's
    names: Names
    status: Callable[[], dict[str, dict[str, Any]]]  # component -> {"state": ..., ...}
    metrics: Metrics
    alarms: AlarmControl | None = None
    intake: Intake | None = None
    # Defaults to settings.http; tokens default to config.load_tokens() at build_app.
    config: HttpConfig | None = None
    tokens: frozenset[str] | None = None


@dataclass
class _State:
    ctx: HttpContext
    config: HttpConfig
    token_digests: tuple[bytes, ...]
    limiter: RateLimiter | None
    bodies: BodyBudget
    origins: frozenset[str] = field(default_factory=frozenset)


CONTEXT: Final = web.AppKey("forwarder_http", _State)


def _config_of(ctx: HttpContext) -> HttpConfig:
    if ctx.config is not None:
        return ctx.config
    config = getattr(ctx.settings, "http", None)
    return config if isinstance(config, HttpConfig) else HttpConfig()


def build_app(ctx: HttpContext) -> web.Application:
    """The application; TokenError (from http_config) when the tokens cannot be read."""
    config = _config_of(ctx)
    tokens = ctx.tokens if ctx.tokens is not None else config.load_tokens()
    state = _State(
        ctx=ctx,
        config=config,
        token_digests=tuple(_digest(t) for t in sorted(tokens)),
        limiter=RateLimiter(config.rate_per_min) if config.rate_per_min > 0 else None,
        bodies=BodyBudget(config.max_buffered_body_bytes),
        origins=frozenset(config.cors_origins),
    )
    # client_max_size bounds request.read()/post(); the intake reads by itself, bounded.
    app = web.Application(middlewares=[_frame], client_max_size=config.max_body_bytes)
    app[CONTEXT] = state
    app.router.add_post("/logs/ingest", _ingest)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/logs/recent", _recent)
    app.router.add_get("/summary", _summary)
    app.router.add_get("/alerts", _alerts)
    app.router.add_post("/alerts/{rule}/reset", _reset)
    app.router.add_post("/alerts/reset", _reset)  # every rule
    app.router.add_get("/", _page)
    app.router.add_get("/static/{name}", _static)
    app.router.add_get("/ui-logger.js", _ui_logger)
    return app


async def start_http(
    app: web.Application, listen: str, *, shutdown_timeout_s: float = 5.0
) -> web.AppRunner:
    """Bind and serve `app` on `listen` (host:port); the runner's cleanup stops it.

    The app's [http] limits apply (http_limits): header and body timeouts, connection
    caps. OSError (address in use, permission) after releasing what was set up.
    """
    host, port = parse_listen(listen)
    config = app[CONTEXT].config
    runner = gated_runner(app, config, shutdown_timeout_s=shutdown_timeout_s)
    await runner.setup()
    try:
        await gated_site(runner, host, port, config).start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info(
        "HTTP on %s",
        ", ".join(_address_text(a) for a in runner.addresses),
        extra={"component": COMPONENT, "event": "http.listening"},
    )
    return runner


async def stop_http(runner: web.AppRunner) -> None:
    """Stop accepting, let requests in progress finish (shutdown_timeout_s), clean up."""
    await runner.cleanup()


def _address_text(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in str(host) else f"{host}:{address[1]}"
    return str(address)


# --- responses ------------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    body = orjson.dumps(data, default=_default, option=orjson.OPT_NON_STR_KEYS)
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    headers = {}
    retry_after = extra.get("retry_after_s")
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    return _json({"error": message, **extra}, status, headers)


# --- the frame around every handler: CORS, errors as JSON, metrics ---------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _frame(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[CONTEXT]
    origin = request.headers.get("Origin")
    allowed = origin is not None and ("*" in state.origins or origin in state.origins)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response: web.StreamResponse
        if allowed:
            response = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = str(CORS_MAX_AGE_S)
        else:
            response = _error(403, f"origin {origin!r} is not allowed (http.cors_origins)")
        _cors_headers(response, state, origin, allowed)
        _count(state, request, response)
        return response
    try:
        response = await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        response = _error(e.status, e.reason)
        for key in ("Allow", "Retry-After"):
            if key in e.headers:
                response.headers[key] = e.headers[key]
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception(
            "%s %s failed",
            request.method,
            request.path,
            extra={"component": COMPONENT},
        )
        response = _error(500, "internal error; the forwarder's log has the details")
    _cors_headers(response, state, origin, allowed)
    _count(state, request, response)
    return response


def _cors_headers(
    response: web.StreamResponse, state: _State, origin: str | None, allowed: bool
) -> None:
    if not state.origins:
        return
    if allowed:
        # The origin is echoed and credentials allowed: navigator.sendBeacon always sends
        # in credentials mode, and a preflight answered with "*" or without
        # Allow-Credentials makes the browser drop the beacon silently. Safe here: no
        # endpoint authenticates by cookie (reads and resets take a bearer token).
        response.headers["Access-Control-Allow-Origin"] = origin or "*"
        if origin:
            response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"
    response.headers["Vary"] = "Origin"


def _count(state: _State, request: web.Request, response: web.StreamResponse) -> None:
    info = request.match_info
    route = getattr(getattr(info.route, "resource", None), "canonical", None) or "unmatched"
    state.ctx.metrics.http_requests.labels(route, request.method, str(response.status)).inc()


# --- auth -----------------------------------------------------------------------------------


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _presented_token(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return request.query.get("token") or None


def _authorized(state: _State, request: web.Request) -> bool:
    if not state.token_digests:
        return True
    token = _presented_token(request)
    if token is None:
        return False
    # Equal-length digests compared in constant time, against every token (no early exit).
    presented = _digest(token)
    match = False
    for digest in state.token_digests:
        match |= hmac.compare_digest(presented, digest)
    return match


def _unauthorized() -> web.Response:
    response = _error(401, "missing or wrong token (Authorization: Bearer <token>)")
    response.headers["WWW-Authenticate"] = 'Bearer realm="forwarder"'
    return response


# --- POST /logs/ingest ---------------------------------------------------------------------


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]
) -> str:
    """The address a request comes from, for the rate limit.

    The peer, unless it is a trusted proxy: then X-Forwarded-For is read from the right
    (each proxy appends the address it got the request from), skipping trusted proxies;
    the first other entry is the client. Entries left of it are the client's own word
    and are never believed. All trusted: the leftmost entry.
    """
    if peer is None:
        return "unknown"
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    hops = [hop for hop in hops if hop]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _is_trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # not an address (garbage in the header): never a trusted proxy
        return False
    return any(ip in network for network in trusted)


async def _ingest(request: web.Request) -> web.StreamResponse:
    state = request.app[CONTEXT]
    ctx, config = state.ctx, state.config
    refused = state.ctx.metrics.intake_refused

    def refuse(reason: str, response: web.Response) -> web.Response:
        refused.labels(reason).inc()
        return response

    intake = ctx.intake
    if intake is None:
        return refuse("disabled", _error(404, "the intake is not enabled on this forwarder"))
    if state.limiter is not None:
        client = client_address(
            request.remote, request.headers.getall("X-Forwarded-For", []), config.trusted_proxies
        )
        wait_s = state.limiter.admit(client, ctx.clock.monotonic())
        if wait_s > 0:
            retry = max(1, math.ceil(wait_s))
            return refuse(
                "rate",
                _error(
                    429,
                    f"over {config.rate_per_min} requests per minute from this client",
                    retry_after_s=retry,
                ),
            )
    if config.ingest_requires_token and not _authorized(state, request):
        return refuse("token", _unauthorized())
    try:
        kind = media_kind(request.content_type, request.charset)
    except UnsupportedMediaType as e:
        return refuse("content_type", _error(415, str(e)))
    try:
        if (request.content_length or 0) > config.max_body_bytes:
            raise too_large(config.max_body_bytes)  # refused unread
        body = await read_body(request.content, config, state.bodies)
    except BodyRefused as e:
        response = _error(e.status, str(e), **e.extra)
        response.force_close()  # the rest of the body is never read
        return refuse(e.reason, response)
    try:
        lines = parse_body(body, kind, user_agent=request.headers.get("User-Agent"))
    except IntakeError as e:
        return refuse("invalid", _json(e.as_json(), 400))
    try:
        accepted = await intake.accept(lines)
    except SpoolFull:
        return refuse(
            "spool_full",
            _error(
                503,
                "the spool is full: the database is behind; retry later",
                retry_after_s=config.retry_after_s,
            ),
        )
    except IntakeClosed as e:
        return refuse("stopping", _error(503, str(e), retry_after_s=config.retry_after_s))
    except RecordTooLarge as e:
        return refuse("too_large", _error(413, str(e)))
    except OSError as e:
        log.error(
            "cannot write the intake spool: %s",
            e.strerror or type(e).__name__,
            extra={"component": COMPONENT},
        )
        return refuse(
            "spool_error",
            _error(503, "cannot write the spool; retry later", retry_after_s=config.retry_after_s),
        )
    return _json({"accepted": accepted.records}, 202)


# --- health and metrics ----------------------------------------------------------------------


async def _health(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT].ctx
    components = ctx.status()
    healthy = bool(components) and all(c.get("state") == "ok" for c in components.values())
    sink = components.get("sink", {})
    body = {
        "status": "ok" if healthy else "unhealthy",
        "unhealthy": sorted(k for k, c in components.items() if c.get("state") != "ok"),
        "sink_lag": {
            "pending_rows": sink.get("pending_rows"),
            "last_commit_age_s": sink.get("last_commit_age_s"),
        },
        "components": components,
    }
    return _json(body, 200 if healthy else 503, {"Cache-Control": "no-store"})


async def _metrics(request: web.Request) -> web.StreamResponse:
    metrics = request.app[CONTEXT].ctx.metrics
    body, content_type = metrics.render(request.headers.get("Accept"))
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


# --- reads ----------------------------------------------------------------------------------


class _BadParam(ValueError):
    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(message)


def _duration(request: web.Request, name: str, default: str, maximum: timedelta) -> timedelta:
    text = request.query.get(name, default)
    try:
        value = parse_duration(text)
    except ValueError as e:
        raise _BadParam(name, str(e)) from None
    if value.total_seconds() <= 0 or value > maximum:
        raise _BadParam(name, f"must be more than 0 and at most {maximum}")
    return value


def _bad(e: _BadParam) -> web.Response:
    return _error(400, f"{e.name}: {e}", param=e.name)


async def _with_db(ctx: HttpContext, fn: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    async with ctx.pool.acquire(timeout=DB_TIMEOUT_S) as conn:
        return await fn(conn)


def _db_unavailable(state: _State, e: BaseException) -> web.Response:
    log.warning(
        "database unavailable for %s: %s",
        "a read",
        type(e).__name__,
        extra={"component": COMPONENT},
    )
    return _error(
        503, "the database is unavailable; retry later", retry_after_s=state.config.retry_after_s
    )


_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def _row(record: Mapping[str, Any]) -> dict[str, Any]:
    meta = record["meta"]
    if isinstance(meta, str | bytes):
        meta = orjson.loads(meta)
    ts = record["ts"]
    return {
        "ts": ts.isoformat() if isinstance(ts, datetime) else ts,
        "service": record["service"],
        "level": record["level"],
        "event": record["event"],
        "message": record["message"],
        "meta": meta,
    }


async def _recent(request: web.Request) -> web.StreamResponse:
    state = request.app[CONTEXT]
    ctx, config = state.ctx, state.config
    if not _authorized(state, request):
        return _unauthorized()
    q = request.query
    try:
        since_d = _duration(request, "since", "15m", MAX_WINDOW)
        level = q.get("level") or None
        if level is not None and level.upper() not in ("INFO", "WARNING", "ERROR"):
            raise _BadParam("level", f"must be INFO, WARNING or ERROR, not {level[:40]!r}")
        limit_text = q.get("limit", "50")
        if not limit_text.isdigit() or int(limit_text) < 1:
            raise _BadParam("limit", f"must be a positive integer, not {limit_text[:40]!r}")
        limit = min(int(limit_text), config.recent_max_limit)
        service = q.get("service") or None
        if service is not None and len(service) > 200:
            raise _BadParam("service", "at most 200 characters")
    except _BadParam as e:
        return _bad(e)
    since = ctx.clock.now() - since_d
    try:
        rows = await _with_db(
            ctx,
            lambda conn: recent(
                conn,
                ctx.settings.database,
                since=since,
                service=service,
                level=level,
                limit=limit,
            ),
        )
    except _DB_ERRORS as e:
        return _db_unavailable(state, e)
    return _json(
        {
            "since": since.isoformat(),
            "limit": limit,
            "count": len(rows),
            "rows": [_row(r) for r in rows],
        }
    )


async def _summary(request: web.Request) -> web.StreamResponse:
    state = request.app[CONTEXT]
    ctx = state.ctx
    if not _authorized(state, request):
        return _unauthorized()
    try:
        window = _duration(request, "window", "15m", MAX_WINDOW)
        series_text = request.query.get("series", "1h")
        span = None if series_text in ("0", "") else _duration(request, "series", "1h", MAX_WINDOW)
        bucket = _duration(request, "bucket", "60s", timedelta(days=1))
        if span is not None and span / bucket > 1440:
            raise _BadParam("bucket", "series/bucket gives more than 1440 points")
    except _BadParam as e:
        return _bad(e)
    now = ctx.clock.now()

    async def read(conn: asyncpg.Connection) -> dict[str, Any]:
        out = await summarize(conn, ctx.names, window, now=now)
        if span is not None:
            out["series"] = await rate_series(conn, ctx.names, span, bucket, now=now)
        return out

    try:
        body = await _with_db(ctx, read)
    except _DB_ERRORS as e:
        return _db_unavailable(state, e)
    body["window"] = request.query.get("window", "15m")
    if ctx.alarms is not None:
        body["alarms_firing"] = [firing_as_dict(f) for f in ctx.alarms.firing()]
        body["alarms_from"] = "engine"
    else:
        body["alarms_from"] = "system_checks"
    return _json(body)


async def _alerts(request: web.Request) -> web.StreamResponse:
    state = request.app[CONTEXT]
    ctx = state.ctx
    if not _authorized(state, request):
        return _unauthorized()
    if ctx.alarms is not None:
        firing = [firing_as_dict(f) for f in ctx.alarms.firing()]
        source = "engine"
    else:
        try:
            rows = await _with_db(ctx, lambda conn: alarm_state.load_firing(conn, ctx.names))
        except _DB_ERRORS as e:
            return _db_unavailable(state, e)
        firing = [firing_as_dict(f) for f in rows]
        source = "system_checks"
    return _json({"firing": firing, "count": len(firing), "from": source})


async def _reset(request: web.Request) -> web.StreamResponse:
    state = request.app[CONTEXT]
    ctx = state.ctx
    if not _authorized(state, request):
        return _unauthorized()
    rule = request.match_info.get("rule")  # None: every rule
    if rule is not None and (not rule or len(rule) > MAX_RULE_CHARS):
        return _error(400, f"rule: 1 to {MAX_RULE_CHARS} characters", param="rule")
    now = ctx.clock.now()
    try:
        # The ok rows first: if the database is down nothing changes anywhere.
        cleared_rows = await _with_db(
            ctx, lambda conn: alarm_state.reset(conn, ctx.names, now, rule)
        )
    except _DB_ERRORS as e:
        return _db_unavailable(state, e)
    cleared: Sequence[Any] = ()
    known = True
    if ctx.alarms is not None:
        try:
            cleared = await ctx.alarms.reset(rule)
        except KeyError:
            known = False
    if not known and not cleared_rows:
        return _error(404, f"no alarm rule named {rule!r}", rule=rule)
    log.info(
        "alarm %s reset over HTTP (%d in memory, %d system_checks rows)",
        rule or "(every rule)",
        len(cleared),
        len(cleared_rows),
        extra={"component": COMPONENT, "event": "alarm.reset", "rule": rule},
    )
    return _json(
        {
            "rule": rule,
            "resolved": len(cleared),
            "rows_written": len(cleared_rows),
            "cleared": [firing_as_dict(f) for f in cleared_rows],
        }
    )


# --- the status page and the browser snippet -------------------------------------------------


def _package_file(package: str, *parts: str) -> bytes | None:
    try:
        ref = resources.files(package).joinpath(*parts)
        if not ref.is_file():
            return None
        return ref.read_bytes()
    except (FileNotFoundError, ModuleNotFoundError, NotADirectoryError):
        return None


def _static_response(body: bytes, content_type: str, *, page: bool = False) -> web.Response:
    response = web.Response(body=body, content_type=content_type, charset="utf-8")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    if page:
        response.headers["Content-Security-Policy"] = PAGE_CSP
        response.headers["Referrer-Policy"] = "no-referrer"
    return response


async def _page(request: web.Request) -> web.StreamResponse:
    body = _package_file("forwarder", "static", "index.html")
    if body is None:
        return _error(404, "the status page is not installed (forwarder/static/index.html)")
    return _static_response(body, "text/html", page=True)


async def _static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    content_type = STATIC_FILES.get(name)
    body = None if content_type is None else _package_file("forwarder", "static", name)
    if body is None or content_type is None:
        return _error(404, f"no static file {name[:100]!r}")
    return _static_response(body, content_type)


async def _ui_logger(request: web.Request) -> web.StreamResponse:
    body = _package_file("forwarder.producers", "ui-logger.js")
    if body is None:
        return _error(404, "ui-logger.js is not installed (forwarder/producers/ui-logger.js)")
    response = _static_response(body, "text/javascript")
    response.headers["Cache-Control"] = "public, max-age=300"
    return response
