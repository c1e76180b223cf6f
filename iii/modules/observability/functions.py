"""The observability module's engine functions (spec modules.md §8, "Functions").

``engine::log::{info,warn,error,debug,trace}``, ``engine::traces::{list,tree,clear}``,
``engine::logs::{list,clear}``, ``engine::metrics::list``, ``engine::health::check``,
``engine::sampling::rules`` and ``engine::baggage::{get,set,get_all}``.  Inputs
are parsed with :func:`iii.native.parse_input` (upstream's
``deserialization_error``); the trace functions need the memory exporter
(``memory_exporter_not_enabled`` otherwise).  Registered by :meth:`Module.run`.

``engine::log::*`` answers null, as upstream, when the log was stored whole
(or sampled out); when it was over ``logs_max_entry_bytes`` and was cut, it
answers ``{"truncated": true, "entry_bytes": <its JSON size>,
"max_entry_bytes": <the bound>}``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import attrs

from iii import __version__
from iii.causation import current_depth
from iii.errors import IIIError
from iii.modules.observability.logs import SEVERITY, STORED_MARK, make_entry
from iii.modules.observability.metrics import (
    aggregate,
    module_statistics_json,
    refresh_module_statistics,
)
from iii.modules.observability.spans import SpanStore, is_internal
from iii.native import CallContext, parse_input

if TYPE_CHECKING:
    from iii.engine import Engine
    from iii.modules.observability import Module

__all__ = ["register"]

worker_log = logging.getLogger("iii.worker_log")
_PY_LEVEL = {
    "trace": 5,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _memory(store: SpanStore | None) -> SpanStore:
    if store is None:
        raise IIIError(
            "the memory exporter is not enabled (set exporter: memory or both, and enabled: true)",
            code="memory_exporter_not_enabled",
        )
    return store


@attrs.frozen(kw_only=True)
class LogInput:
    message: str
    data: Any = None
    trace_id: str | None = None
    span_id: str | None = None
    service_name: str | None = None


@attrs.frozen(kw_only=True)
class TracesListInput:
    trace_id: str | None = None
    offset: int = 0
    limit: int = 100
    service_name: str | None = None
    name: str | None = None
    status: str | None = None
    min_duration_ms: float | None = None
    max_duration_ms: float | None = None
    start_time: int | None = None
    end_time: int | None = None
    sort_by: str = "start_time"
    sort_order: str = "desc"
    attributes: list[Any] | None = None
    include_internal: bool = False


@attrs.frozen(kw_only=True)
class TraceIdInput:
    trace_id: str


@attrs.frozen(kw_only=True)
class LogsListInput:
    start_time: int | None = None
    end_time: int | None = None
    trace_id: str | None = None
    span_id: str | None = None
    severity_min: int | None = None
    severity_text: str | None = None
    offset: int = 0
    limit: int = 100


@attrs.frozen(kw_only=True)
class MetricsListInput:
    start_time: int | None = None
    end_time: int | None = None
    metric_name: str | None = None
    aggregate_interval: float | None = None


@attrs.frozen(kw_only=True)
class BaggageKeyInput:
    key: str
    value: Any = None


def _traceparent_ids(traceparent: str | None) -> tuple[str | None, str | None]:
    parts = (traceparent or "").split("-")
    if len(parts) >= 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
        return parts[1], parts[2]
    return None, None


def _baggage(header: str | None) -> dict[str, str]:
    items: dict[str, str] = {}
    for member in (header or "").split(","):
        key, sep, value = member.split(";", 1)[0].partition("=")
        if sep and key.strip():
            items[unquote(key.strip())] = unquote(value.strip())
    return items


def _duration_ms(span: dict[str, Any]) -> float:
    return float(span["end_time_unix_nano"] - span["start_time_unix_nano"]) / 1e6


def _matches(span: dict[str, Any], query: TracesListInput) -> bool:
    if query.trace_id is not None and span["trace_id"] != query.trace_id.lower():
        return False
    if (
        query.service_name is not None
        and query.service_name.lower() not in span["service_name"].lower()
    ):
        return False
    if query.name is not None and query.name.lower() not in span["name"].lower():
        return False
    if query.status is not None and query.status.lower() not in span["status"].lower():
        return False
    duration = _duration_ms(span)
    if query.min_duration_ms is not None and duration < query.min_duration_ms:
        return False
    if query.max_duration_ms is not None and duration > query.max_duration_ms:
        return False
    start_ms, end_ms = span["start_time_unix_nano"] / 1e6, span["end_time_unix_nano"] / 1e6
    if query.start_time is not None and end_ms < query.start_time:
        return False
    if query.end_time is not None and start_ms > query.end_time:
        return False
    if query.attributes:
        present = {key: value for key, value in span["attributes"]}
        for pair in query.attributes:
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or str(present.get(pair[0])) != str(pair[1])
            ):
                return False
    return query.include_internal or not is_internal(span)


_SORT_KEYS = {
    "start_time": lambda s: s["start_time_unix_nano"],
    "duration": _duration_ms,
    "name": lambda s: s["name"],
}


def register(engine: Engine, module: Module) -> None:
    config = module.config

    def log_function(level: str) -> Any:
        function_id = f"engine::log::{level}"

        async def handler(data: Any, ctx: CallContext) -> dict[str, Any] | None:
            given = parse_input(data, LogInput, function_id)
            trace_id, span_id = given.trace_id, given.span_id
            if trace_id is None:
                trace_id, own_span = _traceparent_ids(ctx.traceparent)
                span_id = span_id or own_span
            attributes = dict(given.data) if isinstance(given.data, dict) else {}
            attributes.pop("_caller_worker_id", None)
            if given.data is not None and not isinstance(given.data, dict):
                attributes["data"] = given.data
            service = given.service_name or "unknown"
            stored = module.record_log(
                make_entry(
                    body=given.message,
                    severity_number=SEVERITY[level],
                    severity_text=level.upper(),
                    resource={"service.name": service},
                    attributes=attributes,
                    trace_id=trace_id,
                    span_id=span_id,
                ),
                current_depth(),
            )
            if config.logs_console_output:
                worker_log.log(
                    _PY_LEVEL[level], "[%s] %s", service, given.message, extra={STORED_MARK: True}
                )
            if stored is not None and stored.truncated:
                return {
                    "truncated": True,
                    "entry_bytes": stored.original_bytes,
                    "max_entry_bytes": module.logs.max_entry_bytes,
                }
            return None

        return function_id, handler

    for level in ("info", "warn", "error", "debug", "trace"):
        function_id, handler = log_function(level)
        engine.register_function(function_id, handler, description=f"Store a {level} log entry")

    async def traces_list(data: Any, ctx: CallContext) -> Any:
        query = parse_input(
            data if data is not None else {}, TracesListInput, "engine::traces::list"
        )
        store = _memory(module.spans)
        spans = [span for span in store.roots() if _matches(span, query)]
        spans.sort(
            key=_SORT_KEYS.get(query.sort_by, _SORT_KEYS["start_time"]),
            reverse=query.sort_order != "asc",
        )
        offset, limit = max(0, query.offset), max(0, query.limit)
        return {
            "spans": spans[offset : offset + limit],
            "total": len(spans),
            "offset": offset,
            "limit": limit,
        }

    async def traces_tree(data: Any, ctx: CallContext) -> Any:
        query = parse_input(data, TraceIdInput, "engine::traces::tree")
        return {"roots": _memory(module.spans).tree(query.trace_id)}

    async def traces_clear(data: Any, ctx: CallContext) -> Any:
        _memory(module.spans).clear()
        return {"success": True}

    async def logs_list(data: Any, ctx: CallContext) -> Any:
        query = parse_input(data if data is not None else {}, LogsListInput, "engine::logs::list")
        module.drain_logs()  # every engine record logged before this call is listed
        logs = module.logs.query(
            start_ms=query.start_time,
            end_ms=query.end_time,
            trace_id=query.trace_id,
            span_id=query.span_id,
            severity_min=query.severity_min,
            severity_text=query.severity_text,
        )
        logs.sort(key=lambda stored: stored.timestamp_ns, reverse=True)
        offset, limit = max(0, query.offset), max(0, query.limit)
        return {
            "logs": [stored.entry() for stored in logs[offset : offset + limit]],
            "total": len(logs),
            "query": attrs.asdict(query),
            "timestamp": _now_ms(),
        }

    async def logs_clear(data: Any, ctx: CallContext) -> Any:
        module.drain_logs()  # records logged before this call are cleared too
        module.logs.clear()
        return {"success": True}

    async def metrics_list(data: Any, ctx: CallContext) -> Any:
        query = parse_input(
            data if data is not None else {}, MetricsListInput, "engine::metrics::list"
        )
        points = module.sdk_metrics.query(
            start_ms=query.start_time, end_ms=query.end_time, name=query.metric_name
        )
        await refresh_module_statistics(engine)
        response: dict[str, Any] = {
            "engine_metrics": module.metrics.to_json(),
            "sdk_metrics": points,
            "module_statistics": module_statistics_json(engine),
            "timestamp": _now_ms(),
        }
        if query.aggregate_interval is not None and query.aggregate_interval > 0:
            response["aggregated_metrics"] = aggregate(points, query.aggregate_interval)
        if any(v is not None for v in attrs.astuple(query)):
            response["query"] = attrs.asdict(query)
        return response

    async def health_check(data: Any, ctx: CallContext) -> Any:
        def healthy(details: Any) -> dict[str, Any]:
            return {"status": "healthy", "details": details}

        disabled = {"status": "disabled", "details": None}
        return {
            "status": "healthy",
            "components": {
                "otel": healthy(
                    {
                        "enabled": True,
                        "service_name": config.service_name,
                        "exporter": config.exporter,
                    }
                )
                if config.enabled
                else disabled,
                "metrics": healthy({"stored_metrics": len(module.sdk_metrics)}),
                "logs": healthy({"stored_logs": len(module.logs)}),
                "spans": healthy({"stored_spans": len(module.spans)})
                if module.spans is not None
                else disabled,
            },
            "timestamp": _now_ms(),
            "version": __version__,
        }

    async def sampling_rules(data: Any, ctx: CallContext) -> Any:
        sampling = config.sampling
        return {
            "traces": {
                "default_ratio": sampling.default
                if sampling is not None and sampling.default is not None
                else config.sampling_ratio,
                "rules": [attrs.asdict(rule) for rule in sampling.rules]
                if sampling is not None
                else [],
                "parent_based": sampling.parent_based if sampling is not None else False,
            },
            "logs": {"sampling_ratio": config.logs_sampling_ratio},
            "timestamp": _now_ms(),
        }

    async def baggage_get(data: Any, ctx: CallContext) -> Any:
        query = parse_input(data, BaggageKeyInput, "engine::baggage::get")
        return {"value": _baggage(ctx.baggage).get(query.key)}

    async def baggage_set(data: Any, ctx: CallContext) -> Any:
        parse_input(data, BaggageKeyInput, "engine::baggage::set")
        return {
            "success": True,
            "note": "baggage travels with the call (the W3C baggage header); set it in the caller's context",
        }

    async def baggage_get_all(data: Any, ctx: CallContext) -> Any:
        return {"baggage": _baggage(ctx.baggage)}

    for function_id, handler, description in (
        ("engine::traces::list", traces_list, "List stored traces (root spans)"),
        ("engine::traces::tree", traces_tree, "The span tree of one trace"),
        ("engine::traces::clear", traces_clear, "Forget stored spans"),
        ("engine::logs::list", logs_list, "List stored logs"),
        ("engine::logs::clear", logs_clear, "Forget stored logs"),
        ("engine::metrics::list", metrics_list, "Engine and SDK metrics"),
        ("engine::health::check", health_check, "Health of the observability pipelines"),
        ("engine::sampling::rules", sampling_rules, "The trace and log sampling settings"),
        ("engine::baggage::get", baggage_get, "One baggage item of the call"),
        ("engine::baggage::set", baggage_set, "Baggage cannot be changed from inside a call"),
        ("engine::baggage::get_all", baggage_get_all, "All baggage items of the call"),
    ):
        engine.register_function(function_id, handler, description=description)
