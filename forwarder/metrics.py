"""Prometheus metrics of the running daemon, read from the components at scrape time.

`Metrics` owns its own `CollectorRegistry` (never prometheus_client's global one), so
two daemons in one process (tests) never share series. Most series are not updated
by the pipeline at all: a custom collector asks a `Snapshot` provider at each scrape
and turns the components' own counters and status into metric families. The few
things only observable as they happen are real instruments in the same registry:
the sink's batch latency (`observe_batch`, the sink's `on_batch` hook) and the HTTP
server's requests and refusals.

`snapshot_of(pipeline)` and `pipeline_status(pipeline)` read the runtime's
`Pipeline` (duck-typed: this module does not import the runtime).

Series (counters end in _total):
    forwarder_source_lines_read_total{source}      lines read by each source
    forwarder_source_bytes_read_total{source}
    forwarder_source_lag_bytes{source}             bytes known but not read yet
    forwarder_source_files_unread_total{source,reason}  files whose lines could not be read:
                                                   deleted_before_open, compressed
    forwarder_normalize_lines_total                lines into the normalize stage
    forwarder_sampler_events_sampled_out_total     events sampling kept out of the table
    forwarder_sink_rows_written_total
    forwarder_sink_rows_dead_lettered_total
    forwarder_sink_batches_written_total
    forwarder_sink_write_errors_total
    forwarder_sink_retries_total
    forwarder_sink_pending_rows
    forwarder_sink_last_commit_age_seconds
    forwarder_sink_batch_duration_seconds (histogram), forwarder_sink_batch_rows (histogram)
    forwarder_queue_depth{queue}, forwarder_queue_capacity{queue}
    forwarder_alarms_firing{rule}                  (rule, group) pairs firing per rule
    forwarder_alarms_alerts_dropped_total
    forwarder_component_up{component}              1 when the component's state is "ok"
    forwarder_intake_events_accepted_total, forwarder_intake_spool_bytes
    forwarder_http_requests_total{route,method,code}
    forwarder_intake_requests_refused_total{reason}
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

__all__ = [
    "BATCH_SECONDS_BUCKETS",
    "Metrics",
    "Snapshot",
    "SourceStats",
    "pipeline_status",
    "snapshot_of",
]

log = logging.getLogger(__name__)

COMPONENT = "metrics"
BATCH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_ROWS_BUCKETS = (1, 10, 50, 100, 500, 1000, 5000, 10_000, 50_000)


@dataclass(frozen=True, slots=True)
class SourceStats:
    name: str
    state: str
    lines_read: int = 0
    bytes_read: int = 0
    lag_bytes: int = 0
    files_unread: Mapping[str, int] = field(default_factory=dict)  # reason -> files


# Status counters of a file source (files mode too) -> the reason label of files_unread.
UNREAD_REASONS = {"files_missed": "deleted_before_open", "compressed_copies_unread": "compressed"}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The counters and states of every component at one moment."""

    sources: Sequence[SourceStats] = ()
    lines_normalized: int = 0
    events_sampled_out: int = 0
    rows_written: int = 0
    rows_dead_lettered: int = 0
    batches_written: int = 0
    write_errors: int = 0
    retries: int = 0
    pending_rows: int = 0
    last_commit_age_s: float | None = None
    queues: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # depth, capacity
    alarms_firing: Mapping[str, int] = field(default_factory=dict)
    alerts_dropped: int = 0
    components: Mapping[str, str] = field(default_factory=dict)  # component -> state
    intake_events_accepted: int | None = None
    intake_spool_bytes: int | None = None


SnapshotReader = Callable[[], Snapshot]


class Metrics:
    """One registry: the scrape-time collector plus the batch and HTTP instruments."""

    def __init__(self, snapshot: SnapshotReader | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._snapshot = snapshot
        self.snapshot_errors = 0
        self.batch_seconds = Histogram(
            "forwarder_sink_batch_duration_seconds",
            "Time from the start of a batch write to its commit, retries included",
            buckets=BATCH_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "forwarder_sink_batch_rows",
            "Rows per committed batch (dead-lettered included)",
            buckets=BATCH_ROWS_BUCKETS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "forwarder_http_requests",
            "HTTP requests answered, by route, method and status code",
            ["route", "method", "code"],
            registry=self.registry,
        )
        self.intake_refused = Counter(
            "forwarder_intake_requests_refused",
            "POST /logs/ingest requests refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(_ComponentCollector(self))

    def read_from(self, snapshot: SnapshotReader) -> None:
        """Where the collector reads at scrape time (the runtime sets it once built)."""
        self._snapshot = snapshot

    def observe_batch(self, seconds: float, rows: int) -> None:
        """The sink's on_batch hook: one committed batch."""
        self.batch_seconds.observe(max(0.0, seconds))
        self.batch_rows.observe(rows)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition for an Accept header: OpenMetrics when asked for, else the
        Prometheus text format 0.0.4. Returns (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def snapshot(self) -> Snapshot | None:
        if self._snapshot is None:
            return None
        try:
            return self._snapshot()
        except Exception as e:  # a scrape must never fail because one status did
            self.snapshot_errors += 1
            log.warning(
                "cannot read the components for /metrics: %s: %s",
                type(e).__name__,
                e,
                extra={"component": COMPONENT},
            )
            return None


class _ComponentCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # nothing read at registration

    def collect(self) -> Iterator[Metric]:
        snap = self._metrics.snapshot()
        yield _counter(
            "forwarder_metrics_snapshot_errors",
            "Scrapes whose component read failed",
            self._metrics.snapshot_errors,
        )
        if snap is None:
            return
        yield from _families(snap)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc)
    family.add_metric([], value)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], value)
    return family


def _families(s: Snapshot) -> Iterator[Metric]:
    lines = CounterMetricFamily(
        "forwarder_source_lines_read", "Lines read by each source", labels=["source"]
    )
    read = CounterMetricFamily(
        "forwarder_source_bytes_read", "Bytes read by each source", labels=["source"]
    )
    lag = GaugeMetricFamily(
        "forwarder_source_lag_bytes",
        "Bytes each source knows of but has not read (files: size - offset; intake: spooled, "
        "not yet fed)",
        labels=["source"],
    )
    unread = CounterMetricFamily(
        "forwarder_source_files_unread",
        "Files whose lines the source could not read: deleted before it could open them, "
        "or compressed rotated copies not read before (their lines are lost)",
        labels=["source", "reason"],
    )
    for src in s.sources:
        lines.add_metric([src.name], src.lines_read)
        read.add_metric([src.name], src.bytes_read)
        lag.add_metric([src.name], src.lag_bytes)
        for reason, files in src.files_unread.items():
            unread.add_metric([src.name, reason], files)
    yield lines
    yield read
    yield lag
    yield unread
    yield _counter(
        "forwarder_normalize_lines", "Lines into the normalize stage", s.lines_normalized
    )
    yield _counter(
        "forwarder_sampler_events_sampled_out",
        "Events sampling kept out of the table (counted in the summary rows)",
        s.events_sampled_out,
    )
    yield _counter("forwarder_sink_rows_written", "Rows committed", s.rows_written)
    yield _counter(
        "forwarder_sink_rows_dead_lettered",
        "Rows the database refused, written to the dead-letter table",
        s.rows_dead_lettered,
    )
    yield _counter("forwarder_sink_batches_written", "Batches committed", s.batches_written)
    yield _counter("forwarder_sink_write_errors", "Failed write attempts", s.write_errors)
    yield _counter("forwarder_sink_retries", "Transient write failures retried", s.retries)
    yield _gauge("forwarder_sink_pending_rows", "Rows buffered, not committed yet", s.pending_rows)
    if s.last_commit_age_s is not None:
        yield _gauge(
            "forwarder_sink_last_commit_age_seconds",
            "Seconds since the last committed batch",
            s.last_commit_age_s,
        )
    depth = GaugeMetricFamily(
        "forwarder_queue_depth", "Items in each stage queue", labels=["queue"]
    )
    capacity = GaugeMetricFamily(
        "forwarder_queue_capacity", "Capacity of each stage queue", labels=["queue"]
    )
    for name, (d, c) in sorted(s.queues.items()):
        depth.add_metric([name], d)
        capacity.add_metric([name], c)
    yield depth
    yield capacity
    firing = GaugeMetricFamily(
        "forwarder_alarms_firing", "(rule, group) pairs firing, per rule", labels=["rule"]
    )
    for rule, n in sorted(s.alarms_firing.items()):
        firing.add_metric([rule], n)
    yield firing
    yield _counter(
        "forwarder_alarms_alerts_dropped",
        "Alerts dropped because a notifier or recorder queue was full",
        s.alerts_dropped,
    )
    up = GaugeMetricFamily(
        "forwarder_component_up", "1 when the component's state is ok", labels=["component"]
    )
    for name, state in sorted(s.components.items()):
        up.add_metric([name], 1.0 if state == "ok" else 0.0)
    yield up
    if s.intake_events_accepted is not None:
        yield _counter(
            "forwarder_intake_events_accepted",
            "Events accepted by POST /logs/ingest (durable in the spool)",
            s.intake_events_accepted,
        )
    if s.intake_spool_bytes is not None:
        yield _gauge(
            "forwarder_intake_spool_bytes",
            "Bytes in the intake spool (not yet acknowledged)",
            s.intake_spool_bytes,
        )


# --- reading the runtime's Pipeline ---------------------------------------------------------


def _source_name(source: Any, index: int, settings: Any) -> str:
    name = getattr(source, "name", None)
    if isinstance(name, str) and name:
        return name
    configured = getattr(settings, "sources", ())
    if index < len(configured):
        return str(configured[index].name)
    return f"source{index}"


def _queue(q: Any) -> dict[str, int]:
    return {"depth": q.qsize(), "capacity": q.maxsize}


def _extra_sources(pipeline: Any, intake: Any) -> list[Any]:
    sources = list(pipeline.sources)
    if intake is not None and all(s is not intake for s in sources):
        sources.append(intake)
    return sources


def pipeline_status(pipeline: Any, intake: Any = None) -> dict[str, dict[str, Any]]:
    """component -> its status (each with "state"), for /health.

    Components: source:<name> (the intake among them when it runs as a source, or
    passed as `intake`), normalize, sink, queues, alarms.
    """
    out: dict[str, dict[str, Any]] = {}
    for i, source in enumerate(_extra_sources(pipeline, intake)):
        out[f"source:{_source_name(source, i, pipeline.settings)}"] = dict(source.status())
    normalize = pipeline.normalize
    sampler = getattr(normalize, "sampler", None)
    out["normalize"] = {
        "state": "ok",
        "lines_in": normalize.lines_in,
        "events_out": normalize.events_out,
        "sampled_out": getattr(sampler, "dropped", 0),
    }
    sink = pipeline.sink
    out["sink"] = {
        **sink.status(),
        "rows_written": sink.rows_written,
        "rows_dead_lettered": sink.rows_dead_lettered,
        "batches_written": sink.batches_written,
        "write_errors": sink.write_errors,
        "retries": sink.retries,
    }
    queues: dict[str, Any] = {"state": "ok", "raw": _queue(pipeline.raw_q)}
    queues["events"] = _queue(pipeline.event_q)
    alarms = pipeline.alarms
    if alarms is not None:
        queues["alarm_events"] = _queue(alarms.events)
        alarm_status = alarms.status()
        engine = alarm_status.get("engine", {})
        out["alarms"] = {
            "state": engine.get("state", "ok"),
            "reason": engine.get("reason"),
            **alarm_status,
        }
    out["queues"] = queues
    return out


def snapshot_of(pipeline: Any, intake: Any = None) -> Snapshot:
    """The metrics snapshot of a running runtime `Pipeline` (plus the intake)."""
    sources: list[SourceStats] = []
    components: dict[str, str] = {}
    for i, source in enumerate(_extra_sources(pipeline, intake)):
        status = source.status()
        name = _source_name(source, i, pipeline.settings)
        lag = status.get("lag_bytes")
        if lag is None:
            done, total = source.progress()
            lag = max(0, total - done)
        sources.append(
            SourceStats(
                name=name,
                state=str(status.get("state")),
                lines_read=int(status.get("lines_read") or 0),
                bytes_read=int(status.get("bytes_read") or 0),
                lag_bytes=int(lag),
                files_unread={
                    reason: int(status[key])
                    for key, reason in UNREAD_REASONS.items()
                    if key in status
                },
            )
        )
        components[f"source:{name}"] = str(status.get("state"))
    sink = pipeline.sink
    sink_status = sink.status()
    components["sink"] = str(sink_status.get("state"))
    queues = {
        "raw": (pipeline.raw_q.qsize(), pipeline.raw_q.maxsize),
        "events": (pipeline.event_q.qsize(), pipeline.event_q.maxsize),
    }
    firing: dict[str, int] = {}
    dropped = 0
    alarms = pipeline.alarms
    if alarms is not None:
        queues["alarm_events"] = (alarms.events.qsize(), alarms.events.maxsize)
        engine = alarms.engine
        for rule in engine.rules.rules:
            firing[rule] = 0
        for f in engine.firing():
            firing[f.rule] = firing.get(f.rule, 0) + 1
        dropped = engine.alerts_dropped
        components["alarms"] = str(engine.status().get("state"))
    sampler = getattr(pipeline.normalize, "sampler", None)
    return Snapshot(
        sources=sources,
        lines_normalized=pipeline.normalize.lines_in,
        events_sampled_out=getattr(sampler, "dropped", 0),
        rows_written=sink.rows_written,
        rows_dead_lettered=sink.rows_dead_lettered,
        batches_written=sink.batches_written,
        write_errors=sink.write_errors,
        retries=sink.retries,
        pending_rows=int(sink_status.get("pending_rows") or 0),
        last_commit_age_s=sink_status.get("last_commit_age_s"),
        queues=queues,
        alarms_firing=firing,
        alerts_dropped=dropped,
        components=components,
        intake_events_accepted=None if intake is None else intake.events_accepted,
        intake_spool_bytes=None if intake is None else intake.writer.used_bytes,
    )
