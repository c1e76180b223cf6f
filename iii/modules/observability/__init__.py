"""Observability: ``modules::observability::OtelModule`` (spec modules.md §8).

Traces, logs and metrics through the official OpenTelemetry SDK:

* **Memory.** Every store is bounded in entries and in bytes, and each entry
  in bytes (:mod:`.bounds`; ``logs_max_bytes``, ``logs_max_entry_bytes``,
  ``memory_max_bytes``, ``span_max_bytes``, ``metrics_max_bytes``); log
  trigger deliveries waiting in the queue hold at most ``logs_max_bytes``
  more (a full queue drops and counts, ``logs_dropped``).
* **Traces.** While the module runs, ``engine.tracer`` is an
  :class:`~.tracer.OtelTracer`: every :meth:`Engine.invoke` gets a ``call
  <function_id>`` span, child of the caller's ``traceparent``, whose context
  the target worker receives; modules' spans (HTTP requests, queue jobs, cron
  firings) use the same hook.  Sampling: ``sampling_ratio`` and the
  ``sampling`` rules (:mod:`.sampler`).  Exporters: ``memory`` (the
  :class:`~.spans.SpanStore` behind ``engine::traces::*``), ``otlp``
  (OTLP/HTTP to ``endpoint``), or ``both``.  Spans SDK workers send
  (``OTLP`` frames on ``/`` or ``/otel``) go to the same processors, so a
  trace's tree holds the caller's, the engine's and the worker's spans.
* **Logs.** ``engine::log::{info,warn,error,debug,trace}``, the engine's own
  log records and SDK ``LOGS`` frames, in one store (``engine::logs::*``),
  offered to ``log`` triggers; also exported over OTLP with
  ``logs_exporter: otlp|both``.  The engine's records come through
  :class:`~.log_intake.LogIntake`, a thread-safe queue of at most
  ``logs_max_bytes`` (a full queue drops and counts,
  ``engine_records_dropped``) that the module's drain task empties into the
  store; ``engine::logs::list`` empties it first, so it sees every record
  logged before the call.
* **Log triggers cannot feed themselves for ever.**  A log carries the
  causation depth (:mod:`iii.causation`) of the code that wrote it: the
  emitting task's for an engine record or an ``engine::log::*`` call, the
  depth remembered for its trace id for an SDK ``LOGS`` record.  The
  triggers of a log of depth ``d`` run at ``d + 1`` (their function calls
  carry it, through a worker too, by trace context), and past
  :data:`~iii.causation.MAX_TRIGGER_DEPTH` they are not run (counted,
  ``log_triggers_too_deep``, and warned about at most every 10 s).  So a
  trigger function that logs, or fails (its failure is logged), re-fires at
  most that many times per original log.  This replaces a context variable
  set in the delivery tasks: it also bounds loops through a worker, and it
  needs nothing from the thread that logs.
* **Metrics.** Invocation counts, errors and latency per function, workers
  connected, SDK ``MTRC`` data points (``engine::metrics::list``), OTel
  instruments exported over OTLP with ``metrics_enabled`` and
  ``metrics_exporter: otlp``, and a Prometheus text endpoint
  (``prometheus_host``:``prometheus_port``/metrics) that also shows every
  module's ``statistics()`` (refreshed before each scrape, e.g. queue depth);
  ``engine::metrics::list`` returns them under ``module_statistics``.
* **The metrics port** (:mod:`.prometheus`): ``/metrics``, and the engine's
  liveness ``/healthz`` and readiness ``/readyz`` (:mod:`.health`).  Upstream
  has no such port, so it is opened only when asked for
  (``prometheus_enabled: true``, or a ``prometheus_port`` /
  ``prometheus_host`` given): an upstream config opens no extra port, and
  several engines on one host start side by side.  Asked for, a failed bind
  stops the engine (exit 1) naming the address and the keys.
* ``engine::health::check``, ``engine::sampling::rules``,
  ``engine::baggage::{get,set,get_all}``.

Not implemented: alerts (``alerts`` is parsed and ignored, with a warning),
``engine::rollups::list``, ``engine::alerts::*``.

Lifetime: :meth:`Module.run` installs the tracer, the telemetry consumer, the
worker listener and the log handler, serves ``/metrics``, drains the log
intake and delivers log triggers in its own nursery; on exit it removes them
all (the handler first), stores what the intake still holds, and flushes the
OTLP exporters last (bounded, shielded).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
import trio
from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

from iii import __version__, json_limits
from iii.causation import LoopWarning, firing, trace_for_firing
from iii.fanout import FanOut
from iii.grants import TriggerAccess
from iii.modules import ModuleStatistics
from iii.modules.observability import functions
from iii.modules.observability.config import Config
from iii.modules.observability.health import Answer, liveness, readiness
from iii.modules.observability.log_intake import LogIntake
from iii.modules.observability.logs import (
    EngineLogHandler,
    LogStore,
    LogTriggers,
    StoredLog,
    attached_handler,
    entries_from_otlp_json,
)
from iii.modules.observability.metrics import (
    EngineMetrics,
    PrometheusCollector,
    SdkMetricStore,
    refresh_module_statistics,
)
from iii.modules.observability.prometheus import CONTENT_TYPE, serve_metrics_port
from iii.modules.observability.sampler import build_sampler
from iii.modules.observability.span_bounds import BoundedSpanProcessor
from iii.modules.observability.spans import MemorySpanProcessor, SpanStore, spans_from_otlp_json
from iii.modules.observability.tracer import OtelTracer
from iii.registry import LogicalTrigger

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = ["Config", "Module"]

log = logging.getLogger(__name__)

LOG_QUEUE_SIZE = 1000
# A log trigger hands out every party's log entries of its level: a token
# needs engine::logs::list or a log(level-pattern) entry (log(*) for "all").
LOG_TRIGGER_ACCESS = TriggerAccess(
    data=True, resource_key="level", read_function="engine::logs::list"
)
LOG_DELIVERY_CONCURRENCY = 64
# Engine records stored between two checkpoints of the drain task.
DRAIN_BATCH = 256
FLUSH_DEADLINE = 5.0

# A log trigger's delivery: (trigger, the log as stored, the depth it runs at).
_Delivery = tuple[LogicalTrigger, StoredLog, int]


class Module:
    def __init__(self, engine: Engine, config: Config):
        self.engine = engine
        self.config = config
        self.resource = Resource.create(
            {
                "service.name": config.service_name,
                "service.version": config.service_version,
                **(
                    {"service.namespace": config.service_namespace}
                    if config.service_namespace
                    else {}
                ),
            }
        )
        self.metrics = EngineMetrics()
        self.sdk_metrics = SdkMetricStore(
            config.metrics_max_count, config.metrics_retention_seconds, config.metrics_max_bytes
        )
        self.spans: SpanStore | None = None
        self.span_sinks: list[SpanProcessor] = []
        # Cuts each span to span_max_bytes once, then hands it to span_sinks.
        self.span_processor = BoundedSpanProcessor(self.span_sinks, config.span_max_bytes)
        self.provider: TracerProvider | None = None
        self.logs = LogStore(
            config.logs_max_count,
            config.logs_sampling_ratio,
            max_bytes=config.logs_max_bytes,
            max_entry_bytes=config.logs_max_entry_bytes,
        )
        # The engine's own records, queued by the log handler (any thread).
        self.intake = LogIntake(config.logs_max_bytes)
        self.log_triggers = LogTriggers()
        self.log_loops = LoopWarning("log")
        self.logs_dropped = 0
        # Bytes of the logs waiting for (or in) delivery to log triggers.
        self.logs_queued_bytes = 0
        self.prometheus_port: int | None = None
        # (trigger, the log as stored, the depth its triggers run at): one
        # delivery each, while the module runs.
        self._log_deliveries: FanOut[_Delivery] | None = None
        self._closers: list[Any] = []

    # -- setup ---------------------------------------------------------------------

    def _setup_traces(self) -> OtelTracer:
        config = self.config
        if not config.enabled:
            return OtelTracer(None, self.metrics)
        if config.memory_traces:
            self.spans = SpanStore(
                config.memory_max_spans, config.memory_max_bytes, config.span_max_bytes
            )
            self.span_sinks.append(MemorySpanProcessor(self.spans))
        if config.otlp_traces:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            self.span_sinks.append(
                BatchSpanProcessor(
                    OTLPSpanExporter(endpoint=config.otlp_url("traces"), timeout=FLUSH_DEADLINE)
                )
            )
        self.provider = TracerProvider(resource=self.resource, sampler=build_sampler(config))
        self.provider.add_span_processor(self.span_processor)
        self._closers.append(self.provider.shutdown)
        return OtelTracer(self.provider.get_tracer("iii.engine", __version__), self.metrics)

    def _setup_log_export(self) -> None:
        if self.config.logs_exporter not in ("otlp", "both"):
            return
        from opentelemetry._logs import LogRecord, SeverityNumber
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.sdk._logs import ReadWriteLogRecord
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        processor = BatchLogRecordProcessor(
            OTLPLogExporter(endpoint=self.config.otlp_url("logs"), timeout=FLUSH_DEADLINE),
            max_export_batch_size=min(max(1, self.config.logs_batch_size), 10_000),
            schedule_delay_millis=self.config.logs_flush_interval_ms,
        )
        self._closers.append(processor.shutdown)

        def export(entry: dict[str, Any], stored: StoredLog) -> None:
            context = None
            if entry.get("trace_id") and entry.get("span_id"):
                span_context = SpanContext(
                    int(entry["trace_id"], 16),
                    int(entry["span_id"], 16),
                    is_remote=True,
                    trace_flags=TraceFlags(TraceFlags.SAMPLED),
                )
                context = trace_api.set_span_in_context(NonRecordingSpan(span_context))
            body = entry["body"]
            record = LogRecord(
                timestamp=entry["timestamp_unix_nano"],
                observed_timestamp=entry["observed_timestamp_unix_nano"],
                context=context,
                severity_text=entry["severity_text"],
                severity_number=SeverityNumber(entry["severity_number"])
                if 1 <= entry["severity_number"] <= 24
                else None,
                body=body
                if isinstance(body, (str, int, float, bool)) or body is None
                else orjson.dumps(body, default=str).decode(),
                attributes={
                    k: v
                    if isinstance(v, (str, int, float, bool))
                    else orjson.dumps(v, default=str).decode()
                    for k, v in entry["attributes"].items()
                },
            )
            resource = Resource(entry["resource"]) if entry["resource"] else self.resource
            processor.on_emit(ReadWriteLogRecord(log_record=record, resource=resource))

        self.logs.listeners.append(export)

    def _setup_metric_export(self) -> None:
        if not (self.config.metrics_enabled and self.config.metrics_exporter == "otlp"):
            return
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=self.config.otlp_url("metrics"), timeout=FLUSH_DEADLINE)
        )
        provider = MeterProvider(resource=self.resource, metric_readers=[reader])
        self._closers.append(provider.shutdown)
        meter = provider.get_meter("iii.engine", __version__)
        calls = meter.create_counter("iii.invocations.total", description="Invocations")
        errors = meter.create_counter(
            "iii.invocation.errors.total", description="Failed invocations"
        )
        duration = meter.create_histogram(
            "iii.invocation.duration", unit="s", description="Invocation latency"
        )
        meter.create_observable_gauge(
            "iii.workers.active",
            callbacks=[lambda options: [_observation(len(self.engine.connections))]],
            description="Workers connected",
        )

        def record(function_id: str, seconds: float, error_code: str | None) -> None:
            status = "ok" if error_code is None else "error"
            calls.add(1, {"function_id": function_id, "status": status})
            duration.record(seconds, {"function_id": function_id, "status": status})
            if error_code is not None:
                errors.add(1, {"function_id": function_id, "error_code": error_code})

        self.metrics.observers.append(record)

    # -- SDK telemetry ---------------------------------------------------------------

    def ingest(self, kind: str, payload: bytes, worker_id: str | None) -> None:
        """The telemetry consumer: an SDK's OTLP / LOGS / MTRC frame into the stores."""
        data = json_limits.loads(payload)
        if kind == "OTLP":
            if not self.span_sinks:
                return
            for span in spans_from_otlp_json(data, worker_id=worker_id):
                self.span_processor.on_end(span)
        elif kind == "LOGS":
            depths = self.engine.trace_depths
            for entry in entries_from_otlp_json(data):
                # A worker's log in a trigger's trace is as deep as that firing.
                self.record_log(entry, depths.depth_of_trace(entry.get("trace_id")))
        elif kind == "MTRC":
            self.sdk_metrics.ingest(data, worker_id)

    # -- log triggers ------------------------------------------------------------------

    def record_log(self, entry: dict[str, Any], depth: int) -> StoredLog | None:
        """Store a log written at causation depth ``depth`` and offer it to ``log`` triggers
        (trio thread); None if it was sampled out."""
        stored = self.logs.add(entry)
        if stored is not None:
            # What offering it logs (a loop warning) is caused by it.
            with firing(depth + 1):
                self._offer_log(entry, stored, depth + 1)
        return stored

    def drain_logs(self, limit: int | None = None) -> None:
        """Store (and offer) the engine records queued so far, oldest first, at most
        ``limit`` of them (trio thread)."""
        for pending in self.intake.take(limit):
            self.record_log(pending.entry, pending.depth)

    async def _drain_intake(self) -> None:
        """The drain task: stores the handler's records as they are queued.

        A batch at a time, with a checkpoint between batches, so a flood does
        not hold up the engine; no record is held outside the intake across a
        checkpoint, so a :meth:`drain_logs` call in between keeps the order.
        """
        while True:
            await self.intake.wait()
            self.drain_logs(DRAIN_BATCH)
            await trio.lowlevel.checkpoint()

    def _offer_log(self, entry: dict[str, Any], stored: StoredLog, depth: int) -> None:
        """Queue the log (as stored) for each matching ``log`` trigger, to run at ``depth``.

        The queue holds at most LOG_QUEUE_SIZE logs and ``logs_max_bytes``
        bytes of them; a log that does not fit is dropped and counted.
        """
        deliveries = self._log_deliveries
        if not self.log_triggers.levels or deliveries is None:
            return
        matching = self.log_triggers.matching(entry)
        if not matching or self.log_loops.too_deep(depth, [t.function_id for t in matching]):
            return
        for trigger in matching:
            if self.logs_queued_bytes + stored.size > self.config.logs_max_bytes:
                self.logs_dropped += 1
                continue
            if deliveries.offer((trigger, stored, depth)):
                self.logs_queued_bytes += stored.size
            else:
                self.logs_dropped += 1

    async def _deliver_log(self, queued: _Delivery) -> None:
        trigger, stored, depth = queued
        engine = self.engine
        try:
            with firing(depth):
                await engine.invoke_logged(
                    trigger.function_id,
                    stored.entry(),
                    what="log trigger",
                    grant=trigger.grant,
                    **trace_for_firing(engine.trace_depths, engine.tracer.records_spans, depth),
                )
        finally:
            self.logs_queued_bytes -= stored.size

    # -- lifetime -------------------------------------------------------------------------

    def statistics(self) -> ModuleStatistics:
        values = {
            "spans_stored": len(self.spans) if self.spans is not None else 0,
            "spans_bytes": self.spans.bytes if self.spans is not None else 0,
            "logs_stored": len(self.logs),
            "logs_bytes": self.logs.bytes,
            "logs_dropped": self.logs_dropped,
            "logs_queued_bytes": self.logs_queued_bytes,
            "engine_records_queued_bytes": self.intake.bytes,
            "engine_records_dropped": self.intake.dropped,
            "log_triggers_too_deep": self.log_loops.skipped,
            "sdk_metric_points": len(self.sdk_metrics),
            "sdk_metric_bytes": self.sdk_metrics.bytes,
        }
        return ModuleStatistics(values=values)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        engine, config = self.engine, self.config
        if config.alerts:
            log.warning(
                "observability: %d alert rules configured; alerts are not implemented and are ignored",
                len(config.alerts),
            )
        tracer = self._setup_traces()
        self._setup_log_export()
        self._setup_metric_export()
        self.metrics.workers_active = len(engine.connections)
        handler = EngineLogHandler(self.intake, dict(self.resource.attributes), config.store_level)
        log_deliveries: FanOut[_Delivery] = FanOut(
            self._deliver_log,
            lambda queued: f"log trigger {queued[0].function_id!r}",
            queue_size=LOG_QUEUE_SIZE,
            concurrency=LOG_DELIVERY_CONCURRENCY,
        )
        async with AsyncExitStack() as hooks:
            # Undone in reverse order, whatever ends the module; the exporters
            # are flushed last.
            hooks.push_async_callback(self._flush)
            hooks.callback(log_deliveries.close)
            module_nursery = await hooks.enter_async_context(trio.open_nursery())
            functions.register(engine, self)
            engine.register_trigger_type(
                "log",
                self.log_triggers,
                description="Log entries stored by the observability module",
                access=LOG_TRIGGER_ACCESS,
            )
            if config.prometheus_enabled:
                self.prometheus_port = await module_nursery.start(
                    partial(
                        serve_metrics_port,
                        config.prometheus_host,
                        config.prometheus_port,
                        self._metrics_port_routes(),
                        keys=engine.config.listen_keys(
                            config, "prometheus_host", "prometheus_port"
                        ),
                    )
                )
            hooks.enter_context(self._offering_logs(log_deliveries))
            module_nursery.start_soon(log_deliveries.run)
            module_nursery.start_soon(self._drain_intake)
            # On the way out, once the handler is detached: what it queued is stored.
            hooks.callback(self.drain_logs)
            hooks.enter_context(engine.using_tracer(tracer))
            hooks.enter_context(engine.using_telemetry_consumer(self.ingest))
            hooks.enter_context(engine.listening(workers=self.metrics.on_worker_event))
            hooks.enter_context(attached_handler(logging.getLogger("iii"), handler))
            task_status.started()
            await trio.sleep_forever()

    @contextmanager
    def _offering_logs(self, deliveries: FanOut[_Delivery]) -> Iterator[None]:
        """Stored logs are offered to ``log`` triggers, for the block."""
        self._log_deliveries = deliveries
        try:
            yield
        finally:
            self._log_deliveries = None

    def _metrics_port_routes(self) -> dict[bytes, Callable[[], Awaitable[Answer]]]:
        """What the metrics port serves: /metrics, /healthz, /readyz."""
        from prometheus_client import CollectorRegistry, generate_latest

        engine = self.engine
        registry = CollectorRegistry(auto_describe=False)
        registry.register(PrometheusCollector(engine, self.metrics))

        async def metrics() -> Answer:
            await refresh_module_statistics(engine)
            return 200, CONTENT_TYPE, generate_latest(registry)

        async def healthz() -> Answer:
            return liveness(engine)

        async def readyz() -> Answer:
            return readiness(engine)

        return {b"/metrics": metrics, b"/healthz": healthz, b"/readyz": readyz}

    async def _flush(self) -> None:
        """Shut the OpenTelemetry pipelines down (exports what is buffered), bounded."""
        closers, self._closers = self._closers, []
        if not closers:
            return

        def close_all() -> None:
            for close in closers:
                try:
                    close()
                except Exception:
                    log.warning("observability: exporter shutdown failed", exc_info=True)

        with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_DEADLINE * 2):
            await trio.to_thread.run_sync(close_all, abandon_on_cancel=True)


def _observation(value: float) -> Any:
    from opentelemetry.metrics import Observation

    return Observation(value)
