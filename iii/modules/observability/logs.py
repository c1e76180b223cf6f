"""Logs: the memory store, its three sources, and the ``log`` trigger type.

Sources, all stored as upstream's log JSON (spec modules.md §8):

* ``engine::log::{info,warn,error,debug,trace}`` calls (their trace and span
  ids default to the invocation's span, so a worker's log line sits in its
  trace);
* the engine's own Python log records at or above ``level``, through
  :class:`EngineLogHandler` on the ``iii`` logger, with the trace and span of
  the span open in the emitting task (:data:`~.tracer.CURRENT_SPAN`);
* SDK ``LOGS`` frames (OTLP/JSON ``resourceLogs``).

Every stored log is offered to the ``log`` triggers whose ``level`` is
``all`` or equals the log's lowercased severity text.  Deliveries go through a
bounded channel to the module's dispatcher (a full channel drops and counts),
and logs the engine writes *while delivering* are stored but not offered
again, so a trigger function that fails cannot feed itself.

Lifetime: owned by the observability module; the handler is attached while
the module runs.
"""

from __future__ import annotations

import contextvars
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs

from iii.errors import TriggerRegistrationError
from iii.modules.observability.spans import otlp_attributes, otlp_value, parse_otlp_id
from iii.modules.observability.tracer import CURRENT_SPAN
from iii.registry import LogicalTrigger

__all__ = [
    "LogStore",
    "EngineLogHandler",
    "LogTriggers",
    "SEVERITY",
    "DELIVERING",
    "STORED_MARK",
]

# Upstream's severity numbers per level.
SEVERITY = {"trace": 1, "debug": 5, "info": 9, "warn": 13, "error": 17}
_PY_LEVELS = {
    "trace": 5,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
TRIGGER_LEVELS = ("all", "trace", "debug", "info", "warn", "error")

# Set in the trigger dispatcher: engine logs written there are not re-offered.
DELIVERING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "iii_log_delivering", default=False
)
# ``extra`` key of records the module wrote itself (already stored).
STORED_MARK = "iii_log_stored"


def severity_of(levelno: int) -> tuple[int, str]:
    if levelno >= logging.ERROR:
        return SEVERITY["error"], "ERROR"
    if levelno >= logging.WARNING:
        return SEVERITY["warn"], "WARN"
    if levelno >= logging.INFO:
        return SEVERITY["info"], "INFO"
    if levelno >= logging.DEBUG:
        return SEVERITY["debug"], "DEBUG"
    return SEVERITY["trace"], "TRACE"


class LogStore:
    """A ring buffer of logs (oldest dropped); ``on_store`` sees each new one."""

    def __init__(self, max_count: int, sampling_ratio: float = 1.0):
        self.logs: deque[dict[str, Any]] = deque(maxlen=max(1, max_count))
        self.sampling_ratio = sampling_ratio
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.logs)

    def add(self, entry: dict[str, Any]) -> bool:
        if self.sampling_ratio < 1 and random.random() >= self.sampling_ratio:
            return False
        with self._lock:
            self.logs.append(entry)
        for listener in self.listeners:
            listener(entry)
        return True

    def clear(self) -> None:
        with self._lock:
            self.logs.clear()

    def query(
        self,
        *,
        start_ms: int | None = None,
        end_ms: int | None = None,
        trace_id: str | None = None,
        span_id: str | None = None,
        severity_min: int | None = None,
        severity_text: str | None = None,
    ) -> list[dict[str, Any]]:
        with self._lock:
            logs = list(self.logs)
        out = []
        for entry in logs:
            stamp_ms = entry["timestamp_unix_nano"] // 1_000_000
            if start_ms is not None and stamp_ms < start_ms:
                continue
            if end_ms is not None and stamp_ms > end_ms:
                continue
            if trace_id is not None and entry.get("trace_id") != trace_id.lower():
                continue
            if span_id is not None and entry.get("span_id") != span_id.lower():
                continue
            if severity_min is not None and entry["severity_number"] < severity_min:
                continue
            if (
                severity_text is not None
                and entry["severity_text"].lower() != severity_text.lower()
            ):
                continue
            out.append(entry)
        return out


def make_entry(
    *,
    body: Any,
    severity_number: int,
    severity_text: str,
    resource: dict[str, Any],
    attributes: dict[str, Any] | None = None,
    trace_id: str | None = None,
    span_id: str | None = None,
    timestamp_ns: int | None = None,
    observed_ns: int | None = None,
    scope_name: str | None = None,
    scope_version: str | None = None,
) -> dict[str, Any]:
    now = time.time_ns()
    entry: dict[str, Any] = {
        "timestamp_unix_nano": timestamp_ns or now,
        "observed_timestamp_unix_nano": observed_ns or now,
        "severity_number": severity_number,
        "severity_text": severity_text,
        "body": body,
        "attributes": attributes or {},
        "resource": resource,
        "service_name": str(resource.get("service.name", "unknown")),
    }
    if trace_id:
        entry["trace_id"] = trace_id.lower()
    if span_id:
        entry["span_id"] = span_id.lower()
    if scope_name:
        entry["instrumentation_scope_name"] = scope_name
    if scope_version:
        entry["instrumentation_scope_version"] = scope_version
    return entry


class EngineLogHandler(logging.Handler):
    """Stores the engine's own log records (attached to the ``iii`` logger)."""

    def __init__(self, store: LogStore, resource: dict[str, Any], level: str):
        super().__init__(_PY_LEVELS.get(level, logging.INFO))
        self.store = store
        self.resource = resource

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, STORED_MARK, False):
            return
        try:
            number, text = severity_of(record.levelno)
            span = CURRENT_SPAN.get()
            attributes: dict[str, Any] = {"logger": record.name}
            for key in ("worker_id", "invocation_id", "function_id"):
                value = getattr(record, key, None)
                if value is not None:
                    attributes[key] = value
            self.store.add(
                make_entry(
                    body=record.getMessage(),
                    severity_number=number,
                    severity_text=text,
                    resource=self.resource,
                    attributes=attributes,
                    trace_id=span.trace_id if span is not None else None,
                    span_id=span.span_id if span is not None else None,
                    timestamp_ns=int(record.created * 1e9),
                    scope_name=record.name,
                )
            )
        except Exception:
            self.handleError(record)


def entries_from_otlp_json(payload: Any) -> list[dict[str, Any]]:
    """The log records of an OTLP/JSON ``ExportLogsServiceRequest``."""
    if not isinstance(payload, dict):
        raise ValueError("an OTLP logs payload must be a JSON object")
    out = []
    for resource_logs in payload.get("resourceLogs") or ():
        resource = otlp_attributes(((resource_logs or {}).get("resource") or {}).get("attributes"))
        for scope_logs in resource_logs.get("scopeLogs") or ():
            scope = scope_logs.get("scope") or {}
            for record in scope_logs.get("logRecords") or ():
                if not isinstance(record, dict):
                    continue
                trace_id = parse_otlp_id(record.get("traceId"), 16)
                span_id = parse_otlp_id(record.get("spanId"), 8)
                number = int(record.get("severityNumber") or 0)
                out.append(
                    make_entry(
                        body=otlp_value(record.get("body")),
                        severity_number=number,
                        severity_text=str(record.get("severityText") or severity_of_number(number)),
                        resource=resource,
                        attributes=otlp_attributes(record.get("attributes")),
                        trace_id=format(trace_id, "032x") if trace_id else None,
                        span_id=format(span_id, "016x") if span_id else None,
                        timestamp_ns=int(record.get("timeUnixNano") or 0) or None,
                        observed_ns=int(record.get("observedTimeUnixNano") or 0) or None,
                        scope_name=scope.get("name") or None,
                        scope_version=scope.get("version") or None,
                    )
                )
    return out


def severity_of_number(number: int) -> str:
    for text, floor in (("ERROR", 17), ("WARN", 13), ("INFO", 9), ("DEBUG", 5)):
        if number >= floor:
            return text
    return "TRACE"


@attrs.define(eq=False)
class LogTriggers:
    """The ``log`` trigger type: which functions want which levels."""

    levels: dict[LogicalTrigger, str] = attrs.field(factory=dict)

    def register_trigger(self, trigger: LogicalTrigger) -> None:
        config = trigger.config if isinstance(trigger.config, dict) else {}
        level = config.get("level", "all")
        if not isinstance(level, str) or level.lower() not in TRIGGER_LEVELS:
            raise TriggerRegistrationError(
                f"log trigger level must be one of {', '.join(TRIGGER_LEVELS)}, got {level!r}"
            )
        self.levels[trigger] = level.lower()

    def unregister_trigger(self, trigger: LogicalTrigger) -> None:
        self.levels.pop(trigger, None)

    def matching(self, entry: dict[str, Any]) -> list[LogicalTrigger]:
        level = str(entry.get("severity_text", "")).lower()
        if level == "warning":
            level = "warn"
        return [t for t, wanted in self.levels.items() if wanted == "all" or wanted == level]
