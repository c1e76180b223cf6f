"""Metrics: the engine's accumulators, SDK metric ingestion, and the Prometheus text.

* :class:`EngineMetrics` counts invocations (total / success / error, per
  function, per error code), keeps a latency histogram per function and the
  last 10 000 durations for percentiles, and counts worker connects and
  disconnects.  The observability tracer records every invocation here, sampled
  or not.  Function ids and error codes come from peers (a call to an unknown
  id is counted too), so, as OpenTelemetry's metrics SDK does, at most
  :data:`MAX_SERIES` of each are told apart; later ones are counted under
  :data:`OTHER`, and an id is cut after :data:`MAX_LABEL_CHARS`.
* :class:`SdkMetricStore` keeps the data points SDK workers send in ``MTRC``
  frames (OTLP/JSON), bounded by count, bytes (``metrics_max_bytes``) and age;
  each point is kept as its JSON, cut to :data:`MAX_POINT_BYTES`.
* :class:`PrometheusCollector` renders all of it, plus live engine gauges
  (workers, pending calls, open sockets, telemetry frames) and every module's
  ``statistics()`` (a :class:`~iii.modules.ModuleStatistics`, the one shape
  every module returns), through ``prometheus_client``'s exposition format.
  Each value becomes ``iii_module_<module>_<name>`` (``None``, not known yet,
  is left out); each number column of a table (e.g. the queue's per-topic
  depth) becomes ``iii_module_<module>_<table>_<column>``, labelled with each
  row's labels.  :func:`module_statistics_json` gives the same for
  ``engine::metrics::list`` (modules with nothing to report are left out).
* Numbers that live behind I/O (a queue's depth in Redis) are read by a
  module's ``async refresh_statistics()``; :func:`refresh_module_statistics`
  awaits them all (bounded) before a scrape or a ``metrics::list``.

Lifetime: owned by the observability module; synchronous except
:func:`refresh_module_statistics`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from iii.log import truncate
from iii.modules import ModuleStatistics, StatisticsRow
from iii.modules.observability.bounds import BoundedRing, fit_record
from iii.modules.observability.spans import otlp_attributes

if TYPE_CHECKING:
    from iii.engine import Engine

__all__ = [
    "EngineMetrics",
    "SdkMetricStore",
    "PrometheusCollector",
    "BUCKETS",
    "refresh_module_statistics",
    "module_statistics_json",
]

log = logging.getLogger(__name__)

# Characters a Prometheus metric name cannot hold.
_NOT_IN_NAMES = re.compile(r"[^a-zA-Z0-9_:]")

# How long a scrape or metrics::list waits for modules' refresh_statistics().
REFRESH_TIMEOUT = 5.0

# Distinct function ids (and error codes) counted apart; the rest are counted
# under OTHER (OpenTelemetry's metrics SDK has the same default cardinality limit).
MAX_SERIES = 2000
OTHER = "(other)"
MAX_LABEL_CHARS = 256
# One SDK data point's JSON: a point is a few numbers and attributes.
MAX_POINT_BYTES = 4096
# Bytes counted for a stored point on top of its JSON and its name.
POINT_OVERHEAD = 160

# Seconds; Prometheus' default buckets plus 30 s (the default invocation timeout) and 60 s.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@attrs.define(eq=False)
class _FunctionStats:
    total: int = 0
    errors: int = 0
    duration_sum: float = 0.0
    buckets: list[int] = attrs.field(factory=lambda: [0] * (len(BUCKETS) + 1))


@attrs.define(eq=False)
class EngineMetrics:
    total: int = 0
    success: int = 0
    error: int = 0
    by_function: dict[str, _FunctionStats] = attrs.field(factory=dict)
    by_error_code: dict[tuple[str, str], int] = attrs.field(factory=dict)
    durations: deque[float] = attrs.field(factory=lambda: deque(maxlen=10_000))
    worker_spawns: int = 0
    worker_deaths: int = 0
    workers_active: int = 0
    # Also told about each invocation (the OTel instruments, when exported).
    observers: list[Callable[[str, float, str | None], None]] = attrs.field(factory=list)

    def _function_series(self, function_id: str) -> str:
        if function_id in self.by_function:
            return function_id
        label = truncate(function_id, MAX_LABEL_CHARS)
        if label in self.by_function or len(self.by_function) < MAX_SERIES:
            return label
        return OTHER

    def record_invocation(self, function_id: str, seconds: float, error_code: str | None) -> None:
        function_id = self._function_series(function_id)
        if error_code is not None:
            error_code = truncate(error_code, MAX_LABEL_CHARS)
        for observer in self.observers:
            observer(function_id, seconds, error_code)
        self.total += 1
        stats = self.by_function.get(function_id)
        if stats is None:
            stats = self.by_function[function_id] = _FunctionStats()
        stats.total += 1
        stats.duration_sum += seconds
        stats.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.durations.append(seconds)
        if error_code is None:
            self.success += 1
        else:
            self.error += 1
            stats.errors += 1
            key = (function_id, error_code)
            if key not in self.by_error_code and len(self.by_error_code) >= MAX_SERIES:
                key = (OTHER, OTHER)
            self.by_error_code[key] = self.by_error_code.get(key, 0) + 1

    def on_worker_event(self, event: str, worker_id: str) -> None:
        if event == "worker_connected":
            self.worker_spawns += 1
            self.workers_active += 1
        elif event == "worker_disconnected":
            self.worker_deaths += 1
            self.workers_active = max(0, self.workers_active - 1)

    def performance(self) -> dict[str, float]:
        values = sorted(self.durations)
        if not values:
            return {f"{k}_duration_ms": 0.0 for k in ("avg", "p50", "p95", "p99", "min", "max")}

        def pct(p: float) -> float:
            return values[min(len(values) - 1, max(0, math.ceil(p * len(values)) - 1))] * 1000

        return {
            "avg_duration_ms": sum(values) / len(values) * 1000,
            "p50_duration_ms": pct(0.50),
            "p95_duration_ms": pct(0.95),
            "p99_duration_ms": pct(0.99),
            "min_duration_ms": values[0] * 1000,
            "max_duration_ms": values[-1] * 1000,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "invocations": {
                "total": self.total,
                "success": self.success,
                "error": self.error,
                "deferred": 0,
                "by_function": {fid: stats.total for fid, stats in self.by_function.items()},
            },
            "workers": {
                "spawns": self.worker_spawns,
                "deaths": self.worker_deaths,
                "active": self.workers_active,
            },
            "performance": self.performance(),
        }


@attrs.frozen(slots=True)
class _StoredPoint:
    name: str
    timestamp: int  # ms
    encoded: bytes

    @property
    def size(self) -> int:
        return len(self.encoded) + len(self.name) + POINT_OVERHEAD


class SdkMetricStore:
    """Data points from SDK ``MTRC`` frames: the newest ``max_count``, at most
    ``max_bytes`` of them, none older than ``retention``."""

    def __init__(self, max_count: int, retention_seconds: float, max_bytes: int = 16 * 1024 * 1024):
        self._ring = BoundedRing[_StoredPoint](max_count, max_bytes)
        self.retention = retention_seconds

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def bytes(self) -> int:
        """The bytes the stored points are counted for (at most ``max_bytes``)."""
        return self._ring.bytes

    def _add(self, point: dict[str, Any]) -> None:
        fitted = fit_record(point, MAX_POINT_BYTES)
        record = fitted.record
        timestamp = record.get("timestamp")
        stored = _StoredPoint(
            name=str(record.get("name", "")),
            timestamp=timestamp if isinstance(timestamp, int) else 0,
            encoded=fitted.encoded,
        )
        self._ring.add(stored, stored.size)

    def ingest(self, payload: Any, worker_id: str | None) -> int:
        if not isinstance(payload, dict):
            raise ValueError("an OTLP metrics payload must be a JSON object")
        received = int(time.time() * 1000)
        added = 0
        for resource_metrics in payload.get("resourceMetrics") or ():
            resource = otlp_attributes(
                ((resource_metrics or {}).get("resource") or {}).get("attributes")
            )
            service = str(resource.get("service.name", "unknown"))
            for scope_metrics in resource_metrics.get("scopeMetrics") or ():
                for metric in scope_metrics.get("metrics") or ():
                    if not isinstance(metric, dict):
                        continue
                    for kind in ("sum", "gauge", "histogram", "exponentialHistogram", "summary"):
                        data = metric.get(kind)
                        if isinstance(data, dict):
                            break
                    else:
                        continue
                    for point in data.get("dataPoints") or ():
                        self._add(_point_json(metric, kind, point, service, worker_id, received))
                        added += 1
        self._expire(received)
        return added

    def _expire(self, now_ms: int) -> None:
        horizon = now_ms - self.retention * 1000
        while (oldest := self._ring.oldest()) is not None and oldest.timestamp < horizon:
            self._ring.pop_oldest()

    def query(
        self, *, start_ms: int | None, end_ms: int | None, name: str | None
    ) -> list[dict[str, Any]]:
        self._expire(int(time.time() * 1000))
        out = []
        for point in self._ring:
            if name is not None and point.name != name:
                continue
            if start_ms is not None and point.timestamp < start_ms:
                continue
            if end_ms is not None and point.timestamp > end_ms:
                continue
            out.append(orjson.loads(point.encoded))
        return out


def _point_json(
    metric: dict[str, Any],
    kind: str,
    point: dict[str, Any],
    service: str,
    worker_id: str | None,
    received: int,
) -> dict[str, Any]:
    value: Any
    if "asDouble" in point:
        value = _number(point["asDouble"])
    elif "asInt" in point:
        value = _number(point["asInt"])
    else:
        value = {
            "count": _number(point.get("count", 0)),
            "sum": _number(point.get("sum", 0)),
            "min": _number(point.get("min")) if point.get("min") is not None else None,
            "max": _number(point.get("max")) if point.get("max") is not None else None,
        }
    time_nanos = _number(point.get("timeUnixNano", 0))
    return {
        "name": str(metric.get("name") or ""),
        "description": str(metric.get("description") or ""),
        "unit": str(metric.get("unit") or ""),
        "type": kind,
        "value": value,
        "attributes": otlp_attributes(point.get("attributes")),
        "time_unix_nano": time_nanos,
        "service_name": service,
        "worker_id": worker_id,
        "timestamp": int(time_nanos // 1_000_000) if time_nanos else received,
    }


def _number(value: Any) -> float | int:
    """A JSON number of a data point: an int within 64 bits, else a float, else 0."""
    if isinstance(value, float):
        return value
    number: int
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        try:
            number = int(value)
        except (TypeError, ValueError, OverflowError):
            try:
                return float(value)
            except (TypeError, ValueError, OverflowError):
                return 0
    if -(2**63) <= number < 2**64:
        return number
    try:
        return float(number)
    except OverflowError:
        return 0


def aggregate(points: list[dict[str, Any]], interval_s: float) -> list[dict[str, Any]]:
    """Numeric points grouped by (name, interval): count, sum, avg, min, max."""
    groups: dict[tuple[str, int], list[float]] = {}
    step = max(1, int(interval_s * 1000))
    for point in points:
        if isinstance(point["value"], dict):
            continue
        key = (point["name"], point["timestamp"] // step * step)
        groups.setdefault(key, []).append(float(point["value"]))
    return [
        {
            "name": name,
            "interval_start": start,
            "interval_seconds": interval_s,
            "count": len(values),
            "sum": sum(values),
            "avg": sum(values) / len(values),
            "min": min(values),
            "max": max(values),
        }
        for (name, start), values in sorted(
            groups.items(), key=lambda item: (item[0][1], item[0][0])
        )
    ]


class PrometheusCollector(Collector):
    """Everything above as Prometheus metric families (collected per scrape)."""

    def __init__(self, engine: Engine, metrics: EngineMetrics, extra: Any = None):
        self.engine = engine
        self.metrics = metrics
        self.extra = extra  # callable returning [(name, help, value)]

    def collect(self) -> Iterator[Any]:
        metrics, engine = self.metrics, self.engine
        calls = CounterMetricFamily(
            "iii_invocations",
            "Invocations by function and outcome",
            labels=["function_id", "status"],
        )
        errors = CounterMetricFamily(
            "iii_invocation_errors",
            "Failed invocations by error code",
            labels=["function_id", "error_code"],
        )
        latency = HistogramMetricFamily(
            "iii_invocation_duration_seconds", "Invocation latency", labels=["function_id"]
        )
        for function_id, stats in sorted(metrics.by_function.items()):
            calls.add_metric([function_id, "ok"], stats.total - stats.errors)
            calls.add_metric([function_id, "error"], stats.errors)
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, BUCKETS), "+Inf"), stats.buckets, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric([function_id], buckets, stats.duration_sum)
        for (function_id, code), count in sorted(metrics.by_error_code.items()):
            errors.add_metric([function_id, code], count)
        yield calls
        yield errors
        yield latency
        yield CounterMetricFamily(
            "iii_worker_connections", "Worker connections accepted", value=metrics.worker_spawns
        )
        yield CounterMetricFamily(
            "iii_worker_disconnections", "Worker connections ended", value=metrics.worker_deaths
        )
        yield GaugeMetricFamily(
            "iii_workers_active", "Workers connected now", value=len(engine.connections)
        )
        yield GaugeMetricFamily(
            "iii_functions_registered", "Functions registered", value=len(engine.registry.functions)
        )
        yield GaugeMetricFamily(
            "iii_pending_invocations",
            "Calls routed to workers, not answered yet",
            value=len(engine.pending),
        )
        yield GaugeMetricFamily(
            "iii_inflight_calls", "Calls from workers being handled", value=engine.inflight
        )
        yield GaugeMetricFamily(
            "iii_open_sockets", "Sockets open on the worker port", value=engine.open_sockets
        )
        inbound = engine.inbound.statistics()
        yield GaugeMetricFamily(
            "iii_inbound_bytes",
            "Bytes of peer messages held on the WebSocket ports (max_inbound_bytes)",
            value=inbound.used,
        )
        yield GaugeMetricFamily(
            "iii_inbound_bytes_peak",
            "The most bytes of peer messages held at once since start",
            value=inbound.peak,
        )
        yield GaugeMetricFamily(
            "iii_inbound_waiting",
            "Sockets not read now: waiting for room in max_inbound_bytes",
            value=inbound.waiting,
        )
        yield CounterMetricFamily(
            "iii_inbound_timeouts",
            "Sockets closed (1013) after waiting for room past inbound_wait_timeout_ms",
            value=inbound.timed_out,
        )
        frames = CounterMetricFamily(
            "iii_telemetry_frames", "SDK telemetry frames received", labels=["kind"]
        )
        for kind, count in sorted(engine.telemetry.counts.items()):
            frames.add_metric([kind], count)
        yield frames
        # Their warnings are rate-limited (iii.log.RateLimitedLog): this counts them all.
        yield CounterMetricFamily(
            "iii_telemetry_frames_dropped",
            "SDK telemetry frames that could not be read (dropped)",
            value=engine.telemetry.frames_dropped,
        )
        if self.extra is not None:
            for name, help_text, value in self.extra():
                yield GaugeMetricFamily(name, help_text, value=value)
        yield from _module_statistics(engine)


def _snapshots(engine: Engine) -> Iterator[tuple[str, ModuleStatistics]]:
    """(module name, its ``statistics()``) for each module with something to report."""
    for name, module in sorted(engine.modules.items()):
        try:
            snapshot = module.statistics()
        except Exception:
            log.warning("module %s: statistics() failed", name, exc_info=True)
            continue
        if not snapshot.empty:
            yield name, snapshot


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric_name(*parts: str) -> str:
    """A valid Prometheus metric name (a repeatable module's name may hold '.' or '-')."""
    return _NOT_IN_NAMES.sub("_", "_".join(parts))


def _module_statistics(engine: Engine) -> Iterator[GaugeMetricFamily]:
    """``iii_module_<name>_<value>`` for each value of a module's ``statistics()``;
    ``iii_module_<name>_<table>_<column>{<labels>}`` for each column of a table."""
    for name, snapshot in _snapshots(engine):
        # Values and tables in one name order (as the JSON's keys, sorted).
        for field in sorted({*snapshot.values, *snapshot.tables}):
            value = snapshot.values.get(field)
            if _is_number(value):
                yield GaugeMetricFamily(
                    _metric_name("iii_module", name, field), f"{name} module: {field}", value=value
                )
            rows = snapshot.tables.get(field)
            if rows:
                yield from _table_gauges(
                    _metric_name("iii_module", name, field), f"{name} module", rows
                )


def _table_gauges(
    prefix: str, help_prefix: str, rows: Sequence[StatisticsRow]
) -> Iterator[GaugeMetricFamily]:
    labels = sorted(rows[0].labels)
    columns = sorted({column for row in rows for column in row.values})
    for column in columns:
        family = GaugeMetricFamily(
            f"{prefix}_{column}", f"{help_prefix}: {column} by {', '.join(labels)}", labels=labels
        )
        for row in rows:
            value = row.values.get(column)
            if value is not None and not isinstance(value, bool):
                family.add_metric([row.labels.get(label, "") for label in labels], value)
        yield family


def module_statistics_json(engine: Engine) -> dict[str, dict[str, Any]]:
    """Every module's ``statistics()`` as JSON (for ``engine::metrics::list``)."""
    return {name: snapshot.to_json() for name, snapshot in _snapshots(engine)}


async def refresh_module_statistics(engine: Engine) -> None:
    """Await each module's ``refresh_statistics()``, all within ``REFRESH_TIMEOUT``.

    A module that fails or runs out of time keeps its previous numbers.
    """
    with trio.move_on_after(REFRESH_TIMEOUT) as scope:
        for name, module in sorted(engine.modules.items()):
            refresh = getattr(module, "refresh_statistics", None)
            if refresh is None:
                continue
            try:
                await refresh()
            except Exception:
                log.warning("module %s: refresh_statistics() failed", name, exc_info=True)
    if scope.cancelled_caught:
        log.warning("module statistics: refresh took longer than %gs", REFRESH_TIMEOUT)
